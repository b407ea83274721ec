"""`revpers evaluate` and `revpers sweep` command lines (exit 0 ok, 2 unusable input, bundle or option)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from revpers.core.params import ParameterError, Params
from revpers.evaluate.core import SMOKE_NOTE, EvaluationInputError, Evaluator
from revpers.evaluate.identity import RecognizerSpecError, parse_recognizer
from revpers.evaluate.pairs import PairingError, collect_pairs
from revpers.evaluate.quality import InceptionError, InceptionFeatures
from revpers.evaluate.report import write_report
from revpers.evaluate.sweep import grid, run_sweep_settings
from revpers.faces.analysis import FaceModelError
from revpers.gate.recognizers import Verifier, verifier_for_bundle
from revpers.models.bundle import BundleError, load_bundle
from revpers.service.anonymizer import Anonymizer
from revpers.service.images import FORMATS, ImageError, read_image


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--aligned",
        action="store_true",
        help="each image is one aligned face crop (CelebA-HQ/FFHQ style): nothing is detected",
    )
    p.add_argument(
        "--recognizer",
        action="append",
        default=[],
        metavar="NAME=PATH.onnx[:threshold][:bgr]",
        help="an extra ONNX face recognizer (e.g. AdaFace): 112x112 norm_crop-aligned face, RGB "
        "(':bgr' for BGR models), (x - 127.5) / 127.5, output an embedding compared by cosine; "
        "match when cosine >= threshold (without one: distribution only). Repeatable",
    )
    p.add_argument(
        "--inception",
        type=Path,
        default=None,
        help="Inception-v3 feature model (ONNX or TorchScript; input (N,3,299,299) RGB in [-1, 1], "
        "output (N,2048) pool features) for FID/KID; skipped without it",
    )


def add_evaluate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="privacy/utility report over (original, anonymized) pairs: re-ID per recognizer, "
        "pose/expression differences, background change, FID/KID (docs/evaluation.md)",
        description="Measure a set of anonymized images against their originals: identity removal (re-ID "
        "rate of dlib's ResNet, the bundle's ArcFace unless smoke, and any --recognizer), attribute "
        "preservation (head pose, expression; gaze is not measured offline) and image quality (background "
        "PSNR/SSIM, detection agreement, FID/KID with --inception). Writes metrics.json, table.md (paper "
        "Table 1 layout), plots and index.html with contact sheets of the worst cases into -o. Exit 0, or "
        "2 for unusable inputs or options.",
    )
    p.add_argument("originals", type=Path, help="original image, or folder of originals")
    p.add_argument("anonymized", type=Path, help="anonymized image, or folder (e.g. a revpers anonymize -o folder)")
    p.add_argument("-o", "--out", type=Path, required=True, help="report folder")
    p.add_argument(
        "--models",
        type=Path,
        default=None,
        help="model bundle: its face detector and ArcFace (not a smoke one) and its verify thresholds "
        "(default: dlib detector and dlib ResNet only)",
    )
    p.add_argument("--label", default="revpers", help="row label in the Table 1 layout")
    _common(p)
    return p


def add_sweep_parser(subparsers) -> argparse.ArgumentParser:
    d = Params()
    p = subparsers.add_parser(
        "sweep",
        help="anonymize a sample under a grid of settings and evaluate each: re-ID/quality curves, "
        "cost, and the settings that meet a target re-ID rate",
        description="Anonymize a sample of INPUT under every combination of --guidance, --ip-scale and --steps "
        "(models load once; verification gate off so the curves show the generator itself), evaluate each "
        "setting like `revpers evaluate`, draw re-ID and quality curves and cost (UNet calls and seconds per "
        "face), and recommend, for --target-reid, the least aggressive and the cheapest setting meeting it.",
    )
    p.add_argument("inputs", nargs="+", type=Path, help="image files or folders")
    p.add_argument("-o", "--out", type=Path, required=True, help="output folder")
    p.add_argument("--models", type=Path, required=True, help="model bundle folder")
    p.add_argument(
        "--guidance", type=float, nargs="+", default=[d.guidance], help=f"guidance values (default {d.guidance})"
    )
    p.add_argument(
        "--ip-scale", type=float, nargs="+", default=[d.ip_scale], help=f"IP-Adapter scales (default {d.ip_scale})"
    )
    p.add_argument("--steps", type=int, nargs="+", default=[d.steps], help=f"solver steps (default {d.steps})")
    p.add_argument("--skip", type=float, default=d.skip, help=f"fraction of the schedule skipped (default {d.skip})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"noise seed (default {d.seed})")
    p.add_argument("--sample", type=int, default=None, help="use only the first N images (sorted by path)")
    p.add_argument(
        "--target-reid",
        type=float,
        default=0.01,
        help="target re-identification rate, a fraction in [0, 1] (default 0.01)",
    )
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--inversion-batch", type=int, default=10, help="inversion timesteps per UNet call (default 10)")
    _common(p)
    return p


def _fail(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return 2


def _extras_and_inception(args):

    extras = [parse_recognizer(s) for s in args.recognizer]
    names = [e.name for e in extras]
    if len(set(names)) != len(names):
        raise EvaluationInputError(f"--recognizer names must be unique, got {names}")
    return extras, (InceptionFeatures(args.inception) if args.inception is not None else None)


def _known_errors():

    return (
        BundleError,
        FaceModelError,
        ImageError,
        ParameterError,
        RecognizerSpecError,
        PairingError,
        InceptionError,
        EvaluationInputError,
        FileExistsError,
        FileNotFoundError,
        NotADirectoryError,
        PermissionError,
    )


def run_evaluate(args) -> int:
    try:
        return _evaluate(args)
    except _known_errors() as exc:
        return _fail(str(exc))


def _evaluate(args) -> int:

    pairing = collect_pairs(args.originals, args.anonymized)
    extras, inception = _extras_and_inception(args)
    smoke = pairing.smoke
    if args.models is not None:
        bundle = load_bundle(args.models)
        verifier = verifier_for_bundle(bundle)
        smoke = smoke or bundle.smoke
    else:
        verifier = Verifier(None)
    ev = Evaluator(verifier, extras=extras, inception=inception, aligned=args.aligned, smoke=smoke)
    ev.unmatched = list(pairing.unmatched)
    for pair in pairing.pairs:
        if pair.anonymized is None:
            ev.add_withheld(pair.name)
            continue
        ev.add(pair.name, read_image(pair.original), read_image(pair.anonymized))
    metrics = write_report(ev.metrics(), ev, args.out, label=args.label)
    note = f" [{SMOKE_NOTE}]" if smoke else ""
    print(
        f"{metrics['images']['evaluated']} pair(s), {metrics['faces']['measured']} face(s); report in "
        f"{args.out / 'index.html'}{note}"
    )
    for n, s in metrics["identity"].items():
        rate = "n/a (no threshold)" if s["reid_rate"] is None else f"{100 * s['reid_rate']:.2f} %"
        print(f"  re-ID {n}: {rate}")
    if pairing.unmatched:
        print(
            f"  {len(pairing.unmatched)} original(s) without an anonymized file: "
            + ", ".join(pairing.unmatched[:5])
            + (" ..." if len(pairing.unmatched) > 5 else "")
        )
    return 0


def _sweep_inputs(paths: list[Path], sample: int | None) -> list[Path]:

    files = []
    for p in paths:
        if p.is_dir():
            files += sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in FORMATS)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not files:
        raise EvaluationInputError("no input images (JPEG/PNG/WebP files or folders holding them)")
    files = sorted(dict.fromkeys(files))
    return files[:sample] if sample else files


def run_sweep(args) -> int:
    try:
        return _sweep(args)
    except _known_errors() as exc:
        return _fail(str(exc))


def _sweep(args) -> int:

    if not 0.0 <= args.target_reid <= 1.0:
        raise EvaluationInputError(f"--target-reid must be a fraction in [0, 1], got {args.target_reid:g}")
    if args.sample is not None and args.sample < 1:
        raise EvaluationInputError("--sample must be >= 1")
    if args.inversion_batch < 1:
        raise EvaluationInputError("--inversion-batch must be >= 1")
    settings = grid(args.guidance, args.ip_scale, args.steps)
    for s in settings:  # refuse a bad value before loading any model
        Params.from_mapping(
            {"guidance": s.guidance, "ip_scale": s.ip_scale, "steps": s.steps, "seed": args.seed, "skip": args.skip}
        )
    files = _sweep_inputs(args.inputs, args.sample)
    extras, inception = _extras_and_inception(args)
    names, originals, sources = set(), [], {}
    for f in files:
        name, k = f.stem, 1
        while name in names:
            name, k = f"{f.stem}-{k}", k + 1
        names.add(name)
        originals.append((name, read_image(f)))
        sources[name] = f
    anon = Anonymizer(args.models, device=args.device, inversion_batch=args.inversion_batch)
    args.out.mkdir(parents=True, exist_ok=True)
    summary = run_sweep_settings(
        anon,
        originals,
        settings,
        args.out,
        seed=args.seed,
        skip=args.skip,
        aligned=args.aligned,
        extras=extras,
        inception=inception,
        target=args.target_reid,
        sources=sources,
    )
    rec = summary["recommendation"]
    if rec.get("least_aggressive"):
        print(
            f"target re-ID {100 * args.target_reid:g} %: least aggressive {rec['least_aggressive']['tag']}, "
            f"cheapest {rec['cheapest']['tag']}"
        )
    else:
        print(f"target re-ID {100 * args.target_reid:g} %: {rec['note']}")
    print(
        f"sweep report in {args.out / 'index.html'}"
        + (" [smoke weights: numbers meaningless]" if summary["smoke"] else "")
    )
    return 0


__all__ = ["add_evaluate_parser", "add_sweep_parser", "run_evaluate", "run_sweep"]
