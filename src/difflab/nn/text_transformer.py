"""The text tower of CLIP (Radford et al. 2021, Sec. 2.4): a causal transformer over token ids.

    ids (B, L), mask (B, L)
      -> token embedding + learned positions                  (B, L, D)
      -> pre-norm blocks with a causal + padding mask, LayerNorm
      -> tokens (B, L, D): per-token features (cross-attention context for text-to-image)
      -> pooled (B, D): the features at each row's [EOS] token

Why causal and pooled at [EOS]: CLIP kept GPT-2's masked self-attention (to allow initialising from, or
adding, a language-modelling objective), so only the last token has read the whole caption; its state
is the sentence embedding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difflab.errors import MAX_SIZE, DifflabError, check_int
from difflab.nn.transformer import Transformer, causal_padding_mask, check_mlp_ratio
from difflab.text.tokenizer import eos_positions


@dataclass(frozen=True)
class TextTransformerConfig:
    vocab_size: int = 64
    """Set from the tokenizer (a CLIP config derives it)."""
    context_length: int = 32
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    causal: bool = True
    """Causal attention as in CLIP; False gives a bidirectional encoder (padding is always masked)."""

    def __post_init__(self) -> None:
        for name in ("context_length", "width", "depth", "heads"):
            check_int(name, getattr(self, name), 1, MAX_SIZE)
        check_int("vocab_size", self.vocab_size, 1, 2**20)  # 16x GPT-2's 50257 tokens
        check_mlp_ratio(self.mlp_ratio, self.width)
        if self.width % self.heads:
            raise DifflabError(f"text width {self.width} is not divisible by heads={self.heads}")


class TextTransformer(nn.Module):
    """(ids (B, L), mask (B, L)) -> (pooled (B, width), tokens (B, L, width))."""

    def __init__(self, cfg: TextTransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(0.01 * torch.randn(cfg.context_length, cfg.width))
        nn.init.normal_(self.token_embed.weight, std=0.02)  # CLIP's initialisation
        self.transformer = Transformer(cfg.width, cfg.depth, cfg.heads, cfg.mlp_ratio)
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, hidden = self.hidden_states(ids, mask)
        return pooled, self.norm(hidden[-1])

    def hidden_states(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(pooled (B, D), [embeddings, after block 1, ..., after block depth], each (B, L, D), un-normed).
        A text-to-image model may read an earlier layer than the last, as Stable Diffusion 2 reads the
        penultimate one ("clip skip")."""
        b, length = ids.shape
        if length > self.cfg.context_length:
            raise DifflabError(
                f"{length} tokens exceed the text encoder's context length {self.cfg.context_length}"
            )
        mask = mask.bool()
        x = self.token_embed(ids) + self.pos_embed[:length]  # (B, L, D)
        attn_mask = causal_padding_mask(mask) if self.cfg.causal else mask
        hidden = [x]
        for block in self.transformer.blocks:
            hidden.append(block(hidden[-1], attn_mask))
        pooled = self.norm(hidden[-1][torch.arange(b, device=ids.device), eos_positions(mask)])  # (B, D)
        return pooled, hidden
