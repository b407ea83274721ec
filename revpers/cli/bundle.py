"""`revpers bundle init|check`: build a model bundle from downloaded weights, or validate one."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from revpers.core.errors import BundleError
from revpers.service.bundle_tools import ARCFACE_RECOGNIZER_FILE, SDXL_CACHE_REPO, check_summary, init_bundle, run_check


def add_bundle_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bundle",
        help="build a model bundle from downloaded weights (init) or validate one (check)",
        description="Build a model bundle from downloaded weights, or validate one. "
        "docs/real-weights.md lists what to download and every manifest key.",
    )
    sub = p.add_subparsers(dest="bundle_command", required=True, metavar="{init,check}")
    i = sub.add_parser(
        "init",
        help="write a bundle (links, or copies with --copy) and its manifest.json",
        description="Write a model bundle from downloaded files: SDXL base 1.0 (diffusers folder or "
        "Hugging Face cache, fp32 or fp16 variant), ip-adapter-faceid_sdxl.bin and a face model "
        "folder (insightface buffalo_l: det_10g.onnx + w600k_r50.onnx). Checks it afterwards.",
    )
    i.add_argument("out", type=Path, metavar="OUT", help="the bundle folder to write")
    i.add_argument(
        "--sdxl",
        type=Path,
        required=True,
        metavar="DIR_OR_HF_CACHE",
        help="stable-diffusion-xl-base-1.0 in diffusers layout, or its Hugging Face cache folder "
        f"({SDXL_CACHE_REPO} or one of its snapshots/<hash>)",
    )
    i.add_argument("--ip-adapter", type=Path, required=True, metavar="FILE", help="ip-adapter-faceid_sdxl.bin")
    i.add_argument(
        "--faces",
        type=Path,
        required=True,
        metavar="DIR",
        help="face models folder: an insightface pack (det_10g.onnx + w600k_r50.onnx), or a folder with "
        "one ArcFace-contract ONNX file (then the dlib detector is used)",
    )
    i.add_argument("--copy", action="store_true", help="copy the files instead of linking to them")
    i.add_argument("--force", action="store_true", help="replace OUT if it exists")
    i.add_argument(
        "--variant",
        choices=("auto", "fp32", "fp16"),
        default="auto",
        help="SDXL weight files to take: auto (fp32 where present, else the fp16 variant), fp32 or fp16",
    )
    i.add_argument(
        "--detector",
        choices=("auto", "insightface", "dlib"),
        default="auto",
        help="auto: insightface when DIR has det_10g.onnx, else dlib",
    )
    i.add_argument(
        "--recognizer",
        default=None,
        metavar="NAME",
        help=f"recognizer file in DIR (default {ARCFACE_RECOGNIZER_FILE}, or the only .onnx file)",
    )
    i.add_argument("--name", default=None, help="bundle name in reports (default: OUT's folder name)")
    i.add_argument(
        "--smoke",
        action="store_true",
        help="the files are a smoke bundle's random weights: every output says 'smoke weights'",
    )
    c = sub.add_parser(
        "check",
        help="validate a bundle without loading its large files: one line per problem, exit 2 on any",
        description="Validate every file of a bundle without loading the large ones "
        "(safetensors headers and shapes against the configs, the adapter's keys and shapes against the "
        "UNet including its LoRA, ONNX graphs and their inputs, manifest values). Prints one "
        "'path: problem' line per problem and exits 2, or a one-line OK summary and exits 0.",
    )
    c.add_argument("dir", type=Path, metavar="DIR")
    return p


def print_check(root: Path) -> int:
    c = run_check(root)
    for line in c.problems:
        print(line)
    if c.problems:
        return 2
    print(check_summary(c))
    return 0


def run_bundle(args: argparse.Namespace) -> int:
    try:
        if args.bundle_command == "init":
            out = init_bundle(
                args.out,
                args.sdxl,
                args.ip_adapter,
                args.faces,
                copy=args.copy,
                force=args.force,
                variant=args.variant,
                detector=args.detector,
                recognizer=args.recognizer,
                name=args.name,
                smoke=args.smoke,
            )
            print(f"wrote bundle {out} ({'copies' if args.copy else 'links'}); checking it:")
            return print_check(out)
        return print_check(args.dir)
    except BundleError as exc:
        for line in str(exc).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
