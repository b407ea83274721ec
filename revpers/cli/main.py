"""`revpers` command line: smoke-model, bundle, anonymize, review, verify, reconstruct, evaluate, sweep, export,
repository, serve, batch."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from pathlib import Path

from revpers import __version__
from revpers.cli.anonymize import add_anonymize_parser, run_anonymize
from revpers.cli.batch import add_batch_parser, run_batch
from revpers.cli.bundle import add_bundle_parser, run_bundle
from revpers.cli.commands import (
    cmd_export,
    cmd_reconstruct,
    cmd_repository,
    cmd_review,
    cmd_serve,
    cmd_smoke_model,
    cmd_verify,
)
from revpers.cli.logs import quiet_libraries
from revpers.cli.options import DEFAULT_MODELS, add_limit_arguments, add_param_arguments
from revpers.core.errors import RevpersError
from revpers.evaluate.cli import add_evaluate_parser, add_sweep_parser, run_evaluate, run_sweep
from revpers.serving.launcher.serve import add_serve_arguments

# exit status by error kind (revpers.core.errors); an image-level outcome gives 0 or 1 instead
EXIT_CODES = {
    "input": 2,
    "parameter": 2,
    "limit": 2,
    "bundle": 2,
    "face_model": 2,
    "cancelled": 130,
    "dependency": 2,
    "internal": 1,
}
EXIT_INTERRUPTED = 130


class _Subparsers:
    """Every subcommand also takes -v/-q (so they work before or after the subcommand's name)."""

    def __init__(self, action):
        self.action = action

    def add_parser(self, name: str, **kwargs) -> argparse.ArgumentParser:
        p = self.action.add_parser(name, **kwargs)
        if name != "serve":  # serve has its own --quiet (do not stream the server log)
            add_verbosity_arguments(p, argparse.SUPPRESS)
        return p


def add_verbosity_arguments(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument("-v", "--verbose", action="store_true", default=default, help="log library messages too")
    p.add_argument("-q", "--quiet", action="store_true", default=default, help="print only errors and the summary")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revpers",
        description=__doc__.split(":")[0] + ": face anonymization "
        "by reverse personalization (SDXL + IP-Adapter FaceID).",
        epilog="Exit status: 0 every image released as passed; 1 some image failed, was "
        "rejected or needs review; 2 usage, input or bundle error; 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"revpers {__version__}")
    add_verbosity_arguments(parser)
    sub = _Subparsers(parser.add_subparsers(dest="command", required=True))

    p = sub.add_parser(
        "smoke-model",
        help="write a smoke bundle (random models of the real architectures)",
        description="Write a bundle of randomly initialised models of the real architectures. "
        "Default: tiny models (tests, demo, CPU). --full-size: SDXL-size UNet, VAE and text "
        "encoders and a rank-128 FaceID LoRA at 1024 px (about 7.5 GB), to measure speed and memory "
        "of every path (export, TensorRT, Triton, benchmarks) without downloading weights. "
        "Outputs are noise either way.",
    )
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--full-size", action="store_true", help="SDXL-size models (about 7.5 GB on disk)")
    p.add_argument(
        "--device", default="cpu", help="where the random weights are drawn (cuda is much faster for --full-size)"
    )

    add_bundle_parser(sub)

    add_anonymize_parser(sub)

    p = sub.add_parser(
        "verify",
        help="check an (original, anonymized) pair after the fact: exit 0 when no face "
        "still matches, 1 when any does, 2 when the pair cannot be checked",
        description="Detects every face of ORIGINAL and measures the same place in ANONYMIZED with "
        "dlib's ResNet (and the bundle's ArcFace with --models, unless it is a smoke bundle). "
        "Exit status: 0 every face passes (or no face in ORIGINAL), 1 any face still matches, "
        "2 unreadable images, different sizes or a bad bundle.",
    )
    p.add_argument("original", type=Path)
    p.add_argument("anonymized", type=Path)
    p.add_argument(
        "--models",
        type=Path,
        default=None,
        help="model bundle: use its face detector and ArcFace too (default: dlib detector + dlib ResNet only)",
    )
    p.add_argument("--aligned", action="store_true", help="each image is one aligned face crop (no detection)")
    p.add_argument("--json", action="store_true", help="print the per-face results as JSON")

    p = sub.add_parser("reconstruct", help="fidelity check: invert then regenerate with the inversion's conditioning")
    p.add_argument("image", type=Path)
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    p.add_argument("--device", default=None)
    p.add_argument("--tolerance", type=float, default=1e-3, help="exit 1 when the latent max abs error exceeds this")
    add_param_arguments(p)

    p = sub.add_parser("export", help="export UNet (FaceID, LoRA fused), VAE and ArcFace to ONNX [and TensorRT]")
    p.add_argument("--models", type=Path, default=DEFAULT_MODELS)
    p.add_argument("--out", type=Path, required=True, help="artifacts folder")
    p.add_argument("--inversion-batch", type=int, default=10, help="inversion timesteps per UNet call (profile size)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines with polygraphy (GPU)")
    p.add_argument(
        "--fp8",
        action="store_true",
        help="with --tensorrt: FP8 UNet engine (NVIDIA ModelOpt PTQ, calibrated on the method's own UNet "
        "inputs; needs an FP8-capable GPU). Check the anonymization metrics before serving it",
    )
    p.add_argument(
        "--calibration",
        type=Path,
        nargs="+",
        default=None,
        metavar="IMG",
        help="photos whose faces calibrate --fp8 (default: the two demo photos)",
    )

    p = sub.add_parser(
        "repository",
        help="generate a Triton model repository (tensorrt, onnxruntime or pytorch)",
        description="Generate a Triton model repository. tensorrt: engines for NVIDIA's Triton "
        "container (GPU); onnxruntime: Python-backend models running the ONNX files "
        "(pip tritonserver, CPU); pytorch: the bundle's PyTorch modules (fp32 on the "
        "CPU, fp16 UNet on CUDA with --gpu; no export needed, --models is enough).",
    )
    p.add_argument(
        "--artifacts", type=Path, default=None, help="`revpers export` output (required for tensorrt and onnxruntime)"
    )
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", choices=("tensorrt", "onnxruntime", "pytorch"), default="onnxruntime")
    p.add_argument(
        "--models",
        type=Path,
        default=None,
        help="bundle path the server will read (default: the exported one; required for pytorch without --artifacts)",
    )
    p.add_argument(
        "--bls-instances",
        type=int,
        default=2,
        help="BLS model instances (processes: face detection, paste-back and image coding run in "
        "parallel across them; default 2)",
    )
    p.add_argument(
        "--bls-threads",
        type=int,
        default=8,
        help="requests each BLS instance serves concurrently (their UNet calls batch together)",
    )
    p.add_argument(
        "--component-instances",
        type=int,
        default=1,
        help="instances of each component model (default 1; on a CPU, about cores / ORT threads)",
    )
    p.add_argument("--gpu", action="store_true", help="run the models on the GPU (KIND_GPU; implied by tensorrt)")
    p.add_argument("--torch-compile", action="store_true", help="pytorch target: torch.compile the modules")
    p.add_argument(
        "--inversion-batch",
        type=int,
        default=None,
        help="pytorch target without --artifacts: inversion timesteps per UNet call (default 10); "
        "otherwise the exported value is used (a different one is refused)",
    )
    p.add_argument("--force", action="store_true")
    add_limit_arguments(p)

    add_evaluate_parser(sub)
    add_batch_parser(sub)
    add_sweep_parser(sub)

    p = sub.add_parser(
        "review",
        help="contact sheets and per-face overlays of a run folder (index.html)",
        description="Pictures of a run of `revpers anonymize` or `revpers-client anonymize`: "
        "contact sheets (input | output, worst first), per-face overlays (box, index, verdict, "
        "similarities) and an index.html, written into RUN_DIR/review/.",
    )
    p.add_argument("run_dir", type=Path, help="the -o folder of a run")
    p.add_argument(
        "--inputs",
        type=Path,
        default=None,
        help="the input folder of the run, when its manifest does not record where inputs were",
    )

    p = sub.add_parser("serve", help="start the pip-installed Triton server on a model repository")
    add_serve_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    if not args.verbose:
        quiet_libraries()
    handlers = {
        "smoke-model": cmd_smoke_model,
        "anonymize": run_anonymize,
        "verify": cmd_verify,
        "reconstruct": cmd_reconstruct,
        "export": cmd_export,
        "repository": cmd_repository,
        "serve": cmd_serve,
        "review": cmd_review,
        "bundle": run_bundle,
        "batch": run_batch,
        "evaluate": run_evaluate,
        "sweep": run_sweep,
    }
    try:
        return handlers[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RevpersError, OSError) as exc:
        kind = exc.kind if isinstance(exc, RevpersError) else "input"
        for line in str(exc).splitlines() or [""]:  # a bundle check gives one line per problem
            print(f"error: {'face models: ' if kind == 'face_model' else ''}{line}", file=sys.stderr)
        return EXIT_CODES[kind]
    except Exception as exc:  # a bug: one line, the traceback with -v
        logging.getLogger("revpers").debug("internal error", exc_info=True)
        print(f"error: internal error: {type(exc).__name__}: {exc} (run with -v for the traceback)", file=sys.stderr)
        if args.verbose:
            traceback.print_exc()
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
