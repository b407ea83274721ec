"""`revpers batch` throughput with 1 actor vs 2 (or any list): the same photos, parameters and bundle,
a fresh output folder per run, one local Ray for all runs.

    python -m benchmarks.batch [--photos 40] [--steps 4] [--actors 1 2] [--models DIR]

Writes benchmarks/results/batch.json and batch.md. ``wall_s`` is the whole command (actor start and
model load included, Ray's own start excluded: one Ray serves every run); ``busy_s`` is the sum of
the per-image seconds the actors report. On a machine with fewer free cores than actors x torch
threads, more actors cannot help: the ratio says how much the pool gained here, not elsewhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from benchmarks.common import WORK, quiet, smoke_bundle, stamp, write_results
from revpers.cli.batch import run_batch as run
from revpers.cli.main import build_parser
from revpers.faces.samples import varied_photos


def write_photos(root: Path, n: int) -> None:
    from PIL import Image

    for rel, rgb in varied_photos(n):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(p, **({"quality": 92} if p.suffix == ".jpg" else {}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", type=int, default=40)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    p.add_argument("--models", type=Path, default=None, help="bundle (default: the smoke bundle)")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray")
    args = p.parse_args(argv)
    quiet()
    import pyarrow.parquet as pq
    import ray

    bundle = args.models or smoke_bundle()
    work = WORK / "batch"
    photos = work / "photos"
    shutil.rmtree(work, ignore_errors=True)
    write_photos(photos, args.photos)
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    runs = []
    try:
        for n in args.actors:
            out = work / f"out-{n}"
            cli = build_parser().parse_args(
                [
                    "batch",
                    str(photos),
                    "-o",
                    str(out),
                    "--models",
                    str(bundle),
                    "--concurrency",
                    str(n),
                    "--steps",
                    str(args.steps),
                ]
            )
            t0 = time.perf_counter()
            code = run(cli)
            wall = time.perf_counter() - t0
            summary = json.loads((out / "run-summary.json").read_text())
            table = pq.read_table(out / summary["state"] / "images")
            per_worker = {}
            for w, s in zip(table["worker"].to_pylist(), table["seconds"].to_pylist()):
                per_worker[w] = per_worker.get(w, 0.0) + s
            done = summary["counts"]["done_this_run"]
            runs.append(
                {
                    "actors": n,
                    "exit_code": code,
                    "images": done,
                    "faces": summary["faces"],
                    "wall_s": round(wall, 2),
                    "images_per_s": round(done / wall, 4),
                    "busy_s": round(sum(per_worker.values()), 2),
                    "busy_s_per_actor": sorted(round(v, 2) for v in per_worker.values()),
                }
            )
            print(json.dumps(runs[-1]))
    finally:
        ray.shutdown()
    base = runs[0]
    for r in runs:
        r["speedup_vs_first"] = round(r["images_per_s"] / base["images_per_s"], 3)
    result = {
        **stamp(
            "batch",
            {
                "photos": args.photos,
                "steps": args.steps,
                "actors": args.actors,
                "bundle": str(bundle),
                "ray_num_cpus": args.num_cpus,
                "cpus_per_actor": 1,
            },
        ),
        "runs": runs,
    }
    result["title"] = "revpers batch: throughput by actor count"
    md = [
        "| actors | images | faces | wall s | images/s | speed-up | busy s per actor |",
        "|---|---|---|---|---|---|---|",
    ]
    md += [
        f"| {r['actors']} | {r['images']} | {r['faces']} | {r['wall_s']} | {r['images_per_s']} | "
        f"{r['speedup_vs_first']} | {r['busy_s_per_actor']} |"
        for r in runs
    ]
    md += [
        "",
        "wall s: the whole `revpers batch` run (actor start and model load included; Ray started once "
        "before). Timings on a shared machine depend on its load (load average above).",
    ]
    paths = write_results("batch", result, "\n".join(md) + "\n")
    print(f"wrote {paths['json']} and {paths['md']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
