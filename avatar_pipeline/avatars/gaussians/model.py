"""A FlashAvatar-style Gaussian-splatting head avatar on the avatar core, trained and rendered on a CPU.

A fixed set of Gaussians sits on the subject's tracked morphable mesh: one per texel of a regular raster of
each UV chart, bound to its triangle by barycentric coordinates, so the Gaussians follow the tracked
expression (the head pose is the camera, as in the other methods). One offset network takes each Gaussian's
encoded canonical position and the frame's conditions (expression coefficients, and joint rotations where
the model has them) and returns offsets of its position, rotation and scale. Colour (spherical harmonics),
opacity, scale and rotation are learned per Gaussian; no densification. The image is splatted over the
background plate (rasterizer.py) and compared with the frame where the parsing sees the head and with the
plate elsewhere, so the avatar is the head alone. With `body_gaussians`, more Gaussians held in the still
camera's space take the rest of the person (body.py) and the frame is the target wherever the person is.

Test frames (protocol `tracked`): the tracked expression and camera as they are, as FlashAvatar does.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from ... import cache, raster
from ...errors import InputError
from ...geometry import head_to_camera_cv, project
from ...metrics import Lpips
from ...tracking import joint_pose
from ..base import AvatarModel, Phase, View
from ..data import SubjectFrames, psnr, textured_head_model
from ..layers import positional_encoding
from ..nha.mesh import build_head_mesh
from .body import HEAD_MARGIN, SPREAD_FRAMES, BodyGaussians, free_person_pixels, grid_over
from .config import GaussianConfig
from .rasterizer import Splats, gsplat_rasterize, joined, quaternion_product, rasterize

log = logging.getLogger(__name__)

MOUTH_CLASSES = ("mouth", "u_lip", "l_lip")  # where the mouth weight applies
# real spherical harmonics up to degree 3, in the order and signs of 3D Gaussian splatting (so PLYs read
# by splat viewers show the same colours)
SH_C0 = 0.28209479177387814
SH_C1 = 0.4886025119029199
SH_C2 = (1.0925484305920792, -1.0925484305920792, 0.31539156525252005, -1.0925484305920792, 0.5462742152960396)
SH_C3 = (
    -0.5900435899266435,
    2.890611442640554,
    -0.4570457994644658,
    0.3731763325901154,
    -0.4570457994644658,
    1.445305721320277,
    -0.5900435899266435,
)


def sh_basis(directions: torch.Tensor, degree: int) -> torch.Tensor:
    """(N, (degree + 1)²) real SH basis values of unit directions (N, 3)."""
    x, y, z = directions.unbind(-1)
    out = [torch.full_like(x, SH_C0)]
    if degree >= 1:
        out += [-SH_C1 * y, SH_C1 * z, -SH_C1 * x]
    if degree >= 2:
        xx, yy, zz = x * x, y * y, z * z
        out += [
            SH_C2[0] * x * y,
            SH_C2[1] * y * z,
            SH_C2[2] * (2 * zz - xx - yy),
            SH_C2[3] * x * z,
            SH_C2[4] * (xx - yy),
        ]
    if degree >= 3:
        out += [
            SH_C3[0] * y * (3 * xx - yy),
            SH_C3[1] * x * y * z,
            SH_C3[2] * y * (4 * zz - xx - yy),
            SH_C3[3] * z * (2 * zz - 3 * xx - 3 * yy),
            SH_C3[4] * x * (4 * zz - xx - yy),
            SH_C3[5] * z * (xx - yy),
            SH_C3[6] * x * (xx - 3 * yy),
        ]
    return torch.stack(out, -1)


def uv_raster(mesh, count: int) -> tuple[np.ndarray, np.ndarray]:
    """About `count` surface points of a HeadMesh on a regular raster of each UV chart, spaced alike over the
    surface: the triangle (N,) and barycentric coordinates (N, 3) of every texel centre inside a triangle.
    Each triangle takes its own texels, so triangles that share UV space (the two eyeballs, mirrored teeth)
    all get theirs."""
    corners = mesh.template[mesh.faces]
    area_3d = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    uv = mesh.corner_uvs.astype(np.float64)
    e1, e2 = uv[:, 1] - uv[:, 0], uv[:, 2] - uv[:, 0]
    area_uv = 0.5 * np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])
    triangles, weights = [], []
    for chart in np.unique(mesh.face_charts):
        faces = np.flatnonzero(mesh.face_charts == chart)
        wanted = count * area_3d[faces].sum() / area_3d.sum()
        resolution = max(2, int(round(np.sqrt(wanted / max(area_uv[faces].sum(), 1e-12)))))
        xy = uv[faces] * resolution  # texel (i, j) has its centre at (i + 0.5, j + 0.5)
        x0 = np.ceil(xy[..., 0].min(1) - 0.5).astype(np.int64)
        x1 = np.floor(xy[..., 0].max(1) - 0.5).astype(np.int64)
        y0 = np.ceil(xy[..., 1].min(1) - 0.5).astype(np.int64)
        y1 = np.floor(xy[..., 1].max(1) - 0.5).astype(np.int64)
        width, height = np.maximum(x1 - x0 + 1, 0), np.maximum(y1 - y0 + 1, 0)
        counts = width * height
        owner = np.repeat(np.arange(len(faces)), counts)
        local = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
        cx = x0[owner] + local % width[owner] + 0.5
        cy = y0[owner] + local // width[owner] + 0.5
        maps = raster.barycentric_maps(xy.reshape(-1, 2), np.arange(3 * len(faces)).reshape(-1, 3))[owner]
        bary = np.einsum("nij,nj->ni", maps, np.stack([cx, cy, np.ones_like(cx)], 1))
        inside = (bary >= 0).all(1)
        triangles.append(faces[owner[inside]])
        weights.append(bary[inside] / bary[inside].sum(1, keepdims=True))
    return np.concatenate(triangles), np.concatenate(weights).astype(np.float32)


class OffsetNetwork(torch.nn.Module):
    """Encoded canonical position and frame conditions -> 10 tanh-bounded outputs: position (3), rotation
    (4, as a quaternion delta) and scale (3) offsets; the last layer starts at zero (no offset)."""

    def __init__(self, inputs: int, width: int, depth: int):
        super().__init__()
        layers, size = [], inputs
        for _ in range(depth):
            layers += [torch.nn.Linear(size, width), torch.nn.ReLU()]
            size = width
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(size, 10)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, encoded: torch.Tensor, conditions: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat([encoded, conditions.expand(len(encoded), -1)], -1)
        return torch.tanh(self.head(self.body(inputs)))


class GaussianAvatarModel(AvatarModel):
    loss_terms = ("rgb", "mouth", "perceptual")
    protocols = ("tracked",)

    def __init__(self, cfg: GaussianConfig, train: SubjectFrames, device: torch.device):
        super().__init__()
        self.cfg, self.train_frames, self.device = cfg, train, device
        model = textured_head_model(
            train,
            cfg.head_model,
            "the Gaussians are placed through the UV map: track with model.kind: ict (the default), FLAME with "
            "model.flame_uvs, or the built-in model",
        )
        self.head_model = model
        self.mesh = build_head_mesh(model, 0)  # the lower neck dropped, as for NHA
        triangles, bary = uv_raster(self.mesh, cfg.gaussians)
        self.register_buffer("corners", torch.as_tensor(self.mesh.faces[triangles]), persistent=False)
        self.register_buffer("bary", torch.as_tensor(bary), persistent=False)
        self.expression_count = int(train.tracking["expression"].shape[1])
        self.register_buffer(
            "identity", torch.as_tensor(train.tracking["identity"], dtype=torch.float32)[None], persistent=False
        )
        with torch.no_grad():
            canonical = self.surface_points(torch.zeros(1, len(train.conditions[0])))[0]
        low, high = canonical.min(0).values, canonical.max(0).values
        normalised = (canonical - (low + high) / 2) / ((high - low).max() / 2)
        self.register_buffer("encoded", positional_encoding(normalised, cfg.frequencies, np.pi), persistent=False)
        count = len(canonical)
        # FlashAvatar's start: colour 0.5 (zero harmonics), opacity 0.1, isotropic scale the RMS distance to
        # the three nearest neighbours, no rotation
        coefficients = (cfg.sh_degree + 1) ** 2
        self.sh_constant = torch.nn.Parameter(torch.zeros(count, 1, 3))
        self.sh_higher = torch.nn.Parameter(torch.zeros(count, coefficients - 1, 3))
        p = cfg.initial_opacity
        self.opacity_logit = torch.nn.Parameter(torch.full((count,), float(np.log(p / (1 - p)))))
        start = _neighbour_log_scale(canonical.numpy()) + float(np.log(cfg.initial_scale))
        self.log_scale = torch.nn.Parameter(start[:, None].repeat(1, 3))
        self.rotation = torch.nn.Parameter(torch.tensor([1.0, 0.0, 0.0, 0.0]).repeat(count, 1))
        self.network = OffsetNetwork(
            self.encoded.shape[1] + train.conditions.shape[1], cfg.network_width, cfg.network_depth
        )
        self.body = self._place_body(train) if cfg.body_gaussians > 0 else None
        self.rasterizer = _pick_rasterizer(cfg.rasterizer, device)
        self.perceptual = None
        if cfg.w_perceptual > 0:
            lpips = Lpips(str(device))
            if lpips.available:
                self.__dict__["perceptual"] = lpips  # frozen weights, kept out of the checkpoint
            else:
                log.warning("gaussians: the perceptual term is off: %s", lpips.reason)
        self.steps_taken = 0
        self.to(device)

    # --- configuration of the core -----------------------------------------------------------
    @classmethod
    def training_data(cls, cfg: GaussianConfig) -> dict:
        return {"with_masks": True, "with_labels": True, "with_mattes": cfg.body_gaussians > 0}

    def describe(self) -> str:
        body = "" if self.body is None else f" and {len(self.body.position)} on the body"
        return (
            f"{len(self.bary)} Gaussians on the {self.head_model.name} mesh's UV map{body}, "
            f"SH degree {self.cfg.sh_degree}, "
            f"rasterized by {self.rasterizer}; perceptual term {'on' if self.perceptual else 'off'}"
        )

    def _place_body(self, train: SubjectFrames) -> BodyGaussians | None:
        """The body Gaussians over the person pixels that the head's do not cover in a spread of training
        frames (body.py); None, with a warning, when the head covers the whole person."""
        cfg = self.cfg
        spread = np.unique(np.linspace(0, len(train.frames) - 1, SPREAD_FRAMES).round().astype(np.int64))
        to_camera = head_to_camera_cv(train.camera_to_head)

        @torch.no_grad()
        def head_pixels(k: int) -> np.ndarray:
            anchors = self.surface_points(train.conditions[k][None])[0]
            return project((anchors @ to_camera[k, :3, :3].T + to_camera[k, :3, 3]).numpy(), train.focal, train.size)

        margin = max(1, round(HEAD_MARGIN * train.size / 256))
        free, colours = free_person_pixels(train, head_pixels, spread, margin)
        pixels, stride = grid_over(free, cfg.body_gaussians)
        if not len(pixels):
            log.warning("gaussians: no body Gaussians: the head's cover every pixel of the person")
            return None
        depth = float(to_camera[:, 2, 3].median()) + cfg.body_depth
        at = pixels.astype(np.int64)
        return BodyGaussians(
            pixels,
            stride,
            depth,
            train.focal,
            train.size,
            colours[at[:, 1], at[:, 0]],
            torch.stack([BodyGaussians.pose(m) for m in to_camera]).mean(0),
            lambda x: positional_encoding(x, 4, np.pi),
            cfg.max_offset,
        )

    def memory_hint(self) -> str:
        return "lower `gaussians` or `size` of this avatar in config.yaml"

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        groups = [
            {"params": [self.sh_constant], "lr": cfg.colour_lr},
            {"params": [self.sh_higher], "lr": cfg.colour_lr / 20},
            {"params": [self.opacity_logit], "lr": cfg.opacity_lr},
            {"params": [self.log_scale], "lr": cfg.scale_lr},
            {"params": [self.rotation], "lr": cfg.rotation_lr},
            {"params": list(self.network.parameters()), "lr": cfg.network_lr},
        ]
        if self.body is not None:
            body = self.body
            groups += [
                {"params": [body.position], "lr": cfg.body_position_lr},
                {"params": [body.colour_logit], "lr": cfg.colour_lr},
                {"params": [body.opacity_logit], "lr": cfg.opacity_lr},
                {"params": [body.log_scale], "lr": cfg.scale_lr},
                {"params": [body.rotation], "lr": cfg.rotation_lr},
                {"params": list(body.network.parameters()), "lr": cfg.network_lr},
            ]
        optimizer = torch.optim.Adam(groups, eps=1e-15)
        return [Phase("joint", cfg.steps, optimizer, cfg.final_lr_ratio)]

    def extra_state(self) -> dict:
        return {"steps_taken": self.steps_taken}

    def load_extra_state(self, state: dict) -> None:
        self.steps_taken = int(state.get("steps_taken", 0))

    # --- the Gaussians of one frame ----------------------------------------------------------
    def surface_points(self, conditions: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) the Gaussians' anchors on the tracked mesh (model space) under conditions (B, C)."""
        expression = conditions[:, : self.expression_count]
        joints = conditions[:, self.expression_count :].reshape(len(conditions), -1, 3)
        joints = joint_pose(joints) if joints.shape[1] else None
        identity = self.identity.expand(len(conditions), -1)
        vertices = self.head_model.vertices(identity, expression, joints)
        return (vertices[:, self.corners] * self.bary[None, :, :, None]).sum(2)

    def active_degree(self) -> int:
        return min(self.cfg.sh_degree, self.steps_taken // self.cfg.sh_every)

    def splats(self, view: View, body: bool = True) -> tuple[Splats, torch.Tensor, torch.Tensor]:
        """The view's Gaussians (the head's, then the body's unless `body` is False) and its head-to-camera
        rotation and translation (OpenCV)."""
        cfg = self.cfg
        conditions = view.conditions.to(self.device)[None]
        anchors = self.surface_points(conditions)[0]
        offsets = self.network(self.encoded, conditions)
        means = anchors + cfg.max_offset * offsets[:, :3]
        # the rotation offset as FlashAvatar forms it: (e^a, b, c, d) applied after the learned rotation
        delta = torch.cat([torch.exp(offsets[:, 3:4]), offsets[:, 4:7]], -1)
        quats = quaternion_product(self.rotation, delta)
        # scale offsets multiply the scale (added in log space; the reference multiplies the log-scale itself)
        scales = torch.exp((self.log_scale + offsets[:, 7:]).clamp(max=float(np.log(cfg.max_scale))))
        head_to_camera = head_to_camera_cv(view.camera_to_head).to(self.device)
        rotation, translation = head_to_camera[:3, :3], head_to_camera[:3, 3]
        degree = self.active_degree()
        sh = torch.cat([self.sh_constant, self.sh_higher], 1)[:, : (degree + 1) ** 2]
        directions = torch.nn.functional.normalize(means - view.camera_to_head[:3, 3].to(self.device), dim=-1)
        colours = ((sh_basis(directions, degree)[..., None] * sh).sum(1) + 0.5).clamp_min(0)
        splats = Splats(means, quats, scales, torch.sigmoid(self.opacity_logit), colours)
        if body and self.body is not None:
            splats = joined(splats, self.body.splats(head_to_camera, cfg.max_scale))
        return splats, rotation, translation

    def draw(self, view: View):
        """Image (size, size, 3) over the view's background, alpha (size, size) and the pairs composited."""
        splats, rotation, translation = self.splats(view)
        background = view.background.to(self.device)
        if self.rasterizer == "gsplat":
            return gsplat_rasterize(splats, rotation, translation, view.focal, view.size, background)
        compiled = self.rasterizer == "numba"
        return rasterize(splats, rotation, translation, view.focal, view.size, background, compiled)

    # --- training -----------------------------------------------------------------------------
    def training_step(self, phase: Phase, rng: np.random.Generator):
        cfg, data = self.cfg, self.train_frames
        k = int(rng.integers(len(data.frames)))
        view = self.view(data, k)
        image, _, _ = self.draw(view)
        head = torch.as_tensor(data.head_masks[k], device=self.device)[..., None]
        background = view.background.to(self.device)
        shown = head if self.body is None else head | (data.mattes[k].to(self.device) >= cache.PERSON_MATTE)[..., None]
        target = torch.where(shown, data.images[k].to(self.device), background)
        mouth = torch.as_tensor(
            np.isin(data.labels[k], [cache.PARSING_CLASS_ID[c] for c in MOUTH_CLASSES]), device=self.device
        )[..., None]
        huber = torch.nn.functional.huber_loss(image, target, reduction="none", delta=cfg.huber_delta)
        terms = {"rgb": huber.mean(), "mouth": cfg.w_mouth * (huber * mouth).mean()}
        if self.perceptual is not None and phase.progress >= cfg.perceptual_from:
            a, b = ((x * head).permute(2, 0, 1)[None] * 2 - 1 for x in (image, target))
            terms["perceptual"] = cfg.w_perceptual * self.perceptual.distance(a, b)
        self.steps_taken += 1
        return terms, psnr(float(((image.detach() - target) ** 2).mean()))

    # --- rendering views ----------------------------------------------------------------------
    @torch.no_grad()
    def render(self, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        image, alpha, _ = self.draw(view)
        return image.clamp(0, 1).cpu(), alpha.cpu()

    def test_views(self, protocol: str, test: SubjectFrames) -> list[View]:
        return [self.view(test, k) for k in range(len(test.frames))]

    def exports(self, folder, test: SubjectFrames, views: list[View]) -> dict:
        """The canonical Gaussians (and those of the first `ply_frames` test frames) as 3DGS PLYs, and the
        expression sliders page."""
        from .export import slider_page, write_ply

        canonical = dataclasses.replace(views[0], conditions=torch.zeros_like(views[0].conditions))
        out = {"canonical_ply": str(write_ply(self, canonical, folder / "gaussians" / "canonical.ply"))}
        frames = []
        for view in views[: self.cfg.ply_frames]:
            frames.append(str(write_ply(self, view, folder / "gaussians" / f"frame_{view.frame:05d}.ply")))
        out["frame_plys"] = frames
        if self.cfg.slider_expressions > 0 and views:
            out["sliders"] = slider_page(self, views[0], folder / "sliders")
        return {"exports": out}


def _neighbour_log_scale(points: np.ndarray) -> torch.Tensor:
    """log of the RMS distance of each point to its three nearest neighbours."""
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(points).query(points, k=4)
    rms = np.sqrt(np.maximum((distances[:, 1:] ** 2).mean(1), 1e-14))
    return torch.as_tensor(np.log(rms), dtype=torch.float32)


def _pick_rasterizer(choice: str, device: torch.device) -> str:
    """`numba` (compiled CPU loops), `torch` (tensor operations, any device) or `gsplat` (CUDA only); `auto`
    takes gsplat where it can run, else numba on a CPU and torch elsewhere."""
    if choice == "numba" and device.type != "cpu":
        raise InputError(
            "rasterizer: numba", f"the numba rasterizer runs on a CPU, not {device}", "set rasterizer: auto"
        )
    if choice in ("numba", "torch"):
        return choice
    try:
        import gsplat  # noqa: F401

        usable, why = device.type == "cuda", "the device is not CUDA"
    except ImportError:
        usable, why = False, "gsplat is not installed"
    if choice == "gsplat" and not usable:
        raise InputError("rasterizer: gsplat", f"gsplat cannot run here: {why}", "set rasterizer: auto")
    if choice == "auto" and not usable:
        fallback = "numba" if device.type == "cpu" else "torch"
        log.info("gaussians: the %s rasterizer renders (gsplat not used: %s)", fallback, why)
        return fallback
    return "gsplat"
