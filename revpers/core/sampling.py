"""The math core: SDE-DPM-Solver++(2M), edit-friendly inversion and generation (algorithm.md).

Every function here works over a ``denoise(x, t, cond) -> eps`` callable:

* ``x``     latents, shape (B, C, h, w);
* ``t``     integer timesteps, shape (B,) int64 (one per sample, so inversion steps batch);
* ``cond``  a dict of tensors whose first axis is B (text, pooled, time_ids, identity, ip_scale).

The in-process pipeline passes a PyTorch UNet, the Triton BLS model passes a function that calls
the served UNet; the arithmetic below is the same for both. Classifier-free guidance is always on
and its two branches always go to the denoiser in one call: ``[uncond..., cond...]``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from revpers.core.schedule import NoiseSchedule

Cond = Mapping[str, torch.Tensor]
Denoiser = Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor]


# ----------------------------------------------------------------------------------- guidance
def repeat_cond(cond: Cond, times: int) -> dict[str, torch.Tensor]:
    """Tile a per-face conditioning ``times`` times along the batch (time-major order)."""
    return {k: v.repeat((times,) + (1,) * (v.dim() - 1)) for k, v in cond.items()}


def concat_cond(a: Cond, b: Cond) -> dict[str, torch.Tensor]:
    if a.keys() != b.keys():
        raise ValueError(f"branches carry different inputs: {sorted(a)} vs {sorted(b)}")
    return {k: torch.cat([a[k], b[k]], dim=0) for k in a}


def guided_eps(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, branches: Cond, guidance: float) -> torch.Tensor:
    """eps = eps_uncond + w * (eps_cond - eps_uncond), both branches in one denoiser call.

    ``branches`` is ``concat_cond(uncond, cond)`` for this batch, built once per pass by the caller
    (the conditioning does not change between steps)."""
    n = x.shape[0]
    eps = denoise(torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), branches)
    eps_u, eps_c = eps[:n], eps[n:]
    return eps_u + guidance * (eps_c - eps_u)


# ------------------------------------------------------------------------------------- solver
def data_prediction(schedule: NoiseSchedule, x: torch.Tensor, eps: torch.Tensor, t: int) -> torch.Tensor:
    """x0_hat = (x_t - sigma_t eps) / alpha_t."""
    return (x - schedule.sigma(t) * eps) / schedule.alpha(t)


def sde_dpmpp_2m_step(
    schedule: NoiseSchedule,
    x_s: torch.Tensor,
    m0: torch.Tensor,
    s: int,
    t: int,
    m1: torch.Tensor | None = None,
    s_prev: int | None = None,
) -> tuple[torch.Tensor, float]:
    """One SDE-DPM-Solver++ step from timestep ``s`` to ``t`` (< s).

    Returns (mu, sigma_noise); the next sample is ``mu + sigma_noise * z``. First order when no
    previous data prediction ``m1`` is given, second order (midpoint) otherwise.
    """
    lam_s, lam_t = schedule.lam(s), schedule.lam(t)
    h = lam_t - lam_s
    alpha_t, sigma_t, sigma_s = schedule.alpha(t), schedule.sigma(t), schedule.sigma(s)
    decay = sigma_t / sigma_s * math.exp(-h)
    gain = alpha_t * -math.expm1(-2.0 * h)  # alpha_t (1 - e^{-2h})
    mu = decay * x_s + gain * m0
    if m1 is not None:
        if s_prev is None:
            raise ValueError("second-order step needs the previous timestep")
        r0 = (lam_s - schedule.lam(s_prev)) / h
        mu = mu + (0.5 * gain / r0) * (m0 - m1)
    sigma_noise = sigma_t * math.sqrt(-math.expm1(-2.0 * h))
    return mu, sigma_noise


# ---------------------------------------------------------------------------------- inversion
def draw_noise(
    shape: Sequence[int], seeds: Sequence[int], timesteps: Sequence[int], dtype: torch.dtype = torch.float32
) -> list[torch.Tensor]:
    """The forward-process noise of the inversion, one tensor per timestep in ``timesteps`` order.

    Each face f gets its own CPU generator seeded with ``seeds[f]``; it draws one (1, C, h, w)
    standard normal per timestep in order of increasing t (t = 1 first), so a face's noise does not
    depend on which other faces share its batch, and one face with ``seed`` reproduces the
    reference implementation's draws.
    """
    faces = shape[0]
    if len(seeds) != faces:
        raise ValueError(f"{faces} faces need {faces} seeds, got {len(seeds)}")
    per_face_shape = (1,) + tuple(shape[1:])
    order = sorted(range(len(timesteps)), key=lambda i: timesteps[i])  # increasing t
    drawn: list[list[torch.Tensor]] = [[None] * len(timesteps) for _ in range(faces)]  # type: ignore[list-item]
    for f, seed in enumerate(seeds):
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        for i in order:
            drawn[f][i] = torch.randn(per_face_shape, generator=gen, dtype=dtype)
    return [torch.cat([drawn[f][i] for f in range(faces)], dim=0) for i in range(len(timesteps))]


def invert(
    denoise: Denoiser,
    x0: torch.Tensor,
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    uncond: Cond,
    cond: Cond,
    guidance: float,
    noise: Sequence[torch.Tensor],
    batch_steps: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Edit-friendly DDPM inversion with guidance ("conditional inversion").

    x0: clean latents (F, C, h, w); timesteps in descending order; noise[i] is x0-shaped and
    belongs to timesteps[i]. Samples x_t = alpha_t x0 + sigma_t noise independently per t; all N
    guided denoiser calls are known up front and go ``batch_steps`` timesteps per call. Returns
    (x_T, zs) with zs in generation order, so that ``generate`` reproduces x0.
    """
    n = len(timesteps)
    if len(noise) != n:
        raise ValueError(f"need one noise tensor per timestep ({n}), got {len(noise)}")
    if batch_steps < 1:
        raise ValueError(f"batch_steps must be >= 1, got {batch_steps}")
    faces = x0.shape[0]
    xs = [schedule.alpha(t) * x0 + schedule.sigma(t) * noise[i].to(x0) for i, t in enumerate(timesteps)]

    eps: list[torch.Tensor] = []
    branches: dict[int, dict[str, torch.Tensor]] = {}  # per chunk length: at most two (full and last)
    for start in range(0, n, batch_steps):
        chunk = list(range(start, min(start + batch_steps, n)))
        x = torch.cat([xs[i] for i in chunk], dim=0)
        t = torch.tensor([timesteps[i] for i in chunk for _ in range(faces)], dtype=torch.int64, device=x0.device)
        if len(chunk) not in branches:
            branches[len(chunk)] = concat_cond(repeat_cond(uncond, len(chunk)), repeat_cond(cond, len(chunk)))
        e = guided_eps(denoise, x, t, branches[len(chunk)], guidance)
        eps.extend(e.split(faces, dim=0))
        if on_progress:
            on_progress(chunk[-1] + 1, n)

    zs: list[torch.Tensor] = []
    m_prev = None
    for i, s in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < n else 0
        target = xs[i + 1] if i + 1 < n else x0
        m0 = data_prediction(schedule, xs[i], eps[i], s)
        mu, sigma_noise = sde_dpmpp_2m_step(schedule, xs[i], m0, s, t_next, m_prev, timesteps[i - 1] if i > 0 else None)
        zs.append((target - mu) / sigma_noise)
        m_prev = m0
    return xs[0], zs


def generate(
    denoise: Denoiser,
    x_T: torch.Tensor,
    zs: Sequence[torch.Tensor],
    timesteps: Sequence[int],
    schedule: NoiseSchedule,
    uncond: Cond,
    cond: Cond,
    guidance: float,
    on_progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Run the solver from x_T with the inversion's noise maps as the step noise.

    The solver history starts fresh (first step first order). The reference implementation
    carries the last inversion prediction into the first generation step; that difference is tiny
    and deliberate (docs/algorithm.md).
    """
    n = len(timesteps)
    if len(zs) != n:
        raise ValueError(f"need one noise map per timestep ({n}), got {len(zs)}")
    x = x_T
    m_prev = None
    branches = concat_cond(uncond, cond)
    for i, s in enumerate(timesteps):
        t_next = timesteps[i + 1] if i + 1 < n else 0
        t = torch.full((x.shape[0],), s, dtype=torch.int64, device=x.device)
        e = guided_eps(denoise, x, t, branches, guidance)
        m0 = data_prediction(schedule, x, e, s)
        mu, sigma_noise = sde_dpmpp_2m_step(schedule, x, m0, s, t_next, m_prev, timesteps[i - 1] if i > 0 else None)
        x = mu + sigma_noise * zs[i].to(x)
        m_prev = m0
        if on_progress:
            on_progress(i + 1, n)
    return x
