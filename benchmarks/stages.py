"""Issue 6 item 1: where every millisecond of a photo request goes, in process and through the server.

    python -m benchmarks.stages [--steps 20] [--backend onnxruntime|pytorch|tensorrt] [--repeats 3]

Stages: decode, detect (faces in the photo), identity_embed (face search in each aligned crop +
ArcFace), prompt_encode (cached and not), vae_encode, inversion, generation, vae_decode, verify (the identity
gate), align_paste
(alignment, colour matching and paste-back: the photo-mode time not in any other stage), encode
(PNG). Through the server the BLS model reports the same stages; "transport" is the client's wall
time minus the server's own total (gRPC, serialization, queueing). Prompt encode "not cached" is
measured on a request with an attribute prompt never seen before (the empty prompt is still a cache
hit there, so it is one fresh encode); "cached" on requests without a prompt after the first.
Each figure is the median over ``--repeats`` requests per photo; the prompt-encode averages are over
the photos with faces (a photo without one encodes nothing). The identity verification gate is on by
default (``--no-verify`` turns it off), so its cost shows as the verify stage. The server runs
``--bls-instances`` BLS processes (default 2) and ``--component-instances`` copies of each component
model (default 2 on the CPU, 1 on a GPU). Results: benchmarks/results/stages.{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import uuid

from benchmarks.common import (
    add_run_arguments,
    anonymized_faces,
    component_instances,
    load_photos,
    md_table,
    quiet,
    served_repository,
    smoke_bundle,
    stamp,
    write_results,
)
from benchmarks.pipelines import inprocess_request
from benchmarks.server import timed_request, triton_server, warm_up
from revpers.core.params import Params
from revpers.gate.policy import VerifyPolicy
from revpers.service.anonymizer import Anonymizer
from revpers_client import RevpersClient

STAGES = (
    "decode",
    "detect",
    "identity_embed",
    "prompt_encode",
    "vae_encode",
    "inversion",
    "generation",
    "vae_decode",
    "verify",
    "align_paste",
    "encode",
)


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.stages", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_run_arguments(p)
    p.add_argument("--repeats", type=int, default=3, help="requests per photo (median reported)")
    p.add_argument(
        "--verify",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the identity verification gate (default on: its cost is the verify stage)",
    )
    p.add_argument(
        "--warmup-passes",
        type=int,
        default=1,
        help="uncounted warm-up passes over the folder (in process; through the server from "
        "staggered concurrent clients, one per instance)",
    )
    return p.parse_args(argv)


def _median_stages(reports: list[dict]) -> dict:
    return {s: round(statistics.median(r["timings_ms"].get(s, 0.0) for r in reports), 3) for s in STAGES}


def _measure(run, raws, repeats: int, prompt_key: str) -> dict:
    """run(raw, **params) -> (bytes, report, total_ms). Per photo: ``repeats`` cached requests, then
    one with a fresh prompt (uncached encode)."""
    rows = []
    for name, raw in raws:
        reps, totals, server_totals = [], [], []
        for _ in range(repeats):
            _img, rep, total = run(raw)
            reps.append(rep)
            totals.append(total)
            if "server_total_ms" in rep:
                server_totals.append(rep["server_total_ms"])
        _img, fresh, _ = run(raw, prompt=f"benchmark prompt {uuid.uuid4().hex[:12]}")
        row = {
            "photo": name,
            "faces": anonymized_faces(reps[0]),
            "stages_ms": _median_stages(reps),
            "total_ms": round(statistics.median(totals), 3),
            "prompt_encode_uncached_ms": fresh["timings_ms"].get("prompt_encode", 0.0),
            "prompt_encode_cached_ms": round(
                statistics.median(r["timings_ms"].get("prompt_encode", 0.0) for r in reps), 3
            ),
        }
        if server_totals:
            row["server_total_ms"] = round(statistics.median(server_totals), 3)
            row["transport_ms"] = round(row["total_ms"] - row["server_total_ms"], 3)
        rows.append(row)
        print(
            f"  {prompt_key} {name}: {row['total_ms']:.0f} ms  "
            + " ".join(f"{s}={row['stages_ms'][s]:.0f}" for s in STAGES),
            flush=True,
        )
    return {
        "per_photo": rows,
        "totals_ms": {s: round(sum(r["stages_ms"][s] for r in rows), 3) for s in STAGES},
        "request_total_ms": round(sum(r["total_ms"] for r in rows), 3),
    }


def main(argv=None) -> dict:
    args = parse(argv)
    quiet()

    bundle = args.bundle or smoke_bundle(args.work / "smoke-bundle")
    raws = [(p.name, p.read_bytes()) for p in load_photos(args.photos, args.limit)]
    comp = component_instances(args)
    result = stamp(
        "stages",
        {
            "steps": args.steps,
            "seed": args.seed,
            "repeats": args.repeats,
            "bundle": str(bundle),
            "photos": [n for n, _ in raws],
            "backend": args.backend,
            "device": args.device,
            "inversion_batch": args.inversion_batch,
            "bls_instances": args.bls_instances,
            "component_instances": comp,
            "verification_gate": args.verify,
            "warmup_passes": args.warmup_passes,
            "server": not args.no_server,
        },
    )
    result["title"] = "Stage breakdown of a photo request"
    result["stage_definitions"] = " ".join(__doc__.split("Stages:", 1)[1].split("Each figure", 1)[0].split())
    print(
        f"stages: {len(raws)} photos, steps={args.steps}, verification gate {'on' if args.verify else 'off'}",
        flush=True,
    )

    anonymizer = Anonymizer(bundle, device=args.device, inversion_batch=args.inversion_batch)
    verify = VerifyPolicy(verify=args.verify)

    def inproc(raw, prompt=None):
        out, rep = inprocess_request(anonymizer, raw, Params(steps=args.steps, seed=args.seed, prompt=prompt), verify)
        return out, rep, rep["request_total_ms"]

    for _ in range(args.warmup_passes):  # uncounted: first calls at each batch size, the empty prompt's first encode
        for _name, raw in raws:
            inproc(raw)
    result["inprocess"] = _measure(inproc, raws, args.repeats, "in process")

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
        with triton_server(repo) as server:
            result["server_ready_s"] = round(server.startup_seconds, 3)
            wire = {"steps": args.steps, "seed": args.seed, "verify": args.verify}
            result["server_warmup"] = [
                warm_up(server.urls.grpc, raws, max(1, args.bls_instances, comp), wire)
                for _ in range(args.warmup_passes)
            ]
            client = RevpersClient(server.urls.grpc)

            def served(raw, prompt=None):
                return timed_request(client, raw, {**wire, "prompt": prompt})

            result["server"] = _measure(served, raws, args.repeats, "server")
            client.close()

    write_results("stages", result, _markdown(result), _plot, args.out)
    print(f"wrote {args.out}/stages.json, .md, .png")
    return result


def _prompt_encode_means(per_photo: list[dict]) -> list[float | None]:
    """Mean (not cached, cached) prompt-encode ms over the photos with faces."""
    rows = [x for x in per_photo if x["faces"]]
    if not rows:
        return [None, None]
    return [
        sum(x["prompt_encode_uncached_ms"] for x in rows) / len(rows),
        sum(x["prompt_encode_cached_ms"] for x in rows) / len(rows),
    ]


def _markdown(r: dict) -> str:
    server = "server" in r
    head = ["stage", "in process ms"] + (["server ms"] if server else [])
    rows = [[s, r["inprocess"]["totals_ms"][s]] + ([r["server"]["totals_ms"][s]] if server else []) for s in STAGES]
    ip_total = r["inprocess"]["request_total_ms"]
    if server:
        st = r["server"]
        server_side = sum(x.get("server_total_ms", 0.0) for x in st["per_photo"])
        rows.append(["transport (client wall - server total)", "", round(st["request_total_ms"] - server_side, 3)])
    rows.append(["**request total**", ip_total] + ([r["server"]["request_total_ms"]] if server else []))
    enc = [["in process", *_prompt_encode_means(r["inprocess"]["per_photo"])]]
    if server:
        enc.append(["server", *_prompt_encode_means(r["server"]["per_photo"])])
    per = [
        [x["photo"], x["faces"], x["total_ms"]] + ([y["total_ms"], y.get("transport_ms")] if server else [])
        for x, y in zip(
            r["inprocess"]["per_photo"], (r["server"]["per_photo"] if server else r["inprocess"]["per_photo"])
        )
    ]
    return "\n".join(
        [
            f"Sum over the {len(r['inprocess']['per_photo'])} photos of the per-photo median of "
            f"{r['params']['repeats']} "
            f"requests (steps={r['params']['steps']}; identity verification gate "
            f"{'on: its cost is the verify stage' if r['params'].get('verification_gate') else 'off'}).",
            "",
            md_table(head, rows),
            "",
            "Prompt encode per request, ms, mean over the photos with faces (not cached = a fresh attribute prompt; "
            "cached = no prompt, after the first request):",
            "",
            md_table(["where", "not cached", "cached"], enc),
            "",
            md_table(
                ["photo", "faces", "in process ms"] + (["server ms (client wall)", "transport ms"] if server else []),
                per,
            ),
            "",
            f"Stage definitions: {r['stage_definitions']}",
        ]
    )


def _plot(r: dict):
    import matplotlib.pyplot as plt

    cols = [("in process", r["inprocess"])] + ([("server", r["server"])] if "server" in r else [])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = plt.get_cmap("tab10").colors
    for i, (label, data) in enumerate(cols):
        bottom = 0.0
        for j, s in enumerate(STAGES):
            v = data["totals_ms"][s] / 1e3
            ax.bar(i, v, bottom=bottom, color=colors[j % 10], label=s if i == 0 else None)
            bottom += v
        if label == "server":
            transport = (data["request_total_ms"] - sum(x.get("server_total_ms", 0.0) for x in data["per_photo"])) / 1e3
            ax.bar(i, transport, bottom=bottom, color="#333333", label="transport")
    ax.set_xticks(range(len(cols)), [c[0] for c in cols])
    ax.set_ylabel("seconds (sum over the photos)")
    ax.set_title(f"Where the time goes: {len(r['inprocess']['per_photo'])} photos, steps={r['params']['steps']}")
    ax.legend(fontsize=8, bbox_to_anchor=(1.02, 1), loc="upper left")
    return fig


if __name__ == "__main__":
    main()
