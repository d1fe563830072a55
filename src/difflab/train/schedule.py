r"""Learning-rate schedules: linear warmup, then constant or cosine decay.

The rate is a pure function of the step, recomputed before every optimizer step, so a resumed run needs
no scheduler state. With $s$ the 0-based step, $W$ the warmup steps, $S$ the total steps and
$r$ = ``min_lr_ratio``:

- warmup ($s < W$): $f(s) = (s + 1) / W$, so the first step already moves and step $W - 1$ is at full rate;
- constant: $f(s) = 1$;
- cosine (Loshchilov & Hutter, 2017, "SGDR", Eq. 5 without restarts):
  $p = (s - W) / \max(1, S - W)$, $f(s) = r + (1 - r) \cdot \tfrac12 (1 + \cos(\pi p))$,
  held at $r$ for $p > 1$.

The learning rate is ``lr * f(s)``.
"""

from __future__ import annotations

import math

from difflab.errors import check_choice

LR_SCHEDULES = ("constant", "cosine")


def lr_factor(
    step: int, *, warmup_steps: int, total_steps: int, schedule: str = "constant", min_lr_ratio: float = 0.0
) -> float:
    """The multiplier $f(s)$ of the base learning rate at 0-based optimizer step ``step``."""
    check_choice("lr schedule", schedule, LR_SCHEDULES)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
