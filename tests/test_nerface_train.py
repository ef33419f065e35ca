"""NeRFace training and evaluation from a real subject's cache: it learns, checkpoints, resumes after an
interruption, measures held-out frames under both latent protocols, and refuses bad inputs clearly."""

import csv
import shutil

import cv2
import numpy as np
import pytest
import torch

from avatar_pipeline import cache
from avatar_pipeline.avatars import evaluation, find, trainer
from avatar_pipeline.avatars.data import ErrorMap, SubjectFrames
from avatar_pipeline.avatars.nerface.model import render_image
from avatar_pipeline.avatars.volume import distortion_loss, ray_bounds
from avatar_pipeline.config import ModelConfig, TrackingConfig
from avatar_pipeline.errors import CacheError, InputError
from avatar_pipeline.geometry import camera_rays
from avatar_pipeline.stages import tracking as tracking_stage

TINY = {
    "preset": "fast",
    "size": 32,
    "rays": 256,
    "coarse_samples": 12,
    "fine_samples": 12,
    "learning_rate": 5e-3,
    "final_learning_rate": 5e-3,
    "checkpoint_every": 10,
    "validate_every": 25,
    "width": 64,
    "depth": 3,
    "colour_width": 32,
    "colour_depth": 1,
    "latent_dim": 8,
    "latent_steps": 15,
    "latent_rays": 64,
    "orbit_frames": 4,
    "sweep_frames": 4,
    "video_frames": 6,
}


SPEC = find("nerface")
# Mip-NeRF 360's weight (0.01) times five: the tiny avatar's 150 steps are few for a weak term to act
DISTORTION_WEIGHT = 0.05


def tiny(**overrides):
    return SPEC.config_from({**TINY, **overrides})


def train(store, cfg, out):
    return trainer.train(SPEC, store, cfg, out)


def evaluate(store, cfg, train_dir, out):
    return evaluation.evaluate(SPEC, store, cfg, train_dir, out)


def load_trained(train_dir, cfg, store):
    """The trained NeRFace model of train_dir (on the CPU)."""
    frames = SubjectFrames(store, cfg.size, "train", with_images=False)
    return trainer.load_trained(SPEC, cfg, frames, train_dir, torch.device("cpu"))


@pytest.fixture(scope="module")
def tracked(lp_d18, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    store = cache.SubjectCache(root, "lp_d18")
    store.root.mkdir(parents=True)
    for stage in ("crop", "landmarks", "parsing", "background"):
        (store.root / stage).symlink_to(lp_d18.stage_dir(stage))
    tracking_stage.run(store, TrackingConfig(iterations=150, overlay_frames=0), ModelConfig(kind="builtin"))
    return store


@pytest.fixture(scope="module")
def trained(tracked, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "train"
    train(tracked, tiny(steps=150), out)
    return out


def _log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_training_learns_and_resumes_from_its_checkpoint(tracked, tmp_path):
    out = tmp_path / "train"
    train(tracked, tiny(steps=20), out)  # stands for a run stopped after step 20
    assert (out / "checkpoint.pt").exists() and len(_log(out / "log.csv")) == 20
    summary = train(tracked, tiny(steps=60), out)
    rows = _log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 61))  # continued at 21, not from scratch
    assert summary["steps"] == 60 and (out / "done.json").exists()
    first = sum(float(r["loss"]) for r in rows[:10]) / 10
    last = sum(float(r["loss"]) for r in rows[-10:]) / 10
    assert last < 0.7 * first, (first, last)
    validated = [int(r["step"]) for r in rows if r["val_psnr"]]
    assert validated == [20, 25, 50, 60]  # every 25 steps and at the end of each run
    assert len(list((out / "validation").glob("step_*.png"))) == 4


def test_changed_settings_start_afresh_and_keep_the_old_checkpoint(tracked, tmp_path):
    out = tmp_path / "train"
    train(tracked, tiny(steps=10), out)
    old_digest = tiny().digest()
    train(tracked, tiny(steps=10, rays=128), out)
    assert (out / f"checkpoint-{old_digest}.pt").exists()  # nothing lost
    assert [int(r["step"]) for r in _log(out / "log.csv")] == list(range(1, 11))  # from step 0 again


def test_time_budget_stops_training_with_a_valid_model(tracked, tmp_path):
    summary = train(tracked, tiny(steps=100000, max_minutes=0.05, final_learning_rate=5e-4), tmp_path / "train")
    assert summary["stopped_by_time_budget"] and 0 < summary["steps"] < 100000
    state = torch.load(tmp_path / "train" / "checkpoint.pt", weights_only=False)
    assert state["step"] == summary["steps"]
    # the learning rate decayed over the budget, not over the 100000 steps it did not reach
    rates = [float(r["learning_rate"]) for r in _log(tmp_path / "train" / "log.csv")]
    # (over the steps it would still be near the initial 5e-3; the first logged rate depends on the machine's load)
    assert rates == sorted(rates, reverse=True) and rates[0] > rates[-1] and rates[-1] < 1e-3


def test_held_out_frames_are_measured_under_both_protocols(tracked, trained, tmp_path):
    out = tmp_path / "eval"
    out.mkdir()
    summary = evaluate(tracked, tiny(steps=150), trained, out)
    test_frames = tracked.split()["test"]
    assert summary["test_frames"] == test_frames and set(summary["protocols"]) == {"optimised", "first_train_frame"}
    optimised, first = summary["protocols"]["optimised"], summary["protocols"]["first_train_frame"]
    # the avatar explains the held-out frames better than the background alone does
    assert optimised["psnr"] > optimised["psnr_background_only"] + 1.0, optimised
    # fitting the latent codes to the test frames does not make them worse
    assert optimised["psnr"] > first["psnr"] - 0.3, (optimised["psnr"], first["psnr"])
    for key in ("ssim", "ms_ssim", "head_ssim"):
        assert 0 < optimised[key] <= 1
    assert not summary["lpips_available"] or "lpips" in optimised
    for name in (
        "metrics_optimised.csv",
        "metrics_first_train_frame.csv",
        "test.mp4",
        "orbit.mp4",
        "sweep.mp4",
        "metrics.json",
    ):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "test").glob("*.png"))) == len(test_frames)
    rows = _log(out / "metrics_optimised.csv")
    assert [int(r["frame"]) for r in rows] == test_frames
    assert summary["sweep"]["expression"] == "pca00"  # the built-in model has no jawOpen: said and swept pc 0


def test_pose_correction_runs_and_moves_the_cameras_only_a_little(tracked, trained):
    cfg = tiny(steps=150, pose_correction=True, latent_steps=10)
    test = SubjectFrames(tracked, cfg.size, "test")
    codes, cameras = load_trained(trained, cfg, tracked).optimise_test_latents(test)
    assert codes.shape == (len(test.frames), cfg.latent_dim) and torch.isfinite(cameras).all()
    moved = (cameras[:, :3, 3] - test.camera_to_head[:, :3, 3]).norm(dim=1)
    assert 0 < moved.max() < 0.05  # metres


def test_rays_sample_the_scene_radius_around_the_tracked_head(tracked):
    cameras = SubjectFrames(tracked, 32, "test", with_images=False).camera_to_head
    (_, wide_far), (narrow_near, narrow_far) = (ray_bounds(cameras, r) for r in (0.35, 0.2))
    distance = cameras[:, :3, 3].norm(dim=1)
    assert torch.allclose(wide_far - distance, torch.full_like(distance, 0.35))
    assert torch.allclose(narrow_far - narrow_near, torch.full_like(distance, 0.4))


def test_the_mask_loss_makes_the_rendered_alpha_follow_the_person_matte(tracked, trained, tmp_path):
    train(tracked, tiny(steps=150, mask_weight=1.0), tmp_path / "train")
    data = SubjectFrames(tracked, TINY["size"], "train", with_images=False, with_mattes=True)
    errors = {}
    for name, folder, cfg in (
        ("rgb only", trained, tiny(steps=150)),
        ("with mask", tmp_path / "train", tiny(steps=150, mask_weight=1.0)),
    ):
        model = load_trained(folder, cfg, tracked)
        _, alpha = model.render(model.view(data, 0))  # the first training frame with its own latent code
        errors[name] = float((alpha - data.mattes[0]).abs().mean())
    assert errors["with mask"] < 0.7 * errors["rgb only"], errors  # measured: 0.16 against 0.33


def test_the_distortion_loss_gathers_each_rays_weight_into_a_shorter_stretch(tracked, trained, tmp_path):
    with_term = tiny(steps=150, distortion_weight=DISTORTION_WEIGHT)
    train(tracked, with_term, tmp_path / "train")
    logged = cache.read_training_log(tmp_path / "train" / "log.csv")
    assert logged and all(float(row["loss_distortion"]) > 0 for row in logged)
    data = SubjectFrames(tracked, TINY["size"], "train", with_images=False)
    spread = {}
    for name, folder, cfg in (("rgb only", trained, tiny(steps=150)), ("with term", tmp_path / "train", with_term)):
        model = load_trained(folder, cfg, tracked)
        view = model.view(data, 0)  # the first training frame with its own latent code
        ys, xs = torch.meshgrid(torch.arange(view.size), torch.arange(view.size), indexing="ij")
        pixels = torch.stack([xs.flatten(), ys.flatten()], 1).float()
        origins, dirs = camera_rays(view.camera_to_head, view.focal, view.size, pixels)
        near, far = (b.expand(len(origins)) for b in ray_bounds(view.camera_to_head, cfg.scene_radius))
        condition = torch.cat([view.conditions, view.code])
        with torch.no_grad():
            out = model.renderer(origins, dirs, near, far, condition, view.background.reshape(-1, 3), jitter=False)
        spread[name] = float(distortion_loss(out["fine_weights"], out["fine_depths"], near, far))
    assert spread["with term"] < 0.7 * spread["rgb only"], spread  # measured: 0.016 against 0.036


def test_a_checkpoint_of_other_settings_is_refused_for_evaluation(tracked, trained, tmp_path):
    with pytest.raises(InputError, match="other settings"):
        evaluate(tracked, tiny(steps=150, width=32), trained, tmp_path)


def test_missing_tracking_names_the_file_and_the_rule(tracked, tmp_path):
    store = cache.SubjectCache(tmp_path, "lp_d18")
    store.root.mkdir()
    for stage in ("crop", "background"):
        (store.root / stage).symlink_to(tracked.stage_dir(stage).resolve())
    with pytest.raises(CacheError, match="tracking.npz.*missing(.|\n)*rule 'tracking'"):
        train(store, tiny(steps=5), tmp_path / "train")


def test_a_background_of_the_wrong_size_is_refused(tracked, tmp_path):
    store = cache.SubjectCache(tmp_path, "lp_d18")
    store.root.mkdir()
    for stage in ("crop", "tracking"):
        (store.root / stage).symlink_to(tracked.stage_dir(stage).resolve())
    (store.root / "background").mkdir()
    small = cv2.resize(tracked.read_background(), (50, 40))
    cache.write_png(store.root / "background" / "background.png", small)
    with pytest.raises(InputError, match="background.png.*50x40"):
        train(store, tiny(steps=5), tmp_path / "train")


def test_too_few_tracked_training_frames_are_refused_before_training(tracked, tmp_path):
    """The crop stage checked the split; frames the tracker then lost can still leave too few."""
    store = cache.SubjectCache(tmp_path, "lp_d18")
    (store.root / "crop" / "frames").mkdir(parents=True)
    for frame in tracked.stage_dir("crop").joinpath("frames").iterdir():
        (store.root / "crop" / "frames" / frame.name).symlink_to(frame.resolve())
    shutil.copy(tracked.stage_dir("crop") / "meta.json", store.root / "crop")
    split = tracked.split()
    usable = len(split["train"])
    cache.write_json(store.root / "crop" / "split.json", {**split, "minimums": {"train": usable + 1, "test": 1}})
    for stage in ("background", "tracking"):
        (store.root / stage).symlink_to(tracked.stage_dir(stage).resolve())
    with pytest.raises(
        InputError,
        match=f"only {usable} of the {usable} train frames were tracked; an avatar needs at least {usable + 1}",
    ):
        train(store, tiny(steps=5), tmp_path / "train")
    assert not (tmp_path / "train" / "log.csv").exists()


def test_rendering_lowers_its_chunk_when_memory_runs_out(tracked, trained):
    cfg = tiny(steps=150)
    data = SubjectFrames(tracked, cfg.size, "test")
    model = load_trained(trained, cfg, tracked)
    renderer = model.renderer
    near, far = ray_bounds(data.camera_to_head[0], cfg.scene_radius)
    condition = torch.cat([data.conditions[0], model.latents.weight[0]])
    args = (data.camera_to_head[0], data.focal, cfg.size, condition, data.background, float(near), float(far))
    expected, _ = render_image(renderer, *args)
    real_forward = renderer.forward

    def small_memory(origins, *rest, **kw):
        if len(origins) > 300:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")
        return real_forward(origins, *rest, **kw)

    renderer.forward = small_memory
    image, _ = render_image(renderer, *args, rays_per_call=1024)
    assert torch.allclose(image, expected, atol=0.02)  # bf16 products may round differently per batch size
    assert renderer.chunk_samples < cfg.chunk_samples  # and the lowered chunk is kept


def test_the_occupancy_grid_renders_a_trained_avatar_as_the_dense_render_does(tracked, trained):
    """The grid is an evaluation setting: the same checkpoint renders with it, skipping empty cells, and
    the held-out frame comes out as without it."""
    cfg = tiny(steps=150, adaptive_block=0)  # every pixel traced, to see the grid alone
    data = SubjectFrames(tracked, cfg.size, "test")
    dense = load_trained(trained, cfg, tracked)
    # a 150-step avatar is still foggy almost everywhere; a looser threshold lets its grid skip some of it
    grid = {"occupancy_cells": 32, "occupancy_threshold": 0.05, "adaptive_block": 0}
    skipping = load_trained(trained, tiny(steps=150, **grid), tracked)
    view = dense.view(data, 0)
    expected, _ = dense.render(view)
    image, _ = skipping.render(view)
    grid = skipping.occupancy
    assert dense.occupancy_grid() is None and grid is not None and skipping.occupancy_grid() is grid  # built once
    assert grid.share < 0.95  # it does skip space
    assert (image - expected).abs().max() < 0.05  # at most the threshold's share of a ray's light


def _off_pixels(image, expected, alpha, expected_alpha, by: float = 0.1) -> int:
    """How many pixels' colour or alpha is more than `by` away from the expected render."""
    off = ((image - expected).abs().amax(-1) > by) | ((alpha - expected_alpha).abs() > by)
    return int(off.sum())


def test_adaptive_pixels_render_a_trained_avatar_within_their_tolerance_from_fewer_samples(tracked, trained):
    """Adaptive sampling in image space is an evaluation setting: the same checkpoint renders the held-out frame
    from fewer rays, and the pixels stay near the dense render: interpolation errors are bounded by the tolerance
    where the corners predicted the midpoints, a few times it in between, and only a detail smaller than a block
    that no traced pixel touches is missed (on one Xeon a single pixel of 1024, 0.11 off, from this tiny avatar)."""
    cfg = tiny(steps=150, adaptive_block=0)
    data = SubjectFrames(tracked, cfg.size, "test")
    dense = load_trained(trained, cfg, tracked)
    settings = {"adaptive_block": 4, "adaptive_tolerance": 8 / 255, "neighbour_proposals": False}
    adaptive = load_trained(trained, tiny(steps=150, **settings), tracked)
    view = dense.view(data, 0)
    expected, expected_alpha = dense.render(view)
    before = adaptive.renderer.samples_computed
    image, alpha = adaptive.render(view)
    assert adaptive.renderer.samples_computed - before < 0.8 * dense.renderer.samples_computed
    assert _off_pixels(image, expected, alpha, expected_alpha) <= 4  # of 1024
    assert ((image - expected) ** 2).mean() < 1e-4  # above 40 dB
    # and the evaluation can say so (its summary and the report carry the note)
    assert dense.rendering_note() == "" and "blocks of 4 px" in adaptive.rendering_note()
    # the pixels traced inside a block placing their fine samples from its corners' weights: the coarse pass is
    # left to the first lattice, so fewer samples again for the same pixels, and the image a little further from the
    # dense one (real clips: 42-43 dB against 46-47 without; this foggy 150-step avatar about 40)
    proposing = load_trained(trained, tiny(steps=150, **{**settings, "neighbour_proposals": True}), tracked)
    image, alpha = proposing.render(view)
    assert proposing.renderer.samples_computed < 0.85 * (adaptive.renderer.samples_computed - before)
    assert _off_pixels(image, expected, alpha, expected_alpha) <= 4
    assert ((image - expected) ** 2).mean() < 2e-4  # above 37 dB
    assert "neighbour_proposals" in proposing.rendering_note() and "proposals" not in adaptive.rendering_note()
    # and those pixels drawing fewer importance samples and leaving out the coarse samples where the proposal
    # found no weight: fewer samples again, the image as near the dense one
    lean = {**settings, "neighbour_proposals": True, "proposal_samples": 8, "proposal_empty_below": 1e-2}
    leaner = load_trained(trained, tiny(steps=150, **lean), tracked)
    image, alpha = leaner.render(view)
    assert leaner.renderer.samples_computed < 0.9 * proposing.renderer.samples_computed
    assert _off_pixels(image, expected, alpha, expected_alpha) <= 4
    assert ((image - expected) ** 2).mean() < 2e-4
    assert "8 importance samples" in leaner.rendering_note() and "importance" not in proposing.rendering_note()


def test_resuming_drops_log_rows_past_the_checkpoint_and_half_written_ones(tmp_path):
    fields = cache.training_log_fields(["rgb"])
    path = tmp_path / "log.csv"
    rows = [f"{i},train,0.1,20.0,0.001,{i * 0.3:.2f},,,0.1" for i in range(1, 31)]  # no validation scores
    path.write_text(",".join(fields) + "\n" + "\n".join(rows) + "\n31,train,0.1")  # killed while writing step 31
    cache.open_training_log(path, fields, 20)[0].close()
    assert [int(r["step"]) for r in _log(path)] == list(range(1, 21))
    path.write_text(",".join(fields) + "\n" + "\n".join(rows[:12]) + "\n1")
    cache.open_training_log(path, fields, 20)[0].close()  # the checkpoint is ahead of the flushed rows
    assert [int(r["step"]) for r in _log(path)] == list(range(1, 13))  # the complete ones are kept
    cache.open_training_log(path, fields, 0)[0].close()  # a fresh run: the header only
    assert path.read_text() == ",".join(fields) + "\n"


def test_the_error_map_sends_rays_where_the_error_is_and_learns_it_from_the_rays():
    errors = ErrorMap(frames=2, size=64, share=0.5)
    rng = np.random.default_rng(0)
    box = np.array([8.0, 40.0, 16.0, 48.0])  # y0, y1, x0, x1
    pixels = errors.sample(0, box, 2000, rng).numpy()
    # only the cells overlapping the box are drawn, and at first evenly (every cell starts at the same error)
    assert pixels[:, 0].min() >= 16 and pixels[:, 0].max() < 56 and pixels[:, 1].min() >= 8 and pixels[:, 1].max() < 48
    cells = pixels.astype(int) // ErrorMap.CELL
    assert np.bincount(cells[:, 1] * 8 + cells[:, 0]).max() < 2 * 2000 / 25
    # the rays' errors replace the starting guess: a cell measured as wrong draws most of the next rays
    truth = np.full((64, 64), 0.001)
    truth[24:32, 32:40] = 0.5  # the cell at row 3, column 4
    for _ in range(20):
        pixels = errors.sample(0, box, 500, rng)
        errors.update(0, pixels, torch.as_tensor(truth[pixels[:, 1].long(), pixels[:, 0].long()]))
    assert errors.error[0, 3, 4] == pytest.approx(0.5, rel=0.05) and errors.error[0, 1, 2] < 0.01
    pixels = errors.sample(0, box, 1000, rng).numpy().astype(int) // ErrorMap.CELL
    assert np.mean((pixels[:, 0] == 4) & (pixels[:, 1] == 3)) > 0.8
    assert (errors.error[1] == 1).all()  # the other frame is untouched


def test_training_with_error_sampling_keeps_its_error_map_across_a_resume(tracked, tmp_path):
    out = tmp_path / "train"
    train(tracked, tiny(steps=20, error_sampling=0.5), out)
    first = torch.load(out / "checkpoint.pt", weights_only=False)["extra"]["error_map"]
    assert (first < 1).any() and first.shape[1:] == (4, 4)  # 32 px in 8-px cells, measured by the rays
    train(tracked, tiny(steps=40, error_sampling=0.5), out)
    second = torch.load(out / "checkpoint.pt", weights_only=False)["extra"]["error_map"]
    assert [int(r["step"]) for r in _log(out / "log.csv")] == list(range(1, 41))
    # errors never rise above the starting 1, so a restored map keeps every measured cell below it (a fresh
    # map would have put the cells the last 20 steps did not revisit back to 1)
    assert (second[first < 1] < 1).all() and (second < 1).sum() > (first < 1).sum()


def test_training_keeps_its_occupancy_grid_up_to_date_and_across_a_resume(tracked, tmp_path, monkeypatch):
    from avatar_pipeline.avatars.nerface import model as nerface_model
    from avatar_pipeline.avatars.volume import OccupancyGrid

    monkeypatch.setattr(nerface_model, "OCCUPANCY_WARMUP", 16)  # the tiny run is shorter than the real warm-up
    used = []
    contains = OccupancyGrid.contains
    monkeypatch.setattr(OccupancyGrid, "contains", lambda grid, points: used.append(1) or contains(grid, points))
    out = tmp_path / "train"
    train(tracked, tiny(steps=40, train_occupancy_cells=16), out)
    first = torch.load(out / "checkpoint.pt", weights_only=False)["extra"]
    assert first["steps_taken"] == 40 and first["training_occupancy"].shape == (16**3,)
    assert len(used) == 2 * (40 - 16)  # coarse and fine samples culled in every step after the warm-up
    restored = load_trained(out, tiny(steps=40, train_occupancy_cells=16), tracked).training_occupancy
    assert torch.equal(restored.density, first["training_occupancy"])
    assert restored.share < 0.9  # empty space found in the scene's cube
    train(tracked, tiny(steps=60, train_occupancy_cells=16), out)
    second = torch.load(out / "checkpoint.pt", weights_only=False)["extra"]
    assert second["steps_taken"] == 60  # resumed, not counted from 0 (the warm-up would start over)
