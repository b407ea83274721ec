"""ONNX export of the bundle's components, driven by their ComponentSpecs, plus parity checks."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .components import ComponentSpec, arcface_spec, specs_from_bundle

OPSET = 18
ARTIFACTS_MANIFEST = "components.json"
EXTERNAL_DATA_SUFFIX = ".data"  # model.onnx -> model.onnx.data beside it


def external_data_files(path: Path) -> list[Path]:
    """The external-data files an ONNX file references (paths beside it), in first-use order."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    seen: dict[str, None] = {}
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            seen.setdefault(ExternalDataInfo(tensor).location, None)
    return [Path(path).parent / loc for loc in seen]


def store_weights_externally(path: Path) -> Path:
    """Move every weight of the ONNX file at ``path`` into one file ``<name>.data`` beside it.

    An SDXL UNet is 10 GB in fp32, past protobuf's 2 GB limit: the exporter then writes one file per
    tensor (hundreds, named after the tensors), which Triton's model folders and copies handle badly.
    Every exported component is written the same way whatever its size (graph in ``model.onnx``,
    weights in ``model.onnx.data``), so the small models of the tests take the path large ones need.
    Returns the data file.
    """
    import onnx

    path = Path(path)
    scattered = external_data_files(path)
    model = onnx.load(str(path))  # with its weights, wherever they are
    data = path.with_name(path.name + EXTERNAL_DATA_SUFFIX)
    data.unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=0)
    for f in scattered:
        if f != data:
            f.unlink(missing_ok=True)
    return data


def onnx_files(path: Path) -> list[Path]:
    """An ONNX file and the external-data files it needs: what must travel together."""
    return [Path(path), *external_data_files(path)]


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


def onnx_session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


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
    which ``revpers repository`` reads. With ``tensorrt`` also builds engines (export.tensorrt_build).
    With ``fp8`` (needs ``tensorrt``) the UNet engine is built from an FP8-quantized copy
    (``unet/model.fp8.onnx``, NVIDIA ModelOpt) calibrated on UNet inputs recorded while the method
    runs on the faces of ``calibration_images`` (export.calibration).
    """
    if fp8 and not tensorrt:
        raise ValueError("fp8 is a TensorRT engine option: use it with tensorrt=True (--tensorrt --fp8)")
    from revpers.models import TorchModels

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    models = TorchModels.load(bundle, device="cpu", unet_dtype=torch.float32)
    specs = [s for s in specs_from_bundle(bundle, inversion_batch) if s.name != "arcface"]  # ArcFace: copied
    modules = {"unet": models.unet, "vae_encoder": models.vae_encoder, "vae_decoder": models.vae_decoder}
    record = {"bundle": bundle.describe(), "opset": OPSET, "components": {}}
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
        from revpers.images import read_image
        from revpers.pipeline import Params

        from .calibration import calibration_faces, capture_unet_inputs, quantize_unet_fp8

        if not calibration_images:
            from revpers.demo import demo_photos

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
        from .tensorrt_build import build_engines

        record["engines"] = build_engines(out, record, log=log)
    (out / ARTIFACTS_MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return record


def copy_recognizer(bundle, dst: Path) -> ComponentSpec:
    """The bundle's ArcFace ONNX file as the `arcface` component (spec's input/output names)."""
    spec = arcface_spec(bundle.embedding_dim)
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundle.path(bundle.faces["recognizer"]), dst)
    rename_io(dst, spec)
    return spec


def rename_io(path: Path, spec: ComponentSpec) -> None:
    """Give an ONNX file the spec's input/output names (ArcFace files use arbitrary ones)."""
    import onnx

    model = onnx.load(str(path))
    renames = {}
    for vi, t in zip(model.graph.input, spec.inputs):
        renames[vi.name] = t.name
    for vi, t in zip(model.graph.output, spec.outputs):
        renames[vi.name] = t.name
    if all(k == v for k, v in renames.items()):
        return
    for node in model.graph.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        node.output[:] = [renames.get(n, n) for n in node.output]
    for vi in list(model.graph.input) + list(model.graph.output):
        vi.name = renames.get(vi.name, vi.name)
    onnx.save(model, str(path))


def load_artifacts(path: Path) -> dict:
    path = Path(path)
    f = path / ARTIFACTS_MANIFEST
    if not f.is_file():
        raise FileNotFoundError(f"{path} holds no exported components ({ARTIFACTS_MANIFEST} missing); "
                                "run `revpers export --models BUNDLE --out DIR` first")
    return json.loads(f.read_text())
