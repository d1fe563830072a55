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
from difflab.models import control_eval, t2i
from difflab.models.conditioners import ControlledPrompts, Controls
from difflab.models.family import Family, Preset
from difflab.models.recipe import DiffusionConfig, SampleConfig, check_cond_drop, check_sampling, make_loss_fn
from difflab.models.runs import checkpoint_id, load_latest_weights, load_run_config
from difflab.models.system import DiffusionSystem, TrainingParts, train_system
from difflab.models.system import generate as generate_system
from difflab.nn.controlnet import ControlledUNet, ControlNet, controlled_forward, unet_of
from difflab.nn.unet import UNetConfig, example_inputs
from difflab.train.config import TrainConfig
from difflab.train.metrics import log_curve_point
from difflab.world.scene import world_preset

CONDITIONS = control_eval.CONDITIONS


@dataclass(frozen=True)
class ControlConfig:
    kind: str = "control"
    base: str | None = None
    """Run directory of the trained text-to-image model to steer (--set base=RUN); it stays frozen."""
    condition: str = "edges"
    """What the condition image shows of a scene: 'edges' (outlines), 'depth' (nearness, the background 0)
    or 'mask' (1 on every object) (:func:`difflab.models.control_eval.condition_image`)."""
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

    def __post_init__(self) -> None:
        check_choice("condition", self.condition, CONDITIONS)
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
    return ControlNet(cfg.unet, control_eval.CONDITION_CHANNELS, cfg.data.image_size, cfg.hint_hidden)


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


def conditioner(cfg: ControlConfig, base_system: DiffusionSystem, base_cfg) -> ControlledPrompts:
    """The base's conditioner (its text encoder, and planner for a layout base) with this run's caption
    dropout, plus the condition image."""
    inner = base_system.conditioner
    inner.cond_drop = cfg.cond_drop
    return ControlledPrompts(inner, control_eval.CONDITION_CHANNELS, base_cfg.data.image_size)


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
    system = DiffusionSystem(network, conditioner(cfg, base_system, base_cfg), base_system.codec)
    return system.to(device).eval(), cfg, base_cfg


def generate(model: DiffusionSystem, cfg: ControlConfig, request: Controls, **kwargs) -> torch.Tensor:
    """One image (N, C, H, W) in [-1, 1] per prompt and condition image; keyword arguments as
    :func:`difflab.models.system.generate`."""
    return generate_system(model, cfg, len(request), request, **kwargs)


def read_condition(path: str | Path, side: int) -> torch.Tensor:
    """A condition image file -> (1, side, side) in [0, 1] (its luminance): an error naming the file when it
    cannot be read or is not ``side`` pixels square."""
    grey = read_square(path, side, "L", "condition image", "the side of the images this ControlNet's base draws")
    return torch.from_numpy(grey.astype(np.float32) / 255.0)[None]


def control_request(model: DiffusionSystem, cfg: ControlConfig, prompts: list[str], path: str | None,
                    scale: float | None = None) -> Controls:  # fmt: skip
    """``difflab generate``'s request of a ControlNet run: every prompt under the condition image in ``path``,
    the model's conditioning scale set to ``scale`` when given."""
    if path is None:
        raise DifflabError(f"'{cfg.base}' is steered here by a ControlNet on {cfg.condition}; give its condition "
                           "image: --control FILE ('difflab world condition' draws one)")  # fmt: skip
    name, sep, file = path.partition("=")
    if sep and name in CONDITIONS:  # 'edges=cond.png', as the paper's pipelines name a control
        if name != cfg.condition:
            raise DifflabError(f"--control {name}=... is given to a ControlNet on {cfg.condition}; expected "
                               f"{cfg.condition}=FILE")  # fmt: skip
        path = file
    hint = read_condition(path, cfg.data.image_size)
    if scale is not None:
        model.network.scales = [scale]
    return Controls(prompts, hint.expand(len(prompts), -1, -1, -1))  # a view: one image for every prompt


def evaluate(run_dir: str | Path, n: int, *, seed: int = 0, sampler=None, steps=None, cfg_scale=None,
             control_scale: float | None = None, progress: bool = False) -> dict:  # fmt: skip
    """Condition fidelity of ``n`` held-out scenes, re-read from the samples, beside the base model's
    own on the same prompts (:func:`difflab.models.control_eval.evaluate`)."""
    model, cfg, base_cfg = _load(run_dir, control_scale=control_scale)
    return control_eval.evaluate(model, cfg, base_cfg, run_dir, n, seed=seed, sampler=sampler, steps=steps,
                                 cfg_scale=cfg_scale, progress=progress)  # fmt: skip


def info_network(cfg: ControlConfig):
    """The ControlNet with example inputs (``difflab info``): the base's, and a condition image; its output is
    a list of residuals, so the loss that counts its FLOPs sums their squares."""
    b, net = cfg.train.batch_size, build_controlnet(cfg)
    side = cfg.data.image_size
    hint = torch.rand(b, control_eval.CONDITION_CHANNELS, side, side)
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


PRESETS = (
    Preset("controlnet_tiny", "control", "a ControlNet on the edges of a t2i_tiny run's world (--set base=RUN): "
           "seconds (tests)", lambda: _preset("edges", 150, True)),
    *(Preset(f"controlnet_{c}", "control", f"a ControlNet on the {c} of a text-to-image run's scenes (--set "
             f"base=RUN of a t2i_* run or the demo's run/): minutes on a CPU", lambda c=c: _preset(c, 1500, False))
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
    eval_options=("sampler", "steps", "cfg_scale", "control_scale", "progress"),
    parents=("base",),
    draws="prompts",
)
