"""Landmark-based tracking: one shared identity and focal length, per-frame head pose and expression
(and jaw/neck rotations where the model has joints), all frames optimised together.

Camera and rotation conventions: geometry.py.
"""

from __future__ import annotations

import dataclasses
import logging

import numba
import numpy as np
import torch

from . import facemesh
from .config import TrackingConfig
from .errors import PipelineError
from .geometry import FLIP, axis_angle_to_matrix
from .models.base import MorphableModel

log = logging.getLogger(__name__)

JAW_LINE = np.arange(0, 17)  # iBUG jaw contour: slides along the silhouette, trusted less


class TrackingError(PipelineError):
    pass


@dataclasses.dataclass
class FitResult:
    rotation: np.ndarray  # (N, 3) axis-angle r
    translation: np.ndarray  # (N, 3) metres
    expression: np.ndarray  # (N, Ke)
    identity: np.ndarray  # (Ki,)
    joint_rotations: np.ndarray | None  # (N, J, 3)
    focal: float  # pixels
    landmarks_2d: np.ndarray  # (N, L, 2) fitted projections
    landmarks_3d: np.ndarray  # (N, L, 3) camera space
    error_px: np.ndarray  # (N,) mean reprojection error over the landmarks with weight
    seconds: float = 0.0
    loss_history: list = dataclasses.field(default_factory=list)
    photometric: dict | None = None  # before/after figures of the photometric refinement, when run


@dataclasses.dataclass
class LandmarkSet:
    """The model surface points that are fitted, and which column of the detected landmarks each one meets."""

    name: str  # "ibug68" or "mediapipe"
    triangles: np.ndarray  # (L, 3) vertex ids of each point's triangle
    bary: np.ndarray  # (L, 3) barycentric weights
    columns: np.ndarray  # (L,) column in the targets: iBUG index (0-67) or mediapipe index (0-477)
    weight: np.ndarray  # (L,) contour points, which slide along the silhouette, count less


def ibug68_points(model: MorphableModel, settings: TrackingConfig) -> LandmarkSet:
    """The model's iBUG-68 embedding (FLAME's static embedding has only 51 of them)."""
    tri, bary = model.landmark_vertices()
    ids = model.landmark_ids
    weight = np.where(np.isin(ids, JAW_LINE), settings.jaw_line_weight, 1.0).astype(np.float32)
    return LandmarkSet("ibug68", tri, bary, ids, weight)


def mediapipe_points(
    model: MorphableModel,
    settings: TrackingConfig,
    faces: np.ndarray | None = None,
    bary: np.ndarray | None = None,
    point_ids: np.ndarray | None = None,
) -> LandmarkSet:
    """mediapipe's points on the model: every vertex of the built-in model (which has mediapipe's
    topology), or an embedding (triangle ids `faces`, `bary`, `point_ids`) found for ICT / FLAME."""
    if faces is None:
        point_ids = np.arange(model.num_vertices)
        tri, bary = np.stack([point_ids] * 3, 1), np.tile([1.0, 0.0, 0.0], (len(point_ids), 1)).astype(np.float32)
    else:
        tri = model.faces[faces]
    weight = np.where(np.isin(point_ids, facemesh.FACE_OVAL), settings.jaw_line_weight, 1.0).astype(np.float32)
    return LandmarkSet("mediapipe", tri, bary, point_ids, weight)


class LandmarkObjective:
    """The landmark term, priors and temporal smoothness over all frames, and the parameters they act on."""

    def __init__(
        self,
        model: MorphableModel,
        targets: np.ndarray,
        weights: np.ndarray,
        image_size: int,
        settings: TrackingConfig,
        points: LandmarkSet,
    ):
        self.model, self.settings, self.image_size = model, settings, image_size
        self.n = n = targets.shape[0]
        tri, bary = points.triangles, points.bary
        targets, weights = targets[:, points.columns], weights[:, points.columns] * points.weight
        self.uniq, inverse = np.unique(tri, return_inverse=True)
        self.tri_local = inverse.reshape(tri.shape)
        self.bary = torch.as_tensor(bary, dtype=torch.float32)[..., None]
        self.target = torch.as_tensor(np.nan_to_num(targets), dtype=torch.float32)
        self.weight = torch.as_tensor(weights, dtype=torch.float32)
        frame_ok = self.weight.sum(1) > 0
        if frame_ok.sum() == 0:
            raise TrackingError("no frame has landmarks to fit")
        self.ki = min(settings.num_identity, model.num_identity)
        self.ke = min(settings.num_expression, model.num_expression)
        self.num_joints = len(model.skinning.parents) if model.skinning is not None else 0
        # without skinning the fitted points are linear in identity and expression: their own bases, made
        # once, replace a gather of their triangles' vertices at every iteration (3-4x less work a step)
        self.point_bases = None if self.num_joints else self._point_bases()
        self.centre = image_size / 2.0
        self.face_px = float((self.target[frame_ok].amax(1) - self.target[frame_ok].amin(1)).norm(dim=-1).median())
        self.robust = settings.robust_scale * self.face_px
        # initial pose: frontal, at the depth that matches the landmarks' spread
        rest = (model.vertices(subset=self.uniq)[0][self.tri_local] * self.bary).sum(1)
        face_m = float((rest.amax(0)[:2] - rest.amin(0)[:2]).norm())
        self.focal0 = (settings.focal or settings.focal_init) * image_size
        self.depth0 = self.focal0 * face_m / self.face_px
        mean_xy = (self.target * self.weight[..., None]).sum(1) / self.weight.sum(1).clamp_min(1)[:, None]
        self.t0 = torch.cat(
            [
                torch.where(frame_ok[:, None], mean_xy - self.centre, torch.zeros(n, 2)) * self.depth0 / self.focal0,
                torch.full((n, 1), self.depth0),
            ],
            1,
        )

    def _point_bases(self) -> dict:
        """The fitted points' template (L, 3) and identity / expression bases (K, L * 3)."""
        model, tri, bary = self.model, self.uniq[self.tri_local], self.bary.numpy()

        def on_points(values: np.ndarray) -> np.ndarray:  # (V, 3, ...) -> (L, 3, ...)
            return np.einsum("lj,lj...->l...", bary[..., 0], values[tri].astype(np.float32))

        bases = {"template": torch.as_tensor(on_points(model.template))}
        for name, count, basis in (
            ("identity", self.ki, model.identity_basis),
            ("expression", self.ke, model.expression_basis),
        ):
            if count:  # (L, 3, K) -> (K, L * 3)
                bases[name] = torch.as_tensor(on_points(basis[..., :count]).reshape(-1, count).T.copy())
        return bases

    def initial_params(self) -> dict:
        s = self.settings
        params = {
            "rotation": torch.zeros(self.n, 3, requires_grad=True),
            "translation": self.t0.clone().requires_grad_(True),
            "log_focal": torch.tensor(float(np.log(s.focal or s.focal_init)), requires_grad=s.focal is None),
            "identity": torch.zeros(1, self.ki, requires_grad=True),
            "expression": torch.zeros(self.n, self.ke, requires_grad=True),
        }
        if self.num_joints:
            params["joints"] = torch.zeros(self.n, self.num_joints, 3, requires_grad=True)
        return params

    def camera_vertices(self, p: dict, frames=slice(None), subset=None):
        """Camera-space vertices (B, V, 3) of `frames` (optionally a vertex subset)."""
        expression = p["expression"][frames]
        batch = expression.shape[0]
        joints = p["joints"][frames] if "joints" in p else None
        verts = self.model.vertices(
            p["identity"].expand(batch, -1) if self.ki else None,
            expression if self.ke else None,
            joint_pose(joints),
            subset=subset,
        )
        rot = axis_angle_to_matrix(p["rotation"][frames]) @ FLIP
        return verts @ rot.transpose(1, 2) + p["translation"][frames][:, None]

    def to_pixels(self, p: dict, cam):
        return self.image_size * p["log_focal"].exp() * cam[..., :2] / cam[..., 2:].clamp_min(1e-3) + self.centre

    def landmarks(self, p: dict):
        """The fitted points of every frame: pixels (N, L, 2) and camera space (N, L, 3)."""
        cam = self.camera_points(p)
        return self.to_pixels(p, cam), cam

    def camera_points(self, p: dict) -> torch.Tensor:
        """The fitted points of every frame in camera space (N, L, 3)."""
        if self.point_bases is None:
            return (self.camera_vertices(p, subset=self.uniq)[:, self.tri_local] * self.bary).sum(2)
        bases = self.point_bases
        offsets = 0
        if self.ke:
            offsets = p["expression"] @ bases["expression"]
        if self.ki:
            offsets = offsets + p["identity"] @ bases["identity"]
        points = bases["template"] + (offsets.reshape(self.n, -1, 3) if torch.is_tensor(offsets) else 0)
        rot = axis_angle_to_matrix(p["rotation"]) @ FLIP
        return torch.baddbmm(p["translation"][:, None], points.expand(self.n, -1, -1), rot.transpose(1, 2))

    def reprojection(self, p: dict) -> torch.Tensor:
        """The landmark term: the weighted mean of the robust (Geman-McClure) squared pixel errors."""
        cam = self.camera_points(p)
        if cam.device.type == "cpu":  # one fused pass instead of about thirty over (N, L) tensors
            return RobustReprojection.apply(cam, p["log_focal"], self)
        sq = ((self.to_pixels(p, cam) - self.target) ** 2).sum(-1)
        return (self.weight * sq / (sq + self.robust**2)).sum() / self.weight.sum()

    def loss(self, p: dict, full: bool):
        s, n = self.settings, self.n
        loss = self.reprojection(p)
        loss = loss + s.focal_prior_weight * (p["log_focal"] - np.log(s.focal_init)) ** 2
        if n > 2:
            loss = loss + s.smooth_pose_weight * (
                _second_difference(p["rotation"]) + _second_difference(p["translation"] / self.depth0)
            )
        if full:
            loss = loss + s.identity_weight * (p["identity"] ** 2).sum()
            loss = loss + s.expression_weight * (p["expression"] ** 2).sum(1).mean()
            if n > 1:
                loss = (
                    loss
                    + s.smooth_expression_weight * ((p["expression"][1:] - p["expression"][:-1]) ** 2).sum(1).mean()
                )
            if "joints" in p:
                loss = loss + 1e-2 * (p["joints"] ** 2).sum((1, 2)).mean()
        return loss

    def constrain(self, p: dict) -> None:
        with torch.no_grad():
            if self.model.expression_prior == "unit":  # blendshape weights live in [0, 1]
                p["expression"].clamp_(0.0, 1.0)
            p["translation"][:, 2].clamp_(min=0.05)  # in front of the camera

    def result(self, p: dict, seconds: float, history: list) -> FitResult:
        with torch.no_grad():
            uv, cam = self.landmarks(p)
            valid = self.weight > 0
            err = ((uv - self.target).norm(dim=-1) * valid).sum(1) / valid.sum(1).clamp_min(1)
        result = FitResult(
            rotation=p["rotation"].detach().numpy().copy(),
            translation=p["translation"].detach().numpy().copy(),
            expression=p["expression"].detach().numpy().copy(),
            identity=p["identity"].detach().numpy()[0].copy(),
            joint_rotations=p["joints"].detach().numpy().copy() if "joints" in p else None,
            focal=float(self.image_size * p["log_focal"].detach().exp()),
            landmarks_2d=uv.numpy(),
            landmarks_3d=cam.numpy(),
            error_px=err.numpy(),
            seconds=seconds,
            loss_history=history,
        )
        for name in ("rotation", "translation", "expression"):
            value = getattr(result, name)
            if not np.isfinite(value).all():
                raise TrackingError(
                    f"non-finite {name} for frames {np.flatnonzero(~np.isfinite(value).all(1))[:20].tolist()}"
                )
        return result


class RobustReprojection(torch.autograd.Function):
    """LandmarkObjective's landmark term and its gradients (to the camera-space points and the log focal
    length) computed together in one compiled pass over the points."""

    @staticmethod
    def forward(ctx, cam: torch.Tensor, log_focal: torch.Tensor, objective: LandmarkObjective) -> torch.Tensor:
        focal = objective.image_size * float(log_focal.detach().exp())
        weight_sum = float(objective.weight.sum())
        loss, grad_cam, grad_log_focal = _robust_reprojection(
            cam.detach().numpy(),
            focal,
            objective.centre,
            objective.target.numpy(),
            objective.weight.numpy(),
            objective.robust**2,
        )
        ctx.save_for_backward(
            torch.from_numpy(grad_cam).div_(weight_sum), torch.tensor(grad_log_focal / weight_sum, dtype=cam.dtype)
        )
        return cam.new_tensor(loss / weight_sum)

    @staticmethod
    def backward(ctx, grad):
        grad_cam, grad_log_focal = ctx.saved_tensors
        return grad * grad_cam, grad * grad_log_focal, None


@numba.njit(cache=True, nogil=True, parallel=True)
def _robust_reprojection(cam, focal, centre, target, weight, robust_sq):
    """Sum over frames and points of weight * e / (e + robust_sq), e the squared pixel error of the projection
    (focal * (x, y) / z + centre) of cam (N, L, 3) against target (N, L, 2); its gradient to cam and to the log
    of the focal length."""
    frames, points = weight.shape
    grad_cam = np.zeros_like(cam)
    frame_loss, frame_focal = np.zeros(frames), np.zeros(frames)
    for i in numba.prange(frames):
        total, focal_grad = 0.0, 0.0
        for j in range(points):
            w = weight[i, j]
            if w == 0.0:
                continue
            x, y, z = cam[i, j, 0], cam[i, j, 1], cam[i, j, 2]
            depth = max(z, 1e-3)  # as to_pixels' clamp
            u, v = focal * x / depth, focal * y / depth
            du, dv = u + centre - target[i, j, 0], v + centre - target[i, j, 1]
            e = du * du + dv * dv
            total += w * e / (e + robust_sq)
            g = 2.0 * w * robust_sq / ((e + robust_sq) * (e + robust_sq))  # d(loss)/d(e) * 2
            grad_cam[i, j, 0] = g * du * focal / depth
            grad_cam[i, j, 1] = g * dv * focal / depth
            if z > 1e-3:
                grad_cam[i, j, 2] = -g * (du * u + dv * v) / depth
            focal_grad += g * (du * u + dv * v)
        frame_loss[i], frame_focal[i] = total, focal_grad
    return frame_loss.sum(), grad_cam, frame_focal.sum()


def optimise(
    params: dict,
    names: list[str],
    iterations: int,
    lr: float,
    loss_fn,
    after_step,
    history: list,
    progress=None,
    total: int = 0,
) -> None:
    """Adam with a cosine learning-rate decay; stops with the frames involved if the loss turns non-finite."""
    optimizer = torch.optim.Adam([params[k] for k in names], lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, iterations), eta_min=lr / 20)
    for it in range(iterations):
        optimizer.zero_grad()
        loss = loss_fn(it)
        if not torch.isfinite(loss):
            raise TrackingError(
                f"optimisation diverged (non-finite loss) at iteration {it}; "
                f"frames with non-finite parameters: {_nonfinite_frames(params)[:20]}"
            )
        loss.backward()
        optimizer.step()
        schedule.step()
        after_step()
        history.append(loss.item())
        if progress is not None:
            progress(len(history), total, history[-1])


def fit(
    model: MorphableModel,
    targets: np.ndarray,
    weights: np.ndarray,
    image_size: int,
    settings: TrackingConfig,
    points: LandmarkSet | None = None,
    progress=None,
    images: np.ndarray | None = None,
    masks: np.ndarray | None = None,
    rasterizer: str = "own",
) -> FitResult:
    """Fit the model to 2D landmarks `targets` (N, L, 2) in pixels with per-point `weights` (N, L)
    (0 for missing): first the rigid pose and focal length, then everything.
    `points` says which model points meet which columns of `targets`: by default the model's iBUG-68
    embedding (L = 68, iBUG order); with `mediapipe_points`, L = 478 (mediapipe order).
    With `images` (N, R, R, 3) in [0, 1] and face `masks` (N, R, R) and `settings.refine ==
    "photometric"`, a photometric refinement through the differentiable renderer follows, rasterized by
    `rasterizer` (render.pick_rasterizer resolves the config's choice)."""
    import time

    start = time.perf_counter()
    torch.manual_seed(0)
    points = points if points is not None else ibug68_points(model, settings)
    objective = LandmarkObjective(model, targets, weights, image_size, settings, points)
    params = objective.initial_params()
    trainable = [k for k, v in params.items() if v.requires_grad]
    rigid = [k for k in ("rotation", "translation", "log_focal") if k in trainable]
    history: list[float] = []
    total = settings.rigid_iterations + settings.iterations
    refine = settings.refine == "photometric" and images is not None
    total += settings.refine_iterations if refine else 0
    for names, iterations, full in ((rigid, settings.rigid_iterations, False), (trainable, settings.iterations, True)):
        optimise(
            params,
            names,
            iterations,
            settings.learning_rate,
            lambda it: objective.loss(params, full),
            lambda: objective.constrain(params),
            history,
            progress,
            total,
        )
    photometric = None
    if refine:
        photometric = refine_photometric(
            objective, params, images, masks, weights.sum(1) > 0, history, progress, total, rasterizer
        )
    result = objective.result(params, time.perf_counter() - start, history)
    result.photometric = photometric
    return result


def refine_photometric(
    objective: LandmarkObjective,
    params: dict,
    images: np.ndarray,
    masks: np.ndarray,
    fitted: np.ndarray,
    history: list,
    progress=None,
    total: int = 0,
    rasterizer: str = "own",
) -> dict:
    """Refine pose, expression and identity so the shaded model matches the frames inside the parsed face.

    Appearance: one albedo per vertex (initialised from the frames) times per-frame first-order
    spherical-harmonics shading; the landmark term stays on so the fit cannot drift. Returns the
    photometric L1 (0-1 scale, inside the face mask) on a fixed set of frames before and after."""
    from .render import render_attributes, vertex_normals

    s, model = objective.settings, objective.model
    size = images.shape[1]
    scale = size / objective.image_size
    region = model.regions["face"] if len(model.regions["face"]) else np.arange(model.num_vertices)
    keep = np.isin(model.faces, region).all(1)
    used, local = np.unique(model.faces[keep], return_inverse=True)
    faces_local = local.reshape(-1, 3)
    faces_t = torch.as_tensor(faces_local)
    frames = np.flatnonzero(fitted & (masks.reshape(len(masks), -1).mean(1) > 0.01))
    if len(frames) == 0:
        raise TrackingError("photometric refinement: no frame has both landmarks and a parsed face")
    images_t = torch.as_tensor(images, dtype=torch.float32)
    masks_t = torch.as_tensor(masks)
    rng = np.random.default_rng(0)
    distance = _boundary_distance(masks) if s.silhouette_weight > 0 else None

    def pixels(i):
        cam = objective.camera_vertices(params, [int(i)], subset=used)[0]
        return objective.to_pixels(params, cam) * scale - 0.5 * (1 - scale), cam

    with torch.no_grad():  # albedo: the frames' colours under the fitted mesh, averaged
        samples = []
        for i in frames[:: max(1, len(frames) // 8)]:
            uv, _ = pixels(i)
            xy = uv.round().long().clamp(0, size - 1)
            samples.append(images_t[i][xy[:, 1], xy[:, 0]])
        albedo = torch.stack(samples).median(0).values.clone().requires_grad_(True)
    shading = torch.zeros(objective.n, 4)
    shading[:, 0] = 1.0
    params["albedo"], params["shading"] = albedo, shading.requires_grad_(True)

    def frame_errors(i):
        """Photometric L1 inside the face and silhouette distance (pixels at the refinement size)."""
        uv, cam = pixels(i)
        normals = vertex_normals(cam, faces_t)
        basis = torch.cat([torch.ones_like(normals[:, :1]), normals], 1)
        colour = params["albedo"] * (basis @ params["shading"][int(i)])[:, None]
        rendered, covered, tri_id = render_attributes(uv, cam[:, 2], faces_local, colour, size, rasterizer)
        inside = covered & masks_t[i]
        if inside.sum() < 10:
            return None, None
        photo = (rendered[inside] - images_t[i][inside]).abs().mean()
        silhouette = None
        if distance is not None:
            outline = _outline_vertices(tri_id, faces_local)
            if len(outline):
                silhouette = _sample(distance[i], uv[outline]).mean()
        return photo, silhouette

    def photometric_error(i):
        return frame_errors(i)[0]

    evaluation = frames[np.linspace(0, len(frames) - 1, min(8, len(frames))).round().astype(int)]

    def mean_error():
        with torch.no_grad():
            errs = [e for e in (photometric_error(i) for i in evaluation) if e is not None]
            return float(torch.stack(errs).mean()) if errs else float("nan")

    def mean_silhouette():
        if distance is None:
            return None
        with torch.no_grad():
            errs = [e for e in (frame_errors(i)[1] for i in evaluation) if e is not None]
            return round(float(torch.stack(errs).mean()) / scale, 4) if errs else None

    before, silhouette_before = mean_error(), mean_silhouette()

    def loss_fn(it):
        batch = rng.choice(frames, size=min(s.refine_batch, len(frames)), replace=False)
        photo, outline = zip(*(frame_errors(i) for i in batch))
        photo = [e for e in photo if e is not None]
        outline = [e for e in outline if e is not None]
        loss = objective.loss(params, full=True)
        if photo:
            loss = loss + s.photometric_weight * torch.stack(photo).mean()
        if outline:  # in units of the robust scale, like the landmark term
            loss = loss + s.silhouette_weight * torch.stack(outline).mean() / (objective.robust * scale)
        return loss

    names = [
        k
        for k in ("rotation", "translation", "identity", "expression", "joints", "albedo", "shading")
        if k in params and params[k].requires_grad
    ]
    optimise(
        params,
        names,
        s.refine_iterations,
        s.refine_learning_rate,
        loss_fn,
        lambda: objective.constrain(params),
        history,
        progress,
        total,
    )
    after, silhouette_after = mean_error(), mean_silhouette()
    log.info(
        "photometric refinement: L1 inside the face %.4f -> %.4f, silhouette distance %s -> %s px, %d frames",
        before,
        after,
        silhouette_before,
        silhouette_after,
        len(evaluation),
    )
    del params["albedo"], params["shading"]
    return {
        "l1_before": round(before, 5),
        "l1_after": round(after, 5),
        "silhouette_px_before": silhouette_before,
        "silhouette_px_after": silhouette_after,
        "frames_evaluated": len(evaluation),
        "iterations": s.refine_iterations,
        "size": size,
        "rasterizer": rasterizer,
    }


def _boundary_distance(masks: np.ndarray) -> torch.Tensor:
    """Per frame, the distance (pixels) of every pixel to the boundary of the parsed face mask."""
    import cv2

    out = np.empty(masks.shape, np.float32)
    for k, mask in enumerate(masks.astype(np.uint8)):
        inside = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
        outside = cv2.distanceTransform(1 - mask, cv2.DIST_L2, 3)
        out[k] = np.maximum(inside, outside)
    return torch.as_tensor(out)


def _outline_vertices(tri_id: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Vertices of the triangles seen at the edge of the rendered region (the silhouette of the face)."""
    covered = tri_id >= 0
    edge = covered & ~(
        np.roll(covered, 1, 0) & np.roll(covered, -1, 0) & np.roll(covered, 1, 1) & np.roll(covered, -1, 1)
    )
    return np.unique(faces[np.unique(tri_id[edge])].ravel())


def _sample(image: torch.Tensor, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a (H, W) map at pixel positions (N, 2), differentiable in the positions."""
    h, w = image.shape
    grid = torch.stack([(uv[:, 0] + 0.5) / w * 2 - 1, (uv[:, 1] + 0.5) / h * 2 - 1], 1)[None, None]
    return torch.nn.functional.grid_sample(image[None, None], grid, align_corners=False, padding_mode="border")[0, 0, 0]


def joint_pose(joints):
    """The root joint stays fixed: the rigid head pose is separate."""
    if joints is None:
        return None
    return torch.cat([torch.zeros_like(joints[:, :1]), joints[:, 1:]], 1)


def _second_difference(x):
    if len(x) < 3:
        return x.sum() * 0
    return ((x[2:] - 2 * x[1:-1] + x[:-2]) ** 2).sum(1).mean()


def _nonfinite_frames(params) -> list[int]:
    bad = set()
    for key in ("rotation", "translation", "expression"):
        value = params[key].detach()
        bad |= set(np.flatnonzero(~torch.isfinite(value).all(1).numpy()).tolist())
    return sorted(bad)


def rotation_difference_deg(rotation_a: np.ndarray, rotation_b: np.ndarray) -> np.ndarray:
    """Angle (degrees) of the rotation between two sets of axis-angle rotations (N, 3)."""
    a = axis_angle_to_matrix(torch.as_tensor(rotation_a, dtype=torch.float32)).numpy()
    b = axis_angle_to_matrix(torch.as_tensor(rotation_b, dtype=torch.float32)).numpy()
    return np.degrees(np.arccos(np.clip((np.einsum("nij,nij->n", a, b) - 1) / 2, -1, 1)))


def interpolate_invalid(values: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Linear interpolation over frames without landmarks (edges hold the nearest valid value)."""
    out = values.copy()
    idx = np.flatnonzero(valid)
    if len(idx) == 0 or valid.all():
        return out
    flat = out.reshape(len(out), -1)
    for c in range(flat.shape[1]):
        flat[~valid, c] = np.interp(np.flatnonzero(~valid), idx, flat[idx, c])
    return flat.reshape(values.shape)
