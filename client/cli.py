"""`revpers-client`: anonymize photo collections against one or more revpers Triton servers (gRPC).

    revpers-client anonymize INPUT... -o OUTDIR --url HOST:PORT [--url ...] [--concurrency N]
    revpers-client health --url HOST:PORT [--url ...] [--json]

See README "Client" for outputs, the attribute prompt template and exit codes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import math
import os
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import attributes
from .batch import BatchClient, Job, RetryPolicy
from .core import MODEL, sha256_hex

PROG = "revpers-client"
IMAGE_EXTS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
FORMAT_EXT = {"jpeg": ".jpg", "png": ".png", "webp": ".webp"}
SUMMARY = "run-summary.json"
MANIFEST = "audit-manifest.json"
PART = ".part"  # temporary files: ".<name>.part" beside the final file, renamed when complete

MAX_GATE_RETRIES = 5  # the server's limit on PARAMS "retries" (revpers.verify.MAX_RETRIES; a test compares)
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}  # 128 + signal number, as shells report


class UsageError(Exception):
    """Bad command line or inputs, found before any request is sent (exit code 2)."""


# --------------------------------------------------------------------------- inputs -> plan


@dataclass(frozen=True)
class Item:
    src: Path      # the input file
    rel: str       # its path relative to the input root it came from (posix), mirrored under OUTDIR
    out_rel: str   # the output image path relative to OUTDIR
    fmt: str       # output format sent to the server: jpeg | png | webp


def _has_magic(arg: str) -> bool:
    return any(c in arg for c in "*?[")


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Image files under ``root`` (recursive, sorted, hidden files and folders and ``exclude`` skipped)."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and (exclude is None or (here / d).resolve() != exclude))
        for name in sorted(filenames):
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTS:
                yield here / name


def _out_name(rel: str, fmt_choice: str) -> tuple[str, str]:
    p = Path(rel)
    known = IMAGE_EXTS.get(p.suffix.lower())
    if fmt_choice == "keep":
        return (rel, known) if known else (p.with_suffix(".png").as_posix(), "png")
    if known == fmt_choice:
        return rel, fmt_choice
    return p.with_suffix(FORMAT_EXT[fmt_choice]).as_posix(), fmt_choice


def plan(inputs: Sequence[str], outdir: Path, fmt_choice: str = "keep") -> list[Item]:
    """Inputs (files, folders walked recursively, globs) -> items sorted by output path.

    A folder's images are mirrored relative to that folder, a file goes to OUTDIR/<its name>, a
    glob's matches relative to the glob's leading folder (``photos/**/*.jpg`` -> relative to
    ``photos``). Folders take .jpg/.jpeg/.png/.webp files (any case), files and glob matches are
    taken as given. Two inputs that would write the same output are refused.
    """
    exclude = outdir.resolve()
    found: list[tuple[Path, str]] = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            found += [(f, f.relative_to(path).as_posix()) for f in _walk(path, exclude)]
        elif path.is_file():
            found.append((path, path.name))
        elif _has_magic(arg):
            import glob

            parts = Path(arg).parts
            k = next(i for i, part in enumerate(parts) if _has_magic(part))
            base = Path(*parts[:k]) if k else Path(".")
            matches = sorted(glob.glob(arg, recursive=True))
            if not matches:
                raise UsageError(f"{arg}: the pattern matches nothing")
            for m in matches:
                mp = Path(m)
                if any(part.startswith(".") for part in mp.relative_to(base).parts):
                    continue
                if mp.is_dir():
                    found += [(f, f.relative_to(base).as_posix()) for f in _walk(mp, exclude)]
                elif mp.is_file() and exclude not in mp.resolve().parents:
                    found.append((mp, mp.relative_to(base).as_posix()))
        else:
            raise UsageError(f"{arg}: no such file or folder")
    items: dict[str, Item] = {}
    for src, rel in found:
        out_rel, fmt = _out_name(rel, fmt_choice)
        prev = items.get(out_rel)
        if prev is not None:
            if prev.src.resolve() == src.resolve():
                continue  # the same file named twice
            raise UsageError(f"{prev.src} and {src} would both be written to {outdir / out_rel}; "
                             "anonymize them in separate runs or to separate output folders")
        items[out_rel] = Item(src, rel, out_rel, fmt)
    if not items:
        raise UsageError("no input images found (folders are searched for .jpg, .jpeg, .png, .webp)")
    return [items[k] for k in sorted(items)]


# --------------------------------------------------------------------------- files


def part_path(path: Path) -> Path:
    return path.with_name("." + path.name + PART)


def write_atomic(path: Path, data: bytes) -> None:
    """Write to ``.<name>.part`` beside ``path``, fsync, rename: ``path`` is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = part_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # also Ctrl-C / SIGTERM mid-write: leave no temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def report_path(outdir: Path, item: Item) -> Path:
    return outdir / (item.out_rel + ".json")


@dataclass(frozen=True)
class ResumeCheck:
    report: dict | None              # the saved report when the output is complete: skip the item
    data: bytes | None = None        # the input's bytes when the check read them: send these
    input_sha256: str | None = None  # ... and their digest


def resume_check(outdir: Path, item: Item, request: dict) -> ResumeCheck:
    """Is this item's output complete for the same input and request? Report present and readable
    with the same request parameters, the image's SHA-256 as recorded, the input's SHA-256 unchanged
    (cheapest first: the input is read only when everything else holds). ``report`` None means
    (re)do it; the input's bytes and digest, when read, come back so they are not read twice."""
    try:
        report = json.loads(report_path(outdir, item).read_text())
        meta = report["client"]
        if meta["request"] != request:
            return ResumeCheck(None)
        if sha256_hex((outdir / item.out_rel).read_bytes()) != meta["output_sha256"]:
            return ResumeCheck(None)
        data = item.src.read_bytes()
    except (OSError, ValueError, KeyError, TypeError):
        return ResumeCheck(None)
    digest = sha256_hex(data)
    return ResumeCheck(report if digest == meta["input_sha256"] else None, data, digest)


# --------------------------------------------------------------------------- statistics


def latency_stats(ms: Sequence[float], ndigits: int = 1) -> dict:
    """``{"n", "mean", "p50", "p95", "min", "max"}`` of latencies in milliseconds, rounded to
    ``ndigits`` decimals (percentiles: numpy's default, linear between the nearest ranks); all but
    ``n`` are ``None`` when empty."""
    if not ms:
        return {"n": 0, "mean": None, "p50": None, "p95": None, "min": None, "max": None}
    import numpy as np

    p50, p95 = np.percentile(ms, [50, 95])
    return {"n": len(ms), **{k: round(float(v), ndigits) for k, v in
                             {"mean": np.mean(ms), "p50": p50, "p95": p95, "min": min(ms), "max": max(ms)}.items()}}


def faces_of(report: dict) -> list[dict]:
    """Per-face dicts of a report: photo mode's ``faces``; an aligned-mode image is one face."""
    faces = report.get("faces")
    if isinstance(faces, list):
        return [f for f in faces if isinstance(f, dict)]
    return [report] if report.get("mode") == "aligned" else []


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal (stderr), plain log lines otherwise, or nothing."""

    def __init__(self, total: int, mode: str):
        self.total, self.n = total, 0
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.bar = None
        if mode == "bar":
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is in the client extra
                mode = "lines"
            else:
                self.bar = tqdm(total=total, unit="img", file=sys.stderr, dynamic_ncols=True)
        self.mode = mode

    def log(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        elif self.mode == "lines":
            print(text, file=sys.stderr, flush=True)

    def item(self, status: str, rel: str, detail: str = "") -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            if status == "FAILED":
                self.bar.write(f"FAILED {rel}: {detail}", file=sys.stderr)
        elif self.mode == "lines":
            print(f"[{self.n}/{self.total}] {status} {rel}" + (f" ({detail})" if detail else ""),
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- anonymize


class _Terminated(Exception):
    pass


def request_params(args, fmt: str) -> dict:
    """The PARAMS JSON sent for one image (parameters not given are left to the server's defaults)."""
    p = {"mode": args.mode, "format": fmt, "guidance": args.guidance, "ip_scale": args.ip_scale,
         "id_scale": args.id_scale, "steps": args.steps, "skip": args.skip, "seed": args.seed,
         "prompt": args.prompt, "verify": args.verify, "retries": args.retries, "retry_mode": args.retry_mode,
         "guidance_step": args.guidance_step, "fallback": args.fallback}
    return {k: v for k, v in p.items() if v is not None}


@contextlib.contextmanager
def _lock(outdir: Path):
    """One run per output folder at a time (two would write the same files): an exclusive flock on
    the folder itself, released when the run ends or its process dies."""
    import fcntl

    fd = os.open(outdir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another {PROG} run is writing to {outdir}") from None
        yield
    finally:
        os.close(fd)


def run_anonymize(args) -> int:
    outdir = Path(args.output)
    if args.prompt is None and any(v is not None for v in (args.age, args.sex, args.race)):
        try:
            args.prompt = attributes.attribute_prompt(args.sex, args.age, args.race)
        except attributes.AttributeValueError as exc:
            raise UsageError(str(exc)) from None
    items = plan(args.inputs, outdir, args.format)
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"{outdir} exists and is not a folder")
    outdir.mkdir(parents=True, exist_ok=True)
    retry = RetryPolicy(max_attempts=args.max_attempts, backoff_s=args.backoff, max_backoff_s=args.max_backoff,
                        retry_internal=args.retry_internal)
    with _lock(outdir):
        return _run(args, outdir, items, retry)


def _run(args, outdir: Path, items: list[Item], retry: RetryPolicy) -> int:
    progress = Progress(len(items), args.progress)
    entries: dict[str, dict] = {}   # out_rel -> manifest entry
    reports: dict[str, dict] = {}   # out_rel -> report of every complete output (done now or skipped)
    #                                 and of every image the gate rejected in this run
    failures: list[dict] = []
    write_errors: list[str] = []    # "input: what could not be written or removed"
    latencies, server_ms = [], []
    counts = Counter()
    retries = 0
    started_at, t0 = _now(), time.perf_counter()

    def on_retry(key, attempt, error, wait, url):
        nonlocal retries
        item = key[0]
        retries += 1
        progress.log(f"retry {item.rel}: attempt {attempt} on {url} failed with {error.code} "
                     f"({error.message.splitlines()[0][:200] if error.message else ''}); again in {wait:.1f} s")

    def jobs() -> Iterator[Job]:
        """One job per item to (re)do; its key is (item, the request sent), so the report records
        exactly the parameters that went to the server."""
        for item in items:
            out = outdir / item.out_rel
            request = request_params(args, item.fmt)
            for p in (part_path(out), part_path(report_path(outdir, item))):  # left by a killed run
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
            check = ResumeCheck(None)
            if args.resume:
                check = resume_check(outdir, item, request)
                if check.report is not None:
                    report = check.report
                    counts["skipped"] += 1
                    reports[item.out_rel] = report
                    entries[item.out_rel] = _entry(item, "ok", report["client"]["input_sha256"],
                                                   report["client"]["output_sha256"], report, None)
                    progress.item("skipped", item.rel)
                    continue
            image = check.data if check.data is not None else item.src.read_bytes
            yield Job((item, request), image, request, check.input_sha256)

    def fail(item: Item, code: str, message: str, attempts: int, errors: list, sha: str | None,
             status: str = "failed", report: dict | None = None):
        """Count a failure; ``status``: the manifest's (failed | rejected), ``report``: its audit source."""
        counts["failed"] += 1
        failures.append({"input": item.rel, "status": code, "message": message, "attempts": attempts,
                         "errors": errors})
        entries[item.out_rel] = _entry(item, status, sha, None, report, {"status": code, "message": message})
        progress.item("FAILED", item.rel, f"{code}: {message.splitlines()[0] if message else ''}")

    client = BatchClient(args.url, concurrency=args.concurrency, timeout=args.timeout, retry=retry,
                         balance=args.balance, on_retry=on_retry)
    interrupted = None
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        for res in client.map(jobs()):
            item, request = res.key
            if res.error is not None:
                fail(item, res.error.code or "UNKNOWN", res.error.message, res.attempts, res.errors,
                     res.input_sha256)
                continue
            report = dict(res.report)
            out = outdir / item.out_rel
            out_sha = sha256_hex(res.image)
            report["client"] = {"input": item.rel, "input_sha256": res.input_sha256, "output": item.out_rel,
                                "output_sha256": out_sha, "request": request,
                                "url": res.url, "attempts": res.attempts,
                                "latency_ms": round(res.latency_s * 1e3, 1)}
            if res.rejected:
                # the server's verification gate refused to release this image: no output file (one
                # left by an earlier run, e.g. with --no-verify, is removed), only its report (why,
                # per-face similarities, audit); counted as a failure
                reason = report.get("rejected_reason") or "the server returned no image"
                report["client"]["output"] = report["client"]["output_sha256"] = None
                problems = []
                try:
                    out.unlink()
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    problems.append(f"cannot remove the output of an earlier run: {exc}")
                try:
                    write_atomic(report_path(outdir, item), (json.dumps(report, indent=2) + "\n").encode())
                except OSError as exc:
                    problems.append(f"cannot write its report: {exc}")
                for problem in problems:
                    write_errors.append(f"{item.rel}: {problem}")
                    progress.log(f"ERROR {item.rel}: {problem}")
                reports[item.out_rel] = report
                fail(item, "REJECTED", "; ".join([reason] + problems), res.attempts, res.errors, res.input_sha256,
                     status="rejected", report=report)
                continue
            try:
                write_atomic(out, res.image)
                write_atomic(report_path(outdir, item), (json.dumps(report, indent=2) + "\n").encode())
            except OSError as exc:
                write_errors.append(f"{item.rel}: cannot write output: {exc}")
                fail(item, "CLIENT", f"cannot write output: {exc}", res.attempts, res.errors, res.input_sha256)
                continue
            counts["ok"] += 1
            reports[item.out_rel] = report
            entries[item.out_rel] = _entry(item, "ok", res.input_sha256, out_sha, report, None)
            latencies.append(res.latency_s * 1e3)
            if isinstance(report.get("server_total_ms"), (int, float)):
                server_ms.append(float(report["server_total_ms"]))
            faces = report.get("faces")
            detail = f"{res.latency_s:.2f} s" + (f", {len(faces)} face(s)" if isinstance(faces, list) else "")
            progress.item("ok", item.rel, detail + (f", {res.attempts} attempts" if res.attempts > 1 else ""))
    except KeyboardInterrupt:
        interrupted = "SIGINT"
    except _Terminated:
        interrupted = "SIGTERM"
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
        progress.close()
        sent = client.sent_per_url()
        client.close()
    wall = time.perf_counter() - t0

    # the manifest: deterministic for given inputs, parameters and server (no times, no URLs)
    manifest = {"tool": PROG, "format": 1, "model": MODEL,
                "files": [entries[k] for k in sorted(entries, key=lambda k: (entries[k]["input"], k))]}
    write_atomic(outdir / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())

    done_reports = list(reports.values())  # complete outputs (skipped ones included) and rejected images
    faces = [f for r in done_reports for f in faces_of(r)]
    smoke = any(bool(r.get("smoke")) for r in done_reports)
    not_done = len(items) - counts["ok"] - counts["failed"] - counts["skipped"]
    exit_code = (EXIT_SIGNAL[interrupted] if interrupted else
                 EXIT_OK if counts["failed"] == 0 and not_done == 0 else EXIT_FAILED)
    summary = {
        "tool": PROG, "started_at": started_at, "finished_at": _now(), "wall_s": round(wall, 3),
        "urls": list(args.url), "concurrency": args.concurrency, "balance": args.balance,
        "timeout_s": args.timeout, "max_attempts": args.max_attempts, "resume": bool(args.resume),
        "request": {k: v for k, v in request_params(args, "").items() if k != "format"}, "format": args.format,
        "counts": {"inputs": len(items), "ok": counts["ok"], "failed": counts["failed"],
                   "skipped": counts["skipped"], "not_done": not_done},
        "failures": sorted(failures, key=lambda f: f["input"]),
        "write_errors": sorted(write_errors),
        "throughput_images_per_s": round(counts["ok"] / wall, 3) if wall > 0 else None,
        "latency_ms": latency_stats(latencies),
        "server_total_ms": latency_stats(server_ms),
        "retries": retries,
        "requests_sent_per_url": sent,
        "faces": len(faces),
        "faces_by_verdict": dict(sorted(Counter(str(f.get("verdict", "unverified")) for f in faces).items())),
        "faces_by_action": dict(sorted(Counter(str(f.get("action", "?")) for f in faces
                                               if "action" in f).items())),
        "images_by_verdict": dict(sorted(Counter(str(r.get("verdict", "unverified"))
                                                 for r in done_reports).items())),
        "smoke": smoke,
        "interrupted": interrupted,
        "exit_code": exit_code,
    }
    if smoke:
        summary["warning"] = ("smoke weights (tiny random models) were used: outputs are noise, not "
                              "anonymized faces")
    write_atomic(outdir / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
    _print_summary(summary, outdir)
    return exit_code


def _entry(item: Item, status: str, in_sha, out_sha, report, error) -> dict:
    return {"input": item.rel, "input_sha256": in_sha, "output": item.out_rel, "output_sha256": out_sha,
            "status": status, "error": error, "audit": (report or {}).get("audit")}


def _raise_terminated(signum, frame):
    raise _Terminated()


def _print_summary(s: dict, outdir: Path) -> None:
    c, lat = s["counts"], s["latency_ms"]
    lines = [f"{c['inputs']} input(s): {c['ok']} ok, {c['failed']} failed, {c['skipped']} skipped"
             + (f", {c['not_done']} not done (interrupted: {s['interrupted']})" if c["not_done"] else "")
             + f" in {s['wall_s']:.1f} s ({s['throughput_images_per_s']} images/s)"]
    if lat["n"]:
        lines.append(f"latency ms: p50 {lat['p50']}, p95 {lat['p95']}, max {lat['max']}; "
                     f"retries {s['retries']}; requests per server {s['requests_sent_per_url']}")
    lines.append(f"faces: {s['faces']} by verdict {s['faces_by_verdict']}; images by verdict "
                 f"{s['images_by_verdict']}")
    for f in s["failures"][:20]:
        lines.append(f"FAILED {f['input']}: {f['status']}: {(f['message'] or '').splitlines()[0][:300]}")
    if len(s["failures"]) > 20:
        lines.append(f"... and {len(s['failures']) - 20} more failures in {outdir / SUMMARY}")
    if s["write_errors"]:
        lines.append(f"{len(s['write_errors'])} file(s) could not be written or removed, first: "
                     f"{s['write_errors'][0]}")
    if s["smoke"]:
        lines.append("WARNING: " + s["warning"])
    lines.append(f"summary: {outdir / SUMMARY}; audit manifest: {outdir / MANIFEST}")
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # stdout closed early (| head): the files are written; keep the exit code
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# --------------------------------------------------------------------------- health


def server_health(url: str, timeout: float, model: str = MODEL) -> dict:
    """Live/ready, server metadata, repository index and the model's versions of one server."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    info = {"url": url, "live": False, "ready": False, "model": model, "model_ready": False}
    client = grpcclient.InferenceServerClient(url)
    try:
        info["live"] = bool(client.is_server_live(client_timeout=timeout))
        info["ready"] = bool(client.is_server_ready(client_timeout=timeout))
        md = client.get_server_metadata(as_json=True, client_timeout=timeout)
        info["server"] = {"name": md.get("name"), "version": md.get("version"),
                          "extensions": md.get("extensions", [])}
        index = client.get_model_repository_index(as_json=True, client_timeout=timeout).get("models", [])
        info["models"] = [{"name": m.get("name"), "version": m.get("version"), "state": m.get("state"),
                           "reason": m.get("reason", "")} for m in index]
        info["model_ready"] = bool(client.is_model_ready(model, client_timeout=timeout))
        if info["model_ready"]:
            mm = client.get_model_metadata(model, as_json=True, client_timeout=timeout)
            info["model_versions"] = mm.get("versions", [])
            info["model_platform"] = mm.get("platform")
    except InferenceServerException as exc:
        info["error"] = f"{exc.status()}: {exc.message()}"
    finally:
        client.close()
    info["healthy"] = bool(info["live"] and info["ready"] and info["model_ready"])
    return info


def run_health(args) -> int:
    results = [server_health(u, args.timeout) for u in args.url]
    if args.json:
        print(json.dumps({"healthy": all(r["healthy"] for r in results), "servers": results}, indent=2))
    else:
        yn = {True: "yes", False: "NO"}
        for r in results:
            print(f"{r['url']}: live {yn[r['live']]}, ready {yn[r['ready']]}, {r['model']} ready "
                  f"{yn[r['model_ready']]} -> {'healthy' if r['healthy'] else 'NOT HEALTHY'}")
            if "server" in r:
                s = r["server"]
                print(f"  server: {s['name']} {s['version']}; extensions: {' '.join(s['extensions'])}")
            for m in r.get("models", []):
                reason = f" ({m['reason']})" if m["reason"] else ""
                print(f"  model {m['name']:<14} version {m['version'] or '-':<3} {m['state'] or 'UNKNOWN'}{reason}")
            if r.get("model_versions"):
                print(f"  {r['model']}: versions {', '.join(r['model_versions'])} ({r.get('model_platform')})")
            if "error" in r:
                print(f"  error: {r['error']}")
    return EXIT_OK if all(r["healthy"] for r in results) else EXIT_FAILED


# --------------------------------------------------------------------------- arguments


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _float_type(minimum: float | None = None, strict: bool = False):
    """An argparse type: a finite float, optionally > (strict) or >= ``minimum``."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if minimum is not None and (v <= minimum if strict else v < minimum):
            raise argparse.ArgumentTypeError(f"must be a number {'>' if strict else '>='} {minimum:g}, got {text!r}")
        return v
    return parse


_finite_float = _float_type()
_positive_float = _float_type(0.0, strict=True)
_nonneg_float = _float_type(0.0)


def _attribute(parse):
    """An argparse type from an ``attributes.parse_*`` function (its message on a bad value)."""
    def convert(text: str):
        try:
            return parse(text)
        except attributes.AttributeValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _retries(text: str) -> int:
    """``--retries``: checked as the server checks PARAMS ``retries`` (revpers.verify.MAX_RETRIES)."""
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v <= MAX_GATE_RETRIES:
        raise argparse.ArgumentTypeError(f"retries must be an integer in [0, {MAX_GATE_RETRIES}], got {text!r}")
    return v


def _url(text: str) -> str:
    t = text.strip()
    if "://" in t:
        raise argparse.ArgumentTypeError(f"give HOST:PORT of the gRPC endpoint without a scheme, got {text!r}")
    host, sep, port = t.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (e.g. localhost:8001), got {text!r}")
    return t


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="gRPC client of the revpers Triton service: anonymize "
                                     "photo collections, check servers.")
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser("anonymize", help="anonymize files, folders (recursive) and globs into OUTDIR",
                       description="Anonymize every face of each input image on one or more revpers servers. "
                       "OUTDIR mirrors the input tree: each output keeps its input's name and format "
                       "(see --format) and gets its JSON report beside it as <output name>.json; "
                       f"OUTDIR/{SUMMARY} (counts, failures, throughput, latency, verdicts) and "
                       f"OUTDIR/{MANIFEST} (per input: SHA-256 of input and output, status, audit) are "
                       "written at the end. Exit code 0 only when every input succeeded (or was skipped "
                       "with --resume), 1 when any failed or was rejected by the identity gate, 2 for a usage error, 130/143 when stopped by "
                       "Ctrl-C/SIGTERM (the summary and manifest are still written).")
    a.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image file, folder (searched recursively for .jpg/.jpeg/.png/.webp, hidden "
                   "entries skipped) or glob pattern (quote it; ** matches folders recursively)")
    a.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if missing)")
    a.add_argument("--url", action="append", required=True, type=_url, metavar="HOST:PORT",
                   help="gRPC endpoint of a revpers Triton server; repeat for several replicas")
    a.add_argument("--concurrency", type=_positive_int, default=4, metavar="N",
                   help="requests in flight at once, over all servers (default 4)")
    a.add_argument("--balance", choices=("least-outstanding", "round-robin"), default="least-outstanding",
                   help="how requests are shared out among the --url servers (default least-outstanding)")
    a.add_argument("--resume", action="store_true",
                   help="skip inputs whose output and report exist and are complete for the same input "
                   "bytes and parameters (everything else is (re)done)")
    a.add_argument("--progress", choices=("auto", "bar", "lines", "none"), default="auto",
                   help="progress on stderr: a bar on a terminal, one line per image otherwise (auto)")
    m = a.add_argument_group("method parameters (server defaults when not given)")
    m.add_argument("--guidance", type=_finite_float, help="identity guidance scale (server default -10)")
    m.add_argument("--ip-scale", type=_finite_float, help="IP-Adapter scale (server default 1.0)")
    m.add_argument("--id-scale", type=_finite_float, help="identity embedding scale (server default 1.0)")
    m.add_argument("--steps", type=_positive_int, help="sampling steps (server default 100)")
    m.add_argument("--skip", type=_finite_float, help="fraction of steps skipped (server default 0.7)")
    m.add_argument("--seed", type=int, help="seed of the first face; the next faces use seed+1, ... (server default 0)")
    m.add_argument("--mode", choices=("photo", "aligned"), default="photo",
                   help="photo: every face of an ordinary photo (default); aligned: the whole image is one "
                   "aligned face")
    m.add_argument("--format", choices=("keep", "jpeg", "png", "webp"), default="keep",
                   help="output format; keep (default): JPEG stays .jpg/.jpeg, PNG .png, WebP .webp, other "
                   "inputs become .png")
    p = a.add_argument_group("attribute prompt (used in generation's unconditional branch)")
    p.add_argument("--prompt", help="free-text attribute prompt, e.g. 'an old man'")
    p.add_argument("--age", type=_attribute(attributes.parse_age), metavar="N",
                   help="age in years, 0-120 (needs --sex)")
    p.add_argument("--sex", type=_attribute(attributes.parse_sex), metavar="{female,male}", help="female or male")
    p.add_argument("--race", type=_attribute(attributes.parse_race), metavar="WORD",
                   help="one word of letters/hyphens, e.g. asian, latino-hispanic (needs --sex)")
    v = a.add_argument_group("identity verification gate (runs on the server; docs/verification.md)")
    v.add_argument("--no-verify", dest="verify", action="store_const", const=False, default=None,
                   help="skip the gate (faces are not checked; reports say verdict 'unverified', or "
                        "'no_faces' for a photo with no face)")
    v.add_argument("--retries", type=_retries, metavar="K",
                   help=f"extra generation attempts (0-{MAX_GATE_RETRIES}) for faces that still match their "
                        "input (server default 2; network retries are --max-attempts)")
    v.add_argument("--retry-mode", choices=("seed", "guidance", "both"),
                   help="new seed, stronger guidance, or both (server default both)")
    v.add_argument("--guidance-step", type=_finite_float, metavar="G",
                   help="guidance change per retry (server default 2.0)")
    v.add_argument("--fallback", choices=("blur", "pixelate", "reject"),
                   help="after the last failed attempt: blur or pixelate the face, or reject the image "
                        "(server default blur). A rejected image gets its report but no output (one left "
                        "by an earlier run is removed) and counts as failed (status REJECTED). A blurred "
                        "or pixelated face that still matches on the final check also gets its image "
                        "rejected")
    r = a.add_argument_group("timeouts and retries")
    r.add_argument("--timeout", type=_positive_float, default=600.0, metavar="S",
                   help="per-request deadline in seconds (default 600); past it the request fails with "
                   "DEADLINE_EXCEEDED and is retried")
    r.add_argument("--max-attempts", type=_positive_int, default=4, metavar="N",
                   help="attempts per image for UNAVAILABLE / DEADLINE_EXCEEDED (default 4); "
                   "INVALID_ARGUMENT is never retried")
    r.add_argument("--backoff", type=_nonneg_float, default=1.0, metavar="S",
                   help="first retry waits S/2..S seconds, doubling per attempt (default 1.0)")
    r.add_argument("--max-backoff", type=_nonneg_float, default=30.0, metavar="S",
                   help="cap of the backoff wait (default 30)")
    r.add_argument("--retry-internal", action="store_true", help="also retry INTERNAL errors (off by default)")
    a.set_defaults(func=run_anonymize)

    h = sub.add_parser("health", help="server live/ready, server version and extensions, models and versions",
                       description="Check each server: live, ready, server metadata, model repository index "
                       "with states, and the revpers model's versions. Exit code 0 only when every server "
                       "is live and ready and its revpers model is ready, 1 otherwise.")
    h.add_argument("--url", action="append", required=True, type=_url, metavar="HOST:PORT",
                   help="gRPC endpoint; repeat to check several servers")
    h.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    h.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S", help="per-call timeout (default 10)")
    h.set_defaults(func=run_health)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "anonymize":
        if args.prompt is not None and any(v is not None for v in (args.age, args.sex, args.race)):
            parser.error("--prompt and --age/--sex/--race are mutually exclusive")
        if (args.age is not None or args.race is not None) and args.sex is None:
            parser.error("--age and --race need --sex (the template's noun: man/woman/boy/girl/baby-boy/baby-girl)")
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
