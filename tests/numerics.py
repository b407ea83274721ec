"""Tolerances derived from the computation, on the running machine, for tests that compare two
ways of computing the method that cannot be bit-equal (different kernels or batch compositions).

``ProbeComponents`` wraps reference components (``pipeline.Components``) and, on the pipeline's own
inputs, either measures each component's largest difference against another way of computing it
(``other``), or moves every output element of every call by +-that amount (``perturb``; signs from a
seeded generator). Running the method once perturbed shows how far it carries errors of the size
measured: the bound for the two ways' outputs is a stated multiple of that, so it holds on any CPU
whose kernels err by what they err by there, and a real change (a wrong feed, seed or identity)
still lies far beyond it.
"""

from __future__ import annotations

from typing import Callable

import torch

COMPONENTS = ("unet", "vae_encoder", "vae_decoder")


class ProbeComponents:
    def __init__(
        self,
        reference,
        other: Callable[..., torch.Tensor] | None = None,
        perturb: dict[str, float] | None = None,
        seed: int = 0,
    ):
        """``other(name, **inputs)``: the other way's output of component ``name`` (inputs by the
        served tensor names: sample, timestep, text, ... / image / latent)."""
        self.reference, self.other, self.perturb = reference, other, perturb
        self.schedule, self.text = reference.schedule, reference.text
        self.math_device = getattr(reference, "math_device", "cpu")
        self.error = dict.fromkeys(COMPONENTS, 0.0)
        self.gen = torch.Generator().manual_seed(seed)

    def _out(self, name: str, got: torch.Tensor, **inputs) -> torch.Tensor:
        if self.other is not None:
            self.error[name] = max(self.error[name], float((self.other(name, **inputs) - got).abs().max()))
        if self.perturb is not None:
            signs = torch.randint(0, 2, got.shape, generator=self.gen).to(got.dtype) * 2 - 1
            got = got + self.perturb[name] * signs
        return got

    def denoise(self, x, t, cond):
        return self._out("unet", self.reference.denoise(x, t, cond), **cond, sample=x, timestep=t.to(torch.int64))

    def encode(self, images):
        return self._out("vae_encoder", self.reference.encode(images), image=images)

    def decode(self, latents):
        return self._out("vae_decoder", self.reference.decode(latents), latent=latents)


def each_sample_alone(models) -> Callable[..., torch.Tensor]:
    """``other`` for ProbeComponents: the same components, one sample per call (the difference is
    then what the batch composition alone changes)."""

    def other(name, **inputs):
        n = next(v.shape[0] for v in inputs.values() if v.ndim)
        rows = [{k: v[i : i + 1] if v.ndim and v.shape[0] == n else v for k, v in inputs.items()} for i in range(n)]
        if name == "unet":
            outs = [models.denoise(r.pop("sample"), r.pop("timestep"), r) for r in rows]
        elif name == "vae_encoder":
            outs = [models.encode(r["image"]) for r in rows]
        else:
            outs = [models.decode(r["latent"]) for r in rows]
        return torch.cat(outs)

    return other
