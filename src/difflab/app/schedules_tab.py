"""The Schedules tab: alpha-bar_t, log-SNR(t) and beta_t of the noise schedules side by side
(``difflab schedule --plot``), with the numbers that puzzle people worked out beside the plot from the
schedule itself - nothing here is a typed-in constant (docs/diffusion.md derives the same)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.app.pictures import FIGURES
from difflab.app.status import error_html
from difflab.diffusion.cli import SCHEDULE_NAMES, describe, plot_schedules
from difflab.diffusion.schedules import make_schedule
from difflab.errors import MAX_TIMESTEPS, DifflabError, check_choice, check_int


def schedules(names, timesteps, zero_snr: bool = False) -> list:
    """The named schedules at ``timesteps`` steps (each optionally rescaled to zero terminal SNR)."""
    timesteps = check_int("timesteps", timesteps, 2, MAX_TIMESTEPS)
    if not names:
        raise DifflabError(f"no schedule is chosen; choose one or more of: {', '.join(SCHEDULE_NAMES)}")
    return [make_schedule(check_choice("schedule", n, SCHEDULE_NAMES), timesteps, rescale_zero_snr=zero_snr)
            for n in names]  # fmt: skip


def plot(chosen: list) -> np.ndarray:
    """``difflab schedule --plot``'s figure of ``chosen`` schedules, as an (H, W, 3) uint8 image."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "schedules.png"
        with FIGURES:
            plot_schedules(chosen, str(path))
        return np.asarray(Image.open(path).convert("RGB"))


def _g(x: float | None, digits: int = 3) -> str:
    """A number as the docs write it: 4.04e-5, not 4.04e-05; −∞ for a zero-terminal-SNR log-SNR (None)."""
    if x is None or x == -math.inf:
        return "−∞"
    text = f"{x:.{digits}g}".replace("e-0", "e-")
    return "−" + text[1:] if text.startswith("-") else text


def _e(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}e}".replace("e-0", "e-")


def table_markdown(chosen: list) -> str:
    """The numbers ``difflab schedule --json`` prints for each schedule, one row each."""
    T = chosen[0].timesteps
    lines = [f"| schedule | ᾱ at t = 1 | ᾱ at t = {T // 2} | ᾱ_T | √ᾱ_T | log-SNR range | β range |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in chosen:
        d = describe(s)
        ab = list(d["alpha_bar_at_1based_t"].values())
        lo, hi = d["log_snr_range"]
        lines.append(f"| `{s.name}` | {_g(ab[0], 5)} | {_g(ab[1])} | {_g(ab[2])} | "
                     f"{_g(d['sqrt_alpha_bar_at_1based_T'], 2)} | {_g(lo, 4)} … {_g(hi, 3)} | "
                     f"{_g(d['beta_range'][0], 2)} … {_g(d['beta_range'][1], 3)} |")  # fmt: skip
    return "\n".join(lines)


def why_markdown(timesteps) -> str:
    """Why ᾱ_T of DDPM's linear schedule is so small, and why it is not zero, worked out at ``timesteps``."""
    s = make_schedule("linear", check_int("timesteps", timesteps, 2, MAX_TIMESTEPS))
    T, betas = s.timesteps, s.betas
    ab_T = float(s.alphas_cumprod[-1])
    sum_beta = float(betas.sum())
    sum_beta2 = float((betas**2).sum())
    log_ab = float((-betas).log1p().sum())  # Σ log(1 − β_t), in float64
    return (
        f"**Why is ᾱ_T of DDPM's linear schedule {_e(ab_T)}?** (T = {T}) β_t rises linearly from "
        f"{_e(float(betas[0]), 0)} to {float(betas[-1]):g}, and every step keeps a share 1 − β_t of the signal's "
        f"variance, so ᾱ_T = ∏(1 − β_t) = exp(Σ log(1 − β_t)) = exp({_g(log_ab, 4)}). To first order "
        f"Σ log(1 − β_t) ≈ −Σβ_t = −T·(β_1 + β_T)/2 = {_g(-sum_beta, 4)}, and the next term −½Σβ_t² = "
        f"{_g(-sum_beta2 / 2, 2)} makes up most of the rest: {T} small losses compound to "
        f"e^{_g(log_ab, 4)} = {_e(ab_T, 2)}.\n\n"
        f"**So x_T is almost pure noise:** x_T = √ᾱ_T·x₀ + √(1 − ᾱ_T)·ε = {math.sqrt(ab_T):.4f}·x₀ + "
        f"{math.sqrt(1 - ab_T):.5f}·ε, which is why sampling may start from N(0, I).\n\n"
        f"**…but not zero:** a product of factors 1 − β_t > 0 is never 0, so SNR(T) = ᾱ_T/(1 − ᾱ_T) = "
        f"{_e(ab_T / (1 - ab_T))}. Over a 32×32 image the noise's mean shrinks to 1/32 while the signal's share "
        f"of the mean brightness stays {math.sqrt(ab_T):.4f}·m: the network learns to read brightness from "
        "'pure noise' that real N(0, I) never has. Lin et al. (2024) rescale the schedule to zero terminal SNR "
        "(the checkbox: β_T = 1, ᾱ_T = 0, log-SNR(T) = −∞). More in docs/diffusion.md."
    )


def build(page, runs: list[str]) -> None:
    """Lay the tab out inside the current ``gr.Tab`` of ``page``; plotted as the page opens."""
    import gradio as gr

    with gr.Row():
        names = gr.CheckboxGroup(list(SCHEDULE_NAMES), value=list(SCHEDULE_NAMES), label="schedules")
        timesteps = gr.Number(1000, precision=0, label="T (training steps)", info="DDPM: 1000")
        zero_snr = gr.Checkbox(False, label="rescale to zero terminal SNR (Lin et al. 2024, Algorithm 1)")
        go = gr.Button("Plot", variant="primary", elem_id="schedules-plot")
    status = gr.HTML(elem_id="schedules-status")
    with gr.Row():
        with gr.Column(scale=3):
            figure = gr.Image(label="ᾱ_t, log-SNR(t) and β_t", format="png", elem_id="schedules-figure")
            table = gr.Markdown(elem_id="schedules-table")
        why = gr.Markdown(elem_id="schedules-why")

    def on_plot(names, timesteps, zero_snr):
        try:
            chosen = schedules(names, timesteps, zero_snr)
            return "", plot(chosen), table_markdown(chosen), why_markdown(timesteps)
        except DifflabError as err:
            return error_html(err), None, "", ""

    go.click(on_plot, [names, timesteps, zero_snr], [status, figure, table, why])
    page.load(on_plot, [names, timesteps, zero_snr], [status, figure, table, why])
