"""One trainer for every model here: a model, a loss function over batches, and a resumable data stream.

The contracts (all a model family supplies):

- ``loss_fn(model, batch, generator) -> (loss, metrics)``: ``batch`` is already on the training device;
  ``generator`` is the trainer's ``torch.Generator`` on that device, the only source of randomness the
  loss may use (noise, timesteps, condition dropout: ``torch.randn(x.shape, generator=generator,
  device=x.device)``); ``loss`` is a scalar tensor; ``metrics`` a dict of floats or scalar tensors
  (averaged over the log window into ``metrics.jsonl``). Returning a bare loss tensor also works.
- ``data``: an iterator of batches with ``state_dict()`` / ``load_state_dict()`` for an exact resume,
  e.g. ``InfiniteLoader`` (``make_loader`` builds one from a dataset and the config).
- ``sample_fn(model, step, run_dir)``: called every ``sample_every`` steps and at the end with the EMA
  model (or the live one when EMA is off) in eval mode under ``torch.no_grad``; the global RNG state is
  restored afterwards, so sampling never changes the training run. Use a fixed-seed generator of your
  own inside it, so grids at different steps show the same noise.

Steps are counted 1-based: "step 100" is the 100th optimizer step, ``checkpoints/step_0000100`` holds the
state after it and the ``metrics.jsonl`` record with ``"step": 100`` describes it.

Exact resume (``resume.py`` saves and restores the state): the model, EMA, AdamW moments, the loss
generator, the global RNGs (for ``nn.Dropout``) and the loader's (epoch, position) are all in the
checkpoint, and the learning rate is a pure function of the step; so on the CPU a run resumed from
step k ends bit-for-bit where the uninterrupted run ends.

Data parallel: under ``torchrun`` (see ``distributed.py``) the model and its loss function are wrapped
together in PyTorch's ``DistributedDataParallel``, so DDP's forward covers the whole loss (also the
parts that call a model's other methods, such as CLIP's text encoder or the VAE's discriminator) and
every gradient is averaged across processes during backward. ``batch_size`` stays the global batch: each
process trains on its slice (``make_loader``), the logged loss is the mean over processes, and rank 0
alone writes. Each process draws its own noise (rank 0 with the single-process seed); on resume, ranks
above 0 start fresh noise streams derived from the step, so a multi-process resume continues the run
correctly but, unlike one process, not bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from difflab.errors import DifflabError
from difflab.train import distributed
from difflab.train.checkpoint import latest_checkpoint, list_checkpoints, step_dir_name
from difflab.train.config import TrainConfig
from difflab.train.device import is_main_process, resolve_device
from difflab.train.ema import EMA
from difflab.train.loader import InfiniteLoader
from difflab.train.metrics import MetricsLogger
from difflab.train.resume import OPTION_OFF, ResumableTraining, _as_json
from difflab.train.run_dir import commit_pending_config
from difflab.train.schedule import lr_factor
from difflab.train.seeding import derive_seed, global_rng_state, make_generator, set_global_rng_state
from difflab.train.signals import Interrupted, StopSignals

__all__ = [
    "OPTION_OFF",
    "Interrupted",
    "TrainConfig",
    "Trainer",
    "batch_items",
    "make_loader",
    "move_to_device",
]


def make_loader(dataset, cfg: TrainConfig, *, num_workers: int = 0, collate_fn=None) -> InfiniteLoader:
    """The run's data stream: ``cfg.batch_size`` items per (global) batch, order seeded from ``cfg.seed``;
    under torchrun each process gets its slice of every global batch."""
    seed = derive_seed(cfg.seed, "data")
    return InfiniteLoader(dataset, cfg.batch_size, seed, num_workers=num_workers, collate_fn=collate_fn,
                          rank=distributed.rank(), world=distributed.world_size())  # fmt: skip


def move_to_device(batch, device: torch.device):
    """``batch`` with every tensor inside (dicts, lists, tuples) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


def batch_items(batch) -> int:
    """How many items a batch holds: the leading size of its first tensor (0 if it has none)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.ndim else 1
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, list | tuple) else ()
    for value in values:
        n = batch_items(value)
        if n:
            return n
    return 0


class _LossModule(nn.Module):
    """A model and its loss function as one module: what DDP wraps, so that its forward is the whole loss."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch, generator):
        return self.loss_fn(self.model, batch, generator)


class Trainer(ResumableTraining):
    """Trains ``model`` on ``loss_fn`` over batches from ``data``, writing into ``run_dir``.

    ``model_config`` (a dataclass or dict describing the architecture) is stored in every checkpoint;
    resuming with a different one is an error naming the first differing key. ``extra_state`` maps
    names to objects with ``state_dict()`` / ``load_state_dict()`` saved alongside (e.g. a stateful
    conditioning schedule). ``find_unused_parameters`` is passed to DDP (multi-process runs only): set
    it when some parameters get no gradient at some steps (a discriminator that starts late).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        data: Iterable,
        cfg: TrainConfig,
        run_dir: str | Path,
        *,
        sample_fn: Callable | None = None,
        model_config=None,
        extra_state: dict | None = None,
        find_unused_parameters: bool = False,
    ):
        self.cfg = cfg
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.device = resolve_device(cfg.device)
        if self.world > 1 and self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK's GPU
        self.model = model.to(self.device)
        if cfg.channels_last:  # before the optimizer and the EMA copy, so both see the same layout
            self.model = self.model.to(memory_format=torch.channels_last)
        self.data = data
        self._data_iter = data if hasattr(data, "__next__") else iter(data)
        self.sample_fn = sample_fn
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.model_config = _as_json(model_config)
        self.extra_state = dict(extra_state or {})
        self.optimizer = self.configure_optimizer()
        self.generator = make_generator(derive_seed(cfg.seed, self._rank_key("loss")), self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")
        self._loss_module = _LossModule(self.model, loss_fn)
        self._ddp = None
        if self.world > 1:  # DDP's constructor broadcasts rank 0's weights: every rank starts equal
            ids = [self.device.index] if self.device.type == "cuda" else None
            self._ddp = DistributedDataParallel(
                self._loss_module, device_ids=ids, find_unused_parameters=find_unused_parameters
            )
        self.ema = (
            EMA(self.model, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay is not None else None
        )
        if cfg.compile != "no":
            # In place (nn.Module.compile): parameter names and checkpoints stay the same; the EMA copy,
            # made above, stays eager, since sampling is not what compile is for here.
            self.model.compile(backend=cfg.compile, dynamic=False)  # batches have one fixed shape
        self.metrics = MetricsLogger(self.run_dir / "metrics.jsonl")
        self.step = 0
        self.steps_this_call = 0  # optimizer steps the last fit() took (0: the run was already trained)
        self.last_checkpoint: Path | None = None
        self._elapsed_before = 0.0  # training seconds of earlier processes of this run
        self._fit_start: float | None = None

    # ------------------------------------------------------------------------------------------ setup

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with weight decay on tensors of rank >= 2 only: decaying biases, norm gains and scalars
        (such as CLIP's temperature) pulls them toward 0 for no benefit (as in nanoGPT and most ViTs).
        Frozen parameters (``requires_grad=False``, e.g. a LoRA base) are left out. Override to change."""
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": self.cfg.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        groups = [g for g in groups if g["params"]]
        if not groups:
            raise DifflabError("the model has no trainable parameters (all have requires_grad=False)")
        # fused: one kernel over all tensors instead of a dozen element-wise passes per tensor; on the
        # painter's 1.4 M parameters the unfused step was 16 ms of a 286 ms training step, and alone
        # 57-77 ms against 9-13 ms fused (docs/t2i.md, "A painter step, measured"). The fused kernel
        # exists for CPU, CUDA and MPS tensors.
        fused = all(p.device.type in ("cpu", "cuda", "mps") and p.is_floating_point() for p in params)
        return torch.optim.AdamW(groups, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps, fused=fused)

    @property
    def sampling_model(self) -> nn.Module:
        """The weights to sample with: the EMA copy when EMA is on."""
        return self.ema.model if self.ema is not None else self.model

    def autocast(self):
        """The forward pass's autocast context: bf16 or fp16 per ``mixed_precision``, else disabled."""
        mode = self.cfg.mixed_precision
        dtype = torch.float16 if mode == "fp16" else torch.bfloat16
        return torch.autocast(device_type=self.device.type, dtype=dtype, enabled=mode != "no")

    def _rank_key(self, name: str) -> str:
        """Seed names per process: rank 0 keeps the single-process name, so one process is unchanged."""
        return name if self.rank == 0 else f"{name}@rank{self.rank}"

    def _global_values(self, loss: torch.Tensor, extra: dict) -> tuple[float, dict[str, float]]:
        """The loss and metrics as floats, averaged over processes (one all-reduce; none alone)."""
        if self.world == 1:
            return loss.item(), {k: float(v) for k, v in extra.items()}
        keys = sorted(extra)
        local = [loss.detach().float().reshape(())]
        local += [
            torch.as_tensor(extra[k], dtype=torch.float32, device=self.device).reshape(()) for k in keys
        ]
        mean = distributed.all_reduce_mean(torch.stack(local).detach()).tolist()
        return mean[0], dict(zip(keys, mean[1:], strict=True))

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        factor = lr_factor(
            step,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.steps,
            schedule=cfg.lr_schedule,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        return cfg.lr * factor

    # ---------------------------------------------------------------------------------------- training

    def _next_batch(self):
        try:
            return next(self._data_iter)
        except StopIteration:
            if self._data_iter is self.data:  # a one-shot iterator cannot be restarted
                raise DifflabError(f"the data stream ran out at step {self.step + 1}") from None
            self._data_iter = iter(self.data)  # a finite iterable (e.g. a DataLoader): next epoch
            return next(self._data_iter)

    def train_step(self) -> dict:
        """One optimizer step over ``grad_accum`` micro-batches; returns its loss, lr, grad norm, items."""
        cfg = self.cfg
        step = self.step + 1
        lr = self.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss_total, items, sums = 0.0, 0, {}
        forward = self._ddp or self._loss_module
        for micro in range(cfg.grad_accum):
            batch = move_to_device(self._next_batch(), self.device)
            items += batch_items(batch) * self.world
            # DDP averages gradients during the last micro-batch's backward only.
            last = micro == cfg.grad_accum - 1
            with contextlib.nullcontext() if self._ddp is None or last else self._ddp.no_sync():
                with self.autocast():
                    out = forward(batch, self.generator)
                loss, extra = out if isinstance(out, tuple) else (out, {})
                # Checked every step (one device sync): a non-finite loss would poison the AdamW
                # moments, and stopping here names the exact step and leaves the last checkpoint clean.
                # Under DDP the value is the mean over processes, so every rank stops together.
                value, extra = self._global_values(loss, extra)
                if not math.isfinite(value):
                    raise DifflabError(
                        f"loss is {value} at step {step}; stopped without saving this state "
                        f"(last good checkpoint: {self.last_checkpoint or 'none'})"
                    )
                self.scaler.scale(loss / cfg.grad_accum).backward()
            loss_total += value
            for k, v in extra.items():
                sums[k] = sums.get(k, 0.0) + v
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
        self.scaler.unscale_(self.optimizer)  # true gradients before clipping (a no-op unless fp16)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        # With fp16 an overflow is expected now and then: the grad scaler skips that step and lowers
        # its scale. Otherwise a non-finite gradient is a real fault.
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise DifflabError(
                f"gradient norm is {grad_norm} at step {step} (finite loss); stopped without saving this "
                f"state (last good checkpoint: {self.last_checkpoint or 'none'})"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step = step
        metrics = {k: v / cfg.grad_accum for k, v in sums.items()}
        return {
            "loss": loss_total / cfg.grad_accum,
            "lr": lr,
            "grad_norm": grad_norm,
            "items": items,
            **metrics,
        }

    def fit(self, resume: bool = False, on_start: Callable[[], None] | None = None) -> dict | None:
        """Train up to ``cfg.steps``. With ``resume``, continue from the newest good checkpoint in
        ``run_dir`` (starting fresh if there is none). Returns the last ``metrics.jsonl`` record.

        Once the start is accepted (a checkpoint loaded and checked against this run, or a fresh start),
        a config staged by :func:`~difflab.models.runs.claim_run_dir` lands as config.json and
        ``on_start`` runs (main process): nothing of the run changes before that. SIGINT (Ctrl-C) and
        SIGTERM stop the run after the step in progress, with a checkpoint of it (:class:`Interrupted`).
        """
        cfg = self.cfg
        if resume:
            path = latest_checkpoint(self.checkpoint_dir)
            if path is not None:
                self.load_checkpoint(path, verify=False)  # latest_checkpoint has just verified it
            elif list_checkpoints(self.checkpoint_dir):
                # Starting over would save fresh checkpoints beside (and then prune) the user's only copies.
                raise DifflabError(
                    f"no checkpoint in '{self.checkpoint_dir}' passes its checks (see the warnings above); "
                    "move them aside to train from step 0, or restore a good copy"
                )
            else:
                self._note(f"no checkpoint to resume in '{self.checkpoint_dir}'; starting from step 0")
                self._start_fresh()
        else:
            existing = list_checkpoints(self.checkpoint_dir)
            if existing:
                raise DifflabError(
                    f"run dir '{self.run_dir}' already has checkpoints (newest: {existing[-1][1].name}); "
                    "resume it (--resume) or choose a new run dir"
                )
            self._start_fresh()
        if is_main_process():
            commit_pending_config(self.run_dir)
            if on_start is not None:
                on_start()
        # Records past this step were written after the last checkpoint by an interrupted process.
        self.metrics.truncate_after(self.step)
        self.steps_this_call = 0
        if self.step >= cfg.steps:
            return None

        show = cfg.progress and sys.stderr.isatty() and is_main_process()
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not show, unit="step", dynamic_ncols=True)
        self._fit_start = time.perf_counter()
        window: dict[str, float] = {}
        counts: dict[str, int] = {}  # steps that reported each key: a metric may start mid-window (a GAN)
        window_start, window_from = time.perf_counter(), self.step + 1
        record = None
        with StopSignals() as signals:
            try:
                while self.step < cfg.steps:
                    out = self.train_step()
                    self.steps_this_call += 1
                    for k, v in out.items():
                        window[k] = window.get(k, 0.0) + v
                        counts[k] = counts.get(k, 0) + 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}", refresh=False)
                    last = self.step == cfg.steps
                    stop = distributed.any_rank(signals.received is not None)  # every rank stops together
                    if self.step % cfg.log_every == 0 or last or stop:
                        now = time.perf_counter()
                        items = window.pop("items")
                        record = {k: v / counts[k] for k, v in window.items()}
                        # from_step: the window's first step (after a resume it starts at the checkpoint)
                        record.update(
                            step=self.step,
                            from_step=window_from,
                            lr=out["lr"],
                            seconds=round(self.elapsed_seconds(), 3),
                            items_per_s=round(items / max(now - window_start, 1e-9), 2),
                        )
                        self.metrics.log(record)
                        window, counts, window_start, window_from = {}, {}, now, self.step + 1
                    saved = (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0) or last
                    if saved or stop:
                        self.save_checkpoint()
                    if stop:
                        distributed.barrier()  # rank 0 has written the checkpoint
                        raise Interrupted(signals.received or "a signal on another rank", self.step,
                                          self.checkpoint_dir / step_dir_name(self.step))  # fmt: skip
                    if (cfg.sample_every and self.step % cfg.sample_every == 0) or last:
                        self.sample()
            finally:
                bar.close()
        distributed.barrier()  # rank 0 may still be writing the last checkpoint and samples
        return record

    def elapsed_seconds(self) -> float:
        """Training wall time of the whole run, across resumes."""
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self._elapsed_before + running

    def sample(self) -> None:
        """Run ``sample_fn`` on the sampling model (main process only), leaving every RNG as it was."""
        if self.sample_fn is None or not is_main_process():
            return
        model = self.sampling_model
        was_training = model.training
        tensors, plain = global_rng_state()
        model.eval()
        try:
            with torch.no_grad():
                self.sample_fn(model, self.step, self.run_dir)
        finally:
            model.train(was_training)
            set_global_rng_state(tensors, plain)

    def _start_fresh(self) -> None:
        # nn.Dropout and friends draw from the global torch RNG, which the trainer cannot hand a
        # generator to; seeding it here makes a fresh run reproducible, and checkpoints carry its state.
        torch.manual_seed(derive_seed(self.cfg.seed, self._rank_key("global")))

    @staticmethod
    def _note(message: str) -> None:
        if is_main_process():
            print(f"difflab: note: {message}", file=sys.stderr)
