"""The CLIP layout that both tokenizers share: a fixed-length row of ids with a mask, and saving it.

A text encoder reads a fixed-length row of token ids. Both tokenizers lay a text out as CLIP does
(Radford et al., 2021, "Learning Transferable Visual Models From Natural Language Supervision")::

    ids   <bos>  a     red   circle <eos>  <pad>  <pad> ...     (context_length columns)
    mask  True   True  True  True   True   False  False ...

The text's embedding is the encoder's output at ``<eos>`` (:func:`eos_positions`): under a causal
attention mask that is the one position that has seen the whole text. CLIP finds it as ``argmax`` of
the ids, because its end-of-text token happens to have the largest id; a mask says the same thing
explicitly, for any vocabulary, and also tells attention which columns are padding.

A text that does not fit in ``context_length`` is an error by default (as in CLIP's ``tokenize``);
``encode(..., truncate=True)`` keeps its first ``context_length - 2`` tokens instead.

:class:`_Tokenizer` holds this layout and the JSON file format; a subclass says only how one text
becomes ids and back (:mod:`difflab.text.word`, :mod:`difflab.text.bpe`).
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from difflab.config import save_json
from difflab.errors import DifflabError
from difflab.text.normalize import _short_repr


def _check_context_length(context_length: int) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 3:
        raise DifflabError(
            f"context_length {context_length!r} is invalid; expected an integer >= 3 (<bos>, a token, <eos>)"
        )
    return context_length


def _as_texts(texts: str | Sequence[str]) -> list[str]:
    """One string, or a list/tuple of strings, as a list."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, list | tuple):
        raise DifflabError(
            f"texts {_short_repr(texts)} is a {type(texts).__name__}; expected a string or a list of strings"
        )
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise DifflabError(f"text {i} is a {type(t).__name__} ({_short_repr(t)}); expected a string")
    return list(texts)


def _as_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    """One row of token ids as a list of ints, each checked to be in the vocabulary."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise DifflabError(
                f"decode takes one row of ids; got a tensor of shape {tuple(ids.shape)} (decode each row)"
            )
        ids = ids.tolist()
    try:
        out = [operator.index(i) for i in ids]
    except TypeError:
        raise DifflabError(f"token ids {_short_repr(ids)} are not a sequence of integers") from None
    for i in out:
        if not 0 <= i < vocab_size:
            raise DifflabError(f"token id {i} is out of range; expected 0..{vocab_size - 1}")
    return out


def _read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise DifflabError(f"no tokenizer file at {path}")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DifflabError(f"{path} is not a tokenizer file: {e}") from None
    if not isinstance(d, dict):
        raise DifflabError(f"{path} is not a tokenizer file: expected a JSON object")
    return d


def _field(d: dict, key: str, kind: str) -> Any:
    if key not in d:
        raise DifflabError(f"the {kind} tokenizer dict has no '{key}'; expected the output of to_dict()")
    return d[key]


def _check_kind(d: Any, kind: str) -> None:
    if not isinstance(d, dict):
        raise DifflabError(f"a tokenizer dict must be a dict; got a {type(d).__name__}")
    if d.get("kind") != kind:
        raise DifflabError(f"expected a '{kind}' tokenizer dict; got kind {d.get('kind')!r}")


def eos_positions(mask: torch.Tensor) -> torch.Tensor:
    """Column of ``<eos>`` in each row, ``(B,)`` long: the last True of the mask (both tokenizers' layout),
    where a text encoder's output is pooled into one embedding per text."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise DifflabError(f"mask must be a (batch, context_length) tensor; got {shape}")
    return mask.to(torch.long).sum(1) - 1


class _Tokenizer:
    """The CLIP layout, shared by both tokenizers: a subclass turns one text into token ids
    (:meth:`_tokens`) and back (:meth:`decode`); this class pads, masks, saves and loads."""

    kind: str

    def __init__(self, context_length: int) -> None:
        self._context_length = _check_context_length(context_length)

    @property
    def context_length(self) -> int:
        """Columns of an encoded row: ``<bos>``, at most ``context_length - 2`` tokens, ``<eos>``, padding."""
        return self._context_length

    # Subclasses provide these.
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def _tokens(self, text: str, truncate: bool) -> list[int]:
        raise NotImplementedError

    def _fit(self, text: str, n: int, truncate: bool) -> int:
        """How many of a text's ``n`` tokens go in a row: all of them, or the error (or truncation) when
        they do not fit between ``<bos>`` and ``<eos>``."""
        room = self.context_length - 2
        if n <= room or truncate:
            return min(n, room)
        raise DifflabError(
            f"text {_short_repr(text)} is too long: {n} tokens plus <bos> and <eos> make {n + 2}, but the "
            f"context length is {self.context_length} (use a longer context_length, or truncate=True)"
        )

    def encode(
        self, texts: str | Sequence[str], *, truncate: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (long) and mask (bool), both ``(B, context_length)``; a single string gives ``B = 1``.

        Each row is ``<bos>``, the text's tokens, ``<eos>``, then ``<pad>``; the mask is True from
        ``<bos>`` to ``<eos>`` inclusive. A text with more than ``context_length - 2`` tokens is an error
        naming it, unless ``truncate`` (then its first ``context_length - 2`` tokens are kept)."""
        rows = [[self.bos_id, *self._tokens(t, truncate), self.eos_id] for t in _as_texts(texts)]
        pad = self.context_length
        ids = torch.tensor([r + [self.pad_id] * (pad - len(r)) for r in rows], dtype=torch.long)
        mask = torch.tensor([[True] * len(r) + [False] * (pad - len(r)) for r in rows], dtype=torch.bool)
        return ids.reshape(len(rows), pad), mask.reshape(len(rows), pad)

    def eos_positions(self, mask: torch.Tensor) -> torch.Tensor:
        """See the module-level :func:`eos_positions`."""
        return eos_positions(mask)

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, d: dict):
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON (atomically); returns the path. Store it next to a text encoder's
        weights: the ids are only meaningful with the vocabulary they were made with."""
        path = Path(path)
        save_json(self.to_dict(), path)
        return path

    @classmethod
    def load(cls, path: str | Path):
        """A tokenizer saved with :meth:`save`."""
        return cls.from_dict(_read_json(path))
