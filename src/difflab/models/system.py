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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from difflab.errors import DifflabError
from difflab.models.conditioners import ClassLabels, GroundedPrompts, Layouts
from difflab.models.recipe import DiffusionRunConfig, grid_sample_fn, make_loss_fn, run_sampler
from difflab.models.runs import claim_run_dir
from difflab.nn.unet import UNet, example_inputs
from difflab.train.distributed import main_process_first
from difflab.train.trainer import Trainer, make_loader


class DiffusionSystem(nn.Module):
    """The sampling-time system: ``network`` (the trained denoiser), ``conditioner`` (a request -> the
    network's keyword arguments) and ``codec`` (the sampler's space -> pixels)."""

    def __init__(self, network: nn.Module, conditioner: nn.Module, codec: nn.Module):
        super().__init__()
        self.network, self.conditioner, self.codec = network, conditioner, codec


SAMPLE_BATCH = 64
"""Images :func:`generate` samples at once unless told otherwise: ``difflab sample``'s default --n, so a
default request draws exactly as it did before sampling was batched."""


def image_seed(seed: int, index: int) -> int:
    """The seed of image ``index``'s own generator in a request sampled in several batches: numpy's
    ``SeedSequence`` hash of (seed, index), the standard way to spawn independent streams from one seed."""
    state = np.random.SeedSequence([seed % 2**64, index]).generate_state(1, np.uint64)
    return int(state[0]) >> 1  # under 2**63, which every generator takes


class ImageNoise:
    """The noise of images ``indices`` of a request sampled in batches: image i draws its x_T and then each
    step's noise from its own CPU generator seeded with :func:`image_seed` (seed, i), so it is the same image
    whatever batch it is drawn in and however large the batches are. ``x_T(shape)`` and ``noise(i, x)`` as
    :func:`difflab.models.recipe.run_sampler` asks."""

    def __init__(self, seed: int, indices: range):
        self.generators = [torch.Generator(device="cpu").manual_seed(image_seed(seed, i)) for i in indices]

    def x_T(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.generators])

    def __call__(self, i: int, x: torch.Tensor) -> torch.Tensor:
        noise = [torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in self.generators]
        return torch.stack(noise).to(x.device)


def request_part(conditioner: nn.Module, request: Any, start: int, stop: int) -> Any:
    """Items ``start..stop-1`` of a request: class labels, prompts or :class:`Layouts`; None (the
    conditioner's default) becomes those items of the default, every class in turn."""
    if request is None and isinstance(conditioner, ClassLabels):
        return torch.arange(start, stop) % conditioner.classes
    if request is None:
        return None
    if isinstance(request, Layouts):
        return Layouts(request.prompts[start:stop], request.scenes[start:stop])
    return request[start:stop]


@torch.no_grad()
def generate_range(system: DiffusionSystem, cfg: DiffusionRunConfig, n: int, request: Any, start: int,
                   stop: int, *, seed: int = 0, callback=None, attention=None, **kwargs) -> torch.Tensor:  # fmt: skip
    """Images ``start..stop-1`` (on the system's device) of an ``n``-image request. The whole request (0, n)
    draws as sampling always has: one CPU generator seeded with ``seed`` gives x_T and then every step's
    noise, so old seeds give the same images. A part gives each image its own generator
    (:class:`ImageNoise`), since with one generator an image's step noise would depend on the batch it is
    in. A grounded request sampled in parts must come planned (:class:`Layouts`): see :func:`generate_batches`.
    Keyword arguments as :func:`generate`."""
    device = next(system.network.parameters()).device
    whole = (start, stop) == (0, n)
    b = stop - start
    part = request if whole else request_part(system.conditioner, request, start, stop)
    cond, null = system.conditioner.condition(part, b, device, seed=seed)
    noise = None if whole else ImageNoise(seed, range(start, stop))
    recording = attention.recording(system.network, b) if attention is not None else contextlib.nullcontext()
    with recording:
        x = run_sampler(system.network, cfg, b, cond, null, seed=seed, noise=noise,
                        callback=system.codec.preview(callback), **kwargs)  # fmt: skip
    return system.codec.decode(x)


def generate_batches(system: DiffusionSystem, cfg: DiffusionRunConfig, n: int, request: Any = None, *,
                     batch_size: int = SAMPLE_BATCH, seed: int = 0, callback=None, progress: bool = False,
                     attention=None, **kwargs) -> Iterator[torch.Tensor]:  # fmt: skip
    """:func:`generate`'s images as batches of at most ``batch_size`` (on the system's device), each yielded
    as soon as it is drawn, so that a caller can write it and let it go: memory holds one batch however
    large ``n`` is. ``progress``: the sampler's bar over steps for one batch, a bar over images for
    several. ``callback`` sees the first batch. ``attention(start, stop)``, when given, returns the
    ``CrossAttentionMaps`` to record images ``start..stop-1`` into (a fresh one per batch), or None."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DifflabError(f"batch_size {batch_size!r} is invalid; expected a positive integer")
    record = attention or (lambda start, stop: None)
    if n <= batch_size:
        yield generate_range(system, cfg, n, request, 0, n, seed=seed, callback=callback, progress=progress,
                             attention=record(0, n), **kwargs)  # fmt: skip
        return
    if isinstance(system.conditioner, GroundedPrompts) and not isinstance(request, Layouts):
        request = system.conditioner.plan(request, seed)  # the whole request at once, as one batch plans it
    with tqdm(total=n, desc="sampling", unit="image", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yield generate_range(system, cfg, n, request, start, stop, seed=seed,
                                 callback=callback if start == 0 else None, attention=record(start, stop),
                                 **kwargs)  # fmt: skip
            bar.update(stop - start)


@torch.no_grad()
def generate(system: DiffusionSystem, cfg: DiffusionRunConfig, n: int, request: Any = None, *,
             batch_size: int = SAMPLE_BATCH, attention=None, **kwargs) -> torch.Tensor:  # fmt: skip
    """``n`` images (N, C, H, W) in [-1, 1] of ``request`` (class labels, prompts; None: the
    conditioner's default), on the system's device. ``callback(i, x_t, t, x0_hat)`` sees images (decoded
    by the codec); ``attention``, a :class:`difflab.models.attention_maps.CrossAttentionMaps`, records the
    cross-attention of every step. Other keyword arguments as :func:`difflab.models.recipe.run_sampler`
    (sampler, steps, cfg_scale, spacing, seed, progress, sampler_options).

    Sampled ``batch_size`` at a time. A request that fits one batch draws as it always has (one generator
    seeded with ``seed``); a larger one gives image i its own generator seeded from (seed, i), so its
    images do not depend on ``batch_size`` (:func:`generate_range`). ``callback`` sees the first batch."""
    if attention is None or n <= batch_size:
        record = None if attention is None else (lambda start, stop: attention)
        batches = list(generate_batches(system, cfg, n, request, batch_size=batch_size, attention=record,
                                        **kwargs))  # fmt: skip
        return batches[0] if len(batches) == 1 else torch.cat(batches)
    parts = []

    def fresh(start: int, stop: int):
        parts.append(type(attention)(attention.size))
        return parts[-1]

    images = torch.cat(list(generate_batches(system, cfg, n, request, batch_size=batch_size, attention=fresh,
                                             **kwargs)))  # fmt: skip
    # an image's maps are its own (a mean over steps), so the batches' maps side by side are the request's
    attention.set_maps(torch.cat([m.maps() for m in parts]))
    return images


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
    sampling_network: Callable[[nn.Module], nn.Module] | None = None
    """The denoiser the grids sample, given the trained network's EMA, when the trained network is not one
    (a ControlNet is sampled through its frozen base); None: the trained network itself."""
    draw: Callable[[DiffusionSystem, Any, Callable | None], torch.Tensor] | None = None
    """``draw(system, request, callback)`` -> the grid's images, when a system samples otherwise than
    :func:`generate` (InstructPix2Pix's two-scale guidance); None: :func:`generate` at the run's defaults."""
    on_grid: Callable[[torch.Tensor, int, Path], None] | None = None
    """Called with each sample grid's images, the step and the run directory after the grid is saved
    (main process only): a system's own account of its grids (a ControlNet's fidelity curve)."""


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
    (:func:`~difflab.models.runs.claim_run_dir`, the trainer)."""
    with claim_run_dir(run_dir, cfg, resume, load_config, inputs=inputs) as run_dir:
        with main_process_first():
            p = parts(run_dir)
        torch.manual_seed(cfg.train.seed)  # the initial weights
        net = network()
        schedule = cfg.diffusion.make_schedule()
        loader = make_loader(p.dataset, cfg.train)

        def draw(ema_network: nn.Module, n: int, callback) -> torch.Tensor:
            device = next(ema_network.parameters()).device
            denoiser = ema_network if p.sampling_network is None else p.sampling_network(ema_network)
            system = DiffusionSystem(denoiser, p.conditioner.to(device), p.codec.to(device))
            request = p.grid_request[:n] if p.grid_request is not None else None
            if p.draw is not None:
                drawn["images"] = p.draw(system, request, callback)
            else:
                drawn["images"] = generate(system, cfg, n, request, seed=0, callback=callback)
            return drawn["images"]

        drawn: dict[str, torch.Tensor] = {}
        sample_fn = grid_sample_fn(cfg, draw)
        if p.on_grid is not None:
            grid_only = sample_fn

            def sample_fn(ema_network: nn.Module, step: int, out_dir: Path) -> None:
                grid_only(ema_network, step, out_dir)
                p.on_grid(drawn.pop("images"), step, Path(out_dir))

        loss = (p.loss_fn or make_loss_fn)(cfg, schedule, p.conditioner, p.codec)
        trainer = Trainer(net, loss, loader, cfg.train, run_dir, sample_fn=sample_fn,
                          model_config=model_config)  # fmt: skip
        trainer.fit(resume=resume)
    return run_dir
