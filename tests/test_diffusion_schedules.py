"""Schedules and timestep spacings: paper values, diffusers as an independent implementation, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difflab.diffusion.discretization import SPACINGS, make_plan, noise_level, timestep_spacing
from difflab.diffusion.schedules import BETA_SCHEDULES, Schedule, make_schedule, rescale_zero_terminal_snr
from difflab.errors import DifflabError

diffusers = pytest.importorskip("diffusers")

# name -> diffusers' DDPMScheduler config that builds the same betas
DIFFUSERS_CONFIG = {
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "sigmoid": dict(beta_schedule="sigmoid", beta_start=1e-4, beta_end=0.02),
}


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max())


def test_linear_alpha_bar_T_is_its_true_product():
    s = make_schedule("linear")
    # prod(1 - beta_t) for beta linear 1e-4..0.02 over 1000 steps, computed independently in math.fsum-free
    # plain float64 Python: the DDPM paper's x_T keeps sqrt(4.04e-5) = 0.0064 of the signal's amplitude.
    expected = math.prod(1 - (1e-4 + (0.02 - 1e-4) * i / 999) for i in range(1000))
    assert s.alphas_cumprod[-1].item() == pytest.approx(expected, rel=1e-12)
    assert s.alphas_cumprod[-1].item() == pytest.approx(4.0358e-5, rel=1e-4)
    assert s.betas.dtype == s.alphas_cumprod.dtype == torch.float64


@pytest.mark.parametrize("name", list(DIFFUSERS_CONFIG))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedule_tensors_match_diffusers(name, zero_snr):
    ours = make_schedule(name, 1000, rescale_zero_snr=zero_snr)
    ref = diffusers.DDPMScheduler(
        num_train_timesteps=1000, rescale_betas_zero_snr=zero_snr, **DIFFUSERS_CONFIG[name]
    )
    # diffusers computes in float32 (a cumprod of 1000 factors), we in float64: 1e-5 relative is ~100 ulps.
    assert rel_err(ours.betas, ref.betas) < 1e-5
    assert rel_err(ours.alphas_cumprod, ref.alphas_cumprod) < 1e-5
    assert torch.allclose(ours.alphas_cumprod, ref.alphas_cumprod.double(), rtol=1e-5, atol=1e-9)


def test_cosine_matches_its_closed_form_and_caps_beta():
    s = make_schedule("cosine", 1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731  Eq. (17)
    for t in (1, 10, 500, 900):  # 1-based t: alpha_bar(t) = f(t) / f(0) while no beta is capped
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-10)
    assert s.betas.max().item() == pytest.approx(0.999)


def test_zero_terminal_snr_rescale_follows_algorithm_1():
    base = make_schedule("scaled_linear")
    z = rescale_zero_terminal_snr(base.betas)
    ab = torch.cumprod(1 - z, 0)
    assert ab[-1].item() == 0.0 and z[-1].item() == pytest.approx(1.0)
    assert ab[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)  # first step kept
    # sqrt(alpha_bar) is an affine map of the original: collinear points
    x, y = base.alphas_cumprod.sqrt(), ab.sqrt()
    slope = (y[0] - y[-1]) / (x[0] - x[-1])
    assert torch.allclose(y, y[-1] + slope * (x - x[-1]), atol=1e-12)
    s = make_schedule("linear", rescale_zero_snr=True)
    assert s.zero_terminal_snr and s.snr[-1].item() == 0 and s.log_snr[-1].item() == -math.inf


def test_continuous_view_is_consistent():
    s = make_schedule("cosine")
    t = torch.tensor([0, 10, 999])
    alpha, sigma = s.alpha_sigma(t)
    assert torch.allclose(alpha**2 + sigma**2, torch.ones(3, dtype=torch.float64))
    assert torch.allclose(s.log_snr[t], torch.log(alpha**2 / sigma**2))
    assert torch.allclose(s.sigmas[t], sigma / alpha)
    assert s.log_snr.diff().max() < 0  # log-SNR falls monotonically with t


@pytest.mark.parametrize("spacing", SPACINGS)
def test_timestep_spacing_matches_diffusers(spacing):
    for n in list(range(1, 61)) + [77, 100, 250, 999, 1000]:
        ref = diffusers.DDPMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
        ref.set_timesteps(n)
        assert timestep_spacing(1000, n, spacing).tolist() == ref.timesteps.tolist(), (spacing, n)


def test_spacing_table_2_of_lin_et_al():
    # Table 2 of Lin et al. (2024), T = 1000, n = 10, shifted to 0-based indices
    assert timestep_spacing(1000, 10, "linspace").tolist()[::-1] == [
        0,
        111,
        222,
        333,
        444,
        555,
        666,
        777,
        888,
        999,
    ]
    assert timestep_spacing(1000, 10, "leading").tolist()[::-1] == [
        0,
        100,
        200,
        300,
        400,
        500,
        600,
        700,
        800,
        900,
    ]
    assert timestep_spacing(1000, 10, "trailing").tolist()[::-1] == [
        99,
        199,
        299,
        399,
        499,
        599,
        699,
        799,
        899,
        999,
    ]
    assert timestep_spacing(1000, 10, "leading", steps_offset=1).tolist()[-1] == 1


def test_plan_levels_and_ends():
    s = make_schedule("linear")
    plan = make_plan(s, 10, "trailing")
    assert len(plan) == 10 and plan.alphas_cumprod.shape == (11,)
    end = plan.level(10)
    assert (end.alpha, end.sigma, end.ve_sigma, end.lam) == (1.0, 0.0, 0.0, math.inf)
    first = make_plan(s, 10, "leading", final_alpha="first").level(10)
    assert first.alpha_bar == s.alphas_cumprod[0].item()
    assert noise_level(0.0).lam == -math.inf and noise_level(0.0).ve_sigma == math.inf
    lv = noise_level(0.3)
    assert lv.lam == pytest.approx(0.5 * math.log(0.3 / 0.7)) and lv.ve_sigma == pytest.approx(
        math.sqrt(0.7 / 0.3)
    )
    custom = make_plan(s, 0, timesteps=[900, 500, 3])
    assert custom.timesteps.tolist() == [900, 500, 3]


def test_bad_values_raise_naming_the_value():
    with pytest.raises(DifflabError, match="unknown schedule 'cosin'.*choose one of: linear, cosine"):
        make_schedule("cosin")
    with pytest.raises(DifflabError, match="unknown timestep spacing 'trail'"):
        timestep_spacing(1000, 10, "trail")
    with pytest.raises(DifflabError, match="steps 0 is invalid"):
        timestep_spacing(1000, 0)
    with pytest.raises(DifflabError, match="steps 1001 is invalid"):
        timestep_spacing(1000, 1001)
    with pytest.raises(DifflabError, match="beta_start does not apply to the cosine"):
        make_schedule("cosine", beta_start=1e-3)
    with pytest.raises(DifflabError, match="timestep 1000 is out of range; expected 0..999"):
        make_schedule("linear").alpha_sigma(torch.tensor([5, 1000]))
    with pytest.raises(DifflabError, match="integer indices"):
        make_schedule("linear").alpha_sigma(torch.tensor([5.5]))
    with pytest.raises(DifflabError, match="strictly descending"):
        make_plan(make_schedule("linear"), 0, timesteps=[3, 500])
    with pytest.raises(DifflabError, match="betas must be"):
        Schedule.from_betas(np.array([0.1, 1.5]))
    assert set(BETA_SCHEDULES) == {"linear", "cosine", "scaled_linear", "sigmoid"}


def test_every_step_count_gives_exactly_that_many_distinct_steps():
    # diffusers' trailing spacing overshoots for some n (n = 61 gives 62 steps, the last -1); ours never does.
    for n in range(1, 1001):
        for spacing in SPACINGS:
            t = timestep_spacing(1000, n, spacing)
            assert len(t) == n and int(t.min()) >= 0 and int(t.max()) <= 999 and bool((t.diff() < 0).all())
