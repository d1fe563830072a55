"""Diffusion core: schedules, the forward process, objectives, one denoiser interface, samplers as
pure functions over it, and classifier-free guidance. The math, with paper equations, is in
docs/diffusion.md.

Names are imported lazily (PEP 562), so ``difflab --help``, which imports ``difflab.diffusion.cli``,
does not pay for importing torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Schedule": "schedules",
    "make_schedule": "schedules",
    "q_sample": "forward",
    "q_posterior": "forward",
    "PREDICTION_TYPES": "objectives",
    "LOSS_WEIGHTINGS": "objectives",
    "diffusion_loss": "objectives",
    "Denoiser": "denoiser",
    "SPACINGS": "discretization",
    "timestep_spacing": "discretization",
    "make_plan": "discretization",
    "SAMPLERS": "samplers",
    "get_sampler": "samplers",
    "sample_ddpm": "samplers",
    "sample_ddim": "samplers",
    "sample_dpmpp_2m": "samplers",
    "sample_euler": "samplers",
    "sample_heun": "samplers",
    "classifier_free_guidance": "guidance",
    "GaussianMixture": "analytic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'difflab.diffusion' has no attribute '{name}'")
    return getattr(importlib.import_module(f"difflab.diffusion.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
