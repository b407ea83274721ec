"""The run ledger: what happened to every input of a run, written so that a crash loses nothing.

Files in the output folder (all written atomically: ``.<name>.part`` beside the file, fsync, rename):

- ``<output>.json`` beside each output image: the server's report plus ``client`` (:class:`ClientRecord`).
- ``audit-manifest.json`` (:data:`MANIFEST`): ``{"tool", "format": 1, "model", "files": [LedgerEntry...]}``,
  one entry per input, sorted by input path; deterministic for given inputs, parameters and
  server (no times, no URLs), so two runs over the same photos can be compared byte for byte.
- ``run-summary.json`` (:data:`SUMMARY`): :class:`RunSummary` (counts, failures, files not taken,
  throughput, latency, verdicts, exit code).
- ``review.csv`` and ``review.json`` (:data:`REVIEW_CSV`, :data:`REVIEW_JSON`): the review list,
  :class:`ReviewRow` per input that is not released as passed: every image whose verdict is not
  ``passed`` (also those kept from an earlier run by ``--resume``), every no-face image, every
  failure and rejection, every file not taken, every input not done (interrupted). Empty (a header
  only, ``[]``) when there is nothing to look at.

Entry statuses (:class:`Status`): ``ok`` (released as passed, or a no-face image under
``--on-no-face keep``), ``review`` (released, but a person should look: verdict not ``passed``, or
no face found under ``--on-no-face review``), ``rejected`` (the identity gate withheld the image),
``failed`` (an error, or no face under ``--on-no-face fail``: no output).
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import io
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Sequence

import numpy as np

from . import protocol
from .collection import MANIFEST, REVIEW_CSV, REVIEW_JSON, SUMMARY, Item, NotTaken
from .core import sha256_hex

PART = ".part"  # temporary files: ".<name>.part" beside the final file, renamed when complete
MANIFEST_FORMAT = 1

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_SIGNAL = {"SIGINT": 130, "SIGTERM": 143}  # 128 + signal number, as shells report


class Status(str, Enum):
    OK = "ok"
    REVIEW = "review"
    REJECTED = "rejected"
    FAILED = "failed"


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


def write_json(path: Path, obj, sort_keys: bool = False) -> None:
    write_atomic(path, (json.dumps(obj, indent=2, sort_keys=sort_keys) + "\n").encode())


def report_path(outdir: Path, item: Item) -> Path:
    return outdir / (item.out_rel + ".json")


def remove_parts(outdir: Path, item: Item) -> None:
    """Temporary files a killed run left for this item."""
    for p in (part_path(outdir / item.out_rel), part_path(report_path(outdir, item))):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


# --------------------------------------------------------------------------- records


@dataclass
class ClientRecord:
    """``report["client"]``: what the client sent and wrote for one image."""

    input: str  # input path relative to its input root
    input_sha256: str
    output: str | None  # output path relative to OUTDIR; None when no image was written
    output_sha256: str | None
    request: dict  # the PARAMS sent (or used in process)
    url: str | None = None  # the server that answered (None in process)
    attempts: int = 1
    latency_ms: float | None = None


@dataclass
class ErrorRecord:
    status: str  # INVALID_ARGUMENT, REJECTED, NO_FACE, DEADLINE_EXCEEDED, CLIENT, ...
    message: str


@dataclass
class LedgerEntry:
    """One row of ``audit-manifest.json`` ``files``."""

    input: str
    input_sha256: str | None
    output: str  # where the output image is or would be (relative to OUTDIR)
    output_sha256: str | None  # None when no image was written
    status: str  # Status
    error: ErrorRecord | None
    audit: dict | None  # the report's audit record (server side)
    source: str | None = None  # the input file as given on this machine (for `revpers review`)


@dataclass
class AuditManifest:
    """``audit-manifest.json``: one entry per input, sorted by input path."""

    tool: str
    format: int
    model: str
    files: list[LedgerEntry]


@dataclass
class Failure:
    """One entry of the summary's ``failures``."""

    input: str
    status: str  # as ErrorRecord.status
    message: str
    attempts: int
    errors: list[str]  # "url: CODE: message" of every failed attempt


@dataclass
class ReviewRow:
    """One row of the review list."""

    input: str
    status: str  # review | rejected | failed | not_taken | not_done
    verdict: str | None  # the image verdict when the image was processed
    output: str | None  # the released output (relative to OUTDIR), if any
    reason: str


REVIEW_FIELDS = ("input", "status", "verdict", "output", "reason")


@dataclass
class Counts:
    inputs: int = 0  # images taken
    ok: int = 0  # done in this run and released as passed (or kept: no face, --on-no-face keep)
    review: int = 0  # done in this run and released, needing review
    failed: int = 0  # failed or rejected in this run
    skipped: int = 0  # complete from an earlier run (--resume)
    not_done: int = 0  # not processed (interrupted or stopped)
    not_taken: int = 0  # files found but not taken (not counted in inputs)


@dataclass
class RunSummary:
    """``run-summary.json``. Fields of the server runner are None/empty in process."""

    tool: str
    started_at: str
    finished_at: str
    wall_s: float
    request: dict  # the PARAMS shared by every image (format aside)
    format: str  # keep | jpeg | png | webp
    on_no_face: str
    resume: bool
    counts: Counts
    failures: list[Failure]
    not_taken: list[dict]  # {"path", "reason"} per file not taken
    write_errors: list[str]  # "input: what could not be written or removed"
    throughput_images_per_s: float | None
    latency_ms: dict  # latency_stats of the images done in this run
    server_total_ms: dict  # latency_stats of report["server_total_ms"]
    faces: int
    faces_by_verdict: dict
    faces_by_action: dict
    images_by_verdict: dict
    smoke: bool
    interrupted: str | None  # SIGINT | SIGTERM
    stopped: str | None  # why the run stopped early (servers down, API key refused)
    exit_code: int
    review_list: dict  # {"csv": path, "json": path, "rows": n}
    concurrency: int = 1
    urls: list[str] | None = None
    balance: str | None = None
    timeout_s: float | None = None
    max_attempts: int | None = None
    max_wait_s: float | None = None
    retries: int = 0
    requests_sent_per_url: dict = field(default_factory=dict)
    warning: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- resume


@dataclass(frozen=True)
class ResumeCheck:
    report: dict | None  # the saved report when the output is complete: skip the item
    data: bytes | None = None  # the input's bytes when the check read them: send these
    input_sha256: str | None = None  # ... and their digest


def resume_check(outdir: Path, item: Item, request: dict) -> ResumeCheck:
    """Is this item's output complete for the same input and request? Report present and readable
    with the same request parameters, the image's SHA-256 as recorded, the input's SHA-256 unchanged
    (cheapest first: the input is read only when everything else holds). ``report`` None means
    (re)do it; the input's bytes and digest, when read, come back so they are not read twice.
    In place (the output is the input file): the output's digest as recorded is enough."""
    try:
        report = json.loads(report_path(outdir, item).read_text())
        meta = report["client"]
        if meta["request"] != request:
            return ResumeCheck(None)
        out_sha = sha256_hex((outdir / item.out_rel).read_bytes())
        if out_sha != meta["output_sha256"]:
            return ResumeCheck(None)
        if os.path.realpath(outdir / item.out_rel) == os.path.realpath(item.src):
            return ResumeCheck(report, None, meta["input_sha256"])
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
    p50, p95 = np.percentile(ms, [50, 95])
    return {
        "n": len(ms),
        **{
            k: round(float(v), ndigits)
            for k, v in {"mean": np.mean(ms), "p50": p50, "p95": p95, "min": min(ms), "max": max(ms)}.items()
        },
    }


def faces_of(report: dict) -> list[dict]:
    """Per-face dicts of a report: photo mode's ``faces``; an aligned-mode image is one face."""
    faces = report.get("faces")
    if isinstance(faces, list):
        return [f for f in faces if isinstance(f, dict)]
    return [report] if report.get("mode") == "aligned" else []


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- verdict -> status


def judge(report: dict, image: bytes | None, on_no_face: str) -> tuple[Status, str | None]:
    """(status, reason) of an answered image: see the module docstring. ``reason`` says why it is
    not ``ok`` (None when it is)."""
    verdict = str(report.get("verdict", protocol.ImageVerdict.UNVERIFIED.value))
    if verdict == protocol.ImageVerdict.NO_FACES.value:
        if on_no_face == protocol.OnNoFace.FAIL.value:
            return Status.FAILED, "no face found (--on-no-face fail)"
        if on_no_face == protocol.OnNoFace.KEEP.value and image:
            return Status.OK, None
        if image:
            return Status.REVIEW, "no face found: check that no face was missed"
    if not image or verdict == protocol.ImageVerdict.REJECTED.value:
        return Status.REJECTED, str(report.get("rejected_reason") or "the server returned no image")
    if verdict in protocol.RELEASED_AS_PASSED:
        return Status.OK, None
    return Status.REVIEW, f"verdict {verdict}"


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """Collects the outcome of every item of a run (main thread only) and writes the run files."""

    def __init__(
        self, outdir: Path, items: Sequence[Item], not_taken: Sequence[NotTaken], tool: str, model: str = protocol.MODEL
    ):
        self.outdir, self.items, self.not_taken = outdir, list(items), list(not_taken)
        self.tool, self.model = tool, model
        self.entries: dict[str, LedgerEntry] = {}  # out_rel -> manifest entry
        self.reports: dict[str, dict] = {}  # out_rel -> report of each answered image
        self.review: dict[str, ReviewRow] = {}  # out_rel -> review row
        self.failures: list[Failure] = []
        self.write_errors: list[str] = []
        self.latencies: list[float] = []
        self.server_ms: list[float] = []
        self.counts = Counts(inputs=len(self.items), not_taken=len(self.not_taken))

    # ---------------------------------------------------------------- recording
    def skipped(self, item: Item, report: dict, on_no_face: str) -> None:
        """Complete from an earlier run (--resume): counted as skipped, listed for review when its
        verdict asks for it."""
        meta = report["client"]
        status, reason = judge(report, b"x" if meta.get("output") else b"", on_no_face)
        self.counts.skipped += 1
        self._record_output(item, report, status)
        if status is not Status.OK:
            self.review[item.out_rel] = ReviewRow(
                item.rel, status.value, report.get("verdict"), item.out_rel, f"{reason} (kept from an earlier run)"
            )

    def _record_output(self, item: Item, report: dict, status: Status) -> None:
        """The manifest row of an image written (now or by an earlier run) with its report."""
        self.reports[item.out_rel] = report
        meta = report["client"]
        self.entries[item.out_rel] = LedgerEntry(
            item.rel,
            meta["input_sha256"],
            item.out_rel,
            meta["output_sha256"],
            status.value,
            None,
            report.get("audit"),
            str(item.src),
        )

    def released(self, item: Item, report: dict, status: Status, reason: str | None, latency_s: float) -> None:
        """An output image was written with its report."""
        if status is Status.OK:
            self.counts.ok += 1
        else:
            self.counts.review += 1
            self.review[item.out_rel] = ReviewRow(
                item.rel, status.value, report.get("verdict"), item.out_rel, reason or ""
            )
        self._record_output(item, report, status)
        self.latencies.append(latency_s * 1e3)
        if isinstance(report.get("server_total_ms"), (int, float)):
            self.server_ms.append(float(report["server_total_ms"]))

    def failed(
        self,
        item: Item,
        code: str,
        message: str,
        attempts: int = 1,
        errors: Sequence[str] = (),
        input_sha256: str | None = None,
        status: Status = Status.FAILED,
        report: dict | None = None,
    ) -> None:
        """No output: an error, a rejection (``status`` REJECTED) or a refused no-face image;
        ``report`` (when the server answered) is kept for its audit record and verdicts."""
        self.counts.failed += 1
        self.failures.append(Failure(item.rel, code, message, attempts, list(errors)))
        if report is not None:
            self.reports[item.out_rel] = report
        self.entries[item.out_rel] = LedgerEntry(
            item.rel,
            input_sha256,
            item.out_rel,
            None,
            status.value,
            ErrorRecord(code, message),
            (report or {}).get("audit"),
            str(item.src),
        )
        self.review[item.out_rel] = ReviewRow(
            item.rel,
            status.value,
            (report or {}).get("verdict"),
            None,
            f"{code}: {message.splitlines()[0] if message else ''}",
        )

    def write_error(self, item: Item, problem: str) -> None:
        self.write_errors.append(f"{item.rel}: {problem}")

    # ---------------------------------------------------------------- the end of a run
    def exit_code(self, interrupted: str | None, stop_code: int | None) -> int:
        if interrupted:
            return EXIT_SIGNAL[interrupted]
        if stop_code is not None:
            return stop_code
        if self.counts.not_done or any(e.status != Status.OK.value for e in self.entries.values()):
            return EXIT_FAILED
        return EXIT_OK

    def review_rows(self) -> list[ReviewRow]:
        rows = list(self.review.values())
        rows += [ReviewRow(n.path, "not_taken", None, None, n.reason) for n in self.not_taken]
        rows += [
            ReviewRow(i.rel, "not_done", None, None, "not processed: the run stopped early; run it again with --resume")
            for i in self.items
            if i.out_rel not in self.entries
        ]
        return sorted(rows, key=lambda r: (r.input, r.status))

    def finish(
        self,
        *,
        started_at: str,
        wall_s: float,
        request: dict,
        fmt: str,
        on_no_face: str,
        resume: bool,
        interrupted: str | None = None,
        stopped: str | None = None,
        stop_code: int | None = None,
        runner: dict | None = None,
    ) -> RunSummary:
        """Write the manifest, the review list and the summary; returns the summary."""
        self.counts.not_done = len(self.items) - len(self.entries)
        manifest = AuditManifest(
            self.tool,
            MANIFEST_FORMAT,
            self.model,
            [self.entries[k] for k in sorted(self.entries, key=lambda k: (self.entries[k].input, k))],
        )
        write_json(self.outdir / MANIFEST, asdict(manifest), sort_keys=True)
        rows = self.review_rows()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=REVIEW_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
        write_atomic(self.outdir / REVIEW_CSV, buf.getvalue().encode())
        write_json(self.outdir / REVIEW_JSON, [asdict(r) for r in rows])

        reports = list(self.reports.values())
        faces = [f for r in reports for f in faces_of(r)]
        smoke = any(bool(r.get("smoke")) for r in reports)
        done_now = self.counts.ok + self.counts.review
        summary = RunSummary(
            tool=self.tool,
            started_at=started_at,
            finished_at=now_iso(),
            wall_s=round(wall_s, 3),
            request=request,
            format=fmt,
            on_no_face=on_no_face,
            resume=resume,
            counts=self.counts,
            failures=sorted(self.failures, key=lambda f: f.input),
            not_taken=[{"path": n.path, "reason": n.reason} for n in self.not_taken],
            write_errors=sorted(self.write_errors),
            throughput_images_per_s=round(done_now / wall_s, 3) if wall_s > 0 else None,
            latency_ms=latency_stats(self.latencies),
            server_total_ms=latency_stats(self.server_ms),
            faces=len(faces),
            faces_by_verdict=dict(sorted(Counter(str(f.get("verdict", "unverified")) for f in faces).items())),
            faces_by_action=dict(sorted(Counter(str(f.get("action", "?")) for f in faces if "action" in f).items())),
            images_by_verdict=dict(sorted(Counter(str(r.get("verdict", "unverified")) for r in reports).items())),
            smoke=smoke,
            interrupted=interrupted,
            stopped=stopped,
            exit_code=self.exit_code(interrupted, stop_code),
            review_list={"csv": REVIEW_CSV, "json": REVIEW_JSON, "rows": len(rows)},
            warning=(
                "smoke weights (tiny random models) were used: outputs are noise, not anonymized faces"
                if smoke
                else None
            ),
            **(runner or {}),
        )
        write_json(self.outdir / SUMMARY, summary.to_dict())
        return summary
