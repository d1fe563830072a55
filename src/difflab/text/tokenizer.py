"""Tokenizers for the CLIP text encoder: words for the toy world, byte-level BPE for real captions.

Both lay a text out as CLIP does - ``<bos>``, the text's tokens, ``<eos>``, padding, with a mask - and
save themselves as JSON next to a text encoder's weights (:mod:`difflab.text.layout`). They differ in
what a token is:

- :class:`~difflab.text.word.WordTokenizer`: one id per word of a closed vocabulary, the toy world's
  (:mod:`difflab.text.word`; the vocabulary is collected in :mod:`difflab.text.world_vocab`, and texts
  are split into words by :mod:`difflab.text.normalize`).
- :class:`~difflab.text.bpe.BPETokenizer`: byte-level byte-pair encoding (Sennrich et al., 2016; the
  byte-level variant of GPT-2, Radford et al., 2019, which CLIP uses, lowercased) through the optional
  ``tokenizers`` package, for open-vocabulary real captions (:mod:`difflab.text.bpe`).

This module is where either kind is loaded back (:func:`load_tokenizer`), and the import path the rest
of difflab uses for all of the names above.
"""

from __future__ import annotations

from pathlib import Path

from difflab.errors import check_choice
from difflab.text.bpe import BPETokenizer
from difflab.text.layout import _read_json, eos_positions
from difflab.text.normalize import PUNCTUATION, normalize
from difflab.text.word import UNKNOWN_MODES, WordTokenizer

__all__ = [
    "PUNCTUATION",
    "TOKENIZER_KINDS",
    "UNKNOWN_MODES",
    "BPETokenizer",
    "WordTokenizer",
    "eos_positions",
    "load_tokenizer",
    "normalize",
]

TOKENIZER_KINDS = ("word", "bpe")


def load_tokenizer(path_or_dict: str | Path | dict) -> WordTokenizer | BPETokenizer:
    """A tokenizer from a file written by ``save`` or a dict from ``to_dict``, of either kind."""
    d = path_or_dict if isinstance(path_or_dict, dict) else _read_json(path_or_dict)
    kind = check_choice("tokenizer kind", str(d.get("kind")), TOKENIZER_KINDS)
    return (WordTokenizer if kind == "word" else BPETokenizer).from_dict(d)
