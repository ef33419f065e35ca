"""Crop stage: window geometry, face tracking, frame selection, splits, and bad input on real media."""

import numpy as np
import pytest

from avatar_pipeline import cache
from avatar_pipeline.config import CropConfig, Subject
from avatar_pipeline.errors import InputError
from avatar_pipeline.mediapipe_models import FaceBox
from avatar_pipeline.stages import crop

from .conftest import ffmpeg, image_to_video


def _box(cx, cy, s, score=0.9):
    return FaceBox(cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2, score)


def test_window_contains_every_face_and_stays_inside_the_frame():
    boxes = [_box(300 + dx, 200, 100) for dx in (-40, 0, 40)]
    w = crop.compute_window(boxes, 640, 480, CropConfig(scale=2.2))
    assert w.side == 220
    assert 0 <= w.x0 and w.x0 + w.side <= 640 and 0 <= w.y0 and w.y0 + w.side <= 480
    for b in boxes:
        assert w.x0 <= b.x0 and b.x1 <= w.x0 + w.side and w.y0 <= b.y0 and b.y1 <= w.y0 + w.side
    assert w.pads(640, 480) == (0, 0, 0, 0)


def test_window_grows_to_contain_a_moving_face():
    boxes = [_box(100, 240, 80), _box(500, 240, 80)]
    w = crop.compute_window(boxes, 640, 480, CropConfig(scale=2.0, margin=0.0))
    assert w.side >= 480 and w.x0 <= 60 and w.x0 + w.side >= 540


def test_window_pads_only_when_the_face_does_not_fit():
    w = crop.compute_window([_box(60, 240, 100)], 640, 480, CropConfig(scale=2.0, margin=0.1))
    assert w.x0 >= 0  # shifted inside rather than padded
    tight = crop.compute_window([_box(-10, 240, 100)], 640, 480, CropConfig(scale=2.0, margin=0.0))
    assert tight.pads(640, 480)[0] > 0 and tight.x0 <= -60


def test_track_keeps_the_largest_consistent_face():
    big, small = _box(300, 200, 120), _box(80, 80, 40)
    detections = [[big, small], [small], [_box(305, 200, 118), small], [_box(310, 202, 121)]]
    track = crop.track_main_face(detections)
    assert track[0] is big and track[1] is None and track[3].center[0] == 310


def test_fps_selector_and_frame_range():
    sel = crop._FpsSelector(10)
    times = np.arange(0, 1, 1 / 30)
    kept = [t for t in times if sel.keep(t)]
    assert len(kept) == 10
    cfg = CropConfig(start=5, end=20, every_nth=3, max_frames=4)
    kept_idx = []
    for i in range(30):
        if crop.select_frames(i, len(kept_idx), cfg):
            kept_idx.append(i)
    assert kept_idx == [5, 8, 11, 14]


def test_default_split_holds_out_the_last_fifth_and_skips_invalid():
    valid = [True] * 100
    valid[95] = valid[3] = False
    split = crop.default_split(100, valid, 0.2, 0.1, None)
    assert split["test"] == [i for i in range(80, 100) if i != 95]
    assert split["val"] == list(range(70, 80))
    assert 3 not in split["train"] and split["train"][-1] == 69
    explicit = crop.default_split(100, valid, 0.2, 0.0, Subject("s", "v", test=(0, 10), train=(10, 100)))
    assert explicit["test"] == [i for i in range(10) if i != 3] and explicit["train"][0] == 10
    with pytest.raises(InputError, match="outside the 100"):
        crop.default_split(100, valid, 0.2, 0.0, Subject("s", "v", test=(90, 120)))


def test_crop_keeps_the_face_inside_on_every_frame(w009):
    meta = w009.crop_meta()
    size = meta["size"]
    assert len(meta["frames"]) == 40 and size == 128
    for f in meta["frames"]:
        assert f["face_box"] is not None, f
        x0, y0, x1, y1 = f["face_box"]
        assert -2 <= x0 < x1 <= size + 2 and -2 <= y0 < y1 <= size + 2
    frame = w009.read_frame(0)
    assert frame.shape == (128, 128, 3) and frame.std() > 20  # a real image, not padding
    split = w009.split()
    assert len(split["test"]) == 8 and split["test"][-1] == 39 and not split["excluded"]
    assert meta["source"]["fps"] == pytest.approx(25.0)
    assert [f["source_frame"] for f in meta["frames"]] == list(range(40))


def test_no_face_is_a_clear_error(tmp_path):
    clip = tmp_path / "bars.mp4"
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=320x240:rate=10", "-frames:v", "15", "-pix_fmt", "yuv420p", str(clip))
    with pytest.raises(InputError, match="no face detected in any of 15 frames"):
        crop.run(cache.SubjectCache(tmp_path, "bars"), clip, CropConfig(size=64))
    assert not (tmp_path / "bars" / "crop").exists()  # nothing left looking complete


def test_several_faces_track_the_largest_and_warn(images_dir, tmp_path):
    clip = image_to_video(images_dir / "dlib_bald_guys.jpg", tmp_path / "group.mp4", frames=6)
    store = cache.SubjectCache(tmp_path, "group")
    meta = crop.run(store, clip, CropConfig(size=96, min_train_frames=1, min_test_frames=1))
    assert any("several faces" in w for w in meta["warnings"])
    from avatar_pipeline.mediapipe_models import FaceDetector
    from avatar_pipeline.video import iter_frames, probe

    frame = next(iter_frames(probe(clip)))
    with FaceDetector() as det:
        sizes = [b.size for b in det.detect(frame)]
    assert len(sizes) > 1
    tracked = meta["frames"][0]["face_box"]
    tracked_size = max(tracked[2] - tracked[0], tracked[3] - tracked[1]) * meta["window"]["side"] / 96
    # the detection pass runs on a downscaled frame, so sizes agree to a few percent
    assert abs(tracked_size - sizes[0]) < abs(tracked_size - sizes[1]) and tracked_size == pytest.approx(
        sizes[0], rel=0.05
    )


def test_face_leaving_the_frame_is_flagged_and_kept_out_of_splits(videos_dir, tmp_path):
    clip = tmp_path / "pan.mp4"
    # a virtual camera panning right until the face has left the picture
    ffmpeg(
        "-i",
        str(videos_dir / "lp_d18.mp4"),
        "-frames:v",
        "40",
        "-vf",
        "pad=960:480:0:0,crop=300:300:x='if(lt(n,10),90,min(600,90+(n-10)*40))':y=90",
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        str(clip),
    )
    store = cache.SubjectCache(tmp_path, "pan")
    meta = crop.run(store, clip, CropConfig(size=64, min_test_frames=0))  # every test frame has lost the face
    excluded = {int(k) for k in store.split()["excluded"]}
    assert excluded and min(excluded) >= 10 and max(excluded) == 39
    for name in ("train", "val", "test"):
        assert not excluded & set(store.split()[name])
    assert any("excluded from the splits" in w for w in meta["warnings"])


def test_a_photo_named_mp4_is_called_a_single_image(images_dir, tmp_path):
    photo = tmp_path / "holiday.mp4"
    photo.write_bytes((images_dir / "dlib_Tom_Cruise_avp_2014_4.jpg").read_bytes())
    with pytest.raises(InputError, match=r"holiday.mp4: is a still mjpeg image .* not a video") as error:
        crop.run(cache.SubjectCache(tmp_path, "photo"), photo, CropConfig(size=64))
    assert "a single photo cannot train an avatar" in str(error.value)
    assert not (tmp_path / "photo").exists()


def test_a_one_frame_video_is_called_a_single_image(images_dir, tmp_path):
    clip = image_to_video(images_dir / "dlib_Tom_Cruise_avp_2014_4.jpg", tmp_path / "one.mp4", frames=1)
    with pytest.raises(InputError, match="is a single frame, not a video"):
        crop.run(cache.SubjectCache(tmp_path, "one"), clip, CropConfig(size=64))


def test_a_three_frame_clip_is_refused_before_anything_is_written(videos_dir, tmp_path):
    clip = tmp_path / "three.mp4"
    ffmpeg("-i", str(videos_dir / "lp_d18.mp4"), "-frames:v", "3", "-c:v", "libx264", "-pix_fmt", "yuv420p", str(clip))
    expected = r"too few usable frames: 2 for training and 1 for testing \(3 kept, 3 with a usable face\); .* 10 and 2"
    with pytest.raises(InputError, match=expected):
        crop.run(cache.SubjectCache(tmp_path, "three"), clip, CropConfig(size=64))
    assert not list((tmp_path / "three").glob("crop*"))


def test_few_training_frames_are_accepted_with_a_loud_warning(videos_dir, tmp_path):
    meta = crop.run(cache.SubjectCache(tmp_path, "few"), videos_dir / "lp_d18.mp4", CropConfig(size=64, max_frames=20))
    assert any("only 16 training frames" in w for w in meta["warnings"])


@pytest.fixture(scope="module")
def upright_crop(videos_dir, tmp_path_factory):
    """The first 20 frames of lp_d18 cropped as they are: what a turned copy must come back to."""
    store = cache.SubjectCache(tmp_path_factory.mktemp("upright"), "upright")
    meta = crop.run(store, videos_dir / "lp_d18.mp4", CropConfig(size=64, max_frames=20))
    assert meta["source"]["upright_rotation"] == 0 and not any("upside" in w or "side" in w for w in meta["warnings"])
    return store


@pytest.mark.parametrize(
    "turn_filter, expected_turn, words",
    [
        ("hflip,vflip", 180, "upside down"),
        ("transpose=clock", 270, "on its side"),
        ("transpose=cclock", 90, "on its side"),
    ],
)
def test_a_face_upside_down_or_on_its_side_is_turned_upright_and_said(
    videos_dir, tmp_path, upright_crop, turn_filter, expected_turn, words
):
    clip = tmp_path / "turned.mp4"  # pixels turned, no rotation metadata: as when a phone's tag is lost
    ffmpeg(
        "-i",
        str(videos_dir / "lp_d18.mp4"),
        "-frames:v",
        "20",
        "-vf",
        turn_filter,
        "-c:v",
        "libx264",
        "-pix_fmt",
        "yuv420p",
        "-crf",
        "12",
        str(clip),
    )
    store = cache.SubjectCache(tmp_path, "turned")
    meta = crop.run(store, clip, CropConfig(size=64))
    assert meta["source"]["rotation"] == 0 and meta["source"]["upright_rotation"] == expected_turn
    assert any(words in w and f"turned {expected_turn} degrees" in w for w in meta["warnings"])
    # the frames come out as the upright clip's: same window, same pixels up to re-encoding
    for i in (0, 19):
        difference = np.abs(store.read_frame(i).astype(float) - upright_crop.read_frame(i).astype(float)).mean()
        assert difference < 6, (i, difference)


def test_crop_rotate_setting_overrides_the_check(videos_dir, tmp_path):
    meta = crop.run(
        cache.SubjectCache(tmp_path, "forced"),
        videos_dir / "lp_d18.mp4",
        CropConfig(size=64, max_frames=20, rotate=180),
    )
    assert meta["source"]["upright_rotation"] == 180 and not any("upside" in w for w in meta["warnings"])
