"""Latent diffusion (Rombach et al. 2022): the pixel model's UNet, schedules, samplers and trainer, run on
the latents of a trained KL autoencoder (:mod:`difflab.models.vae`) instead of on pixels.

    train:   x -> q(z|x) (once: the dataset is encoded and cached)  ->  z ~ q(z|x), z' = scale * z
             -> the pixel recipe on z' (t, eps, x_t, CFG label dropout, v-prediction, min-SNR)
    sample:  z'_T ~ N(0, I) -> any sampler -> z'_0 -> D(z'_0 / scale) -> image

The encoder never runs during diffusion training: ``latent_cache/`` in the autoencoder's run directory
holds the posterior mean and standard deviation of every training image (keyed by the autoencoder's
checkpoint hash and the data config, see :mod:`difflab.data.cache`), and each step draws a fresh
z = mean + std * eps from them with the trainer's generator. The decoder runs only for sample grids and
evaluation.

``scale`` is the autoencoder run's measured 1 / std of its latents (``latent_stats.json``), copied into
this run's config.json when training starts: the noise schedule assumes unit-variance data, and a latent
with std 5 would make every noise level look 25x less noisy than the schedule says (Sec. 4.3.2 and
Appendix D.1 of the paper; Stable Diffusion's 0.18215).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from difflab.config import to_dict
from difflab.errors import DifflabError, check_choice
from difflab.models import pixel
from difflab.models.pixel import (
    DataConfig,
    DiffusionConfig,
    SampleConfig,
    check_cond_drop,
    class_factors,
    num_classes,
)
from difflab.models.runs import checkpoint_id, load_latest_weights, load_run_config, prepare_run_dir
from difflab.nn.unet import UNet, UNetConfig
from difflab.nn.vae import KLAutoencoder
from difflab.presets import register_preset
from difflab.train.distributed import main_process_first
from difflab.train.trainer import TrainConfig

POSTERIOR = ("sample", "mode")


@dataclass(frozen=True)
class LatentDiffusionConfig:
    kind: str = "ldm"
    vae: str | None = None
    """Run directory of a trained autoencoder (``difflab train --preset vae_f4 --out RUN``): --set vae=RUN."""
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    """Its channels and side are the autoencoder's latent shape (set from the VAE run when training starts)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cond_drop: float = 0.1
    """Probability of replacing a label by the null class during training (for classifier-free guidance)."""
    posterior: str = "sample"
    """'sample': train on z ~ q(z|x), fresh each step (the paper); 'mode': on the posterior mean."""
    latent_scale: float | None = None
    """1 / std of the latents, copied from the VAE run's latent_stats.json when training starts."""
    vae_checkpoint: str | None = None
    """The VAE checkpoint (name:sha256 prefix) this run was trained on; checked when it is loaded."""

    def __post_init__(self) -> None:
        check_cond_drop(self.cond_drop)
        check_choice("posterior", self.posterior, POSTERIOR)
        derived = dataclasses.replace(
            self.unet, num_classes=num_classes(self.data), class_factors=class_factors(self.data)
        )
        object.__setattr__(self, "unet", derived)


def check_vae_unchanged(cfg: LatentDiffusionConfig, what: str) -> None:
    """An error when ``cfg.vae`` no longer holds the checkpoint ``cfg`` was attached to: latents of other
    weights are not the ones this model learned (or that its cache holds). ``what`` says what was asked."""
    now = checkpoint_id(cfg.vae, "autoencoder run")
    if now != cfg.vae_checkpoint:
        raise DifflabError(
            f"autoencoder run '{cfg.vae}' has changed since {what} (checkpoint {cfg.vae_checkpoint}, now {now})"
        )


def attach_vae(cfg: LatentDiffusionConfig) -> LatentDiffusionConfig:
    """``cfg`` with the autoencoder run resolved: its absolute path, checkpoint id, latent scale, and the
    UNet's channels and side set to the latent shape. Errors name what does not fit."""
    from difflab.models import vae as vae_model

    if cfg.vae is None:
        raise DifflabError(
            "latent diffusion needs a trained autoencoder: --set vae=RUN_DIR "
            "(train one with 'difflab train --preset vae_f4 --out RUN_DIR')"
        )
    run = Path(cfg.vae).expanduser().resolve()
    vae_cfg = vae_model.load_config(run)
    ours, theirs = cfg.data, vae_cfg.data
    if (ours.dataset, ours.image_size) != (theirs.dataset, theirs.image_size) or (
        ours.dataset == "toy" and ours.world != theirs.world
    ):
        raise DifflabError(
            f"autoencoder '{run}' was trained on {theirs.dataset}/{theirs.world} at {theirs.image_size}px; "
            f"this model's data is {ours.dataset}/{ours.world} at {ours.image_size}px"
        )
    stats = vae_model.latent_stats(run)
    c, h, _ = vae_cfg.vae.latent_shape
    unet = dataclasses.replace(cfg.unet, in_channels=c, out_channels=c, image_size=h)
    return dataclasses.replace(cfg, vae=str(run), unet=unet, latent_scale=float(stats["scale"]),
                               vae_checkpoint=checkpoint_id(run, "autoencoder run"))  # fmt: skip


# ----------------------------------------------------------------------------------------------- data


class LatentDataset(torch.utils.data.Dataset):
    """Cached posterior parameters: item i is ``{"mean", "std"}`` (c, h, w) (+ ``"label"``)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = {k: torch.from_numpy(v) for k, v in arrays.items()}

    def __len__(self) -> int:
        return len(self.arrays["mean"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.arrays.items()}


def cached_latents(
    cfg, dataset, data_key: dict, autoencoder: KLAutoencoder | None = None, extra=None
) -> dict[str, np.ndarray]:
    """The posterior mean and std (N, c, h, w) of every ``dataset[i]["image"]`` under the autoencoder of
    ``cfg`` (which has ``vae`` and ``vae_checkpoint`` attached), read from (or written once to) its run's
    latent cache. ``data_key`` says what the images are a function of; ``extra(start, stop)`` adds arrays
    of other per-item fields to the cache (class labels)."""
    from difflab.data.cache import cached_arrays
    from difflab.models import vae as vae_model

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


def latent_dataset(cfg: LatentDiffusionConfig, autoencoder: KLAutoencoder | None = None) -> LatentDataset:
    """The training set encoded by the autoencoder, read from (or written once to) its latent cache."""
    from difflab.world.render import RENDERER_VERSION

    if cfg.vae_checkpoint is None:
        cfg = attach_vae(cfg)
    dataset = pixel.make_dataset(cfg.data)
    extra = None
    if num_classes(cfg.data) is not None:

        def extra(start: int, stop: int) -> dict[str, np.ndarray]:
            return {"label": np.array([int(dataset[i]["label"]) for i in range(start, stop)], dtype=np.int64)}

    data_key = {
        "data": to_dict(cfg.data),
        "renderer": RENDERER_VERSION if cfg.data.dataset == "toy" else None,
    }
    return LatentDataset(cached_latents(cfg, dataset, data_key, autoencoder, extra))


def draw_latents(cfg, batch: dict, generator: torch.Generator) -> torch.Tensor:
    """Scaled training latents z' = scale * z of a batch of cached posteriors: z ~ q(z|x) drawn fresh
    from the trainer's generator (``posterior='sample'``, the paper) or the posterior mean (``'mode'``)."""
    mean = batch["mean"]
    z = mean
    if cfg.posterior == "sample":
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        z = mean + batch["std"] * eps
    return z * cfg.latent_scale


# ---------------------------------------------------------------------------------------------- model


class LatentDiffusion(nn.Module):
    """The sampling-time system: the UNet over scaled latents and the autoencoder that decodes them."""

    def __init__(self, unet: UNet, autoencoder: KLAutoencoder, scale: float):
        super().__init__()
        self.unet = unet
        self.autoencoder = autoencoder
        self.scale = scale

    def decode(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Scaled latents (N, c, h, w) -> images (N, C, H, W) in [-1, 1]."""
        return self.autoencoder.decode(z_scaled / self.scale).clamp(-1, 1)


def make_loss_fn(cfg: LatentDiffusionConfig, schedule):
    """The pixel loss (:func:`difflab.models.pixel.make_loss_fn`) on z' = scale * z, z ~ q(z|x)."""
    inner = pixel.make_loss_fn(cfg, schedule)

    def loss_fn(model: UNet, batch: dict, generator: torch.Generator):
        return inner(model, {**batch, "image": draw_latents(cfg, batch, generator)}, generator)

    return loss_fn


@torch.no_grad()
def generate(
    model: LatentDiffusion, cfg: LatentDiffusionConfig, n: int, *, callback=None, **kwargs
) -> torch.Tensor:
    """Draw ``n`` images (N, C, H, W) in [-1, 1]: sample latents with :func:`difflab.models.pixel.diffuse`
    (same keyword arguments) and decode them. A ``callback`` sees decoded x_t and x0_hat of the first 8."""
    return model.decode(
        pixel.diffuse(model.unet, cfg, n, callback=decoding_callback(model, callback), **kwargs)
    )


def decoding_callback(model, callback):
    """A sampler callback that hands ``callback`` the decoded x_t and x0_hat of the first 8 samples, for
    trajectory strips of a model that samples latents (``model.decode``); None stays None."""
    if callback is None:
        return None

    def decoded(i, x, t, x0):
        callback(i, model.decode(x[:8]), t, model.decode(x0[:8]))

    return decoded


# ------------------------------------------------------------------------------------------ run dirs


def load_config(run_dir: str | Path) -> LatentDiffusionConfig:
    return load_run_config(run_dir, LatentDiffusionConfig, "ldm", "a latent diffusion (ldm) run")


def load_model(
    run_dir: str | Path, *, ema: bool = True, device: str = "cpu"
) -> tuple[LatentDiffusion, LatentDiffusionConfig]:
    """The trained UNet (EMA weights by default) with its autoencoder, and the config. An error when the
    autoencoder run has been retrained since: its latents would no longer be the ones this UNet learned."""
    from difflab.models import vae as vae_model

    cfg = load_config(run_dir)
    check_vae_unchanged(cfg, f"'{run_dir}' was trained on it; retrain the latent model")
    unet = load_latest_weights(run_dir, UNet(cfg.unet), ema=ema)
    autoencoder = vae_model.load_model(cfg.vae)[0]
    return LatentDiffusion(unet, autoencoder, cfg.latent_scale).to(device).eval(), cfg


# -------------------------------------------------------------------------------------------- presets

register_preset(
    "ldm_tiny",
    "ldm",
    "16x16 world of 2 shapes x 2 colours on a vae_tiny run's 8x8x4 latents: seconds (tests)",
    lambda: LatentDiffusionConfig(
        data=DataConfig(world="tiny", image_size=16, n=2048),
        unet=UNetConfig(in_channels=4, out_channels=4, image_size=8, channels=32, channel_mult=(1, 2),
                        num_res_blocks=1, attention_resolutions=(), heads=2),
        train=TrainConfig(steps=150, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.99, log_every=10,
                          checkpoint_every=None, progress=False),
        sample=SampleConfig(steps=10, grid=16),
    ),
)  # fmt: skip
register_preset(
    "ldm_toy",
    "ldm",
    "class-conditional latent diffusion on the one-object toy world (--set vae=RUN of a vae_f* run): minutes on a CPU",
    lambda: LatentDiffusionConfig(
        data=DataConfig(world="single32", image_size=32, n=20_000),
        unet=UNetConfig(in_channels=4, out_channels=4, image_size=16, channels=32, channel_mult=(1, 2),
                        num_res_blocks=1, attention_resolutions=(8, 4), heads=4),
        train=TrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.995, log_every=25,
                          checkpoint_every=250, sample_every=500),
        sample=SampleConfig(steps=20, cfg_scale=2.0),
    ),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- training


def train(cfg: LatentDiffusionConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train latent diffusion into ``run_dir`` on the cached latents of ``cfg.vae`` (config.json,
    checkpoints/, metrics.jsonl, samples/step_*.png, samples.png, trajectory.png)."""
    from difflab.models import vae as vae_model
    from difflab.train.trainer import Trainer, make_loader

    cfg = attach_vae(cfg)
    run_dir = prepare_run_dir(run_dir, cfg, resume, load_config, inputs=("vae_checkpoint",))
    autoencoder = vae_model.load_model(cfg.vae)[0]
    with main_process_first():  # rank 0 fills the latent cache; under torchrun the others then read it
        data = latent_dataset(cfg, autoencoder)
    torch.manual_seed(cfg.train.seed)  # the initial weights
    unet = UNet(cfg.unet)
    schedule = cfg.diffusion.make_schedule()
    loader = make_loader(data, cfg.train)

    def draw(ema_unet: UNet, n: int, callback) -> torch.Tensor:
        system = LatentDiffusion(
            ema_unet, autoencoder.to(next(ema_unet.parameters()).device), cfg.latent_scale
        )
        return generate(system, cfg, n, seed=0, callback=callback)

    sample_fn = pixel.grid_sample_fn(cfg, draw)
    trainer = Trainer(unet, make_loss_fn(cfg, schedule), loader, cfg.train, run_dir,
                      sample_fn=sample_fn, model_config=cfg.unet)  # fmt: skip
    trainer.fit(resume=resume)
    return run_dir
