"""The subcommands that run in this process; each returns an exit code."""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from pathlib import Path

from revpers.cli.options import limits_from_args, params_from_args, verify_policy_from_args
from revpers.core.errors import InputError
from revpers.export.onnx_export import export_bundle
from revpers.gate.loop import verify_pair
from revpers.gate.recognizers import Verifier, verifier_for_bundle
from revpers.models.bundle import load_bundle
from revpers.models.smoke import write_smoke_bundle
from revpers.service.anonymizer import Anonymizer
from revpers.service.images import FORMATS, ImageError, format_for, read_file, read_image
from revpers.service.request import Limits, RequestOptions, anonymize_bytes
from revpers.serving.repository import build_repository


def cmd_smoke_model(args) -> int:
    t0 = time.perf_counter()
    root = write_smoke_bundle(args.dir, seed=args.seed, overwrite=args.force, full_size=args.full_size,
                              device=args.device)
    print(f"wrote smoke bundle {root} in {time.perf_counter() - t0:.1f} s "
          f"({'SDXL-size' if args.full_size else 'tiny'} random models: outputs are noise, not faces)")
    return 0


def _output_path(outdir: Path, src: Path, used: set) -> Path:
    suffix = src.suffix.lower() if src.suffix.lower() in FORMATS else ".png"
    out = outdir / (src.stem + suffix)
    k = 1
    while out in used:
        out = outdir / f"{src.stem}-{k}{suffix}"
        k += 1
    used.add(out)
    return out


def cmd_anonymize(args) -> int:
    params = params_from_args(args)
    verify = verify_policy_from_args(args)
    if args.inversion_batch < 1:
        raise SystemExit("error: --inversion-batch must be >= 1")
    anon = Anonymizer(args.models, device=args.device, inversion_batch=args.inversion_batch)
    args.outdir.mkdir(parents=True, exist_ok=True)
    failures, rejected, used = 0, 0, set()
    faces_by_verdict, images_by_verdict = Counter(), Counter()
    for src in args.inputs:
        out = _output_path(args.outdir, src, used)
        options = RequestOptions(params=params, verify=verify, mode="aligned" if args.aligned else "photo",
                                 format=format_for(out).lower())
        try:
            response = anonymize_bytes(anon, read_file(src), options, name=str(src), limits=Limits.in_process())
        except InputError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
            continue
        report = response.report
        report.input, report.output = str(src), str(out) if response.image else None
        if response.image:
            tmp = out.with_name(out.name + ".part")
            tmp.write_bytes(response.image)
            tmp.replace(out)
        out.with_name(out.name + ".json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        images_by_verdict[report.verdict.value] += 1
        faces_by_verdict.update(str(f.verdict.value if hasattr(f.verdict, "value") else f.verdict) for f in report.faces)
        if not response.image:
            rejected += 1
            print(f"{src}: REJECTED, no image written: {report.rejected_reason} "
                  f"(report: {out.name}.json)", file=sys.stderr)
            continue
        note = " [SMOKE WEIGHTS: noise, not a face]" if anon.bundle.smoke else ""
        print(f"{src} -> {out} [verdict: {report.verdict.value}]{note}")
    if images_by_verdict:
        fmt = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"  # noqa: E731
        print(f"images by verdict: {fmt(images_by_verdict)}; faces by verdict: {fmt(faces_by_verdict)}")
    return 1 if failures or rejected else 0


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
        print(json.dumps({"original": str(args.original), "anonymized": str(args.anonymized),
                          "recognizers": verifier.describe(), "faces": results,
                          "passed": not matched}, indent=2))
    else:
        d = verifier.describe()
        if not d["arcface"]["used"]:
            print(f"arcface {d['arcface'].get('note', 'not used')}")
        for r in results:
            arc = (f", arcface cosine {r['arcface_cosine']:.4f} (match >= {r['arcface_threshold']})"
                   if r["arcface_cosine"] is not None else "")
            print(f"face {r['index']} box {r['box']}: dlib distance {r['dlib_distance']:.4f} "
                  f"(match <= {r['dlib_threshold']}){arc}, re-detected {'yes' if r['redetected'] else 'no'}: "
                  f"{'PASS' if r['passed'] else 'STILL MATCHES'}")
        if not results:
            print(f"no face found in {args.original}; nothing to check")
        else:
            print(f"{len(results)} face(s): {len(results) - len(matched)} pass, {len(matched)} still match")
    return 1 if matched else 0


def cmd_reconstruct(args) -> int:

    params = params_from_args(args)
    anon = Anonymizer(args.models, device=args.device)
    result = anon.reconstruction_error(read_image(args.image), params)
    print(json.dumps(result, indent=2))
    ok = result["latent_max_abs_error"] <= args.tolerance
    print(f"latent max abs error {result['latent_max_abs_error']:.3e} "
          f"({'within' if ok else 'ABOVE'} tolerance {args.tolerance:g})"
          + (" [smoke bundle]" if result["smoke"] else ""))
    return 0 if ok else 1


def cmd_export(args) -> int:
    if args.fp8 and not args.tensorrt:
        print("revpers export: --fp8 needs --tensorrt (it is an engine option)", file=sys.stderr)
        return 2
    export_bundle(load_bundle(args.models), args.out, args.inversion_batch, args.tensorrt, fp8=args.fp8,
                  calibration_images=args.calibration)
    print(f"artifacts in {args.out}")
    return 0


def cmd_repository(args) -> int:
    if args.backend != "pytorch" and args.artifacts is None:
        print(f"revpers repository: --artifacts is required for the {args.backend} target", file=sys.stderr)
        return 2
    if args.backend == "pytorch" and args.artifacts is None and args.models is None:
        print("revpers repository: the pytorch target needs --models (or --artifacts)", file=sys.stderr)
        return 2
    out = build_repository(args.artifacts, args.out, args.backend, args.models, args.bls_instances,
                           args.inversion_batch, args.force, bls_threads=args.bls_threads, gpu=args.gpu,
                           torch_compile=args.torch_compile, component_instances=args.component_instances,
                           limits=limits_from_args(args))
    print(f"model repository ({args.backend}) in {out}; start it with: revpers serve --repository {out}")
    return 0
