"""What a run shows a person: a progress bar (tqdm) or one line per image on stderr, and the
summary printed at the end."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

from tqdm import tqdm

from .ledger import MANIFEST, REVIEW_CSV, SUMMARY, RunSummary

PROGRESS_MODES = ("auto", "bar", "lines", "none")


class Progress:
    """``bar``: a tqdm bar on stderr; ``lines``: one line per image; ``none``: nothing. ``auto``: a
    bar on a terminal, nothing otherwise (failures are listed in the summary either way)."""

    def __init__(self, total: int, mode: str = "auto", stream=None):
        self.stream = stream or sys.stderr
        self.total, self.n = total, 0
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "none"
        self.mode = mode
        self.bar = tqdm(total=total, unit="img", file=self.stream, dynamic_ncols=True) if mode == "bar" else None

    def log(self, text: str, always: bool = False) -> None:
        """A message beside the progress (``always``: also with no progress shown)."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.mode == "lines" or always:
            print(text, file=self.stream, flush=True)

    def item(self, status: str, rel: str, detail: str = "") -> None:
        self.n += 1
        if self.bar is not None:
            self.bar.update(1)
            if status in ("FAILED", "REJECTED"):
                self.bar.write(f"{status} {rel}: {detail}", file=self.stream)
        elif self.mode == "lines":
            print(
                f"[{self.n}/{self.total}] {status} {rel}" + (f" ({detail})" if detail else ""),
                file=self.stream,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summary_lines(s: RunSummary, outdir: Path, brief: bool = False) -> list[str]:
    c = s.counts
    head = (
        f"{c.inputs} image(s): {c.ok} passed, {c.review} to review, {c.failed} failed, {c.skipped} skipped"
        + (f", {c.not_done} not done" if c.not_done else "")
        + (f" (interrupted: {s.interrupted})" if s.interrupted else "")
        + (f"; {c.not_taken} file(s) not taken" if c.not_taken else "")
        + f" in {s.wall_s:.1f} s"
    )
    lines = [head] + ([f"STOPPED: {s.stopped}"] if s.stopped else [])
    if not brief:
        lines += _details(s, outdir)
    if s.review_list["rows"]:
        lines.append(f"review list ({s.review_list['rows']} row(s)): {outdir / REVIEW_CSV}")
    if not brief:
        lines.append(f"summary: {outdir / SUMMARY}; audit manifest: {outdir / MANIFEST}")
    return lines


def _first_line(text: str | None, limit: int = 300) -> str:
    return text.splitlines()[0][:limit] if text else ""


def _details(s: RunSummary, outdir: Path) -> list[str]:
    lat = s.latency_ms
    lines = []
    if lat["n"]:
        lines.append(
            f"latency ms: p50 {lat['p50']}, p95 {lat['p95']}, max {lat['max']}; "
            f"{s.throughput_images_per_s} images/s; retries {s.retries}"
            + (f"; requests per server {s.requests_sent_per_url}" if s.requests_sent_per_url else "")
        )
    lines.append(f"faces: {s.faces} by verdict {s.faces_by_verdict}; images by verdict {s.images_by_verdict}")
    lines += [f"FAILED {f.input}: {f.status}: {_first_line(f.message)}" for f in s.failures[:20]]
    if len(s.failures) > 20:
        lines.append(f"... and {len(s.failures) - 20} more failures in {outdir / SUMMARY}")
    lines += [f"not taken: {n['path']}: {n['reason']}" for n in s.not_taken[:5]]
    if len(s.not_taken) > 5:
        lines.append(f"... and {len(s.not_taken) - 5} more files not taken (see {outdir / REVIEW_CSV})")
    if s.write_errors:
        lines.append(f"{len(s.write_errors)} file(s) could not be written or removed, first: {s.write_errors[0]}")
    if s.warning:
        lines.append("WARNING: " + s.warning)
    return lines


def print_summary(s: RunSummary, outdir: Path, brief: bool = False) -> None:
    try:
        print("\n".join(summary_lines(s, outdir, brief)), flush=True)
    except BrokenPipeError:  # stdout closed early (| head): the files are written; keep the exit code
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
