"""Landmarks, parsing, background and normals checked for correctness on real clips and photos."""

import warnings

import cv2
import numpy as np
import pytest

from avatar_pipeline import cache, facemesh
from avatar_pipeline.cache import PARSING_CLASS_ID as CLASS_ID
from avatar_pipeline.config import BackgroundConfig, NormalsConfig
from avatar_pipeline.errors import InputError
from avatar_pipeline.stages import background, landmarks

from .conftest import image_to_video, run_preprocessing


def _face_size(box):
    return max(box[2] - box[0], box[3] - box[1])


@pytest.mark.parametrize("clip", ["w009", "lp_d18"])
def test_landmarks_agree_with_the_independent_face_detector(clip, request):
    """Eyes and mouth of the mesh (via the iBUG-68 subset) vs BlazeFace's own keypoints."""
    store = request.getfixturevalue(clip)
    lms, frames = store.landmarks(), store.crop_meta()["frames"]
    assert lms["valid"].mean() > 0.95
    assert lms["mp478"].shape == (len(frames), 478, 3) and lms["ibug68"].shape == (len(frames), 68, 3)
    errors = []
    for i in np.flatnonzero(lms["valid"]):
        kp, size = np.array(frames[i]["face_keypoints"]), _face_size(frames[i]["face_box"])
        p = lms["ibug68"][i, :, :2]
        right_eye, left_eye = p[facemesh.IBUG68_RIGHT_EYE].mean(0), p[facemesh.IBUG68_LEFT_EYE].mean(0)
        mouth = p[facemesh.IBUG68_OUTER_LIPS].mean(0)
        errors.append(
            [np.linalg.norm(right_eye - kp[0]), np.linalg.norm(left_eye - kp[1]), np.linalg.norm(mouth - kp[3])]
            / np.float32(size)
        )
    errors = np.array(errors)
    assert np.median(errors) < 0.06 and np.percentile(errors, 95) < 0.12, errors.max(0)


@pytest.mark.parametrize("clip", ["w009", "lp_d18"])
def test_iris_and_inner_lips_fall_in_the_parsed_eye_and_mouth_regions(clip, request):
    store = request.getfixturevalue(clip)
    lms = store.landmarks()
    for i in np.flatnonzero(lms["valid"])[::5]:
        labels, pts = store.read_labels(i), lms["mp478"][i]

        def label_at(k):
            x, y = np.round(pts[k, :2]).astype(int)
            return labels[y, x]

        assert label_at(facemesh.RIGHT_IRIS[0]) == CLASS_ID["r_eye"]
        assert label_at(facemesh.LEFT_IRIS[0]) == CLASS_ID["l_eye"]
        assert label_at(0) in (CLASS_ID["u_lip"], CLASS_ID["mouth"])  # outer upper-lip midpoint
        assert label_at(17) in (CLASS_ID["l_lip"], CLASS_ID["mouth"])  # outer lower-lip midpoint
        assert label_at(1) == CLASS_ID["nose"]  # nose tip
        # the subject's right eye is on the image's left
        assert pts[facemesh.RIGHT_IRIS[0], 0] < pts[facemesh.LEFT_IRIS[0], 0]


def test_parsing_classes_are_plausible(lp_d18):
    labels = lp_d18.read_labels(0)
    present = set(np.unique(labels))
    for name in ("background", "skin", "hair", "nose", "l_eye", "r_eye", "u_lip", "l_lip", "neck", "cloth"):
        assert CLASS_ID[name] in present, name
    ys_hair = np.nonzero(labels == CLASS_ID["hair"])[0].mean()
    ys_neck = np.nonzero(labels == CLASS_ID["neck"])[0].mean()
    ys_skin = np.nonzero(labels == CLASS_ID["skin"])[0].mean()
    assert ys_hair < ys_skin < ys_neck  # hair above the face, neck below (image y grows down)


def _align(moving: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Warp `moving` onto `fixed` with a RANSAC homography on ORB features (the plate was shot hand-held)."""
    orb = cv2.ORB_create(4000)
    k1, d1 = orb.detectAndCompute(cv2.cvtColor(moving, cv2.COLOR_RGB2GRAY), None)
    k2, d2 = orb.detectAndCompute(cv2.cvtColor(fixed, cv2.COLOR_RGB2GRAY), None)
    matches = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True).match(d1, d2)
    src = np.float32([k1[m.queryIdx].pt for m in matches])
    dst = np.float32([k2[m.trainIdx].pt for m in matches])
    h, _ = cv2.findHomography(src, dst, cv2.RANSAC, 3.0)
    size = (fixed.shape[1], fixed.shape[0])
    return cv2.warpPerspective(moving, h, size), cv2.warpPerspective(np.ones(moving.shape[:2], np.uint8), h, size) > 0


def test_matte_separates_person_from_background(images_dir):
    """bgm_0001: the same scene with and without the person; where they differ is the person."""

    def load(name):
        image = cv2.cvtColor(cv2.imread(str(images_dir / name)), cv2.COLOR_BGR2RGB)
        return cv2.resize(image, (640, 360), interpolation=cv2.INTER_AREA)

    img, back = load("bgm_0001_img.png"), load("bgm_0001_back.png")
    aligned, inside = _align(back, img)
    diff = cv2.GaussianBlur(np.abs(img.astype(np.float32) - aligned).max(-1), (9, 9), 0)
    from avatar_pipeline.mediapipe_models import SelfieSegmenter

    with SelfieSegmenter() as seg:
        matte = seg.matte(img)
    changed, unchanged = inside & (diff > 60), inside & (diff < 15)
    assert changed.mean() > 0.05 and unchanged.mean() > 0.3
    assert matte[changed].mean() > 0.85
    assert matte[unchanged].mean() < 0.1
    person = matte > 0.5
    assert (person & changed).sum() / max(1, (person | changed).sum()) > 0.75  # IoU with the change mask


def test_estimated_background_matches_held_back_frames(lp_d18):
    """Estimate the background from the training frames only; compare with the background pixels of
    the held-out test frames (outside their dilated person matte)."""
    cfg = BackgroundConfig()
    split = lp_d18.split()
    est, covered, _ = background.estimate(lp_d18, cfg, frame_ids=split["train"])
    errors = []
    for i in split["test"]:
        person = (lp_d18.read_matte(i) > 0.05).astype(np.uint8)
        clear = (cv2.dilate(person, np.ones((9, 9), np.uint8)) == 0) & covered
        assert clear.mean() > 0.2
        errors.append(np.abs(lp_d18.read_frame(i).astype(float) - est)[clear].mean())
    assert np.mean(errors) < 4.0, errors  # out of 255
    bg = lp_d18.read_background()
    assert bg.shape == (128, 128, 3) and 0.3 < lp_d18.read_coverage().mean() < 1.0


def test_masked_median_is_numpys_median_of_the_usable_samples():
    """The sorting median against numpy's nanmedian: odd and even counts (the two middle values averaged),
    a pixel seen once, pixels never seen (NaN), chunks of rows that do not divide the height."""
    rng = np.random.default_rng(3)
    stack = rng.integers(0, 256, (9, 11, 7, 3), dtype=np.uint8)
    usable = rng.random((9, 11, 7)) < 0.6
    usable[:, 0, 0] = False
    usable[:, 0, 1] = np.arange(9) == 4
    truth = np.where(usable[..., None], stack.astype(np.float32), np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN pixel
        expected = np.nanmedian(truth, axis=0)
    found = background.masked_median(stack, usable, rows_per_chunk=4)
    assert np.array_equal(np.isnan(found), np.isnan(expected)) and np.isnan(found[0, 0]).all()
    assert np.allclose(found[~np.isnan(found)], expected[~np.isnan(expected)])
    assert (found[0, 1] == stack[4, 0, 1]).all()


def test_background_from_a_plate(images_dir, tmp_path):
    img, back = tmp_path / "with person.png", tmp_path / "plate.png"
    for src, dst in ((images_dir / "bgm_0001_img.png", img), (images_dir / "bgm_0001_back.png", back)):
        cv2.imwrite(str(dst), cv2.resize(cv2.imread(str(src)), (640, 360), interpolation=cv2.INTER_AREA))
    clip = image_to_video(img, tmp_path / "scene.mp4", frames=6)
    # a still scene: six frames are enough for a background, and far too few for an avatar
    store = run_preprocessing(
        clip, tmp_path, "scene", {"size": 96, "min_train_frames": 1, "min_test_frames": 1}, plate=str(back)
    )
    info = cache.read_json(store.stage_dir("background") / "background.json", "background")
    assert info["source"] == "plate" and info["covered_fraction"] == 1.0
    w = store.crop_meta()["window"]
    plate = cv2.cvtColor(cv2.imread(str(back)), cv2.COLOR_BGR2RGB)
    expected = cv2.resize(
        plate[w["y0"] : w["y0"] + w["side"], w["x0"] : w["x0"] + w["side"]], (96, 96), interpolation=cv2.INTER_AREA
    )
    assert np.abs(store.read_background().astype(int) - expected).mean() < 2

    wrong = tmp_path / "small plate.png"
    cv2.imwrite(str(wrong), np.zeros((100, 100, 3), np.uint8))
    with pytest.raises(InputError, match="plate is 100x100 but the video is 640x360"):
        background.run(store, BackgroundConfig(), plate=str(wrong))


@pytest.mark.parametrize("clip", ["w009", "lp_d18"])
def test_normals_face_the_camera_on_the_face(clip, request):
    store = request.getfixturevalue(clip)
    lms = store.landmarks()
    for i in np.flatnonzero(lms["valid"])[::7]:
        normals, mask = store.read_normals(i)
        assert mask.mean() > 0.1
        assert (normals[mask][:, 2] > 0).mean() > 0.97
        pts = lms["mp478"][i]
        # cheeks turn away from the midline: the subject's left cheek (image right) points right
        lx, ly = np.round(pts[facemesh.LEFT_CHEEK_EDGE, :2] * 0.9 + pts[1, :2] * 0.1).astype(int)
        rx, ry = np.round(pts[facemesh.RIGHT_CHEEK_EDGE, :2] * 0.9 + pts[1, :2] * 0.1).astype(int)
        assert normals[ly, lx, 0] > 0.2 and normals[ry, rx, 0] < -0.2
        # the face mask covers the eyes (closed over the iris) but not the background
        assert mask[tuple(np.round(pts[facemesh.RIGHT_IRIS[0], 1::-1]).astype(int))]
        assert not mask[0, 0] and not mask[-1, -1]


def test_qa_outputs(lp_d18):
    qa_dir = lp_d18.stage_dir("qa")
    sheet = cv2.imread(str(qa_dir / "contact_sheet.png"))
    assert sheet.shape == (192 * 5, 192 * 4, 3)
    from avatar_pipeline.video import iter_frames, probe

    info = probe(qa_dir / "overlay.mp4")
    assert (info.width, info.height) == (512, 512) and sum(1 for _ in iter_frames(info)) == 20
    summary = cache.read_json(qa_dir / "summary.json", "qa")
    assert summary["split_sizes"]["test"] == 12 and summary["landmarks"]["valid_frames"] >= 57
    assert "contact_sheet.png" in (qa_dir / "report.html").read_text()


def test_landmark_smoothing_reduces_jitter(lp_d18):
    lms = lp_d18.landmarks()
    pts, valid = lms["mp478"], lms["valid"]
    smooth = landmarks.smooth_valid_runs(pts, valid, 1.5)
    jitter = lambda p: np.abs(np.diff(p[valid][:, :, :2], 2, axis=0)).mean()  # noqa: E731
    assert jitter(smooth) < 0.6 * jitter(pts)
    assert np.isnan(smooth[~valid]).all() or valid.all()


def test_a_truncated_cache_file_names_itself_and_the_rule_that_rebuilds_it(w009, tmp_path):
    import shutil

    from avatar_pipeline.errors import CacheError
    from avatar_pipeline.stages import normals

    store = cache.SubjectCache(tmp_path, "w009")
    for stage in ("crop", "landmarks"):
        shutil.copytree(w009.stage_dir(stage), store.stage_dir(stage))
    npz = store.stage_dir("landmarks") / "landmarks.npz"
    npz.write_bytes(npz.read_bytes()[:200])
    with pytest.raises(CacheError) as err:
        normals.run(store, NormalsConfig())
    assert str(npz) in str(err.value) and "'landmarks'" in str(err.value) and "--forcerun landmarks" in str(err.value)
    frame = store.frame_path(3)
    frame.write_bytes(frame.read_bytes()[:100])
    with pytest.raises(CacheError, match=r"(?s)000003.png: cannot be decoded .* rule 'crop'"):
        store.read_frame(3)
