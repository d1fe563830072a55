"""argparse ``type=`` functions for the commands' numeric and named flags.

A flag is checked as it is parsed, so a bad value ends in argparse's one-line usage error (``difflab
sample: error: argument --cfg: nan is invalid; expected a finite number in [0, 100]``, exit 2) before any
run is opened or any work starts, and a value that parses is one the command can use. Each wraps a check
of :mod:`difflab.errors`, the same ones the configs use, so a flag and its config key accept the same
values.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable

from difflab.errors import SEED_LIMIT, DifflabError, check_choice, check_float, check_int

MAX_IMAGES = 100_000
"""Most images (or scenes) one command draws, renders or scores: twice the 50,000 that FID is usually
computed on. More is a typo that would otherwise be found by the allocator, minutes later."""


def _refused(err: DifflabError) -> argparse.ArgumentTypeError:
    # argparse already names the flag ("argument --seed: ..."), so the check's own name is left out
    return argparse.ArgumentTypeError(str(err).strip())


def integer(lo: int | None = None, hi: int | None = None, *, hi_open: bool = False) -> Callable[[str], int]:
    """An integer flag in [lo, hi] (or [lo, hi) with ``hi_open``; either bound may be None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        try:
            return check_int("", value, lo, hi, hi_open=hi_open)
        except DifflabError as err:
            raise _refused(err) from None

    parse.__name__ = "integer"
    return parse


def number(
    lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False
) -> Callable[[str], float]:
    """A finite float flag in the interval from ``lo`` to ``hi`` (closed unless ``lo_open``/``hi_open``):
    ``nan`` and ``inf`` parse as floats, and are refused here."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        try:
            return check_float("", value, lo, hi, lo_open=lo_open, hi_open=hi_open)
        except DifflabError as err:
            raise _refused(err) from None

    parse.__name__ = "number"
    return parse


seed = integer(0, SEED_LIMIT, hi_open=True)
"""A random seed: an integer in [0, 2**63), what torch and numpy take."""


def choice(kind: str, choices: Iterable[str]) -> Callable[[str], str]:
    """A name among ``choices``, with a did-you-mean (``unknown sampler 'ddmi' (did you mean 'ddim'?)``)."""
    names = tuple(choices)

    def parse(text: str) -> str:
        try:
            return check_choice(kind, text, names)
        except DifflabError as err:
            raise _refused(err) from None

    parse.__name__ = kind
    return parse
