"""InstructPix2Pix (Brooks, Holynski & Efros 2023): a trained text-to-image run fine-tuned into an editor that
follows written instructions ('make the circle blue', 'move the square to the left').

    input image --codec--> c_I (c, h, w) --+
    noise z_t (c, h, w) -------------------+--concat--> UNet with 2c input channels --> v-prediction
    instruction --the base's frozen text encoder--> c_T ----- cross-attention ----^

The network is the base's, whole, with its first convolution widened to take the input image's latents
beside the noisy ones; the new input channels start at zero (Sec. 3.2.1), so before any step the editor is
the base model exactly. Every weight then trains on the world's edit pairs (:mod:`difflab.world.edits`:
recolour, move, remove, add): input = a scene of the base's training set, target = the scene with the
edit carried out, instruction = the edit's text. Instead of the paper's GPT-3 + Prompt-to-Prompt dataset
(Sec. 3.1), the world renders both sides exactly, so the targets are true edits.

5 % of the steps drop the instruction, 5 % the image and 5 % both, so that one network learns the three
predictions that two-scale guidance mixes (Eq. 3, :func:`difflab.diffusion.guidance.instruct_guidance`):
``image_scale`` s_I trades faithfulness to the input against edit strength, ``sample.cfg_scale`` s_T is
the instruction's weight. A layout base (the demo's) is fine-tuned without its grounding tokens: the
input image shows where things are. Judged exactly by the reader: :mod:`difflab.models.instruct_eval`.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from difflab.data.text_scenes import TextDataConfig, captioned_scenes
from difflab.data.toy import scene_image
from difflab.diffusion.guidance import instruct_guidance
from difflab.diffusion.objectives import LOSS_WEIGHTINGS
from difflab.errors import DifflabError, check_choice, check_float
from difflab.models import instruct_eval, t2i
from difflab.models.codecs import cached_latents
from difflab.models.conditioners import InstructedPrompts, Instructions, TextPrompts
from difflab.models.family import Family, Preset
from difflab.models.instruct_network import InstructNet
from difflab.models.recipe import (
    GUIDANCE_RANGE,
    DiffusionConfig,
    SampleConfig,
    check_sampling,
    make_loss_fn,
    power_timesteps,
    run_sampler,
)
from difflab.models.runs import checkpoint_id, load_latest_weights, load_run_config
from difflab.models.system import DiffusionSystem, ImageNoise, TrainingParts, train_system
from difflab.models.t2i_network import build_network
from difflab.models.text_encoder import load_text_encoder
from difflab.nn.unet import UNetConfig, example_inputs
from difflab.train.config import TrainConfig
from difflab.train.metrics import log_curve_point
from difflab.world.edits import Edit, edit_at
from difflab.world.render import RENDERER_VERSION
from difflab.world.scene import Scene


@dataclass(frozen=True)
class InstructConfig:
    kind: str = "instruct"
    base: str | None = None
    """Run directory of the trained text-to-image model to fine-tune (--set base=RUN)."""
    drops: tuple[float, float, float] = (0.05, 0.05, 0.05)
    """Probabilities of training without the instruction, without the image, and without both (Sec. 3.2.1)."""
    image_scale: float = 1.5
    """Sampling default of s_I, the input image's guidance weight (the paper's 1.5; s_T is
    ``sample.cfg_scale``)."""
    edit_seed: int = 0
    """The seed of the training edits: scene i of the base's training set gets edit (edit_seed, i)."""
    added_attention: tuple[int, ...] = ()
    """Sides of the base's feature maps (e.g. 16: the latent's full size) where the editor adds attention
    layers the base lacks, self-attention and cross-attention to the instruction, zero at the start
    (:func:`add_attention`). An edit's failures are bindings, the instruction's noun meeting the wrong
    object (docs/editing.md); at 16x16 a word can meet an object's own pixels."""
    attention_positions: bool = False
    """True: a learned position embedding, zero at the start, in each of the editor's attention layers
    (:func:`add_positions`): a move carries an object one cell over, which attention without positions
    cannot aim."""
    global_text: bool = True
    """False: the instruction reaches the editor through cross-attention alone. The base adds the whole
    sentence to every residual block's embedding as well (the pooled embedding, SDXL's, and the mean of the
    token features, Imagen's): one vector for all pixels, which can say 'blue' but not which object."""
    timestep_power: float = 1.0
    """Training noise levels t/T = u^(1/p) (:func:`difflab.models.recipe.power_timesteps`): 1 is uniform, as
    the paper; larger p trains the noisy levels more (instruct_demo: 3). Where x_t still shows the target the
    editor only denoises, which the base already does; which object changes, and how, is decided at high
    noise."""
    loss_weighting: str | None = "uniform"
    """The loss weighting over noise levels (:mod:`difflab.diffusion.objectives`); None: the base's. The input
    image matters most at high noise, where min-SNR's weight on a v-loss, SNR / (SNR + 1), goes to zero: on
    the demo's run the editor had not learned to read the image after 1,000 steps under it (docs/editing.md)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The base's scenes, UNet and diffusion process, copied by :func:`resolve`."""
    base_checkpoint: str | None = None
    """The base run's checkpoint this editor started from."""

    def __post_init__(self) -> None:
        if len(self.drops) != 3 or sum(self.drops) >= 1 or any(not 0 <= p < 1 for p in self.drops):
            raise DifflabError(f"drops {self.drops} is invalid; expected three probabilities (instruction, image, "
                               "both) that sum to less than 1")  # fmt: skip
        check_float("image_scale", self.image_scale, *GUIDANCE_RANGE)
        check_float("timestep_power", self.timestep_power, 0.0, lo_open=True)
        if self.loss_weighting is not None:
            check_choice("loss weighting", self.loss_weighting, LOSS_WEIGHTINGS)


def resolve(cfg: InstructConfig, *, attach: bool = True) -> InstructConfig:
    """The run record: the base run's path, checkpoint, scenes, UNet and diffusion process."""
    if attach:
        if cfg.base is None:
            raise DifflabError("InstructPix2Pix fine-tunes a trained text-to-image run: --set base=RUN (train one "
                               "with 'difflab demo' or 'difflab train --preset t2i_demo')")  # fmt: skip
        path = Path(cfg.base).expanduser().resolve()
        base = t2i.load_config(path)
        if base.recipe == "mmdit":
            raise DifflabError(
                f"base '{path}' is an MMDiT; InstructPix2Pix widens a UNet's first convolution"
            )
        diffusion = base.diffusion
        if cfg.loss_weighting is not None:
            diffusion = dataclasses.replace(diffusion, loss_weighting=cfg.loss_weighting)
        cfg = dataclasses.replace(cfg, base=str(path), unet=base.unet, diffusion=diffusion, data=base.data,
                                  base_checkpoint=checkpoint_id(path, "text-to-image run"))  # fmt: skip
    check_sampling(cfg)
    return cfg


def load_config(run_dir: str | Path) -> InstructConfig:
    return load_run_config(run_dir, InstructConfig, "instruct", "an InstructPix2Pix (instruct) run")


# -------------------------------------------------------------------------------------------- network


def build_editor(cfg: InstructConfig, base_cfg) -> InstructNet:
    """The editor's architecture: the base's network, widened (weights as a fresh base's until loaded)."""
    return InstructNet(build_network(base_cfg), cfg.unet.in_channels, cfg.added_attention,
                       global_text=cfg.global_text, positions=cfg.attention_positions)  # fmt: skip


# ----------------------------------------------------------------------------------------------- data


class EditPairs(Dataset):
    """Edit pair i: scene i of the base's training set (``source``: its cached posterior mean, or pixels), its
    edit's instruction (``ids``, ``mask``) and the edited scene (``mean`` and ``std`` of its latents, or
    ``image``: what the codec's ``training_input`` reads). Without a tokenizer, items are the edited
    scene's ``{"image"}``, what is encoded once into the cache."""

    def __init__(self, data: TextDataConfig, edit_seed: int, tokenizer=None, source=None, target=None):
        self.scenes = captioned_scenes(data, latents=source)  # {"image"} or {"mean", "std"} of scene i
        self.world, self.seed, self.heldout = self.scenes.world, edit_seed, data.pairs()
        self.tokenizer, self.target = (
            tokenizer,
            target and {k: torch.from_numpy(v) for k, v in target.items()},
        )

    def __len__(self) -> int:
        return len(self.scenes)

    def edit(self, i: int) -> tuple[Edit, Scene]:
        return edit_at(self.scenes.scene(i), self.world, self.seed, i, self.heldout)

    def __getitem__(self, i: int) -> dict:
        edit, after = self.edit(i)
        if self.tokenizer is None:
            return {"image": scene_image(after, self.world)}
        before = self.scenes[i]
        ids, mask = self.tokenizer.encode(edit.text())
        item = {"source": before.get("mean", before.get("image")), "ids": ids[0], "mask": mask[0]}
        if self.target is None:
            return item | {"image": scene_image(after, self.world)}
        return item | {k: v[i] for k, v in self.target.items()}


def training_pairs(cfg: InstructConfig, base_cfg, tokenizer, autoencoder=None) -> EditPairs:
    """The edit pairs, with the autoencoder's latents of both sides for a latent base: the inputs' from the
    base's own cache, the edited scenes' encoded once into the autoencoder run's cache."""
    if base_cfg.vae is None:
        return EditPairs(cfg.data, cfg.edit_seed, tokenizer)
    source = t2i.training_latents(base_cfg, autoencoder)
    d = cfg.data
    key = {"data": {"world": d.world, "n": d.n, "seed": d.seed, "heldout_pairs": list(d.heldout_pairs),
                    "min_objects": d.min_objects, "edit_seed": cfg.edit_seed},
           "renderer": RENDERER_VERSION, "dataset": "instruct-edited-scenes"}  # fmt: skip
    target = cached_latents(base_cfg, EditPairs(d, cfg.edit_seed), key, autoencoder)
    return EditPairs(d, cfg.edit_seed, tokenizer, source, target)


# ----------------------------------------------------------------------------------------- the system


def _base_parts(cfg: InstructConfig, base_cfg):
    """The base's frozen text encoder, as plain text (no planner: an instruction is not a caption), and
    its codec."""
    t2i.check_inputs_unchanged(base_cfg, f"the base '{cfg.base}' was trained on it")
    encoder = load_text_encoder(base_cfg.text_encoder, layers=base_cfg.text_layers)
    return encoder, t2i.codec(base_cfg)


def conditioner(cfg: InstructConfig, encoder, codec) -> InstructedPrompts:
    """The instruction as the base reads a caption (its own dropout is this run's), and the input image."""
    text = TextPrompts(encoder, 0.0, pooled=bool(cfg.unet.pooled_dim))
    shape = (cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size)
    return InstructedPrompts(text, codec, shape, cfg.drops)


def train(cfg: InstructConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Fine-tune the base into an editor in ``run_dir`` (config.json, checkpoints/, metrics.jsonl,
    samples/step_*.png and samples.png: the grid's edits; pairs.png: input | edit | reader's verdict;
    edits.jsonl: the grid's held-out edits judged at every grid, the learning curve)."""
    cfg = resolve(cfg)
    base_cfg = t2i.load_config(cfg.base)
    world = cfg.data.world_config()
    cases = instruct_eval.edit_cases(world, cfg.sample.grid, heldout=cfg.data.pairs())
    base_parts = functools.cache(lambda: _base_parts(cfg, base_cfg))  # the parts and the network share them

    def parts(run_dir: Path) -> TrainingParts:
        encoder, codec = base_parts()
        data = training_pairs(cfg, base_cfg, encoder.tokenizer, getattr(codec, "autoencoder", None))

        def on_grid(images: torch.Tensor, step: int, run_dir: Path) -> None:
            verdicts = instruct_eval.judge_all(cases, images, world)
            log_curve_point(run_dir / "edits.jsonl", step, instruct_eval.summarise(cases, verdicts)["all"])
            if step >= cfg.train.steps:
                instruct_eval.save_examples(
                    cases[:8], images[:8].cpu(), verdicts[:8], world, run_dir / "pairs.png"
                )

        def draw(system: DiffusionSystem, request: Instructions, callback) -> torch.Tensor:
            return edit(system, cfg, request, seed=0, callback=callback)

        # p = 1 keeps the recipe's own uniform draw, so a run of the paper's recipe trains as it always did
        timesteps = None if cfg.timestep_power == 1 else power_timesteps(cfg.timestep_power)
        return TrainingParts(conditioner(cfg, encoder, codec), codec, data, on_grid=on_grid, draw=draw,
                             grid_request=instruct_eval.request(cases, world),
                             loss_fn=functools.partial(make_loss_fn, timesteps=timesteps))  # fmt: skip

    def network() -> InstructNet:
        base = load_latest_weights(cfg.base, build_network(base_cfg), ema=True)
        null_text = None if cfg.global_text else base_parts()[0]([""])
        return InstructNet(base, cfg.unet.in_channels, cfg.added_attention, global_text=cfg.global_text,
                           null_text=null_text, positions=cfg.attention_positions)  # fmt: skip

    return train_system(cfg, run_dir, resume=resume, load_config=load_config, inputs=("base_checkpoint",),
                        parts=parts, network=network, model_config=_network_record(cfg))  # fmt: skip


def _network_record(cfg: InstructConfig) -> dict:
    record = {"instruct_of": dataclasses.asdict(cfg.unet), "image_channels": cfg.unet.in_channels}
    record |= {"added_attention": list(cfg.added_attention)} if cfg.added_attention else {}
    record |= {"attention_positions": True} if cfg.attention_positions else {}
    return record | ({} if cfg.global_text else {"global_text": False})


def load_model(
    run_dir: str | Path, *, ema: bool = True, device: str = "cpu"
) -> tuple[DiffusionSystem, InstructConfig]:
    """The editor (EMA weights by default) between the base's text encoder and codec, and the config."""
    cfg = load_config(run_dir)
    base_cfg = t2i.load_config(cfg.base)
    encoder, codec = _base_parts(cfg, base_cfg)
    network = load_latest_weights(run_dir, build_editor(cfg, base_cfg), ema=ema)
    system = DiffusionSystem(network, conditioner(cfg, encoder, codec), codec)
    return system.to(device).eval(), cfg


@torch.no_grad()
def edit(system: DiffusionSystem, cfg: InstructConfig, request: Instructions, *, image_scale: float | None = None,
         text_scale: float | None = None, seed: int = 0, batch_size: int = 64, progress: bool = False,
         callback=None, **sampling) -> torch.Tensor:  # fmt: skip
    """The edited images (N, C, H, W) in [-1, 1] of a request, sampled from noise with two-scale guidance
    (Eq. 3) at s_I = ``image_scale`` and s_T = ``text_scale`` (defaults: the run's). ``sampling``: sampler,
    steps, spacing; ``callback`` sees the first batch. Image i's noise comes from its own generator seeded
    from (seed, i), so it is the same image in any batch."""
    s_i = (
        cfg.image_scale
        if image_scale is None
        else check_float("image guidance", image_scale, *GUIDANCE_RANGE)
    )
    s_t = (
        cfg.sample.cfg_scale
        if text_scale is None
        else check_float("text guidance", text_scale, *GUIDANCE_RANGE)
    )
    device = next(system.network.parameters()).device
    null_image = system.conditioner.null_image(device)
    out = []
    starts = range(0, len(request), batch_size)
    for start in tqdm(
        starts, desc="editing", unit="batch", disable=not progress or len(starts) == 1, leave=False
    ):
        part = request[start : start + batch_size]
        cond, null_text = system.conditioner.condition(part, len(part), device, seed=seed)
        text_null = {k: v for k, v in null_text.items() if k != "edit_image"}
        guided = functools.partial(instruct_guidance, text_scale=s_t, image_scale=s_i, null_text=text_null,
                                   null_image=null_image)  # fmt: skip
        x = run_sampler(system.network, cfg, len(part), cond, None, cfg_scale=1.0, seed=seed,
                        noise=ImageNoise(seed, range(start, start + len(part))), wrap=guided,
                        callback=system.codec.preview(callback) if start == 0 else None, **sampling)  # fmt: skip
        out.append(system.codec.decode(x))
    return torch.cat(out)


def evaluate(run_dir: str | Path, n: int, *, seed: int = 0, sampler=None, steps=None, cfg_scale=None,
             progress: bool = False) -> dict:  # fmt: skip
    """Edit success and preservation of ``n`` held-out edits, per kind, beside the naive baseline
    (``difflab eval``; ``difflab edit --eval`` sets s_I too)."""
    system, cfg = load_model(run_dir)
    return evaluate_editor(system, cfg, n, seed=seed, sampler=sampler, steps=steps, text_scale=cfg_scale,
                           progress=progress)  # fmt: skip


def evaluate_editor(system: DiffusionSystem, cfg: InstructConfig, n: int, *, seed: int = 0,
                    case_seed: int = instruct_eval.EVAL_SEED, baseline: bool = True, p2p: bool = False,
                    progress: bool = False, **editing) -> dict:  # fmt: skip
    """:func:`difflab.models.instruct_eval.evaluate` of a loaded editor; ``editing``: image_scale, text_scale,
    sampler, steps (None: the run's)."""

    def editor(request: Instructions, seed: int) -> torch.Tensor:
        return edit(system, cfg, request, seed=seed, progress=progress, **editing)

    device = str(next(system.network.parameters()).device)
    return instruct_eval.evaluate(editor, cfg, n, seed=seed, case_seed=case_seed, baseline=baseline, p2p=p2p,
                                  device=device, progress=progress, **editing)  # fmt: skip


def info_network(cfg: InstructConfig):
    """The editor with example inputs (``difflab info``): the base's, and an input image's latents."""
    base_cfg = t2i.load_config(cfg.base) if cfg.base else t2i.TextToImageConfig(unet=cfg.unet)
    b = cfg.train.batch_size
    inputs = example_inputs(cfg.unet, b)
    return build_editor(cfg, base_cfg), inputs | {"edit_image": torch.randn_like(inputs["x"])}, None


# -------------------------------------------------------------------------------------------- presets


def _preset(steps: int, tiny: bool) -> InstructConfig:
    """instruct_demo: 18,000 steps at the base's learning rate, training levels drawn towards noise (p = 3) and
    the instruction through cross-attention alone. Held-out success / preservation on the demo's run
    (n = 200, case sets 5 and 91): 0.61-0.65 / 0.80-0.86 at 3,000 steps, 0.80-0.81 / 0.94-0.95 at 6,000,
    0.89-0.91 / 0.94-0.96 at 12,000, 0.92 / 0.95-0.96 at 18,000, where the paper's recipe (p = 1, sentence
    paths kept) was at 0.26-0.30 / 0.58-0.60 and 0.45-0.49 / 0.66-0.74 after 3,000 and 6,000 (docs/editing.md).
    instruct_tiny keeps the paper's recipe: in pixels on the tiny world p = 3 blurred the background."""
    if tiny:
        return InstructConfig(
            train=TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.99, log_every=10,
                              checkpoint_every=None, progress=False),
            sample=SampleConfig(steps=10, grid=16, cfg_scale=3.0),
        )  # fmt: skip
    return InstructConfig(
        global_text=False, timestep_power=3.0,
        train=TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.995, log_every=25,
                          checkpoint_every=250, sample_every=500),
        sample=SampleConfig(sampler="dpmpp_2m", steps=20, cfg_scale=3.0, grid=32),
    )  # fmt: skip


PRESETS = (
    Preset("instruct_tiny", "instruct", "InstructPix2Pix from a t2i_tiny run (--set base=RUN): seconds (tests)",
           lambda: _preset(150, True)),
    Preset("instruct_demo", "instruct", "InstructPix2Pix from a text-to-image run (--set base=RUN of the demo's "
           "run/ or a t2i_* run): recolour, move, remove and add; about 80 minutes on one CPU thread",
           lambda: _preset(18_000, False)),
)  # fmt: skip

FAMILY = Family(
    name="instruct",
    what="an InstructPix2Pix (instruct) run",
    config=InstructConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="samples.png (the grid's edits), pairs.png (input | edit | verdict), edits.jsonl",
    eval_n=200,
    eval_options=("sampler", "steps", "cfg_scale", "progress"),
    parents=("base",),
    draws=None,
)
