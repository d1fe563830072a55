"""Teaching a trained text-to-image run a concept it never saw: LoRA (Hu et al. 2021), or full fine-tuning
to compare with.

    new word 'star' --> a new row of the frozen text encoder's token table (the old ids do not move)
    a few dozen captioned images of stars --> the base's own loss --> only the adapter trains:
        LoRA:  every attention projection W_0 of the base's UNet gets W_0 + (alpha / r) B A  (Eq. 3, nn/lora.py)
        full:  every weight of the base's network trains (the comparison: more parameters, more forgetting)

The concept is a shape of the world's extension (:data:`difflab.world.scene.EXTENSION_SHAPES`), drawn by the
world's own renderer, so the reader can judge whether a sample shows it. No base preset draws one, and the
base's tokenizer has no word for it: the word is added as a new row of the token-embedding table, random
with the norm of the others, and frozen. Why not the mean of the other shape words (a common start for a
new token)? The layers that read the table are linear in it: a LoRA update dW changes the mean's keys by
the mean of the changes it makes to every shape's keys, so it could not move the star's without moving
the others'. A random row is, like DreamBooth's rare token (Ruiz et al. 2023), a name with no meaning yet.

What is saved is the adapter alone: ``adapter.safetensors`` holds the new words' rows and the LoRA factors
(kilobytes) - or, for full fine-tuning, every weight of the network (megabytes) - and it loads onto the
base at any scale (``difflab generate BASE "a blue star" --lora RUN:0.8``). The run's checkpoints are the
trainer's, for an exact resume. ``difflab eval RUN`` measures both goals: how often the reader finds the
concept in samples of prompts naming it, and the old prompts' faithfulness beside the base's
(:mod:`difflab.models.adapt_eval`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import ConcatDataset, Subset

from difflab.config import atomic_path
from difflab.data.captioned import T2I_CAPTIONS, CaptionedScenes
from difflab.data.text_scenes import TextDataConfig, captioner
from difflab.errors import MAX_COUNT, DifflabError, check_choice, check_float, check_int, check_seed
from difflab.models import adapt_eval, t2i
from difflab.models.adapt_layout import ground_concept
from difflab.models.codecs import cached_latents
from difflab.models.family import Family, Preset
from difflab.models.layout import WithLayout
from difflab.models.recipe import DiffusionConfig, SampleConfig, check_sampling
from difflab.models.runs import checkpoint_id, load_latest_weights, load_run_config
from difflab.models.system import DiffusionSystem, TrainingParts, train_system
from difflab.models.t2i_network import build_network
from difflab.models.t2i_network import info_network as t2i_info_network
from difflab.nn.controlnet import unet_of
from difflab.nn.lora import (
    ATTENTION_TARGETS,
    CROSS_ATTENTION,
    RESBLOCK_CONVS,
    add_lora,
    lora_layers,
    lora_state_dict,
    set_lora_scale,
)
from difflab.nn.unet import UNetConfig
from difflab.train.checkpoint import check_safetensors_header
from difflab.train.config import TrainConfig
from difflab.train.device import is_main_process
from difflab.world.prompts import plural
from difflab.world.render import RENDERER_VERSION
from difflab.world.scene import EXTENSION_SHAPES, WorldConfig, world_preset

METHODS = ("lora", "full")
ADAPTER = "adapter.safetensors"
WORD_ROWS = "text.token_embed.added"
"""The adapter's tensor of the new words' embedding rows (len(words), width)."""


@dataclass(frozen=True)
class AdaptConfig:
    kind: str = "lora"
    base: str | None = None
    """Run directory of the trained text-to-image model to teach (--set base=RUN); it stays as it is."""
    concept: str = "star"
    """The new shape, one of the world's extension shapes, and the word for it (with its plural)."""
    images: int = 96
    """How many captioned images of the concept it learns from: one object each, colours, sizes and cells
    drawn as the base world draws them (48 taught the star to 0.60 of prompts, 96 to 0.76: docs/lora.md)."""
    image_seed: int = 1
    """The seed of those images' scenes (the concept's evaluation draws its own, adapt_eval.EVAL_SEED)."""
    method: str = "lora"
    """'lora': low-rank updates of the attention projections; 'full': every weight of the network trains."""
    rank: int = 2
    alpha: float | None = None
    """LoRA's alpha (None: the rank, so the update is B A itself, scaling 1)."""
    rslora: bool = False
    """Scale by alpha / sqrt(rank) (rsLoRA) instead of alpha / rank."""
    targets: tuple[str, ...] = RESBLOCK_CONVS + CROSS_ATTENTION
    """The layers adapted, by their last names: the residual blocks' 3x3 convolutions (LoCon) and cross-attention's
    q, k, v and output: 1.7 % of the demo's network at rank 2. Attention alone found a star in 0.2-0.3 of samples:
    it is drawn at the latents' full side, below the UNet's one attention resolution (docs/lora.md)."""
    parts: tuple[str, ...] = ("unet",)
    """Which of the base network's parts are adapted: 'unet', and 'refiner' (the text refiner) if it has one."""
    prior_images: int = 480
    """The base's own training items mixed in (prior preservation, as DreamBooth's Eq. 2 does with the base's
    samples; here the world's real scenes are at hand); 0: the concept's images alone, after which the base drew
    stars for every prompt; on the demo's run 96 left the old prompts 4.5 points down, 288 1.5, 480 0.3
    (docs/lora.md)."""
    word_seed: int = 0
    """The seed of the new words' random embedding rows."""
    scale: float = 1.0
    """Sampling default: the adapter's strength (0: the base; LoRA only)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The base's data (its world and captions), UNet and diffusion process, copied by :func:`resolve`."""
    base_checkpoint: str | None = None
    """The base run's checkpoint this adapter was trained on; checked when the run is loaded."""

    def __post_init__(self) -> None:
        check_choice("concept", self.concept, EXTENSION_SHAPES)
        check_choice("method", self.method, METHODS)
        check_int("images", self.images, 1, MAX_COUNT)
        check_int("prior_images", self.prior_images, 0, MAX_COUNT)
        check_seed("image_seed", self.image_seed)
        check_seed("word_seed", self.word_seed)
        check_int("rank", self.rank, 1, 4096)
        if self.alpha is not None:
            check_float("alpha", self.alpha, 0.0, 1e6)
        check_float("scale", self.scale, 0.0, 10.0)
        if not self.targets or not self.parts:
            raise DifflabError(f"targets {self.targets} / parts {self.parts} is empty; expected layer names and "
                               "network parts to adapt")  # fmt: skip
        for p in self.parts:
            check_choice("adapted part", p, ("unet", "refiner"))

    @property
    def words(self) -> tuple[str, str]:
        """The words added to the tokenizer: the concept's name and its plural ('star', 'stars')."""
        return self.concept, plural(self.concept)


def resolve(cfg: AdaptConfig, *, attach: bool = True) -> AdaptConfig:
    """The run record: the base run's path, checkpoint, data, UNet and diffusion process."""
    if attach:
        if cfg.base is None:
            raise DifflabError("an adapter teaches a trained text-to-image run: --set base=RUN (train one with "
                               "'difflab train --preset t2i_demo' or 'difflab demo')")  # fmt: skip
        path = Path(cfg.base).expanduser().resolve()
        base = t2i.load_config(path)
        if base.recipe not in ("sd", "tokencompose", "layout"):
            raise DifflabError(f"base '{path}' is a '{base.recipe}' run; an adapter is taught to a UNet (recipe "
                               "'sd', 'tokencompose' or 'layout')")  # fmt: skip
        if "refiner" in cfg.parts and not base.text_refiner_layers:
            raise DifflabError(f"parts {cfg.parts} name 'refiner' but base '{path}' has no text refiner")
        cfg = dataclasses.replace(cfg, base=str(path), unet=base.unet, diffusion=base.diffusion, data=base.data,
                                  base_checkpoint=checkpoint_id(path, "text-to-image run"))  # fmt: skip
    check_sampling(cfg)
    return cfg


def load_config(run_dir: str | Path) -> AdaptConfig:
    return load_run_config(run_dir, AdaptConfig, "lora", "an adapter (lora) run")


def _base(cfg: AdaptConfig) -> tuple[DiffusionSystem, t2i.TextToImageConfig]:
    """The base system (EMA weights), after checking it is the checkpoint this run was made on."""
    return t2i.load_base(cfg.base, cfg.base_checkpoint, "adapter")


# ---------------------------------------------------------------------------------------------- data


def concept_world(cfg: AdaptConfig) -> WorldConfig:
    """The base's world drawing one object at a time, every one the concept."""
    return dataclasses.replace(
        world_preset(cfg.data.world), shapes=(cfg.concept,), min_objects=1, max_objects=1
    )


def concept_images(cfg: AdaptConfig, tokenizer=None, latents=None) -> CaptionedScenes:
    """The concept's captioned images, captioned as the base's training scenes are ('a small red star',
    'one star', 'a star at the top left')."""
    return CaptionedScenes(concept_world(cfg), cfg.images, cfg.image_seed, captioner(cfg.data), stream=T2I_CAPTIONS,
                           tokenizer=tokenizer, latents=latents)  # fmt: skip


def training_items(cfg: AdaptConfig, base_cfg, encoder, autoencoder=None):
    """The concept's images (their cached latents with a vae), then ``prior_images`` of the base's own; on a
    layout base, each with its layout, the phrases indexed in the concept's world."""
    latents = None
    if base_cfg.vae is not None:
        key = {"data": {"world": cfg.data.world, "concept": cfg.concept, "n": cfg.images, "seed": cfg.image_seed},
               "renderer": RENDERER_VERSION, "dataset": "concept-images"}  # fmt: skip
        latents = cached_latents(base_cfg, concept_images(cfg), key, autoencoder)
    items = concept_images(cfg, encoder.tokenizer, latents)
    prior = t2i.training_set(base_cfg, encoder, autoencoder) if cfg.prior_images else None
    if base_cfg.recipe == "layout":
        world = adapt_eval.reading_world(world_preset(cfg.data.world), cfg.concept)
        items = WithLayout(items, world)
        prior = None if prior is None else WithLayout(prior, world)
    if prior is None:
        return items
    return ConcatDataset([items, Subset(prior, range(min(cfg.prior_images, len(prior))))])


# ------------------------------------------------------------------------------------------- adapter


def word_rows(encoder, n: int, seed: int) -> torch.Tensor:
    """``n`` random rows (n, width) for new words, each with the mean norm of the table's word rows (the
    special tokens left out), so a new word is as loud as an old one."""
    # (words, width): ids 0-3 are <pad> <bos> <eos> <unk>
    table = encoder.text.token_embed.weight.detach()[4:]
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, table.shape[1], generator=g)
    return rows / rows.norm(dim=1, keepdim=True) * table.norm(dim=1).mean()


def add_words(cfg: AdaptConfig, system: DiffusionSystem, rows: torch.Tensor | None = None) -> None:
    """Give the base's text encoder the concept's words (fresh random rows, or the saved ``rows``), and a
    layout base the concept's phrases and plans (:func:`difflab.models.adapt_layout.ground_concept`)."""
    encoder = system.conditioner.encoder
    new = [w for w in cfg.words if w not in encoder.tokenizer.words]
    encoder.add_words(new, word_rows(encoder, len(new), cfg.word_seed) if rows is None else rows)
    ground_concept(system, cfg.concept)


def adapted_network(cfg: AdaptConfig, network: nn.Module) -> nn.Module:
    """The base network with its adapter in place and only the adapter trainable: LoRA layers on the
    targets of ``cfg.parts`` (from the global RNG: A's initialisation), or every weight of the network."""
    network.requires_grad_(cfg.method == "full")
    if cfg.method == "lora":
        for part in cfg.parts:  # a base without a text refiner is its UNet alone
            module = unet_of(network) if part == "unet" else network.refiner
            add_lora(module, cfg.rank, cfg.alpha, cfg.targets, rslora=cfg.rslora)
    return network


def _trained_state(cfg: AdaptConfig, network: nn.Module) -> dict[str, torch.Tensor]:
    """The weights the adapter trains: the LoRA factors, or every weight of the network."""
    return lora_state_dict(network) if cfg.method == "lora" else network.state_dict()


def adapter_state(cfg: AdaptConfig, network: nn.Module, encoder) -> dict[str, torch.Tensor]:
    """What the adapter file holds: the new words' rows, and the trained weights."""
    rows = encoder.text.token_embed.weight.detach()[-len(cfg.words) :]
    return {WORD_ROWS: rows} | {k: v.detach() for k, v in _trained_state(cfg, network).items()}


def trained_parameters(cfg: AdaptConfig, network: nn.Module) -> int:
    """Parameters the adapter trains (the new words' rows are not trained)."""
    return sum(v.numel() for v in _trained_state(cfg, network).values())


def save_adapter(cfg: AdaptConfig, network: nn.Module, encoder, path: Path) -> Path:
    state = {k: v.contiguous().cpu() for k, v in adapter_state(cfg, network, encoder).items()}
    meta = {
        "words": json.dumps(list(cfg.words)),
        "method": cfg.method,
        "base_checkpoint": cfg.base_checkpoint or "",
    }
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def apply_adapter(system: DiffusionSystem, run_dir: str | Path, scale: float | None = None) -> AdaptConfig:
    """Load the adapter of run ``run_dir`` onto a loaded base ``system`` (its text encoder learns the words;
    LoRA at ``scale``, default the run's): the ``--lora RUN:SCALE`` of ``difflab generate``. The base must
    have the network the adapter was trained on (its shapes); an error names a mismatch."""
    cfg = load_config(run_dir)
    path = Path(run_dir) / ADAPTER
    if not path.is_file():
        raise DifflabError(f"'{run_dir}' has no {ADAPTER} (its training has not finished?)")
    check_safetensors_header(path)
    with safe_open(str(path), "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    if cfg.method == "full" and scale not in (None, 1.0):
        raise DifflabError(
            f"scale {scale} is given for a full fine-tuning run '{run_dir}'; expected LoRA (or 1)"
        )
    encoder = system.conditioner.encoder
    if lora_layers(system.network) or cfg.concept in encoder.tokenizer.words:
        raise DifflabError(f"this model already holds an adapter (or the word '{cfg.concept}'); expected a base "
                           "loaded afresh")  # fmt: skip
    if encoder.cfg.width != state[WORD_ROWS].shape[1]:
        raise DifflabError(f"adapter '{path}' was made for a text encoder of width {state[WORD_ROWS].shape[1]}; "
                           f"this base's has width {encoder.cfg.width}")  # fmt: skip
    add_words(cfg, system, state.pop(WORD_ROWS))
    network = adapted_network(cfg, system.network)
    missing, unexpected = network.load_state_dict(state, strict=False)
    wanted = set(_trained_state(cfg, network))
    if unexpected or wanted & set(missing):
        bad = (unexpected or sorted(wanted & set(missing)))[0]
        raise DifflabError(f"adapter '{path}' does not fit this base network (first mismatch: '{bad}'); expected the "
                           f"base it was trained on, '{cfg.base}'")  # fmt: skip
    if cfg.method == "lora":
        set_lora_scale(network, cfg.scale if scale is None else scale)
    system.network.requires_grad_(False)
    return cfg


def parse_lora(spec: str) -> tuple[str, float | None]:
    """``RUN`` or ``RUN:SCALE`` (``--lora``) -> (run directory, scale or None)."""
    run, sep, scale = spec.rpartition(":")
    if not sep or not run:
        return spec, None
    try:
        value = float(scale)
    except ValueError:
        return spec, None  # a path with a colon in it
    if not (math.isfinite(value) and 0 <= value <= 10):
        raise DifflabError(f"--lora scale {scale!r} is invalid; expected a number in [0, 10]")
    return run, value


# ---------------------------------------------------------------------------------------- training


def train(cfg: AdaptConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Teach the base the concept into ``run_dir`` (config.json, checkpoints/, metrics.jsonl, samples/, samples.png
    with concept prompts then old ones, concept.jsonl: the grid's scores at every grid, adapter.safetensors)."""
    cfg = resolve(cfg)
    base_system, base_cfg = _base(cfg)
    add_words(cfg, base_system)
    encoder = base_system.conditioner.encoder
    world = world_preset(cfg.data.world)
    half = cfg.sample.grid // 2
    concept = adapt_eval.concept_prompts(cfg.concept, world, half, adapt_eval.GRID_SEED)
    old = t2i.grid_prompt_set(cfg.data.world, cfg.sample.grid - half)

    def parts(run_dir: Path) -> TrainingParts:
        items = training_items(cfg, base_cfg, encoder, getattr(base_system.codec, "autoencoder", None))
        prompts = [p.text() for p in (*concept, *old)]
        if is_main_process():
            (run_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")

        def on_grid(images: torch.Tensor, step: int, run_dir: Path) -> None:
            report = adapt_eval.grid_report(images, concept, old, world, cfg.concept)
            adapt_eval.write_curve(run_dir, step, report)

        return TrainingParts(base_system.conditioner, base_system.codec, items, grid_request=prompts,
                             loss_fn=t2i.loss_fn(base_cfg), on_grid=on_grid)  # fmt: skip

    run_dir = train_system(cfg, run_dir, resume=resume, load_config=load_config, inputs=("base_checkpoint",),
                           parts=parts, network=lambda: adapted_network(cfg, base_system.network),
                           model_config=_network_record(cfg))  # fmt: skip
    if is_main_process():
        # the checkpoint holds the whole adapted network: a fresh one of its shape is all it needs to load into
        trained = load_latest_weights(run_dir, adapted_network(cfg, build_network(base_cfg)))
        save_adapter(cfg, trained, encoder, Path(run_dir) / ADAPTER)
    return run_dir


def _network_record(cfg: AdaptConfig) -> dict:
    return {"adapter_of": dataclasses.asdict(cfg.unet), "method": cfg.method, "rank": cfg.rank,
            "parts": list(cfg.parts), "targets": list(cfg.targets)}  # fmt: skip


def load_model(run_dir: str | Path, *, ema: bool = True, device: str = "cpu",
               scale: float | None = None) -> tuple[DiffusionSystem, AdaptConfig]:  # fmt: skip
    """The base with this run's adapter (its saved file; ``ema`` is the trainer's, the file is the EMA
    weights) at ``scale`` (default: the run's), and the record."""
    cfg = load_config(run_dir)
    system, _ = _base(cfg)
    apply_adapter(system, run_dir, scale)
    return system.to(device).eval(), cfg


def evaluate(run_dir: str | Path, n: int, *, seed: int = 0, sampler=None, steps=None, cfg_scale=None,
             progress: bool = False, prompt_seed: int | None = None, old: bool = True) -> dict:  # fmt: skip
    """The concept found in samples of ``n`` prompts naming it, and the old prompts' faithfulness (``n`` per
    category, at most 100), each beside the base's (:func:`difflab.models.adapt_eval.evaluate`)."""
    cfg = load_config(run_dir)
    base, base_cfg = _base(cfg)
    adapted, _ = _base(cfg)
    apply_adapter(adapted, run_dir)
    add_words(cfg, base, adapted.conditioner.encoder.text.token_embed.weight[-len(cfg.words) :])
    return adapt_eval.evaluate(adapted, base, cfg, base_cfg, run_dir, n, seed=seed, sampler=sampler, steps=steps,
                               cfg_scale=cfg_scale, progress=progress, prompt_seed=prompt_seed, old=old,
                               trained=trained_parameters(cfg, adapted.network),
                               total=sum(p.numel() for p in base.network.parameters()))  # fmt: skip


def info_network(cfg: AdaptConfig):
    """The base's UNet with its adapter (``difflab info``); without a base, the preset's shapes."""
    base_like = (
        t2i.load_config(cfg.base)
        if cfg.base
        else t2i.resolve(t2i.get_preset_config("t2i_demo"), attach=False)
    )
    net, inputs, loss = t2i_info_network(base_like)
    return adapted_network(cfg, net), inputs, loss


# -------------------------------------------------------------------------------------------- presets


def _preset(steps: int, tiny: bool, **kw) -> AdaptConfig:
    if tiny:
        return AdaptConfig(
            images=32,
            prior_images=0,
            train=TrainConfig(steps=steps, batch_size=16, lr=1e-2, warmup_steps=10, ema_decay=None, log_every=10,
                              checkpoint_every=None, progress=False),
            sample=SampleConfig(steps=10, grid=8, cfg_scale=2.0),
            **kw,
        )  # fmt: skip
    return AdaptConfig(
        train=TrainConfig(steps=steps, batch_size=32, lr=kw.pop("lr", 2e-3), warmup_steps=20, lr_schedule="cosine",
                          ema_decay=None, log_every=25, checkpoint_every=250, sample_every=250),
        sample=SampleConfig(sampler="dpmpp_2m", steps=20, cfg_scale=3.0, grid=32),
        **kw,
    )  # fmt: skip


PRESETS = (
    Preset("lora_tiny", "lora", "a rank-4 LoRA teaching a t2i_tiny run the star (--set base=RUN): seconds (tests)",
           lambda: _preset(250, True, rank=4, targets=ATTENTION_TARGETS + RESBLOCK_CONVS)),
    Preset("lora_star", "lora", "a rank-2 LoRA (1.7 % of the network) teaching a text-to-image run a shape it never "
           "saw, the star, from 96 images beside 480 of its own (--set base=RUN: the demo's run, or a t2i_demo one): "
           "10-17 minutes on a CPU", lambda: _preset(2000, False)),
    Preset("finetune_star", "lora", "lora_star's images and steps with every weight of the network trained (full "
           "fine-tuning, the comparison; --set base=RUN)", lambda: _preset(2000, False, method="full", lr=2e-4)),
)  # fmt: skip

FAMILY = Family(
    name="lora",
    what="an adapter (lora) run",
    config=AdaptConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="adapter.safetensors, samples.png (concept prompts, then old ones), concept.jsonl",
    eval_n=100,
    eval_options=("sampler", "steps", "cfg_scale", "progress", "prompt_seed"),
    parents=("base",),
    draws="prompts",
)
