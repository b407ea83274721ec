"""`revpers-client`: anonymize photo collections against one or more revpers Triton servers (gRPC).

    revpers-client anonymize INPUT... -o OUTDIR --url HOST:PORT [--url ...] [--concurrency N]
    revpers-client health --url HOST:PORT [--url ...] [--json]

The argparse layer only: inputs are collected by :mod:`.collection`, the run by :mod:`.engine`
(ledger: :mod:`.ledger`, progress and summary: :mod:`.report`), each image sent by :mod:`.remote`.
See client/README.md for outputs, the attribute prompt template and exit codes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__, attributes, protocol
from .batch import BatchClient, RetryPolicy
from .collection import FORMAT_CHOICES, UsageError, check_outputs, collect, existing_outputs
from .core import ConfigError, Security, server_health
from .engine import RunOptions, run_collection
from .ledger import (  # noqa: F401 - the benchmarks import them from here
    EXIT_FAILED,
    EXIT_OK,
    EXIT_SIGNAL,
    EXIT_USAGE,
    MANIFEST,
    REVIEW_CSV,
    REVIEW_JSON,
    SUMMARY,
    faces_of,
    latency_stats,
)
from .remote import RemoteProcess
from .report import PROGRESS_MODES

PROG = "revpers-client"
MAX_GATE_RETRIES = protocol.MAX_GATE_RETRIES  # the server's limit on PARAMS "retries" (a test compares)
DEFAULT_MAX_WAIT_S = 300.0  # long enough for a server restart with a model load


# --------------------------------------------------------------------------- anonymize


def security_of(args) -> Security:
    try:
        return Security.from_options(args.tls, args.ca, args.cert, args.key, args.api_key_file)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def run_anonymize(args) -> int:
    outdir = Path(args.output)
    if args.prompt is None and any(v is not None for v in (args.age, args.sex, args.race)):
        try:
            args.prompt = attributes.attribute_prompt(args.sex, args.age, args.race)
        except attributes.AttributeValueError as exc:
            raise UsageError(str(exc)) from None
    security = security_of(args)
    collection = collect(args.inputs, outdir, args.format, in_place=args.in_place)
    check_outputs(collection, outdir, in_place=args.in_place)
    if not (args.overwrite or args.resume):
        existing = [
            p
            for p in existing_outputs(collection, outdir)
            if not (args.in_place and os.path.realpath(p) in {os.path.realpath(i.src) for i in collection.items})
        ]
        if existing:
            raise UsageError(
                f"{len(existing)} output(s) exist already in {outdir}, e.g. {existing[0]}: give "
                "--resume to finish an earlier run, or --overwrite to replace them"
            )
    retry = RetryPolicy(
        max_attempts=args.max_attempts,
        backoff_s=args.backoff,
        max_backoff_s=args.max_backoff,
        max_wait_s=args.max_wait,
        retry_internal=args.retry_internal,
        retry_deadline=args.retry_deadline,
    )
    client = BatchClient(
        args.url,
        concurrency=args.concurrency,
        timeout=args.timeout,
        retry=retry,
        balance=args.balance,
        security=security,
    )
    process = RemoteProcess(client, verbose=args.verbose)
    options = RunOptions(
        outdir=outdir,
        params=protocol.params_of(args),
        fmt=args.format,
        on_no_face=args.on_no_face or protocol.OnNoFace.REVIEW.value,
        resume=args.resume,
        concurrency=args.concurrency,
        progress=args.progress,
        quiet=args.quiet,
        tool=PROG,
        not_taken=collection.not_taken,
        before=process.health,
        runner=lambda: {
            "urls": list(args.url),
            "balance": args.balance,
            "timeout_s": args.timeout,
            "max_attempts": args.max_attempts,
            "max_wait_s": args.max_wait,
            **process.runner_info(),
        },
    )
    try:
        summary = run_collection(collection.items, process, options)
    finally:
        client.close()
    if summary.stopped:
        print(f"{PROG}: error: {summary.stopped}", file=sys.stderr)
    return summary.exit_code


# --------------------------------------------------------------------------- health


def run_health(args) -> int:
    security = security_of(args)
    results = [server_health(u, args.timeout, security) for u in args.url]
    if args.json:
        print(json.dumps({"healthy": all(r["healthy"] for r in results), "servers": results}, indent=2))
    else:
        yn = {True: "yes", False: "NO"}
        for r in results:
            print(
                f"{r['url']}: live {yn[r['live']]}, ready {yn[r['ready']]}, {r['model']} ready "
                f"{yn[r['model_ready']]} -> {'healthy' if r['healthy'] else 'NOT HEALTHY'}"
            )
            if "server" in r:
                s = r["server"]
                print(f"  server: {s['name']} {s['version']}; extensions: {' '.join(s['extensions'])}")
            for m in r.get("models", []):
                reason = f" ({m['reason']})" if m["reason"] else ""
                print(f"  model {m['name']:<14} version {m['version'] or '-':<3} {m['state'] or 'UNKNOWN'}{reason}")
            if "models_error" in r:
                print(f"  model list not available: {r['models_error']}")
            if r.get("model_versions"):
                print(f"  {r['model']}: versions {', '.join(r['model_versions'])} ({r.get('model_platform')})")
            if "error" in r:
                print(f"  error: {r['error']}")
    return EXIT_OK if all(r["healthy"] for r in results) else EXIT_FAILED


# --------------------------------------------------------------------------- arguments


def _int_type(lo: int | None = None, hi: int | None = None, what: str = "a whole number"):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be <= {hi}, got {v}")
        return v

    return parse


_positive_int = _int_type(1)


def _float_type(minimum: float | None = None, strict: bool = False, maximum: float | None = None):
    """An argparse type: a finite float, optionally > (strict) or >= ``minimum`` (and < ``maximum``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if minimum is not None and (v <= minimum if strict else v < minimum):
            raise argparse.ArgumentTypeError(f"must be a number {'>' if strict else '>='} {minimum:g}, got {text!r}")
        if maximum is not None and v >= maximum:
            raise argparse.ArgumentTypeError(f"must be a number < {maximum:g}, got {text!r}")
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
    """``--retries``: checked as the server checks PARAMS ``retries`` (protocol.MAX_GATE_RETRIES)."""
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


def _verbosity(sub: bool) -> argparse.ArgumentParser:
    """-v/-q, accepted before and after the subcommand (the subcommand's copy leaves the value alone
    unless given there)."""
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("output")
    g.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS if sub else 0, help="more messages (every retry)"
    )
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=argparse.SUPPRESS if sub else False,
        help="no progress, a one-line summary",
    )
    return p


def _security_args(p: argparse.ArgumentParser) -> None:
    s = p.add_argument_group("security (a server started with TLS and/or an API key)")
    s.add_argument("--tls", action="store_true", help="connect with TLS (the system's CA roots unless --ca)")
    s.add_argument("--ca", metavar="FILE", help="PEM file of the CA that signed the server's certificate")
    s.add_argument("--cert", metavar="FILE", help="client certificate (PEM) for mutual TLS; needs --key")
    s.add_argument("--key", metavar="FILE", help="client private key (PEM) for mutual TLS")
    s.add_argument(
        "--api-key-file",
        metavar="FILE",
        help=f"file holding the API key (default: the {protocol.API_KEY_ENV} environment variable); "
        f"sent as gRPC metadata {protocol.GRPC_HEADER_PREFIX + protocol.API_KEY_HEADER}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[_verbosity(False)],
        description="gRPC client of the revpers Triton service: anonymize photo collections, check servers.",
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {__version__} (report format {protocol.REPORT_VERSION})"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    a = sub.add_parser(
        "anonymize",
        parents=[_verbosity(True)],
        help="anonymize files, folders (recursive) and globs into OUTDIR",
        description="Anonymize every face of each input image on one or more revpers servers. "
        "OUTDIR mirrors the input tree: each output keeps its input's name and format "
        "(see --format) and gets its JSON report beside it as <output name>.json; "
        f"OUTDIR/{SUMMARY}, OUTDIR/{MANIFEST} and the review list OUTDIR/{REVIEW_CSV} + "
        f"{REVIEW_JSON} are written at the end. Inputs are never overwritten (unless --in-place). "
        "Exit code 0 only when every image was released as passed (or skipped with "
        "--resume as such), 1 when any failed, was rejected or needs review (no face found, "
        "verdict not 'passed') or no server could serve, 2 for a usage error or a refused "
        "API key/TLS set-up, 130/143 when stopped by Ctrl-C/SIGTERM (the summary is still "
        "written; --resume finishes the rest).",
    )
    a.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image file, folder (searched recursively; hidden entries skipped) or glob pattern "
        "(quote it; ** matches folders recursively). Taken: "
        + ", ".join(sorted(protocol.INPUT_SUFFIXES))
        + "; other files are listed as not taken",
    )
    a.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="output folder (created if missing)")
    a.add_argument(
        "--url",
        action="append",
        required=True,
        type=_url,
        metavar="HOST:PORT",
        help="gRPC endpoint of a revpers Triton server; repeat for several replicas",
    )
    a.add_argument(
        "--concurrency",
        type=_positive_int,
        default=4,
        metavar="N",
        help="requests in flight at once, over all servers (default 4)",
    )
    a.add_argument(
        "--balance",
        choices=("least-outstanding", "round-robin"),
        default="least-outstanding",
        help="how requests are shared out among the --url servers (default least-outstanding)",
    )
    o = a.add_argument_group("outputs")
    o.add_argument(
        "--resume",
        action="store_true",
        help="skip inputs whose output and report exist and are complete for the same input "
        "bytes and parameters; everything else is (re)done",
    )
    o.add_argument(
        "--overwrite",
        action="store_true",
        help="replace outputs that exist already (by default the run refuses to start when any exists)",
    )
    o.add_argument(
        "--in-place",
        action="store_true",
        help="allow outputs over the inputs (-o an input folder): the original photos are replaced",
    )
    o.add_argument(
        "--format",
        choices=FORMAT_CHOICES,
        default="keep",
        help="output format; keep (default): JPEG stays .jpg/.jpeg, PNG .png, WebP .webp, other "
        "inputs (TIFF, BMP, GIF) become .png",
    )
    o.add_argument(
        "--quality",
        type=_int_type(*protocol.QUALITY_RANGE),
        metavar="Q",
        help="JPEG/WebP quality %d-%d (server default when not given)" % protocol.QUALITY_RANGE,
    )
    o.add_argument(
        "--progress",
        choices=PROGRESS_MODES,
        default="auto",
        help="progress on stderr: a bar on a terminal, nothing otherwise (auto), or one line per image (lines)",
    )
    m = a.add_argument_group("method parameters (server defaults when not given)")
    m.add_argument("--guidance", type=_finite_float, help="identity guidance scale (server default -10)")
    m.add_argument("--ip-scale", type=_finite_float, help="IP-Adapter scale (server default 1.0)")
    m.add_argument("--id-scale", type=_finite_float, help="identity embedding scale (server default 1.0)")
    m.add_argument("--steps", type=_positive_int, help="sampling steps (server default 100)")
    m.add_argument("--skip", type=_finite_float, help="fraction of steps skipped (server default 0.7)")
    m.add_argument("--seed", type=int, help="seed of the first face; the next faces use seed+1, ... (server default 0)")
    m.add_argument(
        "--mode",
        choices=protocol.MODES,
        default="photo",
        help="photo: every face of an ordinary photo (default); aligned: the whole image is one aligned face",
    )
    f = a.add_argument_group("faces")
    f.add_argument(
        "--on-no-face",
        choices=[v.value for v in protocol.OnNoFace],
        default=None,
        help="an image where no face is found: review (default: released and listed for review, "
        "exit 1), fail (withheld, a failure) or keep (released, counted as passed)",
    )
    f.add_argument(
        "--det-thresh",
        type=_float_type(0.0, strict=True, maximum=1.0),
        metavar="T",
        help="face detection score threshold, 0-1 (server default from the bundle)",
    )
    f.add_argument(
        "--min-face",
        type=_positive_int,
        metavar="PX",
        help="smallest face taken, in pixels (server default from the bundle)",
    )
    p = a.add_argument_group("attribute prompt (used in generation's unconditional branch)")
    p.add_argument("--prompt", help="free-text attribute prompt, e.g. 'an old man'")
    p.add_argument(
        "--age", type=_attribute(attributes.parse_age), metavar="N", help="age in years, 0-120 (needs --sex)"
    )
    p.add_argument("--sex", type=_attribute(attributes.parse_sex), metavar="{female,male}", help="female or male")
    p.add_argument(
        "--race",
        type=_attribute(attributes.parse_race),
        metavar="WORD",
        help="one word of letters/hyphens, e.g. asian, latino-hispanic (needs --sex)",
    )
    v = a.add_argument_group("identity verification gate (runs on the server; docs/verification.md)")
    v.add_argument(
        "--no-verify",
        dest="verify",
        action="store_const",
        const=False,
        default=None,
        help="skip the gate (faces are not checked; reports say verdict 'unverified', so every "
        "image is listed for review)",
    )
    v.add_argument(
        "--retries",
        type=_retries,
        metavar="K",
        help=f"extra generation attempts (0-{MAX_GATE_RETRIES}) for faces that still match their "
        "input (server default 2; network retries: --max-wait)",
    )
    v.add_argument(
        "--retry-mode",
        choices=("seed", "guidance", "both"),
        help="new seed, stronger guidance, or both (server default both)",
    )
    v.add_argument(
        "--guidance-step", type=_finite_float, metavar="G", help="guidance change per retry (server default 2.0)"
    )
    v.add_argument(
        "--fallback",
        choices=("blur", "pixelate", "reject"),
        help="after the last failed attempt: blur or pixelate the face, or reject the image "
        "(server default blur). A rejected image gets its report but no output (one left "
        "by an earlier run is removed) and counts as failed (status REJECTED)",
    )
    r = a.add_argument_group("timeouts and retries")
    r.add_argument(
        "--timeout",
        type=_positive_float,
        default=600.0,
        metavar="S",
        help="per-request deadline in seconds (default 600), sent with the request: the server "
        "stops working on it when it passes, and it fails with DEADLINE_EXCEEDED (not retried)",
    )
    r.add_argument(
        "--retry-deadline",
        action="store_true",
        help="send a request that passed its deadline once more (e.g. one that was inside a server's "
        "model process when it crashed twice within a few minutes)",
    )
    r.add_argument(
        "--max-wait",
        type=_nonneg_float,
        default=DEFAULT_MAX_WAIT_S,
        metavar="S",
        help="how long to keep retrying while servers are down, restarting or loading "
        f"(UNAVAILABLE, NOT_FOUND, 'not ready'; default {DEFAULT_MAX_WAIT_S:.0f}); when every server "
        "has been down that long the run stops (circuit breaker). INVALID_ARGUMENT is never retried",
    )
    r.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=None,
        metavar="N",
        help="also cap the attempts per image (default: no cap within --max-wait)",
    )
    r.add_argument(
        "--backoff",
        type=_nonneg_float,
        default=1.0,
        metavar="S",
        help="first retry waits S/2..S seconds, doubling per attempt (default 1.0)",
    )
    r.add_argument(
        "--max-backoff", type=_nonneg_float, default=10.0, metavar="S", help="cap of the backoff wait (default 10)"
    )
    r.add_argument("--retry-internal", action="store_true", help="also retry INTERNAL errors (off by default)")
    _security_args(a)
    a.set_defaults(func=run_anonymize)

    h = sub.add_parser(
        "health",
        parents=[_verbosity(True)],
        help="server live/ready, server version and extensions, models and versions",
        description="Check each server: live, ready, server metadata, model repository index "
        "with states, and the revpers model's versions. Exit code 0 only when every server "
        "is live and ready and its revpers model is ready, 1 otherwise.",
    )
    h.add_argument(
        "--url",
        action="append",
        required=True,
        type=_url,
        metavar="HOST:PORT",
        help="gRPC endpoint; repeat to check several servers",
    )
    h.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    h.add_argument("--timeout", type=_positive_float, default=10.0, metavar="S", help="per-call timeout (default 10)")
    _security_args(h)
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
    except KeyboardInterrupt:  # outside a run (a run writes its summary and returns 130 itself)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_SIGNAL["SIGINT"]


if __name__ == "__main__":
    sys.exit(main())
