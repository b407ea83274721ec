"""Evaluation outputs: metrics.json, table.md (laid out like the paper's Table 1), plots and
index.html with contact sheets of the worst cases per metric.

Plots need matplotlib (an optional import); without it the report says they were skipped. Every
output made from smoke-weight images carries "smoke weights: numbers meaningless".
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import cv2
import numpy as np

from revpers.evaluate.core import SMOKE_NOTE

SHEET_CASES = 8  # worst cases per contact sheet
LABELS = {"dlib": "dlib ResNet", "arcface": "ArcFace (bundle)"}


def _fmt(v, digits=3, pct=False):
    if v is None:
        return "n/a"
    return f"{100 * v:.{digits}f}" if pct else f"{v:.{digits}f}"


def table_rows(metrics: dict, label: str) -> tuple[list[str], list[str]]:
    """Header and one row of the paper's Table 1 layout: re-ID per recognizer, FID, face IQA, pose,
    gaze, expression (lower is better except face IQA)."""
    ident = metrics["identity"]
    a, q = metrics["attributes"], metrics["quality"]
    head = (
        ["Setting"]
        + [f"Re-ID % ({LABELS.get(n, n)}) ↓" for n in ident]
        + ["FID ↓", "KID ↓", "Face IQA ↑", "Pose (rad) ↓", "Gaze ↓", "Expression ↓"]
    )
    row = (
        [label]
        + [_fmt(s.get("reid_rate"), 2, pct=True) for s in ident.values()]
        + [
            _fmt(q.get("fid"), 3),
            _fmt(q.get("kid"), 4),
            "skipped",
            _fmt(a["pose_distance_rad"].get("mean"), 3),
            "skipped",
            _fmt(a["expression"].get("mean"), 3),
        ]
    )
    return head, row


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def markdown(metrics: dict, label: str = "revpers") -> str:
    head, row = table_rows(metrics, label)
    q, a, ident = metrics["quality"], metrics["attributes"], metrics["identity"]
    out = ["# revpers evaluation", ""]
    if metrics.get("smoke"):
        out += [(f"**{SMOKE_NOTE}**: the anonymized images were made with a smoke bundle (tiny random models)."), ""]
    im = metrics["images"]
    out += [
        f"{im['evaluated']} image pair(s), {metrics['faces']['measured']} face(s) "
        f"({metrics['faces']['attributes_measured']} with attributes measured), {im['withheld']} withheld by "
        f"the gate, {len(im['unmatched'])} original(s) without an anonymized file. Mode: {metrics['mode']}.",
        "",
        "## Table 1 layout",
        "",
        md_table(head, [row]),
    ]
    out += [
        "Pose: mean L2 norm of the (yaw, pitch, roll) difference in radians. Expression: mean landmark "
        "distance after a rigid-point similarity fit, as a fraction of the inter-ocular distance. Gaze: "
        f"{a['gaze']['skipped']}. Face IQA: {q['face_iqa']['skipped']}."
        + (f" FID/KID: {q['fid_kid_skipped']}." if q.get("fid_kid_skipped") else "")
        + (f" {q['fid_note']}." if q.get("fid_note") else ""),
        "",
    ]
    out += [
        "## Identity removal",
        "",
        md_table(
            ["Recognizer", "Metric", "Match when", "Threshold", "Faces", "Re-ID %", "Mean", "Median", "p05", "p95"],
            [
                [
                    LABELS.get(n, n),
                    s["metric"],
                    s["match_when"],
                    s["threshold"] if s["threshold"] is not None else "none",
                    s["count"],
                    _fmt(s.get("reid_rate"), 2, pct=True),
                    _fmt(s.get("mean"), 4),
                    _fmt(s.get("quantiles", {}).get("median"), 4),
                    _fmt(s.get("quantiles", {}).get("p05"), 4),
                    _fmt(s.get("quantiles", {}).get("p95"), 4),
                ]
                for n, s in ident.items()
            ],
        ),
    ]
    notes = [f"{LABELS.get(n, n)}: {d['note']}" for n, d in metrics["recognizers"].items() if d.get("note")]
    if notes:
        out += ["Notes: " + "; ".join(notes) + ".", ""]
    pd = a["pose_degrees"]
    out += [
        "## Attribute preservation",
        "",
        md_table(
            ["Difference", "Unit", "Faces", "Mean", "Median", "p95", "Max"],
            [
                [
                    k,
                    "degrees",
                    pd[k]["count"],
                    _fmt(pd[k].get("mean"), 2),
                    _fmt(pd[k].get("quantiles", {}).get("median"), 2),
                    _fmt(pd[k].get("quantiles", {}).get("p95"), 2),
                    _fmt(pd[k].get("quantiles", {}).get("max"), 2),
                ]
                for k in ("yaw", "pitch", "roll")
            ]
            + [
                [
                    "expression",
                    "inter-ocular",
                    a["expression"]["count"],
                    _fmt(a["expression"].get("mean"), 4),
                    _fmt(a["expression"].get("quantiles", {}).get("median"), 4),
                    _fmt(a["expression"].get("quantiles", {}).get("p95"), 4),
                    _fmt(a["expression"].get("quantiles", {}).get("max"), 4),
                ]
            ],
        ),
    ]
    bg, det = q["background"], q["detection_agreement"]
    out += [
        "## Image quality",
        "",
        md_table(
            ["Measure", "Value"],
            [
                [
                    "background PSNR dB (mean / min)",
                    f"{_fmt(bg['psnr_db'].get('mean'), 2)} / "
                    f"{_fmt(bg['psnr_db'].get('quantiles', {}).get('min'), 2)} ({bg['psnr_cap_db']:g} = identical)",
                ],
                [
                    "background SSIM (mean / min)",
                    f"{_fmt(bg['ssim'].get('mean'), 4)} / {_fmt(bg['ssim'].get('quantiles', {}).get('min'), 4)}",
                ],
                ["images with an identical background", f"{bg['identical_images']} of {im['evaluated']}"],
                [
                    "detection agreement (original faces re-detected)",
                    f"{det['redetected']} of {det['original_faces']} ({_fmt(det['rate'], 1, pct=True)} %)",
                ],
                ["FID / KID", f"{_fmt(q.get('fid'), 3)} / {_fmt(q.get('kid'), 4)}"],
            ],
        ),
    ]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- plots
def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def _empty(ax, what: str = "no faces measured") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="#666")


def _smoke_title(fig, smoke: bool) -> None:
    if smoke:
        fig.suptitle(SMOKE_NOTE.upper(), color="red", fontsize=13, fontweight="bold")


def plots(metrics: dict, out: Path) -> tuple[list[dict], str | None]:
    """Similarity histograms against the thresholds and attribute-difference distributions.
    Returns ([{"file", "caption"}], reason skipped or None)."""
    plt = _pyplot()
    if plt is None:
        return [], "matplotlib is not installed; plots skipped"
    smoke = metrics.get("smoke", False)
    faces = metrics["per_face"]
    made = []
    for name, s in metrics["identity"].items():
        vals = [f["scores"][name] for f in faces if f["scores"].get(name) is not None]
        fig, ax = plt.subplots(figsize=(6, 3.6))
        if vals:
            ax.hist(vals, bins=min(40, max(5, len(vals))), color="#4477aa")
        else:
            _empty(ax)
        if s["threshold"] is not None:
            ax.axvline(
                s["threshold"], color="red", ls="--", label=f"threshold {s['threshold']:g} (match {s['match_when']})"
            )
            ax.legend(fontsize=8)
        ax.set_xlabel(f"{LABELS.get(name, name)}: {s['metric']} (original vs anonymized)")
        ax.set_ylabel("faces")
        rate = s.get("reid_rate")
        ax.set_title(
            f"re-ID {_fmt(rate, 1, pct=True)} % of {s['count']} faces"
            if rate is not None
            else f"{s['count']} faces (no operating point)",
            fontsize=10,
        )
        _smoke_title(fig, smoke)
        fig.tight_layout()
        fn = f"similarity_{name}.png"
        fig.savefig(out / fn, dpi=100)
        plt.close(fig)
        made.append({"file": fn, "caption": f"{LABELS.get(name, name)} scores against its threshold"})
    measured = [f for f in faces if "pose_difference" in f]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    for ax, key in zip(axes, ("yaw", "pitch", "roll")):
        vals = [f["pose_difference"][key] for f in measured]
        if vals:
            ax.hist(vals, bins=min(30, max(5, len(vals))), color="#228833")
        else:
            _empty(ax, "no face re-detected in both crops")
        ax.set_xlabel(f"|{key} difference| (degrees)")
        ax.set_ylabel("faces")
    vals = [f["expression_difference"] for f in measured]
    if vals:
        axes[3].hist(vals, bins=min(30, max(5, len(vals))), color="#aa3377")
    else:
        _empty(axes[3], "no face re-detected in both crops")
    axes[3].set_xlabel("expression difference (inter-ocular)")
    _smoke_title(fig, smoke)
    fig.tight_layout()
    fig.savefig(out / "attributes.png", dpi=100)
    plt.close(fig)
    made.append({"file": "attributes.png", "caption": f"attribute differences over {len(measured)} faces"})
    psnrs = [i["background_psnr_db"] for i in metrics["per_image"] if i["background_psnr_db"] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    if psnrs:
        ax.hist(psnrs, bins=min(30, max(5, len(psnrs))), color="#ccbb44")
    else:
        _empty(ax, "no image with background pixels")
    ax.set_xlabel(f"background PSNR (dB; {metrics['quality']['background']['psnr_cap_db']:g} = identical)")
    ax.set_ylabel("images")
    _smoke_title(fig, smoke)
    fig.tight_layout()
    fig.savefig(out / "background_psnr.png", dpi=100)
    plt.close(fig)
    made.append({"file": "background_psnr.png", "caption": "change outside the faces, per image"})
    return made, None


# ---------------------------------------------------------------------------------------- contact sheets
def _caption(img: np.ndarray, lines: list[str], color=(0, 0, 0)) -> np.ndarray:
    h = 16 * len(lines) + 6
    band = np.full((h, img.shape[1], 3), 255, np.uint8)
    for k, text in enumerate(lines):
        cv2.putText(band, text, (4, 15 + 16 * k), cv2.FONT_HERSHEY_SIMPLEX, 0.42, color, 1, cv2.LINE_AA)
    return np.vstack([img, band])


def _banner(width: int, text: str) -> np.ndarray:
    """A red line of text across ``width`` px, the font shrunk until the whole text fits."""
    scale = 0.55
    while scale > 0.2 and cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 12:
        scale -= 0.05
    band = np.full((26, width, 3), (255, 230, 230), np.uint8)
    cv2.putText(band, text, (6, 18), cv2.FONT_HERSHEY_SIMPLEX, scale, (200, 0, 0), 1, cv2.LINE_AA)
    return band


def contact_sheet(cells: list[tuple[np.ndarray, np.ndarray, list[str]]], smoke: bool, cols: int = 4) -> np.ndarray:
    """Grid of (original | anonymized) pairs with caption lines under each pair."""
    tiles = []
    for a, b, lines in cells:
        gap = np.full((a.shape[0], 4, 3), 255, np.uint8)
        tiles.append(_caption(np.hstack([a, gap, b]), lines))
    h = max(t.shape[0] for t in tiles)
    w = max(t.shape[1] for t in tiles)
    padded = [np.pad(t, ((0, h - t.shape[0]), (0, w - t.shape[1]), (0, 0)), constant_values=255) for t in tiles]
    rows = []
    for i in range(0, len(padded), cols):
        row = padded[i : i + cols]
        row += [np.full_like(padded[0], 255)] * (cols - len(row)) if len(padded) > cols else []
        rows.append(np.hstack([np.pad(t, ((6, 6), (6, 6), (0, 0)), constant_values=255) for t in row]))
    sheet = np.vstack(rows)
    if smoke:
        sheet = np.vstack([_banner(sheet.shape[1], SMOKE_NOTE.upper()), sheet])
    return sheet


def worst_cases(metrics: dict) -> list[dict]:
    """Per metric: the faces (or images) that fare worst, worst first."""
    faces = metrics["per_face"]
    out = []
    for name, s in metrics["identity"].items():
        cos = s["metric"].startswith("cosine")
        cand = [f for f in faces if f["scores"].get(name) is not None]
        cand.sort(key=lambda f: -f["scores"][name] if cos else f["scores"][name])
        out.append(
            {
                "key": f"reid_{name}",
                "title": f"most identifiable faces: {LABELS.get(name, name)} "
                f"({'highest cosine' if cos else 'smallest distance'})",
                "faces": cand[:SHEET_CASES],
                "label": lambda f, n=name: f"{n} {f['scores'][n]:.3f}" + (" MATCH" if f["matches"].get(n) else ""),
            }
        )
    measured = [f for f in faces if "pose_difference" in f]
    out.append(
        {
            "key": "pose",
            "title": "largest head-pose differences",
            "faces": sorted(measured, key=lambda f: -f["pose_difference"]["l2_rad"])[:SHEET_CASES],
            "label": lambda f: "y{yaw:.0f} p{pitch:.0f} r{roll:.0f} deg".format(**f["pose_difference"]),
        }
    )
    out.append(
        {
            "key": "expression",
            "title": "largest expression differences",
            "faces": sorted(measured, key=lambda f: -f["expression_difference"])[:SHEET_CASES],
            "label": lambda f: f"expression {f['expression_difference']:.3f}",
        }
    )
    lost = [f for f in faces if not f["redetected"]]
    out.append(
        {
            "key": "not_redetected",
            "title": "original faces not re-detected in the anonymized image",
            "faces": lost[:SHEET_CASES],
            "label": lambda f: "not re-detected",
        }
    )
    return out


def write_report(metrics: dict, evaluator, out: Path, label: str = "revpers") -> dict:
    """Write metrics.json, table.md, plots, contact sheets and index.html into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    smoke = metrics.get("smoke", False)
    made, skipped = plots(metrics, out)
    sheets = []
    for case in worst_cases(metrics):
        if not case["faces"]:
            continue
        cells = []
        for f in case["faces"]:
            a, b = evaluator.thumbs[(f["image"], f["face"])]
            cells.append((a, b, [f"{f['image'][:22]} #{f['face']}", case["label"](f)]))
        fn = f"worst_{case['key']}.png"
        cv2.imwrite(str(out / fn), cv2.cvtColor(contact_sheet(cells, smoke), cv2.COLOR_RGB2BGR))
        sheets.append({"file": fn, "caption": case["title"] + " (left original, right anonymized)"})
    imgs = sorted(
        (i for i in metrics["per_image"] if i["background_psnr_db"] is not None), key=lambda i: i["background_psnr_db"]
    )[:SHEET_CASES]
    if imgs:
        cells = [
            (*evaluator.image_thumbs[i["image"]], [i["image"][:30], f"background {i['background_psnr_db']:.1f} dB"])
            for i in imgs
        ]
        cv2.imwrite(
            str(out / "worst_background.png"), cv2.cvtColor(contact_sheet(cells, smoke, cols=2), cv2.COLOR_RGB2BGR)
        )
        sheets.append(
            {
                "file": "worst_background.png",
                "caption": "largest change outside the faces (lowest background PSNR; left original, right "
                "anonymized with the excluded face region outlined in green)",
            }
        )
    metrics = dict(
        metrics,
        outputs={
            "plots": [m["file"] for m in made],
            "contact_sheets": [s["file"] for s in sheets],
            **({"plots_skipped": skipped} if skipped else {}),
        },
    )
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    md = markdown(metrics, label)
    (out / "table.md").write_text(md)
    (out / "index.html").write_text(index_html(metrics, md, made, sheets, skipped))
    return metrics


def _md_tables_to_html(md: str) -> str:
    """The Markdown report as HTML (headings, paragraphs and pipe tables only)."""
    parts, table = [], []

    def flush():
        if table:
            rows = [r for r in table if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = [[html.escape(c.strip()) for c in r.strip().strip("|").split("|")] for r in rows]
            parts.append(
                "<table><tr>"
                + "".join(f"<th>{c}</th>" for c in cells[0])
                + "</tr>"
                + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
                + "</table>"
            )
            table.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            parts.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            parts.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            text = html.escape(line).replace("**", "")
            parts.append(f"<p>{text}</p>")
    flush()
    return "\n".join(parts)


def index_html(
    metrics: dict, md: str, plots_made: list, sheets: list, skipped: str | None, extra_sections: str = ""
) -> str:
    banner = (
        f'<p class="smoke">{html.escape(SMOKE_NOTE.upper())}: these images were made with a smoke bundle '
        "(tiny random models); every number here is meaningless.</p>"
        if metrics.get("smoke")
        else ""
    )
    figs = "".join(
        f'<figure><img src="{html.escape(p["file"])}"><figcaption>{html.escape(p["caption"])}</figcaption></figure>'
        for p in plots_made
    )
    if skipped:
        figs = f"<p>{html.escape(skipped)}</p>"
    sh = "".join(f'<h3>{html.escape(s["caption"])}</h3><img src="{html.escape(s["file"])}">' for s in sheets)
    body = (
        f"{_md_tables_to_html(md)}\n{extra_sections}\n<h2>Plots</h2>{figs}\n"
        f"<h2>Worst cases</h2>{sh or '<p>no faces</p>'}\n"
        '<p><a href="metrics.json">metrics.json</a> · <a href="table.md">table.md</a></p>'
    )
    return html_page("revpers evaluation", banner, body)


def html_page(title: str, banner: str, body: str) -> str:
    """A report page: the smoke banner (when there is one) above and below the body."""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1400px;margin:1em auto}} table{{border-collapse:collapse;margin:.5em 0}}
td,th{{border:1px solid #aaa;padding:3px 8px;text-align:right}} th{{background:#eee}}
.smoke{{background:#fdd;color:#a00;font-weight:bold;padding:.6em;border:2px solid #a00}}
figure{{display:inline-block;margin:4px}} img{{max-width:100%}}</style></head><body>
{banner}
{body}
{banner}
</body></html>
"""


__all__ = ["contact_sheet", "index_html", "markdown", "md_table", "plots", "table_rows", "write_report"]
