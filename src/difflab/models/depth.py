"""Depth by diffusion: Marigold (Ke et al., CVPR 2024), its single-step end-to-end fine-tuning (Garcia et al.
2025, "Fine-tuning image-conditional diffusion models is easier than you think"), and the regression a user
would train instead - one family, ``objective`` the switch.

    image --codec--> c_I (c, h, w) --+
    noisy depth latent z_t ----------+--concat--> the base's UNet with 2c input channels --> v-prediction
    the empty prompt --the base's frozen text encoder--> cross-attention ---------------------^

- **Marigold** (``objective='diffusion'``): a latent-diffusion base trained on the same world is
  fine-tuned to denoise *depth latents* given the image's. The depth map is normalised affine-invariantly
  (Eq. 3: per-image 2 % / 98 % percentiles to [-1, 1], :func:`difflab.models.depth_align.normalize_depth`),
  replicated to the autoencoder's three channels and encoded by the base's frozen autoencoder, like an
  image. The first convolution takes the image latents beside the noisy ones; its input weights are
  duplicated and halved (Sec. 3.2), so where the two halves see the same latent the network is the base.
  The text is always empty; the loss is the base's v-prediction loss. At test time each estimate is a
  sampler's draw, decoded and averaged over channels; several draws are ensembled (Eq. 4, Sec. 3.3).
- **End to end** (``objective='end_to_end'``, Garcia et al. Sec. 4): one deterministic step at t = T - 1
  from the zero latent (the noise's mean), decoded by the frozen autoencoder, trained with an
  affine-invariant loss on the decoded depth: ``|| s d_hat + t - d ||^2`` with (s, t) the least-squares
  alignment (:func:`~difflab.models.depth_align.align_scale_shift`). Started from a Marigold run
  (``--set base=DEPTH_RUN``) this is their fine-tuning; started from the image base (``--set base=T2I_RUN``)
  it is the **regression baseline**: the same UNet, data and loss, no diffusion training.
- ``init='scratch'``: the base's architecture with fresh weights (what the generative prior is worth).

Judged exactly (:mod:`difflab.models.depth_eval`): least-squares scale and shift to the true depth, then
AbsRel and delta1 (Sec. 4.1), and the order of every pair of objects.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from difflab.data.text_scenes import TextDataConfig, captioned_scenes
from difflab.diffusion.denoiser import Denoiser
from difflab.errors import DifflabError, check_choice, check_int
from difflab.models import depth_eval, t2i
from difflab.models.codecs import Latents, cached_latents
from difflab.models.conditioners import TextPrompts
from difflab.models.depth_align import align_scale_shift, ensemble_depth
from difflab.models.depth_eval import depth_image, grid_images, grid_panels
from difflab.models.family import Family, Preset
from difflab.models.instruct_network import InstructNet
from difflab.models.recipe import DiffusionConfig, SampleConfig, check_sampling, run_sampler
from difflab.models.runs import checkpoint_id, load_latest_weights, load_run_config, read_run_config
from difflab.models.system import DiffusionSystem, ImageNoise, TrainingParts, train_system
from difflab.models.t2i_network import build_network
from difflab.models.text_encoder import load_text_encoder
from difflab.nn.controlnet import unet_of
from difflab.nn.unet import UNetConfig, example_inputs
from difflab.train.config import TrainConfig
from difflab.world.render import RENDERER_VERSION, render

OBJECTIVES = ("diffusion", "end_to_end")
INITS = ("base", "scratch")


@dataclass(frozen=True)
class DepthConfig:
    kind: str = "depth"
    base: str | None = None
    """The run this estimator starts from (--set base=RUN): a latent text-to-image run on a perspective world
    (the image prior), or a depth run (to fine-tune it end to end)."""
    objective: str = "diffusion"
    """'diffusion' (Marigold) or 'end_to_end' (one step at t = T - 1, affine-invariant loss on the decoded
    depth: Garcia et al.'s fine-tuning from a depth run, the regression baseline from an image run)."""
    init: str = "base"
    """'base': start from the base's weights; 'scratch': the same architecture, fresh weights."""
    ensemble: int = 1
    """Sampling default: how many draws are ensembled per image (Sec. 3.3; the paper's default is 10)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The image base's scenes, UNet and diffusion process, copied by :func:`resolve`."""
    painter: str | None = None
    """The latent text-to-image run whose autoencoder and text encoder this estimator reads with (the base
    itself, or the base's painter when the base is a depth run)."""
    base_checkpoint: str | None = None
    """The base run's checkpoint this estimator started from."""

    def __post_init__(self) -> None:
        check_choice("depth objective", self.objective, OBJECTIVES)
        check_choice("depth init", self.init, INITS)
        check_int("ensemble", self.ensemble, 1, 100)


def resolve(cfg: DepthConfig, *, attach: bool = True) -> DepthConfig:
    """The run record: the base's path and checkpoint, the painter, and the painter's scenes, UNet and
    diffusion process. A base must be a latent run on a world where depth can be seen."""
    if attach:
        if cfg.base is None:
            raise DifflabError("a depth estimator starts from a run: --set base=RUN (a latent text-to-image run "
                               "on a perspective world, e.g. 'difflab train --preset t2i_demo --set "
                               "data.world=depth32 ...', or a depth run to fine-tune end to end)")  # fmt: skip
        path = Path(cfg.base).expanduser().resolve()
        kind = read_run_config(path)[0]
        if kind == "depth":
            painter = Path(load_config(path).painter)
        elif kind == "t2i":
            painter = path
        else:
            raise DifflabError(f"base '{path}' is a {kind} run; expected a text-to-image (t2i) or depth run")
        p = t2i.load_config(painter)
        if p.vae is None:
            raise DifflabError(f"base '{painter}' draws pixels; Marigold denoises an autoencoder's latents "
                               "(train the base with --set vae=RUN)")  # fmt: skip
        if p.recipe != "sd":
            raise DifflabError(f"base '{painter}' uses the '{p.recipe}' recipe; the depth estimator widens the "
                               "first convolution of the plain cross-attention UNet ('sd')")  # fmt: skip
        if p.data.world_config().style != "perspective":
            raise DifflabError(f"base '{painter}' was trained on world '{p.data.world}', where depth leaves no "
                               "trace in the pixels; use a perspective world (depth32, depth64)")  # fmt: skip
        cfg = dataclasses.replace(cfg, base=str(path), painter=str(painter), unet=p.unet, diffusion=p.diffusion,
                                  data=p.data, base_checkpoint=checkpoint_id(path, f"{kind} run"))  # fmt: skip
    check_sampling(cfg)
    return cfg


def load_config(run_dir: str | Path) -> DepthConfig:
    return load_run_config(run_dir, DepthConfig, "depth", "a depth-estimation (depth) run")


# -------------------------------------------------------------------------------------------- network


class DepthNet(InstructNet):
    """The base network reading the image's latents beside the noisy depth latents. Marigold, Sec. 3.2: "we
    duplicate the weight tensor of the input layer and divide its values by two", so that with the image
    latent equal to the noisy one the first layer computes what the base's did: ``W x = W/2 x + W/2 x``."""

    def __init__(self, base: nn.Module, image_channels: int):
        super().__init__(base, image_channels)
        conv = unet_of(base).conv_in  # the widened convolution: [noisy | image] input channels
        c = conv.in_channels - image_channels
        with torch.no_grad():
            half = conv.weight[:, :c] / 2
            conv.weight[:, :c] = half
            conv.weight[:, c:] = half


def build_estimator(cfg: DepthConfig, painter_cfg) -> DepthNet:
    return DepthNet(build_network(painter_cfg), cfg.unet.in_channels)


# ----------------------------------------------------------------------------------------------- data


class DepthPairs(Dataset):
    """Item i: scene i of the base's training set, ``source`` (its image's cached posterior mean), the
    ``mean`` and ``std`` of its depth map's latents, and (``truth``) its normalised depth (H, W) for the end-
    to-end loss. Without latents, items are ``{"image": depth_image(...)}``, what is encoded once."""

    def __init__(self, data: TextDataConfig, source=None, target=None, truth: bool = False):
        self.scenes = captioned_scenes(data, latents=source)
        self.world, self.truth = self.scenes.world, truth
        self.target = target and {k: torch.from_numpy(v) for k, v in target.items()}

    def __len__(self) -> int:
        return len(self.scenes)

    def depth(self, i: int) -> np.ndarray:
        return render(self.scenes.scene(i), self.world).depth

    def __getitem__(self, i: int) -> dict:
        if self.target is None:
            return {"image": depth_image(self.depth(i))}
        item = {"source": self.scenes[i]["mean"]} | {k: v[i] for k, v in self.target.items()}
        return item | ({"depth": depth_image(self.depth(i))[0]} if self.truth else {})


def training_pairs(cfg: DepthConfig, painter_cfg, autoencoder=None) -> DepthPairs:
    """Image latents from the painter's own cache; depth latents encoded once into the autoencoder run's."""
    source = t2i.training_latents(painter_cfg, autoencoder)
    d = cfg.data
    key = {"data": {"world": d.world, "n": d.n, "seed": d.seed, "heldout_pairs": list(d.heldout_pairs)},
           "renderer": RENDERER_VERSION, "dataset": "marigold-depth-p2-p98"}  # fmt: skip
    target = cached_latents(painter_cfg, DepthPairs(d), key, autoencoder)
    return DepthPairs(d, source, target, truth=cfg.objective == "end_to_end")


# ----------------------------------------------------------------------------------------- the system


class ImageCondition(nn.Module):
    """Marigold's condition: the empty prompt (always: the text tower is the base's, frozen) and the
    image's latents ``edit_image``, which :class:`DepthNet` concatenates to its input. A request is a batch
    of images (N, 3, H, W) in [-1, 1]."""

    def __init__(self, encoder, codec: nn.Module, pooled: bool):
        super().__init__()
        self.codec = codec
        self.empty = {k: v.detach() for k, v in _text(encoder, pooled).items()}  # batch 1

    def _context(self, b: int, device) -> dict:
        return {k: v.to(device).expand(b, *v.shape[1:]) for k, v in self.empty.items()}

    def for_training(self, batch: dict, generator: torch.Generator, b: int, device) -> dict:
        source = batch["source"].to(device)
        image = source * self.codec.scale if isinstance(self.codec, Latents) else self.codec.encode(source)
        return self._context(b, device) | {"edit_image": image}

    def condition(self, request: torch.Tensor, n: int, device, seed: int = 0) -> tuple[dict, dict]:
        if not isinstance(request, torch.Tensor) or request.ndim != 4 or request.shape[1] != 3:
            shape = tuple(request.shape) if isinstance(request, torch.Tensor) else type(request).__name__
            raise DifflabError(f"a depth estimator reads images (N, 3, H, W) in [-1, 1]; got {shape}")
        cond = self._context(n, device) | {"edit_image": self.codec.encode(request.to(device))}
        return cond, cond


def _text(encoder, pooled: bool) -> dict:
    """The empty prompt as the base reads a prompt (its own text conditioner), batch 1."""
    return TextPrompts(encoder, 0.0, pooled=pooled).encode([""])


def _parts(cfg: DepthConfig):
    painter_cfg = t2i.load_config(cfg.painter)
    t2i.check_inputs_unchanged(painter_cfg, f"the base '{cfg.painter}' was trained on it")
    encoder = load_text_encoder(painter_cfg.text_encoder, layers=painter_cfg.text_layers)
    codec = t2i.codec(painter_cfg)
    return painter_cfg, ImageCondition(encoder, codec, pooled=bool(cfg.unet.pooled_dim)), codec


def one_step(network: nn.Module, cfg: DepthConfig, schedule, cond: dict, b: int, device) -> tuple[torch.Tensor,
                                                                                          torch.Tensor]:
    """Garcia et al.'s deterministic step: the zero latent (the noise's mean) at t = T - 1, read as x0 by the
    network's prediction type (:class:`~difflab.diffusion.denoiser.Denoiser`). Returns (x, x0_hat)."""
    x = torch.zeros(b, cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size, device=device)
    return x, Denoiser(network, schedule, cfg.diffusion.prediction)(x, schedule.timesteps - 1, **cond)[1]


def end_to_end_loss(cfg: DepthConfig, schedule, conditioner, codec):
    """Garcia et al. (2025, Sec. 4): one step at t = T - 1 from the zero latent, x0 read from the network's
    v-prediction, decoded by the frozen autoencoder, the depth the channels' mean; the loss is the mean
    squared error after least-squares scale and shift to the normalised truth (affine-invariant)."""

    def loss_fn(network: nn.Module, batch: dict, generator: torch.Generator):
        truth = batch["depth"]
        b, dev = truth.shape[0], truth.device
        _, x0 = one_step(network, cfg, schedule, conditioner.for_training(batch, generator, b, dev), b, dev)
        depth = codec.autoencoder.decode(x0 / codec.scale).mean(dim=1)  # (B, H, W), unclamped: gradients flow
        aligned, _, _ = align_scale_shift(depth, truth)
        return ((aligned - truth) ** 2).mean(), {}

    return loss_fn


def train(cfg: DepthConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train the estimator into ``run_dir`` (config.json, checkpoints/, metrics.jsonl, samples/step_*.png and
    samples.png: the grid's images and estimates)."""
    cfg = resolve(cfg)
    base_kind = read_run_config(cfg.base)[0]

    def parts(run_dir: Path) -> TrainingParts:
        painter_cfg, conditioner, codec = _parts(cfg)
        data = training_pairs(cfg, painter_cfg, getattr(codec, "autoencoder", None))
        images = grid_images(cfg)

        def draw(system: DiffusionSystem, request, callback) -> torch.Tensor:
            depth, _ = estimate(system, cfg, images, seed=0, callback=callback)
            return grid_panels(images, depth)

        loss_fn = end_to_end_loss if cfg.objective == "end_to_end" else None
        return TrainingParts(conditioner, codec, data, draw=draw, loss_fn=loss_fn)

    def network() -> DepthNet:
        painter_cfg = t2i.load_config(cfg.painter)
        if cfg.init == "scratch":
            return build_estimator(cfg, painter_cfg)
        if base_kind == "depth":
            return load_latest_weights(cfg.base, build_estimator(cfg, painter_cfg), ema=True)
        return DepthNet(load_latest_weights(cfg.base, build_network(painter_cfg), ema=True), cfg.unet.in_channels)

    record = {"depth_of": dataclasses.asdict(cfg.unet), "image_channels": cfg.unet.in_channels}
    return train_system(cfg, run_dir, resume=resume, load_config=load_config, inputs=("base_checkpoint",),
                        parts=parts, network=network, model_config=record)  # fmt: skip


def load_model(run_dir: str | Path, *, ema: bool = True, device: str = "cpu") -> tuple[DiffusionSystem, DepthConfig]:
    """The estimator (EMA weights by default) between the painter's text encoder and codec, and the config."""
    cfg = load_config(run_dir)
    painter_cfg, conditioner, codec = _parts(cfg)
    network = load_latest_weights(run_dir, build_estimator(cfg, painter_cfg), ema=ema)
    return DiffusionSystem(network, conditioner, codec).to(device).eval(), cfg


@torch.no_grad()
def estimate(system: DiffusionSystem, cfg: DepthConfig, images: torch.Tensor, *, steps: int | None = None,
             ensemble: int | None = None, sampler: str | None = None, spacing: str | None = None, seed: int = 0,
             batch_size: int = 64, progress: bool = False,
             callback=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Affine-invariant depth (N, H, W) in [0, 1] (larger is farther) of images (N, 3, H, W) in [-1, 1], and
    its uncertainty (the ensemble's spread; zeros for one draw).

    An end-to-end run takes its one deterministic step (t = T - 1 from the zero latent). A diffusion run
    samples ``ensemble`` draws (default: the run's) with ``sampler``/``steps``/``spacing`` (default: the
    run's), draw m of image i from its own noise (seed, m, i), and ensembles them (Eq. 4). ``callback`` sees
    the first batch's first draw (the training grid's trajectory strip)."""
    members = 1 if cfg.objective == "end_to_end" else check_int("ensemble", ensemble or cfg.ensemble, 1, 100)
    device = next(system.network.parameters()).device
    schedule = cfg.diffusion.make_schedule()
    draws = []
    for m in range(members):
        out = []
        for start in range(0, len(images), batch_size):
            part = images[start : start + batch_size]
            cond, _ = system.conditioner.condition(part, len(part), device, seed=seed)
            if cfg.objective == "end_to_end":
                x, x0 = one_step(system.network, cfg, schedule, cond, len(part), device)
                if callback is not None and m == start == 0:
                    system.codec.preview(callback)(0, x, schedule.timesteps - 1, x0)
            else:
                noise = ImageNoise(seed * 1000 + m, range(start, start + len(part)))
                watch = system.codec.preview(callback) if callback is not None and m == start == 0 else None
                x0 = run_sampler(system.network, cfg, len(part), cond, None, cfg_scale=1.0, seed=seed,
                                 noise=noise, sampler=sampler, steps=steps, spacing=spacing,
                                 callback=watch)  # fmt: skip
            out.append(system.codec.decode(x0).mean(dim=1).cpu())  # (b, H, W) in [-1, 1]
        draws.append((torch.cat(out) + 1) / 2)
    stacked = torch.stack(draws, dim=1)  # (N, M, H, W)
    merged = [ensemble_depth(stacked[i]) for i in tqdm(range(len(images)), desc="ensembling", leave=False,
                                                         disable=not progress or members == 1)]  # fmt: skip
    return torch.stack([d for d, _ in merged]), torch.stack([s for _, s in merged])


def evaluate(run_dir: str | Path, n: int, *, seed: int = 0, sampler=None, steps=None, ensemble=None,
             spacing=None, progress: bool = False) -> dict:  # fmt: skip
    """AbsRel, delta1 and pair order on ``n`` held-out scenes (``difflab eval``), beside the empty world and
    the autoencoder's ceiling (:func:`difflab.models.depth_eval.evaluate`)."""
    system, cfg = load_model(run_dir)
    sampling = {"sampler": sampler, "steps": steps, "ensemble": ensemble, "spacing": spacing}

    def estimator(images: torch.Tensor) -> torch.Tensor:
        return estimate(system, cfg, images, seed=seed, progress=progress, **sampling)[0]

    return depth_eval.evaluate(estimator, system.codec, cfg, n, seed=seed, **sampling)


def info_network(cfg: DepthConfig):
    painter_cfg = t2i.load_config(cfg.painter) if cfg.painter else t2i.TextToImageConfig(unet=cfg.unet)
    inputs = example_inputs(cfg.unet, cfg.train.batch_size)
    return build_estimator(cfg, painter_cfg), inputs | {"edit_image": torch.randn_like(inputs["x"])}, None


# -------------------------------------------------------------------------------------------- presets


def _preset(steps: int, tiny: bool, objective: str = "diffusion") -> DepthConfig:
    sample = SampleConfig(sampler="ddim", steps=10, spacing="trailing", cfg_scale=1.0, grid=8 if tiny else 16)
    if tiny:
        train = TrainConfig(steps=steps, batch_size=16, lr=2e-3, warmup_steps=10, ema_decay=0.99, log_every=10,
                            checkpoint_every=None, progress=False)  # fmt: skip
    else:
        train = TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.995, log_every=25,
                            checkpoint_every=250, sample_every=1000)  # fmt: skip
    return DepthConfig(objective=objective, train=train, sample=sample)


PRESETS = (
    Preset("depth_tiny", "depth", "Marigold from a tiny latent text-to-image run on a perspective world "
           "(--set base=RUN): seconds (tests)", lambda: _preset(60, True)),
    Preset("depth_marigold", "depth", "Marigold: a latent text-to-image run on depth32/depth64 fine-tuned to "
           "denoise depth latents given the image's (--set base=RUN)", lambda: _preset(3000, False)),
    Preset("depth_e2e", "depth", "one-step end-to-end fine-tuning (Garcia et al. 2025) of a depth run "
           "(--set base=DEPTH_RUN), or, from an image run, the regression baseline",
           lambda: _preset(1000, False, "end_to_end")),
)  # fmt: skip

FAMILY = Family(
    name="depth",
    what="a depth-estimation (depth) run",
    config=DepthConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="samples.png (each grid image beside its estimate, near red, far blue)",
    eval_n=200,
    eval_options=("sampler", "steps", "ensemble", "spacing", "progress"),
    parents=("base",),
    draws=None,
)
