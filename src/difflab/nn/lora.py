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
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError

ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out")
"""The attention projections every UNet and transformer block names this way (:mod:`difflab.nn.attention`)."""
CROSS_ATTENTION = ("cross_attn.to_q", "cross_attn.to_k", "cross_attn.to_v", "cross_attn.to_out")
"""The projections of cross-attention alone: where a UNet reads its prompt's tokens."""
CROSS_ATTENTION_KV = ("cross_attn.to_k", "cross_attn.to_v")
"""The projections of the prompt's tokens into keys and values: all that Custom Diffusion (Kumari et al. 2023)
fine-tunes to teach a concept, the one path by which a word reaches a UNet's pixels."""
RESBLOCK_CONVS = ("conv1", "conv2")
"""The two 3x3 convolutions of every residual block (:mod:`difflab.nn.resblock`): where a UNet draws detail
below its attention resolutions."""


class _LoRA(nn.Module):
    """A frozen layer ``base`` plus ``scale * (alpha / r) * B A`` applied to its input (Eq. 3); a subclass says
    how A and B apply (:meth:`update`). A has the base weight's fan-in, B is (d_out, r), so
    ``B.flatten(1) @ A.flatten(1)`` has the base weight's shape once unflattened."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, rslora: bool, a_shape: tuple, what: str):
        super().__init__()
        d_in, d_out = math.prod(a_shape[1:]), base.weight.shape[0]
        if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(d_in, d_out):
            raise DifflabError(f"LoRA rank {rank!r} is invalid; expected 1..{min(d_in, d_out)} for {what}")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, *a_shape[1:], **kw))  # (r, fan-in...)
        # B starts at 0: the update starts at 0 and the adapted network is the base
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank, *([1] * (len(a_shape) - 2)), **kw))  # (d_out, r, ...)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's / nn.Conv2d's own, PEFT's default
        self.scale = 1.0
        """The adapter's strength at use (0: the base alone)."""
        self.merged = False

    def update(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta(self) -> torch.Tensor:
        """The update (alpha / r) B A, the base weight's shape."""
        return self.scaling * (self.lora_B.flatten(1) @ self.lora_A.flatten(1)).view_as(self.base.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged or self.scale == 0:
            return out
        return out + self.update(x) * (self.scaling * self.scale)

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


class LoRALinear(_LoRA):
    """``base`` (an ``nn.Linear``, frozen) plus ``scale * (alpha / r) * B A x`` (Eq. 3): A (r, d_in), B (d_out, r)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, *, rslora: bool = False):
        super().__init__(base, rank, alpha, rslora, tuple(base.weight.shape),
                         f"a {base.in_features} -> {base.out_features} layer")  # fmt: skip

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.lora_A.T @ self.lora_B.T


class LoRAConv2d(_LoRA):
    """``base`` (an ``nn.Conv2d``, frozen) plus ``scale * (alpha / r) * B * (A * x)``: A is a convolution like the
    base's into r channels (r, c_in, k, k), B a 1x1 convolution out of them (c_out, r, 1, 1), as PEFT's Conv2d
    LoRA (LoCon); merged, B A is one k x k kernel of the base's shape."""

    def __init__(self, base: nn.Conv2d, rank: int, alpha: float, *, rslora: bool = False):
        if base.groups != 1:
            raise DifflabError(f"a grouped convolution (groups={base.groups}) cannot take LoRA here; expected groups=1")
        super().__init__(base, rank, alpha, rslora, tuple(base.weight.shape),
                         f"a {base.in_channels} -> {base.out_channels} channel convolution")  # fmt: skip

    def update(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(F.conv2d(x, self.lora_A, None, b.stride, b.padding, b.dilation), self.lora_B)


_WRAPPERS = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


def add_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: Iterable[str] = ATTENTION_TARGETS,
             *, rslora: bool = False) -> list[str]:  # fmt: skip
    """Freeze ``model`` and wrap each ``nn.Linear`` / ``nn.Conv2d`` whose name ends in one of ``targets`` in a
    :class:`LoRALinear` / :class:`LoRAConv2d` (``alpha`` defaults to ``rank``: scaling 1). A target is a
    layer's last name ('to_k': every attention's keys) or its last names ('cross_attn.to_k': cross-attention's
    keys alone), as PEFT's ``target_modules`` match.
    Returns the wrapped modules' names; an error when nothing matched."""
    alpha = float(rank if alpha is None else alpha)
    targets = tuple(targets)
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules()
             if type(m) in _WRAPPERS and any(n == t or n.endswith("." + t) for t in targets)]  # fmt: skip
    if not names:
        raise DifflabError(
            f"no linear or convolution layer of this {type(model).__name__} is named {targets}; expected LoRA targets"
        )
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        layer = getattr(owner, leaf)
        setattr(owner, leaf, _WRAPPERS[type(layer)](layer, rank, alpha, rslora=rslora))
    return names


def lora_layers(model: nn.Module) -> dict[str, _LoRA]:
    return {n: m for n, m in model.named_modules() if isinstance(m, _LoRA)}


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
