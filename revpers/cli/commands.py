"""The subcommands that run in this process; each returns an exit code."""

from __future__ import annotations

import json
import sys
import time

from revpers.cli.options import limits_from_args, params_from_args
from revpers.cli.review import write_review
from revpers.export.onnx_export import export_bundle
from revpers.gate.loop import verify_pair
from revpers.gate.recognizers import Verifier, verifier_for_bundle
from revpers.models.artifacts import load_artifacts
from revpers.models.bundle import load_bundle
from revpers.models.smoke import write_smoke_bundle
from revpers.service.anonymizer import Anonymizer
from revpers.service.bundle_tools import repository_bundle, require_valid_bundle
from revpers.service.images import ImageError, read_image
from revpers.serving.launcher.serve import run_serve
from revpers.serving.repository import build_repository


def cmd_smoke_model(args) -> int:
    t0 = time.perf_counter()
    root = write_smoke_bundle(
        args.dir, seed=args.seed, overwrite=args.force, full_size=args.full_size, device=args.device
    )
    print(
        f"wrote smoke bundle {root} in {time.perf_counter() - t0:.1f} s "
        f"({'SDXL-size' if args.full_size else 'tiny'} random models: outputs are noise, not faces)"
    )
    return 0


def cmd_verify(args) -> int:

    try:
        original, anonymized = read_image(args.original), read_image(args.anonymized)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verifier = verifier_for_bundle(load_bundle(args.models)) if args.models else Verifier(None)
    try:
        results = verify_pair(verifier, original, anonymized, aligned=args.aligned)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    matched = [r for r in results if not r["passed"]]
    if args.json:
        print(
            json.dumps(
                {
                    "original": str(args.original),
                    "anonymized": str(args.anonymized),
                    "recognizers": verifier.describe(),
                    "faces": results,
                    "passed": not matched,
                },
                indent=2,
            )
        )
    else:
        d = verifier.describe()
        if not d["arcface"]["used"]:
            print(f"arcface {d['arcface'].get('note', 'not used')}")
        for r in results:
            arc = (
                f", arcface cosine {r['arcface_cosine']:.4f} (match >= {r['arcface_threshold']})"
                if r["arcface_cosine"] is not None
                else ""
            )
            print(
                f"face {r['index']} box {r['box']}: dlib distance {r['dlib_distance']:.4f} "
                f"(match <= {r['dlib_threshold']}){arc}, re-detected {'yes' if r['redetected'] else 'no'}: "
                f"{'PASS' if r['passed'] else 'STILL MATCHES'}"
            )
        if not results:
            print(f"no face found in {args.original}; nothing to check")
        else:
            print(f"{len(results)} face(s): {len(results) - len(matched)} pass, {len(matched)} still match")
    return 1 if matched else 0


def cmd_reconstruct(args) -> int:

    params = params_from_args(args)
    anon = Anonymizer(require_valid_bundle(args.models), device=args.device)
    result = anon.reconstruction_error(read_image(args.image), params)
    print(json.dumps(result, indent=2))
    ok = result["latent_max_abs_error"] <= args.tolerance
    print(
        f"latent max abs error {result['latent_max_abs_error']:.3e} "
        f"({'within' if ok else 'ABOVE'} tolerance {args.tolerance:g})" + (" [smoke bundle]" if result["smoke"] else "")
    )
    return 0 if ok else 1


def cmd_export(args) -> int:
    if args.fp8 and not args.tensorrt:
        print("revpers export: --fp8 needs --tensorrt (it is an engine option)", file=sys.stderr)
        return 2
    export_bundle(
        require_valid_bundle(args.models),
        args.out,
        args.inversion_batch,
        args.tensorrt,
        fp8=args.fp8,
        calibration_images=args.calibration,
    )
    print(f"artifacts in {args.out}")
    return 0


def cmd_repository(args) -> int:
    if args.backend != "pytorch" and args.artifacts is None:
        print(f"revpers repository: --artifacts is required for the {args.backend} target", file=sys.stderr)
        return 2
    if args.backend == "pytorch" and args.artifacts is None and args.models is None:
        print("revpers repository: the pytorch target needs --models (or --artifacts)", file=sys.stderr)
        return 2
    if args.models is not None:
        require_valid_bundle(args.models)
    else:  # the bundle the artifacts were exported from, which the server will load
        require_valid_bundle(load_artifacts(args.artifacts)["bundle_path"])
    out = build_repository(
        args.artifacts,
        args.out,
        args.backend,
        args.models,
        args.bls_instances,
        args.inversion_batch,
        args.force,
        bls_threads=args.bls_threads,
        gpu=args.gpu,
        torch_compile=args.torch_compile,
        component_instances=args.component_instances,
        limits=limits_from_args(args),
    )
    print(f"model repository ({args.backend}) in {out}; start it with: revpers serve --repository {out}")
    return 0


def cmd_review(args) -> int:
    index = write_review(args.run_dir, args.inputs)
    print(f"review of {args.run_dir}: {index}")
    return 0


def cmd_serve(args) -> int:
    """`revpers serve`, after checking the bundle the repository's BLS model will load."""
    bundle = repository_bundle(args.repository)
    if bundle is not None:
        require_valid_bundle(bundle)
    return run_serve(args)
