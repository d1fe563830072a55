"""The reader's verdict on a generated image: what it reads there, and whether the prompt holds in that.

Prompts typed into the page are plain English; the world's prompts (:mod:`difflab.world.prompts`) are
structures that write English (``text()``) and know when they are true (``holds``).
:func:`~difflab.world.parse.parse_prompt` goes back from the English to the structure for the texts the
world itself writes - 'a red circle', 'two squares', 'a circle to the left of a square', 'a red circle
and a blue square', 'a large cyan diamond at the top left' - and answers None for anything else, so a
verdict is never given on a guess: a candidate counts only if its own ``text()`` is the typed text, word
for word. An image whose prompt does not parse still gets the reader's reading, without a verdict.
"""

from __future__ import annotations

from dataclasses import dataclass

from difflab.world.language import describe
from difflab.world.parse import normalized, parse_prompt
from difflab.world.reader import read
from difflab.world.scene import Scene, WorldConfig

# The parser lives in the world (difflab.world.parse); its names stay importable from here.
__all__ = ["Verdict", "judge", "normalized", "parse_prompt"]


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
