"""CLIP's text tower, frozen, as the conditioning encoder of a text-to-image model.

Stable Diffusion conditions its UNet on a frozen CLIP text encoder (Rombach et al. 2022, Sec. 3.3 and
4.3.2): the per-token features of the last layer are the keys and values of cross-attention, and a pooled
sentence embedding can condition globally (as SDXL adds it to the timestep embedding). This module cuts
those two outputs out of a trained difflab CLIP run:

    texts -> tokenizer -> TextTransformer -> tokens (B, L, width)   cross-attention context (+ mask (B, L))
                                          -> [EOS] state -> W_t -> pooled (B, embed_dim), unit length

``export_text_encoder(RUN, DIR)`` writes a self-contained folder (text_encoder.safetensors,
text_encoder.json, tokenizer.json); ``load_text_encoder`` reads that folder or a CLIP run directly.
Nothing is unpickled; the weights are frozen (``requires_grad=False``) and the module stays in eval mode.

What decides the encoder's output is both its weights and its tokenizer (an edited vocabulary maps the
same prompt to other ids), so both are pinned:

- An exported folder records the sha256 of text_encoder.safetensors and of tokenizer.json in
  text_encoder.json; ``load_text_encoder`` refuses a folder whose files no longer match, and
  ``text_encoder_id`` (what a text-to-image run records) is ``text_encoder:<16 hex>`` over both.
  A folder exported before the hashes were recorded still loads unchecked, and keeps its old
  weights-only id (``text_encoder.safetensors:<16 hex>``), so runs trained on it keep loading;
  export it again to have its tokenizer covered.
- A CLIP run directory loaded directly is pinned by its newest checkpoint (whose sha256 covers the
  weights), but not its tokenizer.json, which the run writes beside its checkpoints and which nothing
  records a hash of. Export the encoder to have the tokenizer checked too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import reprlib
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from difflab.config import atomic_path, from_dict, save_json, to_dict
from difflab.errors import DifflabError
from difflab.models import clip
from difflab.models.runs import checkpoint_id
from difflab.nn.text_transformer import TextTransformer, TextTransformerConfig
from difflab.text.tokenizer import load_tokenizer
from difflab.train.checkpoint import check_compatible, check_safetensors_header

WEIGHTS, CONFIG, TOKENIZER = "text_encoder.safetensors", "text_encoder.json", "tokenizer.json"
PINNED = (WEIGHTS, TOKENIZER)
"""The files whose sha256 text_encoder.json records: together they decide what the encoder computes."""


class TextEncoding(NamedTuple):
    tokens: torch.Tensor
    """(B, L, width): last-layer features of every token (cross-attention keys/values)."""
    mask: torch.Tensor
    """(B, L), True on real tokens: the cross-attention mask."""
    pooled: torch.Tensor
    """(B, embed_dim): the CLIP text embedding, unit length (global conditioning, CLIP score)."""


class FrozenTextEncoder(nn.Module):
    """texts -> :class:`TextEncoding`; frozen, and always in eval mode."""

    def __init__(
        self, cfg: TextTransformerConfig, embed_dim: int, tokenizer, layers: tuple[int, ...] = (-1,)
    ):
        super().__init__()
        self.cfg, self.embed_dim, self.tokenizer = cfg, embed_dim, tokenizer
        self.text = TextTransformer(cfg)
        self.text_proj = nn.Linear(cfg.width, embed_dim, bias=False)
        self.layers = check_layers(layers, cfg.depth)
        self.requires_grad_(False)
        self.eval()

    @property
    def width(self) -> int:
        """Feature size of ``tokens``: the ``context_dim`` of a UNet's cross-attention."""
        return self.cfg.width * len(self.layers)

    def add_words(self, words: list[str], rows: torch.Tensor) -> list[int]:
        """Teach the tokenizer ``words`` and give each a new row of the token-embedding table, ``rows``
        (len(words), width): the ids of the words it was trained on do not move, and the rows stay frozen
        (a LoRA adapts the network that reads them; training them would be Textual Inversion, Gal et al.
        2022). Returns the new words' ids. Only a word-level tokenizer can add words."""
        if not hasattr(self.tokenizer, "with_words"):
            raise DifflabError(
                f"a {type(self.tokenizer).__name__} cannot add words; expected a word tokenizer"
            )
        new = [w for w in dict.fromkeys(words) if w not in self.tokenizer.words]
        if rows.shape != (len(new), self.cfg.width):
            raise DifflabError(f"rows of shape {tuple(rows.shape)} for the new words {new}; expected "
                               f"({len(new)}, {self.cfg.width})")  # fmt: skip
        self.tokenizer = self.tokenizer.with_words(new)
        old = self.text.token_embed
        table = nn.Embedding(self.tokenizer.vocab_size, self.cfg.width, device=old.weight.device,
                             dtype=old.weight.dtype)  # fmt: skip
        table.weight.data = torch.cat([old.weight.data, rows.to(old.weight)])  # (vocab + new, width)
        self.text.token_embed = table.requires_grad_(False)
        self.cfg = dataclasses.replace(self.cfg, vocab_size=self.tokenizer.vocab_size)
        return [self.tokenizer.vocab_size - len(new) + i for i in range(len(new))]

    def train(self, mode: bool = True) -> FrozenTextEncoder:
        return super().train(False)  # frozen: a parent's .train() must not switch on dropout here

    @torch.no_grad()
    def forward(self, texts: str | list[str]) -> TextEncoding:
        return self.encode_ids(*self.tokenizer.encode(texts))

    @torch.no_grad()
    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> TextEncoding:
        """Token ids and mask (B, L), as the tokenizer makes them (a data loader can tokenize ahead)."""
        device = self.text_proj.weight.device
        ids, mask = ids.to(device), mask.to(device)
        pooled, hidden = self.text.hidden_states(ids, mask)
        # every chosen layer through the tower's final LayerNorm (as SD 2 reads its penultimate layer),
        # side by side along the features (as SDXL joins its two encoders' token features)
        tokens = torch.cat([self.text.norm(hidden[k]) for k in self.layers], dim=-1)  # (B, L, width)
        return TextEncoding(tokens, mask, F.normalize(self.text_proj(pooled), dim=-1))


def check_layers(layers: tuple[int, ...], depth: int) -> tuple[int, ...]:
    """Hidden states a text-to-image model reads: 0 is the token embeddings, k the output of block k, and
    -1 (or ``depth``) the last; an error names a layer the tower does not have."""
    if not layers:
        raise DifflabError(f"text_layers is empty; expected layer numbers in -1..{depth} (-1: the last)")
    for k in layers:
        if not -1 <= k <= depth:
            raise DifflabError(
                f"text layer {k} is out of range; this text tower has layers 0..{depth} (-1: the last)"
            )
    return tuple(depth if k == -1 else k for k in layers)


def export_text_encoder(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the text tower, projection and tokenizer of CLIP run ``run_dir`` into ``out_dir``."""
    model, cfg = clip.load_model(run_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = {f"text.{k}": v for k, v in model.text.state_dict().items()}
    weights["text_proj.weight"] = model.text_proj.weight.detach()
    with atomic_path(out / WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))
    load_tokenizer(Path(run_dir) / TOKENIZER).save(out / TOKENIZER)
    # Written last, with the hashes of what is now on disk: a crash part-way through a re-export leaves
    # files that do not match the old record, which loading refuses.
    record = {"text": to_dict(cfg.text), "embed_dim": cfg.embed_dim, "source": str(run_dir)}
    save_json({**record, "sha256": {name: _sha256(out / name) for name in PINNED}}, out / CONFIG)
    return out


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as err:
        raise DifflabError(f"cannot read '{path}': {err.strerror or err}") from None


def _read_config(path: Path) -> dict:
    """An exported folder's text_encoder.json."""
    try:
        meta = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise DifflabError(f"cannot read '{path / CONFIG}': {err}") from None
    if not isinstance(meta, dict):
        raise DifflabError(f"'{path / CONFIG}' holds a JSON {type(meta).__name__}, expected an object")
    return meta


def _recorded_hashes(path: Path) -> dict[str, str] | None:
    """The sha256 of each pinned file that text_encoder.json records; ``None`` for a folder exported
    before they were recorded."""
    if not (path / CONFIG).is_file():
        return None
    recorded = _read_config(path).get("sha256")
    if recorded is None:
        return None
    if not (isinstance(recorded, dict) and all(isinstance(recorded.get(name), str) for name in PINNED)):
        raise DifflabError(
            f"'{path / CONFIG}': sha256 is {reprlib.repr(recorded)}, expected the sha256 of "
            f"{' and '.join(PINNED)}"
        )
    return {name: recorded[name] for name in PINNED}


def _check_hashes(path: Path) -> None:
    """Refuse an exported folder whose weights or tokenizer changed since export."""
    recorded = _recorded_hashes(path)
    if recorded is None:
        return  # exported before hashes were recorded: nothing to check against
    for name in PINNED:
        if _sha256(path / name) != recorded[name]:
            raise DifflabError(
                f"'{path / name}' does not match the sha256 recorded in '{path / CONFIG}' (edited or "
                f"replaced since export?); export the text encoder again"
            )


def text_encoder_id(path: str | Path) -> str:
    """What a text-to-image run records of its text encoder, to notice when it is replaced later:
    ``text_encoder:<16 hex>`` of an exported folder's weights and tokenizer together (the sha256 of their
    two sha256), or a CLIP run's checkpoint id. A folder exported before hashes were recorded keeps its
    old id, ``text_encoder.safetensors:<16 hex>`` of the weights alone."""
    path = Path(path)
    if (path / WEIGHTS).is_file():
        if _recorded_hashes(path) is None:
            return f"{WEIGHTS}:{_sha256(path / WEIGHTS)[:16]}"
        both = "\n".join(f"{name}:{_sha256(path / name)}" for name in PINNED)
        return f"text_encoder:{hashlib.sha256(both.encode()).hexdigest()[:16]}"
    if (path / "config.json").is_file():
        return checkpoint_id(path, "CLIP run")
    raise DifflabError(
        f"'{path}' is neither an exported text encoder ({CONFIG}) nor a CLIP run directory (config.json)"
    )


def load_text_encoder(
    path: str | Path, *, device: str = "cpu", layers: tuple[int, ...] = (-1,)
) -> FrozenTextEncoder:
    """A frozen text encoder from an exported folder or from a CLIP run directory; ``layers`` picks the
    hidden states that make its token features (see :func:`check_layers`). An exported folder whose
    weights or tokenizer no longer match the sha256 recorded at export is refused."""
    path = Path(path)
    if (path / CONFIG).is_file():
        meta = _read_config(path)
        check_safetensors_header(path / WEIGHTS)
        _check_hashes(path)
        encoder = FrozenTextEncoder(
            from_dict(TextTransformerConfig, meta["text"]),
            meta["embed_dim"],
            load_tokenizer(path / TOKENIZER),
            layers,
        )
        weights = load_file(str(path / WEIGHTS))
        check_compatible(encoder, weights, f"text encoder '{path}'")
        encoder.load_state_dict(weights)
        return encoder.to(device)
    if (path / "config.json").is_file():
        model, cfg = clip.load_model(path)
        encoder = FrozenTextEncoder(cfg.text, cfg.embed_dim, load_tokenizer(path / TOKENIZER), layers)
        encoder.text.load_state_dict(model.text.state_dict())
        encoder.text_proj.load_state_dict(model.text_proj.state_dict())
        return encoder.to(device)
    raise DifflabError(
        f"'{path}' is neither an exported text encoder ({CONFIG}) nor a CLIP run directory (config.json)"
    )
