"""The math core against algorithm.md: solver, timesteps, noise order, batching, branch table."""

import math

import numpy as np
import pytest
import torch

from revpers.core import sampling
from revpers.core.conditioning import TextEmbedding, inversion_branches
from revpers.core.schedule import NoiseSchedule, timesteps

SCHED = NoiseSchedule.scaled_linear()


def test_default_timesteps_match_reference_grid():
    ts = timesteps(100, 0.7)
    assert len(ts) == 100 and len(set(ts)) == 100
    assert ts[:4] == [299, 295, 292, 289] and ts[-3:] == [7, 4, 1]
    assert abs(SCHED.sigma(0) - 0.029) < 1e-3


@pytest.mark.parametrize(
    "bad", [dict(num_steps=0, skip=0.7), dict(num_steps=10, skip=1.0), dict(num_steps=400, skip=0.7)]
)
def test_timesteps_reject_bad_values(bad):
    with pytest.raises(ValueError):
        timesteps(**bad)


def _reference_step(abar, x_s, m0, s, t, m1=None, s_prev=None):
    """Independent float64 transcription of algorithm.md's formulas (numpy, no shared code)."""
    a = lambda k: math.sqrt(abar[k])  # noqa: E731
    sg = lambda k: math.sqrt(1.0 - abar[k])  # noqa: E731
    lam = lambda k: math.log(a(k)) - math.log(sg(k))  # noqa: E731
    h = lam(t) - lam(s)
    mu = (sg(t) / sg(s)) * math.exp(-h) * x_s + a(t) * (1 - math.exp(-2 * h)) * m0
    if m1 is not None:
        h0 = lam(s) - lam(s_prev)
        r0 = h0 / h
        d1 = (m0 - m1) / r0
        mu = mu + 0.5 * a(t) * (1 - math.exp(-2 * h)) * d1
    return mu, sg(t) * math.sqrt(1 - math.exp(-2 * h))


@pytest.mark.parametrize("s,t,s_prev", [(299, 295, None), (295, 292, 299), (4, 1, 7), (1, 0, 4), (999, 500, None)])
def test_solver_step_matches_float64_transcription(s, t, s_prev):
    rng = np.random.default_rng(s)
    x, m0, m1 = (rng.standard_normal((2, 4, 3, 3)) for _ in range(3))
    abar = SCHED.alphas_cumprod
    want_mu, want_sn = _reference_step(abar, x, m0, s, t, m1 if s_prev else None, s_prev)
    mu, sn = sampling.sde_dpmpp_2m_step(
        SCHED, torch.from_numpy(x), torch.from_numpy(m0), s, t, torch.from_numpy(m1) if s_prev else None, s_prev
    )
    assert abs(sn - want_sn) <= 1e-12
    assert np.abs(mu.numpy() - want_mu).max() <= 1e-6
    # the second-order term must matter, or the test above could not tell the orders apart
    if s_prev:
        first, _ = sampling.sde_dpmpp_2m_step(SCHED, torch.from_numpy(x), torch.from_numpy(m0), s, t)
        assert (first - mu).abs().max() > 1e-4


def test_noise_is_drawn_in_increasing_t_order_per_face():
    ts = [299, 150, 1]
    noise = sampling.draw_noise((2, 4, 2, 2), [5, 9], ts)
    for face, seed in enumerate([5, 9]):
        g = torch.Generator().manual_seed(seed)
        first, second, third = (torch.randn((1, 4, 2, 2), generator=g) for _ in range(3))
        assert torch.equal(noise[2][face : face + 1], first)  # t = 1 drawn first
        assert torch.equal(noise[1][face : face + 1], second)
        assert torch.equal(noise[0][face : face + 1], third)  # t = 299 drawn last


def _toy_denoiser(x, t, cond):
    """A nonlinear denoiser that depends on every input, for exact-arithmetic tests."""
    tt = t.to(x.dtype).view(-1, 1, 1, 1) / 1000.0
    c = cond["text"].mean(dim=(1, 2)).view(-1, 1, 1, 1) + cond["identity"].mean(dim=1).view(-1, 1, 1, 1)
    return torch.tanh(0.7 * x + tt) + 0.1 * c + 0.05 * cond["ip_scale"].view(-1, 1, 1, 1)


def _branches(faces=2):
    empty = TextEmbedding(torch.randn(1, 77, 8), torch.randn(1, 4))
    return inversion_branches(empty, faces, 16, (64, 64), 1.0)


@pytest.mark.parametrize("denoiser", ["toy", "unet"])
def test_batched_inversion_equals_one_step_at_a_time(denoiser, torch_models):
    fn = _toy_denoiser if denoiser == "toy" else torch_models.denoise
    torch.manual_seed(0)
    if denoiser == "toy":
        x0 = torch.randn(2, 4, 8, 8)
        inv_u, inv_c = _branches(2)
    else:
        empty = torch_models.text("")
        x0 = torch.randn(2, 4, 8, 8)
        inv_u, inv_c = inversion_branches(empty, 2, 512, (64, 64), 1.0)
    ts = timesteps(25, 0.7)
    noise = sampling.draw_noise(x0.shape, [0, 1], ts)
    _, ref_z = sampling.invert(fn, x0, ts, SCHED, inv_u, inv_c, -10.0, noise, batch_steps=1)
    for b in (2, 7, 25):
        _, zs = sampling.invert(fn, x0, ts, SCHED, inv_u, inv_c, -10.0, noise, batch_steps=b)
        assert max((a - r).abs().max().item() for a, r in zip(zs, ref_z)) <= 1e-5


def test_inversion_then_generation_reconstructs_with_toy_denoiser():
    torch.manual_seed(1)
    x0 = torch.randn(1, 4, 8, 8)
    inv_u, inv_c = _branches(1)
    ts = timesteps(100, 0.7)
    noise = sampling.draw_noise(x0.shape, [0], ts)
    x_T, zs = sampling.invert(_toy_denoiser, x0, ts, SCHED, inv_u, inv_c, -10.0, noise, batch_steps=13)
    out = sampling.generate(_toy_denoiser, x_T, zs, ts, SCHED, inv_u, inv_c, -10.0)
    assert (out - x0).abs().max() <= 1e-4
    # and a different conditioning in generation does change the result (the check is not vacuous)
    other = {k: v.clone() for k, v in inv_c.items()}
    other["identity"] = other["identity"] + 1.0
    changed = sampling.generate(_toy_denoiser, x_T, zs, ts, SCHED, inv_u, other, -10.0)
    assert (changed - x0).abs().max() > 1e-2


def test_guidance_combines_branches_from_one_call():
    calls = []

    def den(x, t, cond):  # eps read off each row's conditioning: the rows must pair with their branch
        calls.append(x.shape[0])
        return cond["identity"][:, :1].expand_as(x).clone()

    u = {"identity": torch.full((3, 2), 1.0)}
    c = {"identity": torch.full((3, 2), 3.0)}
    eps = sampling.guided_eps(
        den, torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), sampling.concat_cond(u, c), -10.0
    )
    assert calls == [6]  # both branches in one call, uncond rows first
    assert torch.allclose(eps, torch.full((3, 1), 1.0 + -10.0 * (3.0 - 1.0)))
