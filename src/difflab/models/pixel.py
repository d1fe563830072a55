"""Pixel-space diffusion (Ho et al. 2020), class-conditional with classifier-free guidance (Ho & Salimans
2022): the first model a difflab user trains.

One config holds everything a run needs (data, UNet, noise schedule and objective, trainer, sampling
defaults); it is saved as ``RUN_DIR/config.json`` so every command can be pointed at a run directory.

Training step (Algorithm 1 of Ho et al., with the objective chosen in ``DiffusionConfig``):
    1. t ~ U{0..T-1}, eps ~ N(0, I)                 (drawn from the trainer's generator: exact resume)
    2. x_t = alpha_t x_0 + sigma_t eps              (difflab.diffusion.forward.q_sample)
    3. labels -> the null class with prob. cond_drop (so one network learns p(x|y) and p(x), for CFG)
    4. loss = w(t) || f(x_t, t, y) - target ||^2    (difflab.diffusion.objectives.diffusion_loss)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difflab.diffusion.denoiser import Denoiser, clip_denoised
from difflab.diffusion.forward import q_sample
from difflab.diffusion.guidance import classifier_free_guidance
from difflab.diffusion.objectives import LOSS_WEIGHTINGS, PREDICTION_TYPES, diffusion_loss
from difflab.diffusion.samplers import get_sampler
from difflab.diffusion.schedules import Schedule, make_schedule
from difflab.errors import DifflabError, check_choice
from difflab.models.runs import load_latest_weights, load_run_config, prepare_run_dir
from difflab.nn.unet import UNet, UNetConfig
from difflab.presets import register_preset
from difflab.train.trainer import TrainConfig

DATASETS = ("toy", "digits", "folder")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "toy"
    """'toy' (the toy world), 'digits' (scikit-learn's handwritten digits) or 'folder' (your images)."""
    world: str = "single32"
    """Toy-world preset; class labels (shape x colour) need a one-object world such as single32."""
    n: int = 100_000
    """Toy-world scenes in the training set (rendered on the fly: a large n costs nothing)."""
    seed: int = 0
    folder: str | None = None
    """Image folder for dataset='folder' (resized + centre-cropped to image_size)."""
    skip_bad: bool = False
    """dataset='folder': leave out (and count) files that are not readable images instead of stopping."""
    image_size: int = 32
    conditional: bool = True
    """Class-conditional (toy: shape x colour, digits: 0-9) with a null class for CFG; folders are not."""
    factorized_labels: bool = True
    """Toy world: embed shape and colour separately and add them (``UNetConfig.class_factors``), so every
    red circle also teaches the model about blue circles. False: one embedding per (shape, colour)."""

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASETS)


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
        check_choice("prediction type", self.prediction, PREDICTION_TYPES)
        check_choice("loss weighting", self.loss_weighting, LOSS_WEIGHTINGS)

    def make_schedule(self) -> Schedule:
        return make_schedule(self.schedule, self.timesteps, rescale_zero_snr=self.rescale_zero_snr)


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

    def resolve(self, sampler=None, steps=None, cfg_scale=None, spacing=None) -> SampleConfig:
        """These defaults with the given settings in place of the ``None`` ones (a command's flags)."""
        return dataclasses.replace(
            self, sampler=sampler or self.sampler, steps=steps or self.steps, spacing=spacing or self.spacing,
            cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale,
        )  # fmt: skip


@dataclass(frozen=True)
class PixelDiffusionConfig:
    kind: str = "pixel"
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cond_drop: float = 0.1
    """Probability of replacing a label by the null class during training (Ho & Salimans 2022 use 0.1-0.2)."""

    def __post_init__(self) -> None:
        check_cond_drop(self.cond_drop)
        # The UNet's input/output channels, side and class count follow from the data, so that
        # --set data.dataset=digits cannot leave a network built for another dataset.
        c = data_channels(self.data)
        derived = dataclasses.replace(
            self.unet, in_channels=c, out_channels=c, image_size=self.data.image_size,
            num_classes=num_classes(self.data), class_factors=class_factors(self.data),
        )  # fmt: skip
        object.__setattr__(self, "unet", derived)


def check_cond_drop(p: float) -> float:
    """The condition-dropout probability of every guided model (class label or caption -> null)."""
    if not 0.0 <= p < 1.0:
        raise DifflabError(f"cond_drop {p} is invalid; expected a probability in [0, 1)")
    return p


# ----------------------------------------------------------------------------------------------- data


def data_channels(data: DataConfig) -> int:
    return 1 if data.dataset == "digits" else 3


def num_classes(data: DataConfig) -> int | None:
    """Classes of a conditional dataset (without the null class), or None when unconditional."""
    if not data.conditional or data.dataset == "folder":
        return None
    if data.dataset == "digits":
        return 10
    from difflab.world.scene import world_preset

    return world_preset(data.world).num_classes


def class_factors(data: DataConfig) -> tuple[int, ...]:
    """(shapes, colours) for a factorised toy-world label, else () (one embedding per class)."""
    if data.dataset != "toy" or not data.conditional or not data.factorized_labels:
        return ()
    from difflab.world.scene import world_preset

    w = world_preset(data.world)
    return (len(w.shapes), len(w.colors))


HELD_OUT_SEED_OFFSET = 1_000_003
"""Toy scenes that judge a run come from ``data.seed + HELD_OUT_SEED_OFFSET``, a seed no run trains on."""


def held_out(data: DataConfig, n: int | None = None) -> DataConfig:
    """The data a run is judged on: toy scenes from a seed it never trained on (``n`` of them, when given);
    digits and folders as they are (they have no unseen seed to draw from)."""
    if data.dataset != "toy":
        return data
    return dataclasses.replace(
        data, seed=data.seed + HELD_OUT_SEED_OFFSET, n=data.n if n is None else max(n, 1)
    )


def held_out_images(data: DataConfig, n: int) -> torch.Tensor:
    """``n`` real images (N, C, H, W) of :func:`held_out` data, cycled where a dataset has fewer."""
    dataset = make_dataset(held_out(data, n))
    return torch.stack([dataset[i % len(dataset)]["image"] for i in range(n)])


def make_dataset(data: DataConfig, split: str = "train"):
    """The training set (or the digits' test split) of a config."""
    from difflab.data.registry import make_dataset as make

    if data.dataset == "toy":
        from difflab.world.scene import world_preset

        cfg = world_preset(data.world)
        if cfg.resolution != data.image_size:
            raise DifflabError(
                f"data.image_size {data.image_size} does not match world '{data.world}' ({cfg.resolution}px)"
            )
        fields = ("image", "label") if data.conditional else ("image",)
        return make("toy", cfg=cfg, n=data.n, seed=data.seed, fields=fields)
    if data.dataset == "digits":
        return make("digits", split=split, size=data.image_size, seed=data.seed)
    if data.folder is None:
        raise DifflabError("dataset 'folder' needs data.folder=PATH (e.g. --set data.folder=~/pictures)")
    return make("folder", root=data.folder, size=data.image_size, skip_bad=data.skip_bad)


# ---------------------------------------------------------------------------------------------- model


def build_unet(cfg: PixelDiffusionConfig) -> UNet:
    """The UNet of a config (its channels, side and class count already follow from the data)."""
    return UNet(cfg.unet)


def make_loss_fn(cfg: PixelDiffusionConfig, schedule: Schedule):
    """``loss_fn(model, batch, generator) -> (loss, metrics)`` for the trainer (steps 1-4 above)."""
    d = cfg.diffusion
    classes = num_classes(cfg.data)

    def loss_fn(model: UNet, batch: dict, generator: torch.Generator):
        x0 = batch["image"]
        b, dev = x0.shape[0], x0.device
        t = torch.randint(0, schedule.timesteps, (b,), generator=generator, device=dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        x_t = q_sample(schedule, x0, t, noise)
        labels = None
        if classes is not None:
            labels = batch["label"].to(dev).long()
            drop = torch.rand(b, generator=generator, device=dev) < cfg.cond_drop
            labels = torch.where(drop, torch.full_like(labels, classes), labels)
        out = model(x_t, t, class_labels=labels)
        per_sample = diffusion_loss(
            schedule, d.prediction, x0, noise, t, out, weighting=d.loss_weighting, gamma=d.min_snr_gamma
        )
        return per_sample.mean(), {}

    return loss_fn


# ------------------------------------------------------------------------------------------- sampling


@torch.no_grad()
def diffuse(
    model: UNet,
    cfg: PixelDiffusionConfig,
    n: int,
    *,
    labels: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor:
    """Run the sampler from noise shaped as the UNet's input (pixels here, latents in latent diffusion) and
    return the final (N, C, H, W) sample, unclamped. ``labels`` (N,) picks classes of a conditional model
    (default: cycling through all classes); other keyword arguments as :func:`run_sampler`."""
    device = next(model.parameters()).device
    classes = num_classes(cfg.data)
    cond, null = {}, None
    if classes is not None:
        if labels is None:
            labels = torch.arange(n) % classes
        labels = torch.as_tensor(labels).long().to(device)
        bad = labels[(labels < 0) | (labels >= classes)]
        if bad.numel():
            raise DifflabError(f"class {int(bad[0])} is out of range; expected 0..{classes - 1}")
        cond = {"class_labels": labels}
        null = {"class_labels": torch.full((1,), classes, device=device, dtype=torch.long)}
    elif labels is not None:
        raise DifflabError("this model is unconditional; it takes no class labels")
    return run_sampler(model, cfg, n, cond, null, **kwargs)


@torch.no_grad()
def run_sampler(
    model: UNet,
    cfg,
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
) -> torch.Tensor:
    """Sample ``n`` draws of the UNet's input shape with conditioning ``cond`` (keyword arguments of the
    UNet), guided towards it from ``null_cond`` (batch 1, broadcast) when ``cfg_scale`` is not 1. The
    noise comes from a CPU generator seeded with ``seed``, so a seed gives the same sample on any device.
    ``None`` arguments fall back to ``cfg.sample``; ``sampler_options`` go to the sampler itself (e.g.
    ``{"eta": 2.0}`` for ``dpmpp_2m_sde``). Returns the final sample, unclamped."""
    s = cfg.sample.resolve(sampler, steps, cfg_scale, spacing)
    sample_fn = get_sampler(s.sampler)
    schedule = cfg.diffusion.make_schedule()
    device = next(model.parameters()).device
    c, size = cfg.unet.in_channels, cfg.unet.image_size
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x_T = torch.randn((n, c, size, size), generator=gen).to(device)
    denoiser = Denoiser(model, schedule, cfg.diffusion.prediction)
    if s.cfg_scale != 1.0:
        if null_cond is None:
            raise DifflabError(
                f"guidance scale {s.cfg_scale} needs a conditional model; this one is unconditional"
            )
        denoiser = classifier_free_guidance(denoiser, s.cfg_scale, null_cond)
    if s.clip_x0:  # after guidance, on the guided x0 (as diffusers clips the guided prediction)
        denoiser = clip_denoised(denoiser, schedule)
    return sample_fn(denoiser, x_T, schedule, s.steps, spacing=s.spacing, cond=cond, noise=gen,
                     callback=callback, progress=progress, **(sampler_options or {}))  # fmt: skip


def generate(model: UNet, cfg: PixelDiffusionConfig, n: int, **kwargs) -> torch.Tensor:
    """Draw ``n`` images (N, C, H, W) in [-1, 1]; keyword arguments as :func:`diffuse`."""
    return diffuse(model, cfg, n, **kwargs).clamp(-1, 1)


# ------------------------------------------------------------------------------------------ run dirs


def load_config(run_dir: str | Path) -> PixelDiffusionConfig:
    return load_run_config(run_dir, PixelDiffusionConfig, "pixel", "a pixel diffusion run")


def load_model(
    run_dir: str | Path, *, ema: bool = True, device: str = "cpu"
) -> tuple[UNet, PixelDiffusionConfig]:
    """The trained network of a run (EMA weights by default) and its config."""
    cfg = load_config(run_dir)
    model = load_latest_weights(run_dir, build_unet(cfg), ema=ema)
    return model.to(device).eval(), cfg


# -------------------------------------------------------------------------------------------- presets


def _preset(**over) -> PixelDiffusionConfig:
    return PixelDiffusionConfig(**over)


register_preset(
    "tiny",
    "pixel",
    "16x16 world of 2 shapes x 2 colours, a 0.18M-parameter UNet: learns in seconds (tests)",
    lambda: _preset(
        data=DataConfig(world="tiny", image_size=16, n=4096),
        unet=UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(), heads=2,
                        norm_groups=4),
        train=TrainConfig(steps=150, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.99, log_every=10,
                          checkpoint_every=None, progress=False),
        sample=SampleConfig(steps=10, grid=16),
    ),
)  # fmt: skip
# The CPU presets (demo, digits) share one network and one training recipe; the data and length differ.
# A narrow 32x32 level (16 channels) and wide 8x8 level (64) learned fastest per second of the variants in
# benchmarks/pixel_learning.py (docs/benchmarks.md): most FLOPs are spent at full resolution, while
# shapes at this size are decided at 16x16 and 8x8.
_CPU_UNET = UNetConfig(
    channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_resolutions=(8,), heads=4
)
# demo: reader accuracy 0.95 at 1,500-2,000 steps (about 6-7.5 minutes here); digits: 1.0 at 500 steps.
_CPU_TRAIN = TrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.995, log_every=25,
                         checkpoint_every=250, sample_every=500)  # fmt: skip
# Guidance: on one 2,000-step demo model, n = 400, w = 2 and 3 gave reader accuracy 0.955 and 0.9475 and
# Frechet distance (pixels8) 0.94 and 1.11 (w = 1: 0.885 at n = 200): w = 2 is as faithful, closer to the data.
_CPU_SAMPLE = SampleConfig(steps=20, cfg_scale=2.0)

register_preset(
    "demo",
    "pixel",
    "32x32 one-object toy world, class-conditional on shape x colour (40 classes): minutes on a 2-core CPU",
    lambda: _preset(data=DataConfig(world="single32", image_size=32), unet=_CPU_UNET, train=_CPU_TRAIN,
                    sample=_CPU_SAMPLE),
)  # fmt: skip
register_preset(
    "digits",
    "pixel",
    "scikit-learn handwritten digits upsampled to 32x32 (bilinear), class-conditional 0-9: minutes on a CPU",
    lambda: _preset(data=DataConfig(dataset="digits", image_size=32), unet=_CPU_UNET,
                    train=dataclasses.replace(_CPU_TRAIN, steps=1000), sample=_CPU_SAMPLE),
)  # fmt: skip
register_preset(
    "base",
    "pixel",
    "32x32 toy world of one or two objects, unconditional, a 40M-parameter UNet: for a GPU",
    lambda: _preset(
        data=DataConfig(world="scene32", image_size=32, conditional=False, n=1_000_000),
        unet=UNetConfig(
            channels=128,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=(16, 8),
            dropout=0.1,
        ),
        train=TrainConfig(
            steps=100_000,
            batch_size=128,
            lr=2e-4,
            warmup_steps=1000,
            ema_decay=0.9999,
            log_every=100,
            checkpoint_every=5000,
            sample_every=5000,
        ),
        sample=SampleConfig(steps=50),
    ),
)
register_preset(
    "folder",
    "pixel",
    "your own images (--set data.folder=PATH), unconditional, 32x32",
    lambda: _preset(
        data=DataConfig(dataset="folder", image_size=32, conditional=False),
        unet=UNetConfig(channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16,)),
        train=TrainConfig(steps=20_000, batch_size=64, lr=2e-4, warmup_steps=500, ema_decay=0.999,
                          log_every=50, checkpoint_every=1000, sample_every=1000),
    ),
)  # fmt: skip


# ------------------------------------------------------------------------------------------- training


def grid_sample_fn(cfg, draw):
    """The trainer's ``sample_fn`` for a diffusion run: ``draw(ema_model, n, callback)`` returns n images
    (fixed noise, so grids at different steps compare); writes samples/step_*.png, and at the last step
    samples.png and the trajectory strip trajectory.png."""
    from difflab.viz import TrajectoryRecorder, save_grid

    def sample_fn(ema_model, step: int, out_dir: Path) -> None:
        final = step >= cfg.train.steps
        recorder = TrajectoryRecorder(cfg.sample.steps) if final else None
        images = draw(ema_model, cfg.sample.grid, recorder)
        save_grid(images, Path(out_dir) / "samples" / f"step_{step:07d}.png")
        if final:
            save_grid(images, Path(out_dir) / "samples.png")
            recorder.save(Path(out_dir) / "trajectory.png")

    return sample_fn


def train(cfg: PixelDiffusionConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train a pixel diffusion model into ``run_dir`` (config.json, checkpoints/, metrics.jsonl,
    samples/step_*.png, trajectory.png). ``resume=True`` continues from the latest good checkpoint."""
    from difflab.train.trainer import Trainer, make_loader

    run_dir = prepare_run_dir(run_dir, cfg, resume, load_config)
    torch.manual_seed(cfg.train.seed)  # the initial weights
    model = build_unet(cfg)
    schedule = cfg.diffusion.make_schedule()
    loader = make_loader(make_dataset(cfg.data), cfg.train)
    sample_fn = grid_sample_fn(cfg, lambda m, n, callback: generate(m, cfg, n, seed=0, callback=callback))
    trainer = Trainer(model, make_loss_fn(cfg, schedule), loader, cfg.train, run_dir,
                      sample_fn=sample_fn, model_config=cfg.unet)  # fmt: skip
    trainer.fit(resume=resume)
    return run_dir
