"""Backends whose weights users fetch themselves: real code paths, exercised with weights the tests make,
and clear errors when the weights are absent."""

import numpy as np
import pytest
import torch

from avatar_pipeline import cache
from avatar_pipeline.config import LandmarksConfig, NormalsConfig, ParsingConfig
from avatar_pipeline.errors import InputError
from avatar_pipeline.landmarks_fan import FanLandmarker, find_weights
from avatar_pipeline.parsing_bisenet import BiSeNetParser, build_bisenet
from avatar_pipeline.stages import normals, parsing


class BrightestSpot(torch.nn.Module):
    """Stands in for 2D-FAN: 68 heatmaps that all peak where the input is brightest."""

    def forward(self, x):
        heat = torch.nn.functional.avg_pool2d(x.mean(1, keepdim=True), 4)  # (1, 1, 64, 64)
        return (heat * 50).exp().repeat(1, 68, 1, 1)


def test_fan_without_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(InputError) as err:
        find_weights(str(tmp_path / "none"))
    assert "2D-FAN weights" in str(err.value) and "fan_weights_dir" in str(err.value)


def test_fan_decodes_heatmaps_back_to_image_pixels(tmp_path):
    torch.jit.script(BrightestSpot()).save(str(tmp_path / "2DFAN4-test.zip"))
    fan = FanLandmarker.from_config(LandmarksConfig(backend="fan", fan_weights_dir=str(tmp_path)))
    for spot, box in [((210, 160), (150, 100, 290, 260)), ((60, 75), (20, 30, 110, 140))]:
        img = np.zeros((320, 320, 3), np.uint8)
        img[spot[1] - 2 : spot[1] + 3, spot[0] - 2 : spot[0] + 3] = 255
        pts = fan.predict(img, box)
        assert pts.shape == (68, 2)
        side = 200 * ((box[2] - box[0]) + (box[3] - box[1])) / 195
        # one heatmap cell is side / 64 image pixels; the decoded point must fall within it
        assert np.abs(pts - np.array(spot)).max() <= side / 64 + 1, (pts[0], spot)


def test_bisenet_checkpoint_loads_strictly_and_parses(tmp_path):
    torch.manual_seed(0)
    model = build_bisenet()
    weights = tmp_path / "79999_iter.pth"
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, weights)  # DataParallel layout
    parser = BiSeNetParser.from_config(ParsingConfig(backend="bisenet", bisenet_weights=str(weights)))
    labels = parser.parse(np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8))
    assert labels.shape == (96, 128) and labels.dtype == np.uint8 and labels.max() < 19
    assert sum(p.numel() for p in model.parameters()) > 12e6  # a real ResNet-18 BiSeNet, not a toy


def test_bisenet_errors(tmp_path):
    with pytest.raises(InputError, match="needs a checkpoint"):
        BiSeNetParser(None)
    with pytest.raises(InputError, match="not found"):
        BiSeNetParser(str(tmp_path / "missing.pth"))
    bad = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(InputError, match="not a 19-class"):
        BiSeNetParser(str(bad))


def test_bisenet_backend_in_the_parsing_stage(w009, tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(build_bisenet().state_dict(), weights)
    store = cache.SubjectCache(tmp_path, "w009")
    store.root.mkdir(parents=True)
    for stage in ("crop", "landmarks"):
        (store.root / stage).symlink_to(w009.stage_dir(stage))
    info = parsing.run(store, ParsingConfig(backend="bisenet", bisenet_weights=str(weights)))
    assert info["backend"] == "bisenet" and store.read_labels(0).shape == (128, 128)


class ConstantNormals(torch.nn.Module):
    def forward(self, x):
        n = torch.zeros_like(x)
        n[:, 2] = 1.0
        return n


def test_normal_network_backend(w009, tmp_path):
    with pytest.raises(InputError, match="needs a TorchScript file"):
        normals.NetworkNormals(None)
    weights = tmp_path / "normals.pt"
    torch.jit.script(ConstantNormals()).save(str(weights))
    store = cache.SubjectCache(tmp_path, "w009")
    store.root.mkdir(parents=True)
    for stage in ("crop", "landmarks"):
        (store.root / stage).symlink_to(w009.stage_dir(stage))
    normals.run(store, NormalsConfig(backend="network", network_weights=str(weights)))
    n, mask = store.read_normals(0)
    assert mask.mean() > 0.2  # masked to the face region of the mesh
    assert np.allclose(n[mask], [0, 0, 1], atol=0.02)
