"""`revpers sweep`: anonymize a sample under each setting, evaluate each, draw the curves, recommend.

The grid is the product of the guidance, IP-Adapter scale and step values. The models load once
(one ``revpers.anonymizer.Anonymizer``) and every setting reuses them. Faces are anonymized with
the verification gate OFF, so the curves show what the generator itself does at each setting
(with the gate on, retries would hide the setting's own re-ID rate). For every setting:

* the anonymized images and a full ``revpers evaluate`` report (``settings/<tag>/``);
* cost: UNet calls (``denoise`` invocations of the loaded components, counted by
  ``count_unet_calls``), UNet sample evaluations (the calls' batch sizes summed; CFG batches two
  per face and step) and wall seconds of the anonymize calls, each per generated face.

Recommendation for ``--target-reid R`` (a fraction): a setting *meets* the target when the highest
re-ID rate among the recognizers with an operating point is <= R. Among those, the *least
aggressive* has the smallest |guidance|, then the smallest IP-Adapter scale (the identity push is
the guidance times the adapter's contribution), then the fewest samples; the *cheapest* has the
fewest UNet samples per face, then is the least aggressive (equal samples are equal compute), then
takes the fewest seconds per face.
"""

from __future__ import annotations

import html
import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from revpers.core.params import Params
from revpers.core.pipeline import count_unet_calls
from revpers.evaluate.core import SMOKE_NOTE, Evaluator, reid_headline
from revpers.evaluate.report import (
    LABELS,
    _fmt,
    _md_tables_to_html,
    _pyplot,
    _smoke_title,
    html_page,
    md_table,
    table_rows,
    write_report,
)
from revpers.gate.policy import VerifyPolicy
from revpers.service.images import encode_image


@dataclass(frozen=True)
class Setting:
    guidance: float
    ip_scale: float
    steps: int

    @property
    def tag(self) -> str:
        return f"g{self.guidance:g}_ip{self.ip_scale:g}_s{self.steps}"

    def as_dict(self) -> dict:
        return {"guidance": self.guidance, "ip_scale": self.ip_scale, "steps": self.steps}


def grid(guidance, ip_scale, steps) -> list[Setting]:
    return [Setting(float(g), float(i), int(s)) for g, i, s in itertools.product(guidance, ip_scale, steps)]


def aggressiveness(row: dict) -> tuple:
    s = row["setting"]
    return (abs(s["guidance"]), s["ip_scale"], row["cost"]["unet_samples_per_face"] or 0)


def recommend(rows: list[dict], target: float) -> dict:
    meeting = [r for r in rows if r["reid_headline"] is not None and r["reid_headline"] <= target]
    out = {
        "target_reid": target,
        "rule": "a setting meets the target when the highest re-ID rate among the "
        "recognizers with an operating point is <= target",
        "meeting": [r["tag"] for r in meeting],
    }
    if not meeting:
        scored = [r for r in rows if r["reid_headline"] is not None]
        out.update(
            {
                "least_aggressive": None,
                "cheapest": None,
                "note": "no setting meets the target"
                + (
                    f"; the lowest re-ID was {100 * min(r['reid_headline'] for r in scored):.2f} % "
                    f"({min(scored, key=lambda r: r['reid_headline'])['tag']})"
                    if scored
                    else "; no recognizer with an operating point measured any face"
                ),
            }
        )
        return out
    least = min(meeting, key=aggressiveness)
    # equal sample counts are equal compute: the less aggressive wins before (noisy) seconds decide
    cheap = min(
        meeting,
        key=lambda r: (r["cost"]["unet_samples_per_face"] or 0, aggressiveness(r), r["cost"]["seconds_per_face"] or 0),
    )
    out.update(
        {
            "least_aggressive": {"tag": least["tag"], **least["setting"]},
            "cheapest": {"tag": cheap["tag"], **cheap["setting"]},
        }
    )
    return out


def run_sweep_settings(
    anon,
    originals: list[tuple[str, np.ndarray]],
    settings: list[Setting],
    out: Path,
    *,
    seed: int,
    skip: float,
    aligned: bool,
    extras: list,
    inception,
    target: float,
    sources: dict | None = None,
    log=print,
) -> dict:
    """``sources``: name -> input path, recorded in the per-image reports (``IMAGE.png.json``, the
    anonymize report format, so ``revpers evaluate ORIGINALS settings/TAG/images`` pairs them)."""

    smoke = bool(anon.bundle.smoke)
    off = VerifyPolicy(verify=False)
    rows = []
    params_list = [
        (
            s,
            Params.from_mapping(
                {"guidance": s.guidance, "ip_scale": s.ip_scale, "steps": s.steps, "seed": seed, "skip": skip}
            ),
        )
        for s in settings
    ]  # validate all first
    for k, (s, params) in enumerate(params_list):
        sdir = out / "settings" / s.tag
        (sdir / "images").mkdir(parents=True, exist_ok=True)
        generated, seconds = 0, 0.0
        outputs = []
        with count_unet_calls(anon.models) as counter:
            for name, rgb in originals:
                t0 = time.perf_counter()
                result = (
                    anon.anonymize_aligned(rgb, params, verify=off)
                    if aligned
                    else anon.anonymize_photo(rgb, params, verify=off)
                )
                seconds += time.perf_counter() - t0
                generated += sum(f.get("action") == "anonymized" for f in result.report.get("faces", []))
                outputs.append((name, result.image))
                target_png = sdir / "images" / f"{name}.png"
                target_png.write_bytes(encode_image(result.image, "PNG"))
                report = dict(
                    result.report.to_dict(), input=str((sources or {}).get(name, name)), output=str(target_png)
                )
                target_png.with_name(target_png.name + ".json").write_text(json.dumps(report, indent=1) + "\n")
        ev = Evaluator(anon.verifier, extras=extras, inception=inception, aligned=aligned, smoke=smoke)
        for (name, rgb), (_, img) in zip(originals, outputs, strict=True):
            ev.add(name, rgb, img)
        metrics = write_report(ev.metrics(), ev, sdir, label=s.tag)

        def per(v, n=generated):
            return v / n if n else None

        row = {
            "tag": s.tag,
            "setting": s.as_dict(),
            "report": f"settings/{s.tag}/index.html",
            "reid": {n: v.get("reid_rate") for n, v in metrics["identity"].items()},
            "reid_headline": reid_headline(metrics),
            "pose_distance_rad": metrics["attributes"]["pose_distance_rad"].get("mean"),
            "expression": metrics["attributes"]["expression"].get("mean"),
            "background_psnr_db": metrics["quality"]["background"]["psnr_db"].get("mean"),
            "detection_agreement": metrics["quality"]["detection_agreement"]["rate"],
            "fid": metrics["quality"].get("fid"),
            "kid": metrics["quality"].get("kid"),
            "faces_generated": generated,
            "cost": {
                "unet_calls": counter.calls,
                "unet_samples": counter.samples,
                "seconds": round(seconds, 3),
                "unet_calls_per_face": per(counter.calls),
                "unet_samples_per_face": per(counter.samples),
                "seconds_per_face": per(seconds),
            },
            "table_row": table_rows(metrics, s.tag),
        }
        rows.append(row)
        log(
            f"[{k + 1}/{len(settings)}] {s.tag}: {generated} face(s), re-ID "
            + ", ".join(f"{n} {_fmt(v, 1, pct=True)} %" for n, v in row["reid"].items())
            + f"; {row['cost']['unet_samples_per_face'] or 0:g} UNet samples/face, "
            f"{row['cost']['seconds_per_face'] or 0:.2f} s/face" + (f" [{SMOKE_NOTE}]" if smoke else "")
        )
    summary = {
        "format": "revpers-sweep",
        "version": 1,
        "smoke": smoke,
        **({"warning": SMOKE_NOTE} if smoke else {}),
        "bundle": anon.bundle.describe(),
        "images": [n for n, _ in originals],
        "aligned": aligned,
        "seed": seed,
        "skip": skip,
        "gate": "off (the curves show the generator itself)",
        "settings": rows,
        "recommendation": recommend(rows, target),
    }
    made, skipped = sweep_plots(summary, out)
    summary["outputs"] = {"plots": made, **({"plots_skipped": skipped} if skipped else {})}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = sweep_markdown(summary)
    (out / "sweep.md").write_text(md)
    (out / "index.html").write_text(sweep_html(summary, md))
    return summary


# ---------------------------------------------------------------------------------------- outputs
def _series(rows: list[dict], x: str, group: tuple[str, ...]) -> dict:
    out: dict = {}
    for r in rows:
        key = tuple(r["setting"][g] for g in group)
        out.setdefault(key, []).append(r)
    return {k: sorted(v, key=lambda r: r["setting"][x]) for k, v in out.items()}


def _nan(v):
    return np.nan if v is None else v


_CURVES = (
    ("guidance", ("ip_scale", "steps"), "guidance w"),
    ("ip_scale", ("guidance", "steps"), "IP-Adapter scale"),
    ("steps", ("guidance", "ip_scale"), "steps N"),
)


def _plot_series(plt, axes, ax2, rows: list[dict], x: str, group: tuple[str, ...], names: list[str]) -> None:
    """One curve per ``group`` setting: re-ID per recognizer left, background PSNR and pose distance right."""
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", "-.", ":"]
    for k, (key, rs) in enumerate(_series(rows, x, group).items()):
        color = colors[k % len(colors)]  # one colour per curve, the same in both panels
        lab = ", ".join(f"{g} {v:g}" for g, v in zip(group, key))
        xs = [r["setting"][x] for r in rs]
        for j, n in enumerate(names):
            ys = [100 * r["reid"][n] if r["reid"][n] is not None else np.nan for r in rs]
            axes[0].plot(
                xs, ys, marker="o", color=color, ls=styles[j % len(styles)], label=f"{LABELS.get(n, n)} ({lab})"
            )
        axes[1].plot(xs, [_nan(r["background_psnr_db"]) for r in rs], marker="o", color=color, ls="-")
        ax2.plot(xs, [_nan(r["pose_distance_rad"]) for r in rs], marker="s", color=color, ls=":")


def _curve_plot(plt, summary: dict, out: Path, x: str, group: tuple[str, ...], xlabel: str) -> str:
    """``curve_X.png``: the metrics against setting ``x``; returns the file name."""
    rows, smoke = summary["settings"], summary["smoke"]
    target = summary["recommendation"]["target_reid"]
    names = list(rows[0]["reid"]) if rows else []
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    ax2 = axes[1].twinx()
    _plot_series(plt, axes, ax2, rows, x, group, names)
    axes[0].axhline(100 * target, color="red", ls="--", label=f"target {100 * target:g} %")
    axes[0].set_ylabel("re-identification rate (%)")
    axes[0].set_ylim(-3, 103)
    axes[0].legend(fontsize=7)
    axes[1].set_ylabel("background PSNR (dB), solid")
    ax2.set_ylabel("pose distance (rad), dotted")
    if all(r["pose_distance_rad"] is None for r in rows):
        ax2.text(
            0.5,
            0.6,
            "pose: no face re-detected in both crops",
            ha="center",
            transform=ax2.transAxes,
            color="#666",
            fontsize=8,
        )
    from matplotlib.lines import Line2D

    axes[1].legend(
        [Line2D([], [], color="k", marker="o", ls="-"), Line2D([], [], color="k", marker="s", ls=":")],
        ["background PSNR (left axis)", "pose distance (right axis)"],
        fontsize=7,
        loc="lower left",
    )
    values = sorted({r["setting"][x] for r in rows})
    for ax in axes:
        ax.set_xlabel(xlabel + " (colours as in the left legend)" if ax is axes[1] else xlabel)
        ax.set_xticks(values)
    _smoke_title(fig, smoke)
    fig.tight_layout()
    fn = f"curve_{x}.png"
    fig.savefig(out / fn, dpi=100)
    plt.close(fig)
    return fn


def _cost_plot(plt, summary: dict, out: Path) -> str:
    """``cost_vs_reid.png``: highest re-ID rate against UNet samples per face; returns the file name."""
    rows, smoke = summary["settings"], summary["smoke"]
    target = summary["recommendation"]["target_reid"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    points: dict = {}  # settings at the same (cost, re-ID) share one point and one stacked label
    for r in rows:
        c, y = r["cost"]["unet_samples_per_face"], r["reid_headline"]
        if c is not None and y is not None:
            points.setdefault((c, 100 * y), []).append(r["tag"])
    for (c, y), tags in points.items():
        ax.scatter([c], [y], color="#4477aa")
        ax.annotate("\n".join(tags), (c, y), fontsize=7, xytext=(4, 4), textcoords="offset points", va="bottom")
    ax.axhline(100 * target, color="red", ls="--", label=f"target {100 * target:g} %")
    ax.set_xlabel("UNet sample evaluations per face")
    ax.set_ylabel("highest re-ID rate (%)")
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8)
    _smoke_title(fig, smoke)
    fig.tight_layout()
    fig.savefig(out / "cost_vs_reid.png", dpi=100)
    plt.close(fig)
    return "cost_vs_reid.png"


def sweep_plots(summary: dict, out: Path) -> tuple[list[str], str | None]:
    plt = _pyplot()
    if plt is None:
        return [], "matplotlib is not installed; plots skipped"
    rows = summary["settings"]
    made = [
        _curve_plot(plt, summary, out, x, group, xlabel)
        for x, group, xlabel in _CURVES
        if len({r["setting"][x] for r in rows}) >= 2
    ]
    made.append(_cost_plot(plt, summary, out))
    return made, None


def sweep_markdown(summary: dict) -> str:
    rows = summary["settings"]
    out = ["# revpers sweep", ""]
    if summary["smoke"]:
        out += [f"**{SMOKE_NOTE}**: made with a smoke bundle (tiny random models).", ""]
    out += [
        f"{len(summary['images'])} image(s), {len(rows)} setting(s), seed {summary['seed']}, skip "
        f"{summary['skip']}, verification gate {summary['gate']}.",
        "",
    ]
    if rows:
        out += [
            "## Table 1 layout per setting",
            "",
            md_table(rows[0]["table_row"][0], [r["table_row"][1] for r in rows]),
        ]
    out += [
        "## Cost and quality",
        "",
        md_table(
            [
                "Setting",
                "Faces",
                "UNet calls/face",
                "UNet samples/face",
                "s/face",
                "Highest re-ID %",
                "Background PSNR dB",
                "Detection agreement %",
            ],
            [
                [
                    r["tag"],
                    r["faces_generated"],
                    _fmt(r["cost"]["unet_calls_per_face"], 1),
                    _fmt(r["cost"]["unet_samples_per_face"], 1),
                    _fmt(r["cost"]["seconds_per_face"], 3),
                    _fmt(r["reid_headline"], 2, pct=True),
                    _fmt(r["background_psnr_db"], 2),
                    _fmt(r["detection_agreement"], 1, pct=True),
                ]
                for r in rows
            ],
        ),
    ]
    rec = summary["recommendation"]
    out += ["## Recommendation", "", f"Target re-ID rate {100 * rec['target_reid']:g} % ({rec['rule']})."]
    if rec.get("least_aggressive"):
        out += [
            f"- least aggressive setting meeting it: **{rec['least_aggressive']['tag']}**",
            f"- cheapest setting meeting it: **{rec['cheapest']['tag']}**",
        ]
    else:
        out += [f"- {rec['note']}"]
    if summary["smoke"]:
        out += ["", f"({SMOKE_NOTE}: do not use this recommendation.)"]
    return "\n".join(out) + "\n"


def sweep_html(summary: dict, md: str) -> str:
    smoke = summary["smoke"]
    banner = (
        f'<p class="smoke">{html.escape(SMOKE_NOTE.upper())}: made with a smoke bundle; every number, curve '
        "and recommendation here is meaningless.</p>"
        if smoke
        else ""
    )
    plots = "".join(f'<figure><img src="{html.escape(p)}"></figure>' for p in summary["outputs"]["plots"])
    links = "".join(
        f'<li><a href="{html.escape(r["report"])}">{html.escape(r["tag"])}</a></li>' for r in summary["settings"]
    )
    body = (
        f"{_md_tables_to_html(md)}\n<h2>Curves</h2>"
        f"{plots or html.escape(summary['outputs'].get('plots_skipped', ''))}\n"
        f"<h2>Per-setting reports</h2><ul>{links}</ul>\n"
        '<p><a href="sweep.json">sweep.json</a> · <a href="sweep.md">sweep.md</a></p>'
    )
    return html_page("revpers sweep", banner, body)


__all__ = ["Setting", "count_unet_calls", "grid", "recommend", "run_sweep_settings"]
