"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"): a decoder-only
transformer that reads tokens left to right and predicts each one from those before it. It is the
language model the vision-language models build on (LLaVA, Flamingo, BLIP-2 on the toy world).

    ids (B, L) -> wte(ids), or the caller's embeds     (B, L, D)   LLaVA: visual tokens in the sequence
              + wpe(0 .. L-1)                          (B, L, D)
    -> depth blocks: x + Attn(LN(x)), x + MLP(LN(x))   (B, L, D)   causal; hook(i, x) before block i
                                                                   (Flamingo: gated cross-attention)
    -> ln_f, then @ wte^T                              (B, L, V)   logit t scores token t + 1

GPT-2's changes to GPT-1 (Sec. 2.3): LayerNorm moved to the input of each sub-block (pre-LN), one more
after the last block (``ln_f``), and the weights of the layers that write into the residual stream
initialised smaller, by 1/sqrt(N) for N residual layers, since N of them add up there. The output
layer shares the token embedding's matrix (weight tying, Press & Wolf 2017), as GPT-2's released code
does. The MLP's GELU is the tanh approximation GPT-2 was trained with.

The blocks are :class:`difflab.nn.transformer.TransformerBlock`, so LoRA wraps the attention
projections (``to_q``, ``to_k``, ``to_v``, ``to_out``) by name as in every other network here;
:mod:`difflab.nn.gpt_hf` maps the weights onto ``transformers``' GPT2LMHeadModel and back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import MAX_SIZE, DifflabError, check_float, check_int
from difflab.nn.transformer import TransformerBlock, causal_padding_mask, check_mlp_ratio

Hook = Callable[[int, torch.Tensor], torch.Tensor]
"""``hook(i, x) -> x``: called on the residual stream (B, L, width) before block i."""

INIT_STD = 0.02
"""Standard deviation of GPT-2's weight initialisation (its released code; GPT-1, Sec. 4.1)."""


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 128
    """Set from the tokenizer by the lm family."""
    context_length: int = 128
    """Positions (GPT-2's n_positions): a VLM's visual tokens and its text together must fit."""
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    """Dropout on the embeddings and on each residual branch (GPT-2's embd_pdrop and resid_pdrop)."""

    def __post_init__(self) -> None:
        for name in ("context_length", "width", "depth", "heads"):
            check_int(name, getattr(self, name), 1, MAX_SIZE)
        check_int("vocab_size", self.vocab_size, 1, 2**20)  # 16x GPT-2's 50257 tokens
        check_mlp_ratio(self.mlp_ratio, self.width)
        check_float("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if self.width % self.heads:
            raise DifflabError(f"width {self.width} is invalid; expected a multiple of heads ({self.heads})")


class GPT(nn.Module):
    """``forward(ids | embeds, mask, hook) -> logits (B, L, vocab)``; see the module docstring."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.wpe = nn.Embedding(cfg.context_length, cfg.width)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.width, cfg.heads, cfg.mlp_ratio, cfg.dropout, qkv_bias=True,
                             gelu_approximate="tanh")
            for _ in range(cfg.depth)
        )  # fmt: skip
        self.ln_f = nn.LayerNorm(cfg.width)
        self._init_weights()

    @torch.no_grad()
    def _init_weights(self) -> None:
        """GPT-2's initialisation: N(0, 0.02) weights, zero biases, N(0, 0.01) positions; the two layers
        of each block that write into the residual stream (attention's ``to_out``, the MLP's second
        linear) at 0.02 / sqrt(2 * depth), since 2 * depth of them add up there (Sec. 2.3)."""
        for m in self.modules():
            if isinstance(m, nn.Linear | nn.Embedding):
                nn.init.normal_(m.weight, std=INIT_STD)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.wpe.weight, std=0.01)
        for block in self.blocks:
            for layer in (block.attn.to_out, block.mlp[2]):
                nn.init.normal_(layer.weight, std=INIT_STD / (2 * self.cfg.depth) ** 0.5)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, without positions: (B, L) -> (B, L, width). What a VLM concatenates its
        visual tokens with before passing the sequence as ``embeds``."""
        return self.wte(ids)

    def hidden_states(
        self,
        ids: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        hook: Hook | None = None,
    ) -> torch.Tensor:
        """The last block's output after ``ln_f``, (B, L, width).

        Exactly one of ``ids`` (B, L) and ``embeds`` (B, L, width), which replace ``wte(ids)``; positions
        0..L-1 are added to either. ``mask`` (B, L): True on real tokens, padding on the right; padded
        keys are never attended to, and attention is always causal. ``hook(i, x) -> x`` rewrites the
        residual stream (B, L, width) before block i (None: plain GPT-2)."""
        x = self._token_embeddings(ids, embeds)
        b, length, _ = x.shape
        if mask is None:
            mask = torch.ones(b, length, dtype=torch.bool, device=x.device)
        elif tuple(mask.shape) != (b, length):
            raise DifflabError(f"mask has shape {tuple(mask.shape)}; expected ({b}, {length}), one per token")
        attn_mask = causal_padding_mask(mask.bool())  # (B, L, L): query i sees real keys j <= i
        x = self.drop(x + self.wpe.weight[:length])  # (B, L, D) + (L, D)
        for i, block in enumerate(self.blocks):
            if hook is not None:
                x = hook(i, x)
            x = block(x, attn_mask)
        return self.ln_f(x)

    def forward(
        self,
        ids: torch.Tensor | None = None,
        *,
        embeds: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        hook: Hook | None = None,
    ) -> torch.Tensor:
        """Next-token logits (B, L, vocab): row t scores token t + 1. Arguments as :meth:`hidden_states`."""
        return F.linear(self.hidden_states(ids, embeds=embeds, mask=mask, hook=hook), self.wte.weight)

    def _token_embeddings(self, ids: torch.Tensor | None, embeds: torch.Tensor | None) -> torch.Tensor:
        if (ids is None) == (embeds is None):
            raise DifflabError("GPT takes exactly one of ids (B, L) and embeds (B, L, width); got "
                               + ("both" if ids is not None else "neither"))  # fmt: skip
        if ids is not None:
            if ids.ndim != 2 or ids.is_floating_point():
                raise DifflabError(
                    f"ids has shape {tuple(ids.shape)} ({ids.dtype}); expected integer ids (B, L)"
                )
            x = self.wte(ids)
        else:
            if embeds.ndim != 3 or embeds.shape[-1] != self.cfg.width:
                raise DifflabError(
                    f"embeds has shape {tuple(embeds.shape)}; expected (B, L, {self.cfg.width}), the model's width"
                )
            x = embeds
        if x.shape[1] > self.cfg.context_length:
            raise DifflabError(
                f"{x.shape[1]} tokens exceed the context length {self.cfg.context_length}; expected at most that many"
            )
        return x

    @torch.no_grad()
    def generate(
        self,
        ids: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_id: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
        mask: torch.Tensor | None = None,
        prefix: torch.Tensor | None = None,
        hook: Hook | None = None,
    ) -> list[list[int]]:
        """Continue each row of ``ids`` (B, L) by up to ``max_new_tokens`` tokens: the most likely one at
        ``temperature`` 0 (greedy), else one drawn from softmax(logits / temperature) with ``generator``
        (a CPU generator: a seed gives the same text on any device). A row stops at ``eos_id``; the
        returned tokens are the new ones, ``eos_id`` left out (a row shorter than ``max_new_tokens``
        ended there).

        ``mask`` (B, L): True on each prompt's tokens, right-padded (default: every column). ``prefix``
        (B, P, width): embeddings put before every row's tokens (LLaVA's visual tokens). ``hook`` as in
        :meth:`forward` (Flamingo). There is no key-value cache: every step reruns the whole sequence,
        which costs little at the toy world's tens of tokens."""
        check_int("max_new_tokens", max_new_tokens, 1, MAX_SIZE)
        check_float("temperature", temperature, 0.0)
        b, length = ids.shape
        device = ids.device
        mask = torch.ones(b, length, dtype=torch.bool, device=device) if mask is None else mask.bool()
        lengths = mask.sum(1)  # (B,)
        if not torch.equal(mask, torch.arange(length, device=device)[None] < lengths[:, None]):
            raise DifflabError("generate's mask is not right-padded; expected each row's prompt tokens first")
        p = 0 if prefix is None else prefix.shape[1]
        if p == 0 and bool((lengths == 0).any()):
            raise DifflabError("a prompt of generate is empty; expected at least one token (<bos>) per row")
        if p + int(lengths.max()) + max_new_tokens - 1 > self.cfg.context_length:
            raise DifflabError(
                f"{p} prefix + {int(lengths.max())} prompt + {max_new_tokens} new tokens exceed the context "
                f"length {self.cfg.context_length}; expected fewer new tokens or a shorter prompt"
            )
        rows = [ids[i, : int(lengths[i])].tolist() for i in range(b)]
        new: list[list[int]] = [[] for _ in range(b)]
        done = [False] * b
        for _ in range(max_new_tokens):
            longest = max(len(r) for r in rows)
            tokens = torch.tensor([r + [0] * (longest - len(r)) for r in rows], device=device)  # (B, T)
            real = torch.tensor([[j < len(r) for j in range(longest)] for r in rows], device=device)
            x = self.embed(tokens)
            if prefix is not None:
                x = torch.cat([prefix, x], 1)  # (B, P + T, D)
                real = torch.cat([torch.ones(b, p, dtype=torch.bool, device=device), real], 1)
            logits = self.forward(embeds=x, mask=real, hook=hook)  # (B, P + T, V)
            last = torch.tensor([p + len(r) - 1 for r in rows], device=device)
            logits = logits[torch.arange(b, device=device), last].float().cpu()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)[:, 0]
            for i, t in enumerate(nxt.tolist()):
                if done[i]:
                    continue
                if t == eos_id:
                    done[i] = True
                else:
                    rows[i].append(t)
                    new[i].append(t)
            if all(done):
                break
        return new
