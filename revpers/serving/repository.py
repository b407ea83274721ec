"""`revpers repository`: a Triton model repository for a backend target.

tensorrt     components as ``platform: "tensorrt_plan"`` (engines from ``revpers export --tensorrt``),
             for NVIDIA's Triton container on a GPU;
onnxruntime  the same components as Python-backend models running the exported ONNX files with ONNX
             Runtime: what runs on a plain pip install (nvidia-pytriton's tritonserver) and in CI;
pytorch      the UNet and VAE as Python-backend models running the bundle's PyTorch modules (fp32 on
             the CPU; fp16 UNet on CUDA with ``gpu``), ArcFace with ONNX Runtime: the GPU path where
             TensorRT is not installed.
             Needs only the bundle (no export step).
The BLS model `revpers` is the same for all three; its config carries each component's max
batch. Component models run on the GPU (KIND_GPU) when ``gpu`` is set (always for tensorrt; the
Python-backend ones then take GPU input tensors as they are), else on the CPU; ``component_instances`` copies of each
(on a CPU with single-threaded sessions, more copies let several requests' batches run at once).
"""

from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from revpers.core.errors import ParameterError
from revpers.models.artifacts import copy_recognizer, external_data_files, load_artifacts
from revpers.models.bundle import load_bundle
from revpers.models.components import ComponentSpec, specs_from_bundle
from revpers.service.request import Limits
from revpers.serving.triton_config import bls_config, component_config

TEMPLATES = resources.files("revpers.serving") / "model_repository"  # package data: works from a wheel
BACKENDS = ("tensorrt", "onnxruntime", "pytorch")


def build_repository(
    artifacts: Path | None,
    out: Path,
    backend: str,
    bundle: str | Path | None = None,
    bls_instances: int = 2,
    inversion_batch: int | None = None,
    force: bool = False,
    bls_threads: int = 8,
    gpu: bool | None = None,
    torch_compile: bool = False,
    component_instances: int = 1,
    limits: Limits | None = None,
) -> Path:
    """``inversion_batch``: timesteps per inversion UNet call. With artifacts it is the exported one
    (the UNet's max batch and TensorRT profile were built for it; a different value is refused);
    the pytorch target without artifacts takes it from here (default 10). ``limits``: what one
    request may cost, written into the BLS config (default: ``Limits()``, the safe defaults)."""
    if backend not in BACKENDS:
        raise ParameterError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
    out = Path(out).resolve()
    specs, record, bundle_path, inversion_batch = _components(artifacts, backend, bundle, inversion_batch)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty (use --force to replace it)")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = backend == "tensorrt" if gpu is None else (gpu or backend == "tensorrt")
    for name, spec in specs.items():
        params = _component_files(name, backend, out / name / "1", artifacts, record, bundle_path, torch_compile)
        if params is not None and gpu:  # Python-backend components take their inputs where the BLS has them
            params["FORCE_CPU_ONLY_INPUT_TENSORS"] = "no"
        (out / name / "config.pbtxt").write_text(
            component_config(spec, backend, instances=component_instances, gpu=gpu, parameters=params)
        )
    (out / "revpers" / "1").mkdir(parents=True)
    _copy_template("revpers", out / "revpers" / "1")
    (out / "revpers" / "config.pbtxt").write_text(
        bls_config(
            str(bundle_path),
            bls_instances,
            inversion_batch,
            gpu,
            threads=bls_threads,
            max_batch={n: s.max_batch for n, s in specs.items()},
            limits=(limits or Limits()).as_parameters(),
        )
    )
    return out


def _components(artifacts, backend: str, bundle, inversion_batch):
    """The component specs, the artifact record (None for the pytorch target without artifacts),
    the bundle path the server will read, and the inversion batch."""
    if backend == "pytorch" and artifacts is None:
        if bundle is None:
            raise ParameterError("the pytorch target needs the bundle (--models)")
        bundle_path = Path(bundle).resolve()
        inversion_batch = inversion_batch or 10
        return (
            {s.name: s for s in specs_from_bundle(load_bundle(bundle_path), inversion_batch)},
            None,
            bundle_path,
            inversion_batch,
        )
    if artifacts is None:
        raise ParameterError(f"the {backend} target needs exported artifacts (--artifacts)")
    record = load_artifacts(Path(artifacts).resolve())
    if "inversion_batch" not in record or "bundle_path" not in record:
        raise ParameterError(
            f"{artifacts} was exported by an older revpers (its record lacks the inversion batch or "
            "the bundle path); export it again with `revpers export`"
        )
    exported = int(record["inversion_batch"])
    if inversion_batch not in (None, exported):
        raise ParameterError(
            f"inversion batch {inversion_batch} differs from the exported one ({exported}); "
            f"re-export with --inversion-batch {inversion_batch} or leave it out here"
        )
    specs = {name: ComponentSpec.from_dict(c["spec"]) for name, c in record["components"].items()}
    return specs, record, Path(bundle).resolve() if bundle else Path(record["bundle_path"]), exported


def _component_files(
    name: str, backend: str, version: Path, artifacts, record, bundle_path: Path, torch_compile: bool
) -> dict | None:
    """Write one component's version folder; returns its config parameters (None for an engine)."""
    version.mkdir(parents=True)
    if backend == "tensorrt":
        engine = (record.get("engines") or {}).get(name)
        if not engine:
            raise FileNotFoundError(
                f"no TensorRT engine for {name} in {artifacts}; "
                "run `revpers export --tensorrt` on the GPU machine that will serve it"
            )
        _link_or_copy(Path(artifacts).resolve() / engine, version / "model.plan")
        return None
    if backend == "pytorch" and name != "arcface":
        _copy_template("_python_component", version)
        return {"runtime": "pytorch", "bundle": str(bundle_path), "torch_compile": "yes" if torch_compile else "no"}
    # onnxruntime components, and ArcFace (an ONNX file in every bundle) for the pytorch target
    if record is not None:
        _link_onnx(Path(artifacts).resolve() / record["components"][name]["onnx"], version / "model.onnx")
    else:
        copy_recognizer(load_bundle(bundle_path), version / "model.onnx")
    _copy_template("_python_component", version)
    return {"runtime": "onnxruntime"}


def _link_onnx(src: Path, dst: Path) -> None:
    """An exported ONNX file into a model version folder as ``dst``, with the external-weight files
    it refers to (by their paths relative to it, so those keep their names)."""
    _link_or_copy(src, dst)
    for f in external_data_files(src):
        target = dst.parent / f.relative_to(src.parent)
        target.parent.mkdir(parents=True, exist_ok=True)
        _link_or_copy(f, target)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        dst.hardlink_to(src)
    except OSError:
        shutil.copyfile(src, dst)


def _copy_template(name: str, version_dir: Path) -> None:
    """A Triton model template (``model.py``) shipped with the package, into a version folder."""
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / "model.py").write_bytes(TEMPLATES.joinpath(name, "model.py").read_bytes())
