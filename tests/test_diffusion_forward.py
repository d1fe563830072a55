"""Forward process q(x_t | x_0) and posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Eqs. 2, 4, 6-7)."""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion.forward import posterior_coefficients, q_posterior, q_sample, q_step
from difflab.diffusion.schedules import make_schedule

CHECKPOINTS = [0, 9, 99, 499, 999]


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_closed_form_matches_t_steps_of_iterated_noising(name):
    """Monte Carlo: run the chain x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps for all T steps and
    compare the sample moments at several t with Eq. (4): mean sqrt(alpha_bar_t) x0, variance 1 - alpha_bar_t.

    Tolerance: 5 standard errors of the estimator for N samples, SE(mean) = sqrt(var / N) and
    SE(variance) = var * sqrt(2 / (N - 1)) (Gaussian samples), so a correct implementation fails with
    probability < 1e-6 per check; with a fixed seed the test is deterministic anyway."""
    s = make_schedule(name)
    n = 12_000  # (N, 2) stays under torch's 32768-element threshold for multithreading: fast on 2 cores
    g = torch.Generator().manual_seed(0)
    x0 = torch.tensor([1.5, -0.7], dtype=torch.float64).repeat(n, 1)  # (N, 2): two data values
    x = x0
    for t in range(s.timesteps):
        x = q_step(s, x, t, torch.randn(x.shape, generator=g, dtype=torch.float64))
        if t in CHECKPOINTS:
            ab = s.alphas_cumprod[t].item()
            var = 1 - ab
            mean_se, var_se = math.sqrt(var / n), var * math.sqrt(2 / (n - 1))
            assert (x.mean(0) - math.sqrt(ab) * x0[0]).abs().max() < 5 * mean_se, t
            assert (x.var(0) - var).abs().max() < 5 * var_se, t
            # and q_sample draws from the same law: same check on one closed-form draw
            xc = q_sample(s, x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
            assert (xc.mean(0) - math.sqrt(ab) * x0[0]).abs().max() < 5 * mean_se, t
            assert (xc.var(0) - var).abs().max() < 5 * var_se, t


def test_chain_moments_propagate_exactly_to_the_closed_form():
    """Deterministic version: the chain is linear-Gaussian, so mean and variance propagate as
    m_t = sqrt(alpha_t) m_{t-1}, v_t = alpha_t v_{t-1} + beta_t, starting from (x0, 0)."""
    s = make_schedule("scaled_linear")
    m, v = 1.0, 0.0
    for t in range(s.timesteps):
        a = 1 - s.betas[t].item()
        m, v = math.sqrt(a) * m, a * v + (1 - a)
        assert m == pytest.approx(s.alphas_cumprod[t].sqrt().item(), rel=1e-12)
        assert v == pytest.approx(1 - s.alphas_cumprod[t].item(), rel=1e-12)


@pytest.mark.parametrize("name", ["linear", "cosine", "scaled_linear"])
def test_posterior_equals_bayes_rule_in_precision_form(name):
    """Independent derivation: q(x_{t-1}|x_0) = N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1}) times the likelihood
    q(x_t|x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t): precisions add, means combine precision-weighted."""
    s = make_schedule(name)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 3, generator=g, dtype=torch.float64)
    x_t = torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([1, 2, 10, 300, 700, 999])
    mean, var = q_posterior(s, x0, x_t, t)
    for i, ti in enumerate(t.tolist()):
        ab_prev, beta = s.alphas_cumprod[ti - 1].item(), s.betas[ti].item()
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        ref_var = 1 / precision
        ref_mean = ref_var * (
            math.sqrt(ab_prev) * x0[i] / (1 - ab_prev) + math.sqrt(1 - beta) * x_t[i] / beta
        )
        assert var[i].item() == pytest.approx(ref_var, rel=1e-9)
        assert torch.allclose(mean[i], ref_mean, rtol=1e-9, atol=1e-12)


def test_posterior_at_t0_and_the_clean_end():
    s = make_schedule("linear")
    x0, x_t = torch.ones(2, 4), torch.zeros(2, 4)
    mean, var = q_posterior(s, x0, x_t, 0)
    assert torch.equal(mean, x0) and torch.all(var == 0)
    c0, ct, v = posterior_coefficients(0.5, 1.0)
    assert (c0.item(), ct.item(), v.item()) == (1.0, 0.0, 0.0)
    assert mean.dtype == torch.float32  # coefficients follow the data's dtype


def test_q_sample_broadcasts_over_images_and_scalar_t():
    s = make_schedule("linear")
    x0 = torch.randn(3, 2, 4, 4)
    noise = torch.randn_like(x0)
    out = q_sample(s, x0, 250, noise)
    ab = s.alphas_cumprod[250].item()
    assert torch.allclose(out, math.sqrt(ab) * x0 + math.sqrt(1 - ab) * noise, atol=1e-6)
    per_sample = q_sample(s, x0, torch.tensor([0, 250, 999]), noise)
    assert torch.allclose(per_sample[1], out[1])
