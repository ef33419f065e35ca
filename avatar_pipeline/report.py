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
import os
from pathlib import Path

from . import cache

HEADLINE = ("psnr", "ssim", "ms_ssim", "l1", "lpips", "cpbd", "csim")
STYLE = """<style>body{font-family:sans-serif;max-width:1200px;margin:auto;padding:1em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}
.warn{background:#fff3cd;padding:.5em;border-left:4px solid #e0a800}video,img{max-width:100%}</style>"""
esc = html.escape


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def training_curve(log_csv: Path, out_png: Path) -> bool:
    """Loss and PSNR (train, and validation where logged) against steps and wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log_csv.exists():
        return False
    with open(log_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return False
    steps = [int(r["step"]) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    ax1.semilogy(steps, [float(r["loss"]) for r in rows], lw=0.5)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss")
    ax2.plot(steps, [float(r["psnr_fine"]) for r in rows], lw=0.3, alpha=0.5, label="train batch PSNR")
    val = [(int(r["step"]), float(r["val_psnr"])) for r in rows if r.get("val_psnr")]
    if val:
        ax2.plot(*zip(*val), "o-", label="held-out frame PSNR")
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
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _metrics_table(summary: dict) -> str:
    rows = []
    for protocol, values in summary.get("protocols", {}).items():
        for prefix, where in (("", "full frame"), ("head_", "head mask")):
            cells = "".join(f"<td>{values[prefix + k]:.4g}</td>" if prefix + k in values else "<td>n/a</td>" for k in HEADLINE)
            rows.append(f"<tr><th>{esc(protocol)}</th><th>{where}</th>{cells}</tr>")
    head = "".join(f"<th>{k}</th>" for k in HEADLINE)
    return f"<table><tr><th>test latents</th><th>region</th>{head}</tr>{''.join(rows)}</table>"


def _video(rel: str, caption: str) -> str:
    return f"<figure><video src='{esc(rel)}' controls loop muted></video><figcaption>{esc(caption)}</figcaption></figure>"


def subject_report(store: cache.SubjectCache, avatars: list[str]) -> Path:
    """results/{subject}/report/index.html (plus training-curve images), written atomically as one folder."""
    parts = [f"<!doctype html><meta charset='utf-8'><title>{esc(store.subject)}</title>{STYLE}",
             f"<h1>{esc(store.subject)}</h1><p><a href='../../index.html'>all subjects</a></p>"]
    qa = _load(store.stage_dir("qa") / "summary.json") or {}
    parts.append("<h2>Preprocessing</h2>")
    for warning in qa.get("warnings", []):
        parts.append(f"<p class='warn'>{esc(str(warning))}</p>")
    parts.append("<p><a href='../qa/report.html'>full QA report</a></p><img src='../qa/contact_sheet.png'>")
    parts.append(_video("../qa/overlay.mp4", "landmarks, parsing and normals over the frames"))
    tracking = _load(store.stage_dir("tracking") / "meta.json") or {}
    parts.append("<h2>Tracking</h2>")
    for warning in tracking.get("warnings", []):
        parts.append(f"<p class='warn'>{esc(str(warning))}</p>")  # each names its kind (FALLBACK: ...)
    if tracking:
        error = tracking.get("reprojection_error_px", {})
        parts.append(f"<p>model <b>{esc(str(tracking.get('model')))}</b>, {tracking.get('fitted_frames')}/"
                     f"{tracking.get('frames')} frames fitted, reprojection error {error.get('mean')} px (mean), "
                     f"focal {tracking.get('focal_px')} px, refinement {esc(str(tracking.get('refinement')))}</p>")
    parts.append(_video("../tracking/overlay.mp4", "fitted model over the frames"))
    with cache.staged_dir(store.root / "report") as out:
        for name in avatars:
            parts.append(_avatar_section(store, name, out))
        (out / "index.html").write_text("\n".join(parts), encoding="utf-8")
    return store.root / "report" / "index.html"


def _avatar_section(store: cache.SubjectCache, name: str, out: Path) -> str:
    folder = store.avatar_dir(name)
    done = _load(folder / "train" / "done.json")
    summary = _load(folder / "eval" / "metrics.json")
    parts = [f"<h2>Avatar {esc(name)}</h2>"]
    if done is None:
        return parts[0] + "<p class='warn'>not trained</p>"
    settings = done.get("settings", {})
    parts.append(f"<p>{done['steps']} steps on {done['frames']} frames at {done['size']} px, "
                 f"{done['seconds'] / 60:.1f} min on {esc(done['device'])} ({esc(done['precision'])})</p>"
                 f"<details><summary>training settings</summary><pre>{esc(json.dumps(settings, indent=1))}</pre></details>")
    if training_curve(folder / "train" / "log.csv", out / f"curve_{name}.png"):
        parts.append(f"<img src='curve_{esc(name)}.png'>")
    validation = sorted((folder / "train" / "validation").glob("*.png"))
    if validation:
        parts.append(f"<figure><img src='../avatars/{esc(name)}/train/validation/{validation[-1].name}'>"
                     f"<figcaption>last validation render (ground truth | render)</figcaption></figure>")
    if summary is None:
        return "".join(parts) + "<p class='warn'>not evaluated</p>"
    parts.append(f"<h3>Held-out test frames ({len(summary['test_frames'])}, {summary['size']} px)</h3>")
    parts.append(_metrics_table(summary))
    parts.append(f"<p>headline: <b>{esc(summary['headline_protocol'])}</b> latent codes. "
                 f"MS-SSIM over {summary['ms_ssim_scales']} scale(s).</p>")
    for key in ("lpips", "csim"):
        if not summary.get(f"{key}_available"):
            parts.append(f"<p class='warn'>{key.upper()} unavailable: {esc(summary[key])}</p>")
    rel = f"../avatars/{name}/eval"
    parts.append(_video(f"{rel}/test.mp4", "test frames: ground truth | render | error x4"))
    for video, caption in (("orbit.mp4", "novel head poses"), ("sweep.mp4", f"expression edit: {summary.get('sweep', {}).get('expression', '')}"),
                           ("reenact.mp4", f"reenactment driven by {summary.get('reenactment', {}).get('driver', '')}")):
        if (folder / "eval" / video).exists():
            parts.append(_video(f"{rel}/{video}", caption))
    parts.append(f"<details><summary>metric definitions</summary><pre>{esc(summary['metrics_doc'])}</pre></details>")
    return "".join(parts)


def index(results: Path, subjects: list[str], avatars: list[str]) -> Path:
    """results/index.html and results/metrics.csv: headline metrics of every subject and avatar."""
    rows = []
    for subject in subjects:
        store = cache.SubjectCache(results, subject)
        for name in avatars:
            summary = _load(store.avatar_dir(name) / "eval" / "metrics.json")
            if summary is None:
                continue
            protocol = summary["headline_protocol"]
            values = summary["protocols"][protocol]
            rows.append({"subject": subject, "avatar": name, "protocol": protocol, "frames": len(summary["test_frames"]),
                         "size": summary["size"], **{k: values.get(k) for k in HEADLINE},
                         **{f"head_{k}": values.get(f"head_{k}") for k in HEADLINE}})
    fields = ["subject", "avatar", "protocol", "frames", "size"] + list(HEADLINE) + [f"head_{k}" for k in HEADLINE]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    _write_bytes(results / "metrics.csv", text.getvalue().encode())
    body = "".join(
        f"<tr><td><a href='{esc(r['subject'])}/report/index.html'>{esc(r['subject'])}</a></td><td>{esc(r['avatar'])}</td>"
        f"<td>{esc(r['protocol'])}</td><td>{r['frames']}</td>"
        + "".join(f"<td>{r[k]:.4g}</td>" if r[k] is not None else "<td>n/a</td>" for k in HEADLINE) + "</tr>" for r in rows)
    listed = {r["subject"] for r in rows}
    others = "".join(f"<li><a href='{esc(s)}/report/index.html'>{esc(s)}</a></li>" for s in subjects if s not in listed)
    page = (f"<!doctype html><meta charset='utf-8'><title>avatar-pipeline results</title>{STYLE}<h1>Results</h1>"
            "<p>Test-frame metrics, full frame (head-mask values in metrics.csv and the subject reports).</p>"
            f"<table><tr><th>subject</th><th>avatar</th><th>test latents</th><th>frames</th>"
            + "".join(f"<th>{k}</th>" for k in HEADLINE) + f"</tr>{body}</table>"
            + (f"<h2>Subjects without avatar results</h2><ul>{others}</ul>" if others else ""))
    _write_bytes(results / "index.html", page.encode())
    return results / "index.html"
