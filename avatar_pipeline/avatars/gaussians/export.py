"""What a Gaussian avatar leaves beside its renders: its Gaussians as 3D Gaussian splatting PLYs (the layout
splat viewers read: position, normal, f_dc_0-2, f_rest_*, opacity as a logit, log-scales, rotation w x y z)
and a page of expression sliders over precomputed renders."""

from __future__ import annotations

import dataclasses
import html
import json
from pathlib import Path

import numpy as np
import torch

from ... import cache
from ...runtime import progress
from ..base import View


@torch.no_grad()
def write_ply(model, view: View, path: Path) -> Path:
    """The head's Gaussians under the view's conditions, in the head model's frame (metres), as a binary PLY
    (the body's, held in the camera's space, are left out)."""
    splats, _, _ = model.splats(view, body=False)
    sh = torch.cat([model.sh_constant, model.sh_higher], 1)  # (N, K, 3)
    rest = sh[:, 1:].transpose(1, 2).reshape(len(sh), -1)  # channel-major, as 3DGS lays it out
    quats = torch.nn.functional.normalize(splats.quats, dim=-1)
    opacity = splats.opacities.clamp(1e-6, 1 - 1e-6)
    columns = [
        ("x", splats.means[:, 0]),
        ("y", splats.means[:, 1]),
        ("z", splats.means[:, 2]),
        *((f"n{a}", torch.zeros(len(sh))) for a in "xyz"),
        *((f"f_dc_{c}", sh[:, 0, c]) for c in range(3)),
        *((f"f_rest_{i}", rest[:, i]) for i in range(rest.shape[1])),
        ("opacity", torch.log(opacity / (1 - opacity))),
        *((f"scale_{i}", torch.log(splats.scales[:, i])) for i in range(3)),
        *((f"rot_{i}", quats[:, i]) for i in range(4)),
    ]
    table = np.stack([c.detach().cpu().numpy().astype("<f4") for _, c in columns], 1)
    header = ["ply", "format binary_little_endian 1.0", f"element vertex {len(table)}"]
    header += [f"property float {name}" for name, _ in columns] + ["end_header", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    with cache.atomic_file(path, ".tmp.ply") as tmp:
        tmp.write_bytes("\n".join(header).encode() + np.ascontiguousarray(table).tobytes())
    return path


def read_ply(path: Path) -> dict[str, np.ndarray]:
    """The columns of a PLY written by write_ply (float properties of one vertex element)."""
    data = Path(path).read_bytes()
    end = data.index(b"end_header\n") + len(b"end_header\n")
    lines = data[:end].decode().splitlines()
    count = int(next(line.split()[-1] for line in lines if line.startswith("element vertex")))
    names = [line.split()[-1] for line in lines if line.startswith("property float")]
    table = np.frombuffer(data[end:], "<f4", count * len(names)).reshape(count, len(names))
    return {name: table[:, i] for i, name in enumerate(names)}


@torch.no_grad()
def slider_page(model, base: View, folder: Path) -> dict:
    """folder/index.html: one slider per expression (the ones that vary most over the training frames), each
    moving that coefficient across its training range with the others as in `base`; every position is a
    precomputed render (folder/<expression>_<step>.jpg), so the page works offline from the report."""
    cfg = model.cfg
    train = model.train_frames
    names = model.head_model.expression_names[: model.expression_count]
    spread = train.conditions[:, : model.expression_count].std(0)
    chosen = torch.argsort(spread, descending=True)[: cfg.slider_expressions].tolist()
    low, high = train.conditions.min(0).values, train.conditions.max(0).values
    folder.mkdir(parents=True, exist_ok=True)
    values = {index: np.linspace(float(low[index]), float(high[index]), cfg.slider_steps) for index in chosen}
    jobs = [(index, step) for index in chosen for step in range(cfg.slider_steps)]
    files: dict[int, list[str]] = {index: [] for index in chosen}
    for index, step in progress(jobs, len(jobs), "gaussians: slider renders"):
        conditions = base.conditions.clone()
        conditions[index] = float(values[index][step])
        image, _ = model.render(dataclasses.replace(base, conditions=conditions))
        files[index].append(f"{names[index]}_{step}.jpg")
        _write_jpeg(folder / files[index][-1], image)
    sliders = [
        {
            "name": names[index],
            "files": files[index],
            "values": values[index].round(3).tolist(),
            "start": int(np.argmin(np.abs(values[index] - float(base.conditions[index])))),
        }
        for index in chosen
    ]
    cache.write_text(folder / "index.html", _page(sliders))
    return {"page": str(folder / "index.html"), "expressions": [s["name"] for s in sliders]}


def _write_jpeg(path: Path, image: torch.Tensor) -> None:
    import cv2

    rgb = (image.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 92])
    if not ok:
        raise RuntimeError(f"could not encode {path}")
    with cache.atomic_file(path, ".tmp.jpg") as tmp:
        tmp.write_bytes(encoded.tobytes())


def _page(sliders: list[dict]) -> str:
    first = sliders[0]["files"][sliders[0]["start"]] if sliders else ""
    rows = "\n".join(
        f'<label>{html.escape(s["name"])} <input type="range" min="0" max="{len(s["files"]) - 1}" '
        f'value="{s["start"]}" data-slider="{i}"> <output id="value{i}"></output></label>'
        for i, s in enumerate(sliders)
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Gaussian avatar: expression sliders</title>
<style>body{{font-family:sans-serif;margin:1em}} label{{display:block;margin:.4em 0}}</style>
</head><body>
<h1>Expression sliders</h1>
<p>Each slider moves one expression coefficient over its range in the training frames, the others as in the
first test frame. The images are renders of the avatar made when it was evaluated.</p>
<img id="render" src="{html.escape(first)}" width="384" alt="avatar render">
{rows}
<script>
const sliders = {json.dumps(sliders)};
const image = document.getElementById("render");
function show(i, position) {{
  const s = sliders[i];
  image.src = s.files[position];
  document.getElementById("value" + i).textContent = s.values[position].toFixed(2);
  // one slider at a time: the others return to the frame's own value
  document.querySelectorAll("input[data-slider]").forEach((other) => {{
    const j = Number(other.dataset.slider);
    if (j !== i) {{ other.value = sliders[j].start; document.getElementById("value" + j).textContent = ""; }}
  }});
}}
document.querySelectorAll("input[data-slider]").forEach((input) => {{
  input.addEventListener("input", () => show(Number(input.dataset.slider), Number(input.value)));
}});
</script>
</body></html>
"""
