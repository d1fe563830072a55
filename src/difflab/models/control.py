"""ControlNet runs (Zhang, Rao & Agrawala 2023): a trained text-to-image run, frozen, steered by a spatial
condition drawn from the toy world: its objects' edges, depth or masks.

    scene --render--> condition image c (1, S, S) in [0, 1] --hint encoder--+
    latents z_t ----> ControlNet copy of the base's encoder + middle (trainable) --zero 1x1 convs--> residuals
    latents z_t ----> frozen base UNet (+ residuals on its skips and middle) --> v-prediction

Only the ControlNet trains and only it is saved (the run names its base, whose checkpoint it checks when
loaded, as a text-to-image run checks its text encoder); the base's data, latents, text encoder and loss
are reused as they are, with the caption dropped for half of the steps (Sec. 3.3) so the copy learns to
read the image alone. The sample grids pair each condition with its sample, and at every grid the
condition fidelity of the grid's held-out scenes is appended to ``fidelity.jsonl``: the learning curve
on which the paper's "sudden convergence" (Sec. 4.2, Fig. 4) is looked for (docs/control.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from difflab.data.images import read_square
from difflab.data.text_scenes import TextDataConfig
from difflab.diffusion.objectives import LOSS_WEIGHTINGS
from difflab.errors import MAX_SIZE, DifflabError, check_choice, check_float, check_ints
from difflab.models import control_eval, planner, t2i
from difflab.models.conditioners import ControlledPrompts, Controls, Layouts
from difflab.models.family import Family, Preset
from difflab.models.recipe import DiffusionConfig, SampleConfig, check_cond_drop, check_sampling, make_loss_fn
from difflab.models.runs import checkpoint_id, load_latest_weights, load_run_config
from difflab.models.system import DiffusionSystem, TrainingParts, train_system
from difflab.models.system import generate as generate_system
from difflab.nn.controlnet import ControlledUNet, ControlNet, controlled_forward, unet_of
from difflab.nn.unet import UNetConfig, example_inputs
from difflab.train.config import TrainConfig
from difflab.train.metrics import log_curve_point
from difflab.world.language import describe
from difflab.world.render import PLANNED_FIELDS, condition_channels
from difflab.world.scene import world_preset

CONDITIONS = control_eval.CONDITIONS
PLANNED = PLANNED_FIELDS
"""The conditions a layout planner can draw from a prompt."""
PLANNED_PROMPTS = ("described", "given")


@dataclass(frozen=True)
class ControlConfig:
    kind: str = "control"
    base: str | None = None
    """Run directory of the trained text-to-image model to steer (--set base=RUN); it stays frozen."""
    condition: str = "edges"
    """What the condition image shows of a scene: 'edges' (outlines), 'depth' (nearness, the background 0),
    'mask' (1 on every object), or a layout: 'boxes' (each object's box), 'shapes' (each box filled with its
    shape's grey level) or 'layout' (each box in its colour, RGBA with that level)
    (:func:`difflab.world.render.condition`)."""
    planner: str | None = None
    """Conditions 'boxes', 'shapes' and 'layout': the run directory of a layout planner (--set planner=RUN) that lays
    out prompts given without a condition image; None: the base's planner, if it has one (a layout base).
    Training draws the boxes of the true scenes; the planner is only used at sampling."""
    planned_prompt: str | None = None
    """What text goes with a planned layout: 'described', the planned scene's full description (where each
    object goes in words as well as boxes: LMD's per-box phrases, Lian et al. 2023), or 'given', the
    prompt as it was typed. None: 'described' for 'boxes', whose boxes do not say which object is which,
    'given' for 'shapes' and 'layout', whose boxes do (measured: docs/control.md)."""
    hint_hidden: tuple[int, ...] = (16, 32)
    """Widths of the hint encoder's convolutions, one per stage (the paper's 16, 32, 96, 256 for 8x)."""
    loss_weighting: str | None = None
    """The loss weighting over noise levels ('uniform' or 'min_snr', :mod:`difflab.diffusion.objectives`);
    None: the base's. Placement is decided at high noise, where min-SNR's weight on a v-loss is small."""
    cond_drop: float = 0.5
    """Probability of training on the empty prompt (the paper's 50 %, Sec. 3.3)."""
    control_scale: float = 1.0
    """Sampling default: the residuals' multiplier (the paper's conditioning scale; 0 is the base model)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    data: TextDataConfig = field(default_factory=TextDataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """The base's training scenes, UNet and diffusion process, copied by :func:`resolve`: the scenes and
    their latents are trained on again, the UNet's encoder is copied, the loss is the base's."""
    base_checkpoint: str | None = None
    """The base run's checkpoint this ControlNet was trained on; checked when it is loaded."""
    planner_checkpoint: str | None = None
    """The layout planner's checkpoint (a layout condition with a planner); checked when it is loaded."""

    def __post_init__(self) -> None:
        check_choice("condition", self.condition, CONDITIONS)
        if self.planned_prompt is not None:
            check_choice("planned_prompt", self.planned_prompt, PLANNED_PROMPTS)
        if self.planner is not None and self.condition not in PLANNED:
            raise DifflabError(f"planner={self.planner!r} lays out prompts for a ControlNet on {' or '.join(PLANNED)}; "
                               f"this one is on {self.condition!r}")  # fmt: skip
        if self.loss_weighting is not None:
            check_choice("loss weighting", self.loss_weighting, LOSS_WEIGHTINGS)
        check_cond_drop(self.cond_drop)
        check_float("control_scale", self.control_scale, 0.0, 10.0)
        check_ints("hint_hidden", self.hint_hidden, 1, MAX_SIZE, nonempty=True)


def resolve(cfg: ControlConfig, *, attach: bool = True) -> ControlConfig:
    """The run record: the base run's path, checkpoint, UNet and diffusion process."""
    if attach:
        if cfg.base is None:
            raise DifflabError("a ControlNet steers a trained text-to-image run: --set base=RUN (train one with "
                               "'difflab demo' or 'difflab train --preset t2i_demo')")  # fmt: skip
        path = Path(cfg.base).expanduser().resolve()
        base = t2i.load_config(path)
        if base.recipe == "mmdit":
            raise DifflabError(f"base '{path}' is an MMDiT; a ControlNet copies a UNet's encoder")
        diffusion = base.diffusion
        if cfg.loss_weighting is not None:
            diffusion = dataclasses.replace(diffusion, loss_weighting=cfg.loss_weighting)
        cfg = dataclasses.replace(cfg, base=str(path), unet=base.unet, diffusion=diffusion,
                                  data=base.data,
                                  base_checkpoint=checkpoint_id(path, "text-to-image run"))  # fmt: skip
        if cfg.condition in PLANNED and (cfg.planner or base.planner) is not None:
            cfg = planner.attach_planner(cfg, cfg.planner or base.planner)
    check_sampling(cfg)
    return cfg


def load_config(run_dir: str | Path) -> ControlConfig:
    return load_run_config(run_dir, ControlConfig, "control", "a ControlNet (control) run")


def _base(cfg: ControlConfig) -> tuple[DiffusionSystem, t2i.TextToImageConfig]:
    """The base system (EMA weights, frozen), after checking it is the checkpoint this run was made on."""
    system, base_cfg = t2i.load_base(cfg.base, cfg.base_checkpoint, "ControlNet")
    system.network.requires_grad_(False)  # load_model has put it in eval mode
    return system, base_cfg


def build_controlnet(cfg: ControlConfig) -> ControlNet:
    return ControlNet(cfg.unet, condition_channels(cfg.condition), cfg.data.image_size, cfg.hint_hidden)


class WithConditions(Dataset):
    """The base's training items, each with its scene's condition image as ``hint`` (1, S, S)."""

    def __init__(self, items: Dataset, condition: str):
        self.items, self.condition = items, condition
        self.scenes = getattr(items, "scenes", items)  # a layout recipe's items wrap the captioned scenes

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        scene = self.scenes.scene(i)
        return self.items[i] | {
            "hint": control_eval.condition_image(scene, self.scenes.world, self.condition)
        }


def conditioner(cfg: ControlConfig, base_system: DiffusionSystem, base_cfg, *,
                with_planner: bool = False) -> ControlledPrompts:  # fmt: skip
    """The base's conditioner (its text encoder, and planner for a layout base) with this run's caption
    dropout, plus the condition image; ``with_planner``: plain prompts are laid out by the run's planner
    (:func:`layout_planner`), where it has one."""
    inner = base_system.conditioner
    inner.cond_drop = cfg.cond_drop
    lay_out = layout_planner(cfg, base_cfg) if with_planner else None
    return ControlledPrompts(inner, condition_channels(cfg.condition), base_cfg.data.image_size, lay_out)


def layout_planner(cfg: ControlConfig, base_cfg):
    """``lay_out(prompts, seed) -> Controls``: each prompt planned into a scene by the run's layout planner,
    the scene's boxes as its condition image and, where the text is 'described'
    (:func:`~difflab.models.control_eval.planned_text`), the scene's full description as its text (a layout
    base also gets the planned scene as its layout). None without a planner. The planner's checkpoint is
    checked first."""
    if cfg.planner is None:
        return None
    planner.check_unchanged(cfg, "this ControlNet was trained on it")
    model, _ = planner.load_model(cfg.planner)
    tokenizer = planner.make_tokenizer(model.cfg)
    world = world_preset(cfg.data.world)

    def lay_out(prompts: list[str], seed: int) -> Controls:
        scenes = planner.plan(model, tokenizer, prompts, seed=seed)
        texts = (
            [describe(s) for s in scenes] if control_eval.planned_text(cfg) == "described" else list(prompts)
        )
        hints = torch.stack(
            [control_eval.condition_image(s, world, cfg.condition) for s in scenes]
        )  # (N, C, S, S)
        return Controls(Layouts(texts, scenes) if base_cfg.recipe == "layout" else texts, hints, scenes)

    return lay_out


def train(cfg: ControlConfig, run_dir: str | Path, *, resume: bool = False) -> Path:
    """Train a ControlNet on a frozen base into ``run_dir`` (config.json, checkpoints/ with the ControlNet
    alone, metrics.jsonl, samples/step_*.png and samples.png (condition | sample pairs), fidelity.jsonl)."""
    cfg = resolve(cfg)
    base_system, base_cfg = _base(cfg)
    base_net = base_system.network
    world = world_preset(base_cfg.data.world)
    grid = control_eval.eval_scenes(world, cfg.sample.grid)

    def parts(run_dir: Path) -> TrainingParts:
        encoder = base_system.conditioner.encoder
        items = t2i.training_items(base_cfg, encoder, getattr(base_system.codec, "autoencoder", None))
        request = control_eval.controls(grid, world, cfg.condition, base_cfg)

        def with_base(controlnet: nn.Module) -> nn.Module:
            return ControlledUNet(base_net.to(next(controlnet.parameters()).device), [controlnet],
                                  [cfg.control_scale])  # fmt: skip

        def on_grid(images: torch.Tensor, step: int, run_dir: Path) -> None:
            report, found = control_eval.score(images, grid, world)
            write_fidelity(run_dir, step, report)
            pairs = control_eval.save_pairs(request.hints, images, found, world, cfg.condition,
                                            run_dir / "samples" / f"pairs_{step:07d}.png")  # fmt: skip
            if step >= cfg.train.steps:
                (run_dir / "pairs.png").write_bytes(pairs.read_bytes())

        return TrainingParts(conditioner(cfg, base_system, base_cfg), base_system.codec,
                             WithConditions(items, cfg.condition), grid_request=request,
                             loss_fn=_loss_fn(base_net), sampling_network=with_base, on_grid=on_grid)  # fmt: skip

    def network() -> ControlNet:
        return build_controlnet(cfg).copy_base(unet_of(base_net))

    run_dir = train_system(cfg, run_dir, resume=resume, load_config=load_config, inputs=("base_checkpoint",),
                           parts=parts, network=network, model_config=_network_record(cfg))  # fmt: skip
    return run_dir


def _network_record(cfg: ControlConfig) -> dict:
    return {"controlnet_of": dataclasses.asdict(cfg.unet), "condition": cfg.condition}


def _loss_fn(base_net: nn.Module):
    """The base recipe's loss (:func:`~difflab.models.recipe.make_loss_fn`) with the trained ControlNet's
    residuals in the frozen base: only the ControlNet gets gradients."""

    def make(run_cfg, schedule, cond, space):
        inner = make_loss_fn(run_cfg, schedule, cond, space)

        def loss(controlnet: nn.Module, batch: dict, generator: torch.Generator):
            base = base_net.to(next(controlnet.parameters()).device)  # a no-op after the first step

            def network(x, t, **kwargs):
                return controlled_forward(base, [controlnet], [1.0], x, t, **kwargs)

            return inner(network, batch, generator)

        return loss

    return make


def load_model(run_dir: str | Path, *, ema: bool = True, device: str = "cpu",
               control_scale: float | None = None) -> tuple[DiffusionSystem, ControlConfig]:  # fmt: skip
    """The frozen base with the trained ControlNet (EMA weights by default) at ``control_scale`` (default:
    the run's), its conditioner taking :class:`~difflab.models.conditioners.Controls`, and the config."""
    model, cfg, _ = _load(run_dir, ema=ema, device=device, control_scale=control_scale)
    return model, cfg


def _load(run_dir, *, ema: bool = True, device: str = "cpu", control_scale: float | None = None):
    """:func:`load_model`, and the base's config."""
    cfg = load_config(run_dir)
    base_system, base_cfg = _base(cfg)
    controlnet = load_latest_weights(run_dir, build_controlnet(cfg), ema=ema)
    scale = cfg.control_scale if control_scale is None else control_scale
    network = ControlledUNet(base_system.network, [controlnet], [scale])
    system = DiffusionSystem(
        network, conditioner(cfg, base_system, base_cfg, with_planner=True), base_system.codec
    )
    return system.to(device).eval(), cfg, base_cfg


def generate(model: DiffusionSystem, cfg: ControlConfig, request: Controls, **kwargs) -> torch.Tensor:
    """One image (N, C, H, W) in [-1, 1] per prompt and condition image; keyword arguments as
    :func:`difflab.models.system.generate`."""
    return generate_system(model, cfg, len(request), request, **kwargs)


def read_condition(path: str | Path, side: int, channels: int = 1) -> torch.Tensor:
    """A condition image file -> (channels, side, side) in [0, 1]: its luminance, or for 4 channels its RGBA
    (a 'layout': colours, and the shape levels in alpha); an error naming the file when it cannot be read or
    is not ``side`` pixels square."""
    pixels = read_square(path, side, "L" if channels == 1 else "RGBA", "condition image",
                         "the side of the images this ControlNet's base draws")  # fmt: skip
    return control_eval.channels_first(torch.from_numpy(pixels.astype(np.float32) / 255.0))


def control_request(model: DiffusionSystem, cfg: ControlConfig, prompts: list[str], path: str | None,
                    scale: float | None = None, seed: int = 0) -> Controls:  # fmt: skip
    """``difflab generate``'s request of a ControlNet run: every prompt under the condition image in ``path``,
    or without one each prompt laid out by the run's planner with ``seed`` (the request then holds the planned
    scenes); the model's conditioning scale set to ``scale`` when given."""
    if scale is not None:
        model.network.scales = [scale]
    if path is None and model.conditioner.planner is not None:
        return model.conditioner.planner(prompts, seed)
    if path is None:
        also = ", or train it with --set planner=RUN to lay prompts out" if cfg.condition in PLANNED else ""
        raise DifflabError(f"'{cfg.base}' is steered here by a ControlNet on {cfg.condition}; give its condition "
                           f"image: --control FILE ('difflab world condition' draws one){also}")  # fmt: skip
    name, sep, file = path.partition("=")
    if sep and name in CONDITIONS:  # 'edges=cond.png', as the paper's pipelines name a control
        if name != cfg.condition:
            raise DifflabError(f"--control {name}=... is given to a ControlNet on {cfg.condition}; expected "
                               f"{cfg.condition}=FILE")  # fmt: skip
        path = file
    hint = read_condition(path, cfg.data.image_size, condition_channels(cfg.condition))
    return Controls(prompts, hint.expand(len(prompts), -1, -1, -1))  # a view: one image for every prompt


def evaluate(run_dir: str | Path, n: int, *, seed: int = 0, sampler=None, steps=None, cfg_scale=None,
             control_scale: float | None = None, progress: bool = False,
             prompt_seed: int | None = None) -> dict:  # fmt: skip
    """Condition fidelity of ``n`` held-out scenes, re-read from the samples, beside the base model's
    own on the same prompts, and for a ControlNet on planned layouts GenEval-style faithfulness from prompts
    alone (:func:`difflab.models.control_eval.evaluate`)."""
    model, cfg, base_cfg = _load(run_dir, control_scale=control_scale)
    return control_eval.evaluate(model, cfg, base_cfg, run_dir, n, seed=seed, sampler=sampler, steps=steps,
                                 cfg_scale=cfg_scale, progress=progress, prompt_seed=prompt_seed)  # fmt: skip


def info_network(cfg: ControlConfig):
    """The ControlNet with example inputs (``difflab info``): the base's, and a condition image; its output is
    a list of residuals, so the loss that counts its FLOPs sums their squares."""
    b, net = cfg.train.batch_size, build_controlnet(cfg)
    side = cfg.data.image_size
    hint = torch.rand(b, condition_channels(cfg.condition), side, side)
    return (
        net,
        example_inputs(cfg.unet, b) | {"hint": hint},
        lambda out: sum(r.float().square().mean() for r in out),
    )


def write_fidelity(run_dir: Path, step: int, report: dict) -> None:
    """Append one line of the learning curve to ``fidelity.jsonl``, first dropping any line at or after
    ``step`` (a resumed run redraws those grids), so the file never holds a step twice."""
    log_curve_point(Path(run_dir) / "fidelity.jsonl", step, report)


# -------------------------------------------------------------------------------------------- presets


def _preset(condition: str, steps: int, tiny: bool) -> ControlConfig:
    if tiny:
        return ControlConfig(
            condition=condition,
            train=TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=10, ema_decay=0.99, log_every=10,
                              checkpoint_every=None, progress=False),
            sample=SampleConfig(steps=10, grid=16, cfg_scale=2.0),
        )  # fmt: skip
    # Sampled at conditioning scale 2: after 1,500 steps it kept the condition better than at 1 (fidelity
    # 0.875 against 0.795 on masks, n = 200, docs/control.md), the residuals still short of their full size.
    return ControlConfig(
        condition=condition,
        control_scale=2.0,
        train=TrainConfig(steps=steps, batch_size=32, lr=1e-3, warmup_steps=50, ema_decay=0.99, log_every=25,
                          checkpoint_every=250, sample_every=250),
        sample=SampleConfig(sampler="dpmpp_2m", steps=20, cfg_scale=3.0, grid=32),
    )  # fmt: skip


PLANNER_NOTE = "; --set planner=RUN of a planner_* run lays prompts out at sampling"
PRESET_STEPS = {"layout": 4000}
"""Training steps of a preset where 1,500 are too few: the layout's colours take longer to be read (its
fidelity 0.715 at 1,500 steps, 0.935 at 4,000; docs/control.md)."""

PRESETS = (
    Preset("controlnet_tiny", "control", "a ControlNet on the edges of a t2i_tiny run's world (--set base=RUN): "
           "seconds (tests)", lambda: _preset("edges", 150, True)),
    *(Preset(f"controlnet_{c}", "control", f"a ControlNet on the {c} of a text-to-image run's scenes (--set "
             f"base=RUN of a t2i_* run or the demo's run/{PLANNER_NOTE if c in PLANNED else ''}): minutes on a CPU",
             lambda c=c: _preset(c, PRESET_STEPS.get(c, 1500), False))
      for c in CONDITIONS),
)  # fmt: skip

FAMILY = Family(
    name="control",
    what="a ControlNet (control) run",
    config=ControlConfig,
    presets=PRESETS,
    resolve=resolve,
    train=train,
    load=load_model,
    evaluate=evaluate,
    network=info_network,
    writes="samples.png, pairs.png (condition | sample | re-detected), fidelity.jsonl",
    eval_n=200,
    eval_options=("sampler", "steps", "cfg_scale", "control_scale", "progress", "prompt_seed"),
    parents=("base",),
    draws="prompts",
)
