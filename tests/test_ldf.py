"""Local Deformation Fields: the support weights, the attention masks, locality of the learned deformation,
the windowed encoding and the canonical grid's growth and pruning. Training, resume and evaluation on a
real clip are the avatar contract test's (tests/test_avatar_contract.py)."""

import math

import numpy as np
import pytest
import torch

from avatar_pipeline.avatars.ldf.canonical import CanonicalField
from avatar_pipeline.avatars.ldf.config import METRES_PER_UNIT, PRESETS, LDFConfig
from avatar_pipeline.avatars.ldf.deformation import (
    Deformation,
    attention_masks,
    field_centres,
    support_radius,
    support_weights,
    windowed_encoding,
)
from avatar_pipeline.avatars.ldf.head import EDIT_REGIONS, TrackedHead
from avatar_pipeline.models.base import MorphableModel

PAPER = LDFConfig()


def test_paper_lengths_are_converted_from_im_avatars_units():
    # R = 0.03 and s = 0.02 in units of FLAME scaled by 4
    assert PAPER.support == pytest.approx(0.03 * 0.25) and PAPER.scale == pytest.approx(0.02 * 0.25)
    assert METRES_PER_UNIT == 0.25
    reach = support_radius(PAPER.support, PAPER.cutoff)
    assert reach == pytest.approx(0.0075 * math.sqrt(2 * math.log(1e4)))  # about 3.2 cm


def dense_support(points: torch.Tensor, centres: torch.Tensor, support: float, cutoff: float) -> torch.Tensor:
    """g (N, L) from support_weights' pairs, checked against the formula at every pair."""
    pairs, values = support_weights(points, centres, support, cutoff)
    g = torch.zeros(len(points), len(centres))
    g[pairs[:, 1], pairs[:, 0]] = values
    formula = (torch.exp(-torch.cdist(points, centres).square() / (2 * support**2)) - cutoff).clamp_min(0)
    assert torch.allclose(g, formula, atol=1e-6) and (pairs[1:, 0] >= pairs[:-1, 0]).all()  # sorted by field
    return g


def test_support_weights_vanish_beyond_the_reach_and_blend_to_at_most_one():
    support, cutoff = PAPER.support, PAPER.cutoff
    reach = support_radius(support, cutoff)
    centres = torch.tensor([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])
    distances = torch.linspace(0, 0.06, 601)
    points = torch.stack([-distances, torch.zeros_like(distances), torch.zeros_like(distances)], 1)
    g = dense_support(points, centres, support, cutoff)
    beyond = distances > reach + 1e-6
    assert (g[beyond, 0] == 0).all() and (g[~beyond & (distances < reach - 1e-4), 0] > 0).all()
    assert (g[distances > reach + 0.01 + 1e-6, 1] == 0).all()
    assert g[0, 0] == pytest.approx(1 - cutoff)
    # the landmark term's blend weights: normalised where the supports overlap past one, fading at the rim
    dense = torch.rand(2000, 3) * 0.08 - 0.04
    g = dense_support(dense, centres, support, cutoff)
    blend = g / g.sum(1, keepdim=True).clamp_min(1.0)
    assert torch.allclose(blend.sum(1), g.sum(1).clamp_max(1.0), atol=1e-6)
    assert (blend.sum(1)[g.sum(1) == 0] == 0).all()


def test_a_point_on_a_landmark_moves_with_it_before_any_learning():
    centres = torch.tensor([[0.0, 0.0, 0.0], [0.05, 0.0, 0.0]])
    canonical = centres + torch.tensor([[0.0, -0.01, 0.0], [0.0, 0.0, 0.0]])
    deformation = Deformation(2, 1, torch.ones(2, 1), True, PAPER.support, PAPER.cutoff, PAPER.scale, 8, 2, 2)
    t = deformation(centres, centres, canonical, torch.zeros(1), torch.zeros(0), 0.0, learned=False)
    assert torch.allclose(t[0], torch.tensor([0.0, -0.01, 0.0]) * (1 - PAPER.cutoff), atol=1e-7)
    assert t[1].abs().max() == 0


def test_attention_masks_keep_the_quantile_and_ignore_what_does_not_move():
    motion = np.array(
        [
            [0.0, 0.004, 0.01],
            [0.0, 0.003, 0.0],
            [0.002, 0.002, 0.0],
            [0.003, 0.001, 0.0],
        ]
    )
    masks = attention_masks(motion)
    # a coefficient moving only some centres reaches those alone, however many do not move at all
    assert masks[:, 0].tolist() == [False, False, True, True]
    assert masks[:, 2].tolist() == [True, False, False, False]
    # one moving them all loses the centres below its 25% quantile
    assert masks[:, 1].tolist() == [True, True, True, False]


def test_field_centres_are_every_other_landmark_or_the_five():
    assert [c[0] for c in field_centres("34", np.arange(68))] == list(range(0, 68, 2))
    assert len(field_centres("34", np.arange(17, 68))) == 25  # FLAME's static embedding has no jaw contour
    assert field_centres("5", np.arange(68))[0] == (36, 37, 38, 39, 40, 41)
    with pytest.raises(ValueError, match="five field centres"):
        field_centres("5", np.arange(17, 50))


def test_an_eye_blendshape_reaches_only_fields_around_the_eyes(ict_npz):
    model = MorphableModel.load(ict_npz)
    head = TrackedHead(model, {"identity": np.zeros(0), "expression": np.zeros((1, model.num_expression))}, "34")
    masks = head.attention(model.num_expression)
    centre_ids = np.array([int(model.landmark_ids[group[0]]) for group in head.groups])
    eye_region = set(range(17, 27)) | set(range(36, 48))  # brows and eyes
    mouth_and_jaw = set(range(0, 17)) | set(range(48, 68))
    for name, eye in (("eyeBlink_L", range(42, 48)), ("eyeBlink_R", range(36, 42))):
        chosen = set(centre_ids[masks[:, model.expression_names.index(name)]].tolist())
        assert chosen and chosen <= eye_region, (name, chosen)
        assert chosen & set(eye), (name, chosen)
    jaw = set(centre_ids[masks[:, model.expression_names.index("jawOpen")]].tolist())
    assert jaw & mouth_and_jaw and not jaw & set(range(17, 27)), jaw
    # without masks (the ablation) every field sees every coefficient, so none is local to a region
    unmasked = head.attention(model.num_expression, masked=False)
    assert unmasked.dtype == bool and unmasked.all() and unmasked.shape == masks.shape
    assert all(head.region_coefficients(unmasked, region) == [] for region in EDIT_REGIONS)
    assert head.region_coefficients(masks, "eyes")


def test_a_local_displacement_is_learned_by_the_nearest_field_and_by_no_other():
    """Two frames differing in one expression coefficient, which moves only centre A; the known change, a
    2 mm shift of the points near A, is fitted. The change between the frames must come from A's field:
    B's overlaps those points but its mask hides the coefficient, C's support does not reach them."""
    torch.manual_seed(0)
    centres = torch.tensor([[0.0, 0.0, 0.0], [0.012, 0.0, 0.0], [0.06, 0.0, 0.0]])
    motion = np.array([[0.004, 0.0], [0.0, 0.004], [0.0, 0.0]])
    masks = torch.as_tensor(attention_masks(motion))
    deformation = Deformation(3, 2, masks, True, PAPER.support, PAPER.cutoff, PAPER.scale, 24, 2, 2)
    points = torch.randn(256, 3)
    points = 0.006 * points / points.norm(dim=1, keepdim=True) * torch.rand(256, 1) ** (1 / 3)
    shift = torch.tensor([0.0, 0.002, 0.0])
    frames = [(torch.tensor([0.0, 0.0]), torch.zeros(3)), (torch.tensor([1.0, 0.0]), shift)]
    optimizer = torch.optim.Adam(deformation.parameters(), lr=3e-3)
    for _ in range(400):
        loss = sum(
            ((deformation(points, centres, centres, c, torch.zeros(0), 2.0) - target) / 1e-3).square().mean()
            for c, target in frames
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        before, after = (deformation.field_contributions(points, centres, c, torch.zeros(0), 2.0) for c, _ in frames)
    change = after - before  # (N, fields, 3)
    assert torch.allclose(change[:, 0].mean(0), shift, atol=2e-4), change[:, 0].mean(0)
    assert change[:, 1].abs().max() == 0 and change[:, 2].abs().max() == 0
    assert before[:, 1].abs().max() > 0  # B does act on these points; it just cannot see the coefficient


def test_the_encoding_window_opens_frequency_by_frequency():
    x = torch.randn(4, 3)
    closed, half, full = (windowed_encoding(x, 4, a) for a in (0.0, 2.0, 4.0))
    assert closed.shape == (4, 27)
    assert torch.equal(closed[:, :3], x) and closed[:, 3:].abs().max() == 0
    sines = half[:, 3:15].reshape(4, 4, 3)
    assert sines[:, :2].abs().max() > 0 and sines[:, 2:].abs().max() == 0
    assert full[:, 3:15].reshape(4, 4, 3)[:, 3].abs().max() > 0


def test_grid_growth_keeps_what_the_coarse_grid_learned_and_pruning_keeps_the_dense_space():
    torch.manual_seed(0)
    field = CanonicalField(0.3, 16, 2, 2, 4, 8, 0)
    with torch.no_grad():  # a ball of density at the origin, as components of the coarse grid
        axis = torch.linspace(-1, 1, 16)
        bump = torch.exp(-((axis / 0.35) ** 2))
        field.density.planes.copy_((bump[:, None] * bump[None])[None, None].expand(3, 2, 16, 16))
        field.density.lines.copy_(bump[None, None, :, None].expand(3, 2, 16, 1))
    points = (torch.rand(500, 3) - 0.5) * 0.4
    with torch.no_grad():
        coarse, _ = field.sigma(points)
        field.grow(40)
        grown, _ = field.sigma(points)
    assert field.density.planes.shape[-1] == 40 and field.appearance.lines.shape[-2] == 40
    assert torch.allclose(grown, coarse, rtol=0.1, atol=1e-2 * float(coarse.max()))
    kept = field.prune(1e-4)
    assert 0.05 < kept < 0.9
    dense = torch.rand(4000, 3) * 0.6 - 0.3
    with torch.no_grad():
        density, occupied = field.sigma(dense)
        unpruned = torch.relu(field.density.read(dense / 0.3).sum((1, 2))) * field.density_scale
    # pruning never drops a sample that would carry weight: what it culls has (next to) no density
    opacity = 1 - torch.exp(-unpruned[~occupied] * 0.6 / 64)
    assert (~occupied).sum() > 100 and opacity.max() < 1e-3
    assert torch.allclose(density[occupied], unpruned[occupied])


def test_the_fast_preset_keeps_the_papers_structure():
    fast = LDFConfig(**PRESETS["fast"])
    assert fast.support_units == PAPER.support_units and fast.scale_units == PAPER.scale_units
    assert fast.landmarks == "34" and fast.local_fields and fast.attention
    assert fast.field_width == 40 and fast.field_depth == 3 and fast.frequencies == 10
    assert fast.phase_steps() == [200, 200, 200, fast.steps - fast.pretrain_steps]
    assert fast.grid_sizes()[0] == fast.grid_start and fast.grid_sizes()[-1] == fast.grid_final
    assert PAPER.grid_sizes()[0] == 128 and PAPER.grid_sizes()[-1] == 300 and len(PAPER.phase_steps()) == 7


def test_rays_placed_by_their_own_first_pass_weights_render_as_with_the_first_pass(lp_d18_ict):
    """A given proposal replaces the density-only first pass: with the rays' own first-pass weights it renders
    what the first pass would, and the full pass's weights come back over the stratified samples."""
    from avatar_pipeline.avatars import find
    from avatar_pipeline.avatars.data import SubjectFrames
    from avatar_pipeline.avatars.volume import (
        SKIP_EMPTY,
        composite,
        importance_depths,
        ray_bounds,
        stratified_depths,
    )
    from avatar_pipeline.geometry import camera_rays

    spec = find("ldf")
    cfg = spec.config_from(spec.smoke_settings)
    train = SubjectFrames(lp_d18_ict, cfg.size, "train", with_images=False)
    torch.manual_seed(0)
    model = spec.model_class()(cfg, train, torch.device("cpu"))
    state = model.frame_state(train.conditions[0], train.camera_to_head[0], model.untested_code())
    pixels = torch.stack(torch.meshgrid(torch.arange(cfg.size), torch.arange(cfg.size), indexing="xy"), -1)
    origins, dirs = camera_rays(train.camera_to_head[0], train.focal, cfg.size, pixels.reshape(-1, 2).float())
    near, far = (b.expand(len(origins)) for b in ray_bounds(train.camera_to_head[0], cfg.scene_radius))
    background = torch.rand(len(origins), 3)
    with torch.no_grad():
        args = (origins, dirs, near, far, background, state, float(model.window))
        own = model.trace(*args, jitter=False, learned=True, skip_empty=SKIP_EMPTY, propose=True)
        # the first pass's weights, as trace computes them
        depths = stratified_depths(near, far, cfg.samples, jitter=False)
        points = (origins[:, None] + dirs[:, None] * depths[..., None]).reshape(-1, 3)
        density, _ = model.canonical.sigma(points + model.deform(points, state, float(model.window), True))
        _, weights, _ = composite(density.view(len(origins), -1), torch.zeros(*depths.shape, 3), depths, background)
        first = weights[:, :-1]
        placed = model.trace(*args, jitter=False, learned=True, skip_empty=SKIP_EMPTY, proposal=first, propose=True)
    busy = first.sum(-1) >= SKIP_EMPTY
    assert busy.sum() > len(origins) // 4  # the untrained canonical grid is foggy: most rays take the full pass
    assert torch.allclose(placed["colour"], own["colour"], atol=1e-5)
    assert torch.allclose(placed["alpha"], own["alpha"], atol=1e-5)
    assert own["proposal"].shape == (len(origins), cfg.samples)
    assert torch.allclose(own["proposal"][busy].sum(-1), own["alpha"][busy], atol=1e-4)
    # against the full pass at the same depths, every sample computed: early termination leaves out only samples
    # behind the point where less than SKIP_EMPTY of a ray's light is left
    extra = importance_depths(depths, first, cfg.importance_samples, jitter=False)
    every = torch.sort(torch.cat([depths, extra], -1), -1).values[busy]
    with torch.no_grad():
        full = model._shade(origins[busy], dirs[busy], every, background[busy], state, float(model.window), True)
    assert (own["colour"][busy] - full["colour"]).abs().max() < SKIP_EMPTY + 1e-5
    assert torch.allclose(own["alpha"][busy], full["alpha"], atol=SKIP_EMPTY + 1e-5)
