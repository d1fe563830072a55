r"""Which training steps a sampler visits, and the noise levels it steps between.

A sampler with n steps evaluates the network at n timesteps :math:`t_0 > t_1 > \dots > t_{n-1}`
(integer indices 0..T-1) and then lands on an *end* level: the clean data, \bar\alpha = 1 (the
papers' convention), or \bar\alpha of training step 0 (diffusers' DDIM ``set_alpha_to_one=False``).
:class:`SamplingPlan` holds the n timesteps plus the n + 1 levels; :meth:`SamplingPlan.level` gives
each level in every coordinate a sampler's update equation is written in:

    alpha, sigma   sqrt(alpha_bar), sqrt(1 - alpha_bar)   DDPM, DDIM: x = alpha x0 + sigma eps
    ve_sigma       sigma / alpha                          Euler, Heun: x/alpha = x0 + ve_sigma eps (Karras)
    lam            lambda = log(alpha / sigma)            DPM-Solver++ (Lu et al. 2022): half the log-SNR

Timestep spacings, Table 2 of Lin et al. (2024), written 0-based (T training steps, n sampling steps):

    linspace   round(linspace(0, T-1, n))           first step T-1, last step 0
    leading    arange(n) * (T // n) [+ offset]      first step (n-1) T//n: never visits T-1
    trailing   round(T - arange(n) * T/n) - 1       first step T-1, last step T/n - 1
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from difflab.diffusion.schedules import Schedule
from difflab.errors import DifflabError, check_choice

SPACINGS = ("linspace", "leading", "trailing")
# Linspace is the default: it spans the whole trained range, starting at T-1 (where x_T ~ N(0, I) is
# closest to true, and the only pure-noise step of a zero-terminal-SNR schedule) and ending at 0, so the
# final jump to the data is as small as the schedule allows. docs/diffusion.md has the measured trade-off
# (trailing suits dpmpp_2m at <= 20 steps on unit-scale data; it blurs structure finer than its last step).
DEFAULT_SPACING = "linspace"


def timestep_spacing(
    num_train_timesteps: int, steps: int, spacing: str = DEFAULT_SPACING, steps_offset: int = 0
) -> torch.Tensor:
    """The n sampling timesteps, descending, as an int64 tensor (Lin et al. 2024, Table 2).
    ``steps_offset`` shifts the leading spacing (Stable Diffusion uses 1), as in diffusers."""
    check_choice("timestep spacing", spacing, SPACINGS)
    T = num_train_timesteps
    if not isinstance(steps, int) or not 1 <= steps <= T:
        raise DifflabError(f"steps {steps!r} is invalid; expected an integer from 1 to {T} (training steps)")
    # numpy float64 arange/linspace and round-half-to-even, as diffusers computes them, so the two libraries
    # visit the same steps even where T/n rounding hits an exact .5 tie (e.g. trailing, n = 48).
    if spacing == "linspace":
        t = np.linspace(0, T - 1, steps).round()[::-1]
    elif spacing == "leading":
        t = (np.arange(steps) * (T // steps) + steps_offset)[::-1]
    else:
        t = np.arange(T, 0, -T / steps)[:steps].round() - 1  # arange may overshoot by one element
    t = torch.from_numpy(t.astype(np.int64).copy())
    if int(t.max()) >= T:
        raise DifflabError(f"steps_offset {steps_offset} pushes timestep {int(t.max())} past {T - 1}")
    return t


class Level(NamedTuple):
    """One noise level in every coordinate a sampler uses (Python floats, float64)."""

    alpha_bar: float
    alpha: float
    sigma: float
    ve_sigma: float  # sigma / alpha: inf at zero SNR, 0 at the clean end
    lam: float  # lambda = log(alpha / sigma), half the log-SNR: -inf at zero SNR, +inf at the clean end


def noise_level(alpha_bar: float) -> Level:
    """Convert alpha_bar to (alpha, sigma, sigma/alpha, log(alpha/sigma)), keeping the two ends exact."""
    alpha, sigma = math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)
    ve_sigma = sigma / alpha if alpha > 0 else math.inf
    if alpha == 0:
        lam = -math.inf
    elif sigma == 0:
        lam = math.inf
    else:
        lam = math.log(alpha) - math.log(sigma)
    return Level(alpha_bar, alpha, sigma, ve_sigma, lam)


FINAL_ALPHAS = ("one", "first")


@dataclass(frozen=True)
class SamplingPlan:
    """n timesteps to evaluate and the n + 1 levels between which a sampler steps."""

    timesteps: torch.Tensor  # (n,) int64, descending
    alphas_cumprod: torch.Tensor  # (n + 1,) float64: \bar\alpha at each timestep, then at the end

    def __len__(self) -> int:
        return self.timesteps.numel()

    def level(self, i: int) -> Level:
        """Level i in 0..n; level n is the end (clean data)."""
        return noise_level(float(self.alphas_cumprod[i]))


def make_plan(
    schedule: Schedule,
    steps: int,
    spacing: str = DEFAULT_SPACING,
    timesteps=None,
    final_alpha: str = "one",
) -> SamplingPlan:
    r"""Choose the timesteps (``spacing``, or explicit descending ``timesteps``) and the end level:
    ``final_alpha="one"`` ends on the data (\bar\alpha = 1, Ho et al. 2020; Song et al. 2021);
    ``"first"`` ends on \bar\alpha of training step 0, diffusers' DDIM ``set_alpha_to_one=False``."""
    check_choice("final alpha", final_alpha, FINAL_ALPHAS)
    if timesteps is None:
        t = timestep_spacing(schedule.timesteps, steps, spacing)
    else:
        t = schedule.check_timesteps(torch.as_tensor(timesteps))
        if t.ndim != 1 or t.numel() == 0 or bool((t[1:] >= t[:-1]).any()):
            raise DifflabError(f"timesteps {t.tolist()} must be a non-empty, strictly descending list")
    end = torch.ones(1, dtype=torch.float64) if final_alpha == "one" else schedule.alphas_cumprod[:1]
    return SamplingPlan(t, torch.cat([schedule.alphas_cumprod[t], end]))
