"""Null-text inversion (Mokady et al. 2023): find the noise and the per-step unconditional embeddings from
which a text-to-image run redraws a *given* image under guidance, so that Prompt-to-Prompt can edit it.

1. **DDIM inversion** (Song et al. 2021, Sec. 4.3; Dhariwal & Nichol 2021, App. F): the deterministic DDIM
   update run backwards, from the image's latent z*_0 towards noise, with the source prompt and no guidance
   (w = 1). Each step reuses the noise estimate of the level it leaves, ε̂(z*_{i+1}, t_i) ≈ ε̂(z*_i, t_i):

       x̂0 = (z*_{i+1} - sqrt(1 - ᾱ_{i+1}) ε̂) / sqrt(ᾱ_{i+1}),    z*_i = sqrt(ᾱ_i) x̂0 + sqrt(1 - ᾱ_i) ε̂

   (levels as the sampler's plan numbers them: i = 0 is the noisiest, n the data). Sampled back at w = 1 it
   returns close to the image; under the guidance editing needs (w > 1) the errors grow step by step
   (their Fig. 3), which is what the next stage repairs.
2. **Null-text optimisation** (Sec. 3.2, Algorithm 1): walking the plan from z̄_0 = z*_0, the unconditional
   condition ∅_i of step i (the empty prompt's token features and pooled embedding, the network's input)
   is optimised so that the guided DDIM step from z̄_i lands on the inversion's z*_{i+1}:

       min over ∅_i of || z*_{i+1} - DDIM(z̄_i, t_i; ε̃ = ε(z̄_i, ∅_i) + w [ε(z̄_i, C) - ε(z̄_i, ∅_i)]) ||²

   with Adam, at most N = 10 iterations, stopping early once the loss is below 1e-5, each step starting from
   the previous step's ∅; then z̄_{i+1} is that step. The learning rate is 1e-1 where the paper's is 1e-2:
   the empty prompt here is two unmasked tokens (<bos>, <eos>) and a pooled vector, against SD's 77 token
   features, and at 1e-2 ten iterations left the redrawn image where DDIM inversion alone leaves it
   (docs/editing.md). The weights and the prompt's
   embedding stay as they are: only the unconditional input changes, per step.
3. **Redrawing**: DDIM from z*_0 with ∅_i at step i gives the image back; Prompt-to-Prompt shares z*_0 and
   the ∅_i between its two passes (``prompt_to_prompt(..., inversion=...)``).

A layout-grounded run paints objects in boxes: the boxes of a given image are read from it by the world's
reader (a detector, as LMD reads boxes from an LLM), not planned from the prompt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from difflab.data.images import read_square, to_signed
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.discretization import make_plan
from difflab.diffusion.guidance import classifier_free_guidance
from difflab.diffusion.samplers import ddim_step, sample_ddim
from difflab.errors import DifflabError
from difflab.models.conditioners import GroundedPrompts, Layouts, TextPrompts
from difflab.world.reader import read
from difflab.world.scene import world_preset

OPTIMISED = ("context", "pooled")
"""The unconditional inputs null-text optimisation changes: the empty prompt's token features and pooled
embedding (the paper's ∅, the text encoder's output for "")."""


@dataclass
class Inversion:
    """What redraws one image: its prompt (and layout), the noise z*_0, every level of the inversion, and
    the per-step unconditional conditions, under the sampling settings they were made for."""

    request: list[str] | Layouts
    latents: torch.Tensor
    """(n + 1, C, h, w): z*_0 (the noise the image is redrawn from) ... z*_n (the image's own latent)."""
    nulls: list[dict]
    """Per step, the unconditional condition (batch 1); the empty prompt's at every step before optimising."""
    steps: int
    spacing: str
    cfg_scale: float
    losses: list[float]
    """Per step, the squared error left after optimising (0 for plain DDIM inversion)."""


def read_image(path: str | Path, side: int) -> torch.Tensor:
    """An image file -> (1, 3, side, side) in [-1, 1], on the 8-bit grid as the world's images are; an error
    naming the file when it cannot be read or is not ``side`` pixels square."""
    hint = "the side of the images this run draws ('difflab world condition --field image' writes one)"
    return to_signed(read_square(path, side, "RGB", "image", hint))[None]


def request_for(system, cfg, prompt: str, image: torch.Tensor) -> list[str] | Layouts:
    """The request an image is inverted under: its prompt, and on a layout run the layout the reader reads."""
    if isinstance(system.conditioner, GroundedPrompts):
        return Layouts([prompt], [read(image[0].cpu(), world_preset(cfg.data.world))])
    return [prompt]


def _conditions(system, request, device) -> tuple[dict, dict]:
    conditioner = system.conditioner
    if not isinstance(conditioner, TextPrompts):
        raise DifflabError(f"inversion needs a text-to-image run; this one has a {type(conditioner).__name__} "
                           "conditioner")  # fmt: skip
    return conditioner.condition(request, 1, device)


def _guided(denoiser, scale: float, null: dict):
    return denoiser if scale == 1.0 else classifier_free_guidance(denoiser, scale, null)


@torch.no_grad()
def ddim_invert(system, cfg, image: torch.Tensor, prompt: str, *, steps: int | None = None,
                spacing: str | None = None, cfg_scale: float | None = None) -> Inversion:  # fmt: skip
    """Stage 1 alone: the DDIM inversion of one image (1, 3, H, W) in [-1, 1] under ``prompt`` at w = 1, with
    the empty prompt as every step's null (``cfg_scale`` is only recorded, for redrawing)."""
    s = cfg.sample.resolve("ddim", steps, cfg_scale, spacing)
    if image.ndim != 4 or image.shape[0] != 1:
        raise DifflabError(f"image of shape {tuple(image.shape)}; expected one image (1, C, H, W)")
    device = next(system.network.parameters()).device
    request = request_for(system, cfg, prompt, image)
    cond, null = _conditions(system, request, device)
    plan = make_plan(cfg.diffusion.make_schedule(), s.steps, s.spacing)
    denoiser = Denoiser(system.network, cfg.diffusion.make_schedule(), cfg.diffusion.prediction)
    z = system.codec.encode(image.to(device))
    levels = [z]
    for i in reversed(range(len(plan))):  # from the data (level n) up to the noise (level 0)
        eps, _ = denoiser(z, int(plan.timesteps[i]), **cond)
        ab_here, ab_up = plan.alphas_cumprod[i + 1].item(), plan.alphas_cumprod[i].item()
        x0 = (z - (1 - ab_here) ** 0.5 * eps) / ab_here**0.5
        z = ddim_step(x0, eps, ab_up)
        levels.append(z)
    return Inversion(request, torch.cat(levels[::-1]), [null] * len(plan), s.steps, s.spacing, s.cfg_scale,
                     [0.0] * len(plan))  # fmt: skip


def null_text_inversion(system, cfg, image: torch.Tensor, prompt: str, *, steps: int | None = None,
                        spacing: str | None = None, cfg_scale: float | None = None, iterations: int = 10,
                        lr: float = 1e-1, tolerance: float = 1e-5, progress: bool = False) -> Inversion:  # fmt: skip
    """Stages 1 and 2: DDIM inversion, then the per-step null conditions that make the guided DDIM pass (at
    ``cfg_scale``, default the run's) retrace it."""
    inv = ddim_invert(system, cfg, image, prompt, steps=steps, spacing=spacing, cfg_scale=cfg_scale)
    return optimise_nulls(system, cfg, inv, iterations=iterations, lr=lr, tolerance=tolerance, progress=progress)


def optimise_nulls(system, cfg, inv: Inversion, *, iterations: int = 10, lr: float = 1e-1, tolerance: float = 1e-5,
                   progress: bool = False) -> Inversion:  # fmt: skip
    """Stage 2 alone, on a DDIM inversion ``inv`` (left as it is): the inversion with each step's optimised null
    condition, for a caller that also redraws the DDIM inversion itself (the evaluation, ``difflab invert``)."""
    device = inv.latents.device
    cond, null = _conditions(system, inv.request, device)
    plan = make_plan(cfg.diffusion.make_schedule(), inv.steps, inv.spacing)
    denoiser = Denoiser(system.network, cfg.diffusion.make_schedule(), cfg.diffusion.prediction)
    trainable = {k: v.detach().clone() for k, v in null.items() if k in OPTIMISED and v is not None}
    frozen = {k: v for k, v in null.items() if k not in trainable}
    was = [p.requires_grad for p in system.network.parameters()]
    system.network.requires_grad_(False)
    nulls, losses = [], []
    z = inv.latents[:1]
    try:
        for i in tqdm(range(len(plan)), desc="null-text inversion", disable=not progress):
            t, ab_next, target = int(plan.timesteps[i]), plan.alphas_cumprod[i + 1].item(), inv.latents[i + 1 : i + 2]
            params = {k: v.clone().requires_grad_(True) for k, v in trainable.items()}
            opt = torch.optim.Adam(params.values(), lr=lr)
            loss = torch.zeros(())
            for _ in range(iterations):
                with torch.enable_grad():
                    eps, x0 = _guided(denoiser, inv.cfg_scale, frozen | params)(z, t, **cond)
                    loss = (ddim_step(x0, eps, ab_next) - target).pow(2).mean()
                    if loss.item() < tolerance:
                        break
                    opt.zero_grad()
                    loss.backward()
                opt.step()
            trainable = {k: v.detach() for k, v in params.items()}
            nulls.append(frozen | trainable)
            with torch.no_grad():
                eps, x0 = _guided(denoiser, inv.cfg_scale, nulls[-1])(z, t, **cond)
                z = ddim_step(x0, eps, ab_next)
                losses.append((z - target).pow(2).mean().item())
    finally:
        for p, g in zip(system.network.parameters(), was, strict=True):
            p.requires_grad_(g)
    return dataclasses.replace(inv, nulls=nulls, losses=losses)


def per_step_guidance(denoiser, scale: float, nulls: list[dict], step_of):
    """A guided denoiser whose null condition is ``nulls[step_of()]``: the optimised ∅ of the current step
    (each null of batch 1, broadcast over the batch)."""

    def guided(x: torch.Tensor, t, **cond):
        return _guided(denoiser, scale, nulls[step_of()])(x, t, **cond)

    return guided


@torch.no_grad()
def redraw(system, cfg, inversion: Inversion) -> torch.Tensor:
    """The image (1, C, H, W) in [-1, 1] that DDIM draws from z*_0 with each step's null condition."""
    device = inversion.latents.device
    cond, _ = _conditions(system, inversion.request, device)
    schedule = cfg.diffusion.make_schedule()
    step = [0]  # the step the sampler is at: the callback follows each step

    def advance(i, *_):
        step[0] = i + 1

    guided = per_step_guidance(Denoiser(system.network, schedule, cfg.diffusion.prediction), inversion.cfg_scale,
                               inversion.nulls, lambda: step[0])  # fmt: skip
    x = sample_ddim(guided, inversion.latents[:1], schedule, inversion.steps, spacing=inversion.spacing, cond=cond,
                    callback=advance)  # fmt: skip
    return system.codec.decode(x)
