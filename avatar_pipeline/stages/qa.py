"""Stage `qa`: see at a glance whether preprocessing worked.

Writes a contact sheet (frames x [landmarks | parsing | normals | matte]), a short overlay video,
summary.json with every stage's warnings and flagged frames, and report.html gathering them.
"""

from __future__ import annotations

import html
import logging

import cv2
import numpy as np

from .. import cache, video
from ..config import QAConfig
from .parsing import PALETTE

log = logging.getLogger(__name__)

PANELS = ("landmarks", "parsing", "normals", "matte")


def _label(img: np.ndarray, text: str) -> np.ndarray:
    img = img.copy()
    cv2.putText(img, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 3, cv2.LINE_AA)
    cv2.putText(img, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def panels(store: cache.SubjectCache, index: int, lms: dict, face_box, panel_size: int) -> list[np.ndarray]:
    """The four overlays of one frame, each panel_size square; `face_box`: the crop stage's for the frame."""
    frame = store.read_frame(index)
    size = frame.shape[0]
    scale = panel_size / size
    small = cv2.resize(frame, (panel_size, panel_size), interpolation=cv2.INTER_AREA)

    marks = small.copy()
    if lms["valid"][index]:
        for x, y in lms["mp478"][index, :, :2] * scale:
            cv2.circle(marks, (int(x), int(y)), 1, (0, 255, 0), -1)
        for x, y in lms["ibug68"][index, :, :2] * scale:
            cv2.circle(marks, (int(x), int(y)), 2, (255, 0, 0), -1)
    else:
        marks = _label(marks, "no landmarks")
    if face_box:
        x0, y0, x1, y1 = (np.array(face_box) * scale).astype(int)
        cv2.rectangle(marks, (x0, y0), (x1, y1), (255, 255, 0), 1)

    labels = cv2.resize(store.read_labels(index), (panel_size, panel_size), interpolation=cv2.INTER_NEAREST)
    parsing = (0.45 * small + 0.55 * PALETTE[labels]).astype(np.uint8)

    normal_rgb, normal_mask = store.read_normal_rgb(index), store.read_normal_mask(index)
    normal_rgb = cv2.resize(normal_rgb, (panel_size, panel_size), interpolation=cv2.INTER_AREA)
    nmask = cv2.resize(normal_mask.astype(np.uint8), (panel_size, panel_size), interpolation=cv2.INTER_NEAREST)[
        ..., None
    ]
    normals = np.where(nmask > 0, normal_rgb, (small * 0.4).astype(np.uint8))

    matte = cv2.resize(store.read_matte(index), (panel_size, panel_size))[..., None]
    tint = np.array([40, 40, 160], np.float32)
    matte_img = (small * matte + (0.3 * small + 0.7 * tint) * (1 - matte)).astype(np.uint8)
    return [_label(p, f"{name} #{index}") for p, name in zip([marks, parsing, normals, matte_img], PANELS)]


def summarise(store: cache.SubjectCache) -> dict:
    crop = store.crop_meta()
    split = store.split()
    lm_meta = cache.read_json(store.stage_dir("landmarks") / "meta.json", "landmarks")
    bg = cache.read_json(store.stage_dir("background") / "background.json", "background")
    normals = cache.read_json(store.stage_dir("normals") / "meta.json", "normals")
    parsing = cache.read_json(store.stage_dir("parsing") / "meta.json", "parsing")
    flagged = {int(k): v for k, v in split["excluded"].items()}
    for k, v in lm_meta["invalid"].items():
        flagged.setdefault(int(k), f"landmarks: {v}")
    return {
        "subject": store.subject,
        "frames": len(crop["frames"]),
        "size": crop["size"],
        "source": crop["source"],
        "ffmpeg": crop["ffmpeg"],
        "crop_window": crop["window"],
        "warnings": crop["warnings"],
        "split_sizes": {k: len(split[k]) for k in ("train", "val", "test")},
        "flagged_frames": {str(k): flagged[k] for k in sorted(flagged)},
        "landmarks": {"backend": lm_meta["backend"], "valid_frames": lm_meta["valid_frames"]},
        "parsing": {"backend": parsing["backend"], "class_fraction": parsing["class_fraction"]},
        "background": bg,
        "normals": {
            "backend": normals["backend"],
            "mean_fraction_facing_camera": normals["mean_fraction_facing_camera"],
        },
    }


def run(store: cache.SubjectCache, cfg: QAConfig) -> dict:
    n = store.num_frames()
    lms = store.landmarks()
    face_boxes = [frame["face_box"] for frame in store.crop_meta()["frames"]]
    summary = summarise(store)
    sheet_ids = sorted(set(np.linspace(0, n - 1, min(n, cfg.sheet_frames)).round().astype(int).tolist()))
    panel = 192
    with cache.staged_dir(store.stage_dir("qa")) as stage:
        bg_row = [
            _label(cv2.resize(store.read_background(), (panel, panel), interpolation=cv2.INTER_AREA), "background"),
            _label(
                cv2.resize((store.read_coverage() * 255).astype(np.uint8), (panel, panel))[..., None].repeat(3, 2),
                "background coverage",
            ),
        ]
        bg_row += [np.zeros((panel, panel, 3), np.uint8)] * (len(PANELS) - 2)
        rows = [np.concatenate(bg_row, 1)] + [
            np.concatenate(panels(store, i, lms, face_boxes[i], panel), 1) for i in sheet_ids
        ]
        cache.write_png(stage / "contact_sheet.png", np.concatenate(rows, 0), compression=6)

        video_ids = np.linspace(0, n - 1, min(n, cfg.video_frames)).round().astype(int)
        fps = min(25.0, float(store.crop_meta()["source"]["fps"] or 25.0))
        half = 256
        with video.VideoWriter(stage / "overlay.mp4", 2 * half, 2 * half, fps=fps) as writer:
            for i in video_ids:
                p = panels(store, int(i), lms, face_boxes[i], half)
                writer.write(np.concatenate([np.concatenate(p[:2], 1), np.concatenate(p[2:], 1)], 0))
        cache.write_json(stage / "summary.json", summary)
        (stage / "report.html").write_text(_report_html(summary), encoding="utf-8")
    log.info(
        "qa: contact sheet of %d frames, overlay video of %d frames, %d flagged frames",
        len(sheet_ids),
        len(video_ids),
        len(summary["flagged_frames"]),
    )
    return summary


def _report_html(summary: dict) -> str:
    esc = html.escape
    warn = "".join(f"<li>{esc(w)}</li>" for w in summary["warnings"]) or "<li>none</li>"
    flagged = (
        "".join(f"<tr><td>{k}</td><td>{esc(v)}</td></tr>" for k, v in summary["flagged_frames"].items())
        or "<tr><td colspan=2>none</td></tr>"
    )
    bg = summary["background"]
    source, sizes = summary["source"], summary["split_sizes"]
    return f"""<!doctype html><meta charset="utf-8"><title>{esc(summary["subject"])}: preprocessing</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1000px}}td,th{{padding:2px 8px;text-align:left}}</style>
<h1>{esc(summary["subject"])}: preprocessing</h1>
<p>{summary["frames"]} frames at {summary["size"]} px from {esc(summary["source"]["path"])}
({source["width"]}x{source["height"]}, {source["fps"]:.2f} fps, rotation metadata {source["rotation"]}°,
turned {source.get("upright_rotation", 0)}° to make the face upright;
ffmpeg: {esc(summary["ffmpeg"])}). Split train/val/test: {sizes["train"]}/{sizes["val"]}/{sizes["test"]}.</p>
<p>Landmarks: {esc(summary["landmarks"]["backend"])}, {summary["landmarks"]["valid_frames"]} valid frames.
Parsing: {esc(summary["parsing"]["backend"])}. Normals: {esc(summary["normals"]["backend"])}.
Background: {esc(bg["source"])}, {100 * bg["covered_fraction"]:.1f}% of pixels observed (the rest inpainted).</p>
<h2>Warnings</h2><ul>{warn}</ul>
<h2>Overlay video</h2><video src="overlay.mp4" controls loop muted width="512"></video>
<h2>Contact sheet</h2><img src="contact_sheet.png" style="max-width:100%">
<h2>Flagged frames (kept out of the splits)</h2><table><tr><th>frame</th><th>reason</th></tr>{flagged}</table>
"""
