"""The noise schedule and timestep grid of reverse personalization (algorithm.md, "Noise schedule").

Everything is indexed by the integer training timestep t in [0, T). Coefficients are kept in
float64 so that the solver's arithmetic adds no error of its own; the cumulative product itself is
computed in float32 exactly as diffusers' schedulers do, so the numbers match SDXL's scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class NoiseSchedule:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log alpha_t - log sigma_t."""

    alphas_cumprod: np.ndarray  # float64, shape (T,)

    @classmethod
    def scaled_linear(
        cls, beta_start: float = 0.00085, beta_end: float = 0.012, num_train_timesteps: int = 1000
    ) -> "NoiseSchedule":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        abar = torch.cumprod(1.0 - betas, dim=0)
        return cls(abar.double().numpy())

    @classmethod
    def from_scheduler_config(cls, config: dict) -> "NoiseSchedule":
        """Build from a diffusers ``scheduler_config.json`` (SDXL: scaled_linear, 0.00085..0.012, 1000)."""
        kind = config.get("beta_schedule", "scaled_linear")
        if kind != "scaled_linear":
            raise ValueError(f"unsupported beta_schedule {kind!r}: reverse personalization uses SDXL's scaled_linear")
        pred = config.get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ValueError(f"unsupported prediction_type {pred!r}: the solver expects epsilon prediction")
        return cls.scaled_linear(
            float(config.get("beta_start", 0.00085)),
            float(config.get("beta_end", 0.012)),
            int(config.get("num_train_timesteps", 1000)),
        )

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha(self, t: int) -> float:
        return float(np.sqrt(self.alphas_cumprod[t]))

    def sigma(self, t: int) -> float:
        return float(np.sqrt(1.0 - self.alphas_cumprod[t]))

    def lam(self, t: int) -> float:
        return float(np.log(self.alpha(t)) - np.log(self.sigma(t)))


def timesteps(num_steps: int, skip: float, num_train_timesteps: int = 1000) -> list[int]:
    """``linspace(T - skip*T - 1, 1, N)`` cast to int64: for N=100, skip=0.7 -> 299, 295, 292, ..., 4, 1."""
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
        raise ValueError(f"steps must be a positive integer, got {num_steps!r}")
    if not 0.0 <= skip < 1.0:
        raise ValueError(f"skip must be in [0, 1), got {skip!r}")
    start = num_train_timesteps - skip * num_train_timesteps - 1
    if start < 1:
        raise ValueError(f"skip={skip} leaves no timesteps to run")
    ts = np.linspace(start, 1, int(num_steps)).astype(np.int64)
    if len(set(ts.tolist())) != len(ts):
        raise ValueError(f"steps={num_steps} with skip={skip} repeats timesteps; use fewer steps or a smaller skip")
    return [int(t) for t in ts]
