"""ONNX -> TensorRT engines with polygraphy, profiles from the ComponentSpecs.

Runs where TensorRT and polygraphy import (NVIDIA GPU machines; `pip install 'revpers[tensorrt]'`).
UNet: fp16, one optimisation profile from batch 1 to the spec's max batch (2 x inversion_batch x 4
faces), optimised at one face's inversion call (2 x inversion_batch); VAE and ArcFace: fp32 (SDXL's VAE
overflows in fp16). A timing cache is kept beside the engines so rebuilds are fast. With
``revpers export --tensorrt --fp8`` the UNet engine is built from the ModelOpt FP8-quantized ONNX
(explicit Q/DQ, revpers.export.calibration) with FP8 and fp16 enabled; that needs an FP8-capable GPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from revpers.models.artifacts import onnx_session
from revpers.models.components import ComponentSpec
from revpers.core.errors import DependencyError


def _require():
    try:
        import tensorrt  # noqa: F401
        from polygraphy.backend import trt  # noqa: F401
    except ImportError as exc:
        raise DependencyError("TensorRT engine build needs `tensorrt` and `polygraphy` "
                           "(pip install 'revpers[tensorrt]' on a machine with an NVIDIA GPU)") from exc


def build_engine(onnx_path: Path, spec: ComponentSpec, engine_path: Path, timing_cache: Path,
                 fp8: bool = False) -> Path:
    _require()
    from polygraphy.backend.trt import CreateConfig, Profile, engine_from_network, network_from_onnx_path, save_engine

    profile = Profile()
    for t in spec.inputs:
        lo, opt, hi = spec.profile(t.name)
        profile.add(t.name, min=lo, opt=opt, max=hi)
    extra = {"fp8": True} if fp8 else {}
    config = CreateConfig(fp16=spec.precision == "fp16" or fp8, tf32=True, profiles=[profile], **extra,
                          load_timing_cache=str(timing_cache) if timing_cache.exists() else None,
                          builder_optimization_level=3)
    network = network_from_onnx_path(str(onnx_path))
    engine = engine_from_network(network, config=config, save_timing_cache=str(timing_cache))
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    save_engine(engine, path=str(engine_path))
    return engine_path


def build_engines(artifacts: Path, record: dict, log=print) -> dict[str, str]:
    """Build one engine per exported component; returns {name: engine path relative to artifacts}."""
    _require()
    artifacts = Path(artifacts)
    out = {}
    for name, comp in record["components"].items():
        spec = ComponentSpec.from_dict(comp["spec"])
        engine = artifacts / name / "model.plan"
        fp8 = "onnx_fp8" in comp
        build_engine(artifacts / comp.get("onnx_fp8", comp["onnx"]), spec, engine, artifacts / "timing.cache", fp8=fp8)
        out[name] = str(engine.relative_to(artifacts))
        log(f"built TensorRT engine {engine} ({'fp8' if fp8 else spec.precision})")
    return out


def engine_parity(engine_path: Path, onnx_path: Path, inputs: dict[str, np.ndarray]) -> float:
    """Max abs difference between a TensorRT engine and its ONNX file (ONNX Runtime) on ``inputs``."""
    _require()
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    want = onnx_session(onnx_path).run(None, inputs)[0]
    with TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path)))) as runner:
        got = next(iter(runner.infer(feed_dict=inputs).values()))
    return float(np.abs(np.asarray(got, dtype=np.float32) - want).max())

