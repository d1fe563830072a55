r"""What the network predicts, and how its error is weighted: epsilon, x0 and v (Salimans & Ho 2022).

With :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon` and :math:`\alpha_t^2 + \sigma_t^2 = 1`
(Eq. 4 of Ho et al. 2020 in the continuous notation of :mod:`difflab.diffusion.schedules`):

    prediction_type   the network outputs                        name in diffusers
    "epsilon"         \hat\epsilon      (Ho et al. 2020)          epsilon
    "sample"          \hat x_0                                    sample
    "v_prediction"    \hat v = \alpha_t\epsilon - \sigma_t x_0    v_prediction  (Salimans & Ho 2022, Sec. 4)

Conversions, all exact given x_t:

    x_0 = (x_t - \sigma_t\epsilon) / \alpha_t         epsilon -> x0   (Eq. 15 of Ho et al. 2020)
    \epsilon = (x_t - \alpha_t x_0) / \sigma_t        x0 -> epsilon
    x_0 = \alpha_t x_t - \sigma_t v,  \epsilon = \sigma_t x_t + \alpha_t v     v -> (x0, epsilon)

Loss weights. Holding x_t fixed, errors in the three parametrisations are proportional:
:math:`\|\epsilon-\hat\epsilon\|^2 = \mathrm{SNR}\,\|x_0-\hat x_0\|^2` and
:math:`\|v-\hat v\|^2 = (\mathrm{SNR}+1)\,\|x_0-\hat x_0\|^2`. Min-SNR-gamma (Hang et al. 2023) weights
the *x0* error by :math:`\min(\mathrm{SNR},\gamma)`, which in each parametrisation reads

    sample: min(SNR, gamma)     epsilon: min(SNR, gamma) / SNR     v_prediction: min(SNR, gamma) / (SNR + 1)

"uniform" is the plain MSE on the predicted quantity (L_simple, Eq. 14 of Ho et al. 2020, for epsilon).
"""

from __future__ import annotations

import torch

from difflab.diffusion.schedules import Schedule, broadcast_like
from difflab.errors import check_choice

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def to_eps_x0(
    prediction_type: str, output: torch.Tensor, x_t: torch.Tensor, alpha, sigma
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read a network output of ``prediction_type`` as the pair (epsilon-hat, x0-hat) at x_t.
    ``alpha``, ``sigma``: scalars or tensors broadcastable against ``x_t``."""
    check_choice("prediction type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return output, (x_t - sigma * output) / alpha
    if prediction_type == "sample":
        return (x_t - alpha * output) / sigma, output
    return sigma * x_t + alpha * output, alpha * x_t - sigma * output


def from_eps_x0(prediction_type: str, eps: torch.Tensor, x0: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """The inverse of :func:`to_eps_x0`: what a ``prediction_type`` network should output given the
    pair (epsilon, x0). With the true noise and data it is the training target."""
    check_choice("prediction type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    return alpha * eps - sigma * x0


def loss_weight(weighting: str, prediction_type: str, snr: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight on the MSE of the predicted quantity (see the module docstring). (B,) -> (B,)"""
    check_choice("loss weighting", weighting, LOSS_WEIGHTINGS)
    check_choice("prediction type", prediction_type, PREDICTION_TYPES)
    if weighting == "uniform":
        return torch.ones_like(snr)
    clipped = snr.clamp(max=gamma)  # min(SNR, gamma): the x0-space weight of Hang et al. (2023)
    if prediction_type == "sample":
        return clipped
    if prediction_type == "epsilon":
        return (gamma / snr).clamp(max=1.0)  # = min(SNR, gamma) / SNR, and 1 (not 0/0) where SNR = 0
    return clipped / (snr + 1)


def diffusion_loss(
    schedule: Schedule,
    prediction_type: str,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t,
    model_output: torch.Tensor,
    *,
    weighting: str = "uniform",
    gamma: float = 5.0,
) -> torch.Tensor:
    r"""Per-sample denoising loss :math:`w_t\,\|f_\theta(x_t, t) - \mathrm{target}\|^2` (mean over
    non-batch dims), where ``model_output`` is the network's prediction at
    :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon` (:func:`difflab.diffusion.forward.q_sample`).

    x0, noise, model_output: (B, ...); t: (B,) or one int for all -> (B,)
    """
    alpha, sigma = schedule.alpha_sigma(t)
    target = from_eps_x0(
        prediction_type, noise, x0, broadcast_like(alpha, model_output), broadcast_like(sigma, model_output)
    )
    mse = (model_output - target).pow(2).flatten(1).mean(dim=1)  # (B,)
    weight = loss_weight(weighting, prediction_type, schedule.snr[schedule.check_timesteps(t)], gamma)
    return mse * weight.to(mse.dtype).to(mse.device)
