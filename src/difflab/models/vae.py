"""Latent diffusion's first stage (Rombach et al. 2022, Sec. 3.1): train a KL autoencoder, then measure
its latent scale so that diffusion sees unit-variance latents.

Loss per image, as in the paper's autoencoder (Appendix G, after Esser et al. 2021):

    L = |x - D(z)|_1 (or squared)   + w_perc * d_perc(x, D(z))           reconstruction, z ~ q(z|x)
      + w_kl * KL(q(z|x) || N(0, I)) / (C H W)                           KL, summed over the latent
      + lambda * w_gan * (-D_patch(D(z)))   (from step gan_start)      adversarial, lambda adaptive (Eq. 7
                                                                       of Esser et al.)
and the PatchGAN is trained with the hinge loss on (x, D(z)) in the same step.

The reconstruction term is a mean over pixels, so the KL (a sum over the latent, as the paper's) is
divided by the pixel count: ``kl_weight`` keeps the paper's meaning (1e-6 relative to a summed
reconstruction loss) while losses stay readable per pixel.

One optimizer updates both networks: the generator's adversarial term calls the discriminator through
``torch.func.functional_call`` with *detached* weights, so its gradient reaches the decoder only, and the
discriminator's hinge loss sees a detached reconstruction, so its gradient reaches the discriminator only.
The sum of the two is exactly the alternating update of the paper with one shared learning rate.

Latent scale: after training, ``latent_stats.json`` records the standard deviation sigma of the posterior
means of ``latent_stats_n`` training images and ``scale = 1 / sigma``; latent diffusion trains on
``scale * z`` (Stable Diffusion's 0.18215 is this number for its autoencoder on its data).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from difflab.config import save_json
from difflab.data.config import DataConfig, data_channels, held_out, held_out_images, make_dataset
from difflab.errors import MAX_COUNT, MAX_SIZE, DifflabError, check_choice, check_float, check_int, check_ints
from difflab.models.depth_eval import depth_image
from difflab.models.family import Family, Preset
from difflab.models.runs import claim_run_dir, load_latest_weights, load_run_config
from difflab.nn.discriminator import (
    PatchDiscriminator,
    adaptive_gan_weight,
    generator_hinge_loss,
    hinge_d_loss,
)
from difflab.nn.perceptual import RandomFeaturePerceptualLoss
from difflab.nn.vae import AutoencoderConfig, KLAutoencoder
from difflab.train.checkpoint import latest_checkpoint
from difflab.train.config import TrainConfig
from difflab.train.device import is_main_process
from difflab.train.trainer import Trainer, make_loader
from difflab.viz import save_grid
from difflab.world.check import ReadTally
from difflab.world.reader import read
from difflab.world.render import render
from difflab.world.scene import scene_at, world_preset

RECONSTRUCTION_LOSSES = ("l1", "l2")
STATS_FILE = "latent_stats.json"


@dataclass(frozen=True)
class VAELossConfig:
    reconstruction: str = "l1"
    """'l1' (the paper's; sharper edges) or 'l2'."""
    kl_weight: float = 1e-6
    """Weight of the KL term relative to a summed reconstruction loss (the paper's 1e-6)."""
    perceptual_weight: float = 0.0
    """Weight of :class:`RandomFeaturePerceptualLoss` (no downloaded weights); 0 disables it."""
    perceptual_widths: tuple[int, ...] = (16, 32)
    gan_weight: float = 0.0
    """Weight of the PatchGAN term (times the adaptive lambda); 0 disables the discriminator entirely."""
    gan_start: int = 0
    """Training step from which the adversarial terms are on (the paper starts it late: a discriminator
    facing an untrained decoder wins at once and teaches nothing)."""
    disc_channels: int = 32
    disc_layers: int = 2

    def __post_init__(self) -> None:
        check_choice("reconstruction loss", self.reconstruction, RECONSTRUCTION_LOSSES)
        for name in ("kl_weight", "perceptual_weight", "gan_weight"):
            check_float(name, getattr(self, name), 0.0)
        check_ints(
            "perceptual_widths", self.perceptual_widths, 1, MAX_SIZE, nonempty=self.perceptual_weight > 0
        )
        check_int("gan_start", self.gan_start, 0, MAX_COUNT)
        check_int("disc_layers", self.disc_layers, 1, 16)  # each halves the side: 2**16 px is MAX_SIZE
        # The discriminator's GroupNorms have 8 groups, and every width is a multiple of disc_channels.
        check_int("disc_channels", self.disc_channels, 1, MAX_SIZE)
        if self.disc_channels % 8:
            raise DifflabError(f"disc_channels {self.disc_channels} is invalid; expected a multiple of 8")


@dataclass(frozen=True)
class VAEConfig:
    kind: str = "vae"
    data: DataConfig = field(default_factory=lambda: DataConfig(conditional=False))
    vae: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    latent_stats_n: int = 2048
    """Training images encoded after training to measure the latent standard deviation (the scale)."""
    grid: int = 8
    """Held-out images shown (with their reconstructions) in the grids written during training."""
    depth_share: float = 0.0
    """Toy world: the share of training items that show the scene's depth map as Marigold hands one to the
    autoencoder (Eq. 3's normalisation, three channels: :func:`difflab.models.depth_eval.depth_image`) in
    place of its image. Stable Diffusion's autoencoder, trained on billions of images, reconstructs such
    maps unseen; one trained on the toy world's images alone does not (docs/depth.md measures both)."""

    def __post_init__(self) -> None:
        check_int("latent_stats_n", self.latent_stats_n, 2, MAX_COUNT)
        check_float("depth_share", self.depth_share, 0, 1)
        if self.depth_share > 0 and self.data.dataset != "toy":
            raise DifflabError(f"depth_share {self.depth_share} needs the toy world's depth maps; data.dataset is "
                               f"'{self.data.dataset}' (expected 'toy' or depth_share=0)")  # fmt: skip
        check_int("grid", self.grid, 1, MAX_SIZE)
        # The losses' networks shrink the image: each needs a side that leaves at least one value.
        side, loss = self.data.image_size, self.loss
        if loss.gan_weight > 0 and side < 3 * 2**loss.disc_layers:
            raise DifflabError(f"loss.disc_layers {loss.disc_layers} is too many for {side}px images; expected "
                               f"3 * 2**disc_layers <= data.image_size")  # fmt: skip
        if loss.perceptual_weight > 0 and side < 2 ** (len(loss.perceptual_widths) - 1):
            raise DifflabError(f"loss.perceptual_widths {loss.perceptual_widths} has too many stages for {side}px "
                               f"images; expected 2**(stages - 1) <= data.image_size")  # fmt: skip


def resolve(cfg: VAEConfig, *, attach: bool = True) -> VAEConfig:
    """The run record of a request: the autoencoder's input channels and side follow from the data, so
    that --set data.dataset=digits cannot leave a network built for another dataset. (No parent run:
    ``attach`` is accepted for the family interface.)"""
    vae = dataclasses.replace(cfg.vae, in_channels=data_channels(cfg.data), image_size=cfg.data.image_size)
    return dataclasses.replace(cfg, vae=vae)


class VAETrainee(nn.Module):
    """What the trainer optimises: the autoencoder, the discriminator (when ``gan_weight > 0``) and a step
    counter buffer (saved in every checkpoint, so ``gan_start`` survives a resume exactly)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.autoencoder = KLAutoencoder(cfg.vae)
        loss = cfg.loss
        self.discriminator = (
            PatchDiscriminator(cfg.vae.in_channels, loss.disc_channels, loss.disc_layers)
            if loss.gan_weight > 0
            else None
        )
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio per image in dB, for images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10.0 * torch.log10(4.0 / mse.clamp_min(1e-12))


def make_loss_fn(cfg: VAEConfig):
    """``loss_fn(trainee, batch, generator) -> (loss, metrics)`` (see the module docstring)."""
    loss_cfg = cfg.loss
    perceptual = (
        RandomFeaturePerceptualLoss(cfg.vae.in_channels, loss_cfg.perceptual_widths)
        if loss_cfg.perceptual_weight
        else None
    )
    pixels = cfg.vae.in_channels * cfg.vae.image_size**2
    accum = cfg.train.grad_accum

    def loss_fn(model: VAETrainee, batch: dict, generator: torch.Generator):
        x = batch["image"]
        ae = model.autoencoder
        rec, posterior = ae(x, generator)
        if loss_cfg.reconstruction == "l1":
            per_image = (rec - x).abs().flatten(1).mean(1)
        else:
            per_image = (rec - x).square().flatten(1).mean(1)
        metrics = {"rec": per_image.mean().detach()}
        if perceptual is not None:
            perc = perceptual.to(x.device)(rec, x)
            metrics["perceptual"] = perc.mean().detach()
            per_image = per_image + loss_cfg.perceptual_weight * perc
        nll = per_image.mean()
        kl = posterior.kl().mean()
        loss = nll + loss_cfg.kl_weight * kl / pixels
        metrics["kl"] = kl.detach()
        disc = model.discriminator
        if disc is not None:
            with torch.no_grad():
                model.steps_seen += 1
            # steps_seen counts calls, one per micro-batch: the optimizer step is (calls - 1) // grad_accum
            if (int(model.steps_seen) - 1) // accum >= loss_cfg.gan_start:
                frozen = {k: v.detach() for k, v in disc.named_parameters()}
                g_adv = generator_hinge_loss(torch.func.functional_call(disc, frozen, (rec,)))
                weight = adaptive_gan_weight(nll, g_adv, ae.last_layer) * loss_cfg.gan_weight
                d_loss = hinge_d_loss(disc(x), disc(rec.detach()))
                loss = loss + weight * g_adv + d_loss
                metrics.update(g_adv=g_adv.detach(), d_loss=d_loss.detach(), gan_lambda=weight)
        return loss, metrics

    return loss_fn


# ------------------------------------------------------------------------------------------ run dirs


def load_config(run_dir: str | Path) -> VAEConfig:
    return load_run_config(run_dir, VAEConfig, "vae", "an autoencoder (vae) run")


def load_model(run_dir: str | Path, *, device: str = "cpu") -> tuple[KLAutoencoder, VAEConfig]:
    """The trained autoencoder of a run (eval mode, on ``device``) and its config."""
    cfg = load_config(run_dir)
    trainee = load_latest_weights(run_dir, VAETrainee(cfg), ema=True)
    return trainee.autoencoder.to(device).eval(), cfg


@torch.no_grad()
def encode_dataset(
    autoencoder: KLAutoencoder, dataset, indices, batch_size: int = 256
) -> dict[str, torch.Tensor]:
    """Posterior means and standard deviations of ``dataset[i]['image']`` for ``i`` in ``indices``."""
    device = next(autoencoder.parameters()).device
    means, stds = [], []
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        x = torch.stack([dataset[i]["image"] for i in indices[start : start + batch_size]]).to(device)
        posterior = autoencoder.encode(x)
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
    return {"mean": torch.cat(means), "std": torch.cat(stds)}


def latent_stats(run_dir: str | Path) -> dict:
    """The run's ``latent_stats.json`` (computed and written first if it is missing): ``scale`` = 1 / the
    standard deviation of the posterior means of ``latent_stats_n`` training images, and the ``seconds``
    that took (part of the autoencoder's cost in the time-to-quality benchmark)."""
    path = Path(run_dir) / STATS_FILE
    if path.is_file():
        return json.loads(path.read_text())
    start = time.perf_counter()
    autoencoder, cfg = load_model(run_dir)
    dataset = make_dataset(cfg.data)
    n = min(cfg.latent_stats_n, len(dataset))
    z = encode_dataset(autoencoder, dataset, range(n))["mean"]
    std = float(z.std())
    stats = {
        "scale": 1.0 / std,
        "std": std,
        "mean": float(z.mean()),
        "n": n,
        "latent_shape": list(cfg.vae.latent_shape),
        "checkpoint": latest_checkpoint(Path(run_dir) / "checkpoints").name,
        "what": "scale = 1 / std of the posterior means of the first n training images "
        "(Rombach et al. 2022, Sec. 4.3.2)",
        "seconds": round(time.perf_counter() - start, 3),
    }
    save_json(stats, path)
    return stats


# -------------------------------------------------------------------------------------------- presets


def _preset(f: int, **over) -> VAEConfig:
    """The CPU recipe at factor f: a patch autoencoder, L1 + the random-feature perceptual term (weight 1,
    chosen on the reader's accuracy on reconstructions: docs/ldm.md). Wider latents and blocks at higher f:
    each position stands for f^2 pixels."""
    latent_channels, channels, steps = {2: (4, 32, 1000), 4: (8, 64, 2500), 8: (16, 96, 2500)}[f]
    return VAEConfig(
        data=DataConfig(world="single32", image_size=32, conditional=False, n=100_000),
        vae=AutoencoderConfig(downsample_factor=f, latent_channels=latent_channels, channels=channels,
                              num_res_blocks=2),
        loss=VAELossConfig(perceptual_weight=1.0),
        train=TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=50, ema_decay=None, log_every=25,
                          checkpoint_every=500, sample_every=500),
        **over,
    )  # fmt: skip


PRESETS = (
    *(
        Preset(f"vae_f{f}", "vae",
               f"KL autoencoder, f = {f} (32x32 -> {32 // f}x{32 // f}) on the one-object toy world: minutes on a CPU",
               lambda f=f: _preset(f))
        for f in (2, 4, 8)
    ),
    Preset(
        "vae_t2i",
        "vae",
        "KL autoencoder, f = 2 (32x32 -> 16x16x4) on scenes of one or two objects, for text-to-image: about 1.5 min",
        lambda: dataclasses.replace(_preset(2), data=DataConfig(world="scene32", image_size=32, conditional=False,
                                                                n=100_000)),
    ),
    Preset(
        "vae_depth",
        "vae",
        "vae_t2i on the depth world (depth32), 30 % of its items depth maps, 2,500 steps: the autoencoder of "
        "Marigold's base (docs/depth.md); about 6 min",
        lambda: dataclasses.replace(
            _preset(2), depth_share=0.3, data=DataConfig(world="depth32", image_size=32, conditional=False, n=100_000),
            train=dataclasses.replace(_preset(2).train, steps=2500)),
    ),
    Preset(
        "vae_tiny",
        "vae",
        "16x16 world of 2 shapes x 2 colours, f = 2 (8x8x4 latents), a tiny patch autoencoder: seconds (tests)",
        lambda: VAEConfig(
            data=DataConfig(world="tiny", image_size=16, conditional=False, n=2048),
            vae=AutoencoderConfig(downsample_factor=2, latent_channels=4, channels=16, num_res_blocks=1, norm_groups=4),
            train=TrainConfig(steps=300, batch_size=32, lr=3e-3, warmup_steps=5, ema_decay=None, log_every=10,
                              checkpoint_every=None, progress=False),
            latent_stats_n=256,
        ),
    ),
    Preset(
        "vae_base",
        "vae",
        "the paper's first stage: pyramid autoencoder f = 4, c = 4, mid attention, perceptual + PatchGAN: for a GPU",
        lambda: VAEConfig(
            data=DataConfig(world="scene32", image_size=32, conditional=False, n=1_000_000),
            vae=AutoencoderConfig(layout="pyramid", downsample_factor=4, latent_channels=4, channels=64,
                                  channel_mult=(1, 2, 4), num_res_blocks=2, mid_attention=True, heads=4),
            loss=VAELossConfig(perceptual_weight=1.0, perceptual_widths=(32, 64, 128), gan_weight=0.5,
                               gan_start=5000, disc_channels=64, disc_layers=2),
            train=TrainConfig(steps=50_000, batch_size=64, lr=4.5e-6 * 64, warmup_steps=500, ema_decay=None,
                              log_every=100, checkpoint_every=2500, sample_every=2500),
        ),
    ),
)  # fmt: skip

# ------------------------------------------------------------------------------------------- training


class WithDepthMaps(Dataset):
    """A toy-world training set where item i shows its scene's depth map (as an image, Marigold's
    normalisation) instead of its picture with probability ``share``, decided by (seed, i) alone."""

    def __init__(self, images, share: float, seed: int):
        self.images, self.share, self.seed = images, share, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        item = self.images[i]
        if np.random.default_rng([self.seed, i, 41]).random() < self.share:
            depth = render(self.images.scene(i), self.images.cfg).depth
            item = item | {"image": depth_image(depth)}
        return item


def training_set(cfg: VAEConfig):
    """The autoencoder's training images: the data's, with ``depth_share`` of them depth maps."""
    dataset = make_dataset(cfg.data)
    return WithDepthMaps(dataset, cfg.depth_share, cfg.data.seed) if cfg.depth_share > 0 else dataset


def train(cfg: VAEConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train an autoencoder into ``run_dir`` (config.json, checkpoints/, metrics.jsonl,
    samples/step_*.png: held-out images over their reconstructions), then write latent_stats.json."""
    cfg = resolve(cfg)
    with claim_run_dir(run_dir, cfg, resume, load_config) as run_dir:
        torch.manual_seed(cfg.train.seed)
        trainee = VAETrainee(cfg)
        loader = make_loader(training_set(cfg), cfg.train)
        shown = held_out_images(cfg.data, cfg.grid)

        def sample_fn(model: VAETrainee, step: int, out_dir: Path) -> None:
            x = shown.to(next(model.parameters()).device)
            rec = model.autoencoder(x, sample=False)[0].clamp(-1, 1)
            grid = torch.cat([x, rec]).cpu()  # top row: held-out images, bottom row: reconstructions
            save_grid(grid, Path(out_dir) / "samples" / f"step_{step:07d}.png", nrow=len(x))
            if step >= cfg.train.steps:
                save_grid(grid, Path(out_dir) / "reconstructions.png", nrow=len(x))

        # The discriminator gets no gradient before loss.gan_start: DDP must not wait for it.
        trainer = Trainer(trainee, make_loss_fn(cfg), loader, cfg.train, run_dir, sample_fn=sample_fn,
                          model_config=cfg.vae, find_unused_parameters=True)  # fmt: skip
        # measured again for the weights trained now, once the trainer has accepted the run
        trainer.fit(resume=resume, on_start=lambda: (run_dir / STATS_FILE).unlink(missing_ok=True))
        if is_main_process():
            latent_stats(run_dir)
    return run_dir


def info_network(cfg: VAEConfig):
    """The autoencoder with an example batch, its loss the reconstruction's mean square (``difflab info``)."""
    v = cfg.vae
    inputs = {"x": torch.randn(cfg.train.batch_size, v.in_channels, v.image_size, v.image_size)}
    return KLAutoencoder(v), inputs, lambda out: out[0].square().mean()


# ----------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(run_dir: str | Path, n: int, *, seed: int = 0) -> dict:
    """Reconstruct ``n`` held-out images (posterior means): PSNR, and on the toy world the reader's
    exact-scene accuracy on the reconstructions beside its accuracy on the originals (the judge's own
    error), plus per-attribute accuracy: a VAE that loses a small shape or shifts a colour shows here."""
    autoencoder, cfg = load_model(run_dir)
    data = cfg.data
    if data.dataset == "toy":  # the evaluation seed picks another set of unseen scenes
        data = dataclasses.replace(data, seed=data.seed + seed)
    x = held_out_images(data, n)
    start = time.perf_counter()
    rec = torch.cat([autoencoder.decode(autoencoder.encode(b).mode()) for b in x.split(256)]).clamp(-1, 1)
    seconds = time.perf_counter() - start
    c, h, w = cfg.vae.latent_shape
    report = {
        "run": str(run_dir),
        "n": n,
        "downsample_factor": cfg.vae.downsample_factor,
        "latent_shape": [c, h, w],
        "compression": (cfg.vae.in_channels * cfg.vae.image_size**2) / (c * h * w),
        "psnr_db": float(psnr(rec, x).mean()),
        "l1": float((rec - x).abs().mean()),
    }
    if data.dataset == "toy":
        world, scene_seed = world_preset(data.world), held_out(data).seed
        reconstructed, originals = ReadTally(), ReadTally()
        for i, (original, image) in enumerate(zip(x, rec, strict=True)):
            truth = scene_at(world, scene_seed, i)
            reconstructed.add(truth, read(image, world))
            originals.add(truth, read(original, world))
        scores = reconstructed.report()
        report.update(
            exact_scene_accuracy=scores["exact_scene_accuracy"],
            exact_scene_accuracy_originals=originals.report()["exact_scene_accuracy"],
            attribute_accuracy=scores["attribute_accuracy"],
            judge="toy-world reader",
        )
    report["latent_scale"] = latent_stats(run_dir)["scale"]
    report["reconstructions_per_second"] = n / seconds
    return report


FAMILY = Family(
    name="vae",
    what="an autoencoder (vae) run",
    config=VAEConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="reconstructions.png, latent_stats.json",
)
