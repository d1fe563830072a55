"""Latent diffusion (Rombach et al. 2022): the recipe of pixel diffusion run on the latents of a trained KL
autoencoder (:mod:`difflab.models.vae`) instead of on pixels.

A declaration of parts (:mod:`difflab.models.system`): the shared recipe, class labels (or no condition)
as the conditioner, and the autoencoder's scaled latents as the codec (:class:`~difflab.models.codecs.Latents`,
whose docstring has the data flow, the latent cache and the scale).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from difflab.config import to_dict
from difflab.data.config import DataConfig, class_factors, make_dataset, num_classes
from difflab.errors import check_choice, check_optional_float
from difflab.models import pixel_eval
from difflab.models.codecs import (
    POSTERIOR,
    LatentDataset,
    attach_autoencoder,
    cached_latents,
    check_vae_unchanged,
    load_latents,
)
from difflab.models.conditioners import class_conditioner
from difflab.models.family import Family, Preset
from difflab.models.recipe import DiffusionConfig, SampleConfig, check_cond_drop, check_sampling
from difflab.models.runs import load_latest_weights, load_run_config
from difflab.models.system import DiffusionSystem, TrainingParts, train_system, unet_with_inputs
from difflab.models.system import generate_classes as generate
from difflab.nn.unet import UNet, UNetConfig
from difflab.nn.vae import KLAutoencoder
from difflab.train.config import TrainConfig
from difflab.world.render import RENDERER_VERSION

__all__ = ["FAMILY", "LatentDiffusionConfig", "generate", "latent_dataset", "load_model", "resolve", "train"]


@dataclass(frozen=True)
class LatentDiffusionConfig:
    kind: str = "ldm"
    vae: str | None = None
    """Run directory of a trained autoencoder (``difflab train --preset vae_f4 --out RUN``): --set vae=RUN."""
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    """Its channels and side are the autoencoder's latent shape, its class count the data's (set by
    :func:`resolve`)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cond_drop: float = 0.1
    """Probability of replacing a label by the null class during training (for classifier-free guidance)."""
    posterior: str = "sample"
    """'sample': train on z ~ q(z|x), fresh each step (the paper); 'mode': on the posterior mean."""
    latent_scale: float | None = None
    """1 / std of the latents, copied from the VAE run's latent_stats.json by :func:`resolve`."""
    vae_checkpoint: str | None = None
    """The VAE checkpoint (name:sha256 prefix) this run was trained on; checked when it is loaded."""

    def __post_init__(self) -> None:
        check_cond_drop(self.cond_drop)
        check_choice("posterior", self.posterior, POSTERIOR)
        check_optional_float("latent_scale", self.latent_scale, 0.0, lo_open=True)


def resolve(cfg: LatentDiffusionConfig, *, attach: bool = True) -> LatentDiffusionConfig:
    """The run record of a request: the UNet's class count from the data and, with ``attach``, the
    autoencoder run (path, checkpoint id, latent scale, and the UNet's channels and side from its latent
    shape); the sampling defaults checked against the schedule. ``attach=False`` keeps the preset's
    latent shape (``difflab info`` of a preset that names no autoencoder yet)."""
    unet = dataclasses.replace(
        cfg.unet, num_classes=num_classes(cfg.data), class_factors=class_factors(cfg.data)
    )
    record = dataclasses.replace(cfg, unet=unet)
    if attach:
        d = cfg.data
        record = attach_autoencoder(record, d.dataset, d.world, d.image_size)
    check_sampling(record)
    return record


def latent_dataset(cfg: LatentDiffusionConfig, autoencoder: KLAutoencoder | None = None) -> LatentDataset:
    """The training set of a resolved config encoded by its autoencoder, read from (or written once to)
    the autoencoder run's latent cache; class labels ride along in the cache."""
    dataset = make_dataset(cfg.data)
    extra = None
    if num_classes(cfg.data) is not None:

        def extra(start: int, stop: int) -> dict[str, np.ndarray]:
            return {"label": np.array([int(dataset[i]["label"]) for i in range(start, stop)], dtype=np.int64)}

    data_key = {
        "data": to_dict(cfg.data),
        "renderer": RENDERER_VERSION if cfg.data.dataset == "toy" else None,
    }
    return LatentDataset(cached_latents(cfg, dataset, data_key, autoencoder, extra))


# ---------------------------------------------------------------------------------------------- system


def load_config(run_dir: str | Path) -> LatentDiffusionConfig:
    return load_run_config(run_dir, LatentDiffusionConfig, "ldm", "a latent diffusion (ldm) run")


def load_model(
    run_dir: str | Path, *, ema: bool = True, device: str = "cpu"
) -> tuple[DiffusionSystem, LatentDiffusionConfig]:
    """The trained UNet (EMA weights by default) between its conditioner and its autoencoder, and the
    config. An error when the autoencoder run has been retrained since: its latents would no longer be the
    ones this UNet learned."""
    cfg = load_config(run_dir)
    check_vae_unchanged(cfg, f"'{run_dir}' was trained on it; retrain the latent model")
    unet = load_latest_weights(run_dir, UNet(cfg.unet), ema=ema)
    system = DiffusionSystem(unet, class_conditioner(cfg.data, cfg.cond_drop), load_latents(cfg))
    return system.to(device).eval(), cfg


def train(cfg: LatentDiffusionConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train latent diffusion into ``run_dir`` on the cached latents of ``cfg.vae`` (config.json,
    checkpoints/, metrics.jsonl, samples/step_*.png, samples.png, trajectory.png)."""
    cfg = resolve(cfg)

    def parts(run_dir: Path) -> TrainingParts:
        codec = load_latents(cfg)
        return TrainingParts(class_conditioner(cfg.data, cfg.cond_drop), codec,
                             latent_dataset(cfg, codec.autoencoder))  # fmt: skip

    return train_system(cfg, run_dir, resume=resume, load_config=load_config, inputs=("vae_checkpoint",),
                        parts=parts, network=lambda: UNet(cfg.unet), model_config=cfg.unet)  # fmt: skip


evaluate = pixel_eval.run_evaluator(load_model)
"""Class accuracy by the reader (or the digits SVC) and Fréchet distance of ``n`` samples (:mod:`pixel_eval`)."""


# -------------------------------------------------------------------------------------------- presets

PRESETS = (
    Preset(
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
    ),
    Preset(
        "ldm_toy",
        "ldm",
        "class-conditional latent diffusion on the one-object toy world (--set vae=RUN of a vae_f* run): minutes "
        "on a CPU",
        lambda: LatentDiffusionConfig(
            data=DataConfig(world="single32", image_size=32, n=20_000),
            unet=UNetConfig(in_channels=4, out_channels=4, image_size=16, channels=32, channel_mult=(1, 2),
                            num_res_blocks=1, attention_resolutions=(8, 4), heads=4),
            train=TrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.995, log_every=25,
                              checkpoint_every=250, sample_every=500),
            sample=SampleConfig(steps=20, cfg_scale=2.0),
        ),
    ),
)  # fmt: skip

FAMILY = Family(
    name="ldm",
    what="a latent diffusion (ldm) run",
    config=LatentDiffusionConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=unet_with_inputs,
    writes="samples.png, trajectory.png",
    eval_options=("sampler", "steps", "cfg_scale"),
    parents=("vae",),
    draws="classes",
)
