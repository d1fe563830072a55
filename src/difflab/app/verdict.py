"""The reader's verdict on a generated image: what it reads there, and whether the prompt holds in that.

Prompts typed into the page are plain English; the world's prompts (:mod:`difflab.world.prompts`) are
structures that write English (``text()``) and know when they are true (``holds``). :func:`parse_prompt`
goes back from the English to the structure for the texts the world itself writes - 'a red circle', 'two
squares', 'a circle to the left of a square', 'a red circle and a blue square', 'a large cyan diamond at
the top left' - and answers None for anything else, so a verdict is never given on a guess: a candidate
counts only if its own ``text()`` is the typed text, word for word. An image whose prompt does not parse
still gets the reader's reading, without a verdict.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from difflab.world.language import describe
from difflab.world.prompts import (
    NUMBER_WORDS,
    RELATIONS,
    Conjunction,
    Count,
    Exists,
    ObjectSpec,
    Prompt,
    Relation,
    plural,
)
from difflab.world.reader import read
from difflab.world.scene import ALL_SHAPES, COLORS, POSITIONS, SIZES, Scene, WorldConfig

_HEADS = {**{s: (s, False) for s in (*ALL_SHAPES, "object")},
          **{plural(s): (s, True) for s in (*ALL_SHAPES, "object")}}  # fmt: skip
_PLACES = {("in the center" if p == "center" else f"at the {p}"): p for p in POSITIONS}


def normalized(text: str) -> str:
    """Lowercase, one space between words, a space after each comma, no full stop at the end."""
    return " ".join(text.lower().replace(",", ", ").split()).removesuffix(".").strip()


def _noun(phrase: str) -> tuple[str, ObjectSpec] | None:
    """'a large red circle at the top left' -> ('a', ObjectSpec(...)); the determiner is kept apart."""
    det, _, rest = phrase.partition(" ")
    place = None
    for words, position in _PLACES.items():
        if rest.endswith(" " + words):
            rest, place = rest.removesuffix(" " + words), position
            break
    *attributes, head = rest.split() or [""]
    if head not in _HEADS or len(attributes) > 2:
        return None
    size = attributes.pop(0) if attributes and attributes[0] in SIZES else None
    color = attributes.pop(0) if attributes and attributes[0] in COLORS else None
    if attributes:
        return None
    shape = _HEADS[head][0]
    return det, ObjectSpec(shape=None if shape == "object" else shape, color=color, size=size, position=place)


def _candidates(text: str):
    for relation, words in RELATIONS.items():
        a, found, b = text.partition(f" {words} ")
        if found and (na := _noun(a)) and (nb := _noun(b)):
            yield Relation(na[1], relation, nb[1])
    parts = [_noun(p) for p in re.split(r", | and ", text)]
    if len(parts) > 1 and all(parts):
        yield Conjunction(tuple(p[1] for p in parts))
    if (one := _noun(text)) is not None:
        det, spec = one
        if det in ("a", "an"):
            yield Exists(spec)
        elif det in NUMBER_WORDS:
            yield Count(spec, NUMBER_WORDS.index(det))


def parse_prompt(text: str) -> Prompt | None:
    """The world's prompt whose ``text()`` is ``text`` (up to case, spacing and a full stop), or None."""
    want = normalized(text)
    for prompt in _candidates(want):
        try:
            if prompt.text() == want:
                return prompt
        except (KeyError, IndexError):  # a count word with no such number
            continue
    return None


@dataclass(frozen=True)
class Verdict:
    """What the reader read in one image and, when the prompt parses, whether the prompt holds in it."""

    reading: str
    holds: bool | None

    def caption(self) -> str:
        mark = {True: "✓ holds", False: "✗ fails", None: "no verdict (not in the world's language)"}[
            self.holds
        ]
        return f"{mark} - the reader reads: {self.reading}"


def judge(prompt: str, images, world: WorldConfig) -> list[Verdict]:
    """The reader's :class:`Verdict` on each image ((N, H, W, 3) uint8) of ``prompt`` in ``world``."""
    parsed = parse_prompt(prompt)
    scenes: list[Scene] = [read(image, world) for image in images]
    return [Verdict(describe(s), None if parsed is None else parsed.holds(s)) for s in scenes]
