r"""The forward (noising) process and its posterior, Ho et al. (2020).

Glossary (0-based index t; "s" is any earlier step, s < t, or the clean end where \bar\alpha_s = 1):

    q(x_t | x_{t-1}) = N(\sqrt{1-\beta_t} x_{t-1}, \beta_t I)                        Eq. (2)   q_step
    q(x_t | x_0)     = N(\sqrt{\bar\alpha_t} x_0, (1-\bar\alpha_t) I)                  Eq. (4)   q_sample
    q(x_s | x_t, x_0) = N(\tilde\mu, \tilde\beta I), with, for s = t-1,                Eq. (6)   q_posterior
        \tilde\mu  = \frac{\sqrt{\bar\alpha_{t-1}}\beta_t}{1-\bar\alpha_t} x_0
                   + \frac{\sqrt{\alpha_t}(1-\bar\alpha_{t-1})}{1-\bar\alpha_t} x_t      Eq. (7)
        \tilde\beta = \frac{1-\bar\alpha_{t-1}}{1-\bar\alpha_t}\beta_t                   Eq. (7)

The posterior holds for any pair s < t once \beta_t and \alpha_t are read as the *strided* step
\alpha_{t|s} = \bar\alpha_t / \bar\alpha_s, \beta_{t|s} = 1 - \alpha_{t|s} (as in Kingma et al. 2021);
that is how DDPM sampling with fewer than T steps reuses the same formula
(:func:`posterior_coefficients`).
"""

from __future__ import annotations

import torch

from difflab.diffusion.schedules import Schedule, broadcast_like


def q_sample(schedule: Schedule, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    r"""Sample :math:`x_t \sim q(x_t|x_0)` in closed form, Eq. (4) of Ho et al. (2020):
    :math:`x_t = \sqrt{\bar\alpha_t}\,x_0 + \sqrt{1-\bar\alpha_t}\,\epsilon`.

    x0, noise: (B, ...); t: int, 0-d or (B,) -> (B, ...)
    """
    alpha, sigma = schedule.alpha_sigma(t)  # a scalar t stays one coefficient and broadcasts
    return broadcast_like(alpha, x0) * x0 + broadcast_like(sigma, x0) * noise


def q_step(schedule: Schedule, x_prev: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
    r"""One step of the forward chain, Eq. (2) of Ho et al. (2020):
    :math:`x_t = \sqrt{1-\beta_t}\,x_{t-1} + \sqrt{\beta_t}\,\epsilon`."""
    beta = schedule.betas[schedule.check_timesteps(t)]
    return broadcast_like((1 - beta).sqrt(), x_prev) * x_prev + broadcast_like(beta.sqrt(), x_prev) * noise


def strided_beta(alpha_bar_t, alpha_bar_s) -> torch.Tensor:
    r"""Variance added from step s to a later step t, :math:`\beta_{t|s} = 1 - \bar\alpha_t/\bar\alpha_s`
    (:math:`\beta_t` itself when s = t - 1). Float64."""
    ab_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    return 1 - ab_t / torch.as_tensor(alpha_bar_s, dtype=torch.float64)


def posterior_coefficients(
    alpha_bar_t: torch.Tensor | float, alpha_bar_s: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Coefficients of :math:`q(x_s|x_t,x_0)`, Eq. (7) of Ho et al. (2020) with the strided step
    :math:`\beta_{t|s} = 1 - \bar\alpha_t/\bar\alpha_s`:

    .. math:: \tilde\mu = c_0 x_0 + c_t x_t,\quad
              c_0 = \frac{\sqrt{\bar\alpha_s}\,\beta_{t|s}}{1-\bar\alpha_t},\quad
              c_t = \frac{\sqrt{\alpha_{t|s}}\,(1-\bar\alpha_s)}{1-\bar\alpha_t},\quad
              \tilde\beta = \frac{1-\bar\alpha_s}{1-\bar\alpha_t}\beta_{t|s}

    Returns ``(c_0, c_t, tilde_beta)`` in float64. ``alpha_bar_s = 1`` (the clean end) gives
    ``c_0 = 1, c_t = 0, tilde_beta = 0``: the last step returns the x0 estimate.
    """
    ab_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    ab_s = torch.as_tensor(alpha_bar_s, dtype=torch.float64)
    beta_ts = strided_beta(ab_t, ab_s)
    alpha_ts = 1 - beta_ts
    c0 = ab_s.sqrt() * beta_ts / (1 - ab_t)
    ct = alpha_ts.sqrt() * (1 - ab_s) / (1 - ab_t)
    variance = (1 - ab_s) / (1 - ab_t) * beta_ts
    return c0, ct, variance


def q_posterior(
    schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, t
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Mean and variance of :math:`q(x_{t-1}|x_t,x_0)`, Eqs. (6)-(7) of Ho et al. (2020). At t = 0 the
    previous "step" is the data itself (\bar\alpha_{-1} := 1): mean x0, variance 0.

    x0, x_t: (B, ...); t: int or (B,) -> mean (B, ...), variance (B, 1, ...) broadcastable
    """
    t = schedule.check_timesteps(t)
    ab_t = schedule.alphas_cumprod[t]
    ab_prev = torch.where(t > 0, schedule.alphas_cumprod[(t - 1).clamp(min=0)], torch.ones_like(ab_t))
    c0, ct, variance = posterior_coefficients(ab_t, ab_prev)
    return broadcast_like(c0, x_t) * x0 + broadcast_like(ct, x_t) * x_t, broadcast_like(variance, x_t)
