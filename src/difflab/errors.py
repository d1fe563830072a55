"""User-facing errors: one line that names the bad value and what was expected.

The CLI prints a ``DifflabError`` as a single line (no traceback unless ``--debug``); everything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DifflabError(ValueError):
    """A problem with the user's input, reported as one clear line."""


def check_choice(kind: str, value: str, choices: Iterable[str]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise with the valid ones listed.

    >>> check_choice("sampler", "ddmi", ["ddpm", "ddim"])
    Traceback (most recent call last):
    ...
    difflab.errors.DifflabError: unknown sampler 'ddmi' (did you mean 'ddim'?); choose one of: ddpm, ddim
    """
    choices = list(choices)
    if value in choices:
        return value
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise DifflabError(f"unknown {kind} '{value}'{hint}; choose one of: {', '.join(map(str, choices))}")
