"""The Gaussian-splatting avatar's own parts: the rasterizer, both its compiled CPU walk and its tensor path
(gradients against finite differences, occlusion of one disc by another, agreement with a pixel-by-pixel
reference, with each other and, where CUDA is, with gsplat), the spherical harmonics, the placement of the
Gaussians through the UV map and of the body's in the camera's space, the PLY export and the slider page in
a real browser. Training, a kill and resume, and evaluation are the contract test's."""

import dataclasses
import functools
import http.server
import importlib.util
import threading

import numpy as np
import pytest
import torch

from avatar_pipeline.avatars import avatar_method, trainer
from avatar_pipeline.avatars.data import SubjectFrames
from avatar_pipeline.avatars.gaussians import rasterizer
from avatar_pipeline.avatars.gaussians.body import matrix_to_quaternion
from avatar_pipeline.avatars.gaussians.export import read_ply, slider_page, write_ply
from avatar_pipeline.avatars.gaussians.model import _pick_rasterizer, sh_basis, uv_raster
from avatar_pipeline.avatars.gaussians.rasterizer import Splats, rasterize
from avatar_pipeline.avatars.nha.mesh import build_head_mesh
from avatar_pipeline.errors import InputError
from avatar_pipeline.geometry import axis_angle_to_matrix

PATHS = pytest.mark.parametrize("compiled", [True, False], ids=["numba", "torch"])
EYE = torch.eye(3, dtype=torch.float64)
ORIGIN = torch.zeros(3, dtype=torch.float64)


def _random_splats(count: int, seed: int, spread: float = 0.06) -> Splats:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(count, 3, generator=g, dtype=torch.float64) * spread
    means[:, 2] += 1.0
    return Splats(
        means,
        torch.randn(count, 4, generator=g, dtype=torch.float64),
        torch.rand(count, 3, generator=g, dtype=torch.float64) * 0.03 + 0.01,
        torch.rand(count, generator=g, dtype=torch.float64) * 0.6 + 0.3,
        torch.rand(count, 3, generator=g, dtype=torch.float64),
    )


@PATHS
def test_rasterizer_gradients_match_finite_differences(compiled):
    splats = _random_splats(5, seed=0)
    background = torch.full((16, 16, 3), 0.2, dtype=torch.float64)

    def image(means, quats, scales, opacities, colours):
        splats = Splats(means, quats, scales, opacities, colours)
        colour, alpha, _ = rasterize(splats, EYE, ORIGIN, 20.0, 16, background, compiled)
        return colour, alpha

    inputs = [
        t.clone().requires_grad_()
        for t in (splats.means, splats.quats, splats.scales, splats.opacities, splats.colours)
    ]
    assert torch.autograd.gradcheck(image, inputs, eps=1e-6, atol=1e-5, rtol=1e-3)


def _disc(x: float, y: float, depth: float, radius: float, colour, opacity: float = 0.99) -> Splats:
    """A flat Gaussian facing the camera (thin along z) at (x, y, depth)."""
    return Splats(
        torch.tensor([[x, y, depth]], dtype=torch.float64),
        torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64),
        torch.tensor([[radius, radius, 1e-4]], dtype=torch.float64),
        torch.tensor([opacity], dtype=torch.float64),
        torch.tensor([colour], dtype=torch.float64),
    )


@PATHS
def test_an_opaque_disc_hides_the_one_behind_it_whatever_their_order(compiled):
    size = focal = 48
    # a small red disc at depth 1 centred on pixel (19, 23), a wider blue one at depth 2 on pixel (30, 23)
    red = _disc((19.5 - 24) / focal, -0.5 / focal, 1.0, 0.06, [1.0, 0.0, 0.0])
    blue = _disc((30.5 - 24) / focal * 2, -0.5 / focal * 2, 2.0, 0.15, [0.0, 0.0, 1.0])
    background = torch.zeros(size, size, 3, dtype=torch.float64)
    one, alpha, _ = rasterize(rasterizer.joined(red, blue), EYE, ORIGIN, focal, size, background, compiled)
    other, _, _ = rasterize(rasterizer.joined(blue, red), EYE, ORIGIN, focal, size, background, compiled)
    assert torch.allclose(one, other)  # depth order, not list order
    assert one[23, 19, 0] > 0.98 and one[23, 19, 2] < 1e-3  # the red disc's centre: 0.99 red, blue hidden
    assert one[23, 30, 2] > 0.97 and one[23, 30, 0] == 0  # beyond the red disc's reach: blue alone
    assert alpha[0, 0] == 0 and alpha[23, 19] > 0.99

    # where both reach, red over blue: red's alpha, then blue's times the light red leaves
    def disc_alpha(centre_px: float, sigma_px: float, x: int) -> float:
        return 0.99 * np.exp(-0.5 * (x + 0.5 - centre_px) ** 2 / (sigma_px**2 + rasterizer.BLUR))

    a_red, a_blue = disc_alpha(19.5, 0.06 * focal, 24), disc_alpha(30.5, 0.15 * focal / 2, 24)
    assert abs(one[23, 24, 0] - a_red) < 1e-6 and abs(one[23, 24, 2] - (1 - a_red) * a_blue) < 1e-6


def _reference_image(splats: Splats, focal: float, size: int) -> torch.Tensor:
    """Pixel by pixel, Gaussian by Gaussian in depth order, as 3DGS's CUDA kernel composites."""
    centres, covariance, depth = rasterizer.project(splats, EYE, ORIGIN, focal, size)
    conics = rasterizer.conic(covariance)
    order = torch.argsort(depth).tolist()
    image = torch.zeros(size, size, 3, dtype=torch.float64)
    for y in range(size):
        for x in range(size):
            light = 1.0
            for g in order:
                dx, dy = x + 0.5 - centres[g, 0], y + 0.5 - centres[g, 1]
                q = conics[g, 0] * dx * dx + 2 * conics[g, 1] * dx * dy + conics[g, 2] * dy * dy
                alpha = min(rasterizer.ALPHA_MAX, float(splats.opacities[g] * torch.exp(-0.5 * q)))
                if alpha < rasterizer.ALPHA_MIN:
                    continue
                if light * (1 - alpha) < rasterizer.TRANSMITTANCE_MIN:
                    break
                image[y, x] += light * alpha * splats.colours[g]
                light *= 1 - alpha
    return image


@PATHS
def test_rasterizer_agrees_with_a_pixel_by_pixel_reference(compiled):
    splats = _random_splats(40, seed=3)
    splats.opacities[:10] = 0.99  # some opaque ones, so that pixels stop early
    image, _, pairs = rasterize(splats, EYE, ORIGIN, 24.0, 20, compiled=compiled)
    assert pairs > 400
    assert torch.allclose(image, _reference_image(splats, 24.0, 20), atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_and_tensor_rasterizers_agree_in_image_and_gradients(dtype):
    """300 overlapping Gaussians at 64 px, a third of them opaque enough for the alpha cap and the early stop;
    a loss on both the image over a background and the alpha."""
    splats = _random_splats(300, seed=7)
    splats.opacities[:100] = 1.0
    size, focal = 64, 60.0
    background = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(1), dtype=dtype)
    weights = torch.rand(size, size, 3, generator=torch.Generator().manual_seed(2), dtype=dtype)
    results = []
    for compiled in (True, False):
        leaves = [
            getattr(splats, f).to(dtype).clone().requires_grad_()
            for f in ("means", "quats", "scales", "opacities", "colours")
        ]
        image, alpha, pairs = rasterize(
            Splats(*leaves), EYE.to(dtype), ORIGIN.to(dtype), focal, size, background, compiled
        )
        ((image * weights).sum() + (alpha**2).sum()).backward()
        results.append((image.detach(), alpha.detach(), pairs, [leaf.grad for leaf in leaves]))
    (image, alpha, pairs, grads), (image_t, alpha_t, pairs_t, grads_t) = results
    tolerance = 1e-10 if dtype == torch.float64 else 2e-5
    assert pairs == pairs_t and pairs > 10000
    assert (image - image_t).abs().max() < tolerance and (alpha - alpha_t).abs().max() < tolerance
    for grad, grad_t in zip(grads, grads_t):
        assert grad.abs().max() > 0
        assert (grad - grad_t).abs().max() < tolerance * 10 * grad_t.abs().max()


def test_the_rasterizer_choice_follows_the_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _pick_rasterizer("auto", cpu) == "numba" and _pick_rasterizer("torch", cpu) == "torch"
    has_gsplat = importlib.util.find_spec("gsplat") is not None
    assert _pick_rasterizer("auto", cuda) == ("gsplat" if has_gsplat else "torch")
    with pytest.raises(InputError, match="rasterizer: numba"):
        _pick_rasterizer("numba", cuda)
    with pytest.raises(InputError, match="rasterizer: gsplat"):
        _pick_rasterizer("gsplat", cpu)


def test_gsplat_renders_the_same_image():
    if not torch.cuda.is_available():
        pytest.skip("gsplat's rasterizer needs CUDA, which this machine does not have")
    pytest.importorskip(
        "gsplat", reason="gsplat is not installed (it is optional: pip install gsplat on a CUDA machine)"
    )
    splats = _random_splats(200, seed=5)
    cuda = Splats(*(getattr(splats, f).float().cuda() for f in ("means", "quats", "scales", "opacities", "colours")))
    ours, _, _ = rasterize(cuda, EYE.float().cuda(), ORIGIN.float().cuda(), 60.0, 64)
    theirs, _, _ = rasterizer.gsplat_rasterize(cuda, EYE.float().cuda(), ORIGIN.float().cuda(), 60.0, 64)
    assert (ours - theirs).abs().max() < 2e-3


def test_spherical_harmonics_are_orthonormal_over_the_sphere():
    # a Fibonacci lattice: near-uniform directions, so the mean of Y_i Y_j times 4 pi is their integral
    n = 40000
    k = torch.arange(n, dtype=torch.float64) + 0.5
    z = 1 - 2 * k / n
    phi = k * np.pi * (3 - np.sqrt(5))
    r = torch.sqrt(1 - z * z)
    directions = torch.stack([r * torch.cos(phi), r * torch.sin(phi), z], -1)
    basis = sh_basis(directions, 3)
    assert basis.shape == (n, 16)
    gram = basis.T @ basis * (4 * np.pi / n)
    assert torch.allclose(gram, torch.eye(16, dtype=torch.float64), atol=2e-3)


@pytest.fixture(scope="module")
def tiny_avatar(lp_d18_ict):
    settings = {"method": "gaussians", "size": 64, "gaussians": 3000, "network_width": 16, "network_depth": 2}
    spec, cfg = avatar_method(settings)
    train = SubjectFrames(lp_d18_ict, cfg.size, "train", **spec.model_class().training_data(cfg))
    model = trainer.build_model(spec, cfg, train, torch.device("cpu"))
    phase, rng = model.phases()[0], np.random.default_rng(0)
    for _ in range(5):
        terms, _ = model.training_step(phase, rng)
        phase.optimizer.zero_grad()
        sum(terms.values()).backward()
        phase.optimizer.step()
    return model


def test_gaussians_cover_every_chart_and_both_eyes(lp_d18_ict):
    model = lp_d18_ict.tracked_model()
    mesh = build_head_mesh(model, 0)
    triangles, bary = uv_raster(mesh, 12000)
    assert 9000 < len(triangles) < 15000
    assert np.allclose(bary.sum(1), 1) and (bary >= 0).all()
    assert set(np.unique(mesh.face_charts[triangles])) == set(np.unique(mesh.face_charts))
    points = (mesh.template[mesh.faces[triangles]] * bary[..., None]).sum(1)
    eyes = points[mesh.face_charts[triangles] == 2]  # the eye chart (models/base.py UV_CHARTS)
    centre = mesh.template[:, 0].mean()
    assert (eyes[:, 0] < centre).sum() > 20 and (eyes[:, 0] > centre).sum() > 20  # both eyeballs, not one


def test_the_ply_holds_the_gaussians_in_the_splatting_layout(tiny_avatar, tmp_path):
    view = tiny_avatar.view(tiny_avatar.train_frames, 0)
    path = write_ply(tiny_avatar, view, tmp_path / "frame.ply")
    columns = read_ply(path)
    names = list(columns)
    assert names[:9] == ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    assert names[-8:] == ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert sum(n.startswith("f_rest_") for n in names) == 45  # degree 3: 15 coefficients per channel
    splats, _, _ = tiny_avatar.splats(view, body=False)  # the PLY holds the head's Gaussians
    assert np.allclose(columns["x"], splats.means[:, 0].detach().numpy(), atol=1e-6)
    opacity = 1 / (1 + np.exp(-columns["opacity"]))
    assert np.allclose(opacity, splats.opacities.detach().numpy(), atol=1e-5)
    assert np.allclose(np.exp(columns["scale_1"]), splats.scales[:, 1].detach().numpy(), rtol=1e-5)
    assert np.allclose(np.stack([columns[f"rot_{i}"] for i in range(4)], 1).__pow__(2).sum(1), 1, atol=1e-5)
    # the constant harmonic's three channels, then the higher ones channel by channel
    sh = torch.cat([tiny_avatar.sh_constant, tiny_avatar.sh_higher], 1).detach().numpy()
    assert np.allclose(columns["f_dc_1"], sh[:, 0, 1]) and np.allclose(columns["f_rest_15"], sh[:, 1, 1])


def test_the_slider_page_changes_the_render_in_a_browser(tiny_avatar, browser, tmp_path):
    view = tiny_avatar.view(tiny_avatar.train_frames, 0)
    out = slider_page(tiny_avatar, view, tmp_path / "sliders")
    assert len(out["expressions"]) == tiny_avatar.cfg.slider_expressions
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "sliders"))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{server.server_address[1]}/index.html", wait_until="networkidle")
        before = page.eval_on_selector("#render", "e => [e.src, e.complete && e.naturalWidth > 0]")
        assert before[1], before
        slider = page.locator("input[data-slider='0']")
        slider.fill(str(tiny_avatar.cfg.slider_steps - 1))  # drag the first expression to its maximum
        page.wait_for_function("() => document.querySelector('#render').complete")
        after = page.eval_on_selector("#render", "e => [e.src, e.complete && e.naturalWidth > 0]")
        assert after[1] and after[0] != before[0], (before, after)
        assert after[0].endswith(f"{out['expressions'][0]}_{tiny_avatar.cfg.slider_steps - 1}.jpg")
        page.close()
    finally:
        server.shutdown()
    # and the renders differ: the expression moves the avatar
    images = sorted((tmp_path / "sliders").glob(f"{out['expressions'][0]}_*.jpg"))
    first, last = (np.frombuffer(p.read_bytes(), np.uint8) for p in (images[0], images[-1]))
    assert not np.array_equal(first, last)


def test_matrix_to_quaternion_inverts_quaternion_to_matrix():
    torch.manual_seed(0)
    axes = torch.nn.functional.normalize(torch.randn(64, 3), dim=1)
    angles = torch.cat([torch.rand(60) * 3.14, torch.tensor([3.1415, 3.14159, 1e-6, 0.0])])
    for matrix in axis_angle_to_matrix(axes * angles[:, None]).double():
        quat = matrix_to_quaternion(matrix)
        assert torch.allclose(rasterizer.quaternion_to_matrix(quat), matrix, atol=1e-6), (matrix, quat)


def test_body_gaussians_stay_where_the_camera_saw_them_and_explain_the_shoulders(lp_d18_ict, tmp_path):
    settings = {"method": "gaussians", "size": 64, "gaussians": 3000, "network_width": 16, "network_depth": 2}
    spec, cfg = avatar_method({**settings, "body_gaussians": 400})
    train = SubjectFrames(lp_d18_ict, cfg.size, "train", **spec.model_class().training_data(cfg))
    torch.manual_seed(0)
    model = trainer.build_model(spec, cfg, train, torch.device("cpu"))
    body = model.body
    assert 200 < len(body.position) < 800
    terms, _ = model.training_step(model.phases()[0], np.random.default_rng(0))  # gradients reach the body
    sum(terms.values()).backward()
    for parameter in (body.position, body.colour_logit, body.opacity_logit, body.log_scale, body.rotation):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
    with torch.no_grad():
        body.log_scale[:] = torch.tensor([0.02, 0.002, 0.002]).log()  # long along the camera's x
    placed = body.position[:, :2] * train.focal / body.position[:, 2:] + cfg.size / 2  # pixels, camera space
    roll = torch.eye(4)
    roll[:3, :3] = axis_angle_to_matrix(torch.tensor([[0.0, 0.0, 0.6]]))[0]
    views = [model.view(train, 0), model.view(train, len(train.frames) - 1)]  # two head poses
    views.append(dataclasses.replace(views[0], camera_to_head=views[0].camera_to_head @ roll))  # a rolled camera
    for view in views:  # the body stays where the camera saw it, its shape too
        with torch.no_grad():
            splats, rotation, translation = model.splats(view)
            centres, covariance, _ = rasterizer.project(splats, rotation, translation, train.focal, cfg.size)
        heads = len(model.bary)
        assert torch.allclose(centres[heads:], placed, atol=1e-3)
        spread = covariance[heads:] - rasterizer.BLUR * torch.eye(2)
        assert (spread[:, 0, 0] > 50 * spread[:, 1, 1]).all()  # still long along the image's x
        assert (spread[:, 0, 1].abs() < 0.02 * spread[:, 0, 0]).all()
    # the pixels the body starts on are the person's
    _, person = train.read_person(0)
    assert person[placed[:, 1].long().clamp(0, 63), placed[:, 0].long().clamp(0, 63)].mean() > 0.8
    # over the person pixels that the head alone leaves to the plate, the body brings the render closer
    view = model.view(train, 0)
    image, person = train.read_person(0)
    with torch.no_grad():
        with_body, _, _ = model.draw(view)
        body_module, model.body = model.body, None
        head_only, head_alpha, _ = model.draw(view)
        model.body = body_module
    region = torch.as_tensor(person) & (head_alpha < 0.05)
    assert region.sum() > 50
    errors = [float(((render - image) ** 2).mean(-1)[region].mean()) for render in (with_body, head_only)]
    assert errors[0] < 0.5 * errors[1], errors
    assert len(read_ply(write_ply(model, view, tmp_path / "head.ply"))["x"]) == len(model.bary)  # the head's only
