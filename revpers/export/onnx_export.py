"""ONNX export of the bundle's components, driven by their ComponentSpecs, plus parity checks."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from revpers.core.params import Params
from revpers.export.calibration import calibration_faces, capture_unet_inputs, quantize_unet_fp8
from revpers.export.tensorrt_build import build_engines
from revpers.faces.samples import demo_photos
from revpers.models.artifacts import (
    ARTIFACTS_MANIFEST,
    copy_recognizer,
    onnx_files,
    onnx_session,
    store_weights_externally,
)
from revpers.models.components import ComponentSpec, specs_from_bundle
from revpers.models.torch_models import TorchModels
from revpers.service.images import read_image

OPSET = 18


def export_module(module: torch.nn.Module, spec: ComponentSpec, path: Path, batch: int = 2) -> Path:
    """Trace ``module`` with example inputs of ``spec`` and write ONNX with a dynamic batch axis: the
    graph in ``path``, the weights in ``path`` + ``.data`` (``store_weights_externally``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    example = tuple(t.example(batch) for t in spec.inputs)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer notes on diffusers' shape asserts; parity tests check results
        torch.onnx.export(module.eval(), example, str(path), input_names=[t.name for t in spec.inputs],
                          output_names=[t.name for t in spec.outputs], dynamic_axes=spec.dynamic_axes(),
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    import onnx

    store_weights_externally(path)
    onnx.checker.check_model(str(path))  # by path: checks models of any size, external data included
    return path


def parity(module: torch.nn.Module, spec: ComponentSpec, path: Path, inputs: dict[str, torch.Tensor]) -> float:
    """Max abs difference between the PyTorch module and the ONNX file on the same inputs."""
    sess = onnx_session(path)
    with torch.no_grad():
        want = module(*[inputs[t.name] for t in spec.inputs]).float().numpy()
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    return float(np.abs(got - want).max())


def export_bundle(bundle, out: Path, inversion_batch: int = 10, tensorrt: bool = False, log=print,
                  fp8: bool = False, calibration_images: list[Path] | None = None,
                  calibration_steps: int = 20) -> dict:
    """Export UNet, VAE encoder/decoder and ArcFace of ``bundle`` into ``out`` (fp32 ONNX).

    Writes ``out/<component>/model.onnx`` and ``out/components.json`` (the specs + bundle info),
    which ``revpers repository`` reads. With ``tensorrt`` also builds engines (revpers.export.tensorrt_build).
    With ``fp8`` (needs ``tensorrt``) the UNet engine is built from an FP8-quantized copy
    (``unet/model.fp8.onnx``, NVIDIA ModelOpt) calibrated on UNet inputs recorded while the method
    runs on the faces of ``calibration_images`` (revpers.export.calibration).
    """
    if fp8 and not tensorrt:
        raise ValueError("fp8 is a TensorRT engine option: use it with tensorrt=True (--tensorrt --fp8)")

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = TorchModels.load(bundle, device="cpu", unet_dtype=torch.float32)
    specs = [s for s in specs_from_bundle(bundle, inversion_batch) if s.name != "arcface"]  # ArcFace: copied
    modules = {"unet": models.unet, "vae_encoder": models.vae_encoder, "vae_decoder": models.vae_decoder}
    record = {"bundle": {**bundle.describe(), "path": str(bundle.root)},  # `revpers repository` reads the path
              "opset": OPSET, "inversion_batch": inversion_batch, "components": {}}
    for spec in specs:
        t0 = time.perf_counter()
        path = export_module(modules[spec.name], spec, out / spec.name / "model.onnx")
        record["components"][spec.name] = {"spec": spec.to_dict(), "onnx": str(path.relative_to(out)),
                                           "export_seconds": round(time.perf_counter() - t0, 2)}
        size = sum(f.stat().st_size for f in onnx_files(path))
        log(f"exported {spec.name} -> {path} (+ weights, {size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f} s)")
    dst = out / "arcface" / "model.onnx"
    spec = copy_recognizer(bundle, dst)
    record["components"]["arcface"] = {"spec": spec.to_dict(), "onnx": str(dst.relative_to(out)), "export_seconds": 0}
    log(f"copied recognizer {bundle.faces['recognizer']} -> {dst}")
    if fp8:

        if not calibration_images:
            calibration_images = demo_photos()
        crops, ids = calibration_faces(bundle, [read_image(p) for p in calibration_images])
        data = capture_unet_inputs(models, crops, ids, Params(steps=calibration_steps), bundle.native_size,
                                   inversion_batch=inversion_batch)
        fp8_path = quantize_unet_fp8(out / record["components"]["unet"]["onnx"], data, out / "unet" / "model.fp8.onnx")
        record["components"]["unet"]["onnx_fp8"] = str(fp8_path.relative_to(out))
        record["fp8"] = {"calibration_faces": len(crops), "calibration_samples": int(data["sample"].shape[0]),
                         "calibration_images": [str(p) for p in calibration_images], "steps": calibration_steps}
        log(f"FP8 UNet ({len(crops)} calibration faces, {data['sample'].shape[0]} UNet samples) -> {fp8_path}")
    if tensorrt:
        record["engines"] = build_engines(out, record, log=log)
    (out / ARTIFACTS_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return record
