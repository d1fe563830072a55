"""``difflab presets | info | train | sample | eval``: the commands that drive a model run.

A run directory (``--out`` of train) holds config.json, checkpoints/, metrics.jsonl, samples/ and, at
the end, samples.png and trajectory.png; sample and eval are pointed at it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

from difflab import cli_types
from difflab.config import apply_overrides, atomic_path
from difflab.data.config import data_channels
from difflab.data.images import to_uint8
from difflab.diffusion.discretization import SPACINGS
from difflab.diffusion.samplers import SAMPLERS
from difflab.errors import MAX_SIZE, MAX_TIMESTEPS, DifflabError
from difflab.models.adapt import apply_adapter, parse_lora
from difflab.models.attention_maps import CrossAttentionMaps, save_attention_overlays
from difflab.models.conditioners import ControlledPrompts, GroundedPrompts
from difflab.models.control import control_request
from difflab.models.layout import outlines
from difflab.models.planner import TEMPERATURE_RANGE
from difflab.models.recipe import GUIDANCE_RANGE
from difflab.models.registry import FAMILIES, PRESETS, family_of_run, get_family, get_preset
from difflab.models.system import generate_batches
from difflab.models.text_encoder import export_text_encoder, load_text_encoder
from difflab.nn.unet import count_parameters, training_step_flops
from difflab.outputs import (
    FIGURE_MAX,
    block_size,
    check_disk,
    image_file,
    numbered,
    png_bytes,
    sample_target,
    save_numbered,
    shown,
)
from difflab.train import distributed
from difflab.train.checkpoint import list_checkpoints
from difflab.train.device import resolve_device
from difflab.viz import (
    TrajectoryRecorder,
    captioned_grid_problem,
    grid_problem,
    save_captioned_grid,
    save_grid,
)
from difflab.world.scene import world_preset

SAMPLER_HELP = "ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, sa_solver, euler or heun (default: the run's)"

# Flag types (difflab.cli_types): a bad value is argparse's one-line usage error (exit 2) before any run is
# read, and 0 steps or an empty sampler can no longer fall back to the run's defaults unnoticed.
IMAGES = cli_types.integer(1, cli_types.MAX_IMAGES)
SAMPLER = cli_types.choice("sampler", SAMPLERS)
STEPS = cli_types.integer(1, MAX_TIMESTEPS)  # and at most the run's diffusion.timesteps, checked on loading
GUIDANCE = cli_types.number(*GUIDANCE_RANGE)
TEMPERATURE = cli_types.number(*TEMPERATURE_RANGE)
CONTROL_SCALE = cli_types.number(0.0, 10.0)
CLASS = cli_types.integer(0, MAX_SIZE)  # and below the run's class count, checked on loading


def add_preset_args(p, example: str) -> None:
    """``--preset NAME`` and repeatable ``--set KEY=VALUE``, read back by :func:`config_from_args`."""
    p.add_argument("--preset", default="demo", help="preset name (see 'difflab presets'); default: demo")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, e.g. --set {example} (repeatable)")  # fmt: skip


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "presets", help="list every named preset", description="List every named preset."
    )
    p.set_defaults(func=_presets)

    p = subparsers.add_parser(
        "info",
        help="parameters and FLOPs per training step of a preset",
        description="Build a preset's network and print its parameter count and the FLOPs of one training "
        "step (forward + backward, counted by torch.utils.flop_counter at the preset's batch size).",
    )
    add_preset_args(p, "unet.channels=64")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_info)

    p = subparsers.add_parser(
        "train",
        help="train a model from a preset into a run directory",
        description="Train a preset (with optional --set overrides) into RUN_DIR. Writes config.json, "
        "checkpoints (safetensors + JSON, atomic, last 3 kept), metrics.jsonl, sample grids and a "
        "trajectory strip. --resume continues exactly where the latest good checkpoint left off. "
        "Data parallel on several processes or machines: torchrun --nproc_per_node=N -m difflab train ... "
        "(train.batch_size stays the global batch; see docs/distributed.md).",
    )
    add_preset_args(p, "train.steps=3000")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--device", default=None, help="auto (default: CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the network (same as --set train.compile=inductor)")  # fmt: skip
    p.add_argument("--skip-bad", action="store_true",
                   help="image folders: leave out unreadable files, counted (data.skip_bad=true)")  # fmt: skip
    p.set_defaults(func=_train)

    p = subparsers.add_parser(
        "sample",
        help="draw samples from a trained run into an image grid",
        description="Sample a trained run (EMA weights) with any sampler and save a grid.",
    )
    p.add_argument("run_dir", help="run directory made by 'difflab train'")
    p.add_argument("--n", type=IMAGES, default=64, help="number of samples (default: 64)")
    p.add_argument("--sampler", type=SAMPLER, default=None, help=SAMPLER_HELP)
    p.add_argument("--steps", type=STEPS, default=None, help="sampling steps (default: the run's)")
    p.add_argument("--cfg", type=GUIDANCE, default=None, help="classifier-free guidance weight (1: none)")
    p.add_argument("--class", dest="klass", type=CLASS, default=None,
                   help="draw only this class (default: cycle through all classes)")  # fmt: skip
    p.add_argument("--seed", type=cli_types.seed, default=0, help="noise seed (default: 0)")
    p.add_argument("--out", default="samples.png", help="output image (default: samples.png)")
    p.add_argument("--trajectory", default=None, metavar="FILE", help="also save x_t / x0-hat over the steps")
    p.set_defaults(func=_sample)

    p = subparsers.add_parser(
        "generate",
        help="text-to-image: draw images of prompts from a trained t2i run",
        description="Draw --n images of each PROMPT from a text-to-image run (EMA weights) into a grid, one "
        "row per prompt. --attention FILE also saves each prompt's cross-attention maps per word (averaged "
        "over heads, layers and steps) over its first image: where the model puts each word.",
    )
    p.add_argument("run_dir", help="run directory made by 'difflab train --preset t2i_*' (or 'difflab demo')")
    p.add_argument(
        "prompts", nargs="+", metavar="PROMPT", help='e.g. "a red circle to the left of a blue square"'
    )
    p.add_argument("--n", type=IMAGES, default=4, help="images per prompt (default: 4)")
    p.add_argument("--sampler", type=SAMPLER, default=None, help=SAMPLER_HELP)
    p.add_argument("--steps", type=STEPS, default=None, help="sampling steps (default: the run's)")
    p.add_argument(
        "--cfg", type=GUIDANCE, default=None, help="classifier-free guidance weight (default: the run's)"
    )
    p.add_argument("--seed", type=cli_types.seed, default=0, help="noise seed (default: 0)")
    p.add_argument("--out", default="generated.png", help="output image (default: generated.png)")
    p.add_argument(
        "--attention", default=None, metavar="FILE", help="also save cross-attention maps per word"
    )
    p.add_argument("--control", default=None, metavar="[KIND=]FILE",
                   help="ControlNet runs: the condition image every prompt is drawn under (a greyscale PNG, RGBA "
                   "for a layout, of the world's side; 'difflab world condition' draws one with the scene's "
                   "description), optionally named by its kind (edges=cond.png); without it a ControlNet on "
                   "boxes, shapes or layout with a planner lays each prompt out")  # fmt: skip
    p.add_argument("--control-scale", type=CONTROL_SCALE, default=None,
                   help="ControlNet runs: the residuals' multiplier (default: the run's, 1; 0: the base)")  # fmt: skip
    p.add_argument("--lora", default=None, metavar="RUN[:SCALE]",
                   help="text-to-image runs: load the adapter of a 'difflab train --preset lora_*' run onto this base "
                   "at SCALE (default: the adapter run's, 1; 0: the base), its new words included")  # fmt: skip
    p.add_argument("--device", default=None, help="auto (default: CUDA, then MPS, then CPU), cpu, cuda, mps")
    p.set_defaults(func=_generate)

    p = subparsers.add_parser(
        "eval",
        help="score a trained run with the project's own judges",
        description="Diffusion runs: sample N images and score them: on the toy world, the reader's class "
        "accuracy (one object with the requested shape and colour); on digits, an SVC trained on real digits "
        "(its own held-out accuracy is reported too); plus the Fréchet distance to real data in the pixels8 "
        "space. CLIP runs: zero-shot colour and shape accuracy on N held-out one-object scenes, text<->image "
        "recall@1/@5 in groups of 100 held-out scenes, CLIP score, and attribute binding on N two-object "
        "scenes. Autoencoder (vae) runs: reconstruction PSNR on N held-out images and, on the toy world, the "
        "reader's exact-scene accuracy on the reconstructions beside its accuracy on the originals. Text-to-image "
        "(t2i) runs: GenEval-style faithfulness of the first N prompts of each category of the world's fixed prompt "
        "sets (single object, two objects, counting, colours, position, attribute binding), read back by the "
        "reader, overall and per category, with prompts that name a held-out (colour, shape) pair scored apart.",
    )
    p.add_argument("run_dir", help="run directory made by 'difflab train'")
    p.add_argument(
        "--n",
        type=IMAGES,
        default=None,
        help="number of samples (default: 500); text-to-image: prompts per category (default and most: 100)",
    )
    p.add_argument("--sampler", type=SAMPLER, default=None, help="sampler (default: the run's)")
    p.add_argument("--steps", type=STEPS, default=None, help="sampling steps (default: the run's)")
    p.add_argument(
        "--cfg", type=GUIDANCE, default=None, help="classifier-free guidance weight (default: the run's)"
    )
    p.add_argument("--seed", type=cli_types.seed, default=0, help="noise seed (default: 0)")
    p.add_argument("--prompt-seed", type=cli_types.seed, default=None, metavar="SEED",
                   help="text-to-image and planner runs: score a freshly drawn prompt set (this seed) instead of "
                   "the shipped one")  # fmt: skip
    p.add_argument("--temperature", type=TEMPERATURE, default=None,
                   help="planner and layout text-to-image runs: the planner's sampling temperature (default: "
                   "the planner's, 0.5 unless trained otherwise)")  # fmt: skip
    p.add_argument("--control-scale", type=CONTROL_SCALE, default=None,
                   help="ControlNet runs: the residuals' multiplier (default: the run's)")  # fmt: skip
    p.add_argument("--ensemble", type=cli_types.integer(1, 100), default=None,
                   help="depth runs: draws ensembled per image (default: the run's)")  # fmt: skip
    p.add_argument("--spacing", type=cli_types.choice("timestep spacing", SPACINGS), default=None,
                   help="depth runs: timestep spacing, trailing, leading or linspace (default: the run's)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", default=None, metavar="FILE",
                   help="CLIP runs: also draw text -> image search among 100 held-out scenes into FILE")  # fmt: skip
    p.set_defaults(func=_eval)

    p = subparsers.add_parser(
        "export-text-encoder",
        help="save a CLIP run's text tower + tokenizer as a frozen conditioning encoder",
        description="Write the text transformer, its projection and the tokenizer of a trained CLIP run into "
        "DIR (text_encoder.safetensors, text_encoder.json, tokenizer.json). A text-to-image model loads it "
        "frozen: per-token features for cross-attention, a pooled embedding for global conditioning.",
    )
    p.add_argument("run_dir", help="CLIP run directory made by 'difflab train --preset clip_*'")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_export_text_encoder)


def _presets(args) -> int:
    for name, preset in PRESETS.items():
        print(f"{name:10s} [{preset.family}] {preset.description}")
    return 0


def config_from_args(args):
    """The user's request: ``--preset`` with ``--set`` overrides (and ``--device``, ``--compile`` and
    ``--skip-bad``, where the command has them). Not yet resolved: see :func:`record_from_args`."""
    cfg = apply_overrides(get_preset(args.preset).build(), args.overrides)
    if getattr(args, "device", None):
        cfg = apply_overrides(cfg, [f"train.device={args.device}"])
    if getattr(args, "compile", False):
        cfg = apply_overrides(cfg, ["train.compile=inductor"])
    if getattr(args, "skip_bad", False):
        if getattr(cfg.data, "dataset", None) != "folder":
            raise DifflabError(
                f"--skip-bad applies to image-folder data; preset '{args.preset}' does not read a folder"
            )
        cfg = apply_overrides(cfg, ["data.skip_bad=true"])
    return cfg


def record_from_args(args):
    """The family of ``--preset`` and the resolved run record of the request: every derived field set and
    everything the run will need checked before any work starts."""
    family = get_family(get_preset(args.preset).family)
    return family, family.resolve(config_from_args(args))


def _info(args) -> int:
    family = get_family(get_preset(args.preset).family)
    request = config_from_args(args)
    # the parent runs the request names shape the network (an autoencoder's latents, an encoder's widths)
    attach = all(getattr(request, name) is not None for name in family.parents)
    cfg = family.resolve(request, attach=attach)
    model, inputs, loss_fn = family.network(cfg)
    b = cfg.train.batch_size
    report = {
        "preset": args.preset,
        "parameters": count_parameters(model),
        "batch_size": b,
        "flops_per_training_step": training_step_flops(model, inputs, loss_fn),
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.preset}: {report['parameters'] / 1e6:.2f} M parameters, "
              f"{report['flops_per_training_step'] / 1e9:.1f} GFLOP per training step at batch {b}")  # fmt: skip
    return 0


def _train(args) -> int:
    family, cfg = record_from_args(args)
    # under torchrun: join the process group
    distributed.init_from_env(cfg.train.device, timeout_s=cfg.train.dist_timeout_s)
    rank = distributed.rank()
    # A resumed run that has already reached train.steps trains nothing and writes nothing new.
    done = args.resume and finished_step(Path(args.out) / "checkpoints", cfg.train.steps)
    try:
        run_dir = family.train(cfg, args.out, resume=args.resume)
    finally:
        distributed.shutdown()
    if rank != 0:
        return 0  # rank 0 reports
    if done:
        print(f"'{run_dir}' is already trained to step {done} (train.steps={cfg.train.steps}); nothing to do "
              "(raise train.steps with --set to train further)")  # fmt: skip
        return 0
    print(f"trained '{args.preset}' into {run_dir}: {family.writes}, metrics.jsonl, checkpoints/")
    return 0


def finished_step(checkpoints: Path, steps: int) -> int:
    """The step of the newest checkpoint under ``checkpoints`` when it has reached ``steps``, else 0."""
    found = list_checkpoints(checkpoints)
    return found[-1][0] if found and found[-1][0] >= steps else 0


def drain(batches, out: Path, to_folder: bool, n: int, each=None) -> np.ndarray | None:
    """Take sampled batches (of an ``n``-image request) to the CPU as uint8 as they come: into ``out``'s
    numbered PNGs and dropped (``to_folder``; returns None), or kept for one grid (returns them, (N, H, W, C)).
    ``each(images, start)`` sees every batch as drawn first."""
    kept, start = [], 0
    for images in batches:
        if each is not None:
            each(images, start)
        tiles = to_uint8(images)
        if to_folder:
            save_numbered(out, start, tiles, n)
        else:
            kept.append(tiles)
        start += len(tiles)
    return None if to_folder else np.concatenate(kept)


def check_n(n: int) -> None:
    if n < 1:
        raise DifflabError(f"--n {n} is invalid; expected a positive number of samples")


_DRAWS = {  # what a generative run is asked for -> (the command, what its runs are called)
    "classes": ("sample", "diffusion runs"),
    "prompts": ("generate", "text-to-image runs"),
}


def _generative_family(run_dir: str, draws: str):
    """The family of ``run_dir``; an error pointing to the right command when it draws something else."""
    family = family_of_run(run_dir)
    if family.draws != draws:
        command, called = _DRAWS[draws]
        names = ", ".join(f.name for f in FAMILIES.values() if f.draws == draws)
        hint = ""
        if family.draws is not None:
            example = ' "a red circle"' if family.draws == "prompts" else ""
            hint = f" (use: difflab {_DRAWS[family.draws][0]} {run_dir}{example})"
        raise DifflabError(
            f"'{run_dir}' is a {family.name} run; difflab {command} draws from {called} ({names}){hint}"
        )
    return family


def _sample(args) -> int:
    check_n(args.n)
    family = _generative_family(args.run_dir, "classes")
    out, to_folder = sample_target(args.out, args.n)  # checked (and its folder made) before any work
    trajectory = image_file(args.trajectory, "--trajectory") if args.trajectory else None
    model, cfg = family.load(args.run_dir)
    side = cfg.data.image_size
    if to_folder:
        check_disk(out, args.n, png_bytes(data_channels(cfg.data), side, side, block_size(out)))
    elif problem := grid_problem(args.n, side, side):
        raise DifflabError(f"--n {args.n} is too many for one grid picture: {problem}; give --out a folder "
                           "(a path ending in '/') to write one PNG per image")  # fmt: skip
    labels = None if args.klass is None else torch.tensor(args.klass).expand(args.n)  # a view: no n-long copy
    steps = args.steps or cfg.sample.steps
    recorder = TrajectoryRecorder(steps) if trajectory else None
    batches = generate_batches(model, cfg, args.n, labels, sampler=args.sampler, steps=steps, cfg_scale=args.cfg,
                               seed=args.seed, callback=recorder, progress=sys.stderr.isatty())  # fmt: skip
    tiles = drain(batches, out, to_folder, args.n)
    if to_folder:
        wrote = f"wrote {args.n} samples to {out}/ ({numbered(out, 0, args.n).name} onwards)"
    else:
        wrote = f"wrote {args.n} samples to {shown(save_grid(tiles, out), args.out)}"
    if recorder is not None:
        wrote += f" and the trajectory to {shown(recorder.save(trajectory), args.trajectory)}"
    print(wrote)
    return 0


def _generate(args) -> int:
    check_n(args.n)
    family = _generative_family(args.run_dir, "prompts")
    total = args.n * len(args.prompts)
    asked = f"--n {args.n} of {len(args.prompts)} prompt(s) ({total} images)"
    out, to_folder = sample_target(args.out, total, most=FIGURE_MAX, asked=asked)  # before any work
    if not to_folder and (problem := captioned_grid_problem(total, args.n)):
        raise DifflabError(f"{asked} is too many for one captioned grid: {problem}; give --out a folder (a path "
                           "ending in '/') to write one PNG per image")  # fmt: skip
    attention = image_file(args.attention, "--attention", writer="figure") if args.attention else None
    device = str(resolve_device(args.device or "auto"))
    model, cfg = family.load(args.run_dir, device=device)
    if args.lora is not None:
        if family.name != "t2i":
            raise DifflabError(f"--lora loads an adapter onto a text-to-image base; '{args.run_dir}' is a "
                               f"{family.name} run")  # fmt: skip
        apply_adapter(model, *parse_lora(args.lora))
        model.to(device)
    if to_folder:
        side = cfg.data.image_size
        line = max(len(p.encode()) + 1 for p in args.prompts)  # each image's line of prompts.txt
        check_disk(out, total, png_bytes(3, side, side, block_size(out)) + line)
    texts = [p for p in args.prompts for _ in range(args.n)]  # (prompt 0) x n, (prompt 1) x n, ...
    request, boxes, layouts = texts, None, ""
    if isinstance(model.conditioner, ControlledPrompts):
        request = control_request(model, cfg, texts, args.control, args.control_scale, args.seed)
        if request.scenes is not None:  # laid out by the planner: draw the layouts over the images
            boxes = [outlines(scene, world_preset(cfg.data.world)) for scene in request.scenes]
            layouts = " (dashed: the planned layout each was drawn under)"
    elif args.control is not None or args.control_scale is not None:
        raise DifflabError(f"--control and --control-scale apply to ControlNet runs; '{args.run_dir}' is a "
                           f"{family.name} run")  # fmt: skip
    elif isinstance(model.conditioner, GroundedPrompts):  # plan here, to draw the layouts over the images
        request = model.conditioner.plan(texts, args.seed)
        boxes = [outlines(scene, world_preset(cfg.data.world)) for scene in request.scenes]
        layouts = " (dashed: the planned layout each was painted on)"
    first = range(0, total, args.n)  # the first image of each prompt: the attention figure's
    recorded: dict[int, CrossAttentionMaps] = {}

    def record(start: int, stop: int) -> CrossAttentionMaps | None:
        """Fresh maps for a batch that holds a prompt's first image (maps of every image would not fit)."""
        if -(-start // args.n) * args.n < stop:
            recorded[start] = CrossAttentionMaps(cfg.data.image_size)
            return recorded[start]
        return None

    batches = generate_batches(model, cfg, total, request, sampler=args.sampler, steps=args.steps,
                               cfg_scale=args.cfg, seed=args.seed, attention=record if attention else None,
                               progress=sys.stderr.isatty())  # fmt: skip
    firsts, first_maps = [], []

    def keep_firsts(images: torch.Tensor, start: int) -> None:
        here = [i - start for i in first if start <= i < start + len(images)]
        if attention is not None and here:
            firsts.append(images[here].cpu())
            first_maps.append(recorded.pop(start).maps()[here])

    tiles = drain(batches, out, to_folder, total, each=keep_firsts)
    if to_folder:
        with atomic_path(out / "prompts.txt") as tmp:
            tmp.write_text("".join(f"{t}\n" for t in texts))
        wrote = (f"wrote {total} images of {len(args.prompts)} prompt(s) to {out}/ ({numbered(out, 0, total).name} "
                 f"onwards; line i of prompts.txt is image i's prompt)")  # fmt: skip
    else:
        grid = save_captioned_grid(tiles, texts, out, ncol=args.n, boxes=boxes)
        wrote = f"wrote {total} images of {len(args.prompts)} prompt(s) to {shown(grid, args.out)}{layouts}"
    if attention is not None:
        firsts, first_maps = torch.cat(firsts), torch.cat(first_maps)
        attention = save_attention_overlays(firsts, first_maps, list(args.prompts), attention)
        wrote += f" and their cross-attention maps to {shown(attention, args.attention)}"
    print(wrote)
    return 0


_EVAL_FLAGS = {"sampler": "--sampler", "steps": "--steps", "cfg_scale": "--cfg", "plot": "--plot",
               "prompt_seed": "--prompt-seed", "temperature": "--temperature",
               "control_scale": "--control-scale", "ensemble": "--ensemble", "spacing": "--spacing"}  # fmt: skip


def _eval(args) -> int:
    family = family_of_run(args.run_dir)
    if args.n is None:
        args.n = family.eval_n
    check_n(args.n)
    given = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg, "plot": args.plot,
             "prompt_seed": args.prompt_seed, "temperature": args.temperature,
             "control_scale": args.control_scale, "ensemble": args.ensemble, "spacing": args.spacing}  # fmt: skip
    refused = [k for k, v in given.items() if v is not None and k not in family.eval_options]
    if refused:
        takers = [f.name for f in FAMILIES.values() if all(k in f.eval_options for k in refused)]
        generative = all("sampler" in FAMILIES[n].eval_options for n in takers)  # diffusion runs sample
        kinds = f"diffusion runs ({', '.join(takers)})" if generative else f"{', '.join(takers)} runs"
        verb = "applies" if len(refused) == 1 else "apply"
        raise DifflabError(
            f"{', '.join(_EVAL_FLAGS[k] for k in refused)} {verb} to {kinds}; "
            f"'{args.run_dir}' is a {family.name} run"
        )
    options = {k: v for k, v in given.items() if k in family.eval_options}
    if args.plot is not None:  # checked (and its folder made) before any work
        options["plot"] = image_file(args.plot, "--plot", writer="figure")
    if "progress" in family.eval_options:
        options["progress"] = sys.stderr.isatty()
    report = family.evaluate(Path(args.run_dir), args.n, seed=args.seed, **options)
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def _export_text_encoder(args) -> int:
    out = export_text_encoder(args.run_dir, args.out)
    encoder = load_text_encoder(out)  # read back: what was written loads
    print(f"wrote the frozen text encoder ({sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M parameters, "
          f"token width {encoder.width}, embedding {encoder.embed_dim}) to {out}")  # fmt: skip
    return 0
