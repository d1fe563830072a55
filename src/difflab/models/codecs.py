"""Codecs: the space a diffusion system runs in, and the way back to pixels.

- :class:`Pixels`: diffusion on images in [-1, 1] themselves (Ho et al. 2020).
- :class:`Latents`: diffusion on the latents of a trained KL autoencoder (Rombach et al. 2022):

      train:   x -> q(z|x) (once: the dataset is encoded and cached) -> z ~ q(z|x), z' = scale * z
      sample:  z'_0 from any sampler -> D(z'_0 / scale) -> image

  ``scale`` is the autoencoder run's measured 1 / std of its latents (``latent_stats.json``), copied into
  the run's config when it is resolved: the noise schedule assumes unit-variance data, and a latent with
  std 5 would make every noise level look 25x less noisy than the schedule says (Sec. 4.3.2 and
  Appendix D.1 of the paper; Stable Diffusion's 0.18215).

The encoder never runs during diffusion training: ``latent_cache/`` in the autoencoder's run directory
holds the posterior mean and standard deviation of every training image (keyed by the autoencoder's
checkpoint hash and what the images are a function of, see :mod:`difflab.data.cache`), and each step
draws a fresh z = mean + std * eps from them with the trainer's generator.

Every codec answers ``training_input(batch, generator)`` (x_0 of a training batch), ``decode(x)`` (the
sampler's output -> images in [-1, 1]) and ``preview(callback)`` (a sampler callback that sees images).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from difflab.data.cache import cached_arrays
from difflab.errors import DifflabError
from difflab.models import vae as vae_model
from difflab.models.runs import checkpoint_id
from difflab.nn.unet import UNetConfig
from difflab.nn.vae import KLAutoencoder

POSTERIOR = ("sample", "mode")


class Pixels(nn.Module):
    """Diffusion on the images themselves: the identity codec, or with ``patch`` p > 1 the pixels folded
    into p x p patches (space-to-depth, ``pixel_unshuffle``: a 32x32x3 image is a 16x16x12 map), as DiT
    (Peebles & Xie 2023) patchifies its input with p = 2 and simple diffusion (Hoogeboom et al. 2023,
    Sec. 3) lowers the UNet's resolution with a fixed invertible transform. The network then runs at the
    side of an f = p autoencoder's latents, at their cost, with nothing to train and nothing lost in
    decoding. ``shift`` and ``scale`` map the pixels to zero mean and unit variance ((x - shift) * scale,
    the role of the latent scale in :class:`Latents`): the noise schedule assumes unit-variance data."""

    def __init__(self, patch: int = 1, shift: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.patch, self.shift, self.scale = patch, shift, scale

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> (N, C p^2, H / p, W / p), normalised."""
        x = nn.functional.pixel_unshuffle(images, self.patch) if self.patch > 1 else images
        return (x - self.shift) * self.scale

    def training_input(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return self.encode(batch["image"])

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        x = x / self.scale + self.shift
        return (nn.functional.pixel_shuffle(x, self.patch) if self.patch > 1 else x).clamp(-1, 1)

    def preview(self, callback):
        if callback is None or (self.patch == 1 and self.scale == 1 and self.shift == 0):
            return callback

        def decoded(i, x, t, x0):
            callback(i, self.decode(x[:8]), t, self.decode(x0[:8]))

        return decoded


class Latents(nn.Module):
    """A trained autoencoder's latents, scaled to unit variance (see the module docstring)."""

    def __init__(self, autoencoder: KLAutoencoder | None, scale: float, posterior: str = "sample"):
        super().__init__()
        self.autoencoder, self.scale, self.posterior = autoencoder, scale, posterior

    def training_input(self, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """Scaled training latents z' = scale * z of a batch of cached posteriors: z ~ q(z|x) drawn fresh
        from the trainer's generator (``posterior='sample'``, the paper) or the posterior mean (``'mode'``)."""
        mean = batch["mean"]
        z = mean
        if self.posterior == "sample":
            eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + batch["std"] * eps
        return z * self.scale

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) in [-1, 1] -> scaled latents: the posterior mean, as an image to edit is encoded
        (inversion, :mod:`difflab.models.inversion`)."""
        return self.autoencoder.encode(images).mode() * self.scale

    def decode(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, c, h, w) -> images (N, C, H, W) in [-1, 1]."""
        return self.autoencoder.decode(z_scaled / self.scale).clamp(-1, 1)

    def preview(self, callback):
        """A sampler callback that hands ``callback`` the decoded x_t and x0_hat of the first 8 samples,
        for trajectory strips; None stays None."""
        if callback is None:
            return None

        def decoded(i, x, t, x0):
            callback(i, self.decode(x[:8]), t, self.decode(x0[:8]))

        return decoded


# ------------------------------------------------------------------------------------ the parent run


class LatentRunConfig(Protocol):
    """What a latent system's config records of its autoencoder run (ldm and t2i configs have it)."""

    vae: str | None
    vae_checkpoint: str | None
    latent_scale: float | None
    posterior: str
    unet: UNetConfig


def attach_autoencoder(cfg: LatentRunConfig, dataset: str, world: str, image_size: int):
    """``cfg`` with its autoencoder run resolved: the absolute path, checkpoint id and latent scale, and
    the UNet's channels and side set to the latent shape. ``dataset``, ``world`` and ``image_size`` are the
    system's images, which must be the autoencoder's. Errors name what does not fit."""
    if cfg.vae is None:
        raise DifflabError(
            "latent diffusion needs a trained autoencoder: --set vae=RUN_DIR "
            "(train one with 'difflab train --preset vae_f4 --out RUN_DIR')"
        )
    run = Path(cfg.vae).expanduser().resolve()
    vae_cfg = vae_model.load_config(run)
    theirs = vae_cfg.data
    if (dataset, image_size) != (theirs.dataset, theirs.image_size) or (
        dataset == "toy" and world != theirs.world
    ):
        raise DifflabError(
            f"autoencoder '{run}' was trained on {theirs.dataset}/{theirs.world} at {theirs.image_size}px; "
            f"this model's data is {dataset}/{world} at {image_size}px"
        )
    stats = vae_model.latent_stats(run)
    c, h, _ = vae_cfg.vae.latent_shape
    unet = dataclasses.replace(cfg.unet, in_channels=c, out_channels=c, image_size=h)
    return dataclasses.replace(cfg, vae=str(run), unet=unet, latent_scale=float(stats["scale"]),
                               vae_checkpoint=checkpoint_id(run, "autoencoder run"))  # fmt: skip


def check_vae_unchanged(cfg: LatentRunConfig, what: str) -> None:
    """An error when ``cfg.vae`` no longer holds the checkpoint ``cfg`` was attached to: latents of other
    weights are not the ones this model learned (or that its cache holds). ``what`` says what was asked."""
    now = checkpoint_id(cfg.vae, "autoencoder run")
    if now != cfg.vae_checkpoint:
        raise DifflabError(
            f"autoencoder run '{cfg.vae}' has changed since {what} (checkpoint {cfg.vae_checkpoint}, now {now})"
        )


def load_latents(cfg: LatentRunConfig, autoencoder: KLAutoencoder | None = None) -> Latents:
    """The codec of a resolved latent config, with its autoencoder (loaded from ``cfg.vae`` if not given)."""
    if autoencoder is None:
        autoencoder = vae_model.load_model(cfg.vae)[0]
    return Latents(autoencoder, cfg.latent_scale, cfg.posterior)


# ---------------------------------------------------------------------------------- the latent cache


class LatentDataset(torch.utils.data.Dataset):
    """Cached posterior parameters: item i is ``{"mean", "std"}`` (c, h, w) (+ ``"label"``)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.arrays["mean"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.arrays.items()}


def cached_latents(
    cfg: LatentRunConfig, dataset, data_key: dict, autoencoder: KLAutoencoder | None = None, extra=None
) -> dict[str, np.ndarray]:
    """The posterior mean and std (N, c, h, w) of every ``dataset[i]["image"]`` under the autoencoder of
    ``cfg`` (resolved: ``vae`` and ``vae_checkpoint`` attached), read from (or written once to) its run's
    latent cache. ``data_key`` says what the images are a function of; ``extra(start, stop)`` adds arrays
    of other per-item fields to the cache (class labels)."""
    check_vae_unchanged(cfg, "this config was attached to it")
    if autoencoder is None:
        autoencoder = vae_model.load_model(cfg.vae)[0]

    def make_batch(start: int, stop: int) -> dict[str, np.ndarray]:
        out = vae_model.encode_dataset(autoencoder, dataset, range(start, stop))
        return {k: v.numpy() for k, v in out.items()} | (extra(start, stop) if extra else {})

    # The images are a function of the data (and, on the toy world, the renderer); the latents also of
    # the autoencoder's exact weights.
    key = {"kind": "vae-latents", "vae_checkpoint": cfg.vae_checkpoint, **data_key}
    return cached_arrays(Path(cfg.vae) / "latent_cache", "latents", key, len(dataset),
                         make_batch=make_batch, desc="encoding the dataset")  # fmt: skip
