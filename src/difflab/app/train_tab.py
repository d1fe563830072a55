"""The Train tab: a run directory's loss curve (``metrics.jsonl``) and newest sample grid
(``samples/step_*.png``), refreshed every few seconds while it trains; and a tiny preset started in a
subprocess (``difflab train``), one at a time, stopped as Ctrl-C stops it (a checkpoint, then exit)."""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.app.pictures import FIGURES, enlarge
from difflab.app.status import error_html, note_html
from difflab.errors import DifflabError, check_choice
from difflab.models.runs import read_run_config
from difflab.train.metrics import read_metrics

REFRESH_SECONDS = 3.0
STARTABLE = ("tiny", "clip_tiny", "vae_tiny", "planner_tiny")
"""The presets the page may start: the tiny ones that need no parent run and finish in seconds to a minute."""


@dataclass(frozen=True)
class Progress:
    """What a run directory shows of its training so far."""

    step: int
    steps: int
    curve: np.ndarray | None
    """The loss curve as an (H, W, 3) uint8 picture; None before the first logged step."""
    grid: np.ndarray | None
    """The newest sample grid; None before the first."""
    grid_name: str
    summary: str


def loss_records(run_dir: str | Path) -> list[dict]:
    """The records of ``metrics.jsonl`` that carry a training loss, in order (none before the first)."""
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in read_metrics(path) if "loss" in r and "step" in r] if path.is_file() else []


def newest_grid(run_dir: str | Path) -> Path | None:
    """The sample grid of the highest step under ``samples/``, or None."""
    grids = sorted((Path(run_dir) / "samples").glob("step_*.png"))
    return grids[-1] if grids else None


def curve_picture(records: list[dict], title: str) -> np.ndarray:
    """Every ``loss*`` series of ``records`` against the step, on a log scale, as an RGB picture."""
    with FIGURES:
        return _curve(records, title)


def _curve(records: list[dict], title: str) -> np.ndarray:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.4), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    keys = sorted({k for r in records for k in r if k.startswith("loss") and isinstance(r[k], int | float)})
    for key in keys:
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
        ax.plot(*zip(*points, strict=True), label=key, linewidth=1.2)
    if all(r[k] > 0 for r in records for k in keys if isinstance(r.get(k), int | float)):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def run_progress(run_dir: str) -> Progress:
    """The loss curve, newest grid and a one-line summary of ``run_dir`` (named errors for a non-run)."""
    if not str(run_dir or "").strip():
        raise DifflabError("no run is chosen; expected a run directory made by 'difflab train'")
    kind, config = read_run_config(run_dir)
    steps = int(config.get("train", {}).get("steps", 0))
    records = loss_records(run_dir)
    grid = newest_grid(run_dir)
    step = records[-1]["step"] if records else 0
    parts = [f"{kind} run {run_dir}: step {step} of {steps}" + (" (done)" if steps and step >= steps else "")]
    if records:
        recent = [r["loss"] for r in records[-10:] if isinstance(r["loss"], int | float)]
        parts.append(f"loss {np.mean(recent):.4g} (mean of the last {len(recent)} logged)")
        if "items_per_s" in records[-1]:
            parts.append(f"{records[-1]['items_per_s']:.0f} items/s")
        age = time.time() - (Path(run_dir) / "metrics.jsonl").stat().st_mtime
        parts.append(f"last logged {age:.0f} s ago")
    else:
        parts.append("nothing logged yet")
    return Progress(
        step=step,
        steps=steps,
        curve=curve_picture(records, f"{kind}: {Path(run_dir).name}") if records else None,
        grid=enlarge(np.asarray(Image.open(grid).convert("RGB")), side=512) if grid is not None else None,
        grid_name=f"samples/{grid.name}" if grid is not None else "no sample grid yet",
        summary=" · ".join(parts),
    )


def signature(run_dir: str) -> tuple:
    """What changes when a training writes: the metrics file's size and time, and the newest grid."""
    path = Path(run_dir or ".") / "metrics.jsonl"
    stat = path.stat() if path.is_file() else None
    grid = newest_grid(run_dir) if run_dir else None
    return (str(run_dir), stat and (stat.st_size, stat.st_mtime_ns), grid and grid.name)


@dataclass
class Training:
    """A ``difflab train`` started from the page."""

    preset: str
    out: str
    process: subprocess.Popen
    log: Path

    def state(self) -> str:
        """'running', 'finished', or the training's own last line when it failed (its named error)."""
        code = self.process.poll()
        if code is None:
            return "running"
        if code == 0:
            return "finished"
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else f"exited with status {code}"


_training: list[Training] = []  # the one training started here, if any


def start_training(preset: str, out: str) -> Training:
    """``difflab train --preset PRESET --out OUT`` in a subprocess (a tiny preset; one at a time)."""
    check_choice("preset to start here", preset, STARTABLE)
    if not str(out or "").strip():
        raise DifflabError("no output directory is given; expected a new (or empty) folder for the run")
    if _training and _training[-1].process.poll() is None:
        running = _training[-1]
        raise DifflabError(f"a training started here is still running ({running.preset} into {running.out}); "
                           "wait for it or stop it first")  # fmt: skip
    log = Path(tempfile.mkstemp(prefix="difflab-app-train-", suffix=".log")[1])
    with open(log, "w") as f:
        process = subprocess.Popen([sys.executable, "-m", "difflab", "train", "--preset", preset, "--out", out],
                                   stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    _training[:] = [Training(preset, out, process, log)]
    return _training[-1]


def stop_training() -> str:
    """Send the running training SIGINT, as Ctrl-C would: it saves a checkpoint and exits."""
    if not _training or _training[-1].process.poll() is not None:
        raise DifflabError("no training started here is running")
    _training[-1].process.send_signal(signal.SIGINT)
    return f"stopping {_training[-1].preset} into {_training[-1].out} (a checkpoint is saved first)"


def training_line() -> str:
    """The state of the training started here, or ''."""
    if not _training:
        return ""
    t = _training[-1]
    return f"started here: {t.preset} into {t.out}: {t.state()}"


def build(page, runs: list[str]) -> None:
    """Lay the tab out inside the current ``gr.Tab`` of ``page``; ``runs`` are the command line's RUNs."""
    import gradio as gr

    with gr.Row():
        run = gr.Dropdown(runs, value=runs[0] if runs else None, label="run directory", allow_custom_value=True,
                          scale=3, elem_id="train-run")  # fmt: skip
        follow = gr.Checkbox(True, label=f"refresh every {REFRESH_SECONDS:g} s")
        show = gr.Button("Show", variant="primary", elem_id="train-show")
    status = gr.HTML(elem_id="train-status")
    with gr.Row():
        curve = gr.Image(label="loss", format="png", elem_id="train-curve")
        grid = gr.Image(
            label="newest sample grid", format="png", elem_id="train-grid", elem_classes="difflab-pixels"
        )
    with gr.Accordion("Start a tiny training", open=False):
        with gr.Row():
            preset = gr.Dropdown(list(STARTABLE), value=STARTABLE[0], label="preset")
            out = gr.Textbox(label="into (a new folder)", placeholder="runs/tiny")
            start = gr.Button("Start")
            stop = gr.Button("Stop")
        started = gr.HTML()
    timer = gr.Timer(REFRESH_SECONDS)
    seen = gr.State(None)

    def on_show(run_dir, last=None):
        if not str(run_dir or "").strip():
            return "", gr.skip(), gr.skip(), None, training_line()
        now = signature(run_dir)
        if now == last:  # nothing new written since the last look: nothing to redraw
            return gr.skip(), gr.skip(), gr.skip(), now, training_line()
        try:
            progress = run_progress(run_dir)
        except DifflabError as err:
            return error_html(err), None, None, now, training_line()
        return note_html(progress.summary), progress.curve, progress.grid, now, training_line()

    def on_start(preset, out):
        try:
            t = start_training(preset, out)
        except DifflabError as err:
            return error_html(err), gr.skip()
        return note_html(f"started {t.preset} into {t.out}"), gr.update(value=t.out)

    def on_stop():
        try:
            return note_html(stop_training())
        except DifflabError as err:
            return error_html(err)

    shown = [status, curve, grid, seen, started]
    show.click(on_show, [run], shown)
    run.change(on_show, [run], shown)
    timer.tick(on_show, [run, seen], shown)
    page.load(on_show, [run], shown)
    follow.change(lambda on: gr.Timer(active=on), [follow], [timer])
    start.click(on_start, [preset, out], [started, run])
    stop.click(on_stop, None, [started])
