"""``difflab export RUN --format diffusers --out DIR``: a trained run in another library's layout
(:mod:`difflab.models.export` says what maps and why the rest is refused)."""

from __future__ import annotations

from difflab import cli_types
from difflab.models.export import FORMATS, export_diffusers


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a trained run in diffusers' folder layout",
        description="Write a pixel diffusion run (its EMA weights) into DIR as diffusers lays a pipeline out: "
        "unet/ (UNet2DModel), scheduler/ (the run's schedule, prediction type and spacing) and, for an "
        "unconditional run, model_index.json (DDIMPipeline). diffusers' own classes load it and compute what "
        "difflab computes. Runs that do not map exactly (autoencoders, latent and text-to-image diffusion) are "
        "refused with the reason; see docs/export.md.",
    )
    p.add_argument(
        "run_dir", metavar="RUN", help="pixel run directory made by 'difflab train' (or 'difflab demo')"
    )
    p.add_argument("--format", type=cli_types.choice("export format", FORMATS), default="diffusers",
                   help="output format (default and only one: diffusers)")  # fmt: skip
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (new, or empty)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    done = export_diffusers(args.run_dir, args.out)
    classes = f"{done.classes} classes + the null class" if done.classes else "unconditional"
    print(f"wrote UNet2DModel ({done.parameters / 1e6:.2f} M parameters, {classes}) and {done.scheduler} to "
          f"{done.out} (diffusers: UNet2DModel.from_pretrained('{done.out / 'unet'}'))")  # fmt: skip
    return 0
