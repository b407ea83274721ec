"""Issue 6 item 2: (a) the paper's way vs (b) our in-process pipeline vs (c) our server (one gRPC
client) vs (d) our server under 1, 2, 4, 8 concurrent clients — one run, one machine, one bundle.

    python -m benchmarks.compare [--steps 20] [--backend onnxruntime|pytorch|tensorrt] [--bundle DIR]
    python -m benchmarks.compare --render-only      # re-derive ratios and rewrite .md/.png from compare.json

Photo mode on a folder of five real photos (``benchmarks.common.photo_folder``, or ``--photos DIR``).
(a) and (b) alternate photo by photo so that load from other processes hits both alike. Each
request, (a)/(b)/(c) alike, is decode -> detect -> align -> embed -> generator -> paste -> PNG
encode. The server runs ``--bls-instances`` BLS processes (default 2) and ``--component-instances``
copies of each component model (default 2 on the CPU, 1 on a GPU). The identity verification gate is
off unless ``--verify``: (a), the paper's way, has no gate. Results: benchmarks/results/compare.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
from pathlib import Path

from benchmarks.common import (
    add_run_arguments,
    anonymized_faces,
    component_instances,
    load_photos,
    md_table,
    quiet,
    revpers_commit,
    served_repository,
    smoke_bundle,
    stamp,
    target,
    write_results,
)
from benchmarks.pipelines import inprocess_request, max_pixel_difference, paper_way_request
from benchmarks.server import concurrency_level, timed_request, triton_server, warm_up
from revpers.core.params import Params
from revpers.gate.policy import VerifyPolicy
from revpers.service.anonymizer import Anonymizer
from revpers_client import RevpersClient

PAPER_WAY = (
    "(a) the paper's way: the same models and math, run as the paper's reference code runs them — "
    "for every image the SDXL+FaceID pipeline is loaded from disk (from_pretrained + load_ip_adapter + "
    "LoRA fuse, revpers.models.TorchModels.load) and the face models (dlib detector and landmarks, "
    "ArcFace) are loaded again: that reload (stage load_face_models) stands in for the paper code's "
    "per-image load of insightface FaceAnalysis (detector + ArcFace), which it needs to embed identities; "
    "the ratios are given with and without it. Faces go through the generator one at a time (CFG branches "
    "batched at 2, as in the paper's code); the inversion makes one UNet call per step; prompts are encoded "
    "on every use (no cache). Detection, alignment and paste-back are ours (the paper's code works on "
    "pre-aligned crops)."
)
OURS = (
    "(b) in process: models loaded once (revpers.anonymizer.Anonymizer), all faces of a photo in one "
    "generator batch, inversion batched {inv} timesteps per UNet call, prompt encodings cached. "
    "(c) the same pipeline behind Triton (backend {backend}, {bls} BLS instances, {comp} instance(s) of each "
    "component model) over gRPC with one client. "
    "(d) the server with N concurrent clients draining one queue of {jobs} requests (the folder {rounds}x). "
    "Identity verification gate in (b)-(d): {gate}."
)
WARMUP = (
    "Uncounted warm-up, {passes} pass(es): (b) the whole folder in process; (a) one photo (the smallest) "
    "the paper's way; (c)/(d) {clients} staggered clients (= max(BLS instances, component instances)) "
    "each sending the whole folder, so that every instance is likely to have seen every photo's batch "
    "sizes (benchmarks.server.warm_up)."
)
# what the code at the committed run's commit did (runs before the warm-up above recorded no "warmup")
WARMUP_BEFORE = (
    "Uncounted warm-up, {passes} pass(es): (b) the whole folder in process; (a) one photo the paper's "
    "way; (c)/(d) the folder sent sequentially {bls} times (once per BLS instance intended, but "
    "sequential requests may all have landed on one instance)."
)


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(p, no_server_help="skip (c) and (d)")
    p.add_argument("--levels", default="1,2,4,8", help="concurrent clients for (d)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="(d) queue = the folder this many times (default: enough for 2 requests per client at the top level)",
    )
    p.add_argument(
        "--warmup-passes",
        type=int,
        default=1,
        help="uncounted warm-up passes: the folder for (b), one photo for (a), the folder from "
        "staggered concurrent clients for (c)/(d) (0: none)",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="run the identity verification gate in (b), (c) and (d) too (off by default: (a), the "
        "paper's way, has no gate, so the comparison is of the same work; benchmarks.stages shows "
        "the gate's cost)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="measure nothing: read OUT/compare.json, re-derive the ratios and targets from its "
        "recorded per-photo figures and rewrite compare.json/.md/.png",
    )
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.render_only:
        return render(args.out)
    quiet()

    bundle = args.bundle or smoke_bundle(args.work / "smoke-bundle")
    photos = load_photos(args.photos, args.limit)
    raws = [(p.name, p.read_bytes()) for p in photos]
    params = Params(steps=args.steps, seed=args.seed)
    verify = VerifyPolicy(verify=args.verify)  # off by default: the paper's way has no identity gate
    levels = [int(x) for x in args.levels.split(",") if x]
    rounds = args.rounds or max(1, math.ceil(2 * max(levels) / len(raws)))
    comp = component_instances(args)
    warm_clients = max(1, args.bls_instances, comp)
    settings = {
        "steps": args.steps,
        "skip": params.skip,
        "guidance": params.guidance,
        "seed": args.seed,
        "photos": [n for n, _ in raws],
        "bundle": str(bundle),
        "backend": args.backend,
        "device": args.device,
        "inversion_batch": args.inversion_batch,
        "bls_instances": args.bls_instances,
        "component_instances": comp,
        "levels": levels,
        "rounds": rounds,
        "warmup_passes": args.warmup_passes,
        "verification_gate": args.verify,
        "server": not args.no_server,
    }
    result = stamp("compare", settings)
    result["title"] = "Comparison: paper's way vs in process vs server vs concurrency"
    result["warmup"] = {"description": WARMUP.format(passes=args.warmup_passes, clients=warm_clients)}
    print(f"compare: {len(raws)} photos, steps={args.steps}, bundle {bundle}", flush=True)

    anonymizer = Anonymizer(bundle, device=args.device, inversion_batch=args.inversion_batch)
    result["inprocess_load_s"] = round(anonymizer.load_seconds, 3)
    _warm_name, warm_raw = min(raws, key=lambda r: len(r[1]))
    # warm-up, not counted: a running service has seen every batch size before (first calls at a new
    # shape pay allocation and kernel selection); (a) reloads its models per image, so one photo per pass
    for _ in range(args.warmup_passes):
        for _name, raw in raws:
            inprocess_request(anonymizer, raw, params, verify)
        paper_way_request(bundle, warm_raw, params, args.device)

    rows = []
    outputs_b = {}
    for name, raw in raws:
        out_b, rep_b = inprocess_request(anonymizer, raw, params, verify)
        out_a, rep_a = paper_way_request(bundle, raw, params, args.device)
        outputs_b[name] = out_b
        row = {
            "photo": name,
            "faces": anonymized_faces(rep_b),
            "a_ms": rep_a["request_total_ms"],
            "b_ms": rep_b["request_total_ms"],
            "a_stages_ms": rep_a["timings_ms"],
            "b_stages_ms": rep_b["timings_ms"],
            "a_unet": rep_a["unet"],
            "b_unet": rep_b["unet"],
            "a_prompt_encodes": rep_a["prompt_encodes"],
            "a_face_models_read_from_disk": rep_a["face_models_read_from_disk"],
            "max_pixel_diff_a_vs_b": max_pixel_difference(out_a, out_b),
        }
        rows.append(row)
        print(
            f"  {name}: {row['faces']} face(s)  (a) {row['a_ms']:.0f} ms  (b) {row['b_ms']:.0f} ms  "
            f"max |a-b| {row['max_pixel_diff_a_vs_b']}",
            flush=True,
        )
    result["per_photo"] = rows

    if not args.no_server:
        repo = served_repository(
            bundle,
            args.backend,
            args.work / "served",
            args.inversion_batch,
            args.bls_instances,
            gpu=str(args.device).startswith("cuda"),
            component_instances=comp,
        )
        wire = {"steps": args.steps, "seed": args.seed, "verify": args.verify}
        with triton_server(repo) as server:
            result["server_ready_s"] = round(server.startup_seconds, 3)
            result["warmup"]["server"] = [
                warm_up(server.urls.grpc, raws, warm_clients, wire) for _ in range(args.warmup_passes)
            ]
            client = RevpersClient(server.urls.grpc)
            for row, (name, raw) in zip(rows, raws):
                out_c, rep_c, ms = timed_request(client, raw, wire)
                row.update(
                    {
                        "c_ms": round(ms, 3),
                        "c_server_total_ms": rep_c.get("server_total_ms"),
                        "c_stages_ms": rep_c.get("timings_ms"),
                        "max_pixel_diff_c_vs_b": max_pixel_difference(out_c, outputs_b[name]),
                    }
                )
                print(
                    f"  {name}: (c) {ms:.0f} ms (server {rep_c.get('server_total_ms', 0):.0f} ms)  "
                    f"max |c-b| {row['max_pixel_diff_c_vs_b']}",
                    flush=True,
                )
            client.close()
            jobs = raws * rounds
            conc = []
            for k in levels:
                level = concurrency_level(server.urls.grpc, jobs, k, wire)
                conc.append(level)
                lat = level.get("latency", {})
                print(
                    f"  (d) {k} client(s): {level['throughput_rps']:.3f} req/s, p50 {lat.get('p50') or 0:.0f} ms, "
                    f"p95 {lat.get('p95') or 0:.0f} ms, errors {len(level['errors'])}",
                    flush=True,
                )
            result["concurrency"] = conc

    derive(result)
    write_results("compare", result, _markdown(result), _plot, args.out)
    print(f"wrote {args.out}/compare.json, .md, .png")
    for t in result["targets"].values():
        print(f"  target: {t['target']}: measured {t['measured']} -> {'PASS' if t['pass'] else 'FAIL'}")
    return result


def derive(result: dict) -> dict:
    """Everything computed from the recorded per-photo figures and concurrency levels: per-image
    means, ratios (with and without (a)'s face-model reload), targets, descriptions. A measuring run
    and ``--render-only`` both go through here."""
    p = result["params"]
    rows = result["per_photo"]
    n = len(rows)
    a_img = sum(r["a_ms"] for r in rows) / n
    b_img = sum(r["b_ms"] for r in rows) / n
    face_reload = sum(r["a_stages_ms"].get("load_face_models", 0.0) for r in rows) / n
    per = {"a": round(a_img, 3), "b": round(b_img, 3), "a_without_face_model_reload": round(a_img - face_reload, 3)}
    ratios = {
        "a_over_b": round(a_img / b_img, 4),
        "a_over_b_without_face_model_reload": round((a_img - face_reload) / b_img, 4),
    }
    with_faces = [r for r in rows if r["faces"]]
    if with_faces:
        result["a_over_b_photos_with_faces"] = round(
            sum(r["a_ms"] for r in with_faces) / sum(r["b_ms"] for r in with_faces), 4
        )
    result["max_pixel_diff_a_vs_b"] = max(r["max_pixel_diff_a_vs_b"] for r in rows)
    targets = {
        "b_vs_a": target("(b) at least 3x faster per image than (a) (with (a)'s face-model reload)", a_img / b_img, 3.0)
    }
    if all("c_ms" in r for r in rows):
        c_img = sum(r["c_ms"] for r in rows) / n
        per["c"] = round(c_img, 3)
        ratios["c_over_b"] = round(c_img / b_img, 4)
        result["max_pixel_diff_c_vs_b"] = max(r["max_pixel_diff_c_vs_b"] for r in rows)
        targets["c_vs_b"] = target(
            "(c) within 15% of (b) per image: c/b - 1", c_img / b_img - 1.0, 0.15, higher_is_better=False
        )
    by = {c["clients"]: c["throughput_rps"] for c in result.get("concurrency") or []}
    if 1 in by and 4 in by and by[1] > 0:
        targets["throughput_4_vs_1"] = target(
            "(d) throughput at 4 clients at least 1.5x one client", by[4] / by[1], 1.5
        )
    jobs = p["rounds"] * len(p["photos"])
    result["description"] = {
        "a": PAPER_WAY,
        "bcd": OURS.format(
            inv=p["inversion_batch"],
            backend=p["backend"],
            bls=p["bls_instances"],
            comp=p.get("component_instances", "?"),
            jobs=jobs,
            rounds=p["rounds"],
            gate="on" if p.get("verification_gate") else "off",
        ),
    }
    if "warmup" not in result:  # a run from before warm-up was recorded: say what that code did
        result["warmup"] = {"description": WARMUP_BEFORE.format(passes=p["warmup_passes"], bls=p["bls_instances"])}
    result.update({"per_image_ms": per, "ratios": ratios, "targets": targets})
    return result


def render(out: Path) -> dict:
    """``--render-only``: the measured figures stay as recorded; ratios, targets and text are derived
    again by this code, which the ``rendered`` block records."""
    path = Path(out) / "compare.json"
    result = json.loads(path.read_text())
    result["rendered"] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "revpers_commit": revpers_commit(),
        "note": "re-rendered with --render-only: measured figures as recorded by the run above; "
        "per-image means, ratios, targets, descriptions, .md and .png derived again",
    }
    derive(result)
    write_results("compare", result, _markdown(result), _plot, out)
    print(f"re-rendered {path} and compare.md/.png")
    return result


def _lat(level: dict, key: str):
    """A latency figure of a concurrency level: ``revpers_client.cli.latency_stats`` keys (p50, p95); runs
    recorded before the switch to it used p50_ms/p95_ms."""
    lat = level.get("latency") or {}
    return lat.get(key, lat.get(f"{key}_ms"))


def _markdown(r: dict) -> str:
    rows = r["per_photo"]
    server = "c" in r["per_image_ms"]
    head = (
        ["photo", "faces", "(a) paper way ms", "(b) in process ms"]
        + (["(c) server ms"] if server else [])
        + ["max pixel diff a vs b"]
        + (["max pixel diff c vs b"] if server else [])
    )
    body = [
        [x["photo"], x["faces"], x["a_ms"], x["b_ms"]]
        + ([x["c_ms"]] if server else [])
        + [x["max_pixel_diff_a_vs_b"]]
        + ([x["max_pixel_diff_c_vs_b"]] if server else [])
        for x in rows
    ]
    per = r["per_image_ms"]
    body.append(["**per image**", "", per["a"], per["b"]] + ([per["c"]] if server else []) + ["", ""][: 1 + server])
    text = [
        r["description"]["a"],
        "",
        r["description"]["bcd"],
        "",
        r["warmup"]["description"],
        "",
        md_table(head, body),
        "",
    ]
    ra = r["ratios"]
    main_t = r["targets"]["b_vs_a"]
    text.append(
        f"Ratios (this run): (a)/(b) = {ra['a_over_b']:.2f}x (target >= 3x: "
        f"{'pass' if main_t['pass'] else 'fail'}); without (a)'s per-image face-model reload "
        f"(stage load_face_models, {per['a'] - per['a_without_face_model_reload']:,.0f} ms per image) "
        f"(a)/(b) = {ra['a_over_b_without_face_model_reload']:.2f}x "
        f"({'would pass' if ra['a_over_b_without_face_model_reload'] >= 3.0 else 'below'} 3x)"
        + (f"; (c)/(b) = {ra['c_over_b']:.3f}" if server else "")
        + (
            f"; (a)/(b) over the photos with faces only = {r['a_over_b_photos_with_faces']:.2f}x"
            if "a_over_b_photos_with_faces" in r
            else ""
        )
        + "."
    )
    if all("a_unet" in x for x in rows):
        text += [
            "",
            "UNet calls per photo, counted (calls / sample evaluations):",
            "",
            md_table(
                ["photo", "faces", "(a) calls", "(a) samples", "(b) calls", "(b) samples"],
                [
                    [
                        x["photo"],
                        x["faces"],
                        x["a_unet"]["calls"],
                        x["a_unet"]["samples"],
                        x["b_unet"]["calls"],
                        x["b_unet"]["samples"],
                    ]
                    for x in rows
                ],
            ),
            "",
        ]
    text.append(
        f"Models loaded once for (b): {r['inprocess_load_s']:.2f} s"
        + (f"; server ready after {r['server_ready_s']:.1f} s" if server else "")
        + " (not in the per-image figures)."
    )
    if r.get("rendered"):
        text += [
            "",
            f"Re-rendered {r['rendered']['date']} at commit {r['rendered']['revpers_commit']}: "
            f"{r['rendered']['note']}.",
        ]
    if r.get("concurrency"):
        text += [
            "",
            "(d) concurrent clients:",
            "",
            md_table(
                ["clients", "requests", "wall s", "throughput req/s", "faces/s", "p50 ms", "p95 ms", "errors"],
                [
                    [
                        c["clients"],
                        c["requests"],
                        c["wall_s"],
                        c["throughput_rps"],
                        c["faces_per_s"],
                        _lat(c, "p50"),
                        _lat(c, "p95"),
                        len(c["errors"]),
                    ]
                    for c in r["concurrency"]
                ],
            ),
        ]
    text += [
        "",
        "Targets (ratios from this run; not asserted anywhere):",
        "",
        md_table(
            ["target", "measured", "threshold", "pass"],
            [[t["target"], t["measured"], t["threshold"], t["pass"]] for t in r["targets"].values()],
        ),
    ]
    stages = sorted({k for x in rows for k in x["b_stages_ms"]} | {k for x in rows for k in x["a_stages_ms"]})
    text += [
        "",
        "Stage totals over the folder, ms:",
        "",
        md_table(
            ["stage", "(a)", "(b)"] + (["(c) server-side"] if server else []),
            [
                [s, sum(x["a_stages_ms"].get(s, 0.0) for x in rows), sum(x["b_stages_ms"].get(s, 0.0) for x in rows)]
                + ([sum((x.get("c_stages_ms") or {}).get(s, 0.0) for x in rows)] if server else [])
                for s in stages
            ],
        ),
    ]
    return "\n".join(text)


def _plot(r: dict):
    import matplotlib.pyplot as plt

    conc = r.get("concurrency") or []
    fig, axes = plt.subplots(1, 2 if conc else 1, figsize=(12 if conc else 6, 4.5), squeeze=False)
    ax = axes[0][0]
    names = {
        "a": "(a) paper way",
        "a_without_face_model_reload": "(a) without\nface-model reload",
        "b": "(b) in process",
        "c": "(c) server,\n1 client",
    }
    colors = {"a": "#b0b0b0", "a_without_face_model_reload": "#d8d8d8", "b": "#4c72b0", "c": "#55a868"}
    labels = [k for k in names if k in r["per_image_ms"]]
    vals = [r["per_image_ms"][k] / 1e3 for k in labels]
    bars = ax.bar([names[k] for k in labels], vals, color=[colors[k] for k in labels])
    ax.bar_label(bars, fmt="%.2f s")
    ax.set_ylabel("seconds per image (folder mean)")
    ax.set_title(f"{len(r['per_photo'])} photos, steps={r['params']['steps']}")
    if conc:
        ax2 = axes[0][1]
        xs = [c["clients"] for c in conc]
        ax2.plot(xs, [c["throughput_rps"] for c in conc], "o-", label="throughput (req/s)", color="#4c72b0")
        ax2.set_xlabel("concurrent clients")
        ax2.set_ylabel("requests / s")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(xs, [str(x) for x in xs])
        ax3 = ax2.twinx()
        ax3.plot(
            xs, [(_lat(c, "p50") or math.nan) / 1e3 for c in conc], "s--", color="#dd8452", label="p50 latency (s)"
        )
        ax3.plot(
            xs, [(_lat(c, "p95") or math.nan) / 1e3 for c in conc], "^--", color="#c44e52", label="p95 latency (s)"
        )
        ax3.set_ylabel("latency (s)")
        h1, l1 = ax2.get_legend_handles_labels()
        h2, l2 = ax3.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
        ax2.set_title(f"(d) server under load, backend {r['params']['backend']}")
    return fig


if __name__ == "__main__":
    main()
