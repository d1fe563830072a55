"""One diffusion system from parts: a trained network between a conditioner and a codec, run by the one
recipe of :mod:`difflab.models.recipe`.

    request (labels, prompts) --conditioner--> cond, null      noise --sampler(network, guidance)--> x_0
    x_0 --codec.decode--> images in [-1, 1]

Pixel, latent and text-to-image diffusion (:mod:`~difflab.models.pixel`, :mod:`~difflab.models.ldm`,
:mod:`~difflab.models.t2i`) are declarations of which parts they use; sampling and training are here,
once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from difflab.models.recipe import DiffusionRunConfig, grid_sample_fn, make_loss_fn, run_sampler
from difflab.models.runs import prepare_run_dir
from difflab.nn.unet import UNet, example_inputs
from difflab.train.distributed import main_process_first
from difflab.train.trainer import Trainer, make_loader


class DiffusionSystem(nn.Module):
    """The sampling-time system: ``network`` (the trained denoiser), ``conditioner`` (a request -> the
    network's keyword arguments) and ``codec`` (the sampler's space -> pixels)."""

    def __init__(self, network: nn.Module, conditioner: nn.Module, codec: nn.Module):
        super().__init__()
        self.network, self.conditioner, self.codec = network, conditioner, codec


@torch.no_grad()
def generate(system: DiffusionSystem, cfg: DiffusionRunConfig, n: int, request: Any = None, *,
             callback=None, attention=None, **kwargs) -> torch.Tensor:  # fmt: skip
    """``n`` images (N, C, H, W) in [-1, 1] of ``request`` (class labels, prompts; None: the
    conditioner's default). ``callback(i, x_t, t, x0_hat)`` sees images (decoded by the codec);
    ``attention``, a :class:`difflab.models.attention_maps.CrossAttentionMaps`, records the cross-attention
    of every step. Other keyword arguments as :func:`difflab.models.recipe.run_sampler` (sampler, steps,
    cfg_scale, spacing, seed, progress, sampler_options)."""
    device = next(system.network.parameters()).device
    cond, null = system.conditioner.condition(request, n, device, seed=kwargs.get("seed", 0))
    recording = attention.recording(system.network, n) if attention is not None else contextlib.nullcontext()
    with recording:
        x = run_sampler(system.network, cfg, n, cond, null, callback=system.codec.preview(callback), **kwargs)
    return system.codec.decode(x)


def generate_classes(system: DiffusionSystem, cfg: DiffusionRunConfig, n: int, *, labels=None,
                     **kwargs) -> torch.Tensor:  # fmt: skip
    """``n`` images (N, C, H, W) in [-1, 1] of a class-conditional (or unconditional) system: ``labels``
    (N,) picks the classes (default: every class in turn). Keyword arguments as :func:`generate`."""
    return generate(system, cfg, n, labels, **kwargs)


def unet_with_inputs(cfg: DiffusionRunConfig):
    """The UNet of a record with example inputs at its training batch size (``difflab info``)."""
    return UNet(cfg.unet), example_inputs(cfg.unet, cfg.train.batch_size), None


@dataclass
class TrainingParts:
    """What a family hands :func:`train_system`, built after the run directory is checked."""

    conditioner: nn.Module
    codec: nn.Module
    dataset: torch.utils.data.Dataset
    grid_request: Any = None
    """The request the sample grids draw (None: the conditioner's default, e.g. every class in turn)."""
    loss_fn: Callable | None = None
    """``loss_fn(cfg, schedule, conditioner, codec)`` -> the training loss, when a system adds terms to the
    recipe's (attention supervision); None: :func:`~difflab.models.recipe.make_loss_fn`."""


def train_system(
    cfg: DiffusionRunConfig,
    run_dir: str | Path,
    *,
    resume: bool,
    load_config: Callable,
    inputs: tuple[str, ...] = (),
    parts: Callable[[Path], TrainingParts],
    network: Callable[[], nn.Module],
    model_config,
) -> Path:
    """Train a diffusion system into ``run_dir`` (config.json, checkpoints/, metrics.jsonl,
    samples/step_*.png, samples.png, trajectory.png). ``cfg`` is a resolved run record; ``parts(run_dir)``
    builds the conditioner, codec and training set once the run directory is accepted (rank 0 first, so
    it alone fills a latent cache under torchrun); ``network()`` builds the trained network from the
    seeded generator; ``inputs`` and ``model_config`` are what a resume must match
    (:func:`~difflab.models.runs.prepare_run_dir`, the trainer)."""
    run_dir = prepare_run_dir(run_dir, cfg, resume, load_config, inputs=inputs)
    with main_process_first():
        p = parts(run_dir)
    torch.manual_seed(cfg.train.seed)  # the initial weights
    net = network()
    schedule = cfg.diffusion.make_schedule()
    loader = make_loader(p.dataset, cfg.train)

    def draw(ema_network: nn.Module, n: int, callback) -> torch.Tensor:
        device = next(ema_network.parameters()).device
        system = DiffusionSystem(ema_network, p.conditioner.to(device), p.codec.to(device))
        request = p.grid_request[:n] if p.grid_request is not None else None
        return generate(system, cfg, n, request, seed=0, callback=callback)

    loss = (p.loss_fn or make_loss_fn)(cfg, schedule, p.conditioner, p.codec)
    trainer = Trainer(net, loss, loader, cfg.train, run_dir,
                      sample_fn=grid_sample_fn(cfg, draw), model_config=model_config)  # fmt: skip
    trainer.fit(resume=resume)
    return run_dir
