r"""LoRA (Hu et al. 2021): adapt a frozen network by adding a low-rank update to some of its weights.

For a frozen weight W_0 (d_out x d_in), LoRA trains A (r x d_in) and B (d_out x r), r << min(d_in, d_out)
(Eq. 3):

.. math:: h = W_0 x + \frac{\alpha}{r} B A x

B starts at zero, so the adapted network starts as the base, exactly; A starts random (Kaiming-uniform, as
PEFT and the paper's code do), so B's gradient BA's first step needs is not zero. alpha / r keeps the
update's size roughly independent of r when r is tuned (Sec. 4.1); rsLoRA (Kalajdzievski 2023) scales by
alpha / sqrt(r) instead, which keeps it stable as r grows.

Because the update is one matrix, it can be *merged*: W = W_0 + (alpha / r) B A costs nothing at inference,
and *unmerged* back (W_0 = W - (alpha / r) B A, up to float rounding). Only A and B need saving: an adapter
is kilobytes, loaded onto a base at any ``scale`` (the multiplier diffusers calls ``lora_scale``).

Naming and conventions match PEFT's (``lora_A``, ``lora_B``, ``scaling``, ``use_rslora``), so an adapter
made here copies across to ``peft.get_peft_model`` one to one; tests/test_lora.py checks outputs and merged
weights against PEFT as the independent implementation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from difflab.errors import DifflabError

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out")
"""The attention projections every UNet and transformer block names this way (:mod:`difflab.nn.attention`)."""


class LoRALinear(nn.Module):
    """``base`` (an ``nn.Linear``, frozen) plus ``scale * (alpha / r) * B A x`` (Eq. 3)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, rslora: bool = False):
        super().__init__()
        if not isinstance(rank, int) or rank < 1 or rank > min(base.in_features, base.out_features):
            raise DifflabError(f"LoRA rank {rank!r} is invalid; expected 1..{min(base.in_features, base.out_features)} "
                               f"for a {base.in_features} -> {base.out_features} layer")  # fmt: skip
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # (r, d_in)
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, rank, **kw)
        )  # (d_out, r): the update starts at 0
        nn.init.kaiming_uniform_(
            self.lora_A, a=math.sqrt(5)
        )  # nn.Linear's own initialisation, PEFT's default
        self.scale = 1.0
        """The adapter's strength at use (0: the base alone)."""
        self.merged = False

    def delta(self) -> torch.Tensor:
        """The update (alpha / r) B A, (d_out, d_in)."""
        return self.scaling * (self.lora_B @ self.lora_A)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.scale == 0:
            return out
        return out + (x @ self.lora_A.T @ self.lora_B.T) * (self.scaling * self.scale)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- W + scale * (alpha / r) B A: the adapted layer at the cost of the base one."""
        if not self.merged:
            self.base.weight += self.scale * self.delta()
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W <- W - scale * (alpha / r) B A: back to the base weight (up to float rounding)."""
        if self.merged:
            self.base.weight -= self.scale * self.delta()
            self.merged = False


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: Iterable[str] = ATTENTION_TARGETS,
             *, rslora: bool = False) -> list[str]:  # fmt: skip
    """Freeze ``model`` and wrap each ``nn.Linear`` whose name ends in one of ``targets`` in a
    :class:`LoRALinear` (``alpha`` defaults to ``rank``: scaling 1). Returns the wrapped modules' names; an
    error when nothing matched."""
    alpha = float(rank if alpha is None else alpha)
    targets = tuple(targets)
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    if not names:
        raise DifflabError(
            f"no linear layer of this {type(model).__name__} is named {targets}; expected LoRA targets"
        )
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, alpha, rslora=rslora))
    return names


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter alone: every ``lora_A`` and ``lora_B``, by their names in ``model``."""
    return {
        f"{n}.{k}": getattr(m, k).detach()
        for n, m in lora_layers(model).items()
        for k in ("lora_A", "lora_B")
    }


def set_lora_scale(model: nn.Module, scale: float) -> None:
    """Every adapter's strength (unmerged layers only: merge after setting it)."""
    for m in lora_layers(model).values():
        if m.merged:
            raise DifflabError("the adapter is merged; unmerge it before changing its scale")
        m.scale = float(scale)


def merge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    for m in lora_layers(model).values():
        m.unmerge()
