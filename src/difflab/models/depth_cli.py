"""``difflab depth``: estimate an image's depth with a depth run (Marigold, or its one-step fine-tuning)."""

from __future__ import annotations

import torch

from difflab import cli_types
from difflab.diffusion.discretization import SPACINGS
from difflab.errors import DifflabError
from difflab.models import depth, depth_eval
from difflab.models.cli import SAMPLER, SAMPLER_HELP, STEPS
from difflab.models.inversion import read_image
from difflab.models.registry import family_of_run
from difflab.outputs import image_file, shown
from difflab.train.device import resolve_device
from difflab.viz import save_captioned_grid


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "depth",
        help="estimate an image's depth with a depth run (Marigold)",
        description="Estimate the depth of --image with a depth run (difflab train --preset depth_marigold --set "
        "base=RUN). A Marigold run samples --steps denoising steps from noise beside the image's latents and "
        "ensembles --ensemble draws (Ke et al. 2024, Eq. 4); an end-to-end run (--preset depth_e2e) takes one "
        "deterministic step. Writes the image beside its depth, coloured near red to far blue (and, with an "
        "ensemble, the draws' spread). The depth is affine-invariant: known up to a scale and shift.",
    )
    p.add_argument("run_dir", metavar="RUN", help="a depth run directory")
    p.add_argument("--image", default=None, metavar="FILE",
                   help="the image ('difflab world condition --preset depth32 --field image' draws one)")  # fmt: skip
    p.add_argument("--examples", type=cli_types.integer(1, 64), default=None, metavar="N",
                   help="instead of --image: N held-out scenes as image | truth | estimate | error")  # fmt: skip
    p.add_argument("--steps", type=STEPS, default=None, help="denoising steps (default: the run's)")
    p.add_argument("--ensemble", type=cli_types.integer(1, 100), default=None,
                   help="draws ensembled per image (default: the run's)")  # fmt: skip
    p.add_argument("--sampler", type=SAMPLER, default=None, help=SAMPLER_HELP)
    p.add_argument("--spacing", type=cli_types.choice("timestep spacing", SPACINGS), default=None,
                   help="timestep spacing: trailing (default: the run's), leading or linspace; one leading step "
                   "starts from t = 0 on pure noise (Garcia et al. 2025)")  # fmt: skip
    p.add_argument("--seed", type=cli_types.integer(0, 2**31 - 1), default=0, help="noise seed (default 0)")
    p.add_argument("--out", default="depth.png", help="output image (default: depth.png)")
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    p.set_defaults(func=_depth)


def _depth(args) -> int:
    family = family_of_run(args.run_dir).name
    if family != "depth":
        raise DifflabError(f"'{args.run_dir}' is a {family} run; difflab depth takes a depth run "
                           "(difflab train --preset depth_marigold --set base=RUN)")  # fmt: skip
    if (args.image is None) == (args.examples is None):
        raise DifflabError("give --image FILE (its depth) or --examples N (held-out scenes beside their truth), "
                           "not both or neither")  # fmt: skip
    out = image_file(args.out, writer="figure")
    system, cfg = depth.load_model(args.run_dir, device=str(resolve_device(args.device or "auto")))
    sampling = {"steps": args.steps, "ensemble": args.ensemble, "sampler": args.sampler, "spacing": args.spacing}
    if args.examples is not None:
        images, truth, _ = depth_eval.held_out(cfg.data.world_config(), args.examples, args.seed)
        pred, _ = depth.estimate(system, cfg, images, seed=args.seed, **sampling)
        path = depth_eval.save_examples(images, truth, pred, out)
        print(f"wrote {args.examples} held-out scenes (image | truth | estimate | error) to {shown(path, args.out)}")
        return 0
    image = read_image(args.image, cfg.data.image_size)  # (1, 3, S, S) in [-1, 1]
    estimate, spread = depth.estimate(system, cfg, image, seed=args.seed, **sampling)
    tiles = [image[0], depth_eval.colorize(estimate)[0]]
    captions = ["image", "depth (near red, far blue)"]
    if spread.abs().sum() > 0:
        tiles.append(depth_eval.colorize(spread)[0])
        captions.append("ensemble spread")
    path = save_captioned_grid(torch.stack(tiles), captions, out, ncol=len(tiles))
    print(f"wrote the image and its depth to {shown(path, args.out)}")
    return 0
