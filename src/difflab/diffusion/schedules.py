r"""Noise schedules: how much signal survives at each of the T training steps.

Glossary (paper symbol -> name here; discrete view, 0-based index ``t = 0..T-1`` as in diffusers,
so index ``t`` is step ``t + 1`` of Ho et al. (2020)):

    \beta_t                                  betas             variance added by step t (Eq. 2 of Ho et al.)
    \alpha_t = 1 - \beta_t                   alphas
    \bar\alpha_t = \prod_{s<=t} \alpha_s     alphas_cumprod    signal fraction left at step t (Eq. 4)
    \alpha_t, \sigma_t (continuous, VP)      alpha_sigma(t)    sqrt(\bar\alpha_t), sqrt(1 - \bar\alpha_t)
    SNR(t) = \alpha_t^2 / \sigma_t^2         snr               signal-to-noise ratio (Kingma et al. 2021)
    \log SNR(t) = 2\lambda_t                log_snr           \lambda_t = \log(\alpha_t/\sigma_t): DPM-Solver
    \sigma^{VE}_t = \sigma_t / \alpha_t      sigmas            Karras et al. (2022) noise level of x/\alpha

Every schedule is computed in float64 and stored in float64; callers cast where they use it. Float32
is not enough here: \bar\alpha_T of the linear schedule is a product of 1000 factors near one and
ends at 4.04e-5, where float32 cumprod already loses the sixth digit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from difflab.errors import DifflabError, check_choice


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dimensions so a per-sample ``(B,)`` coefficient broadcasts over
    ``(B, C, H, W)``: ``(B,) -> (B, 1, 1, 1)`` for ``ndim = 4``."""
    missing = ndim - v.ndim
    if missing < 0:
        raise ValueError(f"cannot append dims to a {v.ndim}-d tensor to reach {ndim} dims")
    return v[(...,) + (None,) * missing]


def broadcast_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample float64 CPU coefficients ``(B,)`` (or one, 0-d) -> ``(B, 1, ..., 1)`` in ``like``'s dtype
    and device. The cast happens on the CPU first, so float64 schedules also serve devices without
    float64 (MPS)."""
    return append_dims(values.to(like.dtype), like.ndim).to(like.device)


def per_sample(t, batch: int) -> torch.Tensor:
    """A timestep given as an int, a 0-d tensor or a ``(B,)`` tensor -> ``(B,)`` tensor on the CPU."""
    t = torch.as_tensor(t).cpu()
    return t.expand(batch) if t.ndim == 0 else t


# --- beta schedules --------------------------------------------------------------------------------
# Each takes (T, **options) and returns (T,) float64 betas.


def linear_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear schedule of Ho et al. (2020, Sec. 4): beta_t from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def scaled_linear_betas(timesteps: int, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Stable Diffusion's schedule (Rombach et al. 2022): sqrt(beta_t) linear from sqrt(0.00085) to
    sqrt(0.012), so beta grows quadratically and the latents keep more signal early on."""
    return torch.linspace(math.sqrt(beta_start), math.sqrt(beta_end), timesteps, dtype=torch.float64) ** 2


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    r"""Cosine schedule, Eq. (17) of Nichol & Dhariwal (2021):
    :math:`\bar\alpha(t) = f(t)/f(0)`, :math:`f(t) = \cos^2\big(\frac{t/T + s}{1 + s}\frac{\pi}{2}\big)`,
    and :math:`\beta_t = \min(1 - \bar\alpha(t)/\bar\alpha(t-1), 0.999)` so the last step is not a
    division by zero (f(T) = 0)."""
    u = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # (T + 1,), f(0) cancels in the ratio
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def sigmoid_betas(timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Sigmoid beta schedule of Xu et al. (2022, GeoDiff): beta_t = beta_start + (beta_end - beta_start)
    * sigmoid(u), u linear from -6 to 6. (Not the sigmoid *alpha-bar* schedule of Jabri et al. 2023.)"""
    u = torch.linspace(-6, 6, timesteps, dtype=torch.float64)
    return beta_start + (beta_end - beta_start) * torch.sigmoid(u)


BETA_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": linear_betas,
    "cosine": cosine_betas,
    "scaled_linear": scaled_linear_betas,
    "sigmoid": sigmoid_betas,
}


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    r"""Algorithm 1 of Lin et al. (2024): shift and scale :math:`\sqrt{\bar\alpha_t}` so that the last
    step has exactly zero signal (SNR(T) = 0) while the first step keeps its value, then undo the
    cumulative product. The last beta becomes exactly 1.

    (T,) float64 -> (T,) float64
    """
    sqrt_ab = torch.cumprod(1 - betas.double(), dim=0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)  # step 1-2: shift to 0 at T, keep the value at 1
    alphas_cumprod = sqrt_ab**2
    alphas = torch.cat([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])  # undo cumprod
    return 1 - alphas


# --- the schedule object ---------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Schedule:
    """A discrete variance-preserving noise schedule (float64 throughout). Build it with
    :func:`make_schedule` or :meth:`Schedule.from_betas`; every other quantity derives from ``betas``."""

    name: str
    betas: torch.Tensor  # (T,) float64
    alphas_cumprod: torch.Tensor  # (T,) float64

    @classmethod
    def from_betas(cls, betas: torch.Tensor, name: str = "custom") -> Schedule:
        betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas.numel() < 2 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise DifflabError(f"schedule '{name}': betas must be at least 2 values in (0, 1]")
        return cls(name, betas, torch.cumprod(1 - betas, dim=0))

    @property
    def timesteps(self) -> int:
        """T, the number of training steps."""
        return self.betas.numel()

    @property
    def alphas(self) -> torch.Tensor:
        return 1 - self.betas

    @property
    def snr(self) -> torch.Tensor:
        r""":math:`\bar\alpha_t / (1 - \bar\alpha_t)`; zero at t = T-1 for a zero-terminal-SNR schedule."""
        return self.alphas_cumprod / (1 - self.alphas_cumprod)

    @property
    def log_snr(self) -> torch.Tensor:
        r""":math:`\log \mathrm{SNR}(t) = \log\bar\alpha_t - \log(1-\bar\alpha_t)`; -inf at zero terminal SNR.
        DPM-Solver's time variable is half of it, :math:`\lambda_t = \log(\alpha_t/\sigma_t)`."""
        return torch.log(self.alphas_cumprod) - torch.log1p(-self.alphas_cumprod)

    @property
    def sigmas(self) -> torch.Tensor:
        r"""Karras et al. (2022) noise levels :math:`\sigma^{VE}_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}`:
        ``x_t / alpha_t = x_0 + sigma^VE_t * eps``. Infinite at a zero-SNR last step."""
        return ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self.alphas_cumprod[-1] == 0)

    def check_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Return ``t`` as an int64 CPU tensor after checking it indexes a training step 0..T-1."""
        t = torch.as_tensor(t)
        if t.is_floating_point() or t.is_complex():
            raise DifflabError(
                f"timesteps must be integer indices 0..{self.timesteps - 1} (diffusers convention), "
                f"got dtype {t.dtype}"
            )
        t = t.to("cpu", torch.int64)
        bad = t[(t < 0) | (t >= self.timesteps)]
        if bad.numel():
            raise DifflabError(f"timestep {int(bad[0])} is out of range; expected 0..{self.timesteps - 1}")
        return t

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The continuous view: :math:`(\alpha_t, \sigma_t) = (\sqrt{\bar\alpha_t}, \sqrt{1-\bar\alpha_t})`,
        so :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon` (Eq. 4 of Ho et al. 2020). Float64, same shape
        as ``t``, on the CPU."""
        ab = self.alphas_cumprod[self.check_timesteps(t)]
        return ab.sqrt(), (1 - ab).sqrt()


def make_schedule(
    name: str = "linear",
    timesteps: int = 1000,
    *,
    rescale_zero_snr: bool = False,
    beta_start: float | None = None,
    beta_end: float | None = None,
) -> Schedule:
    """Build a named schedule: ``linear`` (DDPM), ``cosine`` (improved DDPM), ``scaled_linear`` (Stable
    Diffusion), ``sigmoid`` (GeoDiff); optionally rescaled to zero terminal SNR (Lin et al. 2024).

    ``beta_start``/``beta_end`` override the linear, scaled-linear and sigmoid ranges (each schedule
    keeps its paper's defaults otherwise); the cosine schedule has no beta range.

    >>> s = make_schedule("linear")
    >>> round(s.alphas_cumprod[-1].item(), 10)
    4.03583e-05
    """
    check_choice("schedule", name, BETA_SCHEDULES)
    if not isinstance(timesteps, int) or timesteps < 2:
        raise DifflabError(f"timesteps {timesteps!r} is invalid; expected an integer >= 2")
    overrides = {k: v for k, v in (("beta_start", beta_start), ("beta_end", beta_end)) if v is not None}
    if name == "cosine" and overrides:
        raise DifflabError(f"{', '.join(overrides)} does not apply to the cosine schedule")
    betas = BETA_SCHEDULES[name](timesteps, **overrides)
    if rescale_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
        name = f"{name}+zero_snr"
    return Schedule.from_betas(betas, name)
