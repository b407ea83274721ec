"""`revpers repository`: a Triton model repository from exported artifacts, for a backend target.

tensorrt     components as ``platform: "tensorrt_plan"`` (engines from ``revpers export --tensorrt``),
             for NVIDIA's Triton container on a GPU;
onnxruntime  the same components as Python-backend models running the ONNX files with ONNX Runtime:
             what runs on a plain pip install (nvidia-pytriton's tritonserver) and in CI.
The BLS model `revpers` is the same for both.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from export.components import ComponentSpec
from export.onnx_export import load_artifacts
from export.triton_config import bls_config, component_config

SOURCE = Path(__file__).resolve().parent.parent / "model_repository"


def build_repository(artifacts: Path, out: Path, backend: str, bundle: str | Path | None = None,
                     bls_instances: int = 2, inversion_batch: int = 10, force: bool = False) -> Path:
    artifacts, out = Path(artifacts).resolve(), Path(out).resolve()
    record = load_artifacts(artifacts)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = backend == "tensorrt"
    for name, comp in record["components"].items():
        spec = ComponentSpec.from_dict(comp["spec"])
        version = out / name / "1"
        version.mkdir(parents=True)
        if backend == "tensorrt":
            engine = (record.get("engines") or {}).get(name)
            if not engine:
                raise FileNotFoundError(f"no TensorRT engine for {name} in {artifacts}; "
                                        "run `revpers export --tensorrt` on the GPU machine that will serve it")
            shutil.copyfile(artifacts / engine, version / "model.plan")
        else:
            _link_or_copy(artifacts / comp["onnx"], version / "model.onnx")
            shutil.copyfile(SOURCE / "_onnxruntime_component" / "model.py", version / "model.py")
        (out / name / "config.pbtxt").write_text(component_config(spec, backend, gpu=gpu))
    bundle_path = Path(bundle).resolve() if bundle else Path(record["bundle"]["path"])
    (out / "revpers" / "1").mkdir(parents=True)
    shutil.copyfile(SOURCE / "revpers" / "1" / "model.py", out / "revpers" / "1" / "model.py")
    (out / "revpers" / "config.pbtxt").write_text(bls_config(str(bundle_path), bls_instances, inversion_batch, gpu))
    return out


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)
