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
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from difflab.data.captioned import CaptionedScenes
from difflab.data.text_scenes import TextDataConfig, captioned_scenes, captioner  # noqa: F401 (the t2i data API)
from difflab.errors import MAX_SIZE, DifflabError, check_choice, check_int, check_ints, check_optional_float
from difflab.models import planner, t2i_eval
from difflab.models.attention_supervision import (
    LAYER_CHOICES,
    TOKEN_WEIGHT,
    WithAttentionTargets,
    make_supervised_loss_fn,
)
from difflab.models.codecs import (
    POSTERIOR,
    Latents,
    Pixels,
    attach_autoencoder,
    cached_latents,
    check_vae_unchanged,
    load_latents,
)
from difflab.models.conditioners import GroundedPrompts, Layouts, TextPrompts
from difflab.models.family import Family, Preset
from difflab.models.layout import WithLayout
from difflab.models.recipe import DiffusionConfig, SampleConfig, check_cond_drop, check_sampling
from difflab.models.runs import checkpoint_id, load_latest_weights, load_run_config
from difflab.models.system import DiffusionSystem, TrainingParts, train_system
from difflab.models.system import generate as generate_system
from difflab.models.t2i_network import build_network, info_network, network_config
from difflab.models.text_encoder import FrozenTextEncoder, load_text_encoder, text_encoder_id
from difflab.nn.mmdit import MMDiTConfig
from difflab.nn.unet import UNetConfig
from difflab.train.config import TrainConfig
from difflab.train.device import is_main_process
from difflab.world.geneval import prompt_sets
from difflab.world.render import RENDERER_VERSION
from difflab.world.scene import world_preset

RECIPES = ("sd", "tokencompose", "mmdit", "layout")


@dataclass(frozen=True)
class TextToImageConfig:
    kind: str = "t2i"
    recipe: str = "sd"
    """Compared in docs/t2i.md. 'sd': Stable Diffusion's UNet with cross-attention to the caption;
    'tokencompose': the same, its phrase tokens' cross-attention supervised with the objects' masks
    (``attention_loss_weight``); 'mmdit': SD3's joint-attention transformer (``mmdit``) instead of the
    UNet; 'layout': LMD + GLIGEN, a planner lays the caption out as objects in boxes and the UNet also
    reads them as grounding tokens through gated self-attention (``planner``, ``unet.grounding_dim``)."""
    planner: str | None = None
    """Run directory of a trained layout planner (--set planner=RUN), for recipe 'layout'."""
    text_encoder: str | None = None
    """An exported text encoder ('difflab export-text-encoder') or a CLIP run: --set text_encoder=DIR."""
    vae: str | None = None
    """Run directory of a trained autoencoder (--set vae=RUN); None trains on pixels."""
    pixel_patch: int = 1
    """Without a vae: the pixels folded into p x p patches (a 32x32x3 image -> 16x16x12), the UNet running
    at 1/p of the image's side (:class:`~difflab.models.codecs.Pixels`)."""
    pixel_norm: bool = False
    """Without a vae: shift and scale the pixels to zero mean, unit variance (measured on 512 training
    images by :func:`resolve` into ``pixel_shift`` and ``pixel_scale``), as the latent scale does latents."""
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
    mmdit: MMDiTConfig = field(default_factory=MMDiTConfig)
    """The transformer of recipe 'mmdit' (its channels, side and text widths are set like the UNet's)."""
    attention_loss_weight: float = TOKEN_WEIGHT
    """Recipe 'tokencompose': lambda of L = L_LDM + lambda (L_token + beta/lambda L_pixel) (the paper's 1e-3)."""
    attention_loss_layers: str = "mid_up"
    """Recipe 'tokencompose': which cross-attention layers are supervised (the paper: middle and decoder)."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    cond_drop: float = 0.1
    """Probability of training on the empty prompt instead of the caption (for classifier-free guidance)."""
    posterior: str = "sample"
    """'sample': train on z ~ q(z|x), fresh each step (the paper); 'mode': on the posterior mean."""
    latent_scale: float | None = None
    pixel_shift: float | None = None
    pixel_scale: float | None = None
    vae_checkpoint: str | None = None
    text_encoder_checkpoint: str | None = None
    planner_checkpoint: str | None = None
    """What this run was trained with; checked when it is loaded (set by :func:`resolve`)."""

    def __post_init__(self) -> None:
        check_choice("text-to-image recipe", self.recipe, RECIPES)
        check_choice("supervised attention layers", self.attention_loss_layers, LAYER_CHOICES)
        if not (math.isfinite(self.attention_loss_weight) and self.attention_loss_weight >= 0):
            raise DifflabError(f"attention_loss_weight {self.attention_loss_weight} is invalid; expected a "
                               "finite number >= 0")  # fmt: skip
        check_cond_drop(self.cond_drop)
        check_choice("posterior", self.posterior, POSTERIOR)
        check_int("text_refiner_layers", self.text_refiner_layers, 0, MAX_SIZE)
        # -1 is the last layer; which others exist depends on the text encoder (check_layers, at resolve)
        check_ints("text_layers", self.text_layers, -1, MAX_SIZE, nonempty=True)
        check_optional_float("latent_scale", self.latent_scale, 0.0, lo_open=True)
        check_int("pixel_patch", self.pixel_patch, 1, 8)
        check_optional_float("pixel_shift", self.pixel_shift, -1.0, 1.0)
        check_optional_float("pixel_scale", self.pixel_scale, 0.0, lo_open=True)
        if self.vae is not None and (self.pixel_patch > 1 or self.pixel_norm):
            raise DifflabError(f"pixel_patch {self.pixel_patch} / pixel_norm {self.pixel_norm} are set with "
                               f"vae '{self.vae}'; expected them only on pixels (vae=None)")  # fmt: skip


# ----------------------------------------------------------------------------------------------- data


def training_set(cfg: TextToImageConfig, encoder: FrozenTextEncoder, autoencoder=None) -> CaptionedScenes:
    """The captioned training scenes: pixels, or (with a vae) the autoencoder's cached latents of them."""
    if cfg.vae is None:
        return captioned_scenes(cfg.data, encoder.tokenizer)
    return captioned_scenes(cfg.data, encoder.tokenizer, training_latents(cfg, autoencoder))


def training_latents(cfg: TextToImageConfig, autoencoder=None) -> dict:
    """The autoencoder's latents of every training scene, from its run's cache (encoded once, on first
    use: the demo does it beside the other trainings, before the painter starts)."""
    images = captioned_scenes(cfg.data)  # no tokenizer, no latents: items are {"image"}, what is encoded
    # the images are a function of the scenes alone (not of the captions): world, n, seed, held-out pairs
    d = cfg.data
    scenes = {"world": d.world, "n": d.n, "seed": d.seed, "heldout_pairs": list(d.heldout_pairs)}
    if d.min_objects is not None:  # only when set, so the latents cached before the option still match
        scenes["min_objects"] = d.min_objects
    key = {"data": scenes, "renderer": RENDERER_VERSION, "dataset": "t2i-captioned-scenes"}
    return cached_latents(cfg, images, key, autoencoder)


def training_items(cfg: TextToImageConfig, encoder: FrozenTextEncoder, autoencoder=None):
    """What the recipe trains on: the captioned scenes, with their layouts for recipe 'layout' and their
    phrases' attention targets (at the side of the UNet's largest attention layer) for 'tokencompose'."""
    data = training_set(cfg, encoder, autoencoder)
    if cfg.recipe == "layout":
        return WithLayout(data)
    if cfg.recipe == "tokencompose":
        return WithAttentionTargets(
            data, side=max(cfg.unet.attention_resolutions, default=cfg.unet.image_size)
        )
    return data


# ----------------------------------------------------------------------------------------- resolution


def resolve(cfg: TextToImageConfig, *, attach: bool = True) -> TextToImageConfig:
    """The run record of a request. The UNet's channels and side follow the pixels (no vae); with
    ``attach``, the text encoder (absolute path, id, and the UNet's ``context_dim`` and ``pooled_dim``)
    and the autoencoder (path, id, latent scale and shape) are read; the sampling defaults are checked
    against the schedule. ``attach=False`` keeps the preset's widths and latent shape (``difflab info``)."""
    if cfg.vae is None:  # pixels: the UNet's channels and side follow the data and the patch
        p = cfg.pixel_patch
        if cfg.data.image_size % p:
            raise DifflabError(f"pixel_patch {p} does not divide the {cfg.data.image_size}px images; expected "
                               "a divisor of the image side")  # fmt: skip
        unet = dataclasses.replace(cfg.unet, in_channels=3 * p * p, out_channels=3 * p * p,
                                   image_size=cfg.data.image_size // p)  # fmt: skip
        cfg = dataclasses.replace(cfg, unet=unet)
        if cfg.pixel_norm and cfg.pixel_scale is None:
            cfg = dataclasses.replace(cfg, **pixel_stats(cfg.data))
    if cfg.recipe == "layout" and cfg.unet.grounding_dim is None:
        cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, grounding_dim=GROUNDING_DIM))
    if cfg.recipe != "layout" and cfg.unet.grounding_dim is not None:
        raise DifflabError(f"unet.grounding_dim {cfg.unet.grounding_dim} is set but recipe '{cfg.recipe}' has no "
                           "layouts; expected recipe 'layout' or unet.grounding_dim=None")  # fmt: skip
    if attach:
        cfg = _attach_text_encoder(cfg)
        if cfg.vae is not None:
            cfg = attach_autoencoder(cfg, "toy", cfg.data.world, cfg.data.image_size)
        if cfg.recipe == "layout":
            cfg = _attach_planner(cfg)
    if cfg.recipe == "mmdit":  # the transformer takes the UNet's place, at its shapes
        u = cfg.unet
        cfg = dataclasses.replace(cfg, mmdit=dataclasses.replace(
            cfg.mmdit, in_channels=u.in_channels, out_channels=u.out_channels, image_size=u.image_size,
            context_dim=u.context_dim or cfg.mmdit.context_dim, pooled_dim=u.pooled_dim))  # fmt: skip
    check_sampling(cfg)
    return cfg


GROUNDING_DIM = 64
"""Width of the grounding tokens when a layout recipe leaves ``unet.grounding_dim`` unset."""


def _attach_planner(cfg: TextToImageConfig) -> TextToImageConfig:
    if cfg.planner is None:
        raise DifflabError("recipe 'layout' needs a layout planner: --set planner=RUN (train one with "
                           "'difflab train --preset planner_demo')")  # fmt: skip
    return planner.attach_planner(cfg, cfg.planner)


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
    planner.check_unchanged(cfg, what)


# ---------------------------------------------------------------------------------------------- system


def conditioner(cfg: TextToImageConfig, encoder: FrozenTextEncoder, layout_planner=None) -> TextPrompts:
    """The captions (recipe 'sd'), or the captions and their layouts (recipe 'layout'), planned by
    ``layout_planner`` (a loaded :class:`~difflab.models.planner.LayoutPlanner`) at sampling time."""
    pooled = bool(cfg.unet.pooled_dim)
    if cfg.recipe != "layout":
        return TextPrompts(encoder, cfg.cond_drop, pooled=pooled)
    plan = None
    if layout_planner is not None:
        tokenizer = planner.make_tokenizer(layout_planner.cfg)

        def plan(prompts: list[str], seed: int) -> list:
            return planner.plan(layout_planner, tokenizer, prompts, seed=seed)

    return GroundedPrompts(encoder, cfg.cond_drop, pooled, world_preset(cfg.data.world), plan)


def codec(cfg: TextToImageConfig) -> Pixels | Latents:
    """Pixels (in patches, normalised, as configured), or (with a vae) the autoencoder's latents at the
    record's scale."""
    if cfg.vae is not None:
        return load_latents(cfg)
    return Pixels(cfg.pixel_patch, cfg.pixel_shift or 0.0, cfg.pixel_scale or 1.0)


PIXEL_STATS_N = 512
"""Training images whose pixels give ``pixel_shift`` and ``pixel_scale``."""


def pixel_stats(data: TextDataConfig) -> dict[str, float]:
    """The mean and 1 / std of the first PIXEL_STATS_N training images' pixels (all channels)."""
    images = captioned_scenes(data)
    x = torch.stack([images[i]["image"] for i in range(min(PIXEL_STATS_N, len(images)))])
    return {"pixel_shift": round(x.mean().item(), 6), "pixel_scale": round(1 / x.std().item(), 6)}


def load_config(run_dir: str | Path) -> TextToImageConfig:
    return load_run_config(run_dir, TextToImageConfig, "t2i", "a text-to-image (t2i) run")


def load_model(
    run_dir: str | Path, *, ema: bool = True, device: str = "cpu", temperature: float | None = None
) -> tuple[DiffusionSystem, TextToImageConfig]:
    """The trained network (EMA weights by default) between its frozen text encoder and its codec
    (pixels, or the autoencoder's latents), and the config; ``temperature``: the planner's sampling
    temperature instead of its config's (recipe 'layout')."""
    cfg = load_config(run_dir)
    if temperature is not None and cfg.recipe != "layout":  # refused before anything is loaded
        raise DifflabError(
            f"--temperature is the layout planner's; '{run_dir}' is a '{cfg.recipe}' run, which has none"
        )
    check_inputs_unchanged(cfg, f"'{run_dir}' was trained on it; retrain the text-to-image model")
    network = load_latest_weights(run_dir, build_network(cfg), ema=ema)
    encoder = load_text_encoder(cfg.text_encoder, layers=cfg.text_layers)
    layout_planner = (
        planner.load_model(cfg.planner, temperature=temperature)[0] if cfg.recipe == "layout" else None
    )
    system = DiffusionSystem(network, conditioner(cfg, encoder, layout_planner), codec(cfg))
    return system.to(device).eval(), cfg


def load_base(run_dir: str | Path, recorded: str | None, what: str) -> tuple[DiffusionSystem, TextToImageConfig]:
    """:func:`load_model` of the base run another run is built on (a ControlNet's, an adapter's), after checking
    it is still the checkpoint ``recorded`` when that run was trained (``what`` names the run in the error)."""
    now = checkpoint_id(run_dir, "text-to-image run")
    if now != recorded:
        raise DifflabError(f"base '{run_dir}' has changed since this {what} was trained on it ({recorded}, now "
                           f"{now}); retrain the {what}")  # fmt: skip
    return load_model(run_dir)


def generate(
    model: DiffusionSystem, cfg: TextToImageConfig, prompts: list[str] | Layouts, **kwargs
) -> torch.Tensor:
    """One image (N, C, H, W) in [-1, 1] per prompt; for recipe 'layout', prompts are planned with the
    sampling seed, or given with their layouts (:class:`~difflab.models.conditioners.Layouts`). Keyword
    arguments as :func:`difflab.models.system.generate` (``attention`` records cross-attention maps; sampler,
    steps, cfg_scale, spacing, seed, progress, callback)."""
    n = len(prompts.prompts) if isinstance(prompts, Layouts) else len(prompts)
    return generate_system(model, cfg, n, prompts, **kwargs)


def grid_prompts(world: str, n: int) -> list[str]:
    """``n`` fixed prompts for sample grids: the evaluation prompt sets' categories in turn."""
    return [p.text() for p in grid_prompt_set(world, n)]


def grid_prompt_set(world: str, n: int) -> list:
    """The :class:`~difflab.world.prompts.Prompt` of each of :func:`grid_prompts`' texts (to judge them)."""
    lists = list(prompt_sets(world).values())
    return [lists[i % len(lists)][i // len(lists)] for i in range(n)]


def train(cfg: TextToImageConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train text-to-image diffusion into ``run_dir`` (config.json, checkpoints/, metrics.jsonl,
    samples/step_*.png, samples.png with its prompts in prompts.txt, trajectory.png)."""
    cfg = resolve(cfg)

    def parts(run_dir: Path) -> TrainingParts:
        encoder = load_text_encoder(cfg.text_encoder, layers=cfg.text_layers)
        space = codec(cfg)
        data = training_items(cfg, encoder, None if cfg.vae is None else space.autoencoder)
        prompts = grid_prompts(cfg.data.world, cfg.sample.grid)
        if is_main_process():
            (run_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
        layout_planner = planner.load_model(cfg.planner)[0] if cfg.recipe == "layout" else None
        cond = conditioner(cfg, encoder, layout_planner)
        return TrainingParts(cond, space, data, grid_request=prompts, loss_fn=loss_fn(cfg))

    return train_system(cfg, run_dir, resume=resume, load_config=load_config,
                        inputs=("text_encoder_checkpoint", "vae_checkpoint"), parts=parts,
                        network=lambda: build_network(cfg), model_config=network_config(cfg))  # fmt: skip


def loss_fn(cfg: TextToImageConfig):
    """The training loss of a recipe: the shared diffusion loss (None), or for 'tokencompose' that loss plus
    the weighted grounding loss on the supervised layers' cross-attention (Wang et al. 2024, Sec. 3)."""
    if cfg.recipe != "tokencompose":
        return None

    def make(run_cfg, schedule, cond, space):
        return make_supervised_loss_fn(run_cfg, schedule, cond, space, cfg.attention_loss_weight,
                                       cfg.attention_loss_layers)  # fmt: skip

    return make


def evaluate(run_dir: str | Path, n: int, *, seed: int = 0, sampler=None, steps=None, cfg_scale=None,
             progress: bool = False, prompt_seed: int | None = None,
             temperature: float | None = None) -> dict:  # fmt: skip
    """GenEval-style faithfulness of the first ``n`` prompts of every category (:mod:`t2i_eval`);
    ``temperature``: the planner's, for recipe 'layout'."""
    model, cfg = load_model(run_dir, temperature=temperature)
    report = t2i_eval.evaluate(model, cfg, run_dir, n, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                               seed=seed, progress=progress, prompt_seed=prompt_seed)  # fmt: skip
    if cfg.recipe == "layout":
        used = planner.load_config(cfg.planner).temperature if temperature is None else temperature
        report["planner_temperature"] = used
    return report


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
    Preset(
        "t2i_tokencompose_tiny",
        "t2i",
        "t2i_tiny with TokenCompose's attention supervision (--set text_encoder=DIR of a clip_tiny run): seconds "
        "(tests)",
        lambda: dataclasses.replace(get_preset_config("t2i_tiny"), recipe="tokencompose",
                                    attention_loss_weight=0.01, attention_loss_layers="mid"),
    ),
    Preset(
        "t2i_mmdit_tiny",
        "t2i",
        "t2i_tiny's data with a small MMDiT in place of the UNet (--set text_encoder=DIR of a clip_tiny run): "
        "seconds (tests)",
        lambda: dataclasses.replace(get_preset_config("t2i_tiny"), recipe="mmdit",
                                    mmdit=MMDiTConfig(patch_size=2, width=48, depth=2, heads=2)),
    ),
    Preset(
        "t2i_tokencompose_demo",
        "t2i",
        "t2i_demo with TokenCompose's attention supervision: each phrase's cross-attention is sent to its object's "
        "mask (--set vae=RUN --set text_encoder=DIR)",
        lambda: dataclasses.replace(get_preset_config("t2i_demo"), recipe="tokencompose"),
    ),
    Preset(
        "t2i_mmdit_demo",
        "t2i",
        "t2i_demo's data and training with SD3's joint-attention transformer (MMDiT) in place of the UNet "
        "(--set vae=RUN --set text_encoder=DIR)",
        lambda: dataclasses.replace(get_preset_config("t2i_demo"), recipe="mmdit", text_refiner_layers=0,
                                    mmdit=MMDiTConfig(patch_size=2, width=96, depth=4, heads=4)),
    ),
    Preset(
        "t2i_layout_tiny",
        "t2i",
        "layout-grounded text-to-image (LMD + GLIGEN) on the tiny world in pixels (--set text_encoder=DIR of a "
        "clip_tiny run, --set planner=RUN of a planner_tiny run with data.world=tiny): seconds (tests)",
        lambda: _layout(get_preset_config("t2i_tiny")),
    ),
    Preset(
        "t2i_layout_demo",
        "t2i",
        "layout-grounded text-to-image (LMD + GLIGEN): t2i_demo's UNet reading the "
        "planned objects as grounding tokens and as a map of its boxes (--set vae=RUN --set text_encoder=DIR "
        "--set planner=RUN; 'difflab demo' trains all four)",
        lambda: _layout(get_preset_config("t2i_demo")),
    ),
)  # fmt: skip


def _layout(cfg: TextToImageConfig) -> TextToImageConfig:
    """A preset's layout recipe: grounding trained with the UNet from scratch, so the gates start open
    (gamma = 1: at 0 the gated layers get no gradient and stayed closed, docs/t2i.md), each pixel reads
    only the objects whose box it overlaps, and the boxes are also painted in at full resolution, each
    pixel knowing where in its box it sits (the grounding map: 0.79 -> 0.87 overall at 2,000 steps; its
    coordinates 0.93 -> 0.97 on one seed, docs/t2i.md). The text refiner stays: without it colours and
    binding fell (binding 0.78-0.82 against 0.86-0.98), for a step 10 % cheaper."""
    unet = dataclasses.replace(cfg.unet, grounding_dim=GROUNDING_DIM, grounding_gate=1.0,
                               grounding_box_attention=True, grounding_map=True,
                               grounding_map_coords=True)  # fmt: skip
    sample = dataclasses.replace(
        cfg.sample, cfg_scale=5.0
    )  # it followed its layouts better than at 3 (docs/t2i.md)
    return dataclasses.replace(cfg, recipe="layout", unet=unet, sample=sample)


def get_preset_config(name: str) -> TextToImageConfig:
    """The config of one of this module's presets."""
    return next(p.build() for p in PRESETS if p.name == name)


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
    eval_options=("sampler", "steps", "cfg_scale", "progress", "prompt_seed", "temperature"),
    parents=("text_encoder",),
    draws="prompts",
)
