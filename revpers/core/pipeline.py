"""The reverse-personalization pipeline over any set of components (in process or on Triton).

``run_faces`` is the whole method for a batch of aligned face crops: VAE encode, guided inversion
(its UNet calls batched across timesteps), generation with the identity in the cond branch and the
optional attribute prompt in the uncond branch, VAE decode. It only needs ``Components``: the
in-process pipeline gives PyTorch modules, the Triton BLS model gives served ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np
import torch

from revpers.core import sampling
from revpers.core.conditioning import TextEmbedding, generation_branches, inversion_branches
from revpers.core.errors import Cancelled
from revpers.core.params import Params
from revpers.core.schedule import NoiseSchedule, timesteps


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


def run_faces(
    models: Components,
    crops: list[np.ndarray],
    identities: np.ndarray | torch.Tensor,
    params: Params,
    native_size: int,
    *,
    inversion_batch: int = 10,
    timings: Timings | None = None,
    seeds: list[int] | None = None,
    reconstruct: bool = False,
    cancelled: Callable[[], bool] | None = None,
) -> FaceBatchResult:
    """Anonymize F aligned face crops (same size, multiple of 8) in one batch.

    identities: (F, E) ArcFace embeddings of the crops. Face f's noise is drawn from seed
    ``params.seed + f`` unless ``seeds`` is given. With ``reconstruct`` the generation uses the
    inversion's own conditioning (the fidelity check) instead of the anonymizing one.
    ``cancelled`` is polled before every UNet call; when it returns True the work stops there
    with ``Cancelled`` (a client that went away or a passed deadline costs at most one more call).
    """
    timings = timings if timings is not None else Timings()
    if not crops:
        raise ValueError("no faces to process")
    h, w = crops[0].shape[:2]
    if any(c.shape[:2] != (h, w) for c in crops) or h % 8 or w % 8:
        raise ValueError("crops must share one size, a multiple of 8")
    faces = len(crops)
    denoise = models.denoise
    if cancelled is not None:

        def denoise(x, t, cond):
            if cancelled():
                raise Cancelled("request cancelled; stopped before the next UNet call")
            return models.denoise(x, t, cond)

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
        x_T, zs = sampling.invert(
            denoise, x0, ts, models.schedule, inv_u, inv_c, params.guidance, noise, batch_steps=inversion_batch
        )
    if reconstruct:
        gen_u, gen_c = inv_u, inv_c
    else:
        gen_u, gen_c = generation_branches(empty, identity, (native_size, native_size), params.ip_scale, prompt)
    with _Timer(timings, "generation", device):
        x = sampling.generate(denoise, x_T, zs, ts, models.schedule, gen_u, gen_c, params.guidance)
    with _Timer(timings, "vae_decode", device):
        images = from_model_images(models.decode(x).cpu())
    return FaceBatchResult(images, x0, x)


class count_unet_calls:
    """Counts the UNet calls a ``pipeline.Components`` object gets while the block runs (its
    ``denoise`` is wrapped for the block, then restored): ``batches`` holds the batch of each call,
    ``as_dict()`` the totals. The wrapper costs one Python call and a list append per UNet call."""

    def __init__(self, models):
        self.models, self.batches = models, []

    def __enter__(self):
        inner = self.models.denoise

        def denoise(x, t, cond):
            self.batches.append(int(x.shape[0]))
            return inner(x, t, cond)

        self.models.denoise = denoise  # an instance attribute shadows the method until __exit__
        return self

    def __exit__(self, *exc):
        del self.models.denoise

    @property
    def calls(self) -> int:
        return len(self.batches)

    @property
    def samples(self) -> int:
        return sum(self.batches)

    def as_dict(self) -> dict:
        by_batch: dict[str, int] = {}
        for b in self.batches:
            by_batch[str(b)] = by_batch.get(str(b), 0) + 1
        return {"calls": self.calls, "samples": self.samples, "by_batch": by_batch}
