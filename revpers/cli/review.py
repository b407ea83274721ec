"""`revpers review RUN_DIR`: pictures of a run where people would rather look than read JSON.

Works on the output folder of `revpers anonymize` and of `revpers-client anonymize` alike (both
write ``audit-manifest.json``, ``run-summary.json`` and one ``<output>.json`` report per image).
Writes into ``RUN_DIR/review/``:

- ``overlays/<output>.png``: the released image (or the input, dimmed, when nothing was released)
  with each face's box, index and verdict, coloured by verdict, and the gate's similarities;
- ``sheet-NNN.png``: contact sheets, input | output per row, several rows per page, worst first;
- ``index.html``: the sheets and every overlay with its verdict and reason.

Runs made with smoke weights say so on every sheet and on the page.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from revpers.core.errors import InputError
from revpers.service.images import ImageError, decode_image, read_file
from revpers_client.protocol import FaceVerdict

REVIEW_DIR = "review"
ROW_HEIGHT = 240
ROWS_PER_SHEET = 6
COLOURS = {  # by face verdict: green released as passed, amber obscured by the fallback, red not released
    FaceVerdict.PASSED.value: (40, 180, 70),
    FaceVerdict.FALLBACK_BLURRED.value: (240, 160, 20),
    FaceVerdict.FALLBACK_PIXELATED.value: (240, 160, 20),
    FaceVerdict.FALLBACK_FILLED.value: (240, 160, 20),
    FaceVerdict.REJECTED.value: (220, 40, 40),
    FaceVerdict.FAILED.value: (220, 40, 40),
    FaceVerdict.NOT_GENERATED.value: (150, 150, 150),
    FaceVerdict.LEFT.value: (220, 40, 40),
    FaceVerdict.UNVERIFIED.value: (60, 120, 230),
}
SEVERITY = {"failed": 0, "rejected": 1, "not_done": 2, "review": 3, "not_taken": 4, "ok": 5, "skipped": 5}
SMOKE_BANNER = "SMOKE WEIGHTS: tiny random models; outputs are noise, not anonymized faces"


@dataclass
class Entry:
    """One image of the run, as the review shows it."""

    name: str  # the output path relative to the run folder
    status: str
    verdict: str | None
    reason: str
    input_path: Path | None
    output_path: Path | None
    report: dict | None


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one bitmap size
        return ImageFont.load_default()


def _load_image(path: Path | None) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        return decode_image(read_file(path), name=str(path))
    except (ImageError, InputError):
        return None


def read_run(run_dir: Path, inputs: Path | None = None) -> list[Entry]:
    """The images of a run folder, worst first: failures, rejections, then review, then passed."""
    manifest_path = run_dir / "audit-manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{run_dir}: not a revpers run folder (no audit-manifest.json)")
    manifest = json.loads(manifest_path.read_text())
    review = {}
    review_json = run_dir / "review.json"
    if review_json.is_file():
        review = {row["input"]: row for row in json.loads(review_json.read_text())}
    entries = []
    for f in manifest.get("files", []):
        out_rel = f.get("output")
        report_file = run_dir / f"{out_rel}.json" if out_rel else None
        report = json.loads(report_file.read_text()) if report_file and report_file.is_file() else None
        source = f.get("source") or (str(inputs / f["input"]) if inputs else None)
        row = review.get(f["input"], {})
        entries.append(
            Entry(
                name=out_rel or f["input"],
                status=f.get("status", "?"),
                verdict=(report or {}).get("verdict"),
                reason=row.get("reason") or ((f.get("error") or {}).get("message") or ""),
                input_path=Path(source) if source else None,
                output_path=run_dir / out_rel if out_rel and (run_dir / out_rel).is_file() else None,
                report=report,
            )
        )
    entries.sort(key=lambda e: (SEVERITY.get(e.status, 2), e.name))
    return entries


def face_overlay(rgb: np.ndarray, report: dict | None, released: bool) -> Image.Image:
    """The image with every face's box, index, verdict and similarities drawn on it."""
    img = Image.fromarray(rgb if released else (rgb * 0.45).astype(np.uint8)).convert("RGB")
    draw = ImageDraw.Draw(img)
    width = max(2, round(max(img.size) / 300))
    font = _font(max(12, round(max(img.size) / 45)))
    for face in (report or {}).get("faces", []):
        x0, y0, x1, y1 = (float(v) for v in face["box"])
        colour = COLOURS.get(face.get("verdict"), (255, 0, 255))
        draw.rectangle([x0, y0, x1, y1], outline=colour, width=width)
        check = face.get("verification") or {}
        sims = []
        if check.get("dlib_distance") is not None:
            sims.append(f"dlib {check['dlib_distance']:.2f}")
        if check.get("arcface_cosine") is not None:
            sims.append(f"arc {check['arcface_cosine']:.2f}")
        label = f"#{face['index']} {face.get('verdict')}" + (f" ({', '.join(sims)})" if sims else "")
        ty = max(0.0, y0 - getattr(font, "size", 12) - 2 * width)
        if draw.textlength(label, font=font) > img.width:  # a small image: index and verdict only
            label = f"#{face['index']} {face.get('verdict')}"
        text_w = draw.textlength(label, font=font)
        tx = max(0.0, min(x0, img.width - text_w - 1))  # the whole label stays inside the image
        box = draw.textbbox((tx, ty), label, font=font)
        draw.rectangle(box, fill=(0, 0, 0))
        draw.text((tx, ty), label, fill=colour, font=font)
    return img


def _thumb(img: Image.Image | None, height: int) -> Image.Image:
    if img is None:
        tile = Image.new("RGB", (height, height), (60, 60, 60))
        ImageDraw.Draw(tile).text((10, height // 2 - 8), "no image", fill=(220, 220, 220), font=_font(16))
        return tile
    w = max(1, round(img.width * height / img.height))
    return img.resize((w, height), Image.LANCZOS)


def contact_sheets(
    rows: list[tuple[Entry, Image.Image | None, Image.Image | None]], out_dir: Path, smoke: bool
) -> list[Path]:
    """Pages of input | output rows with a caption each; a smoke banner on every page of a smoke run."""
    paths, font, small = [], _font(20), _font(16)
    for page, start in enumerate(range(0, len(rows), ROWS_PER_SHEET), 1):
        chunk = rows[start : start + ROWS_PER_SHEET]
        tiles = [(e, _thumb(a, ROW_HEIGHT), _thumb(b, ROW_HEIGHT)) for e, a, b in chunk]
        caption_h, banner_h = 28, 40 if smoke else 0
        width = max(a.width + b.width for _, a, b in tiles) + 30
        sheet = Image.new(
            "RGB", (max(width, 900), banner_h + len(tiles) * (ROW_HEIGHT + caption_h + 10) + 10), (25, 25, 25)
        )
        draw = ImageDraw.Draw(sheet)
        if smoke:
            draw.rectangle([0, 0, sheet.width, banner_h], fill=(150, 20, 20))
            draw.text((10, 8), SMOKE_BANNER, fill=(255, 255, 255), font=font)
        y = banner_h + 10
        for e, a, b in tiles:
            colour = (
                (220, 40, 40)
                if e.status in ("failed", "rejected", "not_done")
                else ((240, 160, 20) if e.status == "review" else (40, 180, 70))
            )
            draw.text(
                (10, y),
                f"{e.name}  [{e.status}{', ' + e.verdict if e.verdict else ''}]  {e.reason}"[:160],
                fill=colour,
                font=small,
            )
            y += caption_h
            sheet.paste(a, (10, y))
            sheet.paste(b, (20 + a.width, y))
            y += ROW_HEIGHT + 10
        path = out_dir / f"sheet-{page:03d}.png"
        sheet.save(path)
        paths.append(path)
    return paths


def write_review(run_dir: Path, inputs: Path | None = None) -> Path:
    """Overlays, contact sheets and index.html for a run folder; returns the index page."""
    run_dir = Path(run_dir)
    entries = read_run(run_dir, inputs)
    out_dir = run_dir / REVIEW_DIR
    (out_dir / "overlays").mkdir(parents=True, exist_ok=True)
    smoke = any((e.report or {}).get("smoke") for e in entries)
    rows, items = [], []
    for e in entries:
        source = _load_image(e.input_path)
        released = _load_image(e.output_path)
        shown = released if released is not None else source
        overlay = face_overlay(shown, e.report, released is not None) if shown is not None else None
        overlay_rel = None
        if overlay is not None:
            overlay_path = out_dir / "overlays" / f"{e.name}.png"
            overlay_path.parent.mkdir(parents=True, exist_ok=True)
            overlay.save(overlay_path)
            overlay_rel = overlay_path.relative_to(out_dir).as_posix()
        rows.append((e, Image.fromarray(source) if source is not None else None, overlay))
        items.append((e, overlay_rel))
    sheets = contact_sheets(rows, out_dir, smoke)
    index = out_dir / "index.html"
    index.write_text(_html(run_dir, sheets, items, smoke))
    return index


def _html(run_dir: Path, sheets: list[Path], items: list[tuple[Entry, str | None]], smoke: bool) -> str:
    esc = html.escape
    parts = [
        "<!doctype html><meta charset='utf-8'><title>revpers review</title>",
        "<style>body{font-family:sans-serif;background:#111;color:#ddd}img{max-width:100%}"
        "td{padding:4px 8px;vertical-align:top}.bad{color:#e44}.warn{color:#ea2}.ok{color:#4b4}"
        ".smoke{background:#922;color:#fff;padding:8px;font-weight:bold}</style>",
        f"<h1>revpers review: {esc(run_dir.name)}</h1>",
    ]
    if smoke:
        parts.append(f"<p class='smoke'>{esc(SMOKE_BANNER)}</p>")
    parts.append("<h2>Contact sheets (worst first)</h2>")
    parts += [f"<p><img src='{esc(p.name)}' alt='{esc(p.name)}'></p>" for p in sheets]
    parts.append(
        "<h2>Images</h2><table><tr><th>output</th><th>status</th><th>verdict</th><th>reason</th><th>faces</th></tr>"
    )
    for e, overlay in items:
        cls = "bad" if e.status in ("failed", "rejected", "not_done") else ("warn" if e.status == "review" else "ok")
        link = f"<a href='{esc(overlay)}'>{esc(e.name)}</a>" if overlay else esc(e.name)
        faces = len((e.report or {}).get("faces", []))
        parts.append(
            f"<tr class='{cls}'><td>{link}</td><td>{esc(e.status)}</td><td>{esc(e.verdict or '')}</td>"
            f"<td>{esc(e.reason)}</td><td>{faces}</td></tr>"
        )
    parts.append("</table>")
    return "\n".join(parts) + "\n"
