"""Sample quality against network evaluations (NFE): every sampler on one trained class-conditional model.

Each row draws the same ``--per-class`` samples of every class (one fixed label set) from the SAME
starting noise (``--seed``), with the run's guidance scale and timestep spacing, and scores them twice:

- the class accuracy of the dataset's judge, as ``difflab eval`` scores it: on the toy world, the reader
  (exactly one object with the requested shape and colour); with its binomial standard error;
- the Fréchet distance in the ``pixels8`` feature space (:mod:`difflab.eval.frechet`) to n held-out real
  images, beside the distance between two real sets of the same n (the floor at this n).

NFE is counted: a hook counts the UNet's forward calls (one call per step even under guidance, whose
conditional and unconditional halves share one batch). ``nfe_nominal`` is the usual convention (steps;
2 steps - 1 for Heun); the two differ for Heun where its first step starts above
``HEUN_MAX_SIGMA`` (the cosine schedule at t = T-1), which takes an Euler step alone.

The goal checked (``--goal-nfe``, ``--goal-points``): some sampler at <= 10 NFE (DDPM's own short runs
included) reaches the class accuracy of DDPM's largest step count (1,000) to within 2 points. The
paired standard error of that difference (same labels, same starting noise) is reported with it.

The model: ``--run RUN_DIR`` (a pixel or ldm run, class-conditional). Without it the script trains
``--preset`` (default ``ldm_toy``: class-conditional latent diffusion on the one-object toy world, on the
8x8x8 latents of a ``vae_f4`` autoencoder, itself trained from ``--vae-preset`` unless ``--vae RUN`` is
given) into ``--cache-dir`` (default runs/benchmark_samplers/ in the repository), and reuses a run there
whose saved config is the one asked for (resuming one that stopped part way). On this 2-core machine
with one thread: training 8 minutes once (autoencoder 5, latent model 3 with the encoding); the default
sweep (n = 400) samples for about 13 more, 10 of them DDPM-1000.

Prints one JSON object on stdout (every row, the goal, the model, the machine), a Markdown table on
stderr, and writes the plot (class accuracy and FD against NFE, log axis) to ``--plot`` (default:
``samplers_nfe.png`` in the cache directory; ``--plot assets/samplers_nfe.png`` redraws the docs' figure). A row's
``seconds`` is its sampling time, decoding included for latent models; scoring is not timed.

    python benchmarks/samplers.py                                  # ldm_toy, trained into the cache if needed
    python benchmarks/samplers.py --run demo_out/run --per-class 2 --plot /tmp/pixel_nfe.png
    python benchmarks/samplers.py --preset ldm_toy --set train.steps=4000 --vae runs/vae_f4
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine
from sampler_convergence import network_calls

from difflab.config import apply_overrides, to_dict
from difflab.data.config import held_out_images, num_classes
from difflab.diffusion.samplers import SAMPLERS
from difflab.eval.frechet import frechet_distance, pixels8_features
from difflab.models.pixel_eval import score_samples
from difflab.models.registry import family_of_run, get_family, get_preset
from difflab.models.runs import load_run_config
from difflab.models.system import generate_classes

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_STEPS = {"ddpm": "10,20,100,1000", "ddim": "10,20,50,100", "dpmpp_2m": "5,10,20",
                 "dpmpp_2m_sde": "5,10,20,50", "sa_solver": "5,10,20", "euler": "5,10,20",
                 "heun": "3,5,10"}  # fmt: skip
STYLE = {"ddpm": "k*-", "ddim": "o-", "dpmpp_2m": "s-", "dpmpp_2m_sde": "D-", "sa_solver": "P-", "euler": "v--",
         "heun": "^-"}  # fmt: skip


# ----------------------------------------------------------------------------------------------- model


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True).encode()).hexdigest()[:10]


def same_config(module, run_dir: Path, wanted) -> bool:
    """Whether ``run_dir`` was trained with ``wanted``, read through today's config classes (so a field
    added since, at its default, does not make a cached run look different)."""
    from difflab.errors import DifflabError

    try:
        return load_run_config(run_dir, module.config, module.name, module.what) == wanted
    except DifflabError:  # not a run, or one of an incompatible version
        return False


def trained(family: str, cfg, cache: Path, name: str) -> Path:
    """A run of ``cfg`` trained to ``cfg.train.steps`` in ``cache``: a folder ``name-*`` with the same
    config is reused (resumed when it stopped part way); otherwise ``name-<config hash>`` is trained."""
    from difflab.models.runs import has_checkpoints
    from difflab.train.checkpoint import list_checkpoints

    module = get_family(family)
    wanted = module.resolve(cfg)  # the run record, what a run saves as its config
    same = [d for d in sorted(cache.glob(f"{name}-*")) if same_config(module, d, wanted)]
    run_dir = same[0] if same else cache / f"{name}-{config_hash(cfg)}"
    done = max((step for step, _ in list_checkpoints(run_dir / "checkpoints")), default=0)
    if done < cfg.train.steps:
        print(f"training '{name}' ({cfg.train.steps} steps) into {run_dir} ...", file=sys.stderr)
        module.train(cfg, run_dir, resume=has_checkpoints(run_dir))
    return run_dir


def cached_run(args) -> Path:
    """The run of ``--preset`` (and its autoencoder, for the ldm family) in the cache, trained if missing."""
    preset = get_preset(args.preset)
    if preset.family not in ("pixel", "ldm"):
        raise SystemExit(
            f"preset '{args.preset}' is a '{preset.family}' model; expected a pixel or ldm preset"
        )
    cache = Path(args.cache_dir)
    cfg = apply_overrides(preset.build(), ["train.progress=false", *args.set])
    if preset.family == "ldm" and cfg.vae is None:
        vae_run = args.vae
        if vae_run is None:
            vae_cfg = apply_overrides(
                get_preset(args.vae_preset).build(), ["train.progress=false", *args.vae_set]
            )
            vae_run = trained("vae", vae_cfg, cache, args.vae_preset)
        cfg = apply_overrides(cfg, [f"vae={Path(vae_run).resolve()}"])
    return trained(preset.family, cfg, cache, args.preset)


class CallCounter:
    """Counts a module's forward calls (a forward pre-hook), i.e. network evaluations."""

    def __init__(self, module: torch.nn.Module):
        self.calls = 0
        module.register_forward_pre_hook(self._hook)

    def _hook(self, module, inputs) -> None:
        self.calls += 1


# -------------------------------------------------------------------------------------------- measuring


def world_hits(cfg, images: torch.Tensor, labels: torch.Tensor) -> np.ndarray | None:
    """Per-sample hits of the toy world's reader (the paired comparison needs them); None elsewhere."""
    if cfg.data.dataset != "toy":
        return None
    from difflab.eval.conditional import toy_class_hits
    from difflab.world.scene import world_preset

    return toy_class_hits(images, labels, world_preset(cfg.data.world))


def measure(
    family, model, cfg, counter, labels, real_feats, *, sampler, steps, cfg_scale, spacing, seed, options=None
) -> dict:
    counter.calls = 0
    start = time.perf_counter()
    images = generate_classes(model, cfg, len(labels), labels=labels, sampler=sampler, steps=steps,
                              cfg_scale=cfg_scale, spacing=spacing, seed=seed, sampler_options=options)  # fmt: skip
    seconds = time.perf_counter() - start
    assert images.shape[0] == len(labels) and bool(torch.isfinite(images).all()), (
        f"{sampler} {steps}: bad samples"
    )
    acc = score_samples(cfg, images, labels)["class_accuracy"]
    n = len(labels)
    return {
        "sampler": sampler, "steps": steps, "nfe": counter.calls, "nfe_nominal": network_calls(sampler, steps),
        "class_accuracy": acc, "accuracy_se": math.sqrt(acc * (1 - acc) / n), "n": n,
        "frechet_distance": frechet_distance(pixels8_features(images), real_feats), "frechet_n": n,
        "seconds": round(seconds, 2), "hits": world_hits(cfg, images, labels), "options": options or {},
    }  # fmt: skip


def goal(rows: list[dict], nfe: int, points: float) -> dict:
    """Whether some row at <= ``nfe`` NFE is within ``points`` accuracy points of DDPM's largest run."""
    ddpm = [r for r in rows if r["sampler"] == "ddpm"]
    cheap = [r for r in rows if r["nfe"] <= nfe]
    if not ddpm or not cheap:
        return {"checked": False, "why": f"needs a ddpm row and a row at <= {nfe} NFE"}
    ref = max(ddpm, key=lambda r: r["steps"])
    out = {"checked": True, "reference": f"ddpm {ref['steps']}", "reference_accuracy": ref["class_accuracy"],
           "max_nfe": nfe, "tolerance": points / 100, "rows": []}  # fmt: skip
    for r in cheap:
        diff = r["class_accuracy"] - ref["class_accuracy"]
        row = {"sampler": r["sampler"], "steps": r["steps"], "nfe": r["nfe"], "accuracy_minus_reference": diff,
               "within": diff >= -points / 100}  # fmt: skip
        if r["hits"] is not None and ref["hits"] is not None:  # same labels and noise: a paired difference
            d = r["hits"].astype(float) - ref["hits"].astype(float)
            row["difference_se_paired"] = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None
        out["rows"].append(row)
    out["met"] = any(r["within"] for r in out["rows"])
    return out


# ----------------------------------------------------------------------------------------------- output


def plot(rows: list[dict], result: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from difflab.viz import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "class_accuracy", "reader class accuracy"),
                           (axes[1], "frechet_distance", "Fréchet distance (pixels8)")):  # fmt: skip
        for name in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["nfe"], r[key]) for r in rows if r["sampler"] == name)
            ax.plot(*zip(*pts, strict=True), STYLE.get(name, "o-"), label=name, markersize=6)
        ax.set_xscale("log")
        lo, hi = min(r["nfe"] for r in rows), max(r["nfe"] for r in rows)
        ticks = [v for v in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000) if lo <= v <= hi] or [lo]
        ax.set_xticks(ticks, [str(v) for v in ticks])
        ax.minorticks_off()
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    g = result["goal"]
    if g["checked"]:
        ref = g["reference_accuracy"]
        axes[0].axhline(ref, color="k", lw=0.8, ls=":", label=g["reference"])
        axes[0].axhline(
            ref - g["tolerance"], color="tab:red", lw=0.8, ls="--", label="goal: reference - 2 points"
        )
        axes[0].axvline(g["max_nfe"], color="tab:red", lw=0.8, ls=":")
    axes[1].axhline(result["real_vs_real_frechet_distance"], color="k", lw=0.8, ls=":", label="real vs real")
    for ax in axes:
        ax.legend(fontsize=8)
    m = result["model"]
    fig.suptitle(f"{m['preset_or_run']}: one label set (n = {rows[0]['n']}), the same starting noise, "
                 f"w = {m['cfg_scale']:g}, {m['spacing']} spacing", fontsize=10)  # fmt: skip
    return save_figure(fig, path)


def table(rows: list[dict]) -> str:
    lines = ["| sampler | steps | NFE | class accuracy (± s.e.) | Fréchet distance (pixels8) | n | seconds |",
             "|---|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        nfe = str(r["nfe"]) if r["nfe"] == r["nfe_nominal"] else f"{r['nfe']} ({r['nfe_nominal']} nominal)"
        lines.append(f"| {r['sampler']} | {r['steps']} | {nfe} | {r['class_accuracy']:.4f} ± {r['accuracy_se']:.3f} "
                     f"| {r['frechet_distance']:.3f} | {r['n']} | {r['seconds']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--run", default=None, help="a trained class-conditional pixel or ldm run (default: train one)"
    )
    p.add_argument("--preset", default="ldm_toy", help="without --run: the pixel or ldm preset to train")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override in --preset")
    p.add_argument("--vae", default=None, help="ldm presets: an autoencoder run to use (default: train one)")
    p.add_argument("--vae-preset", default="vae_f4", help="ldm presets without --vae: the autoencoder preset")
    p.add_argument(
        "--vae-set", action="append", default=[], metavar="KEY=VALUE", help="override in --vae-preset"
    )
    p.add_argument(
        "--cache-dir",
        default=str(ROOT / "runs" / "benchmark_samplers"),
        help="where the trained runs are kept and reused (default: runs/benchmark_samplers)",
    )
    p.add_argument("--per-class", type=int, default=10, help="samples per class (default 10: n = 400 of 40)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's)")
    p.add_argument("--spacing", default=None, help="timestep spacing (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="the starting noise of every row")
    for name in SAMPLERS:
        flag = name.replace("_", "-")
        p.add_argument(
            f"--{flag}",
            default=DEFAULT_STEPS[name],
            metavar="STEPS",
            help=f"{name} step counts, comma-separated, '' for none (default: {DEFAULT_STEPS[name]})",
        )
    p.add_argument("--sde-eta", type=float, default=1.0,
                   help="dpmpp_2m_sde's eta (k-diffusion's): 0 is the ODE solver, 1 the SDE (default)")  # fmt: skip
    p.add_argument("--sa-eta", type=float, default=0.0,
                   help="sa_solver's eta (tau^2 of Xue et al.): 0 is the ODE (default), 1 the reverse SDE")  # fmt: skip
    p.add_argument("--goal-nfe", type=int, default=10)
    p.add_argument("--goal-points", type=float, default=2.0, help="accuracy points (0.01 each)")
    p.add_argument(
        "--plot",
        default=None,
        help="PNG path, '' for none (default: samplers_nfe.png in --cache-dir; the docs' figure is "
        "assets/samplers_nfe.png)",
    )
    args = p.parse_args()  # fmt: skip
    plan = [(name, int(s)) for name in SAMPLERS for s in getattr(args, name).split(",") if s.strip()]

    t0 = time.perf_counter()
    run = Path(args.run) if args.run else cached_run(args)
    train_seconds = time.perf_counter() - t0
    family = family_of_run(run)
    if family.draws != "classes":
        p.error(f"'{run}' holds a '{family.name}' run; expected a pixel or ldm run")
    model, cfg = family.load(run)
    classes = num_classes(cfg.data)
    if classes is None:
        p.error(f"'{run}' is unconditional; class accuracy needs a class-conditional run")
    counter = CallCounter(model.network)
    labels = torch.arange(args.per_class * classes) % classes
    n = len(labels)
    real = pixels8_features(held_out_images(cfg.data, 2 * n))  # n to compare with, n more for the floor
    used = cfg.sample.resolve(cfg_scale=args.cfg, spacing=args.spacing)
    cfg_scale, spacing = used.cfg_scale, used.spacing
    rows = []
    for name, steps in plan:
        options = {"dpmpp_2m_sde": {"eta": args.sde_eta}, "sa_solver": {"eta": args.sa_eta}}.get(name)
        row = measure(family, model, cfg, counter, labels, real[:n], sampler=name, steps=steps, options=options,
                      cfg_scale=cfg_scale, spacing=spacing, seed=args.seed)  # fmt: skip
        print(json.dumps({k: v for k, v in row.items() if k != "hits"}), file=sys.stderr, flush=True)
        rows.append(row)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "model": {"run": str(run), "preset_or_run": args.run or args.preset, "family": family.name,
                  "world": cfg.data.world, "classes": classes, "train_steps": cfg.train.steps,
                  "cfg_scale": cfg_scale, "spacing": spacing, "schedule": cfg.diffusion.schedule,
                  "prediction": cfg.diffusion.prediction},
        "options": {"per_class": args.per_class, "n": n, "seed": args.seed, "samplers": plan},
        "real_vs_real_frechet_distance": frechet_distance(real[:n], real[n:]),
        "frechet_feature_space": "pixels8 (8x8 area-averaged pixels)",
        "goal": goal(rows, args.goal_nfe, args.goal_points),
        "rows": [{k: v for k, v in r.items() if k != "hits"} for r in rows],
        "seconds": {"train_or_load": round(train_seconds, 1), "sampling": round(sum(r["seconds"] for r in rows), 1),
                    "total": round(time.perf_counter() - t0, 1)},
    }  # fmt: skip
    plot_path = Path(args.cache_dir) / "samplers_nfe.png" if args.plot is None else args.plot
    # the default stays out of the repository's tracked assets: a quick run must not overwrite the docs' figure
    if plot_path:
        result["plot"] = str(plot(rows, result, Path(plot_path)))
    print(json.dumps(result, indent=2))
    print("\n" + table(rows), file=sys.stderr)
    g = result["goal"]
    if g["checked"]:
        best = max(g["rows"], key=lambda r: r["accuracy_minus_reference"])
        print(f"\ngoal (<= {g['max_nfe']} NFE within {args.goal_points:g} points of {g['reference']}, "
              f"{g['reference_accuracy']:.4f}): {'met' if g['met'] else 'NOT met'}; best {best['sampler']} "
              f"{best['steps']} at {best['accuracy_minus_reference']:+.4f}", file=sys.stderr)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
