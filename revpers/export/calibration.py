"""FP8 for the UNet: calibration inputs captured from the real pipeline, NVIDIA ModelOpt's ONNX
post-training quantization, then a TensorRT engine with FP8 enabled.

Calibration data must look like what the served UNet sees, so it is recorded, not invented: the
in-process pipeline runs the method (inversion and generation, both CFG branches) on calibration
faces and every UNet call's inputs are kept (``capture_unet_inputs``). This part runs anywhere (it
is tested on the CPU with a smoke bundle). ``quantize_unet_fp8`` needs ``nvidia-modelopt`` and the
engine build needs TensorRT and an FP8-capable GPU (Ada/Hopper or newer); both fail with a clear
message elsewhere. FP8 is opt-in (``revpers export --tensorrt --fp8``): its effect on the
anonymization metrics must be checked with real weights before it is served.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from revpers.core.pipeline import run_faces
from revpers.faces import align_face, identities_of_crops, load_face_analyzer
from revpers.core.errors import DependencyError, InputError, ParameterError

UNET_FEEDS = ("sample", "timestep", "text", "pooled", "time_ids", "identity", "ip_scale")


class RecordingDenoiser:
    """Wraps ``models.denoise``; keeps every call's UNet inputs (as the exported graph takes them)."""

    def __init__(self, models, max_samples: int):
        self.models, self.max_samples = models, max_samples
        self.calls: list[dict[str, np.ndarray]] = []
        self.samples = 0

    def __getattr__(self, name):  # schedule, text, encode, decode, math_device: the wrapped ones
        return getattr(self.models, name)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        if self.samples < self.max_samples:
            call = {"sample": x, "timestep": t.to(torch.int64), **{k: cond[k] for k in UNET_FEEDS[2:]}}
            self.calls.append({k: v.detach().float().cpu().numpy() if k != "timestep" else v.cpu().numpy()
                               for k, v in call.items()})
            self.samples += x.shape[0]
        return self.models.denoise(x, t, cond)


def capture_unet_inputs(models, crops: list[np.ndarray], identities: np.ndarray, params, native_size: int,
                        max_samples: int = 64, inversion_batch: int = 10) -> dict[str, np.ndarray]:
    """Run the method on aligned ``crops`` and return up to ``max_samples`` UNet input rows
    ({input name: (N, ...) array}), from inversion and generation calls alike."""
    recorder = RecordingDenoiser(models, max_samples)
    run_faces(recorder, crops, identities, params, native_size, inversion_batch=inversion_batch)
    if not recorder.calls:
        raise ParameterError("the pipeline made no UNet call; nothing to calibrate with")
    data = {k: np.concatenate([c[k] for c in recorder.calls], axis=0)[:max_samples] for k in UNET_FEEDS}
    data["timestep"] = data["timestep"].astype(np.int64).reshape(-1)
    data["ip_scale"] = data["ip_scale"].astype(np.float32).reshape(-1)
    return data


def calibration_faces(bundle, images: list[np.ndarray], analyzer=None) -> tuple[list[np.ndarray], np.ndarray]:
    """Aligned native-size crops and ArcFace identities of every face found in ``images``."""
    analyzer = analyzer or load_face_analyzer(bundle.faces, bundle.root)
    crops = [align_face(rgb, face.kps, bundle.native_size)[0] for rgb in images for face in analyzer.detect(rgb)]
    if not crops:
        raise InputError("no face found in the calibration images")
    return crops, identities_of_crops(analyzer, crops)[0]


def quantize_unet_fp8(onnx_path: Path, calibration: dict[str, np.ndarray], out_path: Path) -> Path:
    """ModelOpt ONNX PTQ in FP8 (QDQ nodes for TensorRT's explicit quantization), fp16 elsewhere."""
    try:
        from modelopt.onnx.quantization import quantize
    except ImportError as exc:
        raise DependencyError("FP8 needs NVIDIA ModelOpt: pip install 'nvidia-modelopt[onnx]' "
                           "(on the GPU machine that builds the engines)") from exc
    out_path.parent.mkdir(parents=True, exist_ok=True)
    quantize(onnx_path=str(onnx_path), quantize_mode="fp8", calibration_data=calibration,
             calibration_method="max", output_path=str(out_path), high_precision_dtype="fp16")
    return out_path
