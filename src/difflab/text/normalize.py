"""How a text becomes words: lowercased, split on whitespace, each punctuation mark a token of its own.

:func:`normalize` is what :class:`~difflab.text.word.WordTokenizer` reads a text with (and what it checks
its vocabulary against); ``_join`` writes normalized words back as the toy world writes them. The
byte-level BPE tokenizer does its own normalizing inside the ``tokenizers`` package and does not use
this module's splitting, only ``_short_repr`` for its error messages.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from difflab.errors import DifflabError

# Punctuation is kept as tokens of its own rather than dropped: the toy world's questions end in '?'
# (which tells a VLM that a question was asked) and its descriptions of three or more objects are
# lists with ','. The toy world never says '.', '!' or "'", so they are outside its vocabulary and a
# strict tokenizer reports them instead of quietly ignoring part of what the user typed.
PUNCTUATION = (",", "?", ".", "!", "'")
_PUNCT = re.escape("".join(PUNCTUATION))
_TOKEN = re.compile(rf"[{_PUNCT}]|[^\s{_PUNCT}]+")  # one punctuation mark, or a run of other non-spaces
# When decoding, these are written against the previous word ('how many circles?'), as the toy world
# writes them; "'" is written between spaces, since it may open a quotation as well as close a word.
_ATTACHED = frozenset(",?.!")


def normalize(text: str) -> list[str]:
    """Lowercase and split into words; each of ``, ? . ! '`` is a token of its own, and any run of
    whitespace separates words. ``normalize("How many  circles?") == ['how', 'many', 'circles', '?']``."""
    if not isinstance(text, str):
        raise DifflabError(f"text {_short_repr(text)} is a {type(text).__name__}; expected a string")
    return _TOKEN.findall(text.lower())


def _join(words: Iterable[str]) -> str:
    """Inverse of :func:`normalize` on normalized text: words between single spaces, with ',', '?', '.'
    and '!' against the previous word. ``normalize(_join(ws)) == ws`` for any normalized ``ws``."""
    out: list[str] = []
    for w in words:
        if out and w in _ATTACHED:
            out[-1] += w
        else:
            out.append(w)
    return " ".join(out)


def _short_repr(value: Any, limit: int = 60) -> str:
    """``repr`` of a value shortened to about ``limit`` characters: error messages stay one short line
    (``repr`` also escapes newlines)."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[: limit - 3] + "...")
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
