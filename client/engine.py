"""The run engine: a collection of images through a ``process`` function into an output folder,
with resume, atomic writes, the run ledger, progress and a clean stop on Ctrl-C / SIGTERM.

It does not know how an image is anonymized. ``process(item, data, params)`` gets the input's bytes
and the request's parameters and returns ``(image_bytes, report_dict)`` (or an :class:`Outcome`, to
say more: attempts, server, failed attempts), or raises:

- :class:`StopRun`: nothing more can succeed (every server down, API key refused): the run stops,
  the images not done stay for ``--resume``, the exit code is the exception's;
- any exception with ``code`` and ``message`` attributes (``revpers_client.ServiceError``): this
  image failed with that status;
- any other exception: this image failed (``status`` ``ERROR``, ``"Type: message"``).

``process`` is called from ``options.concurrency`` worker threads; everything else (writing files,
the ledger, progress) happens in the calling thread. The server CLI passes a BatchClient-based
``process``; an in-process runner passes its own with ``concurrency=1``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from . import protocol
from .collection import Item, NotTaken, UsageError
from .core import sha256_hex
from .ledger import (
    EXIT_FAILED,
    ClientRecord,
    Ledger,
    RunSummary,
    Status,
    judge,
    now_iso,
    remove_parts,
    report_path,
    resume_check,
    write_atomic,
    write_json,
)
from .report import Progress, print_summary


class StopRun(Exception):
    """Raised by ``process`` when no later image can succeed; ``exit_code`` is the run's."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED):
        super().__init__(message)
        self.exit_code = exit_code


class InputError(Exception):
    """An input file that cannot be read (this image fails with status CLIENT)."""

    code = "CLIENT"

    @property
    def message(self) -> str:
        return str(self)


@dataclass
class Outcome:
    """What ``process`` may return instead of ``(image, report)``."""

    image: bytes
    report: dict
    attempts: int = 1
    url: str | None = None


@dataclass
class RunOptions:
    outdir: Path
    params: dict  # PARAMS for every image; "format" is added per image
    fmt: str = "keep"  # the --format choice (for the summary)
    on_no_face: str = protocol.OnNoFace.REVIEW.value
    resume: bool = False
    concurrency: int = 1
    progress: str = "auto"  # auto | bar | lines | none
    quiet: bool = False  # print a one-line summary
    tool: str = "revpers-client"
    model: str = protocol.MODEL
    not_taken: Sequence[NotTaken] = ()
    runner: Callable[[], dict] | None = None  # RunSummary fields of the runner, read at the end
    before: Callable[[Progress], None] | None = None  # called once the progress exists (health checks)
    printed: bool = True  # print the summary
    # called when the run stops early (Ctrl-C, SIGTERM): an in-process runner stops its current image
    # at the next model call and the run waits for it (its threads must not die inside native code);
    # None: the requests in flight are abandoned (a server finishes or cancels them)
    on_stop: Callable[[], None] | None = None


class _Terminated(Exception):
    pass


def _raise_terminated(signum, frame):
    raise _Terminated()


@contextlib.contextmanager
def lock_folder(outdir: Path, tool: str):
    """One run per output folder at a time (two would write the same files): an exclusive flock on
    the folder itself, released when the run ends or its process dies."""
    fd = os.open(outdir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f"another {tool} run is writing to {outdir}") from None
        yield
    finally:
        os.close(fd)


@dataclass
class _Work:
    item: Item
    params: dict
    data: bytes | None = None
    input_sha256: str | None = None


@dataclass
class _Done:
    work: _Work
    outcome: Outcome | None = None
    error: BaseException | None = None
    input_sha256: str | None = None
    latency_s: float = 0.0
    extra: dict = field(default_factory=dict)


def request_for(options: RunOptions, item: Item) -> dict:
    return {**options.params, "format": item.fmt}


class _Pool:
    """``concurrency`` daemon threads calling ``process``; at most 2 x concurrency items ahead.
    Daemon threads: on Ctrl-C the requests in flight are abandoned, not waited for."""

    def __init__(self, process, concurrency: int):
        self.process = process
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._worker, daemon=True, name=f"revpers-run-{i}") for i in range(concurrency)
        ]
        for t in self.threads:
            t.start()

    def _worker(self):
        while not self.stop.is_set():
            work = self.todo.get()
            if work is None:
                return
            res = _Done(work)
            t0 = time.perf_counter()
            try:
                try:
                    data = work.data if work.data is not None else work.item.src.read_bytes()
                except OSError as exc:
                    raise InputError(f"cannot read input: {exc}") from None
                res.input_sha256 = work.input_sha256 or sha256_hex(data)
                out = self.process(work.item, data, dict(work.params))
                res.outcome = out if isinstance(out, Outcome) else Outcome(*out)
            except BaseException as exc:  # noqa: BLE001 - every failure is recorded, none lost
                res.error = exc
            res.latency_s = time.perf_counter() - t0
            self.done.put(res)

    def close(self) -> int:
        """Stop the workers after their current item; returns how many queued items were dropped."""
        self.stop.set()
        dropped = 0
        with contextlib.suppress(queue.Empty):
            while True:
                if self.todo.get_nowait() is not None:
                    dropped += 1
        for _ in self.threads:
            self.todo.put(None)
        return dropped


def run_collection(items: Sequence[Item], process: Callable, options: RunOptions) -> RunSummary:
    """Run every item (see the module docstring); writes outputs, reports, the manifest, the review
    list and the summary into ``options.outdir`` and returns the summary (``exit_code``: 0 every image
    released as passed, 1 some failed, was rejected or needs review, or the run stopped, 130/143
    interrupted)."""
    outdir = options.outdir
    if outdir.exists() and not outdir.is_dir():
        raise UsageError(f"{outdir} exists and is not a folder")
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the output folder {outdir}: {exc.strerror or exc}") from None
    with lock_folder(outdir, options.tool):
        return _run(items, process, options)


def _run(items: Sequence[Item], process: Callable, options: RunOptions) -> RunSummary:
    ledger = Ledger(options.outdir, items, options.not_taken, options.tool, options.model)
    progress = Progress(len(items), "none" if options.quiet else options.progress)
    started_at, t0 = now_iso(), time.perf_counter()
    drive = _Drive(process, ledger, progress, options)
    interrupted = None
    in_main = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _raise_terminated) if in_main else None
    try:
        if options.before is not None:
            options.before(progress)
        drive.run(_plan(items, ledger, progress, options))
    except KeyboardInterrupt:
        interrupted = "SIGINT"
    except _Terminated:
        interrupted = "SIGTERM"
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old_term)
        if interrupted and options.on_stop is not None:
            options.on_stop()
        drive.close(wait=options.on_stop is not None)
        progress.close()
    runner = options.runner() if options.runner is not None else {}
    summary = ledger.finish(
        started_at=started_at,
        wall_s=time.perf_counter() - t0,
        request=dict(options.params),
        fmt=options.fmt,
        on_no_face=options.on_no_face,
        resume=options.resume,
        interrupted=interrupted,
        stopped=drive.stopped,
        stop_code=drive.stop_code,
        runner={"concurrency": options.concurrency, **runner},
    )
    if options.printed:
        print_summary(summary, options.outdir, brief=options.quiet)
    return summary


def _plan(items: Sequence[Item], ledger: Ledger, progress: Progress, options: RunOptions) -> list[_Work]:
    """The work to do: stale temporary files removed; with resume, complete items recorded as skipped."""
    todo: list[_Work] = []
    for item in items:
        remove_parts(options.outdir, item)  # left by a killed run
        work = _Work(item, request_for(options, item))
        if options.resume:
            check = resume_check(options.outdir, item, work.params)
            if check.report is not None:
                ledger.skipped(item, check.report, options.on_no_face)
                progress.item("skipped", item.rel)
                continue
            work.data, work.input_sha256 = check.data, check.input_sha256
        todo.append(work)
    return todo


class _Drive:
    """Feeds the pool (at most 2 x concurrency ahead) and records each result as it comes back."""

    def __init__(self, process: Callable, ledger: Ledger, progress: Progress, options: RunOptions):
        self.process, self.ledger, self.progress, self.options = process, ledger, progress, options
        self.pool: _Pool | None = None
        self.pending = 0
        self.stopped: str | None = None
        self.stop_code: int | None = None

    def run(self, todo: list[_Work]) -> None:
        self.pool = _Pool(self.process, max(1, min(self.options.concurrency, len(todo) or 1)))
        it = iter(todo)
        window = 2 * self.options.concurrency
        while True:
            while self.pending < window and self.stopped is None:
                work = next(it, None)
                if work is None:
                    break
                self.pool.todo.put(work)
                self.pending += 1
            if self.pending == 0:
                return
            try:
                res = self.pool.done.get(timeout=0.2)
            except queue.Empty:
                continue
            self.pending -= 1
            self._handle(res)

    def _handle(self, res: _Done) -> None:
        if not isinstance(res.error, StopRun):
            _record(res, self.ledger, self.progress, self.options)
        elif self.stopped is None:
            self.stopped, self.stop_code = str(res.error), res.error.exit_code
            self.pending -= self.pool.close()  # the items not started stay not done

    def close(self, wait: bool = False) -> None:
        if self.pool is not None:
            self.pool.close()
            if wait:
                for t in self.pool.threads:
                    t.join()


def _record(res: _Done, ledger: Ledger, progress: Progress, options: RunOptions) -> None:
    """Write one finished image's files and record it (main thread)."""
    item, outdir = res.work.item, options.outdir
    if res.error is not None:
        err = res.error
        if hasattr(err, "code") and hasattr(err, "message"):
            code, message = err.code or "UNKNOWN", err.message
        else:
            code, message = "ERROR", f"{type(err).__name__}: {err}"
        attempts = getattr(err, "attempts", 1) or 1
        ledger.failed(item, code, message, attempts, getattr(err, "errors", ()), res.input_sha256)
        progress.item("FAILED", item.rel, f"{code}: {message.splitlines()[0] if message else ''}")
        return
    out = res.outcome
    report = dict(out.report)
    status, reason = judge(report, out.image, options.on_no_face)
    record = ClientRecord(
        item.rel,
        res.input_sha256,
        item.out_rel,
        sha256_hex(out.image) if out.image else None,
        res.work.params,
        out.url,
        out.attempts,
        round(res.latency_s * 1e3, 1),
    )
    image_path, rpath = outdir / item.out_rel, report_path(outdir, item)
    if status in (Status.REJECTED, Status.FAILED):
        # no output: the gate withheld the image, or a no-face image is refused; an output left by an
        # earlier run is removed, so no stale image sits beside the new report
        record.output = record.output_sha256 = None
        report["client"] = vars(record).copy()
        problems = []
        try:
            image_path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            problems.append(f"cannot remove the output of an earlier run: {exc}")
        try:
            write_json(rpath, report)
        except OSError as exc:
            problems.append(f"cannot write its report: {exc}")
        for problem in problems:
            ledger.write_error(item, problem)
            progress.log(f"ERROR {item.rel}: {problem}", always=True)
        code = "REJECTED" if status is Status.REJECTED else "NO_FACE"
        ledger.failed(
            item,
            code,
            "; ".join([reason or ""] + problems),
            out.attempts,
            (),
            res.input_sha256,
            status=status,
            report=report,
        )
        progress.item(code, item.rel, reason or "")
        return
    report["client"] = vars(record).copy()
    try:
        write_atomic(image_path, out.image)
        write_json(rpath, report)
    except OSError as exc:
        ledger.write_error(item, f"cannot write output: {exc}")
        ledger.failed(item, "CLIENT", f"cannot write output: {exc}", out.attempts, (), res.input_sha256)
        progress.item("FAILED", item.rel, f"cannot write output: {exc}")
        return
    ledger.released(item, report, status, reason, res.latency_s)
    faces = report.get("faces")
    detail = f"{res.latency_s:.2f} s" + (f", {len(faces)} face(s)" if isinstance(faces, list) else "")
    detail += f", {out.attempts} attempts" if out.attempts > 1 else ""
    progress.item("ok" if status is Status.OK else "REVIEW", item.rel, detail + (f"; {reason}" if reason else ""))
