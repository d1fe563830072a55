"""Samplers driven by an exact denoiser must reproduce the data; identities between samplers.

The Gaussian checks use :func:`difflab.diffusion.analytic.gaussian_output_error`, which computes the
*exact* output distribution of a sampler on N(1, 0.5^2) data (no Monte-Carlo error), starting from the
true marginal at the first sampling step, so what it measures is discretisation error alone.
Tolerances: each sampler, at the step count it is typically used with, must land within 10% of the
data std (W2 <= 0.05) -- DDPM at 1000 steps within 2% -- and the errors must fall at the rate of the
method's order (first order: halving the step size halves the error; second order: quarters it).
The measured values are in docs/diffusion.md (benchmarks/sampler_convergence.py).
"""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion.analytic import GaussianMixture, gaussian_output_error
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.discretization import make_plan, noise_level
from difflab.diffusion.forward import q_posterior, q_sample
from difflab.diffusion.samplers import SAMPLERS, get_sampler
from difflab.diffusion.schedules import make_schedule
from difflab.errors import DifflabError
from tests.test_diffusion_helpers import mixture  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")
LINEAR = make_schedule("linear")


@pytest.mark.parametrize(
    "sampler, steps, options, tolerance",
    [
        ("ddpm", 1000, {}, 0.01),
        ("ddpm", 1000, {"variance": "fixed_large"}, 0.01),
        ("ddim", 50, {}, 0.05),
        ("ddim", 1000, {"eta": 1.0}, 0.01),
        ("dpmpp_2m", 20, {"spacing": "trailing"}, 0.05),
        ("dpmpp_2m", 50, {}, 0.05),
        ("dpmpp_2m_sde", 20, {"spacing": "trailing"}, 0.05),
        ("dpmpp_2m_sde", 160, {"spacing": "trailing"}, 0.005),
        ("sa_solver", 20, {"spacing": "trailing"}, 0.05),
        ("sa_solver", 20, {"spacing": "trailing", "eta": 1.0}, 0.05),
        ("heun", 18, {}, 0.05),
        ("euler", 50, {}, 0.05),
    ],
)
def test_samplers_reproduce_gaussian_data(sampler, steps, options, tolerance):
    err = gaussian_output_error(get_sampler(sampler), LINEAR, steps, mean=1.0, std=0.5, **options)
    assert err["w2"] < tolerance, err


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_heun_is_second_order_on_the_cosine_schedule(spacing):
    """The cosine schedule starts near sigma = 2e4, where Karras et al.'s trapezoid correction multiplies
    the slopes' disagreement by the step length; Heun must still beat Euler there (regression: W2 was 0.83)."""
    cosine = make_schedule("cosine")
    err = {s: gaussian_output_error(get_sampler(s), cosine, 18, mean=1.0, std=0.5, spacing=spacing)["w2"]
           for s in ("euler", "heun")}  # fmt: skip
    assert err["heun"] < err["euler"] / 3 and err["heun"] < 0.02, err


@pytest.mark.parametrize(
    "sampler, spacing, n, order",
    [
        ("ddim", "linspace", 40, 1),
        ("euler", "trailing", 40, 1),
        ("ddpm", "linspace", 160, 1),
        ("heun", "linspace", 20, 2),
        ("dpmpp_2m", "linspace", 80, 2),
    ],
)
def test_error_falls_at_the_order_of_the_method(sampler, spacing, n, order):
    errs = [gaussian_output_error(get_sampler(sampler), LINEAR, k, spacing=spacing)["w2"] for k in (n, 2 * n)]
    ratio = errs[0] / errs[1]
    assert 2**order * 0.8 < ratio < 2**order * 1.25, (errs, ratio)


@pytest.mark.parametrize(
    "sampler, steps, options",
    [
        ("ddpm", 1000, {}),
        ("ddim", 50, {}),
        ("dpmpp_2m", 20, {"spacing": "trailing"}),
        ("dpmpp_2m_sde", 20, {"spacing": "trailing"}),
        ("sa_solver", 20, {"spacing": "trailing"}),
        ("sa_solver", 20, {"spacing": "trailing", "eta": 1.0}),
        ("heun", 18, {}),
        ("euler", 50, {}),
    ],
)
def test_samplers_reproduce_a_mixture_of_points(sampler, steps, options):
    """Three points with weights 0.5/0.3/0.2: each sample must land on a point (RMS distance < 0.05,
    a tenth of the points' spacing scale), in proportions within 4 standard errors sqrt(p(1-p)/N) of the
    weights (Monte Carlo over N starting points drawn from the true marginal at the first step)."""
    means = torch.tensor([[1.5, 0.0], [-1.5, 0.0], [0.0, 1.5]], dtype=torch.float64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    data = GaussianMixture(means, 0.0, weights)
    n = 3000
    g = torch.Generator().manual_seed(0)
    t0 = int(make_plan(LINEAR, steps, options.get("spacing", "linspace")).timesteps[0])
    x0 = data.sample(n, g)
    x_T = q_sample(LINEAR, x0, t0, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    denoiser = Denoiser(data.net(LINEAR, "epsilon"), LINEAR, "epsilon")
    out = get_sampler(sampler)(denoiser, x_T, LINEAR, steps, noise=g, **options)
    dist, k = torch.cdist(out, means).min(dim=1)
    assert dist.pow(2).mean().sqrt() < 0.05
    frac = torch.bincount(k, minlength=3).double() / n
    se = (weights * (1 - weights) / n).sqrt()
    assert ((frac - weights).abs() < 4 * se).all(), frac


def test_ddim_with_eta_1_has_the_ddpm_posterior_variance():
    """Song et al. (2021), Eq. (16) with eta = 1: sigma_t^2 is exactly the posterior variance of Eq. (7)
    of Ho et al.; over all T steps DDIM(eta=1) and DDPM (fixed_small) are the same sampler."""
    s = LINEAR
    data = mixture(dim=4)
    den = Denoiser(data.net(s, "v_prediction"), s, "v_prediction")
    x_T = torch.zeros(1, 4, dtype=torch.float64)
    for t in (999, 500, 37, 1):
        first = {}

        def keep(i, x, t_, x0, into=first):
            into.setdefault(i, x)

        runs = []
        for z in (0.0, 1.0):
            first.clear()
            get_sampler("ddim")(
                den,
                x_T,
                s,
                timesteps=[t, t - 1],
                eta=1.0,
                noise=lambda i, x, z=z: torch.full_like(x, z),
                callback=keep,
            )
            runs.append(first[0])
        noise_std = (runs[1] - runs[0])[0, 0].item()
        zero = torch.zeros(1, dtype=torch.float64)
        _, var = q_posterior(s, zero, zero, t)
        assert noise_std**2 == pytest.approx(var.item(), rel=1e-9)
    # and whole trajectories over every training step agree, noise for noise
    zs = torch.randn(1000, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = torch.randn(3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a = get_sampler("ddim")(den, x_T, s, 1000, eta=1.0, noise=lambda i, x: zs[i])
    b = get_sampler("ddpm")(den, x_T, s, 1000, noise=lambda i, x: zs[i])
    assert torch.allclose(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
def test_euler_is_ddim_eta_0_in_karras_coordinates(spacing):
    """d = (x/alpha - x0)/sigma = eps_hat, so Euler's x/alpha + (sigma_s - sigma_t) d is DDIM's
    x0 + sigma_s eps_hat (Karras et al. 2022, Sec. 3): same trajectory, written twice."""
    data = mixture(dim=5)
    den = Denoiser(data.net(LINEAR, "epsilon"), LINEAR, "epsilon")
    x_T = torch.randn(4, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = get_sampler("euler")(den, x_T, LINEAR, 12, spacing=spacing)
    b = get_sampler("ddim")(den, x_T, LINEAR, 12, spacing=spacing)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_calls_shapes_dtype_and_determinism(name):
    s = LINEAR
    data = mixture(dim=2 * 3 * 3)
    calls = []

    def net(x, t):
        calls.append(t.clone())
        assert t.dtype == torch.int64 and t.shape == (2,)
        return data.net(s, "epsilon")(x, t)

    den = Denoiser(net, s, "epsilon")
    x_T = torch.randn(2, 2, 3, 3)
    seen = []
    out = get_sampler(name)(
        den,
        x_T,
        s,
        6,
        callback=lambda i, x, t, x0: seen.append((i, x.shape, t, x0.shape)),
        noise=torch.Generator().manual_seed(0),
    )
    plan = make_plan(s, 6)
    assert [(i, t) for i, _, t, _ in seen] == list(enumerate(plan.timesteps.tolist()))
    assert all(shape == x_T.shape and x0_shape == x_T.shape for _, shape, _, x0_shape in seen)
    assert out.shape == x_T.shape and out.dtype == torch.float32
    assert len(calls) == (2 * 6 - 1 if name == "heun" else 6)
    again = get_sampler(name)(den, x_T, s, 6, noise=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_zero_terminal_snr_sampling():
    """With alpha_bar_T = 0, x_T ~ N(0, I) is exactly the marginal; DDIM and DPM-Solver++ start there
    (DPM-Solver++'s first step takes the exact h -> inf limit) and still reproduce the data;
    Euler/Heun, which divide by alpha, refuse with a clear error."""
    z = make_schedule("linear", rescale_zero_snr=True)
    for name, steps in (("ddim", 50), ("dpmpp_2m", 20), ("sa_solver", 20)):
        err = gaussian_output_error(get_sampler(name), z, steps, spacing="trailing")
        assert err["w2"] < 0.05, (name, err)
    den = Denoiser(mixture().net(z, "v_prediction"), z, "v_prediction")
    for name in ("euler", "heun"):
        with pytest.raises(DifflabError, match=f"sampler '{name}'.*zero terminal SNR"):
            get_sampler(name)(den, torch.randn(2, 8), z, 10)
    out = get_sampler("heun")(den, torch.randn(2, 8, dtype=torch.float64), z, 10, spacing="leading")
    assert torch.isfinite(out).all()  # leading never visits T-1, so alpha > 0 throughout


def test_sampler_errors_name_the_bad_value():
    den = Denoiser(lambda x, t: torch.zeros_like(x), LINEAR, "epsilon")
    with pytest.raises(
        DifflabError,
        match=r"unknown sampler 'ddmi' .*; choose one of: ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, sa_solver, euler, heun$",
    ):
        get_sampler("ddmi")
    x = torch.randn(2, 3)
    with pytest.raises(DifflabError, match="eta -0.5 is invalid"):
        get_sampler("ddim")(den, x, LINEAR, 5, eta=-0.5)
    with pytest.raises(DifflabError, match="unknown DDPM variance 'learned'"):
        get_sampler("ddpm")(den, x, LINEAR, 5, variance="learned")
    with pytest.raises(DifflabError, match="noise 3 is invalid"):
        get_sampler("ddpm")(den, x, LINEAR, 5, noise=3)
    with pytest.raises(DifflabError, match="unknown final alpha 'zero'"):
        get_sampler("ddim")(den, x, LINEAR, 5, final_alpha="zero")
    with pytest.raises(DifflabError, match="unknown timestep spacing 'uniform'"):
        get_sampler("heun")(den, x, LINEAR, 5, spacing="uniform")
    assert math.isfinite(get_sampler("dpmpp_2m")(den, x, LINEAR, 1).sum().item())


def test_dpmpp_2m_sde_with_eta_0_is_the_ode_solver_and_eta_is_checked():
    """eta scales the forgetting and the fresh noise (k-diffusion's eta): at 0 no noise is drawn and every
    step is DPM-Solver++(2M)'s, bit for bit; a negative eta is named."""
    data = mixture(dim=6, std=0.3)
    s = make_schedule("cosine")
    den = Denoiser(data.net(s, "epsilon"), s, "epsilon")
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def no_noise(i, x):
        raise AssertionError("eta = 0 drew noise")

    ode = get_sampler("dpmpp_2m")(den, x, s, 12, spacing="trailing")
    assert torch.equal(
        get_sampler("dpmpp_2m_sde")(den, x, s, 12, spacing="trailing", eta=0.0, noise=no_noise), ode
    )
    with pytest.raises(DifflabError, match="eta -0.5 is invalid"):
        get_sampler("dpmpp_2m_sde")(den, x, s, 12, eta=-0.5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_sa_solver_is_exact_when_x0_is_linear_in_lambda(schedule):
    r"""If the network's x0 estimate along the path is a + b * lambda, the probability-flow ODE has a closed
    form, x(l) = (sigma_l / sigma_t) x_t + sigma_l * [e^lambda (a + b lambda - b)] from lambda_t to l. SA-Solver's
    exact coefficients integrate a line exactly, extrapolated (predictor) or interpolated (corrector), so
    from the second step on every sample lands on the closed form to rounding. The first step is first
    order until the corrector redoes it, so without the corrector the error stays; the 'bh1' coefficients
    are off at O(h^3) per step."""
    s = make_schedule(schedule)
    g = torch.Generator().manual_seed(0)
    a, b, x_T = (torch.randn(3, 4, dtype=torch.float64, generator=g) for _ in range(3))

    def den(x, t):
        level = noise_level(float(s.alphas_cumprod[t]))
        x0 = a + b * level.lam
        return (x - level.alpha * x0) / level.sigma, x0

    steps = 12
    plan = make_plan(s, steps, "trailing")
    start = plan.level(0)

    def exact(i):  # the ODE's solution at level i + 1, where the callback of step i reports
        end = plan.level(i + 1)
        integral = end.alpha * (a + b * end.lam - b) - end.sigma * math.exp(start.lam) * (
            a + b * start.lam - b
        )
        return end.sigma / start.sigma * x_T + integral

    def errors(**options):
        seen = []
        get_sampler("sa_solver")(den, x_T, s, steps, spacing="trailing", callback=lambda i, x, t, x0: seen.append(x),
                                 **options)  # fmt: skip
        return [float((x - exact(i)).abs().max() / exact(i).abs().max()) for i, x in enumerate(seen[:-1])]

    assert max(errors()[1:]) < 1e-12
    assert min(errors(corrector=False)[1:]) > 1e-4
    assert max(errors(coefficients="bh1")[1:]) > 1e-4


def test_sa_solver_errors_name_the_bad_value():
    den = Denoiser(lambda x, t: torch.zeros_like(x), LINEAR, "epsilon")
    x = torch.randn(2, 3)
    with pytest.raises(DifflabError, match="eta -1.0 is invalid; expected eta >= 0"):
        get_sampler("sa_solver")(den, x, LINEAR, 5, eta=-1.0)
    with pytest.raises(DifflabError, match="unknown SA-Solver coefficients 'midpoint'"):
        get_sampler("sa_solver")(den, x, LINEAR, 5, coefficients="midpoint")
    z = make_schedule("linear", rescale_zero_snr=True)
    with pytest.raises(DifflabError, match="coefficients 'bh1' cannot step from zero SNR"):
        get_sampler("sa_solver")(Denoiser(mixture().net(z, "v_prediction"), z, "v_prediction"), torch.randn(2, 8), z,
                                 5, spacing="trailing", coefficients="bh1")  # fmt: skip
