"""The reverse-personalization pipeline over any set of components (in process or on Triton).

``run_faces`` is the whole method for a batch of aligned face crops: VAE encode, guided inversion
(its UNet calls batched across timesteps), generation with the identity in the cond branch and the
optional attribute prompt in the uncond branch, VAE decode. It only needs ``Components``: the
in-process pipeline gives PyTorch modules, the Triton BLS model gives served ones.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np
import torch

from . import sampling
from .conditioning import TextEmbedding, generation_branches, inversion_branches
from .schedule import NoiseSchedule, timesteps


class ParameterError(ValueError):
    """A request parameter is missing, of the wrong type or out of range (message says which)."""


def given_values(values: dict, known, what: str = "parameter(s)") -> dict:
    """The entries of untrusted ``values`` that are set (not None), after refusing any key not in
    ``known`` with a ParameterError naming them (``what``: how to call them)."""
    unknown = set(values) - set(known)
    if unknown:
        raise ParameterError(f"unknown {what}: {', '.join(sorted(unknown))}")
    return {k: v for k, v in values.items() if v is not None}


def coerce_number(name: str, raw, kind: type) -> int | float:
    """An int or float parameter from untrusted input (JSON numbers or numeric strings). Booleans,
    non-integral values for integers and non-finite values are refused with a ParameterError."""
    what = "an integer" if kind is int else "a number"
    if isinstance(raw, bool) or (kind is int and isinstance(raw, float) and not raw.is_integer()):
        raise ParameterError(f"{name} must be {what}, got {raw!r}")
    try:
        value = kind(raw) if not isinstance(raw, str) else kind(float(raw) if kind is float else int(raw))
    except (TypeError, ValueError):
        raise ParameterError(f"{name} must be {what}, got {raw!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ParameterError(f"{name} must be finite, got {raw!r}")
    return value


@dataclass(frozen=True)
class Params:
    """Method parameters; defaults are algorithm.md's."""

    guidance: float = -10.0
    ip_scale: float = 1.0
    id_scale: float = 1.0
    steps: int = 100
    skip: float = 0.7
    seed: int = 0
    prompt: str | None = None

    LIMITS = {"guidance": (-50.0, 50.0), "ip_scale": (0.0, 5.0), "id_scale": (0.0, 5.0), "steps": (1, 1000),
              "skip": (0.0, 0.99), "seed": (0, 2**63 - 1)}

    @classmethod
    def from_mapping(cls, values: dict) -> "Params":
        """Validated construction from untrusted input (CLI, JSON, Triton request)."""
        kwargs = {}
        for name, raw in given_values(values, cls.__dataclass_fields__).items():
            default = cls.__dataclass_fields__[name].default
            if name == "prompt":
                if not isinstance(raw, str):
                    raise ParameterError(f"prompt must be a string, got {type(raw).__name__}")
                if len(raw) > 1000:
                    raise ParameterError("prompt is longer than 1000 characters")
                kwargs[name] = raw.strip() or None
                continue
            value = coerce_number(name, raw, type(default))
            lo, hi = cls.LIMITS[name]
            if not lo <= value <= hi:
                raise ParameterError(f"{name}={value} is out of range [{lo}, {hi}]")
            kwargs[name] = value
        params = cls(**kwargs)
        try:
            timesteps(params.steps, params.skip)
        except ValueError as exc:
            raise ParameterError(str(exc)) from None
        return params

    def as_dict(self) -> dict:
        return asdict(self)


class Components(Protocol):
    """What ``run_faces`` needs. Tensors are float32; the latents and conditioning live on the
    components' ``math_device`` (``"cpu"`` when absent), so on a GPU nothing leaves the device
    between UNet calls."""

    schedule: NoiseSchedule
    math_device: str

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor: ...
    def encode(self, images: torch.Tensor) -> torch.Tensor: ...
    def decode(self, latents: torch.Tensor) -> torch.Tensor: ...
    def text(self, prompt: str) -> TextEmbedding: ...


@dataclass
class Timings:
    stages: dict[str, float] = field(default_factory=dict)

    def add(self, stage: str, seconds: float) -> None:
        self.stages[stage] = self.stages.get(stage, 0.0) + seconds

    def as_ms(self) -> dict[str, float]:
        return {k: round(v * 1000.0, 3) for k, v in self.stages.items()}


class _Timer:
    """Wall time of a stage; on CUDA it waits for the device at both ends, so a stage's queued
    kernels are counted in that stage and not in the next one that reads a result back."""

    def __init__(self, timings: Timings, stage: str, device: torch.device | None = None):
        self.timings, self.stage = timings, stage
        self.cuda = device is not None and device.type == "cuda"
        self.device = device

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.timings.add(self.stage, time.perf_counter() - self.t0)


def to_model_images(crops: list[np.ndarray]) -> torch.Tensor:
    """(H,W,3) uint8 RGB crops (all the same size) -> (F,3,H,W) float32 in [-1,1]."""
    arr = np.stack([np.asarray(c, dtype=np.uint8) for c in crops]).astype(np.float32)
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous() / 127.5 - 1.0


def from_model_images(images: torch.Tensor) -> list[np.ndarray]:
    """(F,3,H,W) in [-1,1] -> list of (H,W,3) uint8, rounded like diffusers' postprocess."""
    arr = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [np.ascontiguousarray(a) for a in arr]


@dataclass
class FaceBatchResult:
    images: list[np.ndarray]
    x0: torch.Tensor
    x_out: torch.Tensor


def run_faces(models: Components, crops: list[np.ndarray], identities: np.ndarray | torch.Tensor, params: Params,
              native_size: int, *, inversion_batch: int = 10, timings: Timings | None = None,
              seeds: list[int] | None = None, reconstruct: bool = False) -> FaceBatchResult:
    """Anonymize F aligned face crops (same size, multiple of 8) in one batch.

    identities: (F, E) ArcFace embeddings of the crops. Face f's noise is drawn from seed
    ``params.seed + f`` unless ``seeds`` is given. With ``reconstruct`` the generation uses the
    inversion's own conditioning (the fidelity check) instead of the anonymizing one.
    """
    timings = timings if timings is not None else Timings()
    if not crops:
        raise ValueError("no faces to process")
    h, w = crops[0].shape[:2]
    if any(c.shape[:2] != (h, w) for c in crops) or h % 8 or w % 8:
        raise ValueError("crops must share one size, a multiple of 8")
    faces = len(crops)
    device = torch.device(getattr(models, "math_device", None) or "cpu")
    identity = torch.as_tensor(np.asarray(identities, dtype=np.float32)).reshape(faces, -1).to(device)
    identity = identity * params.id_scale
    ts = timesteps(params.steps, params.skip, models.schedule.num_train_timesteps)
    seeds = seeds if seeds is not None else [params.seed + f for f in range(faces)]

    with _Timer(timings, "prompt_encode", device):
        empty = models.text("").to(device)
        prompt = models.text(params.prompt).to(device) if params.prompt else None
    with _Timer(timings, "vae_encode", device):
        x0 = models.encode(to_model_images(crops).to(device))
    noise = [n.to(device) for n in sampling.draw_noise(x0.shape, seeds, ts)]
    inv_u, inv_c = inversion_branches(empty, faces, identity.shape[1], (h, w), params.ip_scale, device=device)
    with _Timer(timings, "inversion", device):
        x_T, zs = sampling.invert(models.denoise, x0, ts, models.schedule, inv_u, inv_c, params.guidance, noise,
                                  batch_steps=inversion_batch)
    if reconstruct:
        gen_u, gen_c = inv_u, inv_c
    else:
        gen_u, gen_c = generation_branches(empty, identity, (native_size, native_size), params.ip_scale, prompt)
    with _Timer(timings, "generation", device):
        x = sampling.generate(models.denoise, x_T, zs, ts, models.schedule, gen_u, gen_c, params.guidance)
    with _Timer(timings, "vae_decode", device):
        images = from_model_images(models.decode(x).cpu())
    return FaceBatchResult(images, x0, x)
