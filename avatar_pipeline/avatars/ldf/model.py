"""Local Deformation Fields (Chen et al., CVPR 2023) on the avatar core.

The head stays still and the tracked head pose becomes the camera (as for NeRFace). A sample seen in a
frame moves to the canonical head by the local deformation fields (deformation.py), centred on landmarks
of the frame's tracked mesh; the canonical head is a TensoRF field (canonical.py) with the frame's
appearance code in its colour decoder, composited over the background plate as the last sample of every
ray (volume.py).

Training (paper Sec. 3.4-3.5): pre-training of the canonical field alone (the deformation networks frozen
at their start, no codes: only the landmarks' own deformation moves the samples), in stretches between
the growths of the grid; then everything jointly. Terms: per-ray colour error (l2, not squared), the local
control loss (where the rays to a landmark meet the head in two frames, the canonical points agree), the
weak mesh prior (surface samples deform as the tracked mesh does there), the deformation magnitude (a
hundredfold on background rays), the density sparsity of TensoRF and the norms of the frame's codes.

Test-frame conditioning, by protocol:
- `fitted`: each test frame's deformation and appearance codes fitted to it with everything else frozen
  (the paper; every `fit_every`-th test frame, the others take the nearest fitted frame's codes);
- `first_train_frame`: the first training frame's codes for every test frame (the paper's "Ours-dagger").
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import torch

from ... import cache
from ...geometry import camera_rays, head_to_camera_cv, project
from ...models.correspondence import closest_points
from ...runtime import progress
from ...video import VideoWriter
from ..base import AvatarModel, Phase, View
from ..data import SubjectFrames, psnr
from ..volume import (
    SKIP_EMPTY,
    adaptive_note,
    adaptive_sampling,
    binned_weights,
    composite,
    importance_depths,
    march,
    ray_bounds,
    render_rays,
    stratified_depths,
)
from .canonical import CanonicalField, resize_parameter
from .config import METRES_PER_UNIT, LDFConfig
from .deformation import Deformation, support_radius
from .head import EDIT_REGIONS, TrackedHead, pose_feature

log = logging.getLogger(__name__)

POSE_DIM = 6
LOCAL_SAMPLES = 32  # samples along each ray to a landmark (local control loss), around the landmark
SURFACE_FOREGROUND = 0.5  # a ray is on the person where the parsing matte is above this
MESH_PRIOR_SAMPLES = 4096  # surface samples per step the weak mesh prior measures


@dataclasses.dataclass
class FrameState:
    """What rendering a frame needs besides its rays: the field centres (observed), the conditions, the
    head pose and the frame's codes."""

    centres: torch.Tensor  # (L, 3) head space
    condition: torch.Tensor  # (C,) expression (and joints)
    pose: torch.Tensor  # (POSE_DIM,)
    deformation_code: torch.Tensor  # omega^p
    appearance: torch.Tensor  # omega^a

    @property
    def extra(self) -> torch.Tensor:
        """What every field sees unmasked: the head pose and the deformation code."""
        return torch.cat([self.pose, self.deformation_code])


class LDFModel(AvatarModel):
    loss_terms = ("rgb", "local", "mesh", "deformation", "density", "code")
    protocols = ("fitted", "first_train_frame")

    def __init__(self, cfg: LDFConfig, train: SubjectFrames, device: torch.device):
        super().__init__()
        self.cfg, self.train_frames, self.device = cfg, train, device
        self.head = TrackedHead(train.store.tracked_model(), train.tracking, cfg.landmarks)
        condition_dim = train.conditions.shape[1]
        self.attention = attention = self.head.attention(condition_dim, cfg.attention)
        self.deformation = Deformation(
            self.head.fields,
            condition_dim + POSE_DIM + cfg.deformation_code,
            torch.as_tensor(attention),
            cfg.local_fields,
            cfg.support,
            cfg.cutoff,
            cfg.scale,
            cfg.field_width,
            cfg.field_depth,
            cfg.frequencies,
        ).to(device)
        self.sizes = cfg.grid_sizes()
        self.canonical = CanonicalField(
            cfg.scene_radius,
            cfg.grid_start,
            cfg.density_components,
            cfg.appearance_components,
            cfg.appearance_features,
            cfg.decoder_width,
            cfg.appearance_code,
        ).to(device)
        count = len(train.frames)
        self.deformation_codes = torch.nn.Parameter(torch.zeros(count, cfg.deformation_code, device=device))
        self.appearance_codes = torch.nn.Parameter(torch.zeros(count, cfg.appearance_code, device=device))
        # growths of the grid done, and the encoding window reached: checkpointed, so a resume continues both
        self.register_buffer("level", torch.zeros((), dtype=torch.long))
        self.register_buffer("window", torch.zeros(()))
        neutral = torch.zeros(1, condition_dim)
        self.canonical_centres = self.head.centres(neutral)[0].to(device)
        self.canonical_mesh = self.head.vertices(neutral)[0].numpy()  # the mesh prior's canonical vertices
        self.train_centres = self.head.centres(train.conditions).to(device)
        self.train_poses = pose_feature(train.camera_to_head).to(device)
        self.near, self.far = ray_bounds(train.camera_to_head, cfg.scene_radius)

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        """A checkpoint taken after a growth of the grid holds larger components: take their size first."""
        own = dict(self.named_parameters())
        for name, value in state.items():
            if name in own and own[name].shape != value.shape:
                resize_parameter(own[name], torch.empty_like(value, device=own[name].device))
        return super().load_state_dict(state, strict, assign)

    @classmethod
    def training_data(cls, cfg: LDFConfig) -> dict:
        return {"with_mattes": True}

    def describe(self) -> str:
        cfg = self.cfg
        fields = f"{self.head.fields} local fields" if cfg.local_fields else "one global field"
        return (
            f"{cfg.rays} rays x ({cfg.samples} + {cfg.importance_samples}) samples per step; {fields} "
            f"(R {cfg.support * 1000:.1f} mm, reach {support_radius(cfg.support, cfg.cutoff) * 1000:.0f} mm); "
            f"grid {' -> '.join(str(s) for s in self.sizes)} voxels a side"
        )

    def memory_hint(self) -> str:
        return f"lower `rays` (now {self.cfg.rays}) or `samples` of this avatar in config.yaml"

    # --- phases -----------------------------------------------------------------------------------
    def phases(self) -> list[Phase]:
        """Pre-training stretches (one per grid size), then the joint training; the learning rates decay
        exponentially over the whole run, each phase taking its stretch of the decay."""
        cfg, total = self.cfg, max(1, self.cfg.steps)
        grids = [self.canonical.density.planes, self.canonical.density.lines]
        grids += [self.canonical.appearance.planes, self.canonical.appearance.lines]
        canonical_nets = list(self.canonical.basis.parameters()) + list(self.canonical.decoder.parameters())
        joint_nets = list(self.deformation.parameters()) + [self.deformation_codes, self.appearance_codes]
        phases, start = [], 0
        steps = cfg.phase_steps()
        for index, count in enumerate(steps):
            joint = index == len(steps) - 1
            at = cfg.final_lr_ratio ** (start / total)
            groups = [{"params": grids, "lr": cfg.grid_lr * at}, {"params": canonical_nets, "lr": cfg.network_lr * at}]
            if joint:
                groups.append({"params": joint_nets, "lr": cfg.network_lr * at})
            name = "joint" if joint else f"canonical {self.sizes[index]}"
            ratio = cfg.final_lr_ratio ** (count / total)
            phases.append(Phase(name, count, torch.optim.Adam(groups, betas=(0.9, 0.99)), ratio))
            start += count
        return phases

    def _enter(self, phase: Phase) -> bool:
        """Grow the grid (and prune it) when a phase starts at a larger size; True in the joint phase."""
        joint = phase.name == "joint"
        level = len(self.sizes) - 1 if joint else self.sizes.index(int(phase.name.split()[-1]))
        while int(self.level) < level:
            self.canonical.grow(self.sizes[int(self.level) + 1])
            kept = self.canonical.prune(self.cfg.prune_threshold)
            self.level += 1
            log.info("ldf: grid grown to %d voxels a side; %.0f%% of the space kept", self.canonical.size, 100 * kept)
        return joint

    def _window(self, phase: Phase) -> float:
        """The encoding window alpha (0 .. frequencies), grown over window_steps of the joint training."""
        cfg = self.cfg
        reach = phase.progress * phase.steps / max(1, cfg.window_steps)
        alpha = cfg.frequencies * min(1.0, reach)
        self.window.fill_(alpha)
        return alpha

    # --- one frame --------------------------------------------------------------------------------
    def frame_state(self, conditions: torch.Tensor, camera_to_head: torch.Tensor, code: torch.Tensor) -> FrameState:
        """A view's state: its centres from its conditions, its pose from its camera, its codes."""
        cfg, device = self.cfg, self.device
        centres = self.head.centres(conditions[None].cpu())[0].to(device)
        pose = pose_feature(camera_to_head.to(device))
        code = code.to(device)
        return FrameState(
            centres, conditions.to(device), pose, code[: cfg.deformation_code], code[cfg.deformation_code :]
        )

    def _train_state(self, k: int, learned: bool) -> FrameState:
        deformation_code = self.deformation_codes[k] if learned else self.deformation_codes[k].detach() * 0
        appearance = self.appearance_codes[k] if learned else self.appearance_codes[k].detach() * 0
        condition = self.train_frames.conditions[k].to(self.device)
        return FrameState(self.train_centres[k], condition, self.train_poses[k], deformation_code, appearance)

    def deform(self, points: torch.Tensor, state: FrameState, alpha: float, learned: bool) -> torch.Tensor:
        return self.deformation(
            points, state.centres, self.canonical_centres, state.condition, state.extra, alpha, learned
        )

    def trace(
        self,
        origins,
        dirs,
        near,
        far,
        background,
        state: FrameState,
        alpha: float,
        jitter: bool,
        learned: bool,
        skip_empty: float = 0.0,
        proposal: torch.Tensor | None = None,
        propose: bool = False,
    ):
        """Render rays of one frame: colour (R, 3), foreground alpha (R,), and per sample the weights
        (R, S + 1, the background's last), the observed points (R, S, 3) and their deformation (R, S, 3).

        With importance samples, a first pass of density alone over the stratified samples places them.
        skip_empty > 0 (rendering only): rays whose first-pass foreground alpha is below it show the
        background and skip the second pass, and with `early_termination` the others are computed only until
        less than skip_empty of their light is left; only colour and alpha are returned then, and with `propose`
        the full pass's weights gathered onto the stratified samples (`proposal`, R, S); a given `proposal` (R, S;
        a neighbouring pixel's, volume.render_rays) places the importance samples instead of the first pass."""
        cfg = self.cfg
        depths = stratified_depths(near, far, cfg.samples, jitter)
        rays, busy, weights = len(origins), None, proposal
        if cfg.importance_samples:
            if weights is None:
                with torch.no_grad():
                    points = (origins[:, None] + dirs[:, None] * depths[..., None]).reshape(-1, 3)
                    density, _ = self.canonical.sigma(points + self.deform(points, state, alpha, learned))
                    _, weights, _ = composite(
                        density.view(rays, -1), depths.new_zeros(rays, cfg.samples, 3), depths, background
                    )
                    weights = weights[:, :-1]
            extra = importance_depths(depths, weights, cfg.importance_samples, jitter)
            if skip_empty > 0:
                busy = weights.sum(-1) >= skip_empty
            stratified, depths = depths, torch.sort(torch.cat([depths, extra], -1), -1).values
        if skip_empty > 0:
            # rendering: rays the first pass found empty show the background; the others stop being traced
            # once less than skip_empty of their light is left
            busy = busy if busy is not None else torch.ones(rays, dtype=torch.bool, device=origins.device)
            colour, opacity = background.clone(), background.new_zeros(rays)
            proposed = weights.clone() if propose else None
            if bool(busy.any()):
                shade = self._shade_marching if cfg.early_termination else self._shade
                out = shade(origins[busy], dirs[busy], depths[busy], background[busy], state, alpha, learned)
                colour[busy], opacity[busy] = out["colour"], out["alpha"]
                if propose:
                    proposed[busy] = binned_weights(out["weights"][:, :-1], depths[busy], stratified[busy])
            return {"colour": colour, "alpha": opacity, "proposal": proposed}
        return self._shade(origins, dirs, depths, background, state, alpha, learned)

    def _shade_marching(self, origins, dirs, depths, background, state: FrameState, alpha: float, learned: bool):
        """Colour and alpha of the full pass, computed front to back and stopped where a ray's light is
        spent (volume.march): rendering only."""

        def evaluate(rays, span):
            _, _, density, rgb = self._samples(origins[rays], dirs[rays], depths[rays, span], state, alpha, learned)
            return density, rgb

        density, rgb = march(evaluate, depths, SKIP_EMPTY)
        colour, weights, opacity = composite(density, rgb, depths, background)
        return {"colour": colour, "alpha": opacity, "weights": weights}

    def _samples(self, origins, dirs, depths, state: FrameState, alpha: float, learned: bool):
        """Rays' samples at depths (R, S): the observed points (R, S, 3), their deformation (R, S, 3), and the
        canonical density (R, S) and colour (R, S, 3) where they land."""
        rays, samples = depths.shape
        points = origins[:, None] + dirs[:, None] * depths[..., None]
        flat = points.reshape(-1, 3)
        t = self.deform(flat, state, alpha, learned)
        density, rgb = self.canonical(flat + t, dirs.repeat_interleave(samples, 0), state.appearance)
        return points, t.view(rays, samples, 3), density.view(rays, samples), rgb.view(rays, samples, 3)

    def _shade(self, origins, dirs, depths, background, state: FrameState, alpha: float, learned: bool) -> dict:
        """The full pass over given depths (R, S): deformation, canonical density and colour, compositing."""
        points, t, density, rgb = self._samples(origins, dirs, depths, state, alpha, learned)
        colour, weights, opacity = composite(density, rgb, depths, background)
        return {"colour": colour, "alpha": opacity, "weights": weights, "points": points, "t": t}

    # --- training ---------------------------------------------------------------------------------
    def training_step(self, phase: Phase, rng: np.random.Generator):
        cfg, data, device = self.cfg, self.train_frames, self.device
        joint = self._enter(phase)
        alpha = self._window(phase) if joint else 0.0
        k = int(rng.integers(len(data.frames)))
        _, *rays = data.sample(k, cfg.rays, cfg.head_fraction, rng)
        origins, dirs, target, background, matte = (t.to(device) for t in rays)
        near = self.near[k].expand(len(origins)).to(device)
        far = self.far[k].expand(len(origins)).to(device)
        state = self._train_state(k, joint)
        out = self.trace(origins, dirs, near, far, background, state, alpha, jitter=True, learned=joint)
        error = out["colour"] - target
        density_weight = cfg.w_density[0] if int(self.level) == 0 else cfg.w_density[1]
        terms = {
            "rgb": error.norm(dim=-1).mean(),
            "density": density_weight * self.canonical.regulariser(),
        }
        if joint:
            person = matte > SURFACE_FOREGROUND
            lut = torch.where(person, 1.0, cfg.background_deformation)
            magnitude = out["t"].norm(dim=-1) / METRES_PER_UNIT
            terms["deformation"] = cfg.w_deformation * (lut[:, None] * magnitude).mean()
            terms["mesh"] = cfg.w_mesh * self.mesh_prior(k, out, person, rng)
            if cfg.w_local > 0 and len(data.frames) > 1:
                other = int(rng.integers(len(data.frames) - 1))
                other += other >= k
                terms["local"] = cfg.w_local * self.local_control(k, other, alpha, rng)
            terms["code"] = cfg.w_code * (self.deformation_codes[k].norm() + self.appearance_codes[k].norm())
        return terms, psnr(error.detach().square().mean().item())

    def mesh_prior(self, k: int, out: dict, person: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        """Mean over all samples of F_surf |t(x) - t_mesh(x_m)| (paper units): surface samples of rays on the
        person deform as the tracked mesh does at their closest point x_m. At most MESH_PRIOR_SAMPLES of the
        surface samples, drawn at random, stand for all of them (the closest-point search is the cost)."""
        surface = (out["weights"][:, :-1].detach() > self.cfg.surface_weight) & person[:, None]
        chosen = surface.flatten().nonzero()[:, 0]
        if not len(chosen):
            return out["t"].sum() * 0
        if len(chosen) > MESH_PRIOR_SAMPLES:
            chosen = chosen[torch.as_tensor(rng.choice(len(chosen), MESH_PRIOR_SAMPLES, replace=False))]
        observed = self.head.vertices(self.train_frames.conditions[k][None])[0].numpy()
        points = out["points"].reshape(-1, 3)[chosen].detach().cpu().numpy().astype(np.float64)
        triangles, bary, _ = closest_points(points, observed.astype(np.float64), self.head.faces, neighbours=3)
        motion = (self.canonical_mesh - observed)[self.head.faces[triangles]]  # (P, 3 corners, 3)
        target = torch.as_tensor((bary[..., None] * motion).sum(1), dtype=torch.float32, device=self.device)
        mismatch = (out["t"].reshape(-1, 3)[chosen] - target).norm(dim=-1) / METRES_PER_UNIT
        return mismatch.mean() * surface.sum() / surface.numel()

    def local_control(self, k: int, other: int, alpha: float, rng: np.random.Generator) -> torch.Tensor:
        """Sum over field centres of the l1 distance (paper units) between the canonical points where the rays
        to that centre meet the head in frames k and `other` (the expected depth of the rendered density)."""
        canonical_points = []
        reach = support_radius(self.cfg.support, self.cfg.cutoff)
        for f in (k, other):
            state = self._train_state(f, True)
            origin = self.train_frames.camera_to_head[f][:3, 3].to(self.device)
            towards = state.centres - origin
            distance = towards.norm(dim=-1)
            dirs = towards / distance[:, None]
            depths = stratified_depths(distance - reach, distance + reach, LOCAL_SAMPLES, True)
            points = (origin + dirs[:, None] * depths[..., None]).reshape(-1, 3)
            density, _ = self.canonical.sigma(points + self.deform(points, state, alpha, True))
            rays = len(dirs)
            _, weights, _ = composite(
                density.view(rays, -1), depths.new_zeros(rays, LOCAL_SAMPLES, 3), depths, depths.new_zeros(rays, 3)
            )
            surface = weights[:, :-1]
            depth = (surface * depths).sum(-1) / surface.sum(-1).clamp_min(1e-6)
            hit = origin + dirs * depth[:, None]
            canonical_points.append(hit + self.deform(hit, state, alpha, True))
        return (canonical_points[0] - canonical_points[1]).abs().sum() / METRES_PER_UNIT

    # --- rendering --------------------------------------------------------------------------------
    def untested_code(self) -> torch.Tensor:
        return torch.cat([self.deformation_codes[0], self.appearance_codes[0]]).detach()

    def render(self, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.frame_state(view.conditions, view.camera_to_head, view.code)
        near, far = (float(b) for b in ray_bounds(view.camera_to_head, self.cfg.scene_radius))
        alpha = float(self.window)
        device = self.device

        adaptive = adaptive_sampling(self.cfg)
        # a traced pixel's importance samples placed from its neighbours' weights: only between traced neighbours
        proposals = self.cfg.neighbour_proposals and self.cfg.importance_samples > 0 and adaptive is not None

        def trace(origins, dirs, background, proposal=None):
            n = len(origins)
            out = self.trace(
                origins.to(device),
                dirs.to(device),
                torch.full((n,), near, device=device),
                torch.full((n,), far, device=device),
                background.to(device),
                state,
                alpha,
                jitter=False,
                learned=True,
                skip_empty=SKIP_EMPTY,
                proposal=None if proposal is None else proposal.to(device),
                propose=proposals,
            )
            return out["colour"], out["alpha"], out["proposal"]  # the proposal None unless `proposals`

        return render_rays(
            trace,
            view.camera_to_head,
            view.focal,
            view.size,
            view.background,
            4096,
            adaptive=adaptive,
            proposals=proposals,
        )

    def rendering_note(self) -> str:
        return adaptive_note(self.cfg)

    # --- test frames ------------------------------------------------------------------------------
    def test_views(self, protocol: str, test: SubjectFrames) -> list[View]:
        if protocol == "fitted":
            codes = self.fit_test_codes(test)
        else:
            codes = self.untested_code().expand(len(test.frames), -1)
        return [
            View(test.camera_to_head[k], test.focal, test.size, test.conditions[k], test.background, codes[k], int(f))
            for k, f in enumerate(test.frames)
        ]

    def fit_test_codes(self, test: SubjectFrames) -> torch.Tensor:
        """Deformation and appearance codes of every fit_every-th test frame fitted to it with the colour loss
        alone, everything else frozen, as the paper fits them (the training's code term, 0.01 times the codes'
        norm, pulls harder than the colour loss on codes near zero and kept them there: measured on lp_d18);
        the frames between take the nearest fitted frame's codes."""
        cfg, device = self.cfg, self.device
        fitted = np.arange(0, len(test.frames), max(1, cfg.fit_every))
        start = self.untested_code().to(device)
        codes = start.expand(len(fitted), -1).clone().requires_grad_(True)
        optimizer = torch.optim.Adam([codes], lr=cfg.fit_learning_rate)
        rng = np.random.default_rng(cfg.seed + 1)
        alpha = float(self.window)
        near_all, far_all = ray_bounds(test.camera_to_head, cfg.scene_radius)
        states = [
            self.frame_state(test.conditions[k], test.camera_to_head[k], start) for k in fitted
        ]  # centres and poses; the codes are swapped in per step
        frozen = [p for p in self.parameters() if p.requires_grad]
        for p in frozen:  # no gradients for what stays fixed
            p.requires_grad_(False)
        bar = progress(range(cfg.fit_steps), cfg.fit_steps, "ldf: test codes", unit="step")
        for _ in bar:
            optimizer.zero_grad()
            total = 0.0
            for i, k in enumerate(fitted):  # one backward per frame keeps the memory of one frame's rays
                pixels = test.sample_pixels(k, cfg.fit_rays, cfg.head_fraction, rng)
                origins, dirs = camera_rays(test.camera_to_head[k], test.focal, test.size, pixels)
                target, background = (t.to(device) for t in test.colours(k, pixels))
                code = codes[i]
                state = dataclasses.replace(
                    states[i], deformation_code=code[: cfg.deformation_code], appearance=code[cfg.deformation_code :]
                )
                n = len(origins)
                out = self.trace(
                    origins.to(device),
                    dirs.to(device),
                    near_all[k].expand(n).to(device),
                    far_all[k].expand(n).to(device),
                    background,
                    state,
                    alpha,
                    jitter=True,
                    learned=True,
                )
                loss = (out["colour"] - target).norm(dim=-1).mean() / len(fitted)
                loss.backward()
                total += loss.item()
            optimizer.step()
            bar.set_postfix(loss=f"{total:.4f}", refresh=False)
        bar.close()
        for p in frozen:
            p.requires_grad_(True)
        nearest = np.abs(np.arange(len(test.frames))[:, None] - fitted[None]).argmin(1)
        return codes.detach()[torch.as_tensor(nearest)].cpu()

    # --- exports ----------------------------------------------------------------------------------
    def exports(self, folder: Path, test: SubjectFrames, views: list[View]) -> dict:
        """attention.png (which fields each coefficient reaches, over the canonical head) and, with sweep
        frames, local_edit.mp4 (the eye coefficients alone moved, then the mouth's)."""
        neutral = self.view(self.train_frames, 0)
        names = self.condition_names()
        out = {"attention": self.draw_attention(folder / "attention.png", neutral, names)}
        if self.cfg.sweep_frames:
            out["local_edit"] = self.local_edit_video(folder / "local_edit.mp4", neutral, names)
        return out

    def condition_names(self) -> list[str]:
        expression = [str(n) for n in self.train_frames.tracking["expression_names"]]
        joints = self.train_frames.conditions.shape[1] - len(expression)
        return expression + [f"joint_{j // 3}_{'xyz'[j % 3]}" for j in range(joints)]

    def draw_attention(self, path: Path, neutral: View, names: list[str]) -> dict:
        """Panels of the canonical head (every coefficient zero) with the field centres: filled where the
        panel's coefficients reach the field. Panels: the eye and mouth edit groups, then the four
        coefficients that vary most over the training frames."""
        canonical = dataclasses.replace(neutral, conditions=torch.zeros_like(neutral.conditions))
        image, _ = self.render(canonical)
        base = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
        cam = head_to_camera_cv(neutral.camera_to_head)
        points = self.canonical_centres.cpu() @ cam[:3, :3].T + cam[:3, 3]
        pixels = project(points, neutral.focal, neutral.size).numpy()
        spread = self.train_frames.conditions.std(0).numpy()
        panels = [(region, self.head.region_coefficients(self.attention, region)) for region in EDIT_REGIONS]
        panels += [(names[c], [c]) for c in np.argsort(-spread)[:4]]
        radius = max(2, neutral.size // 64)
        drawn = []
        for title, coefficients in panels:
            panel = base.copy()
            reached = self.attention[:, coefficients].any(1) if coefficients else np.zeros(len(pixels), bool)
            for (x, y), hit in zip(pixels, reached):
                centre = (int(round(x)), int(round(y)))
                cv2.circle(panel, centre, radius, (230, 30, 30) if hit else (200, 200, 200), -1 if hit else 1)
            cv2.putText(panel, title, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
            drawn.append(panel)
        rows = [np.concatenate(drawn[i : i + 3], 1) for i in range(0, len(drawn), 3)]
        cache.write_png(path, np.concatenate(rows, 0))
        return {title: [names[c] for c in coefficients] for title, coefficients in panels}

    def local_edit_video(self, path: Path, neutral: View, names: list[str]) -> dict:
        """The first training frame with only one region's coefficients moved to their training maximum
        and back (sweep_frames for each region), everything else as tracked."""
        frames = self.cfg.sweep_frames
        high = self.train_frames.conditions.max(0).values
        groups = {region: self.head.region_coefficients(self.attention, region) for region in EDIT_REGIONS}
        size = neutral.size
        with VideoWriter(path, size, size) as video:
            for region, coefficients in groups.items():
                for i in progress(range(frames), frames, f"ldf: local edit ({region})"):
                    amount = 0.5 * (1 - math.cos(2 * math.pi * i / frames))
                    conditions = neutral.conditions.clone()
                    conditions[coefficients] += amount * (high[coefficients] - conditions[coefficients])
                    image, _ = self.render(dataclasses.replace(neutral, conditions=conditions))
                    frame = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
                    cv2.putText(frame, region, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
                    video.write(frame)
        return {region: [names[c] for c in coefficients] for region, coefficients in groups.items()}
