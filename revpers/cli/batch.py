"""`revpers batch INPUT -o OUTPUT`: the command line of a batch run (ray is imported only to run it)."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from revpers.cli.options import add_param_arguments, add_verify_arguments, params_from_args, verify_policy_from_args
from revpers.service.request import RequestOptions
from revpers_client.protocol import OnNoFace

FORMAT_CHOICES = ("keep", "jpeg", "png", "webp")
MISSING = "revpers batch needs Ray Data: pip install 'revpers[batch]' (or: pip install 'ray[data]')"


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def add_batch_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "batch",
        help="anonymize a collection on Ray Data (actor pool; resumable); needs revpers[batch]",
        description="Anonymize every image of INPUT (a folder, walked recursively; a glob; a list file .txt/.lst/"
        ".list; local paths or URIs such as s3://, gs://, file://) into OUTPUT (a folder or URI; the "
        "tree is mirrored), on Ray Data: an actor pool of in-process models (--models) or of gRPC "
        "clients to Triton servers (--servers). Writes IMAGE + IMAGE.json per input, audit.parquet (one "
        "row per face), review.csv/review.json and run-summary.json. Running the same command again "
        "resumes: only images not yet done are processed. Exit status: 0 every image passed; 1 any "
        "image failed, was rejected, needs review or was not done; 2 bad command line or inputs.",
    )
    p.add_argument("input", help="folder, glob, list file or image; local path or URI")
    p.add_argument("-o", "--output", required=True, help="output folder or URI")
    engine = p.add_mutually_exclusive_group(required=True)
    engine.add_argument("--models", type=Path, default=None, help="model bundle: actors hold the in-process pipeline")
    engine.add_argument(
        "--servers",
        nargs="+",
        metavar="URL",
        default=None,
        help="Triton gRPC URLs (host:port): actors are clients of this fleet",
    )
    g = p.add_argument_group("Ray")
    g.add_argument("--concurrency", type=_positive(int), default=1, help="actors in the pool (default 1)")
    g.add_argument(
        "--num-gpus", type=float, default=0.0, help="GPUs per model actor (1: one actor per GPU; default 0: CPU actors)"
    )
    g.add_argument(
        "--cpus-per-actor",
        type=_positive(float),
        default=None,
        help="CPUs per actor (default 1 for models, its torch threads on the CPU; 0.25 for server clients)",
    )
    g.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    g.add_argument(
        "--num-cpus",
        type=_positive(int),
        default=None,
        help="logical CPUs of the local Ray (default: the cores, at least 8)",
    )
    g.add_argument(
        "--max-failures",
        type=int,
        default=100,
        help="stop once more than this many images failed (default 100; -1: never stop)",
    )
    g.add_argument(
        "--limit",
        type=_positive(int),
        default=None,
        help="start at most this many images in this run (the rest stay for the next run)",
    )
    g = p.add_argument_group("engine")
    g.add_argument("--device", default=None, help="models: cpu or cuda (default: cuda with --num-gpus, else cpu)")
    g.add_argument(
        "--inversion-batch",
        type=_positive(int),
        default=10,
        help="models: inversion timesteps per UNet call (default 10)",
    )
    g.add_argument("--timeout", type=_positive(float), default=600.0, help="servers: seconds per request")
    g.add_argument(
        "--max-attempts",
        type=_positive(int),
        default=4,
        help="servers: attempts per image when the server is unavailable or too slow (default 4)",
    )
    g = p.add_argument_group("request")
    g.add_argument("--aligned", action="store_true", help="each image is one aligned face crop")
    g.add_argument(
        "--format",
        choices=FORMAT_CHOICES,
        default="keep",
        help="output format (default keep: JPEG/PNG/WebP kept, other inputs become PNG)",
    )
    g.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality (default 95)")
    g.add_argument(
        "--on-no-face",
        choices=[v.value for v in OnNoFace],
        default=OnNoFace.REVIEW.value,
        help="an image with no face: review (released, listed), fail (withheld) or keep (default review)",
    )
    add_param_arguments(p)
    add_verify_arguments(p)
    return p


def request_from_args(args) -> dict:
    """The request options every image gets (``RequestOptions`` keys; the format is set per file)."""
    req = {
        **params_from_args(args).as_dict(),
        **verify_policy_from_args(args).as_dict(),
        "mode": "aligned" if args.aligned else "photo",
        "quality": args.quality,
        "on_no_face": args.on_no_face,
    }
    req = {k: v for k, v in req.items() if v is not None}
    RequestOptions.from_mapping({**req, "format": "png"})  # refuse bad values before anything runs
    return req


def run_batch(args, exit_on: tuple[str, ...] = ()) -> int:
    """``revpers batch``; ``exit_on`` (tests): fault injection, see ``revpers.batch.workers.ImageWorker``."""
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None:
        print(f"error: {MISSING}", file=sys.stderr)
        return 2
    from revpers.batch.inputs import InputError  # revpers.batch imports ray and pyarrow at its top
    from revpers.batch.run import run

    try:
        return run(args, request_from_args(args), exit_on=exit_on)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
