"""One batch run on Ray Data: read the inputs, anonymize them on an actor pool, write the image rows
to a checkpointed Parquet sink, then the audit table, the review list and the run summary.

Exactly once: each output is named by its input's path (mirrored, collisions refused before the run:
``inputs.plan``), so a redone image overwrites its own files and never adds one; each image row
records ``key`` = sha256(input content : parameters : bundle). Resume is Ray Data's checkpointing
(``CheckpointConfig(id_column="path")``): the rows written are committed with their ids, and a
re-run with the same parameters and bundle filters those ids out right after the read, so it
processes only the rest. Ray's mechanism was chosen over a skip-if-output-exists check because it
also covers the Parquet rows (its two-phase commit removes the files of a write that died before
committing, so the table gets no duplicate rows) and works the same on object stores. The state of
each (parameters, bundle) lives in ``OUTPUT/.revpers-batch/<namespace>/`` (``images/`` and
``checkpoint/``); it is kept after success so that a finished run run again does nothing.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import posixpath
import sys
import time
import uuid
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
from ray.data.checkpoint import CheckpointConfig
from ray.data.expressions import col

from revpers.batch import tables
from revpers.batch.inputs import STATE_DIR, InputError, locate, plan, relative
from revpers.batch.workers import ImageWorker, write_atomic
from revpers.models.bundle import load_bundle

SUMMARY, REVIEW_CSV, REVIEW_JSON, AUDIT = "run-summary.json", "review.csv", "review.json", "audit.parquet"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
# Logical CPUs of a local Ray: checkpointed resume needs CPUs beyond the actors' own (the
# checkpoint filter actor, read and write tasks); logical CPUs are only counters, so a laptop's
# Ray gets at least this many (a resume hung with num_cpus=2 on a 2-core machine).
MIN_LOCAL_CPUS = 8


@ray.remote(num_cpus=0)
class Budget:
    """Run-wide counters the actors share: stop once more than ``max_failures`` images failed, or
    after ``limit`` images were started."""

    def __init__(self, limit: int | None, max_failures: int | None):
        self.limit, self.max_failures = limit, max_failures
        self.started = self.failures = 0
        self.stopped: str | None = None

    def admit(self) -> str | None:
        """None: go ahead with one image; otherwise why the run stopped."""
        if self.stopped is None and self.limit is not None and self.started >= self.limit:
            self.stopped = f"--limit {self.limit} reached"
        if self.stopped is None:
            self.started += 1
        return self.stopped

    def failed(self) -> None:
        self.failures += 1
        if self.max_failures is not None and self.failures > self.max_failures and self.stopped is None:
            self.stopped = f"more than {self.max_failures} image(s) failed (--max-failures)"

    def state(self) -> dict:
        return {"started": self.started, "failures": self.failures, "stopped": self.stopped}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _read_images(fs, folder: str) -> pa.Table:
    if fs.get_file_info(folder).type == pafs.FileType.NotFound:
        return tables.IMAGE_SCHEMA.empty_table()
    files = [
        i.path
        for i in fs.get_file_info(pafs.FileSelector(folder, recursive=True))
        if i.path.endswith(".parquet") and i.type == pafs.FileType.File
    ]
    if not files:
        return tables.IMAGE_SCHEMA.empty_table()
    return pads.dataset(files, schema=tables.IMAGE_SCHEMA, filesystem=fs, format="parquet").to_table()


def init_ray(args) -> bool:
    """Start (or join) Ray unless this process already did; True when this call started it."""
    if ray.is_initialized():
        return False
    if args.address:
        ray.init(address=args.address, log_to_driver=args.verbose)
    else:
        ray.init(
            num_cpus=args.num_cpus or max(MIN_LOCAL_CPUS, os.cpu_count() or 1),
            include_dashboard=False,
            log_to_driver=args.verbose,
        )
    return True


def run(args, request: dict, exit_on: tuple[str, ...] = ()) -> int:
    """``revpers batch`` (see ``revpers.cli.batch``): ``request`` holds the options every image gets
    (``RequestOptions`` keys, validated; the format is set per file). ``exit_on``: see ``ImageWorker``."""
    t0, started_at, run_id = time.perf_counter(), _now(), uuid.uuid4().hex
    mode = "models" if args.models is not None else "servers"
    params_sha256 = tables.sha256_text(tables.canonical({**request, "format": args.format}))
    bundle_sha256 = None
    if mode == "models":
        bundle_sha256 = load_bundle(args.models).digest()
    output = locate(args.output)
    in_fs, inputs = plan(args.input, output, args.format)
    output.fs.create_dir(output.path, recursive=True)
    namespace = tables.sha256_text(f"{params_sha256}:{bundle_sha256 or 'served'}")[:16]
    state = posixpath.join(STATE_DIR, namespace)
    images_dir = posixpath.join(output.path, state, "images")
    gpus = args.num_gpus if mode == "models" else 0
    cpus = args.cpus_per_actor if args.cpus_per_actor is not None else (1.0 if mode == "models" else 0.25)
    setup = {
        "mode": mode,
        "root": inputs.root,
        "output": args.output,
        "format": args.format,
        "request": request,
        "params_sha256": params_sha256,
        "bundle_sha256": bundle_sha256,
        "run_id": run_id,
        "state": state,
        "models": str(args.models) if args.models is not None else None,
        "device": args.device or ("cuda" if gpus else "cpu"),
        "inversion_batch": args.inversion_batch,
        "threads": max(1, int(cpus)),
        "urls": args.servers,
        "timeout": args.timeout,
        "max_attempts": args.max_attempts,
    }

    started_ray = init_ray(args)
    ctx = ray.data.DataContext.get_current()
    previous = ctx.checkpoint_config
    ctx.checkpoint_config = CheckpointConfig(
        id_column="path",
        checkpoint_path=posixpath.join(output.path, state, "checkpoint"),
        delete_checkpoint_on_success=False,
        override_filesystem=output.fs,
    )
    budget = Budget.remote(args.limit, None if args.max_failures < 0 else args.max_failures)
    error = None
    try:
        ds = ray.data.read_binary_files(inputs.files, filesystem=in_fs, include_paths=True)
        ds = ds.map_batches(
            ImageWorker,
            fn_constructor_kwargs={"setup": setup, "budget": budget, "exit_on": exit_on},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=args.concurrency),
            num_cpus=cpus,
            num_gpus=gpus or None,
        )
        ds = ds.filter(expr=col("status") != tables.NOT_DONE)  # not written: a re-run does them
        ds.write_parquet(images_dir, filesystem=output.fs)
    except (ray.exceptions.RayError, RuntimeError, OSError) as exc:  # the run itself broke: say so, keep what is done
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    finally:
        ctx.checkpoint_config = previous
        try:
            budget_state = ray.get(budget.state.remote())
        except ray.exceptions.RayError:
            budget_state = {"started": None, "failures": None, "stopped": None}
        ray.kill(budget)
    wall = time.perf_counter() - t0

    images = _read_images(output.fs, images_dir)
    images = images.filter(pc.is_in(images["path"], value_set=pa.array(inputs.files)))
    duplicates = images.num_rows - len(set(images["path"].to_pylist()))
    now = images.filter(pc.equal(images["run_id"], run_id))
    done = set(images["path"].to_pylist())
    not_done = [p for p in inputs.files if p not in done]
    rows = tables.review_rows(images, inputs.not_taken, [relative(p, inputs.root) for p in not_done])
    write_atomic(output.fs, posixpath.join(output.path, REVIEW_CSV), tables.review_csv(rows))
    write_atomic(output.fs, posixpath.join(output.path, REVIEW_JSON), (json.dumps(rows, indent=2) + "\n").encode())
    audit = tables.audit_table(images)
    with output.fs.open_output_stream(posixpath.join(output.path, f".{AUDIT}.part")) as f:
        pq.write_table(audit, f)
    output.fs.move(posixpath.join(output.path, f".{AUDIT}.part"), posixpath.join(output.path, AUDIT))

    status = tables.counts(images)
    failed = status.get(tables.FAILED, 0) + status.get(tables.REJECTED, 0)
    exit_code = EXIT_OK if not (failed or not_done or status.get(tables.REVIEW) or error) else EXIT_FAILED
    smoke = any(images["smoke"].to_pylist())
    summary = {
        "tool": "revpers batch",
        "started_at": started_at,
        "finished_at": _now(),
        "wall_s": round(wall, 3),
        "run_id": run_id,
        "input": args.input,
        "output": args.output,
        "mode": mode,
        "models": setup["models"],
        "servers": args.servers,
        "concurrency": args.concurrency,
        "cpus_per_actor": cpus,
        "gpus_per_actor": gpus,
        "ray_address": args.address or "local",
        "request": request,
        "format": args.format,
        "params_sha256": params_sha256,
        "bundle_sha256": sorted({b for b in images["bundle_sha256"].to_pylist() if b} | ({bundle_sha256} - {None})),
        "state": state,
        "resume": "ray.data checkpoint (id column: path)",
        "counts": {
            "inputs": len(inputs.files),
            **{k: status.get(k, 0) for k in (tables.OK, tables.REVIEW, tables.REJECTED, tables.FAILED)},
            "not_done": len(not_done),
            "not_taken": len(inputs.not_taken),
            "done_this_run": now.num_rows,
            "done_before": images.num_rows - now.num_rows,
        },
        "duplicate_rows": duplicates,
        "throughput_images_per_s": round(now.num_rows / wall, 3) if wall > 0 else None,
        "faces": audit.num_rows,
        "faces_by_verdict": dict(sorted(Counter(audit["verdict"].to_pylist()).items())),
        "images_by_verdict": dict(sorted(Counter(v for v in images["verdict"].to_pylist() if v).items())),
        "failures": [
            {"path": r["rel"], "reason": r["reason"]}
            for r in images.filter(pc.equal(images["status"], tables.FAILED)).select(["rel", "reason"]).to_pylist()
        ],
        "not_taken": [{"path": n.path, "reason": n.reason} for n in inputs.not_taken],
        "stopped": budget_state["stopped"],
        "error": error,
        "smoke": smoke,
        "review_list": {"csv": REVIEW_CSV, "json": REVIEW_JSON, "rows": len(rows)},
        "audit": AUDIT,
        "exit_code": exit_code,
    }
    if smoke:
        summary["warning"] = "smoke weights (tiny random models) were used: outputs are noise, not anonymized faces"
    write_atomic(output.fs, posixpath.join(output.path, SUMMARY), (json.dumps(summary, indent=2) + "\n").encode())
    if started_ray:
        ray.shutdown()
    _print(summary, args.output)
    return exit_code


def _print(s: dict, output: str) -> None:
    c = s["counts"]
    lines = [
        f"{c['inputs']} input(s): {c['ok']} passed, {c['review']} to review, {c['rejected']} rejected, "
        f"{c['failed']} failed, {c['not_done']} not done, {c['not_taken']} not taken; "
        f"{c['done_this_run']} done in this run ({s['throughput_images_per_s']} images/s), "
        f"{c['done_before']} before"
    ]
    if s["stopped"]:
        lines.append(f"stopped: {s['stopped']}; run it again to continue")
    if s["error"]:
        lines.append(f"error: the run broke off: {s['error']}; run it again to continue")
    for f in s["failures"][:10]:
        lines.append(f"FAILED {f['path']}: {(f['reason'] or '').splitlines()[0][:300]}")
    if s["smoke"]:
        lines.append("WARNING: " + s["warning"])
    lines.append(
        f"summary: {output}/{SUMMARY}; review list: {output}/{REVIEW_CSV} ({s['review_list']['rows']} "
        f"row(s)); audit table: {output}/{AUDIT}"
    )
    print("\n".join(lines), file=sys.stdout, flush=True)


__all__ = ["Budget", "InputError", "run"]
