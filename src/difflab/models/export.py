"""Runs that leave difflab: a pixel diffusion run written in diffusers' folder layout, and a diffusers UNet
folder read back into difflab's :class:`~difflab.nn.unet.UNet`, with equal outputs both ways.

What maps, block for block (``tests/test_export.py`` checks the outputs to 1e-5):

    difflab UNet                                   diffusers UNet2DModel
    time_embed: sinusoidal [cos, sin] -> MLP       Timesteps(flip_sin_to_cos=True, freq_shift=0) -> TimestepEmbedding
    class_embed (+ the CFG null row)               class_embedding = nn.Embedding(num_classes + 1, 4C)
    ResBlock: GN, SiLU, conv, GN (1 + s) + b, ...  ResnetBlock2D, resnet_time_scale_shift="scale_shift"
    SpatialAttention without context: x + Attn(GN x)  Attention(residual_connection=True), q/k/v biases zero
    a level with attention at its side             AttnDownBlock2D / AttnUpBlock2D (else DownBlock2D / UpBlock2D)
    Downsample: 3x3 conv, stride 2, padding 1      Downsample2D(padding=1)
    Upsample: nearest 2x, 3x3 conv                 Upsample2D(use_conv=True)
    mid1, mid_attn, mid2                           UNetMidBlock2D (attn_norm_num_groups = norm_num_groups)

A factorised class embedding (``class_factors``) is written as the table of its sums, one row per label,
the null class last: diffusers' ``class_labels=num_classes`` is the unconditional branch of classifier-free
guidance (Ho & Salimans 2022). The scheduler config carries the run's betas exactly (``trained_betas``), its
prediction type and timestep spacing, on the scheduler of its default sampler where diffusers has the same
algorithm (``tests/test_diffusion_vs_diffusers.py`` checks each step of each pair).

What does not map, and is refused with the reason (:func:`refusal`):
- an autoencoder (and so latent diffusion, which decodes through one): AutoencoderKL has no space-to-depth
  (the 'patch' layout), pads its encoder's downsampling by (0, 1) where difflab pads by 1 on each side (the
  'pyramid' layout's windows sit one pixel apart), and has one attention head in its middle block;
- anything that cross-attends to text (t2i, ControlNet, LoRA, InstructPix2Pix): difflab's attention layer is
  GroupNorm, self-attention, LayerNorm, cross-attention, added to the un-normalised map, with no feed-forward;
  UNet2DConditionModel's Transformer2DModel adds proj_in/proj_out, a LayerNorm before self-attention and a
  GEGLU feed-forward, and runs its residual stream on the GroupNorm-ed map: no weights make the two equal;
- UNet options diffusers' UNet2DModel has no counterpart for (position embeddings in attention, pooled text,
  grounding), and a fixed head count that gives layers of different widths different head sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from difflab.config import atomic_path
from difflab.errors import DifflabError
from difflab.models import pixel
from difflab.models.recipe import DiffusionConfig, SampleConfig
from difflab.models.registry import family_of_run
from difflab.models.runs import read_run_config
from difflab.nn.unet import UNet, UNetConfig
from difflab.train.checkpoint import check_compatible, check_safetensors_header

FORMATS = ("diffusers",)
DIFFUSERS_VERSION = "0.30.0"
"""Written as ``_diffusers_version``: the oldest diffusers this project supports (its dev extra), which
knows every config key written here."""
WEIGHTS = "diffusion_pytorch_model.safetensors"
UNET_CLASS = "UNet2DModel"
NORM_EPS = 1e-5
"""torch's GroupNorm default, which every difflab GroupNorm uses."""

# --------------------------------------------------------------------------------------------- refusals

_AUTOENCODER = (
    "diffusers' AutoencoderKL has no space-to-depth step (difflab's 'patch' layout folds f x f pixels into "
    "channels), pads its encoder's stride-2 convolutions by (0, 1) where difflab pads by 1 on each side (so "
    "the 'pyramid' layout's windows sit one pixel apart), and has a single attention head in its middle block"
)
_TEXT = (
    "difflab's attention layer (GroupNorm, self-attention, LayerNorm, cross-attention, added to the "
    "un-normalised map, no feed-forward) has no counterpart in UNet2DConditionModel, whose Transformer2DModel "
    "adds proj_in/proj_out, a LayerNorm before self-attention and a GEGLU feed-forward, with its residual "
    "stream on the GroupNorm-ed map"
)
_NOT_DIFFUSION = "it is not a diffusion model, and diffusers has no class for it"


def _t2i_reason(data: dict) -> str:
    """Why a text-to-image network does not map: its backbone first, then what the recipe adds."""
    if data.get("recipe") == "mmdit":
        why = ("its backbone is an MMDiT, whose text and image tokens meet in one joint attention; "
               "export maps UNets only")  # fmt: skip
    else:
        why = _TEXT
    unet = data.get("unet") or {}
    extras = []
    if data.get("text_refiner_layers"):
        extras.append("a text refiner (a transformer over the encoder's tokens, trained with the UNet)")
    if unet.get("grounding_dim"):
        extras.append("GLIGEN grounding layers that embed each pixel's own box (nn/gligen.py) and have no "
                      "gated feed-forward, unlike diffusers' GatedSelfAttentionDense")  # fmt: skip
    return why + (f"; it also has {' and '.join(extras)}" if extras else "")


REFUSALS: dict[str, Callable[[dict], str]] = {
    "vae": lambda data: _AUTOENCODER,
    "ldm": lambda data: (
        "its UNet would map onto UNet2DModel, but it decodes through an autoencoder run and " + _AUTOENCODER
    ),
    "t2i": _t2i_reason,
    "control": lambda data: "a ControlNet steers a text-conditioned UNet, and " + _TEXT,
    "lora": lambda data: "an adapter loads onto a text-conditioned UNet, and " + _TEXT,
    "instruct": lambda data: "InstructPix2Pix is a text-conditioned UNet, and " + _TEXT,
    "clip": lambda data: _NOT_DIFFUSION + " (its text tower exports with 'difflab export-text-encoder')",
    "planner": lambda data: _NOT_DIFFUSION,
}
"""Why each run kind but 'pixel' is refused, given the run's raw config.json."""


def unet_refusal(cfg: UNetConfig) -> str | None:
    """Why a UNet does not map onto diffusers' UNet2DModel, or None when it does."""
    if cfg.context_dim:
        return "it cross-attends to a context: " + _TEXT
    options = {
        "attention_positions": "a learned position embedding in every attention layer",
        "pooled_dim": "a pooled text embedding added to the time embedding",
        "context_pool": "the context's mean added to the time embedding",
        "grounding_dim": "GLIGEN grounding layers",
        "grounding_map": "grounding tokens painted into the input",
    }
    for field, what in options.items():
        if getattr(cfg, field):
            return f"it has {what} ({field}), which UNet2DModel has no counterpart for"
    widths = sorted(
        {cfg.channels * cfg.channel_mult[level] for level in _attention_levels(cfg)} | {_mid(cfg)}
    )
    sizes = {width // cfg.heads_at(width) for width in widths}
    if len(sizes) > 1:
        return (f"heads={cfg.heads} splits its attention widths {widths} into heads of {sorted(sizes)} "
                f"channels, and UNet2DModel has one attention_head_dim for every layer (train with unet.head_dim "
                f"set)")  # fmt: skip
    return None


def _attention_levels(cfg: UNetConfig) -> list[int]:
    """Levels whose blocks have self-attention: those whose side is in ``attention_resolutions``."""
    return [i for i in range(len(cfg.channel_mult)) if cfg.image_size // 2**i in cfg.attention_resolutions]


def _mid(cfg: UNetConfig) -> int:
    return cfg.channels * cfg.channel_mult[-1]


# ----------------------------------------------------------------------------------- the UNet's config


_FIXED = {
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "act_fn": "silu",
    "norm_eps": NORM_EPS,
    "resnet_time_scale_shift": "scale_shift",
    "add_attention": True,
    "class_embed_type": None,
    "num_train_timesteps": None,
}
"""The UNet2DModel settings that make its blocks difflab's (see the module docstring)."""


def unet2d_config(cfg: UNetConfig) -> dict:
    """diffusers' ``UNet2DModel`` config of a difflab UNet that maps (:func:`unet_refusal`)."""
    attn = _attention_levels(cfg)
    levels = range(len(cfg.channel_mult))
    return {
        "_class_name": UNET_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.image_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "block_out_channels": [cfg.channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks,
        "down_block_types": ["AttnDownBlock2D" if i in attn else "DownBlock2D" for i in levels],
        "up_block_types": ["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(levels)],
        "attention_head_dim": _mid(cfg) // cfg.heads_at(_mid(cfg)),  # one size everywhere (unet_refusal)
        "norm_num_groups": cfg.norm_groups,
        "attn_norm_num_groups": cfg.norm_groups,
        "dropout": cfg.dropout,
        "num_class_embeds": cfg.num_classes + 1 if cfg.num_classes else None,
        **_FIXED,
    }


_DIFFUSERS_DEFAULTS = {"resnet_time_scale_shift": "default"}
"""UNet2DModel's defaults where they differ from :data:`_FIXED`: a key a config leaves out takes its default."""


def unet_config_from_diffusers(config: dict, where: str = "config.json") -> UNetConfig:
    """The difflab UNet of a ``UNet2DModel`` config, or an error naming the first setting that does not
    map. A model with K class embeddings becomes one with K - 1 classes and the last row as its null class."""
    name = config.get("_class_name", UNET_CLASS)
    if name != UNET_CLASS:
        raise DifflabError(f"{where} is a {name}; expected a {UNET_CLASS}")
    for key, want in _FIXED.items():
        got = config.get(key, _DIFFUSERS_DEFAULTS.get(key, want))
        if key == "time_embedding_dim" and got in (None, 4 * config["block_out_channels"][0]):
            continue
        if got != want:
            raise DifflabError(f"{where}: {key} {got!r} does not map onto difflab's UNet; expected {want!r}")
    groups = config["norm_num_groups"]
    if config.get("attn_norm_num_groups") != groups:
        raise DifflabError(f"{where}: attn_norm_num_groups {config.get('attn_norm_num_groups')!r} does not "
                           f"map; expected norm_num_groups ({groups}), as every difflab attention layer's "
                           f"GroupNorm has")  # fmt: skip
    size, widths = config["sample_size"], list(config["block_out_channels"])
    if not isinstance(size, int):
        raise DifflabError(f"{where}: sample_size {size!r} is invalid; expected one side (square images)")
    if any(w % widths[0] for w in widths):
        raise DifflabError(f"{where}: block_out_channels {widths} are not multiples of the first, as difflab's "
                           f"channel_mult needs")  # fmt: skip
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    attn = [t == "AttnDownBlock2D" for t in down]
    mirrored = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    if any(t not in ("DownBlock2D", "AttnDownBlock2D") for t in down) or up != mirrored:
        raise DifflabError(f"{where}: blocks {down} / {up} do not map; expected DownBlock2D or AttnDownBlock2D "
                           f"per level, mirrored by UpBlock2D or AttnUpBlock2D")  # fmt: skip
    head_dim, classes = config.get("attention_head_dim"), config.get("num_class_embeds")
    if classes is not None and classes < 2:
        raise DifflabError(f"{where}: num_class_embeds {classes} is invalid; expected at least 2 (the last row "
                           f"becomes difflab's null class)")  # fmt: skip
    return UNetConfig(
        in_channels=config["in_channels"], out_channels=config["out_channels"], image_size=size,
        channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=config["layers_per_block"],
        attention_resolutions=tuple(size // 2**i for i, a in enumerate(attn) if a),
        heads=1, head_dim=head_dim,  # None in diffusers: one head as wide as the layer
        norm_groups=groups, dropout=float(config.get("dropout", 0.0)),
        num_classes=classes - 1 if classes is not None else None,
    )  # fmt: skip


# ---------------------------------------------------------------------------------- the weights' names

_RESBLOCK = {"norm1": "norm1", "conv1": "conv1", "emb": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
             "skip": "conv_shortcut"}  # fmt: skip
_ATTENTION = {"norm": "group_norm", "self_attn.to_q": "to_q", "self_attn.to_k": "to_k",
              "self_attn.to_v": "to_v", "self_attn.to_out": "to_out.0"}  # fmt: skip
_BIASLESS = ("to_q", "to_k", "to_v")
"""Projections that carry a bias in diffusers' Attention(bias=True) and none in difflab's."""


def _module_pairs(cfg: UNetConfig) -> list[tuple[str, str, dict | None]]:
    """(difflab module, diffusers module, renaming of the layers inside it or None) in the order both
    networks run them; the loops follow :class:`~difflab.nn.unet.UNet`'s constructor."""
    pairs = [("time_embed.mlp.0", "time_embedding.linear_1", None),
             ("time_embed.mlp.2", "time_embedding.linear_2", None), ("conv_in", "conv_in", None)]  # fmt: skip
    attn, levels = _attention_levels(cfg), len(cfg.channel_mult)
    n = 0  # index into UNet.down (then UNet.up): resblock pairs and resamplers in one list
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            pairs.append((f"down.{n}.0", f"down_blocks.{level}.resnets.{j}", _RESBLOCK))
            if level in attn:
                pairs.append((f"down.{n}.1", f"down_blocks.{level}.attentions.{j}", _ATTENTION))
            n += 1
        if level < levels - 1:
            pairs.append((f"down.{n}.conv", f"down_blocks.{level}.downsamplers.0.conv", None))
            n += 1
    pairs += [("mid1", "mid_block.resnets.0", _RESBLOCK), ("mid_attn", "mid_block.attentions.0", _ATTENTION),
              ("mid2", "mid_block.resnets.1", _RESBLOCK)]  # fmt: skip
    n = 0
    for i, level in enumerate(reversed(range(levels))):  # diffusers numbers up blocks from the middle out
        for j in range(cfg.num_res_blocks + 1):
            pairs.append((f"up.{n}.0", f"up_blocks.{i}.resnets.{j}", _RESBLOCK))
            if level in attn:
                pairs.append((f"up.{n}.1", f"up_blocks.{i}.attentions.{j}", _ATTENTION))
            n += 1
        if level > 0:
            pairs.append((f"up.{n}.conv", f"up_blocks.{i}.upsamplers.0.conv", None))
            n += 1
    return pairs + [("norm_out", "conv_norm_out", None), ("conv_out", "conv_out", None)]


def _names(cfg: UNetConfig, state: dict) -> dict[str, str]:
    """difflab weight name -> diffusers weight name for every weight in ``state`` but the class embedding."""
    names = {}
    for ours, theirs, inner in _module_pairs(cfg):
        for key in state:
            if not key.startswith(ours + "."):
                continue
            rest = key[len(ours) + 1 :]  # "weight", or "self_attn.to_q.weight" inside a renamed block
            if inner is not None:
                layer, param = rest.rsplit(".", 1)
                rest = f"{inner[layer]}.{param}"
            names[key] = f"{theirs}.{rest}"
    return names


def to_diffusers_weights(unet: UNet) -> dict[str, torch.Tensor]:
    """``UNet2DModel`` weights of a difflab UNet that maps (:func:`unet_refusal`)."""
    state = unet.state_dict()
    names = _names(unet.cfg, state)
    out = {names[k]: v for k, v in state.items() if k in names}
    for key in [k for k in out if k.endswith(".to_q.weight")]:  # diffusers' projections have biases: zeros
        for proj in _BIASLESS:
            out[key.replace("to_q.weight", f"{proj}.bias")] = torch.zeros(out[key].shape[0])
    if unet.class_embed is not None:
        with torch.no_grad():  # the table of every label's (summed) embedding, the null class last
            labels = torch.arange(unet.cfg.num_classes + 1)
            out["class_embedding.weight"] = unet.class_embed(labels)  # (num_classes + 1, 4C)
    unmapped = set(state) - set(names) - {k for k in state if k.startswith("class_embed.")}
    if unmapped:
        raise DifflabError(f"UNet weight '{sorted(unmapped)[0]}' has no place in UNet2DModel; expected none")
    return {k: v.detach().float().contiguous() for k, v in out.items()}


def from_diffusers_weights(unet: UNet, weights: dict[str, torch.Tensor], where: str) -> dict:
    """``unet``'s weights from ``UNet2DModel`` ``weights`` of the same config; an error when a query, key or
    value projection has a nonzero bias, which difflab's attention has no place for."""
    theirs = {v: k for k, v in _names(unet.cfg, unet.state_dict()).items()}
    state = {}
    for key, value in weights.items():
        if key.rsplit(".", 2)[-2] in _BIASLESS and key.endswith(".bias"):
            if value.abs().max() > 0:
                raise DifflabError(f"{where}: '{key}' is nonzero (max |b| {value.abs().max().item():.3g}); "
                                   f"difflab's attention projections have no bias, so only zero ones map")  # fmt: skip
        elif key == "class_embedding.weight":
            state["class_embed.tables.0.weight"] = value
        elif key in theirs:
            state[theirs[key]] = value
        else:
            raise DifflabError(f"{where}: weight '{key}' has no place in difflab's UNet")
    return state


# ------------------------------------------------------------------------------------------ scheduler

_SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {"variance_type": "fixed_small"}),
    "ddim": ("DDIMScheduler", {"set_alpha_to_one": True, "steps_offset": 0}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {
        "algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
        "final_sigmas_type": "zero", "lower_order_final": True, "use_karras_sigmas": False}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {
        "algorithm_type": "sde-dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
        "final_sigmas_type": "zero", "lower_order_final": True, "use_karras_sigmas": False}),
    "euler": ("EulerDiscreteScheduler", {
        "use_karras_sigmas": False, "final_sigmas_type": "zero", "interpolation_type": "linear"}),
    "heun": ("HeunDiscreteScheduler", {"use_karras_sigmas": False}),
}  # fmt: skip
"""Sampler -> the diffusers scheduler of the same algorithm, configured as tests/test_diffusion_vs_diffusers.py
checks it. sa_solver has none that steps alike (diffusers' SASolverScheduler ends on sigma_0): DDIM's is written."""
_CLIPS = ("DDPMScheduler", "DDIMScheduler", "HeunDiscreteScheduler")  # schedulers that take clip_sample
_RESCALES = ("DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler")
_BETA_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2", "scaled_linear": "scaled_linear",
                   "sigmoid": "sigmoid"}  # fmt: skip


def scheduler_config(diffusion: DiffusionConfig, sample: SampleConfig) -> dict:
    """The scheduler config of a run: its betas as ``trained_betas`` (exact, and the only way every
    scheduler gets a sigmoid or rescaled schedule), the schedule's name beside them for a reader, the
    prediction type, spacing and clipping, on the scheduler of the run's default sampler."""
    name, options = _SCHEDULERS.get(sample.sampler, _SCHEDULERS["ddim"])
    config = {
        "_class_name": name,
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": diffusion.timesteps,
        "beta_schedule": _BETA_SCHEDULES[diffusion.schedule],
        "trained_betas": diffusion.make_schedule().betas.tolist(),
        "prediction_type": diffusion.prediction,
        "timestep_spacing": sample.spacing,
        **options,
    }
    if name in _CLIPS:
        config["clip_sample"] = sample.clip_x0
    if name in _RESCALES:
        # The betas are already rescaled; diffusers' rescale leaves a zero-SNR schedule as it is, and with
        # the flag on, its Euler and DPM-Solver schedulers keep the last sigma finite (alpha_bar_T = 2^-24).
        config["rescale_betas_zero_snr"] = diffusion.rescale_zero_snr
    return config


# ------------------------------------------------------------------------------------ folders on disk


@dataclass(frozen=True)
class Exported:
    """What :func:`export_diffusers` wrote."""

    out: Path
    scheduler: str
    parameters: int
    classes: int | None
    """Classes of a class-conditional UNet (its table has one more row, the null class); None: unconditional."""


def refusal(run_dir: str | Path) -> str | None:
    """Why ``run_dir`` cannot be exported to diffusers exactly, or None when it can. Read from its
    config.json alone, before any weight is loaded."""
    family = family_of_run(run_dir)  # an unknown kind is an error naming the kinds there are
    if family.name == "pixel":
        why = unet_refusal(pixel.load_config(run_dir).unet)
        return why and f"the UNet of '{run_dir}' does not map onto UNet2DModel: {why}"
    reason = REFUSALS.get(family.name, lambda data: "export maps pixel diffusion runs only")
    return f"{family.what} does not map onto diffusers' classes: {reason(read_run_config(run_dir)[1])}"


def export_diffusers(run_dir: str | Path, out_dir: str | Path) -> Exported:
    """Write pixel diffusion run ``run_dir`` (its EMA weights) into ``out_dir`` as diffusers lays out a
    pipeline: ``unet/`` (config.json + diffusion_pytorch_model.safetensors), ``scheduler/`` and, for an
    unconditional UNet, ``model_index.json`` naming a DDIMPipeline. Atomic: the folder appears whole or not
    at all. Other kinds of run are refused with the reason (:func:`refusal`)."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DifflabError(f"'{out}' already exists and is not an empty folder; expected a new --out "
                           f"(export never overwrites)")  # fmt: skip
    why = refusal(run_dir)
    if why:
        raise DifflabError(why)
    system, cfg = pixel.load_model(run_dir)
    unet = system.network
    files = {
        "unet/config.json": unet2d_config(cfg.unet),
        f"unet/{WEIGHTS}": to_diffusers_weights(unet),
        "scheduler/scheduler_config.json": scheduler_config(cfg.diffusion, cfg.sample),
    }
    scheduler = files["scheduler/scheduler_config.json"]["_class_name"]
    if not cfg.unet.num_classes:  # diffusers' unconditional pipelines call unet(x, t): no class labels
        files["model_index.json"] = {
            "_class_name": "DDIMPipeline", "_diffusers_version": DIFFUSERS_VERSION,
            "unet": ["diffusers", UNET_CLASS], "scheduler": ["diffusers", scheduler],
        }  # fmt: skip
    _write_folder(out, files)
    return Exported(out, scheduler, sum(p.numel() for p in unet.parameters()), cfg.unet.num_classes)


def _write_folder(out: Path, files: dict[str, dict]) -> None:
    """Write ``files`` (relative path -> JSON object, or tensors for a .safetensors file) into a hidden
    temporary folder beside ``out``, then rename it onto ``out`` (absent or empty): a crash leaves either
    the whole export or none of it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{uuid.uuid4().hex[:8]}"
    try:
        for rel, content in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as part:  # fsynced before the folder is renamed into place
                if rel.endswith(".safetensors"):
                    save_file(content, str(part), metadata={"format": "pt"})
                else:
                    part.write_text(json.dumps(content, indent=2))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_diffusers_unet(folder: str | Path) -> UNet:
    """A diffusers ``UNet2DModel`` folder (config.json + diffusion_pytorch_model.safetensors, as
    ``save_pretrained`` writes it) as difflab's UNet, with equal outputs; an error naming the first setting
    or weight that does not map (:func:`unet_config_from_diffusers`, :func:`from_diffusers_weights`)."""
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise DifflabError(f"cannot read '{folder / 'config.json'}': {err}") from None
    if not isinstance(config, dict):
        raise DifflabError(
            f"'{folder / 'config.json'}' holds a JSON {type(config).__name__}, expected an object"
        )
    try:
        cfg = unet_config_from_diffusers(config, str(folder / "config.json"))
    except KeyError as err:
        raise DifflabError(
            f"'{folder / 'config.json'}' names no {err}; expected a UNet2DModel config"
        ) from None
    path = folder / WEIGHTS
    if not path.is_file():
        raise DifflabError(f"'{folder}' has no {WEIGHTS}; expected a folder written by save_pretrained")
    check_safetensors_header(path)  # a pickle or a truncated file fails here, before loading
    unet = UNet(cfg)
    state = from_diffusers_weights(unet, load_file(str(path)), str(path))
    check_compatible(unet, state, f"'{path}'")
    unet.load_state_dict(state)
    return unet.eval()
