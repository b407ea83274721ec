"""`revpers anonymize`: files, folders and globs through the in-process pipeline.

The same run as `revpers-client anonymize` (the collection, refusal to write over inputs, resume,
run ledger, review list, progress and clean stop of ``revpers_client.engine``), with the models
loaded in this process. Inputs and outputs are checked before the models load.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from revpers.cli.options import DEFAULT_MODELS, add_param_arguments, add_verify_arguments
from revpers.core.errors import RevpersError
from revpers.service.anonymizer import SMOKE_WARNING, Anonymizer
from revpers.service.bundle_tools import require_valid_bundle
from revpers.service.request import Limits, RequestOptions, anonymize_bytes
from revpers_client import protocol
from revpers_client.collection import FORMAT_CHOICES, UsageError, check_outputs, collect, existing_outputs
from revpers_client.engine import RunOptions, run_collection
from revpers_client.report import PROGRESS_MODES

TOOL = "revpers anonymize"


class ImageFailed(Exception):
    """One image failed in process: the engine records ``code`` and ``message`` and goes on."""

    def __init__(self, exc: RevpersError):
        super().__init__(str(exc))
        self.code = {"input": "INVALID_ARGUMENT", "parameter": "INVALID_ARGUMENT", "limit": "INVALID_ARGUMENT"}.get(
            exc.kind, exc.kind.upper()
        )

    @property
    def message(self) -> str:
        return str(self)


class StepBar:
    """A progress bar of one image's UNet calls (on a terminal, for long images), fed by the
    ``cancelled`` hook that the pipeline calls before every UNet call; ``stop()`` makes that hook
    cancel the image at its next UNet call (a clean Ctrl-C)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and sys.stderr.isatty()
        self.bar = None
        self.stopped = threading.Event()

    def stop(self) -> None:
        self.stopped.set()

    def start(self, name: str) -> None:
        if self.enabled:
            from tqdm import tqdm  # only on a terminal

            self.bar = tqdm(desc=f"  {name}: UNet calls", unit="call", leave=False, file=sys.stderr)

    def tick(self) -> bool:
        if self.bar is not None:
            self.bar.update(1)
        return self.stopped.is_set()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class LocalProcess:
    """``process(item, data, params)`` for the run engine, over an Anonymizer loaded once."""

    def __init__(self, anonymizer: Anonymizer, steps: StepBar):
        self.anonymizer, self.steps = anonymizer, steps

    def __call__(self, item, data: bytes, params: dict):
        self.steps.start(item.rel)
        t0 = time.perf_counter()
        try:
            response = anonymize_bytes(
                self.anonymizer,
                data,
                RequestOptions.from_mapping(params),
                name=item.rel,
                limits=Limits.in_process(),
                cancelled=self.steps.tick,
            )
        except RevpersError as exc:
            raise ImageFailed(exc) from None
        finally:
            self.steps.close()
        report = response.report
        report.server_total_ms = round((time.perf_counter() - t0) * 1e3, 3)
        return response.image, report.to_dict()


def add_anonymize_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "anonymize",
        help="anonymize files, folders (recursive) and globs in process into OUTDIR",
        description="Anonymize every face of each input image with the models in this process. OUTDIR mirrors the "
        "input tree: each output keeps its input's name and format (see --format) with its JSON report beside it "
        "(<output>.json); OUTDIR/run-summary.json, audit-manifest.json and the review list review.csv + review.json "
        "are written at the end. Inputs are never overwritten (unless --in-place); outputs that exist stop the run "
        "before any work unless --resume or --overwrite. Exit status: 0 every image released as passed, 1 any "
        "failed, was rejected or needs review (no face found, verdict not 'passed'), 2 usage, input or bundle "
        "error, 130 interrupted (the summary is still written; --resume finishes the rest).",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image file, folder (searched recursively) or glob pattern (quote it). Taken: "
        + ", ".join(sorted(protocol.INPUT_SUFFIXES))
        + "; other files are listed as not taken",
    )
    p.add_argument("-o", "--output", "--outdir", dest="output", type=Path, required=True, metavar="OUTDIR")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS, help="model bundle folder (env REVPERS_MODELS)")
    p.add_argument(
        "--aligned",
        action="store_true",
        help="each whole image is one aligned face crop (CelebA-HQ/FFHQ style), as in the paper",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--inversion-batch", type=int, default=10, help="inversion timesteps per UNet call (default 10)")
    o = p.add_argument_group("outputs")
    o.add_argument(
        "--resume",
        action="store_true",
        help="skip inputs whose output and report are complete for the same input bytes and parameters",
    )
    o.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    o.add_argument("--in-place", action="store_true", help="allow outputs over the inputs: the originals are replaced")
    o.add_argument(
        "--format",
        choices=FORMAT_CHOICES,
        default="keep",
        help="output format; keep (default): JPEG, PNG and WebP stay, other inputs become PNG",
    )
    o.add_argument("--quality", type=int, default=None, metavar="Q", help="JPEG/WebP quality 1-100 (default 95)")
    o.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="progress on stderr: bars on a terminal, nothing otherwise (auto), or one line per image",
    )
    f = p.add_argument_group("faces")
    f.add_argument(
        "--on-no-face",
        choices=[v.value for v in protocol.OnNoFace],
        default=protocol.OnNoFace.REVIEW.value,
        help="an image where no face is found: review (default: released and listed for review, exit 1), "
        "fail (withheld) or keep (released, counted as passed)",
    )
    f.add_argument(
        "--det-thresh",
        type=float,
        default=None,
        metavar="T",
        help="drop detections scoring below T (raises the bundle's threshold)",
    )
    f.add_argument(
        "--min-face",
        type=float,
        default=None,
        metavar="PX",
        help="faces smaller than PX (box side) get the face-size policy (blur) instead of the generator",
    )
    add_param_arguments(p)
    add_verify_arguments(p)
    return p


def run_anonymize(args) -> int:
    try:
        return _run(args)
    except UsageError as exc:
        print(f"revpers anonymize: error: {exc}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.inversion_batch < 1:
        raise UsageError("--inversion-batch must be >= 1")
    params = protocol.params_of({**vars(args), "mode": "aligned" if args.aligned else "photo"})
    RequestOptions.from_mapping(params)  # every option checked before anything is read or loaded
    outdir = args.output
    collection = collect([str(i) for i in args.inputs], outdir, args.format, in_place=args.in_place)
    check_outputs(collection, outdir, in_place=args.in_place)
    if not (args.overwrite or args.resume or args.in_place):
        existing = existing_outputs(collection, outdir)
        if existing:
            raise UsageError(
                f"{len(existing)} output(s) exist already in {outdir}, e.g. {existing[0]}: give "
                "--resume to finish an earlier run, or --overwrite to replace them"
            )
    if not collection.items:
        raise UsageError(
            "no image to anonymize among the inputs"
            + (f" ({len(collection.not_taken)} file(s) not taken)" if collection.not_taken else "")
        )
    bundle = require_valid_bundle(args.models)
    if bundle.smoke:  # said before the work, in the summary, and in every report
        print(f"{TOOL}: {SMOKE_WARNING}", flush=True)
    anonymizer = Anonymizer(bundle, device=args.device, inversion_batch=args.inversion_batch)
    options = RunOptions(
        outdir=outdir,
        params=params,
        fmt=args.format,
        on_no_face=args.on_no_face,
        resume=args.resume,
        concurrency=1,
        progress=args.progress,
        quiet=args.quiet,
        tool=TOOL,
        not_taken=collection.not_taken,
    )
    steps = StepBar(not args.quiet)
    options.on_stop = steps.stop
    summary = run_collection(collection.items, LocalProcess(anonymizer, steps), options)
    if summary.stopped:
        print(f"revpers anonymize: error: {summary.stopped}", file=sys.stderr)
    return summary.exit_code
