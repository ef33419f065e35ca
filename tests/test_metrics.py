"""Image metrics on a real photograph: known answers, masks, and LPIPS/CSIM availability said plainly."""

import math

import cv2
import numpy as np
import pytest

from avatar_pipeline import metrics


@pytest.fixture(scope="module")
def photo(images_dir):
    image = cv2.cvtColor(cv2.imread(str(images_dir / "dlib_Tom_Cruise_avp_2014_4.jpg")), cv2.COLOR_BGR2RGB)
    side = min(image.shape[:2])
    return cv2.resize(image[:side, :side], (256, 256), interpolation=cv2.INTER_AREA).astype(np.float32) / 255


def test_identical_images_score_perfectly(photo):
    assert metrics.l1(photo, photo) == 0 and metrics.psnr(photo, photo) == 100.0
    assert metrics.ssim(photo, photo) == pytest.approx(1.0, abs=1e-5)
    assert metrics.ms_ssim(photo, photo) == pytest.approx(1.0, abs=1e-5)


def test_psnr_of_known_noise(photo):
    rng = np.random.default_rng(0)
    sigma = 0.05
    noisy = photo + rng.normal(0, sigma, photo.shape).astype(np.float32)  # unclipped: the MSE is sigma^2
    assert metrics.psnr(noisy, photo) == pytest.approx(-10 * math.log10(sigma**2), abs=0.1)
    assert metrics.l1(noisy, photo) == pytest.approx(sigma * math.sqrt(2 / math.pi), rel=0.02)


def test_structural_metrics_fall_as_the_damage_grows(photo):
    rng = np.random.default_rng(1)
    scores = []
    for sigma in (0.01, 0.05, 0.15):
        noisy = np.clip(photo + rng.normal(0, sigma, photo.shape), 0, 1).astype(np.float32)
        scores.append((metrics.ssim(noisy, photo), metrics.ms_ssim(noisy, photo)))
    assert scores[0][0] > scores[1][0] > scores[2][0] and scores[0][1] > scores[1][1] > scores[2][1]
    # a constant brightness shift keeps the structure: SSIM stays high, PSNR drops
    shifted = np.clip(photo + 0.1, 0, 1)
    assert metrics.ssim(shifted, photo) > 0.85 and metrics.psnr(shifted, photo) < 22


def test_masked_metrics_ignore_damage_outside_the_mask(photo):
    damaged = photo.copy()
    damaged[:, :128] = 0.0
    mask = np.zeros(photo.shape[:2], bool)
    mask[:, 150:] = True  # away from the damaged half by more than the SSIM window
    assert metrics.psnr(damaged, photo, mask) == 100.0 and metrics.l1(damaged, photo, mask) == 0
    assert metrics.ssim(damaged, photo, mask) == pytest.approx(1.0, abs=1e-5)
    assert metrics.psnr(damaged, photo) < 15


def test_ms_ssim_uses_the_scales_that_fit():
    assert metrics.ms_ssim_scales(256) == 5 and metrics.ms_ssim_scales(64) == 3 and metrics.ms_ssim_scales(16) == 1


def test_cpbd_finds_the_sharp_image_sharper(photo):
    blurred = cv2.GaussianBlur(photo, (0, 0), 2.0)
    sharp, soft = metrics.cpbd(photo), metrics.cpbd(blurred)
    assert 0 <= soft < sharp <= 1, (sharp, soft)


def test_gradient_energy_is_one_for_the_real_frame_and_falls_with_blur(photo):
    assert metrics.gradient_energy(photo, photo) == pytest.approx(1.0)
    blurred = cv2.GaussianBlur(photo, (0, 0), 2.0)
    assert metrics.gradient_energy(blurred, photo) < 0.5
    mask = np.zeros(photo.shape[:2], bool)
    mask[: photo.shape[0] // 2] = True
    half = photo.copy()
    half[~mask] = blurred[~mask]  # blur outside the mask does not count inside it
    assert metrics.gradient_energy(half, photo, mask) == pytest.approx(1.0, abs=0.02)


def test_lpips_without_weights_is_unavailable_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = metrics.Lpips()
    assert not model.available and "alexnet-owt" in model.reason and "load_state_dict_from_url" in model.reason
    row = metrics.frame_metrics(
        np.zeros((32, 32, 3), np.float32), np.zeros((32, 32, 3), np.float32), np.ones((32, 32), bool), model
    )
    assert "lpips" not in row  # never a number from a missing backbone


def test_lpips_runs_when_alexnet_weights_are_in_the_hub_cache(monkeypatch, tmp_path, photo):
    """The code path with a weights file in the hub cache. The file here is a randomly initialised AlexNet
    written by the test, so only the plumbing is checked, not LPIPS values."""
    import torch

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    backbone = {f"features.{k}": v for k, v in metrics._alexnet_features().state_dict().items()}
    backbone["classifier.1.weight"] = torch.zeros(4096, 9216)  # the checkpoint also holds the classifier
    torch.save(backbone, tmp_path / "hub" / "checkpoints" / metrics.ALEXNET_FILE)
    model = metrics.Lpips()
    assert model.available, model.reason
    small = cv2.resize(photo, (64, 64))
    assert model(small, small) == pytest.approx(0.0, abs=1e-6)
    assert model(small, np.clip(small + 0.2, 0, 1)) > 0


def test_csim_says_how_to_enable_it():
    try:
        import dlib  # noqa: F401
    except ImportError:
        model = metrics.Csim()
        assert not model.available and "csim" in model.reason
    else:
        pytest.skip("dlib is installed: CSIM is available")
