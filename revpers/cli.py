"""`revpers` command line: smoke-model, bundle, anonymize, verify, reconstruct, export, repository, serve."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

DEFAULT_MODELS = os.environ.get("REVPERS_MODELS", "models")


def _quiet_libraries() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*torchvision.*")
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except Exception:  # pragma: no cover - diffusers missing is reported when loading
        pass


def add_param_arguments(p: argparse.ArgumentParser) -> None:
    from .pipeline import Params

    d = Params()
    p.add_argument("--guidance", type=float, default=d.guidance, help=f"CFG scale w (negative anonymizes; default {d.guidance})")
    p.add_argument("--ip-scale", type=float, default=d.ip_scale, help=f"IP-Adapter scale (default {d.ip_scale})")
    p.add_argument("--id-scale", type=float, default=d.id_scale, help=f"identity embedding scale (default {d.id_scale})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"solver steps N (default {d.steps})")
    p.add_argument("--skip", type=float, default=d.skip, help=f"fraction of the schedule skipped (default {d.skip})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"noise seed (default {d.seed})")
    p.add_argument("--prompt", default=None, help="attribute prompt, e.g. 'an old man' (generation uncond branch only)")


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    from .verify import FALLBACKS, MAX_RETRIES, RETRY_MODES, VerifyPolicy

    d = VerifyPolicy()
    g = p.add_argument_group("identity verification gate (docs/verification.md)")
    g.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip the gate: generated faces are not checked and get verdict 'unverified' (so does "
                        "the image); faces the size policy obscured or left keep 'not_generated'/'left', and a "
                        "photo with no face is 'no_faces'")
    g.add_argument("--retries", type=int, default=d.retries,
                   help=f"extra attempts for faces that still match their input (0-{MAX_RETRIES}; default {d.retries})")
    g.add_argument("--retry-mode", choices=RETRY_MODES, default=d.retry_mode,
                   help=f"new seed, stronger guidance (guidance - attempt x step), or both (default {d.retry_mode})")
    g.add_argument("--guidance-step", type=float, default=d.guidance_step,
                   help=f"guidance change per retry, in (0, 20] (default {d.guidance_step})")
    g.add_argument("--fallback", choices=FALLBACKS, default=d.fallback,
                   help=f"after the last failed attempt: blur or pixelate the face, or reject the image "
                        f"(no image written; exit 1) (default {d.fallback})")


def verify_policy_from_args(args):
    from .verify import VerifyPolicy

    return VerifyPolicy.from_mapping({"verify": args.verify, "retries": args.retries, "retry_mode": args.retry_mode,
                                      "guidance_step": args.guidance_step, "fallback": args.fallback})


def params_from_args(args):
    from .pipeline import Params

    return Params.from_mapping({"guidance": args.guidance, "ip_scale": args.ip_scale, "id_scale": args.id_scale,
                                "steps": args.steps, "skip": args.skip, "seed": args.seed, "prompt": args.prompt})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="revpers", description=__doc__.split(":")[0] + ": face anonymization "
                                     "by reverse personalization (SDXL + IP-Adapter FaceID).")
    parser.add_argument("-v", "--verbose", action="store_true", help="log library messages too")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("smoke-model", help="write a smoke bundle (random models of the real architectures)",
                       description="Write a bundle of randomly initialised models of the real architectures. "
                       "Default: tiny models (tests, demo, CPU). --full-size: SDXL-size UNet, VAE and text "
                       "encoders and a rank-128 FaceID LoRA at 1024 px (about 7.5 GB), to measure speed and memory "
                       "of every path (export, TensorRT, Triton, benchmarks) without downloading weights. "
                       "Outputs are noise either way.")
    p.add_argument("dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="replace DIR if it exists")
    p.add_argument("--full-size", action="store_true", help="SDXL-size models (about 7.5 GB on disk)")
    p.add_argument("--device", default="cpu", help="where the random weights are drawn (cuda is much faster "
                   "for --full-size)")

    from .bundle_tools import add_bundle_parser

    add_bundle_parser(sub)

    p = sub.add_parser("anonymize", help="anonymize images in process; writes IMAGE + IMAGE.json per input")
    p.add_argument("inputs", nargs="+", type=Path, help="image files (JPEG/PNG/WebP)")
    p.add_argument("-o", "--outdir", type=Path, required=True)
    p.add_argument("--models", type=Path, default=Path(DEFAULT_MODELS), help="model bundle folder (env REVPERS_MODELS)")
    p.add_argument("--aligned", action="store_true",
                   help="treat each whole image as one aligned face crop (CelebA-HQ/FFHQ style), as in the paper")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--inversion-batch", type=int, default=10, help="inversion timesteps per UNet call (default 10)")
    add_param_arguments(p)
    add_verify_arguments(p)

    p = sub.add_parser("verify", help="check an (original, anonymized) pair after the fact: exit 0 when no face "
                       "still matches, 1 when any does, 2 when the pair cannot be checked",
                       description="Detects every face of ORIGINAL and measures the same place in ANONYMIZED with "
                       "dlib's ResNet (and the bundle's ArcFace with --models, unless it is a smoke bundle). "
                       "Exit status: 0 every face passes (or no face in ORIGINAL), 1 any face still matches, "
                       "2 unreadable images, different sizes or a bad bundle.")
    p.add_argument("original", type=Path)
    p.add_argument("anonymized", type=Path)
    p.add_argument("--models", type=Path, default=None,
                   help="model bundle: use its face detector and ArcFace too (default: dlib detector + dlib ResNet only)")
    p.add_argument("--aligned", action="store_true", help="each image is one aligned face crop (no detection)")
    p.add_argument("--json", action="store_true", help="print the per-face results as JSON")

    p = sub.add_parser("reconstruct", help="fidelity check: invert then regenerate with the inversion's conditioning")
    p.add_argument("image", type=Path)
    p.add_argument("--models", type=Path, default=Path(DEFAULT_MODELS))
    p.add_argument("--device", default=None)
    p.add_argument("--tolerance", type=float, default=1e-3, help="exit 1 when the latent max abs error exceeds this")
    add_param_arguments(p)

    p = sub.add_parser("export", help="export UNet (FaceID, LoRA fused), VAE and ArcFace to ONNX [and TensorRT]")
    p.add_argument("--models", type=Path, default=Path(DEFAULT_MODELS))
    p.add_argument("--out", type=Path, required=True, help="artifacts folder")
    p.add_argument("--inversion-batch", type=int, default=10, help="inversion timesteps per UNet call (profile size)")
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines with polygraphy (GPU)")
    p.add_argument("--fp8", action="store_true",
                   help="with --tensorrt: FP8 UNet engine (NVIDIA ModelOpt PTQ, calibrated on the method's own UNet "
                        "inputs; needs an FP8-capable GPU). Check the anonymization metrics before serving it")
    p.add_argument("--calibration", type=Path, nargs="+", default=None, metavar="IMG",
                   help="photos whose faces calibrate --fp8 (default: the two demo photos)")

    p = sub.add_parser("repository", help="generate a Triton model repository (tensorrt, onnxruntime or pytorch)",
                       description="Generate a Triton model repository. tensorrt: engines for NVIDIA's Triton "
                                   "container (GPU); onnxruntime: Python-backend models running the ONNX files "
                                   "(pip tritonserver, CPU); pytorch: the bundle's PyTorch modules (fp32 on the "
                                   "CPU, fp16 UNet on CUDA with --gpu; no export needed, --models is enough).")
    p.add_argument("--artifacts", type=Path, default=None,
                   help="`revpers export` output (required for tensorrt and onnxruntime)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--backend", choices=("tensorrt", "onnxruntime", "pytorch"), default="onnxruntime")
    p.add_argument("--models", type=Path, default=None,
                   help="bundle path the server will read (default: the exported one; required for pytorch "
                        "without --artifacts)")
    p.add_argument("--bls-instances", type=int, default=2,
                   help="BLS model instances (processes: face detection, paste-back and image coding run in "
                        "parallel across them; default 2)")
    p.add_argument("--bls-threads", type=int, default=8,
                   help="requests each BLS instance serves concurrently (their UNet calls batch together)")
    p.add_argument("--component-instances", type=int, default=1,
                   help="instances of each component model (default 1; on a CPU, about cores / ORT threads)")
    p.add_argument("--gpu", action="store_true", help="run the models on the GPU (KIND_GPU; implied by tensorrt)")
    p.add_argument("--torch-compile", action="store_true", help="pytorch target: torch.compile the modules")
    p.add_argument("--inversion-batch", type=int, default=None,
                   help="pytorch target without --artifacts: inversion timesteps per UNet call (default 10); "
                        "otherwise the exported value is used (a different one is refused)")
    p.add_argument("--force", action="store_true")

    try:
        from .triton_server import add_serve_arguments

        p = sub.add_parser("serve", help="start the pip-installed Triton server on a model repository")
        add_serve_arguments(p)
    except ImportError:
        pass
    return parser


def cmd_smoke_model(args) -> int:
    from .smoke import write_smoke_bundle

    t0 = time.perf_counter()
    root = write_smoke_bundle(args.dir, seed=args.seed, overwrite=args.force, full_size=args.full_size,
                              device=args.device)
    print(f"wrote smoke bundle {root} in {time.perf_counter() - t0:.1f} s "
          f"({'SDXL-size' if args.full_size else 'tiny'} random models: outputs are noise, not faces)")
    return 0


def _output_path(outdir: Path, src: Path, used: set) -> Path:
    from .images import FORMATS

    suffix = src.suffix.lower() if src.suffix.lower() in FORMATS else ".png"
    out = outdir / (src.stem + suffix)
    k = 1
    while out in used:
        out = outdir / f"{src.stem}-{k}{suffix}"
        k += 1
    used.add(out)
    return out


def cmd_anonymize(args) -> int:
    from collections import Counter

    from .anonymizer import Anonymizer
    from .audit import add_byte_hashes
    from .bundle_tools import require_valid_bundle
    from .images import ImageError, encode_image, format_for, read_image_bytes

    params = params_from_args(args)
    verify = verify_policy_from_args(args)
    if args.inversion_batch < 1:
        raise SystemExit("error: --inversion-batch must be >= 1")
    anon = Anonymizer(require_valid_bundle(args.models), device=args.device, inversion_batch=args.inversion_batch)
    args.outdir.mkdir(parents=True, exist_ok=True)
    failures, rejected, used = 0, 0, set()
    faces_by_verdict, images_by_verdict = Counter(), Counter()
    for src in args.inputs:
        try:
            t0 = time.perf_counter()
            raw, rgb = read_image_bytes(src)
            decode_s = time.perf_counter() - t0
            if args.aligned:
                result = anon.anonymize_aligned(rgb, params, verify=verify)
            else:
                result = anon.anonymize_photo(rgb, params, verify=verify)
            out = _output_path(args.outdir, src, used)
            t1 = time.perf_counter()
            data = encode_image(result.image, format_for(out)) if result.image is not None else None
            report = dict(result.report, input=str(src), output=str(out) if data is not None else None)
            add_byte_hashes(report, raw, data)
            report.setdefault("timings_ms", {})
            report["timings_ms"].update({"decode": round(decode_s * 1e3, 3),
                                         "encode": round((time.perf_counter() - t1) * 1e3, 3)})
            if data is not None:
                tmp = out.with_name(out.name + ".part")
                tmp.write_bytes(data)
                tmp.replace(out)
            out.with_name(out.name + ".json").write_text(json.dumps(report, indent=2) + "\n")
            verdict = report.get("verdict")
            images_by_verdict[verdict] += 1
            faces_by_verdict.update(f.get("verdict") for f in report.get("faces", []))
            if data is None:
                rejected += 1
                print(f"{src}: REJECTED, no image written: {report.get('rejected_reason')} "
                      f"(report: {out.name}.json)", file=sys.stderr)
                continue
            note = " [SMOKE WEIGHTS: noise, not a face]" if anon.bundle.smoke else ""
            print(f"{src} -> {out} [verdict: {verdict}]{note}")
        except ImageError as exc:
            failures += 1
            print(f"error: {exc}", file=sys.stderr)
    if images_by_verdict:
        fmt = lambda c: ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"  # noqa: E731
        print(f"images by verdict: {fmt(images_by_verdict)}; faces by verdict: {fmt(faces_by_verdict)}")
    return 1 if failures or rejected else 0


def cmd_verify(args) -> int:
    from .bundle import load_bundle
    from .images import ImageError, read_image
    from .verify import Verifier, verifier_for_bundle, verify_pair

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
    from .anonymizer import Anonymizer
    from .bundle_tools import require_valid_bundle
    from .images import read_image

    params = params_from_args(args)
    anon = Anonymizer(require_valid_bundle(args.models), device=args.device)
    result = anon.reconstruction_error(read_image(args.image), params)
    print(json.dumps(result, indent=2))
    ok = result["latent_max_abs_error"] <= args.tolerance
    print(f"latent max abs error {result['latent_max_abs_error']:.3e} "
          f"({'within' if ok else 'ABOVE'} tolerance {args.tolerance:g})"
          + (" [smoke bundle]" if result["smoke"] else ""))
    return 0 if ok else 1


def cmd_export(args) -> int:
    from export.onnx_export import export_bundle

    from .bundle_tools import require_valid_bundle

    if args.fp8 and not args.tensorrt:
        print("revpers export: --fp8 needs --tensorrt (it is an engine option)", file=sys.stderr)
        return 2
    export_bundle(require_valid_bundle(args.models), args.out, args.inversion_batch, args.tensorrt, fp8=args.fp8,
                  calibration_images=args.calibration)
    print(f"artifacts in {args.out}")
    return 0


def cmd_repository(args) -> int:
    from .bundle_tools import require_valid_bundle
    from .repository import build_repository

    if args.backend != "pytorch" and args.artifacts is None:
        print(f"revpers repository: --artifacts is required for the {args.backend} target", file=sys.stderr)
        return 2
    if args.backend == "pytorch" and args.artifacts is None and args.models is None:
        print("revpers repository: the pytorch target needs --models (or --artifacts)", file=sys.stderr)
        return 2
    if args.models is not None:
        require_valid_bundle(args.models)
    else:  # the bundle the artifacts were exported from, which the server will load
        from export.onnx_export import load_artifacts

        require_valid_bundle(load_artifacts(args.artifacts)["bundle"]["path"])
    out = build_repository(args.artifacts, args.out, args.backend, args.models, args.bls_instances,
                           args.inversion_batch, args.force, bls_threads=args.bls_threads, gpu=args.gpu,
                           torch_compile=args.torch_compile, component_instances=args.component_instances)
    print(f"model repository ({args.backend}) in {out}; start it with: revpers serve --repository {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_libraries()
    from .bundle import BundleError
    from .bundle_tools import repository_bundle, require_valid_bundle, run_bundle
    from .faces.analysis import FaceModelError
    from .pipeline import ParameterError

    handlers = {"smoke-model": cmd_smoke_model, "bundle": run_bundle, "anonymize": cmd_anonymize, "verify": cmd_verify,
                "reconstruct": cmd_reconstruct,
                "export": cmd_export, "repository": cmd_repository}
    if args.command == "serve":
        from .triton_server import run_serve

        def serve_checked(args):  # the bundle the repository's BLS model will load, checked first
            bundle = repository_bundle(args.repository)
            if bundle is not None:
                require_valid_bundle(bundle)
            return run_serve(args)

        handlers["serve"] = serve_checked
    try:
        return handlers[args.command](args)
    except (BundleError, ParameterError, FileExistsError, FileNotFoundError) as exc:
        for line in str(exc).splitlines() or [""]:  # the bundle check gives one line per problem
            print(f"error: {line}", file=sys.stderr)
        return 2
    except FaceModelError as exc:  # a broken bundle, not a verdict: exit 1 means "a face still matches"
        print(f"error: face models: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
