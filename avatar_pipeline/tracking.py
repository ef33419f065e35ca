"""Landmark-based tracking: one shared identity and focal length, per-frame head pose and expression
(and jaw/neck rotations where the model has joints), all frames optimised together.

Conventions. Model space: metres, y up, the face looking along +z. Camera space: OpenCV (x right,
y down, z forward); a model point X maps to R(r) F X + t with F = diag(1, -1, -1), so r = 0 is a face
looking straight into the camera. Pinhole projection with the principal point at the image centre.
"""
from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from .config import TrackingConfig
from .errors import PipelineError
from .models.base import MorphableModel
from .models.flame import axis_angle_to_matrix

log = logging.getLogger(__name__)

FLIP = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
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



def head_to_camera(rotation: np.ndarray, translation: np.ndarray) -> np.ndarray:
    """(N, 4, 4) transforms from model space to OpenCV camera space for axis-angle `rotation` (N, 3)."""
    rot = axis_angle_to_matrix(torch.as_tensor(rotation, dtype=torch.float32)) @ FLIP
    out = np.tile(np.eye(4, dtype=np.float32), (len(rotation), 1, 1))
    out[:, :3, :3] = rot.numpy()
    out[:, :3, 3] = translation
    return out


def landmark_points(model: MorphableModel, dense: bool):
    """What is fitted: (vertex triangle ids (L, 3), weights (L, 3), iBUG ids or None for dense points)."""
    if dense:
        ids = np.arange(model.num_vertices)
        return np.stack([ids] * 3, 1), np.tile([1.0, 0.0, 0.0], (len(ids), 1)).astype(np.float32), None
    tri, w = model.landmark_vertices()
    return tri, w, model.landmark_ids


def fit(model: MorphableModel, targets: np.ndarray, weights: np.ndarray, image_size: int,
        settings: TrackingConfig, dense: bool = False, progress=None) -> FitResult:
    """Fit the model to 2D landmarks `targets` (N, L, 2) in pixels with per-point `weights` (N, L)
    (0 for missing). For sparse fitting L = 68 (iBUG order); for dense fitting L = model vertices."""
    import time

    start = time.perf_counter()
    torch.manual_seed(0)
    n = targets.shape[0]
    tri, bary, ids = landmark_points(model, dense)
    if ids is not None:  # the model may embed fewer than 68 points (FLAME's static embedding)
        targets, weights = targets[:, ids], weights[:, ids] * np.where(np.isin(ids, JAW_LINE),
                                                                       settings.jaw_line_weight, 1.0)
    uniq, inverse = np.unique(tri, return_inverse=True)
    tri_local = inverse.reshape(tri.shape)
    target = torch.as_tensor(np.nan_to_num(targets), dtype=torch.float32)
    weight = torch.as_tensor(weights, dtype=torch.float32)
    frame_ok = weight.sum(1) > 0
    if frame_ok.sum() == 0:
        raise TrackingError("no frame has landmarks to fit")

    ki = min(settings.num_identity, model.num_identity)
    ke = min(settings.num_expression, model.num_expression)
    num_joints = len(model.skinning.parents) if model.skinning is not None else 0
    centre = image_size / 2.0

    # initial pose: frontal, at the depth that matches the landmarks' spread
    face_px = (target[frame_ok].amax(1) - target[frame_ok].amin(1)).norm(dim=-1).median()
    rest = model.vertices(subset=uniq)[0]
    rest_pts = (rest[tri_local] * torch.as_tensor(bary)[..., None]).sum(1)
    face_m = (rest_pts.amax(0)[:2] - rest_pts.amin(0)[:2]).norm()
    focal0 = (settings.focal or settings.focal_init) * image_size
    depth0 = float(focal0 * face_m / face_px)
    mean_xy = torch.where(frame_ok[:, None], (target * weight[..., None]).sum(1) / weight.sum(1).clamp_min(1)[:, None],
                          torch.tensor([centre, centre]))
    t0 = torch.cat([(mean_xy - centre) * depth0 / focal0, torch.full((n, 1), depth0)], 1)

    params = {
        "rotation": torch.zeros(n, 3, requires_grad=True),
        "translation": t0.clone().requires_grad_(True),
        "log_focal": torch.tensor(float(np.log(settings.focal or settings.focal_init)),
                                  requires_grad=settings.focal is None),
        "identity": torch.zeros(1, ki, requires_grad=True),
        "expression": torch.zeros(n, ke, requires_grad=True),
    }
    if num_joints:
        params["joints"] = torch.zeros(n, num_joints, 3, requires_grad=True)
    bary_t = torch.as_tensor(bary)[..., None]
    robust = float(settings.robust_scale * face_px)

    def project(p):
        verts = model.vertices(p["identity"].expand(n, -1) if ki else None, p["expression"] if ke else None,
                               _joint_pose(p.get("joints")), subset=uniq)
        pts = (verts[:, tri_local] * bary_t).sum(2)  # (N, L, 3) model space
        rot = axis_angle_to_matrix(p["rotation"]) @ FLIP
        cam = pts @ rot.transpose(1, 2) + p["translation"][:, None]
        focal = image_size * p["log_focal"].exp()
        uv = focal * cam[..., :2] / cam[..., 2:].clamp_min(1e-3) + centre
        return uv, cam

    def loss_fn(p, full: bool):
        uv, _ = project(p)
        sq = ((uv - target) ** 2).sum(-1)
        data = (weight * robust ** 2 * sq / (sq + robust ** 2)).sum() / weight.sum() / robust ** 2
        loss = data + settings.focal_prior_weight * (p["log_focal"] - np.log(settings.focal_init)) ** 2
        if n > 2:
            loss = loss + settings.smooth_pose_weight * (
                _second_difference(p["rotation"]) + _second_difference(p["translation"] / depth0))
        if full:
            loss = loss + settings.identity_weight * (p["identity"] ** 2).sum()
            loss = loss + settings.expression_weight * (p["expression"] ** 2).sum(1).mean()
            if n > 1:
                loss = loss + settings.smooth_expression_weight * ((p["expression"][1:] - p["expression"][:-1]) ** 2).sum(1).mean()
            if "joints" in p:
                loss = loss + 1e-2 * (p["joints"] ** 2).sum((1, 2)).mean()
        return loss

    history = []
    trainable = [k for k, v in params.items() if v.requires_grad]
    stages = [([k for k in ("rotation", "translation", "log_focal") if k in trainable], settings.rigid_iterations, False),
              (trainable, settings.iterations, True)]
    for names, iterations, full in stages:
        optimizer = torch.optim.Adam([params[k] for k in names], lr=settings.learning_rate)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, iterations), eta_min=settings.learning_rate / 20)
        for it in range(iterations):
            optimizer.zero_grad()
            loss = loss_fn(params, full)
            if not torch.isfinite(loss):
                bad = _nonfinite_frames(params)
                raise TrackingError(f"optimisation diverged (non-finite loss) at iteration {it}; "
                                    f"frames with non-finite parameters: {bad[:20]}")
            loss.backward()
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                if model.expression_prior == "unit":  # blendshape weights live in [0, 1]
                    params["expression"].clamp_(0.0, 1.0)
                params["translation"][:, 2].clamp_(min=0.05)  # in front of the camera
            history.append(loss.item())
            if progress is not None:
                progress(len(history), settings.rigid_iterations + settings.iterations, history[-1])

    with torch.no_grad():
        uv, cam = project(params)
        err = ((uv - target).norm(dim=-1) * (weight > 0)).sum(1) / (weight > 0).sum(1).clamp_min(1)
    result = FitResult(
        rotation=params["rotation"].detach().numpy().copy(),
        translation=params["translation"].detach().numpy().copy(),
        expression=params["expression"].detach().numpy().copy(),
        identity=params["identity"].detach().numpy()[0].copy(),
        joint_rotations=params["joints"].detach().numpy().copy() if "joints" in params else None,
        focal=float(image_size * params["log_focal"].detach().exp()),
        landmarks_2d=uv.numpy(), landmarks_3d=cam.numpy(), error_px=err.numpy(),
        seconds=time.perf_counter() - start, loss_history=history)
    for name in ("rotation", "translation", "expression"):
        if not np.isfinite(getattr(result, name)).all():
            raise TrackingError(f"non-finite {name} for frames {np.flatnonzero(~np.isfinite(getattr(result, name)).all(1))[:20].tolist()}")
    return result


def _joint_pose(joints):
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
