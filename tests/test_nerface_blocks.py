"""NeRFace building blocks: encoding, field, sampling and compositing over the background."""

import torch

from avatar_pipeline.avatars.layers import positional_encoding
from avatar_pipeline.avatars.nerface.field import ConditionedField, FeaturePlanes, FieldConfig
from avatar_pipeline.avatars.volume import (
    binned_weights,
    composite,
    distortion_loss,
    importance_depths,
    proposed_samples,
    stratified_depths,
)


def test_positional_encoding_matches_the_paper_sizes():
    x = torch.randn(5, 3)
    assert positional_encoding(x, 10).shape == (5, 63) and positional_encoding(x, 4).shape == (5, 27)
    enc = positional_encoding(torch.tensor([[0.5, 0.0, 0.0]]), 2)
    # layout: x, then sin of (2^0 x, 2^1 x, ...) per frequency, then the cosines
    assert torch.allclose(enc[0, 3], torch.sin(torch.tensor(0.5))) and torch.allclose(
        enc[0, 6], torch.sin(torch.tensor(1.0))
    )


def test_positional_encoding_is_the_formula_at_the_largest_angles_and_passes_gradients():
    """One product lifts x to its angles (cosines as sines of the angles + pi/2): within 1e-5 of sin and cos of
    2^k x taken apart, for positions up to 3 (2^9 x up to 1536 rad), with the gradient of the formula."""
    x = (torch.rand(2000, 3) * 6 - 3).requires_grad_()
    angles = (x[:, None, :] * 2.0 ** torch.arange(10.0)[:, None]).flatten(1)
    formula = torch.cat([x, angles.sin(), angles.cos()], -1)
    encoding = positional_encoding(x, 10)
    assert (encoding - formula).abs().max() < 1e-5 and torch.equal(encoding[:, :3], x)
    weights = torch.randn(63)
    (ours,) = torch.autograd.grad((encoding * weights).sum(), x)
    (theirs,) = torch.autograd.grad((formula * weights).sum(), x)
    assert torch.allclose(ours, theirs, rtol=1e-3, atol=0.05)  # terms up to 512: 6e-5 rad of shift times 2^9
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast never lowers the angles' precision
        assert positional_encoding(x, 10).dtype == torch.float32


def test_dense_layer_fused_for_rendering_is_the_layer_and_pads_to_few_shapes():
    """In bf16 without autograd, dense() runs oneDNN's fused kernel on rows padded to a bucket: the same values
    as PyTorch's layer and activation in bf16 (to bf16 rounding), for odd row counts and a sliced weight."""
    from avatar_pipeline.avatars.layers import bucket, dense

    torch.manual_seed(0)
    wide = torch.randn(64, 150) / 10
    weight, bias = wide[:, :100], torch.randn(64) / 10  # a strided slice, as NeRFace's colour layer passes
    for rows in (1, 65, 1000, 8192):
        x = torch.randn(rows, 100)
        for activation, function in (("none", lambda y: y), ("relu", torch.relu), ("sigmoid", torch.sigmoid)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                expected = function(torch.nn.functional.linear(x, weight, bias)).float()
                with torch.no_grad():
                    got = dense(x, weight, bias, activation)
            assert got.shape == (rows, 64) and got.dtype == torch.bfloat16
            assert (got.float() - expected).abs().max() <= 0.02 * expected.abs().max() + 1e-3, (rows, activation)
    # oneDNN's bf16 kernel pairs an odd-width row's last value with the next row's first: what lies after the rows
    # given must not leak into them (it did from uninitialised padding)
    storage = torch.full((600, 27), float("nan"), dtype=torch.bfloat16)
    storage[:514] = torch.randn(514, 27)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(dense(storage[:514], weight[:, :27])).all()
        assert torch.isfinite(dense(storage[:512], weight[:, :27])).all()  # a bucket's size: not padded
    # at most 12.5% more rows, eight sizes per octave: 64 and 8 for each octave from 64 to 65536
    assert all(n <= bucket(n) <= max(64, 1.125 * n) for n in range(1, 65_537))
    assert len({bucket(n) for n in range(1, 65_537)}) == 1 + 8 * 10


def test_field_renders_what_it_trains_on():
    """Rendering (no autograd, bf16: fused layers, conditioning folded into the first bias) gives the density and
    colour the training path computes in the same precision, with and without kept samples."""
    torch.manual_seed(0)
    field = ConditionedField(FieldConfig(expression_dim=5, latent_dim=4, width=64, depth=3, plane_resolutions=(16,)))
    pts, cond = torch.randn(40, 9, 3) * 0.3, torch.randn(9)
    dirs = torch.nn.functional.normalize(torch.randn(40, 3), dim=-1)
    keep = torch.rand(40, 9, generator=torch.Generator().manual_seed(1)) > 0.5
    with torch.autocast("cpu", dtype=torch.bfloat16):
        trained = [field(pts, dirs, cond), field(pts, dirs, cond, keep)]
        with torch.no_grad():
            rendered = [field(pts, dirs, cond), field(pts, dirs, cond, keep)]
    for (density, rgb), (density_r, rgb_r) in zip(trained, rendered):
        assert (density_r.float() - density.float()).abs().max() <= 0.03 * density.float().abs().max() + 1e-3
        assert (rgb_r.float() - rgb.float()).abs().max() <= 0.02 and rgb.float().std() > 0.01


def test_field_is_the_paper_architecture_and_uses_its_conditioning():
    field = ConditionedField(FieldConfig())
    linears = [field.position_in] + [m for m in field.backbone if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 8 and all(m.out_features == 256 for m in linears)
    # the first layer sees the encoded position and the conditioning (expression + latent code)
    assert field.position_in.in_features == 63 and field.condition_in.in_features == 53 + 32
    branch = [m for m in field.colour if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in branch] == [128, 128, 128, 128, 3] and branch[0].in_features == 256 + 27
    pts, dirs = torch.randn(4, 16, 3), torch.nn.functional.normalize(torch.randn(4, 3), dim=-1)
    cond = torch.randn(85)
    density, rgb = field(pts, dirs, cond)
    assert density.shape == (4, 16) and rgb.shape == (4, 16, 3) and (density >= 0).all()
    _, other = field(pts, dirs, cond + 1.0)
    assert not torch.allclose(rgb, other)  # expression and latent code change the field
    # one condition for all rays equals the same condition given per ray
    density_per_ray, rgb_per_ray = field(pts, dirs, cond.expand(4, -1))
    assert torch.allclose(rgb, rgb_per_ray) and torch.allclose(density, density_per_ray)


def test_kept_samples_get_what_the_dense_field_gives_them_and_the_others_stay_empty():
    """The keep path packs the kept samples and makes the per-ray terms only for rays with one (some rays here
    keep none): for a shared and a per-ray condition alike, every kept sample has the dense field's density and
    colour, every other one is empty."""
    torch.manual_seed(0)
    field = ConditionedField(FieldConfig(width=32, depth=2, colour_width=16, colour_depth=1, plane_resolutions=(8,)))
    pts, dirs = torch.randn(6, 10, 3) * 0.5, torch.nn.functional.normalize(torch.randn(6, 3), dim=-1)
    keep = torch.rand(6, 10) < 0.4
    keep[[1, 4]] = False  # rays with nothing kept
    for cond in (torch.randn(85), torch.randn(6, 85)):
        with torch.no_grad():
            density, rgb = field(pts, dirs, cond)
            kept_density, kept_rgb = field(pts, dirs, cond, keep)
        assert torch.allclose(kept_density[keep], density[keep], atol=1e-5)
        assert torch.allclose(kept_rgb[keep], rgb[keep], atol=1e-5)
        assert not kept_density[~keep].any() and not kept_rgb[~keep].any()
        # a chunk of rays with nothing kept (early termination's later segments of a sparse avatar) is empty space
        with torch.no_grad():
            none_density, none_rgb = field(pts, dirs, cond, torch.zeros_like(keep))
        assert none_density.shape == (6, 10) and not none_density.any() and not none_rgb.any()


def test_split_first_layer_is_one_layer_on_the_concatenated_input():
    field = ConditionedField(FieldConfig(width=32, depth=2, colour_width=16, colour_depth=1))
    pts, cond = torch.randn(3, 5, 3), torch.randn(85)
    joint = torch.nn.Linear(63 + 85, 32)
    with torch.no_grad():
        joint.weight.copy_(torch.cat([field.position_in.weight, field.condition_in.weight], 1))
        joint.bias.copy_(field.position_in.bias)
    enc = positional_encoding(pts, 10)
    expected = joint(torch.cat([enc, cond.expand(3, 5, -1)], -1))
    got = field.position_in(enc) + field.condition_in(cond)
    assert torch.allclose(expected, got, atol=1e-5)


def test_colour_layer_split_per_ray_is_the_layer_on_features_and_direction_together():
    """The colour branch's first layer is applied as a per-sample features part plus a per-ray direction part:
    the colours must be those of the paper's layer on the concatenated input, with and without skipped samples."""
    torch.manual_seed(0)
    field = ConditionedField(FieldConfig(expression_dim=5, latent_dim=4))
    pts, cond = torch.randn(7, 9, 3) * 0.2, torch.randn(9)
    dirs = torch.nn.functional.normalize(torch.randn(7, 3), dim=-1)
    features = field.backbone(field.position_in(field._encode(pts.reshape(-1, 3))) + field.condition_in(cond))
    view = positional_encoding(dirs, 4)[:, None].expand(-1, 9, -1).reshape(-1, 27)
    expected = torch.sigmoid(field.colour(torch.cat([features, view], -1))).view(7, 9, 3)
    _, rgb = field(pts, dirs, cond)
    keep = torch.rand(7, 9, generator=torch.Generator().manual_seed(1)) > 0.5
    _, rgb_kept = field(pts, dirs, cond, keep)
    assert torch.allclose(rgb, expected, atol=1e-5) and torch.allclose(rgb_kept[keep], expected[keep], atol=1e-5)
    assert (rgb_kept[~keep] == 0).all() and expected.std() > 0.01


def test_positions_are_scaled_into_the_unit_ball_before_the_encoding():
    from avatar_pipeline.avatars import find

    cfg = find("nerface").config_from({"preset": "fast", "scene_radius": 0.25})
    assert cfg.field(53).position_scale == 4.0
    small = FieldConfig(width=16, depth=2, colour_width=8, colour_depth=1)
    torch.manual_seed(0)
    metres = ConditionedField(small)
    scaled = ConditionedField(FieldConfig(**{**small.__dict__, "position_scale": 4.0}))
    scaled.load_state_dict(metres.state_dict())
    pts, dirs, cond = (
        torch.randn(3, 5, 3) * 0.2,
        torch.nn.functional.normalize(torch.randn(3, 3), dim=-1),
        torch.randn(85),
    )
    # a point at 0.2 m through the scaled field is the point at 0.8 through the unscaled one
    assert torch.allclose(scaled(pts, dirs, cond)[1], metres(pts * 4.0, dirs, cond)[1], atol=1e-6)
    assert not torch.allclose(scaled(pts, dirs, cond)[1], metres(pts, dirs, cond)[1], atol=1e-3)


def test_softplus_density_keeps_a_gradient_where_relu_has_died():
    small = dict(width=16, depth=2, colour_width=8, colour_depth=1)
    pts, dirs, cond = torch.randn(4, 6, 3), torch.nn.functional.normalize(torch.randn(4, 3), dim=-1), torch.randn(85)
    grads = {}
    for activation in ("relu", "softplus"):
        field = ConditionedField(FieldConfig(**small, density_activation=activation))
        with torch.no_grad():
            field.density.bias.fill_(-20.0)  # every point's raw density well below zero
        density, _ = field(pts, dirs, cond)
        assert (density >= 0).all()
        density.sum().backward()
        grads[activation] = field.density.weight.grad.abs().sum()
    assert grads["relu"] == 0 and grads["softplus"] > 0


def test_bf16_and_chunked_rendering_match_fp32():
    from avatar_pipeline.avatars.nerface.field import NeRFaceRenderer

    torch.manual_seed(0)
    cfg = FieldConfig(width=64, depth=3, colour_width=32, colour_depth=1)
    reference = NeRFaceRenderer(cfg, 16, 16, "fp32", chunk_samples=1 << 20)
    origins = torch.zeros(50, 3)
    origins[:, 2] = 1.0
    dirs = torch.nn.functional.normalize(torch.randn(50, 3) * 0.1 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    args = (origins, dirs, torch.full((50,), 0.6), torch.full((50,), 1.4), torch.randn(85), torch.rand(50, 3))
    expected = reference(*args, jitter=False)["fine"]
    for precision, chunk in (("fp32", 256), ("bf16", 256)):
        other = NeRFaceRenderer(cfg, 16, 16, precision, chunk_samples=chunk)
        other.load_state_dict(reference.state_dict())
        got = other(*args, jitter=False)["fine"]
        tolerance = 1e-5 if precision == "fp32" else 0.03
        assert (got - expected).abs().max() < tolerance, (precision, (got - expected).abs().max())


def test_empty_space_shows_the_background_and_opaque_space_hides_it():
    depths = stratified_depths(torch.zeros(2), torch.ones(2), 64, jitter=False)
    background = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7]])
    rgb = torch.full((2, 64, 3), 0.5)
    colour, weights, alpha = composite(torch.zeros(2, 64), rgb, depths, background)
    assert torch.allclose(colour, background) and torch.allclose(alpha, torch.zeros(2), atol=1e-6)
    dense = torch.zeros(2, 64)
    dense[:, 10] = 1e4
    colour, weights, alpha = composite(dense, rgb, depths, background)
    assert torch.allclose(colour, torch.full((2, 3), 0.5), atol=1e-4) and torch.allclose(
        alpha, torch.ones(2), atol=1e-4
    )
    assert torch.allclose(weights.sum(-1), torch.ones(2), atol=1e-5)  # every ray ends somewhere


def test_distortion_loss_is_mip_nerf_360s_pairwise_sum_and_smaller_for_a_surface_than_for_fog():
    generator = torch.Generator().manual_seed(0)
    near, far = torch.tensor([0.5, 1.0]), torch.tensor([1.5, 3.0])
    depths = stratified_depths(near, far, 12, jitter=False)
    weights = torch.rand(2, 12, generator=generator) * 0.1
    # the definition (Barron et al. 2022, eq. 15) summed pair by pair on depths normalised to [0, 1]
    expected = []
    for r in range(2):
        t = (depths[r] - near[r]) / (far[r] - near[r])
        widths = torch.cat([t[1:] - t[:-1], t[-1:] - t[-2:-1]])
        mids = t + 0.5 * widths
        w = weights[r]
        pairs = (w[:, None] * w[None] * (mids[:, None] - mids[None]).abs()).sum()
        expected.append(pairs + (w**2 * widths).sum() / 3)
    assert torch.allclose(distortion_loss(weights, depths, near, far), torch.stack(expected).mean(), rtol=1e-5)
    # the same total weight on one sample (a surface) costs less than spread evenly along the ray (fog)
    surface = torch.zeros(2, 12)
    surface[:, 5] = 0.9
    fog = torch.full((2, 12), 0.9 / 12)
    assert distortion_loss(surface, depths, near, far) < 0.2 * distortion_loss(fog, depths, near, far)
    assert distortion_loss(torch.zeros(2, 12), depths, near, far) == 0


def test_importance_samples_gather_where_the_weights_are():
    depths = stratified_depths(torch.zeros(1), torch.full((1,), 4.0), 64, jitter=False)
    weights = torch.zeros(1, 64)
    weights[0, 40:44] = 1.0  # the surface is around depth 2.5-2.75
    fine = importance_depths(depths, weights, 64, jitter=True)
    assert ((fine > 2.4) & (fine < 2.85)).float().mean() > 0.9
    torch.manual_seed(0)
    strat = stratified_depths(torch.zeros(3), torch.ones(3), 8, jitter=True)
    assert (strat[:, 1:] > strat[:, :-1]).all() and (strat >= 0).all() and (strat <= 1).all()


def test_a_second_pass_weights_gather_onto_the_nearest_first_pass_sample():
    torch.manual_seed(0)
    bins = torch.sort(torch.rand(5, 12) * 3, -1).values
    depths = torch.sort(torch.rand(5, 30) * 3.4 - 0.2, -1).values  # some before the first and after the last bin
    weights = torch.rand(5, 30)
    gathered = binned_weights(weights, depths, bins)
    nearest = (depths[:, :, None] - bins[:, None, :]).abs().argmin(-1)
    expected = torch.zeros(5, 12).scatter_add_(1, nearest, weights)
    assert torch.allclose(gathered, expected) and torch.allclose(gathered.sum(-1), weights.sum(-1))


def test_a_ray_placed_by_its_own_coarse_weights_as_proposal_renders_as_with_its_coarse_pass():
    """The fine pass placed from a given proposal is the paper's fine pass when the proposal is the ray's own
    coarse weights; the coarse field is then never run, and the fine weights come back over the coarse samples."""
    from avatar_pipeline.avatars.nerface.field import NeRFaceRenderer

    torch.manual_seed(0)
    renderer = NeRFaceRenderer(FieldConfig(expression_dim=4, latent_dim=3, width=32, depth=2, colour_width=16), 16, 16)
    rays = 40
    origins = torch.tensor([0.0, 0.0, -1.0]).expand(rays, 3)
    dirs = torch.nn.functional.normalize(torch.cat([0.3 * torch.randn(rays, 2), torch.ones(rays, 1)], 1), dim=-1)
    args = (origins, dirs, torch.full((rays,), 0.5), torch.full((rays,), 1.5), torch.randn(7), torch.rand(rays, 3))
    with torch.no_grad():
        own = renderer(*args, jitter=False, skip_empty=1e-4, propose=True)
        counted = renderer.samples_computed
        placed = renderer(*args, jitter=False, skip_empty=1e-4, proposal=own["coarse_weights"], propose=True)
    assert renderer.samples_computed - counted == rays * 32  # the fine pass alone: 16 coarse + 16 fine depths
    # (a ray found empty shows the background itself instead of its coarse colour: less than skip_empty apart)
    busy = own["coarse_alpha"] >= 1e-4
    assert busy.sum() > rays // 2 and torch.allclose(placed["fine"][busy], own["fine"][busy], atol=1e-6)
    assert torch.allclose(placed["fine"], own["fine"], atol=1e-4)
    assert torch.allclose(placed["fine_alpha"], own["fine_alpha"], atol=1e-4)
    # the proposal handed on holds the fine pass's foreground weight, over the 16 coarse samples
    assert own["proposal"].shape == (rays, 16)
    assert torch.allclose(own["proposal"].sum(-1), own["fine_alpha"], atol=1e-5)


def test_proposed_samples_keep_every_importance_sample_and_the_stratified_ones_near_the_proposals_weight():
    proposal = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0], [0.0] * 7 + [0.2]])
    depths = torch.arange(8.0).expand(2, 8)
    extra = torch.tensor([[3.1, 3.2], [6.9, 0.5]])  # importance samples, one in an empty bin
    order = torch.sort(torch.cat([depths, extra], -1), -1).indices
    kept = proposed_samples(proposal, order, 0.01)
    by_index = torch.zeros_like(kept).scatter_(1, order, kept)  # back in the joined (stratified, extra) order
    assert by_index[0, :8].tolist() == [False, False, True, True, True, False, False, False]
    assert by_index[1, :8].tolist() == [False] * 6 + [True, True]
    assert by_index[:, 8:].all()  # importance samples always computed
    # a threshold above every weight leaves the importance samples alone; none keeps everything
    assert proposed_samples(proposal, order, 0.9).sum() == 4 and proposed_samples(proposal, order, 0.0).all()


def test_rays_start_at_the_camera_and_cross_the_image_plane_where_expected():
    from avatar_pipeline.geometry import camera_rays

    c2h = torch.eye(4)
    c2h[2, 3] = 1.0  # camera at z = 1 looking toward the head at the origin
    origins, dirs = camera_rays(c2h, focal=100.0, size=64, pixels=torch.tensor([[31.5, 31.5], [63.5, 31.5]]))
    assert torch.allclose(origins, torch.tensor([0.0, 0.0, 1.0]).expand(2, 3))
    assert torch.allclose(dirs[0], torch.tensor([0.0, 0.0, -1.0]), atol=1e-6)  # image centre: straight ahead
    assert dirs[1, 0] > 0 and abs(dirs[1, 1]) < 1e-6  # right of centre: +x


def _frame_rays(size: int, background: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The pixels (N, 2) of a size x size frame seen from z = 1 (focal 20) and its rays, in the renderer's
    keyword arguments: depths 0.5 to 1.5, a zero condition (6,) and one background colour (3,)."""
    from avatar_pipeline.geometry import camera_rays

    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    pixels = torch.stack([xs.flatten(), ys.flatten()], 1).float()
    c2h = torch.eye(4)
    c2h[2, 3] = 1.0
    origins, dirs = camera_rays(c2h, 20.0, size, pixels)
    return pixels, {
        "origins": origins,
        "directions": dirs,
        "near": torch.full((len(pixels),), 0.5),
        "far": torch.full((len(pixels),), 1.5),
        "condition": torch.zeros(6),
        "background": background.expand(len(pixels), 3),
    }


def _fit_tiny_nerface(steps: int = 300, occupancy=None, warmup: int = 100):
    """A tiny coarse + fine renderer fitted to one 16 px frame: a coloured disc "head" in front of a grey
    background, seen from z = 1; returns it, the frame's rays and the losses over the steps. With an
    `occupancy` grid, it is updated every 16 steps from `warmup` on, and the steps after skip its empty
    cells' samples."""
    from avatar_pipeline.avatars.nerface.field import NeRFaceRenderer

    torch.manual_seed(0)
    size = 16
    pixels, rays = _frame_rays(size, torch.tensor([0.4, 0.4, 0.4]))
    inside = (pixels - size / 2 + 0.5).norm(dim=1) < 4
    target = torch.where(inside[:, None], torch.tensor([0.9, 0.5, 0.3]), torch.tensor([0.4, 0.4, 0.4]))
    renderer = NeRFaceRenderer(
        FieldConfig(width=64, depth=3, colour_width=32, colour_depth=1, expression_dim=4, latent_dim=2),
        coarse_samples=16,
        fine_samples=16,
    )
    optimizer = torch.optim.Adam(renderer.parameters(), lr=2e-3)
    losses = []
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        culling = occupancy is not None and step >= warmup
        if culling and step % 16 == 0:
            occupancy.update(lambda p: renderer.peak_density(p, rays["condition"][None]), 0.95, generator)
        out = renderer(**rays, occupancy=occupancy if culling else None)
        loss = ((out["coarse"] - target) ** 2).mean() + ((out["fine"] - target) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return renderer, rays, inside, losses


def test_a_tiny_nerface_fits_a_frame_over_its_background():
    """Rays of one small frame: the loss of coarse + fine colours falls as the field learns the head."""
    renderer, rays, inside, losses = _fit_tiny_nerface()
    out = renderer(**rays)
    assert sum(losses[-10:]) < 0.3 * sum(losses[:10])
    assert out["fine_alpha"][inside].mean() > out["fine_alpha"][~inside].mean() + 0.3  # it learned where the head is


def test_the_occupancy_grid_skips_empty_space_without_changing_the_render():
    """On a fitted tiny model: the grid culls most of the scene, never a sample that carries weight in the
    dense render, and the render that skips the empty cells matches the dense one."""
    from avatar_pipeline.avatars.volume import SKIP_EMPTY, OccupancyGrid

    renderer, rays, _, _ = _fit_tiny_nerface()
    # the threshold bounds the light skipped space takes from a ray where the density between the cell centres
    # is no higher than at them; this coarse grid over a fog-filled toy needs the margin to the tolerance (the
    # toy fits differently per CPU: the largest change was under 2e-3 on an Intel Xeon, 7.2e-3 on an AMD EPYC)
    tolerance = 1e-2
    grid = OccupancyGrid(radius=0.5, cells=16, threshold=1e-3)
    assert grid.contains(torch.zeros(3))  # everything is occupied before it is measured
    share = grid.build(lambda points: renderer.peak_density(points, rays["condition"][None]))
    assert share < 0.8  # a good part of the cube is found empty (the toy keeps fog along the disc's rays)
    assert grid.contains(torch.tensor([0.0, 0.0, 5.0]))  # outside the cube nothing is culled

    with torch.no_grad():
        dense = renderer(**rays, jitter=False)
        fast = renderer(**rays, jitter=False, skip_empty=SKIP_EMPTY, occupancy=grid)
        # every sample of the dense coarse pass whose weight counts lies in an occupied cell
        depths = stratified_depths(rays["near"], rays["far"], renderer.coarse_samples, jitter=False)
        points = rays["origins"][:, None] + rays["directions"][:, None] * depths[..., None]
        density, _ = renderer.coarse(points, rays["directions"], rays["condition"])
        _, weights, _ = composite(density, torch.zeros(*density.shape, 3), depths, rays["background"])
    carrying = weights[:, :-1] > 1e-3
    assert carrying.any() and grid.contains(points)[carrying].all()
    assert (fast["fine"] - dense["fine"]).abs().max() < tolerance
    assert (fast["fine_alpha"] - dense["fine_alpha"]).abs().max() < tolerance
    # a grid that culls everything leaves the background: the skipped samples really are not computed
    grid.occupied.zero_()
    with torch.no_grad():
        empty = renderer(**rays, jitter=False, skip_empty=SKIP_EMPTY, occupancy=grid)
    within = (points.abs() <= 0.5).all(-1).all(-1)  # rays whose samples all lie in the cube
    assert within.sum() > len(within) // 2
    assert torch.allclose(empty["fine"][within], rays["background"][within], atol=1e-6)
    assert not empty["fine_alpha"][within].any()


def test_the_marched_render_is_the_fine_field_composited_at_even_depths_over_occupied_cells():
    """render_marched (Instant-NGP's way: the fine field alone at evenly spaced depths, empty cells skipped,
    early termination) on a fitted tiny model: with every cell occupied, or no grid, and no early stop it is
    exactly the fine field composited at those depths; with a measured grid and early termination it stays within the
    grid's tolerance of that; rays whose samples all lie in empty cells show the background untouched."""
    from avatar_pipeline.avatars.volume import SKIP_EMPTY, OccupancyGrid

    renderer, rays, inside, _ = _fit_tiny_nerface()
    samples = 48
    grid = OccupancyGrid(radius=0.5, cells=16, threshold=1e-3)
    args = [rays[k] for k in ("origins", "directions", "near", "far", "condition", "background")]
    with torch.no_grad():
        depths = stratified_depths(rays["near"], rays["far"], samples, jitter=False)
        points = rays["origins"][:, None] + rays["directions"][:, None] * depths[..., None]
        density, rgb = renderer.fine(points, rays["directions"], rays["condition"])
        expected, _, expected_alpha = composite(density, rgb, depths, rays["background"])
        every, every_alpha = renderer.render_marched(*args, grid, samples, stop_below=0.0)
        assert torch.allclose(every, expected, atol=1e-5) and torch.allclose(every_alpha, expected_alpha, atol=1e-5)
        no_grid, no_grid_alpha = renderer.render_marched(*args, None, samples, stop_below=0.0)
        assert torch.allclose(no_grid, expected, atol=1e-5) and torch.allclose(no_grid_alpha, expected_alpha, atol=1e-5)
        assert grid.build(lambda p: renderer.peak_density(p, rays["condition"][None])) < 0.8
        fast, fast_alpha = renderer.render_marched(*args, grid, samples, stop_below=SKIP_EMPTY)
        assert (fast - expected).abs().max() < 2e-3 and (fast_alpha - expected_alpha).abs().max() < 2e-3
        assert fast_alpha[inside].mean() > fast_alpha[~inside].mean() + 0.3  # the head is still there
        grid.occupied.zero_()
        empty, empty_alpha = renderer.render_marched(*args, grid, samples, stop_below=SKIP_EMPTY)
    within = (points.abs() <= 0.5).all(-1).all(-1)  # the central rays: the evenly spaced ends leave the cube
    assert within.sum() >= 16
    assert torch.equal(empty[within], rays["background"][within]) and not empty_alpha[within].any()


def test_training_with_an_occupancy_grid_skips_empty_space_and_still_learns():
    """Instant-NGP-style training: the grid, updated from the fields as they learn, culls part of the cube,
    the steps after the warm-up compute fewer samples, and the fit is as good as the dense one's."""
    from avatar_pipeline.avatars.volume import OccupancyGrid

    grid = OccupancyGrid(radius=0.5, cells=16, threshold=1e-3)
    renderer, rays, inside, losses = _fit_tiny_nerface(occupancy=grid)
    _, _, _, dense_losses = _fit_tiny_nerface()
    assert grid.density is not None and grid.share < 0.9
    depths = stratified_depths(rays["near"], rays["far"], renderer.coarse_samples, jitter=False)
    points = rays["origins"][:, None] + rays["directions"][:, None] * depths[..., None]
    assert grid.contains(points).float().mean() < 0.95  # coarse samples it no longer computes (0.93 here)
    assert sum(losses[-10:]) < 1.5 * sum(dense_losses[-10:])
    with torch.no_grad():
        out = renderer(**rays, jitter=False, occupancy=grid)
    assert out["fine_alpha"][inside].mean() > out["fine_alpha"][~inside].mean() + 0.3


def test_an_occupancy_grid_frees_a_cell_the_field_has_emptied_and_takes_back_a_filled_one_at_once():
    from avatar_pipeline.avatars.volume import OccupancyGrid

    grid = OccupancyGrid(radius=1.0, cells=8, threshold=1e-3)
    generator = torch.Generator().manual_seed(0)
    corner = torch.tensor([0.9, 0.9, 0.9])
    filled = lambda points: 10.0 * ((points - corner).norm(dim=-1) < 0.3).float()  # noqa: E731
    empty = lambda points: torch.zeros(len(points))  # noqa: E731
    grid.update(filled, 0.5, generator)
    assert grid.contains(corner) and not grid.contains(-corner)
    for _ in range(3):
        grid.update(empty, 0.5, generator)
    assert grid.contains(corner)  # decayed, not yet below the threshold
    for _ in range(20):
        grid.update(empty, 0.5, generator)
    assert not grid.contains(corner)
    grid.update(filled, 0.5, generator)
    assert grid.contains(corner)


def test_cells_no_camera_sees_count_as_empty():
    """A camera at z = 1 looking down -z with a 0.4 m half-width at the origin: the cells around the origin
    are seen, those far off its axis near the camera are not, and their density no longer occupies them."""
    from avatar_pipeline.avatars.volume import OccupancyGrid

    grid = OccupancyGrid(radius=1.0, cells=8, threshold=1e-3)
    camera = torch.eye(4)
    camera[2, 3] = 1.0
    share = grid.restrict_to_views(camera[None], focal=20.0, size=16)
    assert 0.05 < share < 0.7
    off_axis = torch.tensor([0.875, 0.875, 0.625])  # 0.375 m in front of the camera, 1.2 m off its axis
    assert grid.contains(torch.zeros(3))
    grid.build(lambda points: torch.full((len(points),), 10.0))  # dense everywhere
    assert grid.contains(torch.zeros(3)) and grid.contains(torch.tensor([0.3, -0.3, -0.9]))
    assert not grid.contains(off_axis)
    # a camera that sees the corner takes it back
    corner_camera = torch.eye(4)
    corner_camera[:3, 3] = torch.tensor([0.875, 0.875, 1.5])
    grid.restrict_to_views(torch.stack([camera, corner_camera]), focal=20.0, size=16)
    assert grid.contains(off_axis)


def test_rays_stop_being_traced_once_their_light_is_spent():
    """Early ray termination: a ray that meets an opaque wall is not computed behind it, an empty ray is
    computed to its end, and both composite within the stop level of the full computation."""
    from avatar_pipeline.avatars.volume import march

    depths = torch.linspace(0.0, 1.0, 16).expand(3, 16).contiguous()
    density = torch.zeros(3, 16)
    density[0, 2] = 1e4  # a wall in the first segment
    density[1, 9] = 20.0  # a thin fog in the third: about 70% of the light left, so the ray goes on
    rgb = torch.rand(3, 16, 3)
    computed = torch.zeros(3, 16, dtype=torch.bool)

    def evaluate(rays, span):
        computed[rays, span] = True
        return density[rays, span], rgb[rays, span]

    marched_density, marched_rgb = march(evaluate, depths, stop_below=1e-4, segments=4)
    assert computed[0, :4].all() and not computed[0, 4:].any()
    assert computed[1:].all()
    background = torch.rand(3, 3)
    full, _, full_alpha = composite(density, rgb, depths, background)
    marched, _, marched_alpha = composite(marched_density, marched_rgb, depths, background)
    assert (marched - full).abs().max() < 1e-4 and (marched_alpha - full_alpha).abs().max() < 1e-4


class _SolidBall(torch.nn.Module):
    """A field with a known answer: a dense ball of radius 0.2 around the origin, coloured by position."""

    def forward(self, points, directions, condition, keep=None):
        density = 60.0 * (points.norm(dim=-1) < 0.2).float()
        rgb = (0.5 + points).clamp(0, 1)
        if keep is not None:
            density, rgb = density * keep, rgb * keep[..., None]
        return density, rgb


def test_early_termination_leaves_the_render_unchanged_and_stops_the_rays_that_meet_a_solid():
    """The coarse and fine passes both stop a ray once less than the stop level of its light is left: rays
    through a solid ball compute fewer samples, rays past it all of theirs, and no pixel moves by more than
    a few stop levels (the coarse weights dropped behind the ball move the importance samples a little)."""
    from avatar_pipeline.avatars.nerface.field import NeRFaceRenderer
    from avatar_pipeline.avatars.volume import SKIP_EMPTY

    _, rays = _frame_rays(16, torch.full((3,), 0.3))
    renderer = NeRFaceRenderer(coarse_samples=32, fine_samples=32)
    renderer.coarse = renderer.fine = _SolidBall()
    computed = []
    field = renderer._field

    def counting(net, points, *args):
        computed.append(points.shape[0] * points.shape[1])
        return field(net, points, *args)

    renderer._field = counting
    with torch.no_grad():
        full = renderer(**rays, jitter=False, skip_empty=SKIP_EMPTY)
        full_samples = sum(computed)
        computed.clear()
        stopped = renderer(**rays, jitter=False, skip_empty=SKIP_EMPTY, stop_below=SKIP_EMPTY)
    hit = full["fine_alpha"] > 0.999
    assert hit.sum() > 20 and (full["fine_alpha"] < 1e-4).sum() > 20  # some rays meet the ball, some miss it
    assert sum(computed) < 0.9 * full_samples
    assert (stopped["fine"] - full["fine"]).abs().max() < 5 * SKIP_EMPTY
    assert (stopped["fine_alpha"] - full["fine_alpha"]).abs().max() < 5 * SKIP_EMPTY


def test_feature_planes_read_each_projection_of_a_point_and_feed_the_backbone():
    planes = FeaturePlanes((4, 8), channels=2)
    assert planes.dim == 3 * 2 * 2
    with torch.no_grad():
        for p in planes.planes:
            p.zero_()
        coarse = planes.planes[0]  # (3 planes xy/xz/yz, channels, rows, columns); corners at -1 and 1
        coarse[0, :, 0, 3] = torch.tensor([1.0, 2.0])  # xy plane: row y = -1, column x = 1
        coarse[1, :, 3, 3] = torch.tensor([3.0, 4.0])  # xz plane: row z = 1, column x = 1
        coarse[2, :, 3, 0] = torch.tensor([5.0, 6.0])  # yz plane: row z = 1, column y = -1
    got = planes(torch.tensor([[1.0, -1.0, 1.0], [5.0, -5.0, 5.0]]))
    # per plane (xy, xz, yz) its reads at every resolution; the second point lies outside the planes and reads
    # their border, the same texels
    assert torch.allclose(got, torch.tensor([1.0, 2, 0, 0, 3, 4, 0, 0, 5, 6, 0, 0]).expand(2, -1))
    # halfway between two texels the read is their mean
    assert torch.allclose(planes(torch.tensor([[1.0, -2.0 / 3, 1.0]]))[0, :2], torch.tensor([0.5, 1.0]))

    field = ConditionedField(FieldConfig(width=16, depth=2, colour_width=8, colour_depth=1, plane_resolutions=(4, 8)))
    assert field.position_in.in_features == 63 + 3 * 8 * 2  # 8 channels by default
    density, rgb = field(
        torch.rand(3, 5, 3) * 2 - 1, torch.nn.functional.normalize(torch.randn(3, 3), dim=-1), torch.randn(85)
    )
    (density.sum() + rgb.sum()).backward()
    # every resolution is learned: the rendered colour and density reach every plane
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in field.planes.planes)


def _counting(image: torch.Tensor):
    """trace_pixels over a known (size, size, C) image, and the list of the pixel batches it was asked for."""
    asked = []

    def trace_pixels(pixels):
        asked.append(pixels)
        return image[pixels[:, 1], pixels[:, 0]]

    return trace_pixels, asked


def test_adaptive_sampling_traces_the_edges_and_interpolates_the_smooth_parts():
    """A gradient with a sharp disc on it: the gradient is filled by interpolation (exact for a linear ramp),
    the disc's edge is traced, each pixel at most once, and far fewer pixels are traced than the image has."""
    from avatar_pipeline.avatars.volume import adaptive_pixels

    size = 45
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    disc = (((xs - 20) ** 2 + (ys - 23) ** 2) < 81).float()
    image = torch.stack([xs / size, 0.3 * ys / size, disc], -1)
    trace_pixels, asked = _counting(image)
    filled, source, traced = adaptive_pixels(trace_pixels, size, block=8, tolerance=0.05)
    pixels = torch.cat(asked)
    assert len(torch.unique(pixels[:, 1] * size + pixels[:, 0])) == len(pixels) == traced  # none traced twice
    assert traced < 0.35 * size * size
    assert torch.allclose(filled, image, atol=1e-5)
    assert (source == -1).sum() == traced and (source[source != -1] == 0).all()
    # the disc's rim (pixels with a neighbour across the edge) is all traced
    rim = (disc != torch.roll(disc, 1, 0)) | (disc != torch.roll(disc, 1, 1))
    assert (source[rim] == -1).all()
    # a tolerance below every step the image takes traces every pixel but the ramp's own interpolable ones
    exact, _, _ = adaptive_pixels(_counting(image)[0], size, block=8, tolerance=0.0)
    assert torch.allclose(exact, image, atol=1e-5)


def test_a_pixel_traced_inside_a_block_is_handed_its_corners_guides_interpolated():
    """Guided adaptive sampling: each traced pixel's guide is its own (x, y), so a hint, the bilinear
    interpolation of the guides of its block's corners, must be exactly the pixel's (x, y); the first lattice
    is handed none; the image is the unguided one."""
    from avatar_pipeline.avatars.volume import adaptive_pixels

    size = 45
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    disc = (((xs - 20) ** 2 + (ys - 23) ** 2) < 81).float()
    image = torch.stack([xs / size, 0.3 * ys / size, disc], -1)
    hinted = []

    def trace_pixels(pixels, hint):
        hinted.append((pixels, hint))
        return image[pixels[:, 1], pixels[:, 0]], pixels.float()

    filled, _, traced = adaptive_pixels(trace_pixels, size, block=8, tolerance=0.05, guided=True)
    first, *later = hinted
    assert first[1] is None and len(later) > 1
    assert sum(len(p) for p, _ in hinted) == traced
    for pixels, hint in later:
        assert torch.allclose(hint, pixels.float(), atol=1e-4)
    unguided, _, _ = adaptive_pixels(lambda p: image[p[:, 1], p[:, 0]], size, block=8, tolerance=0.05)
    assert torch.equal(filled, unguided)


def test_adaptive_image_reads_fog_of_the_background_colour_from_its_difference_to_the_background():
    """Thin fog of the background's own colour over a textured background: its premultiplied colour carries the
    texture, its difference from the background is nothing, so the image is interpolated from a few traced
    pixels and still equals the dense composite; an opaque head over the same texture is read premultiplied."""
    from avatar_pipeline.avatars.volume import adaptive_image

    torch.manual_seed(0)
    size = 41
    background = torch.rand(size, size, 3)
    fog = torch.cat([0.2 * background, torch.full((size, size, 1), 0.2)], -1)
    trace_pixels, asked = _counting(fog)
    image, alpha = adaptive_image(trace_pixels, background, block=8, tolerance=1 / 255)
    assert sum(len(p) for p in asked) < 0.1 * size * size
    assert torch.allclose(image, background, atol=1e-5) and torch.allclose(alpha, torch.full_like(alpha, 0.2))
    ys, xs = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    head = torch.cat(
        [torch.stack([xs / size, ys / size, 0.5 * torch.ones_like(xs)], -1), torch.ones(size, size, 1)], -1
    )
    trace_pixels, asked = _counting(head)
    image, alpha = adaptive_image(trace_pixels, background, block=8, tolerance=1 / 255)
    assert sum(len(p) for p in asked) < 0.2 * size * size
    assert torch.allclose(image, head[..., :3], atol=1e-5) and torch.allclose(alpha, torch.ones_like(alpha))
