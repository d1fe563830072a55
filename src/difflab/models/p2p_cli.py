"""``difflab p2p`` and ``difflab invert``: Prompt-to-Prompt editing of a text-to-image run's images, or of a
given image after null-text inversion, and their exact evaluations."""

from __future__ import annotations

import json
import math
import sys

import torch

from difflab import cli_types
from difflab.errors import DifflabError
from difflab.models import inversion as inv
from difflab.models import inversion_eval, p2p_eval
from difflab.models.cli import GUIDANCE, SAMPLER, SAMPLER_HELP, STEPS
from difflab.models.p2p import P2PEdit, naive, prompt_to_prompt
from difflab.models.p2p_eval import psnr
from difflab.models.registry import family_of_run
from difflab.models.t2i import load_model
from difflab.outputs import image_file, shown
from difflab.train.device import resolve_device
from difflab.viz import save_captioned_grid
from difflab.world.language import describe
from difflab.world.reader import read
from difflab.world.scene import world_preset

FRACTION = cli_types.number(0.0, 1.0)
CASES = cli_types.integer(1, 10_000)
SEEDS = cli_types.integer(1, 16)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "p2p",
        help="Prompt-to-Prompt: edit a generated image by editing its prompt",
        description="Draw SOURCE and edit it into TARGET with Prompt-to-Prompt (Hertz et al. 2022): both passes "
        "share their noise, and the target's cross-attention maps are the source's for the first --tau of the "
        "steps (word swap; a refinement aligns the shared words), its self-attention for the first --tau-self; "
        "--blend WORD keeps everything but where WORD is drawn from the source (LocalBlend); --reweight WORD=C "
        "scales a word's attention. On a layout run the target is painted on the source's planned layout. "
        "Writes one row per seed: source | edit | the naive baseline (TARGET regenerated from the same noise). "
        "--image FILE edits a given image instead: it is inverted under SOURCE (null-text inversion) and "
        "redrawn as TARGET. --eval N instead judges N word swaps exactly with the world's reader "
        "(docs/editing.md).",
    )
    p.add_argument("run_dir", help="a text-to-image run (recipe sd, tokencompose or layout; 'difflab demo' makes one)")
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="SOURCE and TARGET (not with --eval)")
    p.add_argument("--tau", type=FRACTION, default=0.8, help="share of steps with the source's cross-attention "
                   "maps (default: 0.8)")  # fmt: skip
    p.add_argument("--tau-self", type=FRACTION, default=0.4, help="share of steps with the source's "
                   "self-attention (default: 0.4)")  # fmt: skip
    p.add_argument("--blend", nargs="+", default=(), metavar="WORD",
                   help="LocalBlend: only where these words are drawn may the edit differ from the source")  # fmt: skip
    p.add_argument("--reweight", action="append", default=[], metavar="WORD=C",
                   help="scale the target word's attention maps by C (repeatable)")  # fmt: skip
    p.add_argument("--threshold", type=FRACTION, default=0.3, help="LocalBlend's mask threshold (default: 0.3)")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="edit this image (SOURCE describes it), after null-text inversion under SOURCE")  # fmt: skip
    p.add_argument("--seeds", type=SEEDS, default=4, help="how many noise seeds, one row each (default: 4)")
    p.add_argument("--seed", type=cli_types.seed, default=0, help="the first noise seed (default: 0)")
    p.add_argument("--sampler", type=SAMPLER, default=None, help=SAMPLER_HELP)
    p.add_argument("--steps", type=STEPS, default=None, help="sampling steps (default: the run's)")
    p.add_argument("--cfg", type=GUIDANCE, default=None, help="classifier-free guidance weight (default: the run's)")
    p.add_argument("--out", default="p2p.png", help="output image (default: p2p.png)")
    p.add_argument("--eval", type=CASES, default=None, metavar="N",
                   help="judge N word swaps (colour, shape, size): Prompt-to-Prompt, naive baseline")  # fmt: skip
    p.add_argument("--local-blend", action="store_true", help="--eval: with LocalBlend on the swapped words")
    p.add_argument("--case-seed", type=cli_types.seed, default=p2p_eval.EVAL_SEED,
                   help=f"--eval: the seed of the cases (default: {p2p_eval.EVAL_SEED})")  # fmt: skip
    p.add_argument("--json", action="store_true", help="--eval: print one JSON object")
    p.add_argument("--examples", default=None, metavar="FILE",
                   help="--eval: also save the first 8 cases (source | P2P | naive; green where the reader finds "
                   "the source true or the edit exact)")  # fmt: skip
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    p.set_defaults(func=_p2p)

    p = subparsers.add_parser(
        "invert",
        help="null-text inversion: find the noise from which a run redraws a given image",
        description="Invert --image under --prompt (default: the reader's description of the image) by DDIM "
        "inversion and null-text optimisation (Mokady et al. 2023), and save the image beside its autoencoder "
        "round trip, the redraw from DDIM inversion alone and the redraw after null-text inversion, with their "
        "PSNR. --eval N instead measures both on N world scenes and judges word swaps of them (docs/editing.md).",
    )
    p.add_argument("run_dir", help="a text-to-image run (recipe sd, tokencompose or layout)")
    p.add_argument("--image", default=None, metavar="FILE", help="the image ('difflab world condition --field image')")
    p.add_argument("--prompt", default=None, help="its description (default: what the world's reader reads in it)")
    p.add_argument("--steps", type=STEPS, default=None, help="DDIM steps (default: the run's)")
    p.add_argument("--cfg", type=GUIDANCE, default=None, help="guidance it is redrawn with (default: the run's)")
    p.add_argument("--out", default="inversion.png", help="output image (default: inversion.png)")
    p.add_argument("--eval", type=CASES, default=None, metavar="N", help="measure on N world scenes instead")
    p.add_argument("--json", action="store_true", help="--eval: print one JSON object")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    p.set_defaults(func=_invert)


def parse_reweight(specs: list[str]) -> tuple[tuple[str, float], ...]:
    """``WORD=C`` flags -> ((word, c), ...)."""
    out = []
    for spec in specs:
        word, sep, value = spec.partition("=")
        try:
            c = float(value)
        except ValueError:
            c = math.nan
        if not sep or not word or not math.isfinite(c):
            raise DifflabError(f"--reweight '{spec}' is invalid; expected WORD=C with C a number, e.g. red=2")
        out.append((word, c))
    return tuple(out)


def _p2p(args) -> int:
    family = family_of_run(args.run_dir).name
    if family != "t2i":
        raise DifflabError(f"'{args.run_dir}' is a {family} run; Prompt-to-Prompt edits a "
                           "text-to-image run (difflab train --preset t2i_*, or difflab demo)")  # fmt: skip
    sampling = {"sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg}
    if args.eval is not None:
        if args.prompts:
            raise DifflabError(f"--eval draws its own cases; got prompts {args.prompts}")
        return _evaluate(args, sampling)
    if len(args.prompts) != 2:
        raise DifflabError(f"got {len(args.prompts)} prompt(s); expected SOURCE and TARGET, e.g. 'a red circle' "
                           "'a blue circle'")  # fmt: skip
    edit = P2PEdit(*args.prompts, tau=args.tau, tau_self=args.tau_self, blend=tuple(args.blend),
                   reweight=parse_reweight(args.reweight), threshold=args.threshold)  # fmt: skip
    out = image_file(args.out, writer="figure")
    model, cfg = load_model(args.run_dir, device=str(resolve_device(args.device or "auto")))
    if args.image is not None:
        return _edit_image(args, model, cfg, edit, out)
    edits = [edit] * args.seeds
    source, edited = prompt_to_prompt(model, cfg, edits, seed=args.seed, **sampling)
    _, regenerated = prompt_to_prompt(model, cfg, [naive(edit)] * args.seeds, seed=args.seed, replan=True,
                                      **sampling)  # fmt: skip
    tiles = torch.stack([im for k in range(args.seeds) for im in (source[k], edited[k], regenerated[k])]).cpu()
    captions = [c for _ in range(args.seeds) for c in (edit.source, f"edit: {edit.target}", f"naive: {edit.target}")]
    path = save_captioned_grid(tiles, captions, out, ncol=3)
    print(f"wrote {args.seeds} edit(s) to {shown(path, args.out)} (each row: source | Prompt-to-Prompt | the naive "
          "baseline)")  # fmt: skip
    return 0


def _edit_image(args, model, cfg, edit: P2PEdit, out) -> int:
    if args.sampler is not None:
        raise DifflabError(f"--sampler {args.sampler}: a given image is inverted and edited with DDIM; leave it out")
    image = inv.read_image(args.image, cfg.data.image_size)
    device = next(model.network.parameters()).device
    inverted = inv.null_text_inversion(model, cfg, image.to(device), edit.source, steps=args.steps,
                                       cfg_scale=args.cfg, progress=sys.stderr.isatty())  # fmt: skip
    redrawn = inv.redraw(model, cfg, inverted)
    _, edited = prompt_to_prompt(model, cfg, [edit], inversion=inverted)
    _, regenerated = prompt_to_prompt(model, cfg, [naive(edit)], inversion=inverted)
    tiles = torch.cat([image.to(device), redrawn, edited, regenerated]).cpu()
    captions = [f"image: {edit.source}", f"redrawn ({psnr(redrawn[0], image[0].to(device)):.1f} dB)",
                f"edit: {edit.target}", f"naive: {edit.target}"]  # fmt: skip
    path = save_captioned_grid(tiles, captions, out, ncol=4)
    print(f"wrote the edit of '{args.image}' to {shown(path, args.out)} (image | its redraw after null-text "
          "inversion | Prompt-to-Prompt | the naive baseline)")  # fmt: skip
    return 0


def _invert(args) -> int:
    family = family_of_run(args.run_dir).name
    if family != "t2i":
        raise DifflabError(f"'{args.run_dir}' is a {family} run; inversion redraws with a text-to-image run")
    if (args.image is None) == (args.eval is None):
        raise DifflabError("give --image FILE to invert one image, or --eval N to measure inversion (not both)")
    model, cfg = load_model(args.run_dir, device=str(resolve_device(args.device or "auto")))
    world = world_preset(cfg.data.world)
    if args.eval is not None:
        report = {"run": str(args.run_dir)} | inversion_eval.evaluate(model, cfg, world, args.eval,
                                                                      progress=sys.stderr.isatty())  # fmt: skip
        if args.json:
            print(json.dumps(report))
            return 0
        print(f"{args.eval} world scenes inverted on '{args.run_dir}':")
        for name, r in report["reconstruction"].items():
            print(f"  {name:<10} PSNR {r['psnr']:.2f} dB, read as the same scene {r['same_scene']:.2f}")
        _print_swaps(report)
        return 0
    out = image_file(args.out, writer="figure")
    device = next(model.network.parameters()).device
    image = inv.read_image(args.image, cfg.data.image_size).to(device)
    prompt = args.prompt if args.prompt is not None else describe(read(image[0].cpu(), world))
    plain = inv.ddim_invert(model, cfg, image, prompt, steps=args.steps, cfg_scale=args.cfg)
    ddim = inv.redraw(model, cfg, plain)
    inverted = inv.optimise_nulls(model, cfg, plain, progress=sys.stderr.isatty())
    redrawn = inv.redraw(model, cfg, inverted)
    codec = model.codec.decode(model.codec.encode(image))
    tiles = torch.cat([image, codec, ddim, redrawn]).cpu()
    captions = [prompt, f"autoencoder ({psnr(codec[0], image[0]):.1f} dB)",
                f"DDIM inversion ({psnr(ddim[0], image[0]):.1f} dB)",
                f"null-text inversion ({psnr(redrawn[0], image[0]):.1f} dB)"]  # fmt: skip
    path = save_captioned_grid(tiles, captions, out, ncol=4)
    print(f"inverted '{args.image}' under \"{prompt}\": {captions[1]}, {captions[2]}, {captions[3]}; wrote "
          f"{shown(path, args.out)}")  # fmt: skip
    return 0


def _print_swaps(report: dict) -> None:
    print(f"{'method':<8} {'swap':<6} {'judged':>6} {'changed':>8} {'kept':>6} {'exact':>6} {'PSNR out':>9}")
    for method in ("p2p", "naive"):
        for kind, r in report[method].items():
            cells = [f"{r[k]:.2f}" if r[k] is not None else "-" for k in ("changed", "kept", "exact")]
            psnr_out = f"{r['psnr_outside']:.1f}" if r["psnr_outside"] is not None else "-"
            print(f"{method:<8} {kind:<6} {r['judged']:>6} {cells[0]:>8} {cells[1]:>6} {cells[2]:>6} {psnr_out:>9}")


def _evaluate(args, sampling: dict) -> int:
    examples = image_file(args.examples, "--examples", writer="figure") if args.examples else None
    model, cfg = load_model(args.run_dir, device=str(resolve_device(args.device or "auto")))
    world = world_preset(cfg.data.world)
    if examples is not None:
        tiles, captions, marks = p2p_eval.examples(model, cfg, world, min(8, args.eval), seed=args.seed,
                                                   case_seed=args.case_seed, blend=args.local_blend, tau=args.tau,
                                                   tau_self=args.tau_self, sampling=sampling)  # fmt: skip
        save_captioned_grid(tiles, captions, examples, ncol=3, marks=marks)
    report = p2p_eval.evaluate(model, cfg, world, args.eval, seed=args.seed, case_seed=args.case_seed,
                               progress=sys.stderr.isatty(), blend=args.local_blend, tau=args.tau,
                               tau_self=args.tau_self, **sampling)  # fmt: skip
    report = {"run": str(args.run_dir)} | report
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{args.eval} word swaps on '{args.run_dir}': the source holds its prompt in {report['source_holds']:.2f}")
    _print_swaps(report)
    return 0
