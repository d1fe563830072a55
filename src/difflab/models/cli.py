"""``difflab presets | info | train | sample | eval``: the commands that drive a model run.

A run directory (``--out`` of train) holds config.json, checkpoints/, metrics.jsonl, samples/ and, at
the end, samples.png and trajectory.png; sample and eval are pointed at it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from difflab.errors import DifflabError

SAMPLER_HELP = "ddpm, ddim, dpmpp_2m, dpmpp_2m_sde, sa_solver, euler or heun (default: the run's)"


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
    p.add_argument("--n", type=int, default=64, help="number of samples (default: 64)")
    p.add_argument("--sampler", default=None, help=SAMPLER_HELP)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance weight (1: none)")
    p.add_argument("--class", dest="klass", type=int, default=None,
                   help="draw only this class (default: cycle through all classes)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
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
    p.add_argument("--n", type=int, default=4, help="images per prompt (default: 4)")
    p.add_argument("--sampler", default=None, help=SAMPLER_HELP)
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    p.add_argument(
        "--cfg", type=float, default=None, help="classifier-free guidance weight (default: the run's)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    p.add_argument("--out", default="generated.png", help="output image (default: generated.png)")
    p.add_argument(
        "--attention", default=None, metavar="FILE", help="also save cross-attention maps per word"
    )
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
        type=int,
        default=None,
        help="number of samples (default: 500); text-to-image: prompts per category (default and most: 100)",
    )
    p.add_argument("--sampler", default=None, help="sampler (default: the run's)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    p.add_argument(
        "--cfg", type=float, default=None, help="classifier-free guidance weight (default: the run's)"
    )
    p.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
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
    from difflab.presets import all_presets

    for name, preset in all_presets().items():
        print(f"{name:10s} [{preset.family}] {preset.description}")
    return 0


def config_from_args(args):
    """The config of ``--preset`` with ``--set`` overrides (and ``--device``, where the command has it)."""
    from difflab.config import apply_overrides
    from difflab.presets import get_preset

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


def _info(args) -> int:
    import torch

    from difflab.models.pixel import build_unet
    from difflab.nn.unet import count_parameters, example_inputs, training_step_flops
    from difflab.presets import get_preset

    cfg = config_from_args(args)
    b = cfg.train.batch_size
    family = get_preset(args.preset).family
    if family == "vae":
        from difflab.nn.vae import KLAutoencoder

        model, loss_fn = KLAutoencoder(cfg.vae), lambda out: out[0].square().mean()
        v = cfg.vae
        inputs = {"x": torch.randn(b, v.in_channels, v.image_size, v.image_size)}
    elif family == "clip":
        from difflab.models.clip import CLIP, clip_loss

        model, loss_fn = CLIP(cfg), lambda out: clip_loss(*out)
        v, t = cfg.vision, cfg.text
        ids = torch.randint(0, t.vocab_size, (b, t.context_length))
        inputs = {"images": torch.randn(b, v.in_channels, v.image_size, v.image_size), "ids": ids,
                  "mask": torch.ones_like(ids, dtype=torch.bool)}  # fmt: skip
    else:  # pixel, latent and text-to-image diffusion: the UNet (for ldm and t2i, at the preset's latent shape)
        model, loss_fn = build_unet(cfg), None
        inputs = example_inputs(cfg.unet, b)
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
    from difflab.presets import family_module, get_preset
    from difflab.train import distributed

    family = get_preset(args.preset).family
    cfg = config_from_args(args)
    distributed.init_from_env(cfg.train.device)  # under torchrun: join the process group
    rank = distributed.rank()
    try:
        run_dir = family_module(family).train(cfg, args.out, resume=args.resume)
    finally:
        distributed.shutdown()
    if rank != 0:
        return 0  # rank 0 reports
    wrote = {"pixel": "samples.png, trajectory.png, ", "ldm": "samples.png, trajectory.png, ",
             "vae": "reconstructions.png, latent_stats.json, ", "clip": "tokenizer.json, ",
             "t2i": "samples.png, prompts.txt, trajectory.png, "}[family]  # fmt: skip
    print(f"trained '{args.preset}' into {run_dir}: {wrote}metrics.jsonl, checkpoints/")
    return 0


def check_n(n: int) -> None:
    if n < 1:
        raise DifflabError(f"--n {n} is invalid; expected a positive number of samples")


def _sample(args) -> int:
    import torch

    from difflab.models.runs import run_kind
    from difflab.presets import family_module
    from difflab.viz import TrajectoryRecorder, save_grid

    check_n(args.n)
    kind = run_kind(args.run_dir)
    if kind not in ("pixel", "ldm"):
        hint = f' (for prompts: difflab generate {args.run_dir} "a red circle")' if kind == "t2i" else ""
        raise DifflabError(
            f"'{args.run_dir}' is a {kind} run; difflab sample draws from diffusion runs (pixel, ldm){hint}"
        )
    family = family_module(kind)
    model, cfg = family.load_model(args.run_dir)
    labels = None if args.klass is None else torch.full((args.n,), args.klass)
    steps = args.steps or cfg.sample.steps
    recorder = TrajectoryRecorder(steps) if args.trajectory else None
    images = family.generate(model, cfg, args.n, labels=labels, sampler=args.sampler, steps=steps, cfg_scale=args.cfg,
                      seed=args.seed, callback=recorder, progress=sys.stderr.isatty())  # fmt: skip
    save_grid(images, args.out)
    if recorder is not None:
        recorder.save(args.trajectory)
    print(
        f"wrote {args.n} samples to {args.out}"
        + (f" and the trajectory to {args.trajectory}" if recorder else "")
    )
    return 0


def _generate(args) -> int:
    from difflab.models.attention_maps import CrossAttentionMaps, save_attention_overlays
    from difflab.models.runs import run_kind
    from difflab.models.t2i import generate, load_model
    from difflab.train.device import resolve_device
    from difflab.viz import save_captioned_grid

    check_n(args.n)
    kind = run_kind(args.run_dir)
    if kind != "t2i":
        raise DifflabError(f"'{args.run_dir}' is a {kind} run; difflab generate draws from text-to-image (t2i) "
                           "runs (use 'difflab sample' for pixel and ldm runs)")  # fmt: skip
    model, cfg = load_model(args.run_dir, device=str(resolve_device(args.device or "auto")))
    texts = [p for p in args.prompts for _ in range(args.n)]  # (prompt 0) x n, (prompt 1) x n, ...
    maps = CrossAttentionMaps(cfg.data.image_size) if args.attention else None
    images = generate(model, cfg, texts, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg, seed=args.seed,
                      attention=maps, progress=sys.stderr.isatty()).cpu()  # fmt: skip
    save_captioned_grid(images, texts, args.out, ncol=args.n)
    wrote = f"wrote {len(texts)} images of {len(args.prompts)} prompt(s) to {args.out}"
    if maps is not None:
        first = list(range(0, len(texts), args.n))  # the first image of each prompt
        save_attention_overlays(images[first], maps.maps()[first], list(args.prompts), args.attention)
        wrote += f" and their cross-attention maps to {args.attention}"
    print(wrote)
    return 0


def _eval(args) -> int:
    from difflab.models.runs import run_kind

    kind = run_kind(args.run_dir)
    if args.n is None:
        args.n = 100 if kind == "t2i" else 500
    check_n(args.n)
    if kind in ("clip", "vae"):
        given = [f"--{k}" for k in ("sampler", "steps", "cfg") if getattr(args, k) is not None]
        if given:
            raise DifflabError(
                f"{', '.join(given)} apply to diffusion runs; '{args.run_dir}' is a {kind} run"
            )
    if kind == "vae":
        if args.plot:
            raise DifflabError(f"--plot applies to CLIP runs; '{args.run_dir}' is an autoencoder run")
        from difflab.models.vae import evaluate as evaluate_vae

        report = evaluate_vae(Path(args.run_dir), args.n, seed=args.seed)
    elif kind == "clip":
        from difflab.models.clip_eval import evaluate as evaluate_clip

        report = evaluate_clip(Path(args.run_dir), args.n, seed=args.seed, plot=args.plot)
    elif kind == "t2i":
        if args.plot:
            raise DifflabError(f"--plot applies to CLIP runs; '{args.run_dir}' is a text-to-image run")
        from difflab.models.t2i_eval import evaluate as evaluate_t2i

        report = evaluate_t2i(Path(args.run_dir), args.n, sampler=args.sampler, steps=args.steps,
                              cfg_scale=args.cfg, seed=args.seed, progress=sys.stderr.isatty())  # fmt: skip
    else:
        if args.plot:
            raise DifflabError(f"--plot applies to CLIP runs; '{args.run_dir}' is a diffusion run")
        from difflab.models.pixel_eval import evaluate

        report = evaluate(Path(args.run_dir), args.n, sampler=args.sampler, steps=args.steps,
                          cfg_scale=args.cfg, seed=args.seed)  # fmt: skip
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key}: {value}")
    return 0


def _export_text_encoder(args) -> int:
    from difflab.models.text_encoder import export_text_encoder, load_text_encoder

    out = export_text_encoder(args.run_dir, args.out)
    encoder = load_text_encoder(out)  # read back: what was written loads
    print(f"wrote the frozen text encoder ({sum(p.numel() for p in encoder.parameters()) / 1e6:.2f} M parameters, "
          f"token width {encoder.width}, embedding {encoder.embed_dim}) to {out}")  # fmt: skip
    return 0
