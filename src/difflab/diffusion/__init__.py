"""Diffusion core: schedules, the forward process, objectives, one denoiser interface, samplers as
pure functions over it, and classifier-free guidance. The math, with paper equations, is in
docs/diffusion.md.
"""

from difflab.diffusion.analytic import GaussianMixture, gaussian_output_error
from difflab.diffusion.denoiser import Denoiser, clip_denoised
from difflab.diffusion.discretization import (
    DEFAULT_SPACING,
    SPACINGS,
    SamplingPlan,
    make_plan,
    timestep_spacing,
)
from difflab.diffusion.forward import posterior_coefficients, q_posterior, q_sample, q_step
from difflab.diffusion.guidance import classifier_free_guidance, rescale_guidance
from difflab.diffusion.objectives import (
    LOSS_WEIGHTINGS,
    PREDICTION_TYPES,
    diffusion_loss,
    from_eps_x0,
    loss_weight,
    to_eps_x0,
)
from difflab.diffusion.samplers import (
    SAMPLERS,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_euler,
    sample_heun,
    sample_sa_solver,
)
from difflab.diffusion.schedules import BETA_SCHEDULES, Schedule, make_schedule, rescale_zero_terminal_snr

__all__ = [
    "BETA_SCHEDULES",
    "DEFAULT_SPACING",
    "LOSS_WEIGHTINGS",
    "PREDICTION_TYPES",
    "SAMPLERS",
    "SPACINGS",
    "Denoiser",
    "GaussianMixture",
    "SamplingPlan",
    "Schedule",
    "classifier_free_guidance",
    "clip_denoised",
    "diffusion_loss",
    "from_eps_x0",
    "gaussian_output_error",
    "get_sampler",
    "loss_weight",
    "make_plan",
    "make_schedule",
    "posterior_coefficients",
    "q_posterior",
    "q_sample",
    "q_step",
    "rescale_guidance",
    "rescale_zero_terminal_snr",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_euler",
    "sample_heun",
    "sample_sa_solver",
    "timestep_spacing",
    "to_eps_x0",
]
