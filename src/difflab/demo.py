"""``difflab demo``: the main job, from nothing to a measured model in one command.

Text-to-image (the default, preset ``t2i_layout_demo``: LMD + GLIGEN), everything trained here from nothing:

1. draws the toy world and measures its reader, the judge of everything that follows (``world.png``);
2. trains the autoencoder (``vae_t2i``, ``vae/``), a small CLIP whose text tower becomes the frozen text
   encoder (``clip_t2i``, ``clip/`` -> ``text_encoder/``) and the caption -> layout planner
   (``planner_demo``, ``planner/``);
3. trains the grounded latent diffusion model, the painter (``run/``);
4. draws GenEval-style prompts of every category on their planned layouts (``samples.png``, the boxes
   dashed, each caption green where the reader finds the prompt true, red where not) and the
   cross-attention maps of a few (``attention.png``);
5. scores ``--n`` prompts per category: faithfulness per category and overall (``report.json``), beside
   the Stable-Diffusion baseline's figures from the recipe comparison of docs/t2i.md.

``--preset t2i_demo`` runs that baseline itself (cross-attention to the caption alone, no planner).

Any pixel preset can stand in (``--preset demo``: class-conditional pixel diffusion, judged by the reader's
class accuracy; ``--preset tiny`` finishes in seconds; ``--preset digits`` is judged by an SVC).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from pathlib import Path

import torch

from difflab import cli_types
from difflab.config import apply_overrides
from difflab.data.config import class_factors, num_classes
from difflab.errors import DifflabError
from difflab.models import pixel, t2i, t2i_eval
from difflab.models.attention_maps import CrossAttentionMaps, save_attention_overlays
from difflab.models.cli import add_preset_args, check_n, config_from_args
from difflab.models.codecs import attach_autoencoder
from difflab.models.layout import outlines
from difflab.models.registry import get_family, get_preset
from difflab.models.runs import has_checkpoints
from difflab.models.text_encoder import export_text_encoder
from difflab.outputs import image_folder
from difflab.train.device import cpu_model, resolve_device
from difflab.train.side_by_side import Job, run_side_by_side
from difflab.viz import save_captioned_grid, save_grid
from difflab.world.check import check_reader
from difflab.world.geneval import CATEGORIES, eval_prompts
from difflab.world.preview import save_preview
from difflab.world.prompts import holds
from difflab.world.reader import read
from difflab.world.scene import world_preset


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="the main job: train text-to-image from nothing, sample it and score it (DIR/report.json)",
        description="From nothing to a measured text-to-image model: draw the toy world and check its reader, "
        "train an autoencoder, a small CLIP (its text tower is the frozen text encoder), a caption -> layout planner "
        "and the grounded latent diffusion model that paints the planned layouts (LMD + GLIGEN; minutes on a "
        "2-core CPU), draw prompts of every GenEval-style category on their planned layouts into DIR/samples.png "
        "with cross-attention maps in DIR/attention.png, and write faithfulness per category and timings to "
        "DIR/report.json. --preset t2i_demo runs the Stable-Diffusion baseline (no planner); --preset demo the "
        "class-conditional pixel demo.",
    )
    p.add_argument("--out", default="demo_out", help="output directory (default: demo_out)")
    add_preset_args(p, "train.steps=3000")  # a t2i or pixel preset; tiny ones finish in seconds
    p.set_defaults(preset="t2i_layout_demo")
    p.add_argument(
        "--vae-preset",
        default="auto",
        help="text-to-image: the autoencoder's preset, or 'none' for pixels (default: auto, no autoencoder when "
        "the preset's pixel options are set (pixel_patch > 1 or pixel_norm), else vae_t2i)",
    )
    p.add_argument(
        "--text-preset",
        default="clip_t2i",
        help="text-to-image: the CLIP preset that trains the text encoder (default: clip_t2i)",
    )
    p.add_argument(
        "--planner-preset",
        default="planner_demo",
        help="text-to-image with recipe 'layout': the caption -> layout planner's preset (default: planner_demo)",
    )
    p.add_argument(
        "--n",
        type=cli_types.integer(None, cli_types.MAX_IMAGES),  # >= 1: check_n, once the default is known
        default=None,
        help="text-to-image: prompts per category to score (default: 50); pixel: samples (default: 400)",
    )
    p.add_argument("--seed", type=cli_types.seed, default=0, help="sampling seed (default: 0)")
    p.add_argument(
        "--jobs",
        type=cli_types.integer(1, 3),
        default=2,
        help="text-to-image: how many of the painter's parents (autoencoder, CLIP, planner) train at once, "
        "each in its own process with an equal share of the threads; 1 trains them one after another "
        "(default: 2: small networks use two cores poorly, docs/t2i.md)",
    )
    p.add_argument("--device", default=None, help="auto (default), cpu, cuda, mps")
    p.set_defaults(func=run_demo)


def _sample_grid(run_dir: Path, path: Path, seed: int) -> Path:
    """Two samples of every class; on the toy world the rows are shapes and the columns colours."""
    model, cfg = pixel.load_model(run_dir)
    classes = num_classes(cfg.data)
    if classes is None:
        return save_grid(pixel.generate(model, cfg, 64, seed=seed), path)
    factors = class_factors(cfg.data)
    per_row = factors[1] if factors else classes  # class = shape * colours + colour
    # two copies of the class table, one under the other: (2 * classes / per_row, per_row) tiles
    labels = torch.arange(classes).repeat(2)
    images = pixel.generate(model, cfg, len(labels), labels=labels, seed=seed)
    return save_grid(images, path, nrow=per_row)


def run_demo(args) -> int:
    family = get_preset(args.preset).family
    if family not in ("pixel", "t2i"):
        raise DifflabError(
            f"--preset {args.preset} is a {family} preset; the demo trains a t2i preset (default) or a pixel one"
        )
    if args.n is None:
        args.n = 50 if family == "t2i" else 400
    check_n(args.n)
    # Everything the run will need is checked before any work starts; a t2i request is resolved again by
    # its training, once the text encoder and the autoencoder it names exist.
    request = config_from_args(args)
    record = get_family(family).resolve(request, attach=False)
    cfg = record if family == "pixel" else request
    out = Path(args.out)
    run_dir = out / "run"
    if has_checkpoints(run_dir):  # refused before any work, with a message that fits the demo
        raise DifflabError(f"'{run_dir}' already holds a trained run; pick a new --out or delete it")
    image_folder(out, "--out")  # made, and checked to take files, before any work
    report: dict = {
        "preset": args.preset,
        "overrides": list(args.overrides),
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(),
                    "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }  # fmt: skip
    timings: dict[str, float] = {}
    start = time.perf_counter()
    steps = 5 if family == "t2i" else 4

    dataset = "toy" if family == "t2i" else cfg.data.dataset
    if dataset == "toy":
        world = world_preset(cfg.data.world)
        save_preview(world, 16, args.seed, out / "world.png")
        reader = check_reader(world, 200, seed=args.seed + 12345)
        report["reader"] = {k: reader[k] for k in ("n", "exact_scene_accuracy", "attribute_accuracy")}
        print(f"[1/{steps}] the judge: the reader reads {reader['exact_scene_accuracy']:.1%} of 200 real "
              f"{cfg.data.world} scenes exactly; the world is drawn in {out / 'world.png'}")  # fmt: skip
    else:
        print(f"[1/4] the judge: see the eval section of {out / 'report.json'} (dataset {cfg.data.dataset})")
    timings["judge_seconds"] = time.perf_counter() - start
    if family == "t2i":
        return _text_to_image(args, cfg, out, report, timings, start)

    t0 = time.perf_counter()
    print(f"[2/4] training '{args.preset}' for {cfg.train.steps} steps into {run_dir} ...", flush=True)
    pixel.train(cfg, run_dir)
    timings["train_seconds"] = time.perf_counter() - t0
    report["train"] = _train_summary(run_dir, cfg)

    t0 = time.perf_counter()
    grid = _sample_grid(run_dir, out / "samples.png", args.seed)
    timings["grid_seconds"] = time.perf_counter() - t0
    print(f"[3/4] samples of every class -> {grid}")

    t0 = time.perf_counter()
    scores = pixel.evaluate(run_dir, args.n, seed=args.seed)
    timings["eval_seconds"] = time.perf_counter() - t0
    report["eval"] = scores
    _finish(out, report, timings, start)
    accuracy = scores.get("class_accuracy")
    summary = "" if accuracy is None else f"class accuracy {accuracy:.1%} by the {scores['judge']}, "
    print(f"[4/4] {summary}Fréchet distance {scores['frechet_distance']:.3f} ({scores['frechet_feature_space']}, "
          f"n={args.n})")  # fmt: skip
    print(f"done in {timings['total_seconds']:.0f} s: {out / 'samples.png'} (samples), {out / 'report.json'} "
          f"(scores, timings), {run_dir} (the run: difflab sample|eval {run_dir})")  # fmt: skip
    return 0


def _train_summary(run_dir: Path, cfg) -> dict:
    """The report's training line: steps, batch size and the last logged loss."""
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"steps": cfg.train.steps, "batch_size": cfg.train.batch_size, "final_loss": last["loss"]}


def _finish(out: Path, report: dict, timings: dict, start: float) -> None:
    timings["total_seconds"] = time.perf_counter() - start
    report["timings"] = {k: round(v, 2) for k, v in timings.items()}
    (out / "report.json").write_text(json.dumps(report, indent=2))


def _text_to_image(args, cfg, out: Path, report: dict, timings: dict, start: float) -> int:
    """Steps 2-5 of the text-to-image demo (see the module docstring)."""
    run_dir = _train_text_to_image(args, cfg, out, timings)
    report["train"] = _train_summary(run_dir, cfg)

    t0 = time.perf_counter()
    model, cfg = t2i.load_model(run_dir, device=str(resolve_device(args.device or "auto")))
    _prompt_grid(model, cfg, out, args.seed)
    timings["grid_seconds"] = time.perf_counter() - t0
    print(f"[4/5] prompts of every category -> {out / 'samples.png'} (green: the reader finds the prompt true), "
          f"cross-attention maps -> {out / 'attention.png'}")  # fmt: skip

    t0 = time.perf_counter()
    prompts = eval_prompts(cfg.data.world, args.n)
    images = t2i_eval.generate_batched(model, cfg, [p.text() for p in prompts], seed=args.seed).cpu()
    faith = t2i_eval.score(prompts, images, cfg.data.world, cfg.data.pairs())
    timings["eval_seconds"] = time.perf_counter() - t0
    report["eval"] = {"prompts_per_category": args.n, "sampler": cfg.sample.sampler, "steps": cfg.sample.steps,
                      "cfg_scale": cfg.sample.cfg_scale, "judge": "toy-world reader",
                      "heldout_pairs": list(cfg.data.heldout_pairs), "faithfulness": faith}  # fmt: skip
    _finish(out, report, timings, start)
    _print_faithfulness(faith)
    _print_baseline(cfg.recipe)
    print(
        f"done in {timings['total_seconds']:.0f} s: {out / 'samples.png'}, {out / 'attention.png'}, "
        f'{out / "report.json"}; try: difflab generate {run_dir} "a red circle to the left of a blue square"'
    )
    return 0


def _train_text_to_image(args, cfg, out: Path, timings: dict) -> Path:
    """Steps 2-3: the painter's parents side by side (autoencoder, then its latents of the training
    scenes; CLIP, then its exported text tower; the planner), then the t2i run itself."""
    vae_preset = args.vae_preset
    if vae_preset == "auto":
        vae_preset = "none" if cfg.pixel_patch > 1 or cfg.pixel_norm else "vae_t2i"
    overrides = [f"train.device={args.device}"] if args.device else []
    workers = min(args.jobs, (vae_preset != "none") + 1 + (cfg.recipe == "layout"))
    if workers > 1:  # their bars would overwrite each other: one line per finished stage instead
        overrides.append("train.progress=false")
    threads = max(1, torch.get_num_threads() // workers)

    def stage_config(preset: str):  # the demo's --device applies to every stage
        return apply_overrides(get_preset(preset).build(), overrides)

    def done(name: str, seconds: float) -> None:
        timings[f"{name}_seconds"] = seconds
        print(f"      {name.replace('_', ' ')}: trained in {seconds:.0f} s", flush=True)

    t0 = time.perf_counter()
    jobs, what, vae_dir = [], [], None
    if vae_preset != "none":
        vae_dir = out / "vae"
        vae_cfg = stage_config(vae_preset)
        jobs.append(Job("vae", _train_autoencoder, (vae_preset, vae_cfg, vae_dir, cfg), done))
        what.append(f"the autoencoder '{vae_preset}' ({vae_cfg.train.steps} steps) into {vae_dir}, then "
                    f"its latents of the {cfg.data.n:,} training scenes")  # fmt: skip
    clip_cfg = stage_config(args.text_preset)
    jobs.append(Job("text_encoder", _train_text_encoder, (args.text_preset, clip_cfg, out), done))
    what.append(
        f"the text encoder: CLIP '{args.text_preset}' ({clip_cfg.train.steps} steps) into {out / 'clip'}"
    )
    if cfg.recipe == "layout":
        planner_cfg = stage_config(args.planner_preset)
        planner_cfg = dataclasses.replace(planner_cfg, data=dataclasses.replace(  # the painter's world and pairs
            planner_cfg.data, world=cfg.data.world, heldout_pairs=cfg.data.heldout_pairs))  # fmt: skip
        jobs.insert(
            0, Job("planner", _train_stage, (args.planner_preset, planner_cfg, out / "planner"), done)
        )
        what.insert(0, f"the layout planner '{args.planner_preset}' ({planner_cfg.train.steps} steps) into "
                       f"{out / 'planner'}")  # fmt: skip
    at_once = (
        f", {workers} at a time, {threads} thread{'s' * (threads > 1)} each (--jobs)" if workers > 1 else ""
    )
    print(
        f"[2/5] training what the painter needs{at_once}:",
        *(f"      - {w}" for w in what),
        sep="\n",
        flush=True,
    )
    results = run_side_by_side(jobs, workers=workers, threads=threads)
    cfg = dataclasses.replace(cfg, text_encoder=str(results["text_encoder"][0]),
                              vae=None if vae_dir is None else str(vae_dir),
                              planner=str(out / "planner") if cfg.recipe == "layout" else cfg.planner)  # fmt: skip
    timings["parents_seconds"] = time.perf_counter() - t0
    print(f"[3/5] training text-to-image '{args.preset}' for {cfg.train.steps} steps into {out / 'run'} ...",
          flush=True)  # fmt: skip
    t1 = time.perf_counter()
    # one sample grid, at the end: step 4 draws the demo's own, and each grid on the way costs seconds
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, sample_every=None))
    _train_stage(args.preset, cfg, out / "run")
    timings["t2i_seconds"] = time.perf_counter() - t1
    timings["train_seconds"] = time.perf_counter() - t0
    return out / "run"


def _train_stage(preset: str, cfg, run_dir: Path) -> None:
    """One training of the demo (module level: it may run in a process of its own)."""
    get_family(get_preset(preset).family).train(cfg, run_dir)


def _train_autoencoder(preset: str, cfg, run_dir: Path, painter_cfg) -> None:
    """The autoencoder, then its latents of the painter's training scenes into its run's cache, where the
    painter's training finds them."""
    _train_stage(preset, cfg, run_dir)
    painter_cfg = dataclasses.replace(painter_cfg, vae=str(run_dir))
    d = painter_cfg.data
    t2i.training_latents(attach_autoencoder(painter_cfg, "toy", d.world, d.image_size))


def _train_text_encoder(preset: str, cfg, out: Path) -> Path:
    """CLIP, then its text tower exported: the painter's frozen text encoder."""
    _train_stage(preset, cfg, out / "clip")
    return export_text_encoder(out / "clip", out / "text_encoder")


def _prompt_grid(model, cfg, out: Path, seed: int, per_category: int = 6) -> None:
    """Step 4: one row of prompts per category (captions green where the reader finds the prompt true)
    into samples.png, and the cross-attention maps of each category's first prompt into attention.png."""
    prompts = eval_prompts(cfg.data.world, per_category)  # category by category
    maps = CrossAttentionMaps(cfg.data.image_size)
    world = world_preset(cfg.data.world)
    request, boxes = [p.text() for p in prompts], None
    if cfg.recipe == "layout":  # plan first, so the grid can show the layout each image was painted on
        request = model.conditioner.plan(request, seed)
        boxes = [outlines(scene, world) for scene in request.scenes]
    images = t2i.generate(model, cfg, request, seed=seed, attention=maps).cpu()
    marks = [holds(p, read(im, world)) for p, im in zip(prompts, images, strict=True)]
    save_captioned_grid(images, [p.text() for p in prompts], out / "samples.png", ncol=per_category, marks=marks,
                        boxes=boxes)  # fmt: skip
    first_of_each = list(range(0, len(prompts), per_category))  # the first prompt of each category
    save_attention_overlays(images[first_of_each], maps.maps()[first_of_each],
                            [prompts[i].text() for i in first_of_each], out / "attention.png")  # fmt: skip


RECIPES_MEASURED = Path(__file__).parent / "models" / "t2i_recipes.json"
"""The recipe comparison of docs/t2i.md (``benchmarks/t2i_recipes.py --json``): what the baseline scored."""


def _print_baseline(recipe: str) -> None:
    """The SD baseline's figures from the comparison, beside a run of another recipe."""
    if recipe == "sd" or not RECIPES_MEASURED.is_file():
        return
    doc = json.loads(RECIPES_MEASURED.read_text())
    sd = next((r for r in doc["records"] if r["recipe"] == "sd"), None)
    if sd is not None:
        cats = ", ".join(f"{c} {sd['shipped'][c]:.2f}" for c in CATEGORIES)
        print(f"      the SD baseline (--preset t2i_demo), measured {doc['date']} on {doc['machine']['cpu']}: "
              f"{sd['shipped']['overall']:.1%} overall ({cats}; guidance {sd['shipped']['cfg_scale']:g}, "
              f"n={doc['n']} per category)")  # fmt: skip


def _print_faithfulness(faith: dict) -> None:
    """Step 5's lines: the scores, how the two-object misses look, and the held-out pairs."""
    overall = faith["all"]["overall"]
    cats = ", ".join(f"{c} {v['score']:.2f}" for c, v in faith["all"].items() if c != "overall")
    print(f"[5/5] faithfulness {overall['score']:.1%} overall on {overall['n']} prompts ({cats})")
    pairs = [
        faith["objects_read"][c]
        for c in ("two_objects", "position", "attribute_binding")
        if c in faith["objects_read"]
    ]
    if pairs:  # how the two-object misses look: a missing object, or one the model added
        total = Counter()
        for h in pairs:
            total.update({min(int(k), 3): n for k, n in h.items()})
        n = sum(total.values())
        shares = ", ".join(f"{'3+' if k == 3 else k}: {total[k] / n:.0%}" for k in sorted(total))
        blends = sum(faith.get("two_coloured_objects", {}).get(c, 0)
                     for c in ("two_objects", "position", "attribute_binding"))  # fmt: skip
        print(f"      objects the reader found for two-object prompts: {shares} ({blends} of the {n} images held "
              "one object drawn in two colours, read as two)")  # fmt: skip
    if "heldout_pairs" in faith:
        unseen = faith["heldout_pairs"]["overall"]
        print(f"      prompts naming a (colour, shape) pair never seen in training: {unseen['score']:.1%} "
              f"(n={unseen['n']})")  # fmt: skip
