r"""Exponential moving average (EMA) of model weights, the copy that diffusion models sample with.

After each optimizer step every floating-point parameter of the shadow model moves toward the live one:

$$\bar\theta \leftarrow d_k\,\bar\theta + (1 - d_k)\,\theta, \qquad
  d_k = \min\!\left(d, \frac{1 + k}{10 + k}\right)$$

with $k$ the number of updates already made. The warmup term is the ``num_updates`` rule of TensorFlow's
``tf.train.ExponentialMovingAverage``, which CompVis latent-diffusion's ``LitEma`` also uses: early on
the average forgets the random initialisation quickly (d_0 = 0.1), and after a few hundred steps the
configured decay (e.g. 0.9999, as in DDPM) takes over. Without warmup, $d_k = d$.

Buffers (e.g. normalisation statistics) and integer tensors are copied, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay_at(num_updates: int, decay: float, warmup: bool = True) -> float:
    """The decay $d_k$ used for update number ``num_updates`` (0-based)."""
    if not warmup:
        return decay
    return min(decay, (1 + num_updates) / (10 + num_updates))


class EMA:
    """A frozen deep copy of ``model`` (``self.model``) kept as a moving average of its weights."""

    def __init__(self, model: nn.Module, decay: float, *, warmup: bool = True):
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = ema_decay_at(self.num_updates, self.decay, self.warmup)
        live = dict(model.named_parameters())
        averaged, targets = [], []
        for name, shadow in self.model.named_parameters():
            if shadow.is_floating_point():
                averaged.append(shadow)
                targets.append(live[name].detach())
            else:
                shadow.copy_(live[name])
        if averaged:
            # lerp(a, b, w) = a + w (b - a) = d a + (1 - d) b with w = 1 - d, one fused op per tensor.
            torch._foreach_lerp_(averaged, targets, 1.0 - d)
        live_buffers = dict(model.named_buffers())
        for name, shadow in self.model.named_buffers():
            shadow.copy_(live_buffers[name])
        self.num_updates += 1

    def state_dict(self) -> dict:
        """The shadow weights (tensors) and the update count; the decay itself comes from the config."""
        return {"model": self.model.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.num_updates = int(state["num_updates"])
