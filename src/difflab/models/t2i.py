"""Text-to-image diffusion, Stable-Diffusion style (Rombach et al. 2022, Sec. 3.3): a UNet over the latents of
a trained autoencoder, conditioned on a *frozen* text encoder through cross-attention, sampled with
classifier-free guidance (Ho & Salimans 2022).

    caption -> tokenizer -> frozen CLIP text tower -> tokens (B, L, width) ---- cross-attention keys/values
                                                   -> pooled (B, E) ---------- + time embedding (SDXL)
    image   -> q(z|x) (once: cached) -> z' = scale * z -> x_t -> UNet(x_t, t, tokens, pooled) -> v-loss

Training replaces a caption by the empty prompt "" with probability ``cond_drop``, so the one network also
learns the unconditional model that guidance steers away from:

    eps_w = eps(x_t, "") + w (eps(x_t, prompt) - eps(x_t, ""))          (w = 1: no guidance)

Data: toy-world scenes (one or two objects in scene32) with one true caption each, from the world's
captioner (:mod:`difflab.world.language`): a full description with probability ``describe_prob``, else a
random partial caption ('two circles', 'a red circle to the left of a square'), the forms of the
GenEval-style prompts it is judged on (:mod:`difflab.models.t2i_eval`). Scenes that contain one of
``heldout_pairs`` (a colour on a shape) are never trained on, so prompts naming those pairs measure
compositional generalisation.

``vae=None`` runs the same model on pixels (what latent compression costs, measured).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from difflab.data.captioned import T2I_CAPTIONS, Caption, CaptionedScenes, Captioner
from difflab.errors import DifflabError, check_choice
from difflab.models import t2i_eval
from difflab.models.codecs import (
    POSTERIOR,
    Latents,
    Pixels,
    attach_autoencoder,
    cached_latents,
    check_vae_unchanged,
    load_latents,
)
from difflab.models.conditioners import TextPrompts
from difflab.models.family import Family, Preset
from difflab.models.recipe import DiffusionConfig, SampleConfig, check_cond_drop, check_sampling
from difflab.models.runs import load_latest_weights, load_run_config
from difflab.models.system import DiffusionSystem, TrainingParts, train_system
from difflab.models.system import generate as generate_system
from difflab.models.text_encoder import FrozenTextEncoder, load_text_encoder, text_encoder_id
from difflab.nn.transformer import Transformer
from difflab.nn.unet import UNet, UNetConfig, example_inputs
from difflab.train.config import TrainConfig
from difflab.train.device import is_main_process
from difflab.world.geneval import HELDOUT_PAIRS, prompt_sets
from difflab.world.language import caption, description, short_caption
from difflab.world.render import RENDERER_VERSION
from difflab.world.scene import Scene, WorldConfig, world_preset


@dataclass(frozen=True)
class TextDataConfig:
    world: str = "scene32"
    """Toy-world preset of the training scenes (scene32: one or two objects; scene64: one to four)."""
    n: int = 100_000
    seed: int = 0
    describe_prob: float = 0.25
    """Probability that a caption is the scene's full description."""
    short_prob: float = 0.0
    """Probability that a caption is a short form ('a red circle and a blue square', the forms people type
    and GenEval asks: :func:`difflab.world.language.short_caption`); the rest are random partial captions
    that name sizes and positions at random (:func:`difflab.world.language.caption`)."""
    heldout_pairs: tuple[str, ...] = tuple(f"{c} {s}" for c, s in HELDOUT_PAIRS)
    """'colour shape' pairs no training scene contains (--set 'data.heldout_pairs=' for none)."""
    min_objects: int | None = None
    """At least this many objects in every training scene (None: the world's own range). On scene32,
    2 trains on two-object scenes only, where every composition (position, binding, counting) is learned;
    single objects are still named by the partial captions ('a circle' of a two-object scene). What it did
    on the demo is in docs/t2i.md."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.describe_prob <= 1.0:
            raise DifflabError(
                f"describe_prob {self.describe_prob} is invalid; expected a probability in [0, 1]"
            )
        if not 0.0 <= self.short_prob <= 1.0 - self.describe_prob:
            raise DifflabError(
                f"short_prob {self.short_prob} is invalid; expected a probability in [0, 1 - describe_prob "
                f"= {1.0 - self.describe_prob:g}]"
            )
        world = world_preset(self.world)
        if self.min_objects is not None and not world.min_objects <= self.min_objects <= world.max_objects:
            raise DifflabError(
                f"min_objects {self.min_objects} is invalid; the '{self.world}' world has "
                f"{world.min_objects} to {world.max_objects} objects per scene"
            )
        for pair in self.heldout_pairs:
            words = pair.split()
            if len(words) != 2 or words[0] not in world.colors or words[1] not in world.shapes:
                raise DifflabError(
                    f"held-out pair '{pair}' is invalid; expected 'colour shape' with a colour of "
                    f"{', '.join(world.colors)} and a shape of {', '.join(world.shapes)}"
                )

    @property
    def image_size(self) -> int:
        return world_preset(self.world).resolution

    def world_config(self) -> WorldConfig:
        """The world the training scenes are drawn from: the preset, with ``min_objects`` if set."""
        if self.min_objects is None:
            return world_preset(self.world)
        return world_preset(self.world, min_objects=self.min_objects)

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The held-out pairs as (colour, shape) tuples."""
        return tuple(tuple(p.split()) for p in self.heldout_pairs)


@dataclass(frozen=True)
class TextToImageConfig:
    kind: str = "t2i"
    text_encoder: str | None = None
    """An exported text encoder ('difflab export-text-encoder') or a CLIP run: --set text_encoder=DIR."""
    vae: str | None = None
    """Run directory of a trained autoencoder (--set vae=RUN); None trains on pixels."""
    data: TextDataConfig = field(default_factory=TextDataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    """Its context width and pooled width follow the text encoder; its channels and side the pixels or,
    with a vae, the latent shape (all set by :func:`resolve`)."""
    text_layers: tuple[int, ...] = (-1,)
    """Hidden states of the text tower the UNet attends to, joined along the features: -1 the last (the
    CLIP tokens), 0 the token embeddings, k block k's output."""
    text_refiner_layers: int = 0
    """Bidirectional transformer blocks over the frozen encoder's tokens, trained with the UNet (0: none).
    A causal CLIP tower that has barely learned binding gives 'circle' little of the 'red' before it; a
    refiner lets every token read its neighbours on both sides before the UNet attends to them."""
    pooled: bool = True
    """Add the pooled text embedding to the time embedding, besides cross-attention to the tokens."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cond_drop: float = 0.1
    """Probability of training on the empty prompt instead of the caption (for classifier-free guidance)."""
    posterior: str = "sample"
    """'sample': train on z ~ q(z|x), fresh each step (the paper); 'mode': on the posterior mean."""
    latent_scale: float | None = None
    vae_checkpoint: str | None = None
    text_encoder_checkpoint: str | None = None
    """What this run was trained with; checked when it is loaded (set by :func:`resolve`)."""

    def __post_init__(self) -> None:
        check_cond_drop(self.cond_drop)
        check_choice("posterior", self.posterior, POSTERIOR)
        if self.text_refiner_layers < 0:
            raise DifflabError(
                f"text_refiner_layers {self.text_refiner_layers} is invalid; expected an integer >= 0"
            )


# ----------------------------------------------------------------------------------------------- data


def captioner(data: TextDataConfig) -> Captioner:
    """Text-to-image captions: the full description with probability ``describe_prob``, a short
    GenEval-form caption with probability ``short_prob``, else a random partial caption."""

    def caption_of(scene: Scene, rng: np.random.Generator) -> Caption:
        u = rng.random()  # one draw picks the kind, so short_prob = 0 keeps earlier runs' captions
        if u < data.describe_prob:
            prompt = description(scene)
            return Caption(prompt.text(), prompt)
        if u < data.describe_prob + data.short_prob:
            return Caption(*short_caption(scene, rng))
        return Caption(*caption(scene, rng))

    return caption_of


def captioned_scenes(data: TextDataConfig, tokenizer=None, latents: dict[str, np.ndarray] | None = None):
    """Scene i of the world (redrawn while it shows a held-out pair) with one fixed true caption,
    tokenized (``{"ids", "mask"}``, with a ``tokenizer``), and either ``"image"`` or, given cached
    ``latents``, the posterior ``"mean"`` and ``"std"``."""
    return CaptionedScenes(data.world_config(), data.n, data.seed, captioner(data), stream=T2I_CAPTIONS,
                           tokenizer=tokenizer, heldout=data.pairs(), latents=latents)  # fmt: skip


def training_set(cfg: TextToImageConfig, encoder: FrozenTextEncoder, autoencoder=None) -> CaptionedScenes:
    """The captioned training scenes: pixels, or (with a vae) the autoencoder's cached latents of them."""
    if cfg.vae is None:
        return captioned_scenes(cfg.data, encoder.tokenizer)
    images = captioned_scenes(cfg.data)  # no tokenizer, no latents: items are {"image"}, what is encoded
    # the images are a function of the scenes alone (not of the captions): world, n, seed, held-out pairs
    d = cfg.data
    scenes = {"world": d.world, "n": d.n, "seed": d.seed, "heldout_pairs": list(d.heldout_pairs)}
    if d.min_objects is not None:  # only when set, so the latents cached before the option still match
        scenes["min_objects"] = d.min_objects
    key = {"data": scenes, "renderer": RENDERER_VERSION, "dataset": "t2i-captioned-scenes"}
    latents = cached_latents(cfg, images, key, autoencoder)
    return captioned_scenes(cfg.data, encoder.tokenizer, latents)


# ----------------------------------------------------------------------------------------- resolution


def resolve(cfg: TextToImageConfig, *, attach: bool = True) -> TextToImageConfig:
    """The run record of a request. The UNet's channels and side follow the pixels (no vae); with
    ``attach``, the text encoder (absolute path, id, and the UNet's ``context_dim`` and ``pooled_dim``)
    and the autoencoder (path, id, latent scale and shape) are read; the sampling defaults are checked
    against the schedule. ``attach=False`` keeps the preset's widths and latent shape (``difflab info``)."""
    if cfg.vae is None:  # pixels: the UNet's channels and side follow the data
        cfg = dataclasses.replace(
            cfg,
            unet=dataclasses.replace(cfg.unet, in_channels=3, out_channels=3, image_size=cfg.data.image_size),
        )
    if attach:
        cfg = _attach_text_encoder(cfg)
        if cfg.vae is not None:
            cfg = attach_autoencoder(cfg, "toy", cfg.data.world, cfg.data.image_size)
    check_sampling(cfg)
    return cfg


def _attach_text_encoder(cfg: TextToImageConfig) -> TextToImageConfig:
    if cfg.text_encoder is None:
        raise DifflabError(
            "text-to-image needs a frozen text encoder: --set text_encoder=DIR (a CLIP run, or "
            "'difflab export-text-encoder CLIP_RUN --out DIR'; train one with 'difflab train --preset clip_t2i')"
        )
    path = Path(cfg.text_encoder).expanduser().resolve()
    encoder = load_text_encoder(path, layers=cfg.text_layers)
    unet = dataclasses.replace(cfg.unet, context_dim=encoder.width,
                               pooled_dim=encoder.embed_dim if cfg.pooled else None)  # fmt: skip
    return dataclasses.replace(
        cfg, text_encoder=str(path), unet=unet, text_encoder_checkpoint=text_encoder_id(path)
    )


def check_inputs_unchanged(cfg: TextToImageConfig, what: str) -> None:
    """An error when the text encoder or autoencoder this run was trained with has been replaced since."""
    now = text_encoder_id(cfg.text_encoder)
    if now != cfg.text_encoder_checkpoint:
        raise DifflabError(f"text encoder '{cfg.text_encoder}' has changed since {what} "
                           f"({cfg.text_encoder_checkpoint}, now {now})")  # fmt: skip
    if cfg.vae is not None:
        check_vae_unchanged(cfg, what)


# ------------------------------------------------------------------------------------------- network


class TextConditionedUNet(nn.Module):
    """The trained network: an optional text refiner over the frozen encoder's tokens, then the UNet.
    ``forward(x, t, context, context_mask, pooled)`` as the UNet's; ``.cfg`` is the UNet's config."""

    def __init__(self, cfg: TextToImageConfig):
        super().__init__()
        self.unet = UNet(cfg.unet)
        self.cfg = cfg.unet
        self.refiner = None
        if cfg.text_refiner_layers:
            if not cfg.unet.context_dim:
                raise DifflabError("a text refiner needs the UNet's context_dim (set from the text encoder)")
            heads = next(h for h in (4, 2, 1) if cfg.unet.context_dim % h == 0)
            self.refiner = Transformer(cfg.unet.context_dim, cfg.text_refiner_layers, heads)

    def forward(self, x, t, context=None, context_mask=None, pooled=None, **kwargs):
        if self.refiner is not None and context is not None:
            context = self.refiner(context, context_mask)  # (B, L, context_dim); padding masked as keys
        return self.unet(x, t, context=context, context_mask=context_mask, pooled=pooled, **kwargs)


def build_network(cfg: TextToImageConfig) -> UNet | TextConditionedUNet:
    """The network a run trains: the UNet alone, or with a text refiner in front of it."""
    return TextConditionedUNet(cfg) if cfg.text_refiner_layers else UNet(cfg.unet)


def network_config(cfg: TextToImageConfig):
    """What a checkpoint records of the network's architecture (a resume must match it)."""
    if not cfg.text_refiner_layers:
        return cfg.unet
    return {"unet": dataclasses.asdict(cfg.unet), "text_refiner_layers": cfg.text_refiner_layers}


def info_network(cfg: TextToImageConfig):
    """The trained network (the refiner included) with example inputs (``difflab info``)."""
    return build_network(cfg), example_inputs(cfg.unet, cfg.train.batch_size), None


# ---------------------------------------------------------------------------------------------- system


def conditioner(cfg: TextToImageConfig, encoder: FrozenTextEncoder) -> TextPrompts:
    return TextPrompts(encoder, cfg.cond_drop, pooled=bool(cfg.unet.pooled_dim))


def codec(cfg: TextToImageConfig) -> Pixels | Latents:
    """Pixels, or (with a vae) the autoencoder's latents at the record's scale."""
    return Pixels() if cfg.vae is None else load_latents(cfg)


def load_config(run_dir: str | Path) -> TextToImageConfig:
    return load_run_config(run_dir, TextToImageConfig, "t2i", "a text-to-image (t2i) run")


def load_model(
    run_dir: str | Path, *, ema: bool = True, device: str = "cpu"
) -> tuple[DiffusionSystem, TextToImageConfig]:
    """The trained network (EMA weights by default) between its frozen text encoder and its codec
    (pixels, or the autoencoder's latents), and the config."""
    cfg = load_config(run_dir)
    check_inputs_unchanged(cfg, f"'{run_dir}' was trained on it; retrain the text-to-image model")
    network = load_latest_weights(run_dir, build_network(cfg), ema=ema)
    encoder = load_text_encoder(cfg.text_encoder, layers=cfg.text_layers)
    return DiffusionSystem(network, conditioner(cfg, encoder), codec(cfg)).to(device).eval(), cfg


def generate(model: DiffusionSystem, cfg: TextToImageConfig, prompts: list[str], **kwargs) -> torch.Tensor:
    """One image (N, C, H, W) in [-1, 1] per prompt. Keyword arguments as
    :func:`difflab.models.system.generate` (``attention`` records cross-attention maps; sampler, steps,
    cfg_scale, spacing, seed, progress, callback)."""
    return generate_system(model, cfg, len(prompts), prompts, **kwargs)


def grid_prompts(world: str, n: int) -> list[str]:
    """``n`` fixed prompts for sample grids: the evaluation prompt sets' categories in turn."""
    lists = list(prompt_sets(world).values())
    return [lists[i % len(lists)][i // len(lists)].text() for i in range(n)]


def train(cfg: TextToImageConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train text-to-image diffusion into ``run_dir`` (config.json, checkpoints/, metrics.jsonl,
    samples/step_*.png, samples.png with its prompts in prompts.txt, trajectory.png)."""
    cfg = resolve(cfg)

    def parts(run_dir: Path) -> TrainingParts:
        encoder = load_text_encoder(cfg.text_encoder, layers=cfg.text_layers)
        space = codec(cfg)
        data = training_set(cfg, encoder, None if cfg.vae is None else space.autoencoder)
        prompts = grid_prompts(cfg.data.world, cfg.sample.grid)
        if is_main_process():
            (run_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
        return TrainingParts(conditioner(cfg, encoder), space, data, grid_request=prompts)

    return train_system(cfg, run_dir, resume=resume, load_config=load_config,
                        inputs=("text_encoder_checkpoint", "vae_checkpoint"), parts=parts,
                        network=lambda: build_network(cfg), model_config=network_config(cfg))  # fmt: skip


def evaluate(run_dir: str | Path, n: int, *, seed: int = 0, sampler=None, steps=None, cfg_scale=None,
             progress: bool = False) -> dict:  # fmt: skip
    """GenEval-style faithfulness of the first ``n`` prompts of every category (:mod:`t2i_eval`)."""
    model, cfg = load_model(run_dir)
    return t2i_eval.evaluate(model, cfg, run_dir, n, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                             seed=seed, progress=progress)  # fmt: skip


# -------------------------------------------------------------------------------------------- presets

PRESETS = (
    Preset(
        "t2i_tiny",
        "t2i",
        "text-to-image on the 16x16 tiny world in pixels (--set text_encoder=DIR of a clip_tiny run): seconds "
        "(tests)",
        lambda: TextToImageConfig(
            data=TextDataConfig(world="tiny", n=2048, heldout_pairs=()),
            # context and pooled widths of a clip_tiny text encoder (set from the encoder by resolve)
            unet=UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                            heads=2, norm_groups=4, context_dim=32, pooled_dim=32),
            train=TrainConfig(steps=200, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.99, log_every=10,
                              checkpoint_every=None, progress=False),
            sample=SampleConfig(steps=10, grid=8, cfg_scale=2.0),
        ),
    ),
    Preset(
        "t2i_demo",
        "t2i",
        "text-to-image on 32x32 scenes of one or two objects, on a vae_t2i run's 16x16x4 latents and a clip_t2i "
        "text encoder (--set vae=RUN --set text_encoder=DIR; 'difflab demo' trains all three): minutes on a CPU",
        lambda: TextToImageConfig(
            data=TextDataConfig(world="scene32", n=20_000),
            text_layers=(0, -1),
            text_refiner_layers=2,
            unet=UNetConfig(in_channels=4, out_channels=4, image_size=16, channels=32, channel_mult=(1, 2),
                            num_res_blocks=1, attention_resolutions=(8,), heads=4, context_pool=True,
                            context_dim=128, pooled_dim=64),
            train=TrainConfig(steps=2000, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.995, log_every=25,
                              checkpoint_every=250, sample_every=500),
            sample=SampleConfig(sampler="dpmpp_2m", steps=20, cfg_scale=3.0, grid=36),
        ),
    ),
)  # fmt: skip

FAMILY = Family(
    name="t2i",
    what="a text-to-image (t2i) run",
    config=TextToImageConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="samples.png, prompts.txt, trajectory.png",
    eval_n=100,
    eval_options=("sampler", "steps", "cfg_scale", "progress"),
    parents=("text_encoder",),
    draws="prompts",
)
