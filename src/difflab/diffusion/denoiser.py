"""One denoiser interface for every sampler: ``denoiser(x, t, **cond) -> (eps_hat, x0_hat)``.

A network may predict epsilon, x0 or v (:mod:`difflab.diffusion.objectives`); samplers should not
care. :class:`Denoiser` is the adapter at that boundary (k-diffusion wraps networks the same way): it
calls ``net(x, t, **cond)`` once and returns both readings of the output, so a sampler uses whichever
its update equation is written in. Timesteps are integer indices 0..T-1 of the training schedule
(t = 0 is the least noisy step, as in diffusers).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from difflab.diffusion.objectives import PREDICTION_TYPES, from_eps_x0, to_eps_x0
from difflab.diffusion.schedules import Schedule, broadcast_like, per_sample
from difflab.errors import DifflabError, check_choice


def coefficients(schedule: Schedule, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t, alpha_t, sigma_t)``: t as ``(B,)`` int64 on x's device, alpha and sigma shaped to
    broadcast against ``x`` in its dtype."""
    t = schedule.check_timesteps(per_sample(t, x.shape[0]))
    alpha, sigma = schedule.alpha_sigma(t)
    return t.to(x.device), broadcast_like(alpha, x), broadcast_like(sigma, x)


class Denoiser:
    """Wrap ``net(x, t, **cond)`` (t: ``(B,)`` int64 on x's device) and its prediction type.

    >>> from difflab.diffusion.schedules import make_schedule
    >>> d = Denoiser(lambda x, t: torch.zeros_like(x), make_schedule("linear"), "epsilon")
    >>> eps, x0 = d(torch.ones(2, 3), 0)  # eps = 0, so x0 = x / sqrt(alpha_bar_0)
    >>> round(x0[0, 0].item(), 6)
    1.00005
    """

    def __init__(
        self, net: Callable[..., torch.Tensor], schedule: Schedule, prediction_type: str = "epsilon"
    ):
        check_choice("prediction type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "epsilon" and schedule.zero_terminal_snr:
            raise DifflabError(
                f"prediction type 'epsilon' cannot recover x0 where alpha_bar = 0 (schedule "
                f"'{schedule.name}' has zero terminal SNR); use 'v_prediction' or 'sample' "
                "(Lin et al. 2024, Sec. 3.2)"
            )
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type

    def coefficients(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return coefficients(self.schedule, x, t)

    def __call__(self, x: torch.Tensor, t, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, ...) noisy input at timestep t (int or (B,)) -> (eps_hat, x0_hat), both (B, ...)."""
        t, alpha, sigma = self.coefficients(x, t)
        out = self.net(x, t, **cond)
        if out.shape != x.shape:
            raise DifflabError(
                f"the network returned shape {tuple(out.shape)} for input shape {tuple(x.shape)}"
            )
        return to_eps_x0(self.prediction_type, out, x, alpha, sigma)

    def to_output(self, eps: torch.Tensor, x0: torch.Tensor, x: torch.Tensor, t) -> torch.Tensor:
        """Express a pair (eps, x0) at (x, t) in this network's own prediction type."""
        _, alpha, sigma = self.coefficients(x, t)
        return from_eps_x0(self.prediction_type, eps, x0, alpha, sigma)

    def from_output(self, out: torch.Tensor, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Read an output in this network's prediction type as (eps, x0) at (x, t)."""
        _, alpha, sigma = self.coefficients(x, t)
        return to_eps_x0(self.prediction_type, out, x, alpha, sigma)


def clip_denoised(denoiser, schedule: Schedule, bound: float = 1.0):
    r"""Wrap a denoiser (plain or guided) so that :math:`\hat x_0` is clamped to ``[-bound, bound]`` and
    :math:`\hat\epsilon` recomputed from it, :math:`\hat\epsilon = (x_t - \alpha_t \hat x_0)/\sigma_t`,
    keeping the pair consistent. This is ``clip_denoised`` of Ho et al.'s (2020) sampler and
    ``clip_sample=True`` of diffusers' DDPM and DDIM schedulers (their default; their DDIM recomputes
    epsilon only with ``use_clipped_model_output=True``).

    It rescues epsilon-prediction near alpha_t = 0, where :math:`\hat x_0 = (x_t - \sigma_t\hat\epsilon)
    /\alpha_t` multiplies the network's error by :math:`\sigma_t/\alpha_t` (about 2e4 at the cosine
    schedule's last step); v- and x0-prediction do not need it."""

    def clipped(x: torch.Tensor, t, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        _, x0 = denoiser(x, t, **cond)
        _, alpha, sigma = coefficients(schedule, x, t)
        return to_eps_x0("sample", x0.clamp(-bound, bound), x, alpha, sigma)

    return clipped
