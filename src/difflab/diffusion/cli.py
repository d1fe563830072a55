"""``difflab schedule``: print (or plot) the numbers that describe a noise schedule.

Everything printed is explained in docs/diffusion.md ("What difflab schedule prints").
"""

from __future__ import annotations

import json
import math
import sys

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from difflab import cli_types
from difflab.diffusion.schedules import BETA_SCHEDULES, make_schedule
from difflab.errors import MAX_TIMESTEPS, DifflabError, check_choice
from difflab.outputs import image_file, write_file

SCHEDULE_NAMES = tuple(BETA_SCHEDULES)
BETA = cli_types.number(0.0, 1.0, lo_open=True)
"""A beta is a variance added per step: in (0, 1], as :meth:`Schedule.from_betas` requires."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "schedule",
        help="print or plot a noise schedule: alpha-bar, SNR and beta ranges",
        description="Describe a diffusion noise schedule: alpha_bar (the fraction of signal variance "
        "left) at t = 1, T/2 and T, counted 1-based as in Ho et al. (2020), so t = T is the noisiest "
        "step; the range of the signal-to-noise ratio SNR = alpha_bar / (1 - alpha_bar) and of its log; "
        "the range of beta. docs/diffusion.md explains each number.",
    )
    p.add_argument(
        "--schedule",
        default="linear",
        metavar="NAME",
        help=f"schedule to describe, one of: {', '.join(SCHEDULE_NAMES)} (default: linear)",
    )
    p.add_argument(
        "--timesteps",
        type=cli_types.integer(2, MAX_TIMESTEPS),
        default=1000,
        metavar="T",
        help="number of training steps T (default: 1000, as in DDPM)",
    )
    p.add_argument(
        "--rescale-zero-snr",
        action="store_true",
        help="rescale to zero terminal SNR (Lin et al. 2024, Algorithm 1): alpha_bar_T becomes 0",
    )
    p.add_argument(
        "--beta-start",
        type=BETA,
        default=None,
        help="first beta (default: the schedule's own, e.g. 1e-4 for linear; not for cosine)",
    )
    p.add_argument(
        "--beta-end",
        type=BETA,
        default=None,
        help="last beta (default: the schedule's own, e.g. 0.02 for linear; not for cosine)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a summary")
    p.add_argument(
        "--plot",
        metavar="FILE.png",
        default=None,
        help="also draw alpha_bar_t, log-SNR(t) and beta_t of --compare schedules side by side",
    )
    p.add_argument(
        "--compare",
        default=",".join(SCHEDULE_NAMES),
        metavar="A,B,...",
        help=f"comma-separated schedules for --plot (default: {','.join(SCHEDULE_NAMES)})",
    )
    p.set_defaults(func=run_schedule)  # fmt: skip


def _finite_or_none(v: float) -> float | None:
    """JSON has no infinities: a zero-terminal-SNR log-SNR of -inf is written as null."""
    return v if math.isfinite(v) else None


def describe(schedule) -> dict:
    """The numbers ``difflab schedule`` prints, as a JSON-ready dict (t counted 1-based)."""
    T = schedule.timesteps
    ab = schedule.alphas_cumprod
    snr, log_snr, betas = schedule.snr, schedule.log_snr, schedule.betas
    return {
        "schedule": schedule.name,
        "timesteps": T,
        "alpha_bar_at_1based_t": {str(t): float(ab[t - 1]) for t in (1, T // 2, T)},
        "sqrt_alpha_bar_at_1based_T": math.sqrt(float(ab[-1])),
        "snr_range": [float(snr.min()), float(snr.max())],
        "log_snr_range": [_finite_or_none(float(log_snr.min())), _finite_or_none(float(log_snr.max()))],
        "beta_range": [float(betas.min()), float(betas.max())],
    }


def _summary(d: dict) -> str:
    T = d["timesteps"]
    ab = d["alpha_bar_at_1based_t"]
    lines = [f"schedule {d['schedule']}, T = {T} (t counted 1-based as in Ho et al. 2020; t = T is noisiest)"]
    for t, v in ab.items():
        lines.append(f"  alpha_bar at t = {t:>5}: {v:.6g}")
    lines.append(
        f"  sqrt(alpha_bar_T) = {d['sqrt_alpha_bar_at_1based_T']:.4g}: the signal's share of x_T's amplitude"
    )
    lo, hi = d["snr_range"]
    llo, lhi = d["log_snr_range"]
    llo = "-inf" if llo is None else f"{llo:.4g}"
    lines.append(f"  SNR from {lo:.4g} (t = T) to {hi:.4g} (t = 1); log-SNR from {llo} to {lhi:.4g}")
    lines.append(f"  beta from {d['beta_range'][0]:.4g} to {d['beta_range'][1]:.4g}")
    return "\n".join(lines)


def plot_schedules(schedules, path: str) -> None:
    """Draw alpha_bar_t, log-SNR(t) and beta_t of several schedules side by side into ``path``."""
    fig = Figure(figsize=(13, 3.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for s in schedules:
        t = range(1, s.timesteps + 1)
        axes[0].plot(t, s.alphas_cumprod.numpy(), label=s.name)
        axes[1].plot(t, s.log_snr.numpy(), label=s.name)
        axes[2].plot(t, s.betas.numpy(), label=s.name)
    titles = (
        r"$\bar\alpha_t$",
        r"$\log \mathrm{SNR}(t) = \log \bar\alpha_t / (1-\bar\alpha_t)$",
        r"$\beta_t$",
    )
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title)
        ax.set_xlabel("t (1-based)")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    write_file(path, lambda tmp, fmt: fig.savefig(tmp, dpi=110, format=fmt), writer="figure")  # atomically


def run_schedule(args) -> int:
    def build(name: str):
        return make_schedule(
            name, args.timesteps, rescale_zero_snr=args.rescale_zero_snr,
            beta_start=args.beta_start, beta_end=args.beta_end,
        )  # fmt: skip

    names = [n.strip() for n in args.compare.split(",") if n.strip()]
    if args.plot:  # checked before anything is printed
        args.plot = str(image_file(args.plot, "--plot", writer="figure"))
        if not names:
            raise DifflabError(f"--compare '{args.compare}' names no schedule")
        for name in names:
            check_choice("schedule", name, SCHEDULE_NAMES)
    info = describe(build(args.schedule))
    print(json.dumps(info, indent=2) if args.json else _summary(info))
    if args.plot:
        # --beta-start/--beta-end belong to --schedule; the others keep their papers' ranges.
        schedules = [
            build(n)
            if n == args.schedule
            else make_schedule(n, args.timesteps, rescale_zero_snr=args.rescale_zero_snr)
            for n in names
        ]
        plot_schedules(schedules, args.plot)
        print(f"wrote {args.plot} ({', '.join(s.name for s in schedules)})", file=sys.stderr)
    return 0
