"""``TrainConfig``: every knob of a training run in one typed, frozen dataclass (``--set train.*``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from difflab.errors import (
    MAX_COUNT,
    MAX_SIZE,
    DifflabError,
    check_choice,
    check_float,
    check_int,
    check_optional_int,
    check_seed,
)
from difflab.train.schedule import LR_SCHEDULES

MIXED_PRECISION = ("no", "bf16", "fp16")
COMPILE = ("no", "inductor", "eager")
# Train-config keys that define the run itself: resuming with another value would not continue the same
# run (another data stream, other random draws, optimizer settings the loaded state would override).
# Every other key (steps, lr, cadences, device, ...) may change on resume; the change is printed.
RESUME_MUST_MATCH = ("batch_size", "grad_accum", "seed", "betas", "eps", "weight_decay")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    """Optimizer steps in the whole run (a resumed run continues up to this)."""
    batch_size: int = 32
    """Items per micro-batch (``make_loader`` uses it)."""
    grad_accum: int = 1
    """Micro-batches whose gradients add up to one optimizer step."""
    lr: float = 2e-4
    weight_decay: float = 0.0
    """AdamW decoupled weight decay, applied to weight matrices and kernels only (not biases, norms)."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    """Linear warmup from lr/warmup_steps to lr (see ``difflab.train.schedule``)."""
    lr_schedule: str = "constant"
    """After warmup: 'constant' or 'cosine' (down to min_lr_ratio * lr at the last step)."""
    min_lr_ratio: float = 0.0
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this; None disables clipping (the norm is still logged)."""
    ema_decay: float | None = 0.999
    """Decay of the EMA weights used for sampling; None disables EMA."""
    ema_warmup: bool = True
    """Ramp the EMA decay as min(decay, (1 + k) / (10 + k)) (see ``difflab.train.ema``)."""
    seed: int = 0
    log_every: int = 10
    sample_every: int | None = None
    """Call sample_fn every this many steps (and always at the end); None: only at the end."""
    checkpoint_every: int | None = 500
    """Save every this many steps (and always at the end); None: only at the end."""
    keep_last: int = 3
    """Checkpoints kept on disk; older ones are deleted after each save."""
    device: str = "auto"
    """'auto' (CUDA, then MPS, then CPU), 'cpu', 'cuda', 'cuda:N' or 'mps'."""
    mixed_precision: str = "no"
    """'no', 'bf16' (autocast of the forward pass) or 'fp16' (autocast with a dynamic loss scaler, which
    skips the steps whose gradients overflow; meant for CUDA)."""
    channels_last: bool = False
    """Keep the network's 4-D weights (and so its convolutions' activations) in channels-last memory
    order: more images/s for the presets' UNets on a CPU (measured: docs/benchmarks.md)."""
    compile: str = "no"
    """'inductor': ``torch.compile`` the model's forward (opt-in: the first steps pay for compiling; see
    docs/benchmarks.md for when it pays); 'eager' only traces it (a quick check that it compiles)."""
    progress: bool = True
    """Show a progress bar (only ever when stderr is a terminal)."""
    dist_timeout_s: float = 1800.0
    """Under torchrun: how long a collective waits for a rank that stopped answering before failing
    (``init_process_group(timeout=...)``; gloo's and nccl's default is the same 30 minutes)."""

    def __post_init__(self):
        # Every numeric field has a range (see difflab.errors for the shared bounds' reasons).
        for key in ("steps", "log_every", "keep_last"):
            check_int(key, getattr(self, key), 1, MAX_COUNT)
        for key in ("sample_every", "checkpoint_every"):
            check_optional_int(key, getattr(self, key), 1, MAX_COUNT)
        check_int("batch_size", self.batch_size, 1, MAX_SIZE)
        check_int("grad_accum", self.grad_accum, 1, MAX_SIZE)
        check_float("lr", self.lr, 0.0, lo_open=True)
        check_float("weight_decay", self.weight_decay, 0.0)
        # AdamW's moment decays: 1 would never forget, and torch refuses anything outside [0, 1).
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2):
            raise DifflabError(
                f"betas {self.betas!r} is invalid; expected two numbers in [0, 1), e.g. 0.9,0.999"
            )
        for beta in self.betas:
            check_float(f"betas {self.betas}: beta", beta, 0.0, 1.0, hi_open=True)
        check_float("eps", self.eps, 0.0, lo_open=True)
        # Warmup may outlast a short run (a preset's 10 warmup steps under --set train.steps=2 is a smoke
        # test, its rate still rising at the end); it is bounded like every step count.
        check_int("warmup_steps", self.warmup_steps, 0, MAX_COUNT)
        if self.grad_clip is not None and not 0 < self.grad_clip < math.inf:
            raise DifflabError(f"bad grad_clip {self.grad_clip}; expected a positive finite max norm or None")
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            raise DifflabError(f"bad ema_decay {self.ema_decay}; expected a number in [0, 1) or None")
        check_float("min_lr_ratio", self.min_lr_ratio, 0.0, 1.0)
        check_seed("seed", self.seed)
        check_float("dist_timeout_s", self.dist_timeout_s, 0.0, MAX_COUNT, lo_open=True)
        check_choice("lr schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("mixed precision mode", self.mixed_precision, MIXED_PRECISION)
        check_choice("compile mode", self.compile, COMPILE)
