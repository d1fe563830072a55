"""Every sampler against diffusers' scheduler of the same algorithm, an independent implementation.

Two checks per (sampler, schedule, prediction type, spacing):
- one step at a time: from the same sample and the same model output (random tensors, fed in call
  order), every step lands on the same sample to 1e-5 relative;
- a whole 25-step trajectory driven by the exact denoiser of a Gaussian mixture (so each step's model
  output depends on the sample) ends at the same point to 1e-4 relative.

diffusers is configured to match: clip_sample=False, set_alpha_to_one=True (our default end),
final_sigmas_type="zero", no Karras sigmas, and explicit ``timesteps=`` where its own spacing differs
from Lin et al. (2024) Table 2 (DPM-Solver's linspace/leading; Euler/Heun's unrounded linspace). Our
x_T is in the variance-preserving scale; for Euler/Heun diffusers' latents are x_T * sqrt(sigma_max^2 + 1).
It is also handed our float64 schedule (test_diffusion_schedules compares the schedules themselves):
with its own float32 alpha_bar, 1 - alpha_bar near t = 0 keeps only ~3 digits (cosine: sigma_0 is off by
2.6e-4 relative), which alone moves a 25-step Heun trajectory by 4e-3.
"""

from __future__ import annotations

import math

import pytest
import torch

from difflab.diffusion.denoiser import Denoiser, clip_denoised
from difflab.diffusion.discretization import timestep_spacing
from difflab.diffusion.objectives import PREDICTION_TYPES
from difflab.diffusion.samplers import HEUN_MAX_SIGMA, get_sampler
from difflab.diffusion.schedules import make_schedule
from tests.test_diffusion_helpers import mixture, rel_err  # noqa: F401

diffusers = pytest.importorskip("diffusers")
pytestmark = [
    pytest.mark.usefixtures("single_thread"),
    # numpy 2 deprecation inside diffusers' set_timesteps, not ours
    pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning"),
]

SCHEDULES = {  # our name -> diffusers' config for the same betas
    "linear": dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02),
    "cosine": dict(beta_schedule="squaredcos_cap_v2"),
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    # only diffusers' DDPMScheduler knows "sigmoid" (test_diffusion_schedules checks it against ours); the
    # others take the betas themselves
    "sigmoid": dict(trained_betas=make_schedule("sigmoid").betas.numpy()),
}
KARRAS = ("euler", "heun")


def case(sampler, cls, spacing, explicit=False, ours=None, theirs=None):
    """(sampler, our options, diffusers class, its config, timesteps passed explicitly?). ``explicit``: hand
    diffusers our timesteps because its own version of this spacing differs from Lin et al. Table 2."""
    config = dict(theirs or {}) if explicit else {"timestep_spacing": spacing, **(theirs or {})}
    return sampler, {"spacing": spacing, **(ours or {})}, cls, config, explicit


CASES = {
    "ddpm-linspace": case("ddpm", "DDPMScheduler", "linspace"),
    "ddpm-trailing": case("ddpm", "DDPMScheduler", "trailing"),
    "ddpm-leading-large": case(
        "ddpm",
        "DDPMScheduler",
        "leading",
        ours={"variance": "fixed_large"},
        theirs={"variance_type": "fixed_large"},
    ),
    "ddim-leading": case("ddim", "DDIMScheduler", "leading"),
    "ddim-trailing": case("ddim", "DDIMScheduler", "trailing"),
    "ddim-final-alpha-first": case(
        "ddim", "DDIMScheduler", "leading", ours={"final_alpha": "first"}, theirs={"set_alpha_to_one": False}
    ),
    "ddim-eta": case("ddim", "DDIMScheduler", "leading", ours={"eta": 0.5}),
    "dpmpp_2m-trailing": case("dpmpp_2m", "DPMSolverMultistepScheduler", "trailing"),
    "dpmpp_2m-linspace": case("dpmpp_2m", "DPMSolverMultistepScheduler", "linspace", explicit=True),
    "dpmpp_2m_sde-trailing": case(
        "dpmpp_2m_sde",
        "DPMSolverMultistepScheduler",
        "trailing",
        theirs={"algorithm_type": "sde-dpmsolver++"},
    ),
    "euler-linspace": case("euler", "EulerDiscreteScheduler", "linspace", explicit=True),
    "euler-leading": case("euler", "EulerDiscreteScheduler", "leading"),
    "heun-trailing": case("heun", "HeunDiscreteScheduler", "trailing"),
    "heun-linspace": case("heun", "HeunDiscreteScheduler", "linspace", explicit=True),
}

COMMON = {
    "DDPMScheduler": dict(clip_sample=False),
    "DDIMScheduler": dict(clip_sample=False, set_alpha_to_one=True),
    "DPMSolverMultistepScheduler": dict(
        algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero",
        lower_order_final=True, use_karras_sigmas=False,
    ),
    "EulerDiscreteScheduler": dict(
        use_karras_sigmas=False, final_sigmas_type="zero", interpolation_type="linear"
    ),
    "HeunDiscreteScheduler": dict(use_karras_sigmas=False),
}  # fmt: skip


def make_reference(case: str, schedule: str, prediction_type: str, steps: int, float64: bool = False):
    """The diffusers scheduler for ``case``. ``float64=True`` hands it our float64 schedule (alphas_cumprod,
    or the sigmas it steps between), so a one-step comparison measures the algorithm, not the float32
    rounding of alpha_bar near 1 (which costs 1 - alpha_bar_0 three significant digits)."""
    sampler, _, cls, config, explicit = CASES[case]
    spacing = CASES[case][1]["spacing"]
    ref = getattr(diffusers, cls)(
        num_train_timesteps=1000,
        prediction_type=prediction_type,
        **SCHEDULES[schedule],
        **{**COMMON[cls], **config},
    )
    t = timestep_spacing(1000, steps, spacing)
    if explicit:
        ref.set_timesteps(timesteps=t.tolist())
    else:
        ref.set_timesteps(steps)
    assert [int(round(float(v))) for v in ref.timesteps.unique_consecutive()] == t.tolist()
    if float64:
        s = make_schedule(schedule)
        if sampler in ("ddpm", "ddim"):
            ref.alphas_cumprod = s.alphas_cumprod.clone()
            if sampler == "ddim":
                ref.final_alpha_cumprod = (
                    s.alphas_cumprod[0]
                    if config.get("set_alpha_to_one") is False
                    else torch.tensor(1.0, dtype=torch.float64)
                )
        else:
            sig = s.sigmas[t]
            if sampler == "heun":
                sig = torch.cat([sig[:1], sig[1:].repeat_interleave(2)])
            ref.sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    return ref


def run_reference(
    ref, sampler: str, net, x_T: torch.Tensor, *, eta: float = 0.0, noises=None, generator=None, forced=None
):
    """Drive a diffusers scheduler the way its pipelines do; return x after each full step, in VP scale.
    ``forced``: our samples after each step; full step i then starts from ``forced[i - 1]`` (one step at
    a time from the same input, so differences cannot accumulate)."""
    karras = sampler in KARRAS
    lat = x_T * math.sqrt(float(ref.sigmas[0]) ** 2 + 1) if karras else x_T.clone()
    xs, i = [], 0
    for k, t in enumerate(ref.timesteps):
        starts_a_step = sampler != "heun" or ref.state_in_first_order
        if forced is not None and i > 0 and starts_a_step:
            lat = forced[i - 1] * (math.sqrt(float(ref.sigmas[ref.step_index]) ** 2 + 1) if karras else 1.0)
        out = net(ref.scale_model_input(lat, t), torch.full((x_T.shape[0],), int(round(float(t)))))
        kwargs = {}
        if sampler == "ddpm":
            kwargs["generator"] = generator
        elif sampler == "ddim" and eta > 0:
            kwargs.update(eta=eta, variance_noise=noises[i])
        elif sampler == "dpmpp_2m_sde":
            kwargs["variance_noise"] = noises[i]
        lat = ref.step(out, t, lat, **kwargs).prev_sample
        if sampler == "heun" and not ref.state_in_first_order and k < len(ref.timesteps) - 1:
            continue  # the first (Euler) stage of a Heun step; the step completes on the next call
        scale = math.sqrt(float(ref.sigmas[ref.step_index]) ** 2 + 1) if karras else 1.0
        xs.append(lat / scale)
        i += 1
    return xs


class Replay:
    """A 'network' that returns pre-drawn outputs in call order, whatever its input."""

    def __init__(self, outputs):
        self.outputs, self.calls = outputs, 0

    def __call__(self, x, t):
        out = self.outputs[self.calls]
        self.calls += 1
        return out


def run_ours(case: str, schedule: str, prediction_type: str, net, x_T, steps: int, noises=None, seed=None):
    sampler, options, *_ = CASES[case]
    s = make_schedule(schedule)
    denoiser = Denoiser(net, s, prediction_type)
    noise = None
    if noises is not None:
        noise = lambda i, x: noises[i]  # noqa: E731
    elif seed is not None:
        g = torch.Generator().manual_seed(seed)
        noise = lambda i, x: torch.randn(x.shape, generator=g, dtype=x.dtype)  # noqa: E731
    xs = []
    get_sampler(sampler)(
        denoiser, x_T, s, steps, noise=noise, callback=lambda i, x, t, x0: xs.append(x), **options
    )
    return xs


def comparable(cases) -> list[tuple[str, str]]:
    """(case, schedule) pairs where ours must equal diffusers. Not Heun on a schedule that starts above
    HEUN_MAX_SIGMA (cosine): there ours takes an Euler first step on purpose, and
    test_heun_is_second_order_on_the_cosine_schedule shows why."""
    return [(c, s) for c in cases for s in SCHEDULES
            if CASES[c][0] != "heun" or float(make_schedule(s).sigmas[-1]) <= HEUN_MAX_SIGMA]  # fmt: skip


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("case, schedule", comparable(CASES))
def test_every_step_matches_given_the_same_model_outputs(case, schedule, prediction_type):
    sampler, options = CASES[case][:2]
    steps = 10
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    calls = 2 * steps - 1 if sampler == "heun" else steps
    outputs = [torch.randn(x_T.shape, generator=g, dtype=torch.float64) for _ in range(calls)]
    noises = [torch.randn(x_T.shape, generator=g, dtype=torch.float64) for _ in range(steps)]
    eta = options.get("eta", 0.0)
    given_noise = eta > 0 or sampler == "dpmpp_2m_sde"  # the same fresh noise on both sides
    ref = make_reference(case, schedule, prediction_type, steps, float64=True)
    ours = run_ours(
        case,
        schedule,
        prediction_type,
        Replay(outputs),
        x_T,
        steps,
        noises=noises if given_noise else None,
        seed=7,
    )
    theirs = run_reference(
        ref, sampler, Replay(outputs), x_T, eta=eta, noises=noises,
        generator=torch.Generator().manual_seed(7), forced=ours,
    )  # fmt: skip
    assert len(ours) == len(theirs) == steps
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        err = float((a - b).abs().max()) / float(b.abs().max())
        assert err < 1e-5, f"step {i}: {err:.2e}"


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize(
    # (the SDE solver's fresh noise: diffusers draws it in float32 from its generator; one step at a time
    # above hands both sides the same noise instead)
    "case, schedule",
    comparable(
        [c for c in CASES if c not in ("ddim-final-alpha-first", "ddim-eta", "dpmpp_2m_sde-trailing")]
    ),
)
def test_whole_trajectories_with_an_analytic_model_match(case, schedule, prediction_type):
    steps = 25
    data = mixture(dim=6, std=0.3)
    s = make_schedule(schedule)
    x_T = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = make_reference(case, schedule, prediction_type, steps, float64=True)
    theirs = run_reference(
        ref, CASES[case][0], data.net(s, prediction_type), x_T, generator=torch.Generator().manual_seed(3)
    )
    ours = run_ours(case, schedule, prediction_type, data.net(s, prediction_type), x_T, steps, seed=3)
    assert rel_err(ours[-1], theirs[-1]) < 1e-4


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_zero_terminal_snr_schedules_match(sampler, prediction_type):
    """With alpha_bar_T = 0 the first step starts from pure noise; diffusers' DDPM and DDIM handle it
    exactly (its Euler/Heun/DPM-Solver clamp alpha_bar_T to 2^-24 instead; ours refuse or, for
    DPM-Solver++, take the exact limit: see test_diffusion_samplers.py)."""
    steps = 20
    s = make_schedule("scaled_linear", rescale_zero_snr=True)
    cls = {"ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler}[sampler]
    ref = cls(
        prediction_type=prediction_type, rescale_betas_zero_snr=True, timestep_spacing="trailing",
        clip_sample=False, **SCHEDULES["scaled_linear"],
    )  # fmt: skip
    ref.set_timesteps(steps)
    data = mixture(dim=6)
    x_T = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    theirs = run_reference(
        ref, sampler, data.net(s, prediction_type), x_T, generator=torch.Generator().manual_seed(5)
    )
    g = torch.Generator().manual_seed(5)
    ours = get_sampler(sampler)(
        Denoiser(data.net(s, prediction_type), s, prediction_type), x_T, s, steps, spacing="trailing",
        noise=lambda i, x: torch.randn(x.shape, generator=g, dtype=x.dtype),
    )  # fmt: skip
    assert rel_err(ours, theirs[-1]) < 1e-4


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_clipped_ddim_matches_clip_sample(prediction_type):
    """clip_denoised + our DDIM = diffusers' DDIM with clip_sample=True and use_clipped_model_output=True,
    step by step, with random network outputs large enough that the clamp is active at most steps."""
    steps = 10
    s = make_schedule("cosine")
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    outputs = [2 * torch.randn(x_T.shape, generator=g, dtype=torch.float64) for _ in range(steps)]
    ours, x0s = [], []
    denoiser = clip_denoised(Denoiser(Replay(outputs), s, prediction_type), s)
    get_sampler("ddim")(denoiser, x_T, s, steps, spacing="leading",
                        callback=lambda i, x, t, x0: (ours.append(x), x0s.append(x0)))  # fmt: skip
    assert all(float(x0.abs().max()) <= 1.0 for x0 in x0s)
    assert sum(float(x0.abs().max()) == 1.0 for x0 in x0s) >= steps // 2  # the clamp did something
    ref = diffusers.DDIMScheduler(
        num_train_timesteps=1000, prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2",
        clip_sample=True, set_alpha_to_one=True,
    )  # fmt: skip
    ref.set_timesteps(steps)
    ref.alphas_cumprod = s.alphas_cumprod.clone()
    for i, t in enumerate(ref.timesteps):
        start = x_T if i == 0 else ours[i - 1]
        theirs = ref.step(outputs[i], t, start, use_clipped_model_output=True).prev_sample
        assert rel_err(ours[i], theirs) < 1e-6, i


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_sa_solver_bh1_matches_sasolver_scheduler(schedule, prediction_type, eta):
    """SA-Solver with ``coefficients="bh1"`` against diffusers' SASolverScheduler (predictor_order=2,
    corrector_order=2, constant tau = sqrt(eta)), from the same model outputs and the same fresh noise,
    every step but the last to 1e-10 relative. Its last step ends on sigma_0 where ours ends on 0 (it
    cannot take h = inf), so it is left out; the corrector, which redoes each step from the next model
    output, is inside every compared step from the second on."""
    steps = 10
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    outputs = [torch.randn(x_T.shape, generator=g, dtype=torch.float64) for _ in range(steps)]
    s = make_schedule(schedule)
    t = timestep_spacing(1000, steps, "trailing")
    ref = diffusers.SASolverScheduler(
        num_train_timesteps=1000, prediction_type=prediction_type, predictor_order=2, corrector_order=2,
        tau_func=lambda _: math.sqrt(eta), timestep_spacing="trailing", **SCHEDULES[schedule],
    )  # fmt: skip
    ref.set_timesteps(steps)
    assert ref.timesteps.tolist() == t.tolist()
    ref.alphas_cumprod = s.alphas_cumprod.clone()  # our float64 schedule, as make_reference does
    ref.sigmas = torch.cat([s.sigmas[t], s.sigmas[:1]])
    net, lat, theirs = Replay(outputs), x_T.clone(), []
    noise = torch.Generator().manual_seed(5)  # it draws one normal tensor per step, as ours does at eta > 0
    for step_t in ref.timesteps:
        lat = ref.step(net(lat, step_t), step_t, lat, generator=noise).prev_sample
        theirs.append(lat)
    ours, noise = [], torch.Generator().manual_seed(5)
    get_sampler("sa_solver")(
        Denoiser(Replay(outputs), s, prediction_type), x_T, s, steps, spacing="trailing", eta=eta,
        coefficients="bh1", noise=lambda i, x: torch.randn(x.shape, generator=noise, dtype=x.dtype),
        callback=lambda i, x, t, x0: ours.append(x),
    )  # fmt: skip
    for i, (a, b) in enumerate(zip(ours[:-1], theirs[:-1], strict=True)):
        assert rel_err(a, b) < 1e-10, f"step {i}: {rel_err(a, b):.2e}"
