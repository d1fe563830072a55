"""The diffusion recipe every diffusion system shares: noise schedule, objective and loss weighting, the
training loss, sampling with classifier-free guidance, and the sample grids written during training.

A system is this recipe plus a conditioner (:mod:`difflab.models.conditioners`: nothing, class labels or
text) and a codec (:mod:`difflab.models.codecs`: pixels, or an autoencoder's latents). The recipe never
asks which; it calls them through their small interfaces.

Training step (Algorithm 1 of Ho et al. 2020, with the objective chosen in ``DiffusionConfig``):
    1. x_0 = codec.training_input(batch)             (pixels, or z' = scale * z with z ~ q(z|x))
    2. t ~ U{0..T-1}, eps ~ N(0, I)                 (drawn from the trainer's generator: exact resume; a
                                                     family may draw t from another density, power_timesteps)
    3. x_t = alpha_t x_0 + sigma_t eps              (difflab.diffusion.forward.q_sample)
    4. c = conditioner.for_training(batch)            (label or caption -> null with prob. cond_drop, so one
                                                     network learns p(x|c) and p(x), for CFG)
    5. loss = w(t) || f(x_t, t, c) - target ||^2    (difflab.diffusion.objectives.diffusion_loss)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from difflab.diffusion.denoiser import Denoiser, clip_denoised
from difflab.diffusion.discretization import SPACINGS
from difflab.diffusion.forward import q_sample
from difflab.diffusion.guidance import classifier_free_guidance
from difflab.diffusion.objectives import LOSS_WEIGHTINGS, PREDICTION_TYPES, diffusion_loss
from difflab.diffusion.samplers import SAMPLERS, get_sampler
from difflab.diffusion.schedules import BETA_SCHEDULES, Schedule, make_schedule
from difflab.errors import MAX_SIZE, MAX_TIMESTEPS, DifflabError, check_choice, check_float, check_int
from difflab.nn.unet import UNetConfig
from difflab.train.config import TrainConfig
from difflab.viz import TrajectoryRecorder, save_grid


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = "cosine"
    timesteps: int = 1000
    prediction: str = "v_prediction"
    """What the network predicts: 'epsilon', 'sample' (x0) or 'v_prediction' (Salimans & Ho 2022)."""
    loss_weighting: str = "min_snr"
    """'uniform' or 'min_snr' (Hang et al. 2023)."""
    min_snr_gamma: float = 5.0
    rescale_zero_snr: bool = False

    def __post_init__(self) -> None:
        check_choice("schedule", self.schedule, BETA_SCHEDULES)
        check_choice("prediction type", self.prediction, PREDICTION_TYPES)
        check_choice("loss weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        # A schedule needs two steps (make_schedule); MAX_TIMESTEPS keeps its tables small.
        check_int("timesteps", self.timesteps, 2, MAX_TIMESTEPS)
        # min-SNR weighting clips the SNR at gamma (Hang et al. 2023): gamma <= 0 zeroes or flips the loss.
        check_float("min_snr_gamma", self.min_snr_gamma, 0.0, lo_open=True)

    def make_schedule(self) -> Schedule:
        return make_schedule(self.schedule, self.timesteps, rescale_zero_snr=self.rescale_zero_snr)


GUIDANCE_RANGE = (0.0, 100.0)
"""Classifier-free guidance weights w that a run or a command accepts: 0 is unconditional sampling, 1 plain
conditional sampling, and useful values are a few units (Ho & Salimans 2022 sweep 0-4; Stable Diffusion
uses 7.5). A negative w steers away from the condition, and a w of thousands only amplifies the network's
error, so both are typos here rather than requests."""


@dataclass(frozen=True)
class SampleConfig:
    """Defaults for sampling grids during training and for ``difflab sample``."""

    sampler: str = "ddim"
    steps: int = 30
    cfg_scale: float = 1.0
    """Classifier-free guidance weight w (1 = plain conditional sampling)."""
    spacing: str = "trailing"
    """Timestep spacing; 'trailing' starts sampling at t = T-1 (Lin et al. 2024, Table 2)."""
    clip_x0: bool = False
    """Clamp x0_hat to [-1, 1] at every step (diffusers' clip_sample); epsilon-prediction needs it."""
    grid: int = 64
    """Images in the sample grids written during training."""

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)
        check_choice("timestep spacing", self.spacing, SPACINGS)
        # and at most diffusion.timesteps, which check_sampling compares once both are known
        check_int("sampling steps", self.steps, 1, MAX_TIMESTEPS)
        check_float("guidance scale", self.cfg_scale, *GUIDANCE_RANGE)
        check_int("sample grid", self.grid, 1, MAX_SIZE)

    def resolve(self, sampler=None, steps=None, cfg_scale=None, spacing=None) -> SampleConfig:
        """These defaults with the given settings in place of the ``None`` ones (a command's flags). Only
        None falls back: 0 steps or an empty sampler name is refused by the checks, not silently replaced."""
        given = {"sampler": sampler, "steps": steps, "cfg_scale": cfg_scale, "spacing": spacing}
        return dataclasses.replace(self, **{k: v for k, v in given.items() if v is not None})


class DiffusionRunConfig(Protocol):
    """What the recipe reads of a diffusion family's config (pixel, ldm and t2i configs all have it)."""

    unet: UNetConfig
    diffusion: DiffusionConfig
    train: TrainConfig
    sample: SampleConfig
    cond_drop: float


def check_cond_drop(p: float) -> float:
    """The condition-dropout probability of every guided model (class label or caption -> null)."""
    if not 0.0 <= p < 1.0:
        raise DifflabError(f"cond_drop {p} is invalid; expected a probability in [0, 1)")
    return p


def check_sampling(cfg: DiffusionRunConfig) -> None:
    """What sampling needs beyond each field's own check: no more steps than the schedule has."""
    if cfg.sample.steps > cfg.diffusion.timesteps:
        raise DifflabError(
            f"sample.steps {cfg.sample.steps} is invalid; expected at most diffusion.timesteps "
            f"({cfg.diffusion.timesteps})"
        )


# ------------------------------------------------------------------------------------------- training


def power_timesteps(power: float) -> Callable:
    """Step 2 with t/T = u^(1/power), u ~ U(0, 1): density power (t/T)^(power - 1), uniform at 1, and at
    2 a ramp that trains the noisiest tenth of the levels twice as often as the middle one (the 'later'
    timestep bias of diffusers' SDXL fine-tuning script; SD3, Esser et al. 2024, Sec. 3.1, also moves the
    density towards noise). ``sample(b, timesteps, generator, device)`` -> t (B,) in [0, T)."""
    check_float("timestep power", power, 0.0, lo_open=True)

    def sample(b: int, timesteps: int, generator: torch.Generator, device) -> torch.Tensor:
        u = torch.rand(b, generator=generator, device=device)
        return (u.pow(1 / power) * timesteps).long().clamp(max=timesteps - 1)

    return sample


def make_loss_fn(cfg: DiffusionRunConfig, schedule: Schedule, conditioner, codec, *,
                 timesteps: Callable | None = None):  # fmt: skip
    """``loss_fn(network, batch, generator) -> (loss, metrics)`` for the trainer (steps 1-5 above);
    ``timesteps``: step 2's sampler (:func:`power_timesteps`), None: uniform."""
    d = cfg.diffusion

    def loss_fn(network: torch.nn.Module, batch: dict, generator: torch.Generator):
        x0 = codec.training_input(batch, generator)
        b, dev = x0.shape[0], x0.device
        if timesteps is None:
            t = torch.randint(0, schedule.timesteps, (b,), generator=generator, device=dev)
        else:
            t = timesteps(b, schedule.timesteps, generator, dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        x_t = q_sample(schedule, x0, t, noise)
        out = network(x_t, t, **conditioner.for_training(batch, generator, b, dev))
        per_sample = diffusion_loss(schedule, d.prediction, x0, noise, t, out,
                                    weighting=d.loss_weighting, gamma=d.min_snr_gamma)  # fmt: skip
        return per_sample.mean(), {}

    return loss_fn


def grid_sample_fn(cfg: DiffusionRunConfig, draw: Callable):
    """The trainer's ``sample_fn`` for a diffusion run: ``draw(ema_network, n, callback)`` returns n images
    (fixed noise, so grids at different steps compare); writes samples/step_*.png, and at the last step
    samples.png and the trajectory strip trajectory.png."""

    def sample_fn(ema_network, step: int, out_dir: Path) -> None:
        final = step >= cfg.train.steps
        recorder = TrajectoryRecorder(cfg.sample.steps) if final else None
        images = draw(ema_network, cfg.sample.grid, recorder)
        save_grid(images, Path(out_dir) / "samples" / f"step_{step:07d}.png")
        if final:
            save_grid(images, Path(out_dir) / "samples.png")
            recorder.save(Path(out_dir) / "trajectory.png")

    return sample_fn


# ------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def run_sampler(
    network: torch.nn.Module,
    cfg: DiffusionRunConfig,
    n: int,
    cond: dict,
    null_cond: dict | None,
    *,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    spacing: str | None = None,
    seed: int = 0,
    callback=None,
    progress: bool = False,
    sampler_options: dict | None = None,
    noise=None,
    wrap=None,
) -> torch.Tensor:
    """Sample ``n`` draws of the network's input shape with conditioning ``cond`` (keyword arguments of
    the network), guided towards it from ``null_cond`` (batch 1, broadcast) when ``cfg_scale`` is not 1.
    The noise comes from a CPU generator seeded with ``seed``, so a seed gives the same sample on any
    device. ``None`` arguments fall back to ``cfg.sample``; ``sampler_options`` go to the sampler itself
    (e.g. ``{"eta": 2.0}`` for ``dpmpp_2m_sde``). ``noise`` replaces the seed's generator: ``noise.x_T(shape)``
    gives the starting noise and ``noise(i, x)`` each step's (per-image generators, for a request sampled in
    batches: :class:`difflab.models.system.ImageNoise`). ``wrap(denoiser) -> denoiser`` wraps the final
    (guided) denoiser, for a method that edits each step (Prompt-to-Prompt's LocalBlend). Returns the final
    sample, unclamped."""
    s = cfg.sample.resolve(sampler, steps, cfg_scale, spacing)
    sample_fn = get_sampler(s.sampler)
    schedule = cfg.diffusion.make_schedule()
    device = next(network.parameters()).device
    c, size = cfg.unet.in_channels, cfg.unet.image_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n, c, size, size)
    x_T = (torch.randn(shape, generator=gen) if noise is None else noise.x_T(shape)).to(device)
    denoiser = Denoiser(network, schedule, cfg.diffusion.prediction)
    if s.cfg_scale != 1.0:
        if null_cond is None:
            raise DifflabError(
                f"guidance scale {s.cfg_scale} needs a conditional model; this one is unconditional"
            )
        denoiser = classifier_free_guidance(denoiser, s.cfg_scale, null_cond)
    if s.clip_x0:  # after guidance, on the guided x0 (as diffusers clips the guided prediction)
        denoiser = clip_denoised(denoiser, schedule)
    if wrap is not None:
        denoiser = wrap(denoiser)
    return sample_fn(denoiser, x_T, schedule, s.steps, spacing=s.spacing, cond=cond,
                     noise=gen if noise is None else noise, callback=callback, progress=progress,
                     **(sampler_options or {}))  # fmt: skip
