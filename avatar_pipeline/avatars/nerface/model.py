"""NeRFace on the avatar core: what the method adds to the shared trainer and evaluation.

Per the paper: per-frame learnable latent codes (32-d) regularised with an l2 penalty (weight 0.05),
Adam, rays sampled 95% inside the head's bounding box, the loss on both coarse and fine colours.

Test-frame conditioning, by protocol:
- `optimised`: the network frozen, every test frame's latent code (and, with pose_correction, a small
  rigid correction of its tracked pose) is optimised against that frame with the RGB loss and the
  training's l2 prior, all test frames in one batch;
- `first_train_frame`: the latent code of the first training frame for every test frame (NeRFace's
  protocol, Gafni et al. 2021, Sec. 4.4).
"""

from __future__ import annotations

import numpy as np
import torch

from ...geometry import camera_rays, rigidly_moved
from ...runtime import progress
from ..base import AvatarModel, Phase, View
from ..data import ErrorMap, SubjectFrames, psnr
from ..volume import (
    SKIP_EMPTY,
    OccupancyGrid,
    adaptive_note,
    adaptive_sampling,
    distortion_loss,
    ray_bounds,
    render_rays,
)
from .config import NeRFaceConfig
from .field import NeRFaceRenderer

# the training grid (train_occupancy_cells > 0), as in Instant-NGP: updated every few steps, each cell's
# density decaying by this factor per update unless measured again; nothing is culled in the first steps.
# Its threshold is fixed (occupancy_threshold is an evaluation setting, which must not change training)
OCCUPANCY_UPDATE_EVERY = 16
OCCUPANCY_TRAINING_THRESHOLD = 1e-3
OCCUPANCY_DECAY = 0.95
OCCUPANCY_WARMUP = 256


class NeRFaceModel(AvatarModel):
    # "mask" last: a training log written before "distortion" existed still resumes (cache.open_training_log)
    loss_terms = ("coarse", "fine", "latent", "distortion", "mask")
    protocols = ("optimised", "first_train_frame")

    def __init__(self, cfg: NeRFaceConfig, train: SubjectFrames, device: torch.device):
        super().__init__()
        self.cfg, self.train_frames, self.device = cfg, train, device
        self.renderer = NeRFaceRenderer(
            cfg.field(train.conditions.shape[1]),
            cfg.coarse_samples,
            cfg.fine_samples,
            cfg.resolved_precision(device),
            cfg.chunk_samples,
        ).to(device)
        self.precision = self.renderer.precision
        self.latents = torch.nn.Embedding(len(train.frames), cfg.latent_dim).to(device)
        torch.nn.init.zeros_(self.latents.weight)
        self.errors = (
            ErrorMap(len(train.frames), cfg.size, cfg.error_sampling)
            if cfg.error_sampling > 0 and train.images is not None
            else None
        )
        self.near, self.far = ray_bounds(train.camera_to_head, cfg.scene_radius)
        self.occupancy: OccupancyGrid | None = None  # measured from the fields when first rendered
        # kept up to date while training, to skip the samples in empty space there
        self.training_occupancy = None
        if cfg.train_occupancy_cells > 0:
            grid = OccupancyGrid(cfg.scene_radius, cfg.train_occupancy_cells, OCCUPANCY_TRAINING_THRESHOLD, device)
            grid.restrict_to_views(train.camera_to_head, train.focal, train.size)
            self.training_occupancy = grid
        self.steps_taken = 0

    @classmethod
    def training_data(cls, cfg: NeRFaceConfig) -> dict:
        return {"with_mattes": cfg.mask_weight > 0}

    def describe(self) -> str:
        cfg = self.cfg
        return f"{cfg.rays} rays x ({cfg.coarse_samples} + {cfg.fine_samples}) samples per step"

    def memory_hint(self) -> str:
        return f"lower `rays` (now {self.cfg.rays}) or the network width of this avatar in config.yaml"

    def phases(self) -> list[Phase]:
        cfg = self.cfg
        optimizer = torch.optim.Adam(self.parameters(), lr=cfg.learning_rate)
        return [Phase("train", cfg.steps, optimizer, cfg.final_learning_rate / cfg.learning_rate)]

    def training_step(self, phase: Phase, rng: np.random.Generator):
        cfg, data, device = self.cfg, self.train_frames, self.device
        self.occupancy = None  # the fields change: a grid measured before this step is out of date
        k = int(rng.integers(len(data.frames)))
        pixels, *rays = data.sample(k, cfg.rays, cfg.head_fraction, rng, self.errors)
        origins, dirs, target, background, matte = (None if t is None else t.to(device) for t in rays)
        condition = torch.cat([data.conditions[k].to(device), self.latents.weight[k]])
        near = self.near[k].expand(len(origins)).to(device)
        far = self.far[k].expand(len(origins)).to(device)
        out = self.renderer(origins, dirs, near, far, condition, background, occupancy=self._training_grid(rng))
        self.steps_taken += 1
        mse_fine = ((out["fine"] - target) ** 2).mean()
        terms = {
            "coarse": ((out["coarse"] - target) ** 2).mean(),
            "fine": mse_fine,
            "latent": cfg.latent_weight * (self.latents.weight[k] ** 2).sum(),
        }
        if cfg.distortion_weight > 0:
            terms["distortion"] = cfg.distortion_weight * (
                distortion_loss(out["coarse_weights"], out["coarse_depths"], near, far)
                + distortion_loss(out["fine_weights"], out["fine_depths"], near, far)
            )
        if matte is not None:
            terms["mask"] = cfg.mask_weight * (
                ((out["coarse_alpha"] - matte) ** 2).mean() + ((out["fine_alpha"] - matte) ** 2).mean()
            )
        if self.errors is not None:
            self.errors.update(k, pixels, ((out["fine"].detach() - target) ** 2).mean(-1).cpu())
        return terms, psnr(mse_fine.item())

    def _training_grid(self, rng: np.random.Generator) -> OccupancyGrid | None:
        """The training grid, updated when due from both fields under a random training frame's condition;
        None while it is off or warming up."""
        grid = self.training_occupancy
        if grid is None or self.steps_taken < OCCUPANCY_WARMUP - OCCUPANCY_UPDATE_EVERY:
            return None
        if self.steps_taken % OCCUPANCY_UPDATE_EVERY == 0:
            data = self.train_frames
            k = int(rng.integers(len(data.frames)))
            condition = torch.cat([data.conditions[k].to(self.device), self.latents.weight[k].detach()])
            generator = torch.Generator().manual_seed(int(rng.integers(2**31)))
            grid.update(lambda points: self.renderer.peak_density(points, condition[None]), OCCUPANCY_DECAY, generator)
        return grid if self.steps_taken >= OCCUPANCY_WARMUP else None

    def extra_state(self) -> dict:
        grid = self.training_occupancy
        return {
            "error_map": None if self.errors is None else self.errors.error,
            "steps_taken": self.steps_taken,
            "training_occupancy": None if grid is None or grid.density is None else grid.density.cpu(),
        }

    def load_extra_state(self, state: dict) -> None:
        if self.errors is not None and state.get("error_map") is not None:
            self.errors.error = state["error_map"]
        self.steps_taken = int(state.get("steps_taken", 0))
        grid = self.training_occupancy
        if grid is not None and state.get("training_occupancy") is not None:
            grid.density = state["training_occupancy"].to(self.device)
            grid.mark_occupied()

    def untested_code(self) -> torch.Tensor:
        return self.latents.weight[0].detach()

    @torch.no_grad()
    def occupancy_grid(self) -> OccupancyGrid | None:
        """The grid of the fields as they are now, measured under `occupancy_conditions` training frames
        spread over the clip (expression and latent code); None when switched off."""
        cfg = self.cfg
        if cfg.occupancy_cells <= 0:
            return None
        if self.occupancy is None:
            data = self.train_frames
            picks = torch.linspace(0, len(data.frames) - 1, cfg.occupancy_conditions).round().long().unique()
            conditions = torch.cat([data.conditions[picks].to(self.device), self.latents.weight[picks]], 1)
            grid = OccupancyGrid(cfg.scene_radius, cfg.occupancy_cells, cfg.occupancy_threshold, self.device)
            grid.restrict_to_views(data.camera_to_head, data.focal, data.size)
            grid.build(lambda points: self.renderer.peak_density(points, conditions))
            self.occupancy = grid
        return self.occupancy

    def render(self, view: View) -> tuple[torch.Tensor, torch.Tensor]:
        condition = torch.cat([view.conditions.to(self.device), view.code.to(self.device)])
        near, far = ray_bounds(view.camera_to_head, self.cfg.scene_radius)
        return render_image(
            self.renderer,
            view.camera_to_head,
            view.focal,
            view.size,
            condition,
            view.background,
            float(near),
            float(far),
            occupancy=self.occupancy_grid(),
            stop_early=self.cfg.early_termination,
            march_samples=self.cfg.march_samples,
            adaptive=adaptive_sampling(self.cfg),
            proposals=self.cfg.neighbour_proposals,
            proposal_sampling=(self.cfg.proposal_samples, self.cfg.proposal_empty_below),
        )

    def rendering_note(self) -> str:
        note, cfg = adaptive_note(self.cfg), self.cfg
        if note and cfg.neighbour_proposals and (cfg.proposal_samples or cfg.proposal_empty_below):
            note += (
                f"; those pixels draw {cfg.proposal_samples or cfg.fine_samples} importance samples and leave out the "
                f"coarse samples where the proposal weighs below {cfg.proposal_empty_below:g} (proposal_samples, "
                "proposal_empty_below)"
            )
        return note

    def test_views(self, protocol: str, test: SubjectFrames) -> list[View]:
        cameras = test.camera_to_head
        if protocol == "optimised":
            latents, cameras = self.optimise_test_latents(test)
        else:
            latents = self.latents.weight[0].detach().expand(len(test.frames), -1)
        return [
            View(cameras[k], test.focal, test.size, test.conditions[k], test.background, latents[k], int(frame))
            for k, frame in enumerate(test.frames)
        ]

    def optimise_test_latents(self, test: SubjectFrames):
        """Per-frame latent codes (and pose corrections) fitted to the test frames with the network frozen."""
        cfg, device, renderer = self.cfg, self.device, self.renderer
        count = len(test.frames)
        latents = self.latents.weight[0].detach().expand(count, -1).clone().to(device).requires_grad_(True)
        correction = torch.zeros(count, 6, device=device, requires_grad=cfg.pose_correction)
        groups = [{"params": [latents]}]
        if cfg.pose_correction:  # a tenth of the step: radians and metres move the image far more than a latent unit
            groups.append({"params": [correction], "lr": 0.1 * cfg.latent_learning_rate})
        optimizer = torch.optim.Adam(groups, lr=cfg.latent_learning_rate)
        rng = np.random.default_rng(cfg.seed + 1)
        near_all, far_all = ray_bounds(test.camera_to_head, cfg.scene_radius)
        bar = progress(range(cfg.latent_steps), cfg.latent_steps, "nerface: test latents", unit="step")
        for _ in bar:
            c2h = rigidly_moved(test.camera_to_head.to(device), correction)
            origins, dirs, target, background, conditions, near, far = [], [], [], [], [], [], []
            for k in range(count):
                pixels = test.sample_pixels(k, cfg.latent_rays, cfg.head_fraction, rng)
                o, d = camera_rays(c2h[k], test.focal, test.size, pixels.to(device))
                t, b = test.colours(k, pixels)
                origins.append(o)
                dirs.append(d)
                target.append(t.to(device))
                background.append(b.to(device))
                conditions.append(torch.cat([test.conditions[k].to(device), latents[k]]).expand(len(d), -1))
                near.append(near_all[k].expand(len(d)).to(device))
                far.append(far_all[k].expand(len(d)).to(device))
            target = torch.cat(target)
            out = renderer(
                torch.cat(origins),
                torch.cat(dirs),
                torch.cat(near),
                torch.cat(far),
                torch.cat(conditions),
                torch.cat(background),
            )
            mse = ((out["fine"] - target) ** 2).mean()
            loss = ((out["coarse"] - target) ** 2).mean() + mse + cfg.latent_weight * (latents**2).sum(1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr(mse.item()):.1f}", refresh=False)
        bar.close()
        return latents.detach(), rigidly_moved(test.camera_to_head.to(device), correction.detach()).cpu()


def render_image(
    renderer: NeRFaceRenderer,
    camera_to_head: torch.Tensor,
    focal: float,
    size: int,
    condition: torch.Tensor,
    background: torch.Tensor,
    near: float,
    far: float,
    rays_per_call: int = 8192,
    occupancy: OccupancyGrid | None = None,
    stop_early: bool = False,
    march_samples: int = 0,
    adaptive: tuple[int, float] | None = None,
    proposals: bool = False,
    proposal_sampling: tuple[int, float] = (0, 0.0),
):
    """Full image (size, size, 3) and foreground alpha (size, size) on the CPU, skipping the samples in the
    empty cells of `occupancy` and, with `stop_early`, those behind the point where a ray has less than
    SKIP_EMPTY of its light left; with march_samples > 0, the fine field alone along that many evenly spaced
    samples (NeRFaceRenderer.render_marched, skipping the same); with `adaptive` (block, tolerance), only the
    pixels volume.adaptive_pixels picks, and with `proposals` as well those traced inside a block place their
    fine samples from its corners' weights instead of a coarse pass (not with march_samples), as
    `proposal_sampling` (NeRFaceRenderer's proposal_samples, proposal_empty_below) says. Out of memory,
    the renderer's sample chunk halves with the rays per call."""
    device = next(renderer.parameters()).device
    stop_below = SKIP_EMPTY if stop_early else 0.0
    proposals = proposals and adaptive is not None and march_samples <= 0

    def trace(origins, dirs, background_colours, proposal=None):
        n = len(origins)
        rays = (
            origins.to(device),
            dirs.to(device),
            torch.full((n,), near, device=device),
            torch.full((n,), far, device=device),
            condition.to(device),
            background_colours.to(device),
        )
        if march_samples > 0:
            return *renderer.render_marched(*rays, occupancy, march_samples, stop_below), None
        out = renderer(
            *rays,
            jitter=False,
            skip_empty=SKIP_EMPTY,
            occupancy=occupancy,
            stop_below=stop_below,
            proposal=None if proposal is None else proposal.to(device),
            propose=proposals,
            proposal_samples=proposal_sampling[0],
            proposal_empty_below=proposal_sampling[1],
        )
        return out["fine"], out["fine_alpha"], out["proposal"]  # the proposal None unless `proposals`

    def shrink():
        renderer.chunk_samples = max(256, renderer.chunk_samples // 2)

    return render_rays(trace, camera_to_head, focal, size, background, rays_per_call, shrink, adaptive, proposals)
