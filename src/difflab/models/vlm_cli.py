"""``difflab ask`` and ``difflab caption``: a vision-language run answers a question about an image, or
describes it; ``--examples N`` does it on held-out scenes beside the world's truth."""

from __future__ import annotations

import json

import torch

from difflab import cli_types
from difflab.data.vqa import caption_cases, vqa_cases
from difflab.errors import DifflabError
from difflab.models import vlm
from difflab.models.inversion import read_image
from difflab.models.registry import family_of_run
from difflab.outputs import image_file, shown
from difflab.train.device import resolve_device
from difflab.viz import save_captioned_grid
from difflab.world.language import describe


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ask",
        help="answer a question about an image with a vision-language run",
        description="Answer QUESTION (right after RUN) about --image with a vision-language run (difflab train "
        "--preset vlm_llava ...), greedily, in the world's words ('how many circles?', 'what colour is the "
        "square?', 'is there a red circle?', 'where is the triangle?'). --examples N asks N held-out scenes "
        "their questions instead and prints each answer beside the truth.",
    )
    _common(p)
    p.add_argument("question", nargs="?", default=None, help="the question, right after RUN (with --image)")
    p.set_defaults(func=_ask)
    p = subparsers.add_parser(
        "caption",
        help="describe an image with a vision-language run",
        description="Describe --image with a vision-language run: the continuation of 'describe the image .' after "
        "its visual tokens. --examples N captions N held-out scenes and writes them under their captions "
        "(--out), printing each beside the scene's true description.",
    )
    _common(p)
    p.add_argument("--out", default="captions.png", help="with --examples: the grid (default: captions.png)")
    p.set_defaults(func=_caption)


def _common(p) -> None:
    p.add_argument("run_dir", metavar="RUN", help="a vision-language (vlm) run directory")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="the image ('difflab world condition --field image' draws one)")  # fmt: skip
    p.add_argument("--examples", type=cli_types.integer(1, 256), default=None, metavar="N",
                   help="instead of --image: N held-out scenes of the run's world")  # fmt: skip
    p.add_argument("--seed", type=cli_types.integer(0, 2**31 - 1), default=0,
                   help="which held-out scenes --examples draws (default 0)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")


def _load(args):
    family = family_of_run(args.run_dir).name
    if family != "vlm":
        raise DifflabError(f"'{args.run_dir}' is a {family} run; difflab {args.command} takes a vision-language "
                           "run (difflab train --preset vlm_llava --set vision=CLIP_RUN --set lm=LM_RUN)")  # fmt: skip
    if (args.image is None) == (args.examples is None):
        raise DifflabError("give --image FILE or --examples N, not both or neither")
    return vlm.load_model(args.run_dir, device=str(resolve_device(args.device or "auto")))


def _ask(args) -> int:
    model, cfg = _load(args)
    world = cfg.data.world_config()
    if args.examples is not None:
        if args.question is not None:
            raise DifflabError(f"--examples asks each scene its own question; got QUESTION '{args.question}' too")
        cases = vqa_cases(world, args.examples, args.seed, heldout=cfg.data.pairs())
        with torch.no_grad():
            answers = vlm.answer(model, cfg, torch.stack([c.image for c in cases]), [c.question for c in cases])
        right = 0
        for c, a in zip(cases, answers, strict=True):
            right += a == c.answer
            if args.json:
                print(json.dumps({"question": c.question, "answer": a, "truth": c.answer, "kind": c.kind}))
            else:
                print(f"{'✓' if a == c.answer else '✗'} {c.question} {a}   (truth: {c.answer}; {describe(c.scene)})")
        if not args.json:
            print(f"{right} of {len(cases)} right (difflab eval {args.run_dir} --json scores hundreds, per kind)")
        return 0
    if args.question is None or not args.question.strip():
        raise DifflabError("give the QUESTION to ask about --image, right after RUN, e.g. difflab ask RUN 'how many "
                           "circles?' --image in.png")  # fmt: skip
    image = read_image(args.image, cfg.data.world_config().resolution)
    with torch.no_grad():
        answer = vlm.answer(model, cfg, image, [args.question.strip()])[0]
    print(json.dumps({"question": args.question.strip(), "answer": answer}) if args.json else answer)
    return 0


def _caption(args) -> int:
    model, cfg = _load(args)
    world = cfg.data.world_config()
    if args.examples is None:
        image = read_image(args.image, cfg.data.world_config().resolution)
        with torch.no_grad():
            text = vlm.caption(model, cfg, image)[0]
        print(json.dumps({"caption": text}) if args.json else text)
        return 0
    out = image_file(args.out, writer="figure")
    cases = caption_cases(world, args.examples, args.seed, heldout=cfg.data.pairs())
    images = torch.stack([c.image for c in cases])
    with torch.no_grad():
        texts = vlm.caption(model, cfg, images)
    for c, t in zip(cases, texts, strict=True):
        truth = describe(c.scene)
        print(json.dumps({"caption": t, "truth": truth}) if args.json else f"{t}   (truth: {truth})")
    path = save_captioned_grid(images, texts, out, ncol=min(4, len(texts)))
    if not args.json:
        print(f"wrote {len(texts)} held-out scenes under their captions to {shown(path, args.out)}")
    return 0
