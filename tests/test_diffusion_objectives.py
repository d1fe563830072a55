"""epsilon / x0 / v parametrisations, loss weightings, the training loss and the Denoiser adapter."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.forward import q_sample
from difflab.diffusion.objectives import (
    PREDICTION_TYPES,
    diffusion_loss,
    from_eps_x0,
    loss_weight,
    to_eps_x0,
)
from difflab.diffusion.schedules import make_schedule
from difflab.errors import DifflabError

LINEAR = make_schedule("linear")


@settings(max_examples=60, deadline=None)
@given(
    alpha_bar=st.floats(min_value=1e-6, max_value=1 - 1e-6),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
)
def test_conversions_round_trip(alpha_bar, seed, prediction_type):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 5, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 5, generator=g, dtype=torch.float64)
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)
    x_t = alpha * x0 + sigma * eps
    out = from_eps_x0(prediction_type, eps, x0, alpha, sigma)
    eps_back, x0_back = to_eps_x0(prediction_type, out, x_t, alpha, sigma)
    # Reading eps from x0 (or back) divides by sigma (or alpha): errors grow like 1/min(alpha, sigma).
    tol = 1e-12 / min(alpha, sigma)
    assert torch.allclose(eps_back, eps, atol=tol, rtol=0)
    assert torch.allclose(x0_back, x0, atol=tol, rtol=0)


def test_v_target_matches_diffusers_get_velocity():
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDPMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    ref.alphas_cumprod = LINEAR.alphas_cumprod  # same float64 schedule, so the check is the formula
    g = torch.Generator().manual_seed(0)
    x0, eps = (
        torch.randn(4, 3, generator=g, dtype=torch.float64),
        torch.randn(4, 3, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0, 10, 500, 999])
    alpha, sigma = (v[:, None] for v in LINEAR.alpha_sigma(t))
    assert torch.allclose(from_eps_x0("v_prediction", eps, x0, alpha, sigma), ref.get_velocity(x0, eps, t))
    assert torch.allclose(q_sample(LINEAR, x0, t, eps), ref.add_noise(x0, eps, t))


def test_min_snr_weights_are_one_weighting_in_three_parametrisations():
    """Hang et al. (2023): the loss min(SNR, gamma) * ||x0 - x0_hat||^2 reads the same whichever quantity
    the network predicts, as ||eps - eps_hat||^2 = SNR ||dx0||^2 and ||v - v_hat||^2 = (SNR+1) ||dx0||^2."""
    s = make_schedule("cosine")
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([0, 50, 300, 600, 999])
    x0, noise = (
        torch.randn(5, 8, generator=g, dtype=torch.float64),
        torch.randn(5, 8, generator=g, dtype=torch.float64),
    )
    x_t = q_sample(s, x0, t, noise)
    x0_hat = x0 + 0.1 * torch.randn(5, 8, generator=g, dtype=torch.float64)  # one imperfect prediction...
    alpha, sigma = (v[:, None] for v in s.alpha_sigma(t))
    eps_hat = (x_t - alpha * x0_hat) / sigma
    losses = {}
    for weighting in ("uniform", "min_snr"):
        for pt in PREDICTION_TYPES:  # ... expressed as each network would output it
            out = from_eps_x0(pt, eps_hat, x0_hat, alpha, sigma)
            losses[weighting, pt] = diffusion_loss(s, pt, x0, noise, t, out, weighting=weighting, gamma=5.0)
    dx0 = (x0_hat - x0).pow(2).mean(1)
    snr = s.snr[t]
    assert torch.allclose(losses["min_snr", "sample"], snr.clamp(max=5.0) * dx0)
    assert torch.allclose(losses["min_snr", "epsilon"], losses["min_snr", "sample"])
    assert torch.allclose(losses["min_snr", "v_prediction"], losses["min_snr", "sample"])
    assert torch.allclose(losses["uniform", "epsilon"], snr * dx0)  # L_simple weights x0 errors by SNR
    assert torch.allclose(losses["uniform", "v_prediction"], (snr + 1) * dx0)
    # zero SNR: the epsilon weight is 1 (the limit of min(SNR, gamma)/SNR), not 0/0
    weights = loss_weight("min_snr", "epsilon", torch.tensor([0.0, 1.0, 100.0], dtype=torch.float64), 5.0)
    assert weights.tolist() == [1.0, 1.0, 0.05]


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_is_zero_for_the_true_target_and_float32_friendly(prediction_type):
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([3, 100, 700, 999])
    alpha, sigma = (v.float()[:, None, None, None] for v in LINEAR.alpha_sigma(t))
    target = from_eps_x0(prediction_type, noise, x0, alpha, sigma)
    loss = diffusion_loss(LINEAR, prediction_type, x0, noise, t, target, weighting="min_snr")
    assert loss.shape == (4,) and loss.dtype == torch.float32 and loss.abs().max() < 1e-10
    assert (diffusion_loss(LINEAR, prediction_type, x0, noise, t, target + 0.1) > 0).all()


def test_denoiser_reads_every_prediction_type_the_same():
    """Three networks, each exact in its own parametrisation, give one (eps_hat, x0_hat)."""
    from tests.test_diffusion_helpers import mixture

    data = mixture(dim=6)
    x = torch.randn(3, 6, dtype=torch.float64)
    pairs = [
        Denoiser(data.net(LINEAR, pt), LINEAR, pt)(x, torch.tensor([5, 400, 990])) for pt in PREDICTION_TYPES
    ]
    for eps, x0 in pairs[1:]:
        assert torch.allclose(eps, pairs[0][0], atol=1e-9) and torch.allclose(x0, pairs[0][1], atol=1e-7)
    d = Denoiser(data.net(LINEAR, "v_prediction"), LINEAR, "v_prediction")
    eps, x0 = d(x, 400)  # an int t serves the whole batch
    assert torch.allclose(
        d.to_output(eps, x0, x, 400), data.net(LINEAR, "v_prediction")(x, torch.full((3,), 400))
    )


def test_denoiser_errors():
    zero = make_schedule("linear", rescale_zero_snr=True)
    with pytest.raises(DifflabError, match="prediction type 'epsilon' cannot recover x0"):
        Denoiser(lambda x, t: x, zero, "epsilon")
    with pytest.raises(DifflabError, match="unknown prediction type 'v'"):
        Denoiser(lambda x, t: x, LINEAR, "v")
    with pytest.raises(DifflabError, match=r"returned shape \(2, 1\) for input shape \(2, 3\)"):
        Denoiser(lambda x, t: x[:, :1], LINEAR)(torch.zeros(2, 3), 0)
    with pytest.raises(DifflabError, match="unknown loss weighting 'snr'"):
        diffusion_loss(
            LINEAR, "epsilon", torch.zeros(1, 2), torch.zeros(1, 2), 0, torch.zeros(1, 2), weighting="snr"
        )


@pytest.mark.parametrize("power", [1.0, 2.0, 0.5])
def test_power_timesteps_follow_their_closed_form_cdf(power):
    """t/T = u^(1/p): P(t < k) = (k/T)^p, checked at every tenth of the levels on 200,000 draws (the
    standard error of each frequency is below 0.0012)."""
    from difflab.models.recipe import power_timesteps

    t = power_timesteps(power)(200_000, 1000, torch.Generator().manual_seed(0), "cpu")
    assert t.dtype == torch.long and 0 <= t.min() and t.max() <= 999
    for k in range(100, 1000, 100):
        assert abs((t < k).double().mean().item() - (k / 1000) ** power) < 0.005
    with pytest.raises(DifflabError, match="timestep power 0"):
        power_timesteps(0)
