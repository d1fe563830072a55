"""User-facing errors: one line that names the bad value and what was expected.

The CLI prints a ``DifflabError`` as a single line (no traceback unless ``--debug``); everything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
import math
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


# Upper bounds shared by the configs' range checks. They are not what a machine can hold (memory is
# checked by the allocator, not here); they keep a typo such as 2**70 from reaching torch as an overflow.
MAX_SIZE = 2**16
"""Widths, depths, heads, channels, image sides, batch sizes: far beyond any network or batch a run here
could hold, and small enough that a product of three (a weight's width x width x kernel, a batch's
B x C x H) stays far below 2**63, so torch reports memory, never an overflow."""
MAX_COUNT = 10**9
"""Optimizer steps, logging cadences, dataset lengths: a billion is years of training on any machine."""
MAX_TIMESTEPS = 100_000
"""Diffusion steps T: DDPM uses 1000; a schedule of 10^5 float64 values is under a megabyte, while
10^9 of them would need gigabytes before a single step ran."""
SEED_LIMIT = 2**63
"""Seeds are in [0, 2**63): torch and numpy take them as 64-bit integers (with small offsets added)."""


def _bound(x) -> str:
    """A bound as a person writes it: 2**63 rather than 9223372036854775808."""
    if isinstance(x, int) and x >= 2**20 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    if isinstance(x, int) and x >= 10**6 and str(x).rstrip("0") == "1":
        return f"10**{len(str(x)) - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{_bound(lo)}, {_bound(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {_bound(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {_bound(hi)}"
    return ""


def check_int(
    name: str, value, lo: int | None = None, hi: int | None = None, *, hi_open: bool = False
) -> int:
    """Return ``value`` if it is an integer (not a bool) in [lo, hi] (or [lo, hi) with ``hi_open``);
    otherwise raise naming it and the range. Configs call it in ``__post_init__`` so that a value that
    parses but cannot run (0 channels, 2**70 as a seed) is refused where it is read, not deep in torch.

    >>> check_int("channels", 0, 1)
    Traceback (most recent call last):
    ...
    difflab.errors.DifflabError: channels 0 is invalid; expected an integer >= 1
    """
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and lo is not None:
        ok = value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        where = _interval(lo, hi, False, hi_open)
        raise DifflabError(f"{name} {value!r} is invalid; expected an integer{' ' + where if where else ''}")
    return value


def check_float(
    name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
    hi_open: bool = False,
) -> float:  # fmt: skip
    """Return ``value`` if it is a finite number (an int will do; a bool will not) in the interval from
    ``lo`` to ``hi`` (closed unless ``lo_open``/``hi_open``); otherwise raise naming it and the interval.
    Every float of a config is finite: nan and inf pass a type check but never train.

    >>> check_float("dropout", 1.5, 0, 1, hi_open=True)
    Traceback (most recent call last):
    ...
    difflab.errors.DifflabError: dropout 1.5 is invalid; expected a finite number in [0, 1)
    """
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        where = _interval(lo, hi, lo_open, hi_open)
        raise DifflabError(
            f"{name} {value!r} is invalid; expected a finite number{' ' + where if where else ''}"
        )
    return value


def check_seed(name: str, value) -> int:
    """A random seed: an integer in [0, 2**63)."""
    return check_int(name, value, 0, SEED_LIMIT, hi_open=True)


def check_optional_int(name: str, value, lo: int | None = None, hi: int | None = None) -> int | None:
    """``None``, or an integer in [lo, hi] (an optional width or cadence: None means 'off')."""
    if value is None:
        return None
    try:
        return check_int(name, value, lo, hi)
    except DifflabError as err:
        raise DifflabError(f"{err} or None") from None


def check_optional_float(
    name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
    hi_open: bool = False,
) -> float | None:  # fmt: skip
    """``None``, or a finite number in the interval (see :func:`check_float`)."""
    if value is None:
        return None
    try:
        return check_float(name, value, lo, hi, lo_open=lo_open, hi_open=hi_open)
    except DifflabError as err:
        raise DifflabError(f"{err} or None") from None


def check_ints(name: str, values, lo: int | None = None, hi: int | None = None, *, nonempty: bool = False):
    """A tuple of integers, each in [lo, hi]; ``nonempty``: at least one (a UNet needs a level)."""
    where = _interval(lo, hi, False, False)
    expected = f"{'one or more' if nonempty else 'zero or more'} integers{' ' + where if where else ''}"
    ok = isinstance(values, tuple) and (values or not nonempty)
    for v in values if ok else ():
        try:
            check_int(name, v, lo, hi)
        except DifflabError:
            ok = False
    if not ok:
        raise DifflabError(f"{name} {values!r} is invalid; expected {expected}")
    return values
