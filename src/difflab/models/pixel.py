"""Pixel-space diffusion (Ho et al. 2020), class-conditional with classifier-free guidance (Ho & Salimans
2022): the first model a difflab user trains.

A declaration of parts (:mod:`difflab.models.system`): the shared recipe, class labels of the data (or no
condition) as the conditioner, and pixels as the codec. One config holds everything a run needs (data,
UNet, noise schedule and objective, trainer, sampling defaults); :func:`resolve` derives the UNet's
channels, side and class count from the data, and the resolved record is ``RUN_DIR/config.json``, so
every command can be pointed at a run directory.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from difflab.data.config import DataConfig, class_factors, data_channels, make_dataset, num_classes
from difflab.models import pixel_eval
from difflab.models.codecs import Pixels
from difflab.models.conditioners import class_conditioner
from difflab.models.family import Family, Preset
from difflab.models.recipe import DiffusionConfig, SampleConfig, check_cond_drop, check_sampling
from difflab.models.runs import load_latest_weights, load_run_config
from difflab.models.system import DiffusionSystem, TrainingParts, train_system, unet_with_inputs
from difflab.models.system import generate_classes as generate
from difflab.nn.unet import UNet, UNetConfig
from difflab.train.config import TrainConfig

__all__ = ["FAMILY", "PixelDiffusionConfig", "generate", "load_model", "resolve", "train"]


@dataclass(frozen=True)
class PixelDiffusionConfig:
    kind: str = "pixel"
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    """Its channels, side and class count follow from the data (set by :func:`resolve`)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cond_drop: float = 0.1
    """Probability of replacing a label by the null class during training (Ho & Salimans 2022 use 0.1-0.2)."""

    def __post_init__(self) -> None:
        check_cond_drop(self.cond_drop)


def resolve(cfg: PixelDiffusionConfig, *, attach: bool = True) -> PixelDiffusionConfig:
    """The run record of a request: the UNet's input/output channels, side and class count follow from
    the data, so that --set data.dataset=digits cannot leave a network built for another dataset; and the
    sampling defaults are checked against the schedule. (A pixel run has no parent run: ``attach`` is
    accepted for the family interface.)"""
    c = data_channels(cfg.data)
    unet = dataclasses.replace(
        cfg.unet, in_channels=c, out_channels=c, image_size=cfg.data.image_size,
        num_classes=num_classes(cfg.data), class_factors=class_factors(cfg.data),
    )  # fmt: skip
    record = dataclasses.replace(cfg, unet=unet)
    check_sampling(record)
    return record


# ---------------------------------------------------------------------------------------------- system


def load_config(run_dir: str | Path) -> PixelDiffusionConfig:
    return load_run_config(run_dir, PixelDiffusionConfig, "pixel", "a pixel diffusion run")


def load_model(
    run_dir: str | Path, *, ema: bool = True, device: str = "cpu"
) -> tuple[DiffusionSystem, PixelDiffusionConfig]:
    """The trained system of a run (EMA weights by default) and its config."""
    cfg = load_config(run_dir)
    unet = load_latest_weights(run_dir, UNet(cfg.unet), ema=ema)
    system = DiffusionSystem(unet, class_conditioner(cfg.data, cfg.cond_drop), Pixels())
    return system.to(device).eval(), cfg


def train(cfg: PixelDiffusionConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train a pixel diffusion model into ``run_dir`` (config.json, checkpoints/, metrics.jsonl,
    samples/step_*.png, trajectory.png). ``resume=True`` continues from the latest good checkpoint."""
    cfg = resolve(cfg)

    def parts(run_dir: Path) -> TrainingParts:
        return TrainingParts(class_conditioner(cfg.data, cfg.cond_drop), Pixels(), make_dataset(cfg.data))

    return train_system(cfg, run_dir, resume=resume, load_config=load_config, parts=parts,
                        network=lambda: UNet(cfg.unet), model_config=cfg.unet)  # fmt: skip


evaluate = pixel_eval.run_evaluator(load_model)
"""Class accuracy by the reader (or the digits SVC) and Fréchet distance of ``n`` samples (:mod:`pixel_eval`)."""


# -------------------------------------------------------------------------------------------- presets

# The CPU presets (demo, digits) share one network and one training recipe; the data and length differ.
# A narrow 32x32 level (16 channels) and a wide 8x8 level (64): most FLOPs are spent at full resolution,
# while shapes at this size are decided at 16x16 and 8x8 (benchmarks/pixel_learning.py compares the
# variants per second of training, docs/benchmarks.md); guidance w = 2 was chosen there too.
_CPU_UNET = UNetConfig(
    channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(8,), heads=4
)
_CPU_TRAIN = TrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.995, log_every=25,
                         checkpoint_every=250, sample_every=500)  # fmt: skip
_CPU_SAMPLE = SampleConfig(steps=20, cfg_scale=2.0)

PRESETS = (
    Preset(
        "tiny",
        "pixel",
        "16x16 world of 2 shapes x 2 colours, a 0.18M-parameter UNet: learns in seconds (tests)",
        lambda: PixelDiffusionConfig(
            data=DataConfig(world="tiny", image_size=16, n=4096),
            unet=UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                            heads=2, norm_groups=4),
            train=TrainConfig(steps=150, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.99, log_every=10,
                              checkpoint_every=None, progress=False),
            sample=SampleConfig(steps=10, grid=16),
        ),
    ),
    Preset(
        "demo",
        "pixel",
        "32x32 one-object toy world, class-conditional on shape x colour (40 classes): minutes on a 2-core CPU",
        lambda: PixelDiffusionConfig(data=DataConfig(world="single32", image_size=32), unet=_CPU_UNET,
                                     train=_CPU_TRAIN, sample=_CPU_SAMPLE),
    ),
    Preset(
        "digits",
        "pixel",
        "scikit-learn handwritten digits upsampled to 32x32 (bilinear), class-conditional 0-9: minutes on a CPU",
        lambda: PixelDiffusionConfig(data=DataConfig(dataset="digits", image_size=32), unet=_CPU_UNET,
                                     train=dataclasses.replace(_CPU_TRAIN, steps=1000), sample=_CPU_SAMPLE),
    ),
    Preset(
        "base",
        "pixel",
        "32x32 toy world of one or two objects, unconditional, a 40M-parameter UNet: for a GPU",
        lambda: PixelDiffusionConfig(
            data=DataConfig(world="scene32", image_size=32, conditional=False, n=1_000_000),
            unet=UNetConfig(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                            attention_resolutions=(16, 8), dropout=0.1),
            train=TrainConfig(steps=100_000, batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.9999,
                              log_every=100, checkpoint_every=5000, sample_every=5000),
            sample=SampleConfig(steps=50),
        ),
    ),
    Preset(
        "folder",
        "pixel",
        "your own images (--set data.folder=PATH), unconditional, 32x32",
        lambda: PixelDiffusionConfig(
            data=DataConfig(dataset="folder", image_size=32, conditional=False),
            unet=UNetConfig(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16,)),
            train=TrainConfig(steps=20_000, batch_size=64, lr=2e-4, warmup_steps=500, ema_decay=0.999,
                              log_every=50, checkpoint_every=1000, sample_every=1000),
        ),
    ),
)  # fmt: skip

FAMILY = Family(
    name="pixel",
    what="a pixel diffusion run",
    config=PixelDiffusionConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=unet_with_inputs,
    writes="samples.png, trajectory.png",
    eval_options=("sampler", "steps", "cfg_scale"),
    draws="classes",
)
