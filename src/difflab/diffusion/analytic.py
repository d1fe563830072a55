r"""Data whose exact denoiser is known in closed form: a Gaussian mixture
:math:`p(x_0) = \sum_k \pi_k \mathcal N(\mu_k, s^2 I)` (s = 0: a mixture of points).

Under :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon`, component k gives
:math:`x_t \mid k \sim \mathcal N(\alpha_t\mu_k, v_t I)` with :math:`v_t = \alpha_t^2 s^2 + \sigma_t^2`, and
Gaussian conditioning gives

.. math:: \mathbb E[x_0 \mid x_t, k] = \mu_k + \frac{\alpha_t s^2}{v_t}(x_t - \alpha_t\mu_k),\qquad
          P(k \mid x_t) \propto \pi_k\,\mathcal N(x_t;\ \alpha_t\mu_k, v_t I),

so :math:`\mathbb E[x_0\mid x_t] = \sum_k P(k\mid x_t)\,\mathbb E[x_0\mid x_t,k]`. That is the exact
minimiser of the x0 loss, hence a perfectly trained network of any prediction type: samplers driven
by it must reproduce :math:`p(x_0)`, up to their discretisation error alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.discretization import DEFAULT_SPACING, make_plan
from difflab.diffusion.objectives import from_eps_x0
from difflab.diffusion.schedules import Schedule, broadcast_like


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """``means``: (K, D); ``std``: the per-component s; ``weights``: (K,) summing to 1 (uniform if None)."""

    means: torch.Tensor
    std: float = 0.0
    weights: torch.Tensor | None = None

    def _weights(self) -> torch.Tensor:
        k = self.means.shape[0]
        w = torch.full((k,), 1.0 / k, dtype=torch.float64) if self.weights is None else self.weights
        return w.to(torch.float64)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of x0, (n, D) float64."""
        k = torch.multinomial(self._weights(), n, replacement=True, generator=generator)
        mu = self.means.to(torch.float64)[k]
        return mu + self.std * torch.randn(mu.shape, generator=generator, dtype=torch.float64)

    def posterior_mean(self, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """E[x0 | x_t] for x_t: (B, D), alpha and sigma: (B, 1) -> (B, D) in x_t's dtype."""
        mu = self.means.to(x_t)  # (K, D)
        var = alpha**2 * self.std**2 + sigma**2  # (B, 1)
        sq_dist = ((x_t[:, None, :] - alpha[:, :, None] * mu[None]) ** 2).sum(-1)  # (B, K)
        logits = torch.log(self._weights().to(x_t)) - sq_dist / (2 * var)
        resp = torch.softmax(logits, dim=1)  # P(k | x_t), (B, K)
        per_k = mu[None] + (alpha * self.std**2 / var)[:, :, None] * (
            x_t[:, None, :] - alpha[:, :, None] * mu[None]
        )
        return (resp[:, :, None] * per_k).sum(1)

    def net(self, schedule: Schedule, prediction_type: str = "epsilon"):
        """An exact network ``net(x, t)`` of the given prediction type (x: (B, D) or (B, ...))."""

        def net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            flat = x.flatten(1)
            alpha, sigma = schedule.alpha_sigma(t.cpu())
            alpha, sigma = broadcast_like(alpha, flat), broadcast_like(sigma, flat)
            x0 = self.posterior_mean(flat, alpha, sigma)
            eps = (flat - alpha * x0) / sigma
            return from_eps_x0(prediction_type, eps, x0, alpha, sigma).reshape(x.shape)

        return net


def gaussian_output_error(
    sampler, schedule: Schedule, steps: int, *, mean: float = 1.0, std: float = 0.5, **options
) -> dict[str, float]:
    r"""The exact output distribution of ``sampler`` on 1-D data N(mean, std^2), and its distance to it.

    Driven by the exact denoiser of Gaussian data, every sampler here is an affine map of its start
    x_T and of the fresh noises z_i it draws: :math:`x_0 = a\,x_T + \sum_i c_i z_i + b`. One batch
    recovers a, b and every c_i (row 0: x_T at its mean, no noise; row 1: x_T + 1; row i + 2: a unit
    impulse of noise at step i), so the output mean :math:`a\,m_T + b` and variance
    :math:`a^2 v_T + \sum_i c_i^2` are exact: no Monte-Carlo error. x_T starts from the true marginal
    :math:`q(x_{t_0}) = \mathcal N(\alpha m, \alpha^2 s^2 + \sigma^2)` at the first sampling step t_0,
    so what remains is the sampler's discretisation error alone.

    Returns ``mean_error``, ``std_error`` and ``w2`` (the 2-Wasserstein distance between the output
    Gaussian and the data Gaussian: sqrt(mean_error^2 + std_error^2)).
    """
    data = GaussianMixture(torch.tensor([[mean]], dtype=torch.float64), std)
    denoiser = Denoiser(data.net(schedule, "sample"), schedule, "sample")
    plan = make_plan(schedule, steps, options.get("spacing", DEFAULT_SPACING), options.get("timesteps"))
    alpha, sigma = (float(v) for v in schedule.alpha_sigma(plan.timesteps[0]))
    start_mean, start_var = alpha * mean, alpha**2 * std**2 + sigma**2
    n = len(plan)
    x_T = torch.full((n + 2, 1), start_mean, dtype=torch.float64)
    x_T[1] += 1.0

    def impulse(i: int, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)
        z[i + 2] = 1.0
        return z

    out = sampler(denoiser, x_T, schedule, steps, noise=impulse, **options)[:, 0]
    gain, noise_gains = out[1] - out[0], out[2:] - out[0]
    out_mean = float(out[0])
    out_std = float((gain**2 * start_var + (noise_gains**2).sum()).sqrt())
    mean_error, std_error = out_mean - mean, out_std - std
    return {"mean_error": mean_error, "std_error": std_error, "w2": (mean_error**2 + std_error**2) ** 0.5}
