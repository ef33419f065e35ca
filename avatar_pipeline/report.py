"""HTML reports: one per subject (preprocessing QA, tracking, every avatar's training and test results)
and an index across subjects with a metrics table (results/metrics.csv).

Reports link to the images and videos in the subject's cache rather than copying them; the training
curves are drawn here. Anything that fell back or is unavailable is stated where its numbers are.
"""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

from . import cache

HEADLINE = ("psnr", "ssim", "ms_ssim", "l1", "lpips", "cpbd", "csim")
STYLE = """<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.warn{background:#fff3cd;padding:.5em;border-left:4px solid #e0a800}img{max-width:100%}
video{max-width:100%;height:auto;image-rendering:pixelated}
.summary{background:#f4f6fa;padding:.2em 1em 1em;border-radius:6px}.fallback{color:#8a4b00}</style>"""
esc = html.escape


def training_curve(log_csv: Path, out_png: Path) -> bool:
    """Loss and PSNR (train, and validation where logged) against steps and wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = cache.read_training_log(log_csv)
    if not rows:
        return False
    steps = [int(r["step"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.semilogy(steps, [float(r["loss"]) for r in rows], lw=0.5)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax2.plot(steps, [float(r["psnr"]) for r in rows], lw=0.3, alpha=0.5, label="train batch PSNR")
    for row, previous in zip(rows[1:], rows):  # where a method's next phase starts
        if row["phase"] != previous["phase"]:
            for ax in (ax1, ax2):
                ax.axvline(int(row["step"]), color="grey", lw=0.8, ls="--")
            ax1.annotate(row["phase"], (int(row["step"]), 1), xycoords=("data", "axes fraction"), fontsize=8)
    for column, label in (("val_psnr", "held-out frame PSNR"), ("val_head_psnr", "held-out frame, head mask")):
        val = [(int(r["step"]), float(r[column])) for r in rows if r.get(column)]
        if val:
            ax2.plot(*zip(*val), "o-", label=label)
    ax2.set_xlabel("step")
    ax2.set_ylabel("PSNR (dB)")
    ax2.legend()
    minutes = float(rows[-1]["seconds"]) / 60
    fig.suptitle(f"{len(rows)} steps in {minutes:.1f} min")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    _write_bytes(out_png, buffer.getvalue())
    return True


def _write_bytes(path: Path, data: bytes) -> None:
    with cache.atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _metrics_table(summary: dict) -> str:
    rows = []
    for protocol, values in summary.get("protocols", {}).items():
        for prefix, where in (("", "full frame"), ("head_", "head mask")):
            cells = "".join(
                f"<td>{values[prefix + k]:.4g}</td>" if prefix + k in values else "<td>n/a</td>" for k in HEADLINE
            )
            rows.append(f"<tr><th>{esc(protocol)}</th><th>{where}</th>{cells}</tr>")
    head = "".join(f"<th>{k}</th>" for k in HEADLINE)
    return f"<table><tr><th>test latents</th><th>region</th>{head}</tr>{''.join(rows)}</table>"


def _video(rel: str, caption: str, width: int = 480) -> str:
    # shown at a fixed width whatever the render size, so a 128 px render is not a thumbnail
    return (
        f"<figure><video src='{esc(rel)}' width='{width}' controls loop muted autoplay playsinline></video>"
        f"<figcaption>{esc(caption)}</figcaption></figure>"
    )


def _unavailable_metrics(summary: dict) -> list[str]:
    """The optional metrics an evaluation could not compute, each with its reason (metrics.json says it)."""
    return [
        f"{key.upper()} unavailable: {summary[key]}" for key in ("lpips", "csim") if not summary.get(f"{key}_available")
    ]


def _summary(store: cache.SubjectCache, avatars: list[str], qa: dict, tracking: dict) -> str:
    """The top of a subject's page: what ran, what fell back or warned and why, and each avatar's
    headline test metrics side by side."""
    ran = []
    if qa:
        sizes = qa["split_sizes"]
        source = qa["source"]
        turned = f", turned {source['upright_rotation']}° upright" if source.get("upright_rotation") else ""
        ran.append(
            f"Preprocessing: {qa['frames']} frames at {qa['size']} px from {Path(source['path']).name} "
            f"({source['width']}x{source['height']}, {source['fps']:.3g} fps{turned}); split train / val / "
            f"test {sizes['train']} / {sizes['val']} / {sizes['test']}; landmarks {qa['landmarks']['backend']}, "
            f"parsing {qa['parsing']['backend']}, normals {qa['normals']['backend']}, background "
            f"{qa['background']['source']} ({100 * qa['background']['covered_fraction']:.0f}% of pixels seen)."
        )
    if tracking:
        ran.append(
            f"Tracking: {tracking.get('model')} model, {tracking.get('fitted_frames')}/{tracking.get('frames')} "
            f"frames fitted, reprojection error {tracking.get('reprojection_error_px', {}).get('mean')} px."
        )
    notes = [("crop", w) for w in qa.get("warnings", [])] + [("tracking", w) for w in tracking.get("warnings", [])]
    rows = []
    for name in avatars:
        done, summary = store.training_summary(name), store.evaluation_summary(name)
        if done is None:
            notes.append((f"avatar {name}", "not trained"))
            continue
        if done.get("stopped_by_time_budget"):
            notes.append(
                (
                    f"avatar {name}",
                    f"training stopped by its time budget at step {done['steps']} of {done['planned_steps']}",
                )
            )
        if summary is None:
            notes.append((f"avatar {name}", "not evaluated"))
            continue
        notes += [(f"avatar {name}", text) for text in _unavailable_metrics(summary)]
        values = summary["protocols"][summary["headline_protocol"]]
        cells = "".join(
            f"<td>{values[k]:.4g}</td>" if values.get(k) is not None else "<td>n/a</td>"
            for k in ("psnr", "ssim", "ms_ssim", "l1", "lpips", "head_psnr")
        )
        rows.append(
            f"<tr><th><a href='#avatar-{esc(name)}'>{esc(name)}</a></th><td>{esc(done.get('method', ''))}</td>"
            f"<td>{done['steps']}</td><td>{done['seconds'] / 60:.1f}</td><td>{len(summary['test_frames'])}</td>"
            f"<td>{esc(summary['headline_protocol'])}</td>{cells}</tr>"
        )
    parts = ["<div class='summary'><h2>Summary</h2>"] + [f"<p>{esc(line)}</p>" for line in ran]
    if notes:
        parts.append(
            "<p><b>Fallbacks and warnings</b></p><ul>"
            + "".join(
                f"<li class='{'fallback' if 'FALLBACK' in text else 'note'}'><b>{esc(where)}</b>: {esc(text)}</li>"
                for where, text in notes
            )
            + "</ul>"
        )
    else:
        parts.append("<p>Nothing fell back; no warnings.</p>")
    if rows:
        parts.append(
            "<table><tr><th>avatar</th><th>method</th><th>steps</th><th>training min</th><th>test frames</th>"
            "<th>test latents</th><th>PSNR</th><th>SSIM</th><th>MS-SSIM</th><th>L1</th><th>LPIPS</th>"
            "<th>head PSNR</th></tr>" + "".join(rows) + "</table>"
        )
    return "".join(parts) + "</div>"


def subject_report(store: cache.SubjectCache, avatars: list[str]) -> Path:
    """results/{subject}/report/index.html (plus training-curve images), written atomically as one folder."""
    qa = cache.read_optional_json(store.stage_dir("qa") / "summary.json") or {}
    tracking = cache.read_optional_json(store.stage_dir("tracking") / "meta.json") or {}
    parts = [
        f"<!doctype html><meta charset='utf-8'><title>{esc(store.subject)}</title>{STYLE}",
        f"<h1>{esc(store.subject)}</h1><p><a href='../../index.html'>all subjects</a></p>",
        _summary(store, avatars, qa, tracking),
    ]
    parts.append("<h2>Preprocessing</h2>")
    for warning in qa.get("warnings", []):
        parts.append(f"<p class='warn'>{esc(str(warning))}</p>")
    parts.append("<p><a href='../qa/report.html'>full QA report</a></p><img src='../qa/contact_sheet.png'>")
    parts.append(_video("../qa/overlay.mp4", "landmarks, parsing and normals over the frames"))
    parts.append("<h2>Tracking</h2>")
    for warning in tracking.get("warnings", []):
        parts.append(f"<p class='warn'>{esc(str(warning))}</p>")  # each names its kind (FALLBACK: ...)
    if tracking:
        error = tracking.get("reprojection_error_px", {})
        parts.append(
            f"<p>model <b>{esc(str(tracking.get('model')))}</b>, {tracking.get('fitted_frames')}/"
            f"{tracking.get('frames')} frames fitted, reprojection error {error.get('mean')} px (mean), "
            f"focal {tracking.get('focal_px')} px, refinement {esc(str(tracking.get('refinement')))}</p>"
        )
    parts.append(_video("../tracking/overlay.mp4", "fitted model over the frames"))
    with cache.staged_dir(store.root / "report") as out:
        for name in avatars:
            parts.append(_avatar_section(store, name, out))
        (out / "index.html").write_text("\n".join(parts), encoding="utf-8")
    return store.root / "report" / "index.html"


def _avatar_section(store: cache.SubjectCache, name: str, out: Path) -> str:
    folder = store.avatar_dir(name)
    done, summary = store.training_summary(name), store.evaluation_summary(name)
    parts = [f"<h2 id='avatar-{esc(name)}'>Avatar {esc(name)}</h2>"]
    if done is None:
        return parts[0] + "<p class='warn'>not trained</p>"
    settings = done.get("settings", {})
    throughput = f", {done['matmul_gflops']} GFLOP/s matrix products" if done.get("matmul_gflops") else ""
    budget = " (stopped by its time budget)" if done.get("stopped_by_time_budget") else ""
    parts.append(
        f"<p>{done['steps']} steps{budget} on {done['frames']} frames at {done['size']} px, "
        f"{done['seconds'] / 60:.1f} min on {esc(done['device'])} ({esc(done['precision'])}"
        f"{esc(throughput)}; {esc(done.get('cpu', ''))})</p>"
        f"<details><summary>training settings</summary><pre>{esc(json.dumps(settings, indent=1))}</pre></details>"
    )
    if training_curve(folder / "train" / "log.csv", out / f"curve_{name}.png"):
        parts.append(f"<img src='curve_{esc(name)}.png'>")
    validation = sorted((folder / "train" / "validation").glob("*.png"))
    if validation:
        parts.append(
            f"<figure><img src='../avatars/{esc(name)}/train/validation/{validation[-1].name}' width='640'>"
            f"<figcaption>last validation render (ground truth | render)</figcaption></figure>"
        )
    if summary is None:
        return "".join(parts) + "<p class='warn'>not evaluated</p>"
    parts.append(f"<h3>Held-out test frames ({len(summary['test_frames'])}, {summary['size']} px)</h3>")
    parts.append(_metrics_table(summary))
    parts.append(
        f"<p>headline: <b>{esc(summary['headline_protocol'])}</b> latent codes. "
        f"MS-SSIM over {summary['ms_ssim_scales']} scale(s).</p>"
    )
    parts += [f"<p class='warn'>{esc(text)}</p>" for text in _unavailable_metrics(summary)]
    if summary.get("rendering"):
        parts.append(f"<p>rendered with {esc(summary['rendering'])}</p>")
    rel = f"../avatars/{name}/eval"
    parts.append(_video(f"{rel}/test.mp4", "test frames: ground truth | render | error x4", width=1080))
    for video, caption in (
        ("orbit.mp4", "novel head poses"),
        ("sweep.mp4", f"expression edit: {summary.get('sweep', {}).get('expression', '')}"),
        ("reenact.mp4", f"reenactment driven by {summary.get('reenactment', {}).get('driver', '')}"),
        ("mesh_overlay.mp4", "the avatar's mesh over the test frames"),
        ("local_edit.mp4", "local edits: only the eye coefficients moved, then only the mouth's"),
    ):
        if (folder / "eval" / video).exists():
            parts.append(_video(f"{rel}/{video}", caption))
    if (folder / "eval" / "mesh" / "canonical.obj").exists():
        parts.append(
            f"<p>Meshes: <a href='{rel}/mesh/canonical.obj'>canonical.obj</a> (with canonical.mtl and the baked "
            f"texture below; static part of the colour), test frames as PLY in <a href='{rel}/mesh/frames/'>"
            f"mesh/frames/</a></p><img src='{rel}/mesh/texture.png' width='960'>"
        )
    if (folder / "eval" / "attention.png").exists():
        parts.append(
            f"<p>Attention masks: the field centres each coefficient group reaches (filled), over the canonical "
            f"head</p><img src='{rel}/attention.png' width='720'>"
        )
    if (folder / "eval" / "gaussians" / "canonical.ply").exists():
        parts.append(
            f"<p>Gaussians: <a href='{rel}/gaussians/canonical.ply'>canonical.ply</a> (3D Gaussian splatting "
            f"layout, opens in splat viewers), test frames as PLY in <a href='{rel}/gaussians/'>gaussians/</a></p>"
        )
    if (folder / "eval" / "sliders" / "index.html").exists():
        parts.append(
            f"<p>Expression sliders: <a href='{rel}/sliders/index.html'>drag an expression, see the avatar</a></p>"
            f"<iframe src='{rel}/sliders/index.html' width='720' height='720' title='expression sliders'></iframe>"
        )
    parts.append(f"<details><summary>metric definitions</summary><pre>{esc(summary['metrics_doc'])}</pre></details>")
    return "".join(parts)


def index(results: Path, subjects: list[str], avatars: list[str]) -> Path:
    """results/index.html and results/metrics.csv: headline metrics of every subject and avatar."""
    rows = []
    for subject in subjects:
        store = cache.SubjectCache(results, subject)
        for name in avatars:
            summary = store.evaluation_summary(name)
            if summary is None:
                continue
            protocol = summary["headline_protocol"]
            values = summary["protocols"][protocol]
            rows.append(
                {
                    "subject": subject,
                    "avatar": name,
                    "protocol": protocol,
                    "frames": len(summary["test_frames"]),
                    "size": summary["size"],
                    **{k: values.get(k) for k in HEADLINE},
                    **{f"head_{k}": values.get(f"head_{k}") for k in HEADLINE},
                }
            )
    fields = ["subject", "avatar", "protocol", "frames", "size"] + list(HEADLINE) + [f"head_{k}" for k in HEADLINE]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    _write_bytes(results / "metrics.csv", text.getvalue().encode())
    body = "".join(
        f"<tr><td><a href='{esc(r['subject'])}/report/index.html'>{esc(r['subject'])}</a></td>"
        f"<td>{esc(r['avatar'])}</td><td>{esc(r['protocol'])}</td><td>{r['frames']}</td>"
        + "".join(f"<td>{r[k]:.4g}</td>" if r[k] is not None else "<td>n/a</td>" for k in HEADLINE)
        + "</tr>"
        for r in rows
    )
    listed = {r["subject"] for r in rows}
    others = "".join(f"<li><a href='{esc(s)}/report/index.html'>{esc(s)}</a></li>" for s in subjects if s not in listed)
    page = (
        f"<!doctype html><meta charset='utf-8'><title>avatar-pipeline results</title>{STYLE}<h1>Results</h1>"
        "<p>Test-frame metrics, full frame (head-mask values in metrics.csv and the subject reports).</p>"
        f"<table><tr><th>subject</th><th>avatar</th><th>test latents</th><th>frames</th>"
        + "".join(f"<th>{k}</th>" for k in HEADLINE)
        + f"</tr>{body}</table>"
        + (f"<h2>Subjects without avatar results</h2><ul>{others}</ul>" if others else "")
    )
    _write_bytes(results / "index.html", page.encode())
    return results / "index.html"
