"""Neural Head Avatars (Grassal et al., CVPR 2022) on the avatar core.

The subject's tracked morphable model (ICT FaceKit, FLAME or the built-in one, read from the tracking
cache), subdivided, plus vertex offsets from the geometry network (static everywhere but in the neck,
where they follow the head pose); coloured by the texture network; rendered with one hard rasterized
layer over the background plate. Per-frame corrections of the tracked pose and expression and one of the
identity are fitted with the networks, by SGD as the authors do. Image-space terms move the mesh through
the screen positions of the visible surface points (losses.py).

Test-frame conditioning, by protocol:
- `fitted` (the paper, Sec. 4.3): expression and pose corrections of every test frame fitted to the
  joint objective with the networks frozen;
- `tracked`: the tracked expression and pose as they are.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from ... import cache, render
from ...geometry import (
    FLIP,
    axis_angle_to_matrix,
    camera_to_head_gl,
    head_to_camera_cv,
    matrix_to_axis_angle,
    project,
)
from ...models.base import barycentric_points
from ...runtime import progress
from ...tracking import joint_pose
from ..base import AvatarModel, CombinedOptimizer, Phase, View
from ..data import SubjectFrames, psnr, textured_head_model
from .config import NHAConfig
from .losses import frontal_trust, hole_filling_loss, lid_distances, masked_blur, screen_sampled
from .mesh import (
    EYELID_PAIRS,
    INNER_LIP_PAIRS,
    REGIONS,
    build_head_mesh,
    inter_ocular_distance,
    smoothed,
    uniform_laplacian,
    unique_edges,
)
from .networks import NormalEncoder, OffsetNetwork, TextureNetwork

log = logging.getLogger(__name__)

SUBDIVISIONS = {"ict": 0, "flame": 1, "builtin": 2}  # about 10-30 thousand vertices each
# Laplacian weights per region (the authors' body_part_weights.json, "mlp"); blurred over the mesh, ears set after
LAPLACIAN_WEIGHTS = {
    "eyeballs": 0.0,
    "eye_region": 100.0,
    "forehead": 1.0,
    "face": 1.0,
    "ears": 500.0,
    "scalp": 1.0,
    "neck": 2.0,
    "lower_neck": 5.0,
    "nose": 0.5,
    "mouth_interior": 1.0,
}
EYE_MIDPOINTS = [37, 38, 40, 41, 43, 44, 46, 47]  # left to the eyelid term
FACE_CLASSES = ("skin", "nose", "l_brow", "r_brow", "u_lip", "l_lip")  # where the normal term applies
MODEL_HELP = (
    "Neural Head Avatars needs a head model with texture coordinates: ICT FaceKit (model.kind: ict, the "
    "default; the ict_model rule converts it with its UVs), FLAME with its UV template (model.flame_uvs: "
    "FLAME's head_template.obj or FLAME_texture.npz), or the built-in model (UVs generated)"
)


class NHAModel(AvatarModel):
    loss_terms = (
        "landmarks",
        "eye_closed",
        "normal",
        "silhouette",
        "semantic",
        "laplacian",
        "surface",
        "edge",
        "prior",
        "rgb",
        "perceptual",
    )
    protocols = ("fitted", "tracked")

    def __init__(self, cfg: NHAConfig, train: SubjectFrames, device: torch.device):
        super().__init__()
        self.cfg, self.train_frames, self.device = cfg, train, device
        model = textured_head_model(train, cfg.head_model, MODEL_HELP)
        self.head_model = model
        subdivisions = cfg.subdivisions if cfg.subdivisions is not None else SUBDIVISIONS.get(model.name, 0)
        self.mesh = mesh = build_head_mesh(model, subdivisions)
        # mesh data derived from the tracking cache: moved with the model, not kept in checkpoints
        self.register_buffer("faces", torch.as_tensor(mesh.faces), persistent=False)
        low, high = mesh.template.min(0), mesh.template.max(0)
        canonical = torch.as_tensor((mesh.template - (low + high) / 2) / ((high - low).max() / 2))
        self.register_buffer("canonical", canonical, persistent=False)
        self.offsets = OffsetNetwork(
            self.canonical, cfg.offset_width, cfg.offset_depth, cfg.mapping_width, cfg.vertex_features
        )
        # pose-dependent offsets only in the neck, blended into the static ones over a few rings of vertices
        neck = smoothed(mesh.region_mask("neck", "lower_neck").astype(np.float32), mesh.faces, 4)
        self.register_buffer("dynamic_vertices", torch.as_tensor(np.flatnonzero(neck > 0.01)), persistent=False)
        self.register_buffer(
            "neck_weight", torch.as_tensor(neck[neck > 0.01], dtype=torch.float32)[:, None], persistent=False
        )
        self.texture = TextureNetwork(
            (cfg.face_texels, cfg.mouth_texels, cfg.mouth_texels),
            cfg.texture_features,
            cfg.texture_width,
            cfg.texture_depth,
            cfg.texture_last_width,
            cfg.dynamic_width,
            cfg.normal_features,
            len(INNER_LIP_PAIRS) + 3,
            cfg.mapping_width,
        )
        self.normal_encoder = NormalEncoder(cfg.normal_width, cfg.normal_layers, cfg.normal_features)
        # the tracked parameters of the training frames, and the corrections fitted to them
        self.tracked = _tracked(train, model)
        count = len(train.frames)
        self.rotation = torch.nn.Parameter(torch.zeros(count, 3))
        self.translation = torch.nn.Parameter(torch.zeros(count, 3))
        self.expression = torch.nn.Parameter(torch.zeros(count, self.tracked["expression"].shape[1]))
        self.joints = torch.nn.Parameter(torch.zeros_like(self.tracked["joints"])) if "joints" in self.tracked else None
        self.shape = torch.nn.Parameter(torch.zeros(len(self.tracked["identity"])))
        # mesh operators and weights of the regularisers
        self.laplacian = uniform_laplacian(mesh.faces, mesh.num_vertices)
        weights = np.array([LAPLACIAN_WEIGHTS[REGIONS[r]] for r in mesh.region], np.float32)
        weights = smoothed(weights, mesh.faces, 3)
        weights[mesh.region_mask("ears")] = LAPLACIAN_WEIGHTS["ears"]
        self.register_buffer("laplacian_weight", torch.as_tensor(weights, dtype=torch.float32), persistent=False)
        edges = unique_edges(mesh.faces)
        scalp = mesh.region_mask("scalp")
        self.register_buffer("scalp_edges", torch.as_tensor(edges[scalp[edges].any(1)]), persistent=False)
        onehot = torch.nn.functional.one_hot(torch.as_tensor(mesh.region), len(REGIONS)).float()
        self.register_buffer("region_onehot", onehot, persistent=False)
        self.landmark_ids = np.asarray(model.landmark_ids)
        # the landmarks' triangle vertices, for evaluating the model at those alone
        self.landmark_subset, inverse = np.unique(model.faces[model.landmark_faces], return_inverse=True)
        self.landmark_corners = inverse.reshape(-1, 3)
        self.rasterizer, why = render.pick_rasterizer(cfg.rasterizer)
        if self.rasterizer == "own" and cfg.rasterizer == "auto":
            log.warning("nha: FALLBACK: %s", why)
        self.perceptual = None
        if cfg.perceptual_weights:
            from .perceptual import FaceRecognitionPerceptualLoss

            # kept out of the submodules: its frozen weights are not the avatar's and stay out of checkpoints
            self.__dict__["perceptual"] = FaceRecognitionPerceptualLoss(cfg.perceptual_weights)
        else:
            log.warning(
                "nha: the perceptual term is off: it needs face-recognition weights (InsightFace arcface_torch "
                "r18 backbone.pth) that cannot be downloaded here; give their path as perceptual_weights"
            )
        # the mouth conditioning's range over the training frames (test frames are clipped to it)
        with torch.no_grad():
            conditions = self.mouth_conditions(
                self.tracked["expression"], self.tracked["rotation"], self.tracked.get("joints")
            )
        self.register_buffer("condition_low", conditions.min(0).values, persistent=False)
        self.register_buffer("condition_high", conditions.max(0).values, persistent=False)
        spread = conditions.std(0) if len(conditions) > 1 else torch.zeros_like(conditions[0])
        self.register_buffer("condition_std", spread, persistent=False)
        self.to(device)

    # --- configuration of the core -----------------------------------------------------------
    @classmethod
    def training_data(cls, cfg: NHAConfig) -> dict:
        return {"with_masks": True, "with_labels": True, "with_normals": True, "with_landmarks": True}

    def describe(self) -> str:
        m = self.mesh
        return (
            f"{self.head_model.name} mesh with {m.num_vertices} vertices / {len(m.faces)} triangles, rasterized by "
            f"{self.rasterizer}; perceptual term {'on' if self.perceptual else 'off'}"
        )

    def memory_hint(self) -> str:
        return "lower `batch` or `size` (or the texture network width) of this avatar in config.yaml"

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        steps = cfg.phase_steps()
        per_frame = [self.rotation, self.expression, self.shape] + ([self.joints] if self.joints is not None else [])
        offsets = list(self.offsets.parameters())
        texture = list(self.texture.parameters()) + list(self.normal_encoder.parameters())

        def frame_sgd(i):  # the authors fit the per-frame corrections by SGD, the translation at a tenth
            return torch.optim.SGD(
                [{"params": per_frame}, {"params": [self.translation], "lr": 0.1 * cfg.flame_lr[i]}], lr=cfg.flame_lr[i]
            )

        def texture_adam(i):
            return torch.optim.Adam(texture, lr=cfg.texture_lr[i], weight_decay=cfg.texture_weight_decay[i])

        return [
            Phase(
                "geometry", steps[0], CombinedOptimizer(frame_sgd(0), torch.optim.Adam(offsets, lr=cfg.offset_lr[0]))
            ),
            Phase("texture", steps[1], CombinedOptimizer(texture_adam(1))),
            Phase(
                "joint",
                steps[2],
                CombinedOptimizer(frame_sgd(2), torch.optim.Adam(offsets, lr=cfg.offset_lr[2]), texture_adam(2)),
            ),
        ]

    # --- geometry ---------------------------------------------------------------------------
    def mouth_conditions(self, expression, rotation, joints=None) -> torch.Tensor:
        """(B, 13): the 10 inner-lip distances (in inter-ocular units) and the mouth's rotation (axis-angle)."""
        lips = self._base_landmarks(self.tracked["identity"], expression, joints)
        a = lips[:, [p[0] for p in INNER_LIP_PAIRS]]
        b = lips[:, [p[1] for p in INNER_LIP_PAIRS]]
        distances = (a - b).norm(dim=-1) / self.tracked["unit"]
        return torch.cat([distances, rotation], 1)

    def _base_landmarks(self, identity, expression, joints) -> torch.Tensor:
        """(B, L, 3) the model's landmarks in model space, evaluating only their triangles' vertices."""
        vertices = self.head_model.vertices(
            identity[None].expand(len(expression), -1), expression, joint_pose(joints), subset=self.landmark_subset
        )
        return barycentric_points(vertices, self.landmark_corners, self.head_model.landmark_bary)

    def posed(self, expression, identity, joints, pose_matrix, with_offsets: bool = True):
        """Model-space vertices (B, V, 3) of the subdivided mesh, the same without offsets, and the offsets."""
        base = self.head_model.vertices(identity[None].expand(len(expression), -1), expression, joint_pose(joints))
        plain = self.mesh.subdivide(base)
        if not with_offsets:
            return plain, plain, torch.zeros_like(plain)
        static = self.offsets(torch.zeros(1, 9, device=plain.device))[0]
        offsets = static[None].repeat(len(expression), 1, 1)
        if len(self.dynamic_vertices):
            dynamic = self.offsets(pose_matrix.reshape(-1, 9), self.dynamic_vertices)
            blended = static[self.dynamic_vertices] + self.neck_weight * (dynamic - static[self.dynamic_vertices])
            offsets = offsets.index_copy(1, self.dynamic_vertices, blended)
        return plain + offsets, plain, offsets

    def rasterize(self, vertices_cam: torch.Tensor, focal: float, size: int):
        """One frame's camera-space vertices (V, 3) -> the covered pixels and their surface points."""
        uv = project(vertices_cam, focal, size) - 0.5  # the rasterizer has pixel centres at integers
        tri_id, ys, xs, corners, weights = render.rasterize_visible(
            uv, vertices_cam[:, 2], self.mesh.faces, size, self.rasterizer
        )
        weights = weights.detach()
        screen = (weights[..., None] * uv[corners]).sum(1)  # equals the pixel, moves with the vertices
        tri = torch.as_tensor(tri_id[ys, xs].astype(np.int64))
        return {
            "ys": torch.as_tensor(ys),
            "xs": torch.as_tensor(xs),
            "tri": tri,
            "corners": corners,
            "w": weights,
            "screen": screen,
            "uv": uv,
        }

    def normals_camera(self, vertices: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
        """Vertex normals (V, 3) of model-space vertices in the normal stage's camera convention (y up, z to
        the camera): the head-to-camera rotation, then OpenCV to OpenGL axes."""
        normals = render.vertex_normals(vertices, self.faces) @ rotation.T
        return normals * torch.tensor([1.0, -1.0, -1.0])

    # --- one frame's forward pass ------------------------------------------------------------
    def frame(self, verts, rotation, translation, focal, size, need_colour: bool, condition=None):
        """Everything the losses and the renders read of one frame; verts (V, 3) in model space."""
        cam = verts @ rotation.T + translation
        r = self.rasterize(cam, focal, size)
        normals = self.normals_camera(verts, rotation)
        pixel_normals = (r["w"][..., None] * normals[r["corners"]]).sum(1)
        pixel_normals = pixel_normals / pixel_normals.norm(dim=1, keepdim=True).clamp_min(1e-6)
        r["normals"] = pixel_normals
        r["labels"] = (r["w"][..., None] * self.region_onehot[r["corners"]]).sum(1)  # (P, regions)
        r["cam"] = cam
        if need_colour:
            r["colour"] = self.colour(r, size, condition)
        return r

    def colour(self, r: dict, size: int, condition: torch.Tensor) -> torch.Tensor:
        """Colours (P, 3) in [-1, 1] of the covered pixels; `condition` (13,) the frame's mouth conditioning."""
        normal_map = torch.zeros(size, size, 3)
        normal_map = normal_map.index_put((r["ys"], r["xs"]), r["normals"])
        encoding = self.normal_encoder(normal_map.permute(2, 0, 1)[None])[0].permute(1, 2, 0)[r["ys"], r["xs"]]
        canonical = (r["w"][..., None] * self.canonical[r["corners"]]).sum(1)
        corner_uv = torch.as_tensor(self.mesh.corner_uvs)[r["tri"]]  # (P, 3, 2)
        uv = (r["w"][..., None] * corner_uv).sum(1)
        chart = torch.as_tensor(self.mesh.face_charts)[r["tri"]]
        mouth = r["labels"][:, REGIONS.index("mouth_interior")] > 0.5
        out = canonical.new_zeros(len(canonical), 3)
        for selected, cond in ((~mouth, torch.zeros_like(condition)), (mouth, condition)):
            index = selected.nonzero()[:, 0]
            if len(index):
                rgb = self.texture(canonical[index], uv[index], chart[index], encoding[index], cond[None])
                out = out.index_put((index,), rgb)
        return out

    # --- training -----------------------------------------------------------------------------
    def training_step(self, phase: Phase, rng: np.random.Generator):
        cfg, data = self.cfg, self.train_frames
        index = ["geometry", "texture", "joint"].index(phase.name)
        batch = min(cfg.batch[index], len(data.frames))
        ks = torch.as_tensor(rng.choice(len(data.frames), batch, replace=False))
        geometry, colour = phase.name != "texture", phase.name != "geometry"
        t = self.tracked
        expression = t["expression"][ks] + self.expression[ks]
        rotation_aa = t["rotation"][ks] + self.rotation[ks]
        translation = t["translation"][ks] + self.translation[ks]
        joints = t["joints"][ks] + self.joints[ks] if self.joints is not None else None
        identity = t["identity"] + self.shape
        rotation = axis_angle_to_matrix(rotation_aa) @ FLIP
        with torch.set_grad_enabled(geometry):
            verts, plain, offsets = self.posed(expression, identity, joints, rotation)
        if not geometry:
            verts, plain, offsets = verts.detach(), plain.detach(), offsets.detach()
        weights = _weights(cfg, index, phase.progress)
        conditions = None
        if colour:
            with torch.no_grad():  # jittered conditioning of the texture generalises better (the authors' noise)
                conditions = self.mouth_conditions(expression.detach(), rotation_aa.detach(), joints)
                conditions = conditions + cfg.condition_noise * self.condition_std * torch.randn_like(conditions)
        terms: dict[str, torch.Tensor] = {}
        psnrs = []
        for b, k in enumerate(ks.tolist()):
            condition = None if conditions is None else conditions[b]
            r = self.frame(verts[b], rotation[b], translation[b], data.focal, data.size, colour, condition)
            frame_terms = self.frame_losses(r, k, data, weights, geometry, colour, self.trust(k))
            for name, value in frame_terms.items():
                terms[name] = terms.get(name, 0) + value / batch
            if colour and "rgb_psnr" in r:
                psnrs.append(r["rgb_psnr"])
        if geometry:
            terms.update(self.mesh_regularisers(verts, plain, offsets, expression, ks, weights))
            if weights["eye_closed"] > 0:
                terms["eye_closed"] = weights["eye_closed"] * self.eye_closed_loss(
                    expression, identity.detach(), joints, rotation.detach(), translation.detach(), ks
                )
        step_psnr = float(np.mean(psnrs)) if psnrs else float("nan")
        return {k: v for k, v in terms.items() if torch.is_tensor(v)}, step_psnr

    def frame_losses(self, r, k, data: SubjectFrames, weights, geometry, colour, trust: float) -> dict:
        terms = {}
        size = data.size
        ys, xs, screen = r["ys"], r["xs"], r["screen"]
        labels = torch.as_tensor(data.labels[k])
        head = torch.as_tensor(data.head_masks[k])
        if geometry:
            terms["landmarks"] = weights["landmarks"] * self.landmark_loss(r, data.landmarks[k], size)
            terms["silhouette"] = weights["silhouette"] * hole_filling_loss(
                head[..., None], torch.ones(len(ys), 1, dtype=torch.bool), ys, xs, screen, sigma=_blur_sigma(size)
            )
            terms["semantic"] = self.semantic_loss(r, labels, weights, size, trust)
            terms["normal"] = weights["normal"] * self.normal_loss(r, data, k, labels)
        if colour:
            target = data.images[k] * 2 - 1
            seen = head[ys, xs]
            truth = screen_sampled(target, ys, xs, screen)
            difference = (r["colour"] - truth).abs()[seen]
            terms["rgb"] = weights["rgb"] * (difference.mean() if len(difference) else difference.sum())
            r["rgb_psnr"] = psnr(float(((r["colour"].detach() - truth.detach())[seen] / 2).pow(2).mean()))
            if self.perceptual is not None and weights["perceptual"] > 0:
                terms["perceptual"] = weights["perceptual"] * self.perceptual_loss(r, data, k, head)
        return terms

    def trust(self, k: int) -> float:
        return float(self.tracked["trust"][k])

    def landmark_loss(self, r, detected, size) -> torch.Tensor:
        model = self.head_model
        points = barycentric_points(r["cam"][None], model.faces[model.landmark_faces], model.landmark_bary)[0]
        projected = self._project(points, size)
        target = detected[self.landmark_ids]
        valid = torch.isfinite(target).all(1) & ~torch.as_tensor(np.isin(self.landmark_ids, EYE_MIDPOINTS))
        if not valid.any():
            return projected.sum() * 0
        return ((projected[valid] - target[valid]).abs().sum(1) * 2 / size).sum() / len(self.landmark_ids)

    def _project(self, cam: torch.Tensor, size: int) -> torch.Tensor:
        """Camera-space points to pixels of a size x size image of the training camera."""
        return project(cam, self.train_frames.focal * size / self.train_frames.size, size)

    def eye_closed_loss(self, expression, identity, joints, rotation, translation, ks) -> torch.Tensor:
        """Eyelid opening of the model (its expression only moves) against the detected one, in image units."""
        landmarks = self._base_landmarks(identity, expression, joints)
        points = landmarks @ rotation.transpose(1, 2) + translation[:, None]
        full = torch.full((len(ks), 68, 2), float("nan"))
        full[:, torch.as_tensor(self.landmark_ids)] = self._project(points, self.train_frames.size)
        detected = self.train_frames.landmarks[ks]
        pairs = [p for p in EYELID_PAIRS if set(p) <= set(self.landmark_ids.tolist())]
        if not pairs:
            return expression.sum() * 0
        size = self.train_frames.size
        predicted, target = lid_distances(full, pairs) / size, lid_distances(detected, pairs) / size
        trust = torch.as_tensor([self.trust(k) for k in ks.tolist()])[:, None]
        difference = (predicted - target).abs() * trust
        difference = torch.where(torch.isfinite(difference), difference, torch.zeros_like(difference))
        return difference.sum() / len(ks)

    def semantic_loss(self, r, labels, weights, size, trust) -> torch.Tensor:
        cls = cache.PARSING_CLASS_ID
        ys, xs, screen = r["ys"], r["xs"], r["screen"]
        region = r["labels"]
        sigma = _blur_sigma(size)

        def inside(*names):
            return sum(region[:, REGIONS.index(n)] for n in names) > 0.99

        def target(*names):
            return torch.as_tensor(np.isin(labels.numpy(), [cls[n] for n in names]))

        total = weights["semantic_ear"] * hole_filling_loss(
            target("l_ear", "r_ear")[..., None], inside("ears")[:, None], ys, xs, screen, sigma
        )
        total = total + trust * weights["semantic_eye"] * hole_filling_loss(
            ~target("l_eye", "r_eye")[..., None],
            ~inside("eyeballs")[:, None],
            ys,
            xs,
            screen,
            max(1.0, sigma / 2),
            True,
        )
        total = total + trust * weights["semantic_mouth"] * hole_filling_loss(
            ~target("mouth")[..., None], ~inside("mouth_interior")[:, None], ys, xs, screen, max(1.0, sigma / 2), True
        )
        hair = inside("scalp")
        hair_target = target("hair")
        skin_target = ~target("background", "cloth", "hair")
        total = total + weights["semantic_hair"] * hole_filling_loss(
            torch.stack([hair_target, skin_target], -1), torch.stack([hair, ~hair], -1), ys, xs, screen, sigma
        )
        return total

    def normal_loss(self, r, data: SubjectFrames, k: int, labels) -> torch.Tensor:
        """L1 between the image-space Laplacians (the detail a blur removes) of the rendered normals and of
        the normal stage's, on the face's skin and features (not the eyes or the mouth interior)."""
        size = data.size
        ys, xs = r["ys"], r["xs"]
        face = torch.as_tensor(np.isin(labels.numpy(), [cache.PARSING_CLASS_ID[c] for c in FACE_CLASSES]))
        mask = face & torch.as_tensor(data.normal_masks[k])
        rendered = torch.zeros(size, size, dtype=torch.bool)
        keep = (r["labels"][:, REGIONS.index("mouth_interior")] < 0.1) & (
            r["labels"][:, REGIONS.index("eyeballs")] < 0.1
        )
        rendered[ys[keep], xs[keep]] = True
        mask = mask & rendered
        if mask.sum() < 10:
            return r["normals"].sum() * 0
        sigma = size / 50
        target = data.normals[k]
        target_detail = target - masked_blur(target, mask, sigma)
        predicted = torch.zeros(size, size, 3).index_put((ys, xs), r["normals"])
        predicted_detail = predicted[ys, xs] - masked_blur(predicted.detach(), mask, sigma)[ys, xs]
        target_at = screen_sampled(target_detail, ys, xs, r["screen"])
        chosen = mask[ys, xs]
        return (predicted_detail - target_at).abs()[chosen].mean()

    def perceptual_loss(self, r, data, k, head) -> torch.Tensor:
        predicted = (data.images[k] * 2 - 1).clone()
        inside = head[r["ys"], r["xs"]]
        predicted = predicted.index_put((r["ys"][inside], r["xs"][inside]), r["colour"][inside])
        return self.perceptual(predicted.permute(2, 0, 1)[None], (data.images[k] * 2 - 1).permute(2, 0, 1)[None])

    def mesh_regularisers(self, verts, plain, offsets, expression, ks, weights) -> dict:
        batch = len(verts)
        lap = torch.stack([torch.sparse.mm(self.laplacian, v) for v in verts])
        lap_plain = torch.stack([torch.sparse.mm(self.laplacian, v) for v in plain]).detach()
        laplacian = (((lap - lap_plain) ** 2).sum(-1) * self.laplacian_weight).sum() / batch
        surface = (offsets - offsets.roll(1, 0).detach()).abs().sum() / batch if batch > 1 else offsets.sum() * 0
        lengths = (verts[:, self.scalp_edges[:, 0]] - verts[:, self.scalp_edges[:, 1]]).norm(dim=-1)
        mean = lengths.mean(1, keepdim=True).detach()
        deviation = (lengths - mean).abs()
        edge = torch.where(deviation < 1.5 * mean, torch.zeros_like(deviation), deviation).mean()
        pose = [self.rotation[ks]] + ([self.joints[ks].flatten(1)] if self.joints is not None else [])
        prior = (
            weights["shape"] * (self.shape**2).sum() / 2
            + weights["expression"] * (self.expression[ks] ** 2).sum() / 2
            + weights["pose"] * (torch.cat(pose, 1) ** 2).sum() / 2
        )
        return {
            "laplacian": weights["laplacian"] * laplacian,
            "surface": weights["surface"] * surface,
            "edge": weights["edge"] * edge,
            "prior": prior,
        }

    # --- rendering views ----------------------------------------------------------------------
    def _view_pose(self, view: View):
        """Head-to-camera rotation (3, 3) and translation (3,) (OpenCV) of a view's camera."""
        head_to_camera = head_to_camera_cv(view.camera_to_head)
        return head_to_camera[:3, :3], head_to_camera[:3, 3]

    def _view_parameters(self, view: View):
        count = self.tracked["expression"].shape[1]
        expression = view.conditions[None, :count]
        joints = view.conditions[count:].reshape(1, -1, 3) if self.joints is not None else None
        return expression, joints

    @torch.no_grad()
    def render(self, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        rotation, translation = self._view_pose(view)
        expression, joints = self._view_parameters(view)
        identity = self.tracked["identity"] + self.shape
        verts, plain, _ = self.posed(expression, identity, joints, rotation[None])
        # the mouth conditioning, within the range seen in training
        rotation_aa = matrix_to_axis_angle(rotation @ FLIP)
        condition = self.mouth_conditions(expression, rotation_aa[None], joints)[0]
        condition = torch.maximum(torch.minimum(condition, self.condition_high), self.condition_low)
        r = self.frame(verts[0], rotation, translation, view.focal, view.size, True, condition)
        image = view.background.clone()
        image = image.index_put((r["ys"], r["xs"]), ((r["colour"] + 1) / 2).clamp(0, 1))
        alpha = torch.zeros(view.size, view.size).index_put((r["ys"], r["xs"]), torch.ones(len(r["ys"])))
        return image, alpha

    def exports(self, folder, test: SubjectFrames, views: list[View]) -> dict:
        """The canonical textured mesh, meshes of the first test frames, and the mesh over the test frames."""
        from .export import canonical_mesh, frame_meshes, overlay_video

        out = {"canonical_mesh": canonical_mesh(self, folder / "mesh", self.cfg.texture_size)}
        out["frame_meshes"] = frame_meshes(self, folder / "mesh" / "frames", views, self.cfg.mesh_frames)
        shown = views[: self.cfg.video_frames]
        images = [(test.images[k].numpy() * 255).round().astype(np.uint8) for k in range(len(shown))]
        if shown:
            overlay_video(self, folder / "mesh_overlay.mp4", shown, images, len(shown))
        return {"exports": out}

    def test_views(self, protocol: str, test: SubjectFrames) -> list[View]:
        views = [self.view(test, k) for k in range(len(test.frames))]
        if protocol == "tracked" or self.cfg.fit_steps == 0:
            return views
        return self.fit_test_frames(test, views)

    def fit_test_frames(self, test: SubjectFrames, views: list[View]) -> list[View]:
        """Expression and pose corrections of every test frame fitted to the joint objective (networks frozen)."""
        cfg = self.cfg
        data = SubjectFrames(test.store, test.size, "test", **self.training_data(cfg))
        count = len(views)
        poses = [self._view_pose(v) for v in views]
        base_rotation = torch.stack([matrix_to_axis_angle(R @ FLIP) for R, _ in poses])
        base_translation = torch.stack([t for _, t in poses])
        parameters = [self._view_parameters(v) for v in views]
        base_expression = torch.cat([e for e, _ in parameters])
        base_joints = torch.cat([j for _, j in parameters]) if self.joints is not None else None
        rotation = torch.zeros(count, 3, requires_grad=True)
        translation = torch.zeros(count, 3, requires_grad=True)
        expression = torch.zeros_like(base_expression, requires_grad=True)
        optimizer = torch.optim.Adam(
            [{"params": [rotation, expression]}, {"params": [translation], "lr": 0.1 * cfg.fit_learning_rate}],
            lr=cfg.fit_learning_rate,
        )
        weights = _weights(cfg, 2, 1.0)
        identity = (self.tracked["identity"] + self.shape).detach()
        trust = frontal_trust(torch.stack([R for R, _ in poses]))
        bar = progress(range(cfg.fit_steps), cfg.fit_steps, "nha: fit test frames", unit="step")
        for _ in bar:
            optimizer.zero_grad()
            total = 0.0
            for k in range(count):
                R = axis_angle_to_matrix(base_rotation[k] + rotation[k]) @ FLIP
                e = base_expression[k : k + 1] + expression[k : k + 1]
                j = base_joints[k : k + 1] if base_joints is not None else None
                verts, _, _ = self.posed(e, identity, j, R[None])
                condition = self.mouth_conditions(e, (base_rotation[k] + rotation[k])[None], j)[0].detach()
                t = base_translation[k] + translation[k]
                r = self.frame(verts[0], R, t, data.focal, data.size, True, condition)
                terms = self.frame_losses(r, k, data, weights, True, True, float(trust[k]))
                loss = sum(terms.values()) + weights["expression"] * (expression[k] ** 2).sum() / 2
                loss.backward()
                total += loss.item() / count
            optimizer.step()
            bar.set_postfix(loss=f"{total:.4f}", refresh=False)
        fitted = []
        for k, view in enumerate(views):
            R = axis_angle_to_matrix(base_rotation[k] + rotation[k].detach()) @ FLIP
            head_to_camera = torch.eye(4)
            head_to_camera[:3, :3], head_to_camera[:3, 3] = R, base_translation[k] + translation[k].detach()
            camera = torch.as_tensor(camera_to_head_gl(head_to_camera[None].numpy())[0])
            conditions = view.conditions.clone()
            conditions[: expression.shape[1]] = base_expression[k] + expression[k].detach()
            fitted.append(View(camera, view.focal, view.size, conditions, view.background, None, view.frame))
        return fitted


def _blur_sigma(size: int) -> float:
    """The hole-filling blur: the authors' 2 px at 512 px, but at least a pixel (below that the blurred
    masks are flat but at the outline and few vertices get a gradient)."""
    return max(1.0, 2.0 * size / 512)


def _weights(cfg: NHAConfig, index: int, progress: float) -> dict:
    """The loss weights of phase `index` at `progress` through it ([start, end] pairs ramp over the middle
    third of the geometry phase and keep their end value after it)."""

    def ramp(pair):
        if index > 0:
            return pair[1]
        share = min(1.0, max(0.0, (progress - 1 / 3) * 3))
        return pair[0] + (pair[1] - pair[0]) * share

    return {
        "rgb": cfg.w_rgb[index],
        "perceptual": cfg.w_perceptual[index],
        "landmarks": cfg.w_landmarks[index],
        "eye_closed": cfg.w_eye_closed,
        "normal": cfg.w_normal,
        "silhouette": ramp(cfg.w_silhouette),
        "semantic_hair": ramp(cfg.w_semantic_hair),
        "semantic_ear": cfg.w_semantic_ear,
        "semantic_eye": cfg.w_semantic_eye,
        "semantic_mouth": cfg.w_semantic_mouth,
        "laplacian": cfg.w_laplacian,
        "surface": cfg.w_surface,
        "edge": cfg.w_edge,
        "shape": cfg.w_shape,
        "expression": cfg.w_expression,
        "pose": cfg.w_pose,
    }


def _tracked(train: SubjectFrames, model) -> dict:
    """The training frames' tracked parameters as tensors, and what the losses need of them."""
    data, frames = train.tracking, train.frames
    out = {
        "rotation": torch.as_tensor(data["rotation"][frames], dtype=torch.float32),
        "translation": torch.as_tensor(data["translation"][frames], dtype=torch.float32),
        "expression": torch.as_tensor(data["expression"][frames], dtype=torch.float32),
        "identity": torch.as_tensor(data["identity"], dtype=torch.float32),
    }
    if "joint_rotations" in data:
        out["joints"] = torch.as_tensor(data["joint_rotations"][frames], dtype=torch.float32)
    out["trust"] = frontal_trust(axis_angle_to_matrix(out["rotation"]) @ FLIP)
    out["unit"] = inter_ocular_distance(model)
    return out
