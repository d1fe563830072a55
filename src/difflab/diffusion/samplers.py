r"""Samplers: pure functions over one denoiser interface (:class:`difflab.diffusion.denoiser.Denoiser`).

Every sampler has the same signature::

    sample_x(denoiser, x_T, schedule, steps=50, *, spacing="linspace", timesteps=None, cond=None,
             noise=None, callback=None, progress=False, **options) -> x_0

- ``denoiser(x, t, **cond) -> (eps_hat, x0_hat)``; ``t`` an integer training step 0..T-1.
- ``x_T``: the starting noise in the variance-preserving scale, ``N(0, I)`` (also for Euler and Heun,
  which rescale internally; diffusers instead multiplies its initial noise by ``init_noise_sigma``).
- ``spacing``/``timesteps``: which steps to visit (:mod:`difflab.diffusion.discretization`).
- ``noise``: where stochastic samplers draw fresh noise: ``None`` (torch's global RNG), a
  ``torch.Generator``, or a callable ``noise(i, x) -> tensor shaped like x`` for full determinism.
- ``callback(i, x, t, pred_x0)`` after step i: ``x`` the new sample, ``t`` the timestep the network
  was evaluated at, ``pred_x0`` its x0 estimate there.

Glossary: index i runs over the plan; "t" is level i (noisier), "s" is level i + 1 (the target).
All coefficients are Python floats computed in double precision; tensors keep ``x_T``'s dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from difflab.diffusion.discretization import DEFAULT_SPACING, SamplingPlan, make_plan
from difflab.diffusion.forward import posterior_coefficients, strided_beta
from difflab.diffusion.schedules import Schedule
from difflab.errors import DifflabError, check_choice

Update = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def noise_source(noise) -> Callable[[int, torch.Tensor], torch.Tensor]:
    """Normalise the ``noise`` argument to a function ``(i, x) -> standard normal tensor like x``."""
    if noise is None:
        return lambda i, x: torch.randn_like(x)
    if isinstance(noise, torch.Generator):
        gen = noise
        return lambda i, x: torch.randn(x.shape, generator=gen, dtype=x.dtype, device=gen.device).to(x.device)
    if callable(noise):
        return noise
    raise DifflabError(f"noise {noise!r} is invalid; expected None, a torch.Generator or a callable (i, x)")


def run_steps(
    name: str, denoiser, x: torch.Tensor, plan: SamplingPlan, update: Update, *, cond, callback, progress
) -> torch.Tensor:
    """The loop every sampler shares: evaluate the denoiser at step i, apply the sampler's update,
    report to the callback. ``update(i, x, eps_hat, x0_hat) -> x`` holds the sampler's equation."""
    cond = cond or {}
    for i in tqdm(range(len(plan)), desc=name, disable=not progress):
        t = int(plan.timesteps[i])
        eps, x0 = denoiser(x, t, **cond)
        x = update(i, x, eps, x0)
        if callback is not None:
            callback(i, x, t, x0)
    return x


def sample_ddpm(
    denoiser, x_T, schedule: Schedule, steps: int = 50, *, spacing: str = DEFAULT_SPACING, timesteps=None,
    cond=None, noise=None, callback=None, progress: bool = False, variance: str = "fixed_small",
) -> torch.Tensor:  # fmt: skip
    r"""Ancestral sampling, Algorithm 2 of Ho et al. (2020): :math:`x_s \sim q(x_s | x_t, \hat x_0)`,
    the posterior of Eqs. (6)-(7) with the model's x0 estimate, over any subsequence of steps.

    ``variance``: ``"fixed_small"`` uses :math:`\tilde\beta_t` (the posterior variance),
    ``"fixed_large"`` uses :math:`\beta_t` (both in Sec. 3.2 of Ho et al.). No noise on the last step
    ("z = 0 if t = 1" in Algorithm 2).
    """
    check_choice("DDPM variance", variance, ("fixed_small", "fixed_large"))
    plan, draw = make_plan(schedule, steps, spacing, timesteps), noise_source(noise)

    def update(i, x, eps, x0):
        ab_t, ab_s = plan.level(i).alpha_bar, plan.level(i + 1).alpha_bar
        c0, ct, tilde_beta = posterior_coefficients(ab_t, ab_s)
        mean = float(c0) * x0 + float(ct) * x  # Eq. (7): posterior mean given x0_hat
        if i == len(plan) - 1:
            return mean
        var = float(tilde_beta if variance == "fixed_small" else strided_beta(ab_t, ab_s))
        return mean + math.sqrt(var) * draw(i, x)

    return run_steps("ddpm", denoiser, x_T, plan, update, cond=cond, callback=callback, progress=progress)


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: float) -> torch.Tensor:
    r"""The deterministic DDIM move (Eq. 12 with :math:`\sigma = 0`) of a pair (x̂0, ε̂) to the level
    :math:`\bar\alpha`: :math:`\sqrt{\bar\alpha}\,\hat x_0 + \sqrt{1-\bar\alpha}\,\hat\epsilon`. Towards
    the data it is a sampling step; towards the noise, a step of DDIM inversion."""
    return math.sqrt(alpha_bar) * x0 + math.sqrt(1 - alpha_bar) * eps


def sample_ddim(
    denoiser, x_T, schedule: Schedule, steps: int = 50, *, spacing: str = DEFAULT_SPACING, timesteps=None,
    cond=None, noise=None, callback=None, progress: bool = False, eta: float = 0.0, final_alpha: str = "one",
) -> torch.Tensor:  # fmt: skip
    r"""DDIM update, Eq. (12) of Song et al. (2021):

    .. math:: x_s = \sqrt{\bar\alpha_s}\,\hat x_0 + \sqrt{1-\bar\alpha_s-\sigma^2}\,\hat\epsilon + \sigma z,
              \quad \sigma = \eta\sqrt{\tilde\beta_{t|s}}\ \ \text{(Eq. 16)}

    ``eta = 0`` is the deterministic DDIM, ``eta = 1`` has DDPM's posterior variance.
    ``final_alpha="first"`` ends on \bar\alpha_0 instead of 1, like diffusers' ``set_alpha_to_one=False``.
    """
    if eta < 0:
        raise DifflabError(f"eta {eta} is invalid; expected eta >= 0 (0: deterministic, 1: DDPM variance)")
    plan, draw = make_plan(schedule, steps, spacing, timesteps, final_alpha), noise_source(noise)

    def update(i, x, eps, x0):
        ab_t, ab_s = plan.level(i).alpha_bar, plan.level(i + 1).alpha_bar
        var = eta**2 * float(posterior_coefficients(ab_t, ab_s)[2])  # sigma_t(eta)^2, Eq. (16)
        x = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - var, 0.0)) * eps  # Eq. (12)
        return x + math.sqrt(var) * draw(i, x) if var > 0 else x

    return run_steps("ddim", denoiser, x_T, plan, update, cond=cond, callback=callback, progress=progress)


def _multistep_x0(x0: torch.Tensor, prev_x0: torch.Tensor | None, prev_h: float | None, h: float):
    r"""DPM-Solver++(2M)'s data estimate D for a step of log-SNR length h: :math:`\hat x_0` itself on the
    first step (no history), else :math:`(1 + \tfrac{1}{2r})\hat x_0^{(i)} - \tfrac{1}{2r}\hat x_0^{(i-1)}`
    with :math:`r = h_{i-1} / h`. Shared by the ODE and SDE solvers."""
    if prev_x0 is None:
        return x0
    r = prev_h / h
    return (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * prev_x0


def sample_dpmpp_2m(
    denoiser, x_T, schedule: Schedule, steps: int = 50, *, spacing: str = DEFAULT_SPACING, timesteps=None,
    cond=None, noise=None, callback=None, progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    r"""DPM-Solver++(2M), Algorithm 2 of Lu et al. (2022, "DPM-Solver++"): multistep second order in
    the data prediction :math:`\hat x_0`, with :math:`h = \lambda_s - \lambda_t`:

    .. math:: x_s = \frac{\sigma_s}{\sigma_t} x_t - \alpha_s (e^{-h} - 1) D,\quad
              D = \big(1 + \tfrac{1}{2r}\big)\hat x_0^{(i)} - \tfrac{1}{2r}\hat x_0^{(i-1)},\quad
              r = h_{i-1} / h_i

    The first step is first order (:math:`D = \hat x_0`, no history yet); so is the last, which
    lands on \sigma = 0 where h is infinite and the update returns :math:`\hat x_0` (as in
    k-diffusion and diffusers' ``final_sigmas_type="zero"``). Deterministic: ``noise`` is unused.
    """
    plan = make_plan(schedule, steps, spacing, timesteps)
    prev_x0, prev_h = None, None  # the multistep history lives here, not in an object

    def update(i, x, eps, x0):
        nonlocal prev_x0, prev_h
        t, s = plan.level(i), plan.level(i + 1)
        h = s.lam - t.lam
        d = x0 if s.sigma == 0 else _multistep_x0(x0, prev_x0, prev_h, h)
        prev_x0, prev_h = x0, h
        return (s.sigma / t.sigma) * x - s.alpha * math.expm1(-h) * d

    return run_steps("dpmpp_2m", denoiser, x_T, plan, update, cond=cond, callback=callback, progress=progress)


def sample_dpmpp_2m_sde(
    denoiser, x_T, schedule: Schedule, steps: int = 50, *, spacing: str = DEFAULT_SPACING, timesteps=None,
    cond=None, noise=None, callback=None, progress: bool = False, eta: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    r"""SDE-DPM-Solver++(2M): the multistep second-order solver of Lu et al. (2022, "DPM-Solver++") for
    the reverse *SDE* instead of the probability-flow ODE (their Sec. 5 and App. on SDE solvers;
    k-diffusion's ``sample_dpmpp_2m_sde``, diffusers' ``algorithm_type="sde-dpmsolver++"``). Same
    :math:`h`, :math:`r` and :math:`D` as :func:`sample_dpmpp_2m`, but a step forgets twice as fast and
    injects fresh noise of exactly the variance it forgot:

    .. math:: x_s = \frac{\sigma_s}{\sigma_t} e^{-h} x_t + \alpha_s (1 - e^{-2h}) D
              + \sigma_s \sqrt{1 - e^{-2h}}\, z

    Why have it: on a model whose x0 estimates are imperfect, the injected noise lets later steps
    correct earlier mistakes, as ancestral DDPM does at 1,000 steps, at the cost of a second-order
    solver's step count (docs/benchmarks.md, samplers against NFE). The first step is first order, and so
    is the last, which lands on \sigma = 0 and returns :math:`\hat x_0`.

    ``eta`` scales how much is forgotten and re-noised (k-diffusion's ``eta``): the step is
    :math:`x_s = \frac{\sigma_s}{\sigma_t} e^{-\eta h} x_t + \alpha_s (1 - e^{-(1+\eta) h}) D
    + \sigma_s \sqrt{1 - e^{-2\eta h}}\, z`, with the second-order term of D weighted by the same
    :math:`1 - e^{-(1+\eta)h}`. ``eta = 1`` is the SDE above; ``eta = 0`` is exactly
    :func:`sample_dpmpp_2m`, the ODE solver.
    """
    if eta < 0:
        raise DifflabError(f"eta {eta} is invalid; expected eta >= 0 (0: the ODE solver, 1: the SDE)")
    plan, draw = make_plan(schedule, steps, spacing, timesteps), noise_source(noise)
    prev_x0, prev_h = None, None

    def update(i, x, eps, x0):
        nonlocal prev_x0, prev_h
        t, s = plan.level(i), plan.level(i + 1)
        if s.sigma == 0:  # h is infinite: e^{-h} = 0 and no noise is left to add
            return x0
        h = s.lam - t.lam
        d = _multistep_x0(x0, prev_x0, prev_h, h)
        prev_x0, prev_h = x0, h
        forget = -math.expm1(-(1 + eta) * h)  # 1 - e^{-(1+eta)h}, accurate for small h
        x = (s.sigma / t.sigma) * math.exp(-eta * h) * x + s.alpha * forget * d
        if eta == 0:
            return x
        return x + s.sigma * math.sqrt(-math.expm1(-2 * eta * h)) * draw(i, x)

    return run_steps(
        "dpmpp_2m_sde", denoiser, x_T, plan, update, cond=cond, callback=callback, progress=progress
    )


SA_COEFFICIENTS = ("exact", "bh1")


def _adams_slope_weight(kh: float, coefficients: str) -> float:
    r"""The weight :math:`\psi` of an x0 estimate's change over one step in
    :math:`k\int_0^h e^{-kv}\,\hat x_0(\lambda_s - v)\,dv` when :math:`\hat x_0` is linear in
    :math:`\lambda` (``kh`` is :math:`(1+\eta)h`): ``"exact"`` integrates the line,
    :math:`\psi = 1 - (1 - e^{-kh})/(kh)`; ``"bh1"`` takes :math:`kh/2`, which differs at
    :math:`O(h^2)` (diffusers' SASolverScheduler adds that difference "similar to UniPC", whose
    :math:`B(h) = h` it is)."""
    if coefficients == "bh1":
        if math.isinf(kh):
            raise DifflabError(
                "SA-Solver coefficients 'bh1' cannot step from zero SNR (h is infinite); use 'exact'"
            )
        return kh / 2
    return 1 + math.expm1(-kh) / kh  # 1 at h = inf (a step from zero SNR)


def sample_sa_solver(
    denoiser, x_T, schedule: Schedule, steps: int = 50, *, spacing: str = DEFAULT_SPACING, timesteps=None,
    cond=None, noise=None, callback=None, progress: bool = False, eta: float = 0.0, corrector: bool = True,
    coefficients: str = "exact",
) -> torch.Tensor:  # fmt: skip
    r"""SA-Solver (Xue et al., NeurIPS 2023, "Stochastic Adams Solver"), two-step predictor and
    corrector: a linear multistep solver of the variance-controlled reverse SDE in the data prediction.

    With :math:`k = 1 + \eta` and :math:`h = \lambda_s - \lambda_t`, a step solves the linear part
    exactly and leaves one integral of the x0 estimate along the path:

    .. math:: x_s = \frac{\sigma_s}{\sigma_t} e^{-\eta h} x_t
              + \alpha_s\, k\!\int_0^h e^{-kv}\,\hat x_0(\lambda_s - v)\,dv
              + \sigma_s \sqrt{1 - e^{-2\eta h}}\, z

    (``eta`` is Xue et al.'s :math:`\tau^2`, and k-diffusion's ``eta`` of :func:`sample_dpmpp_2m_sde`;
    ``eta = 0`` is the probability-flow ODE). The integral is taken exactly for a line through two x0
    estimates, :math:`\alpha_s[\varphi\,\hat x_0^{(t)} + \psi\,\Delta]` with
    :math:`\varphi = 1 - e^{-kh}` and :math:`\psi` from :func:`_adams_slope_weight`:

    - **predictor** (Adams-Bashforth): the line through the last two estimates, extrapolated,
      :math:`\Delta = (\hat x_0^{(t)} - \hat x_0^{(t')}) / r` with :math:`r = h_{prev}/h`;
    - **corrector** (Adams-Moulton): once the network has seen the predicted :math:`x_s`, the same step
      is taken again with the line through :math:`\hat x_0^{(t)}` and :math:`\hat x_0^{(s)}`
      (:math:`\Delta = \hat x_0^{(s)} - \hat x_0^{(t)}`) and the same :math:`z`. The next step starts
      from the corrected sample and reuses :math:`\hat x_0^{(s)}`, so the corrector costs no network
      evaluation (as in UniPC, Zhao et al. 2023); ``callback`` sees the predicted sample.

    The first step is first order, and the last lands on \sigma = 0 and returns :math:`\hat x_0`.
    Why have it: on a trained model at few steps, the corrected ODE (``eta = 0``, the default) comes
    closer to ancestral DDPM at 1,000 steps than SDE-DPM-Solver++(2M) does (measured on ``ldm_toy``:
    docs/benchmarks.md, samplers against NFE).
    ``coefficients="bh1"`` reproduces diffusers' ``SASolverScheduler`` (``predictor_order=2,
    corrector_order=2``, constant ``tau = sqrt(eta)``) step for step, up to its last step, which ends
    on \sigma_0 rather than 0.
    """
    if eta < 0:
        raise DifflabError(f"eta {eta} is invalid; expected eta >= 0 (0: the ODE, 1: the reverse SDE)")
    check_choice("SA-Solver coefficients", coefficients, SA_COEFFICIENTS)
    plan, draw = make_plan(schedule, steps, spacing, timesteps), noise_source(noise)
    k = 1 + eta
    last = None  # the step just taken: (x_t, x0_t, z, level t); the multistep history

    def step(x, x0, delta, t, s, z):
        h = s.lam - t.lam
        phi, psi = -math.expm1(-k * h), _adams_slope_weight(k * h, coefficients)  # phi = 1 - e^{-kh}
        decay = math.exp(-eta * h) if eta > 0 else 1.0  # not e^{-0 * inf} (nan) on a step from zero SNR
        x = (s.sigma / t.sigma) * decay * x + s.alpha * (phi * x0 + psi * delta)
        return x if z is None else x + s.sigma * math.sqrt(-math.expm1(-2 * eta * h)) * z

    def update(i, x, eps, x0):
        nonlocal last
        t, s = plan.level(i), plan.level(i + 1)
        if s.sigma == 0:  # h is infinite: the step returns the x0 estimate (a correction would go unused)
            return x0
        delta = torch.zeros_like(x0)
        if last is not None:
            x_prev, x0_prev, z_prev, t_prev = last
            if corrector:  # redo the last step with the line through x0_t' and x0 here
                x = step(x_prev, x0_prev, x0 - x0_prev, t_prev, t, z_prev)
            h, h_prev = s.lam - t.lam, t.lam - t_prev.lam
            delta = (x0 - x0_prev) * (h / h_prev)  # the slope over the last step, times this step's h
        z = draw(i, x) if eta > 0 else None
        last = (x, x0, z, t)
        return step(x, x0, delta, t, s, z)

    return run_steps(
        "sa_solver", denoiser, x_T, plan, update, cond=cond, callback=callback, progress=progress
    )


def _karras_plan(schedule, steps, spacing, timesteps, name) -> SamplingPlan:
    plan = make_plan(schedule, steps, spacing, timesteps)
    if plan.level(0).alpha == 0:
        raise DifflabError(
            f"sampler '{name}' steps in sigma = sigma_t/alpha_t, which is infinite at timestep "
            f"{int(plan.timesteps[0])} (zero terminal SNR); use ddim, ddpm or dpmpp_2m for this schedule"
        )
    return plan


def _ode_slope(x: torch.Tensor, x0: torch.Tensor, level) -> torch.Tensor:
    """Slope of the probability-flow ODE in Karras et al.'s coordinates (x/alpha, sigma/alpha):
    d = (x/alpha - D(x)) / sigma: Algorithm 1's slope for sigma(t) = t, s(t) = 1, with D(x) = x0_hat."""
    return (x / level.alpha - x0) / level.ve_sigma


def _euler_step(x: torch.Tensor, d: torch.Tensor, t, s) -> torch.Tensor:
    """x/alpha moves by (sigma_s - sigma_t) * d; returned in the VP scale of level s."""
    return (x / t.alpha + (s.ve_sigma - t.ve_sigma) * d) * s.alpha


def sample_euler(
    denoiser, x_T, schedule: Schedule, steps: int = 50, *, spacing: str = DEFAULT_SPACING, timesteps=None,
    cond=None, noise=None, callback=None, progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    r"""Euler's method: the first-order step of Algorithm 1 of Karras et al. (2022) without its correction
    (the Euler step of their Algorithm 2 with :math:`S_\mathrm{churn} = 0`), over the discrete schedule's
    sigmas :math:`\sigma_i = \sqrt{(1-\bar\alpha)/\bar\alpha}` ending at 0:
    :math:`d = (x - D(x;\sigma_i))/\sigma_i,\ x_{i+1} = x_i + (\sigma_{i+1}-\sigma_i) d`.
    Since :math:`d = \hat\epsilon`, this is algebraically DDIM with eta = 0. ``noise`` is unused."""
    plan = _karras_plan(schedule, steps, spacing, timesteps, "euler")

    def update(i, x, eps, x0):
        t, s = plan.level(i), plan.level(i + 1)
        return _euler_step(x, _ode_slope(x, x0, t), t, s)

    return run_steps("euler", denoiser, x_T, plan, update, cond=cond, callback=callback, progress=progress)


HEUN_MAX_SIGMA = 1000.0
"""Above this sigma Heun takes plain Euler steps: far above Karras et al.'s sigma_max = 80 and the linear
and scaled-linear schedules' 157 and 14.6 (so Heun still equals diffusers' there), far below cosine's ~2e4."""


def sample_heun(
    denoiser, x_T, schedule: Schedule, steps: int = 50, *, spacing: str = DEFAULT_SPACING, timesteps=None,
    cond=None, noise=None, callback=None, progress: bool = False,
) -> torch.Tensor:  # fmt: skip
    r"""Heun's second-order method, Algorithm 1 of Karras et al. (2022) (their Algorithm 2 with
    :math:`S_\mathrm{churn} = 0`): an Euler step to :math:`\sigma_{i+1}`, then, unless
    :math:`\sigma_{i+1} = 0`, a correction with the average of the slopes at both ends. The second
    evaluation is at timestep :math:`t_{i+1}`, so n steps cost 2n - 1 network calls. ``noise`` is unused.

    One departure: a step that starts above :data:`HEUN_MAX_SIGMA` takes the Euler step alone (one call
    fewer). The trapezoid moves x/alpha by :math:`(\sigma_{i+1}-\sigma_i)(d_i + d_{i+1})/2`, so any
    disagreement between the two slopes is multiplied by the step's length in sigma. Karras et al. start
    at sigma = 80; the cosine schedule's clipped last beta puts its first sigma near 2e4, where this
    product swamps the image (measured on Gaussian data: docs/diffusion.md, "Samplers"). Diffusers'
    HeunDiscreteScheduler has no such guard."""
    plan = _karras_plan(schedule, steps, spacing, timesteps, "heun")
    cond_kwargs = cond or {}

    def update(i, x, eps, x0):
        t, s = plan.level(i), plan.level(i + 1)
        d = _ode_slope(x, x0, t)
        x_euler = _euler_step(x, d, t, s)
        if s.ve_sigma == 0 or t.ve_sigma > HEUN_MAX_SIGMA:
            return x_euler
        _, x0_s = denoiser(x_euler, int(plan.timesteps[i + 1]), **cond_kwargs)
        return _euler_step(x, (d + _ode_slope(x_euler, x0_s, s)) / 2, t, s)  # trapezoid rule

    return run_steps("heun", denoiser, x_T, plan, update, cond=cond, callback=callback, progress=progress)


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "sa_solver": sample_sa_solver,
    "euler": sample_euler,
    "heun": sample_heun,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    """Look a sampler up by name: ``get_sampler("ddim")(denoiser, x_T, schedule, steps=50)``."""
    return SAMPLERS[check_choice("sampler", name, SAMPLERS)]
