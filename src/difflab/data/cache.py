"""A disk cache of per-item arrays: compute a dataset once, then read it back at memory speed.

A cache file is one safetensors file holding one stacked array per field, named by a hash of a JSON
*key* that says everything the arrays depend on (for the toy world: world config, seed, item count,
fields, renderer version). The key is also stored inside the file and compared on load, so a file is
never used for anything but exactly what it was made from; an unreadable or mismatched file is rebuilt
with a warning rather than trusted.

Writes are atomic (temporary file in the same folder, fsync, ``os.replace``): a crash, a full disk, or
several processes building the same cache at once (DDP ranks) can leave a stray ``.tmp`` file but never
a torn cache. Everything is read into memory on load; DataLoader workers started by fork share it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save as save_arrays
from tqdm import tqdm

from difflab.errors import DifflabError

CACHE_FORMAT = 1
"""Bump when the layout of cache files changes; it is part of every key."""


def cache_file(cache_dir: str | Path, name: str, key: dict) -> tuple[Path, str]:
    """Path of the cache file for ``key`` and the key's canonical JSON."""
    key_json = json.dumps({"cache_format": CACHE_FORMAT, **key}, sort_keys=True)
    digest = hashlib.sha256(key_json.encode()).hexdigest()[:16]
    return Path(cache_dir) / f"{name}-{digest}.safetensors", key_json


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable; not possible on every platform (Windows)
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read(path: Path, key_json: str) -> dict[str, np.ndarray] | None:
    """The arrays in ``path`` if it is a readable cache made for ``key_json``; None if it is absent."""
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            if (f.metadata() or {}).get("key") != key_json:
                warnings.warn(f"cache file {path} was made for a different key; rebuilding it", stacklevel=3)
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # a torn or foreign file: rebuild rather than train on it
        warnings.warn(f"cache file {path} is unreadable ({e}); rebuilding it", stacklevel=3)
        return None


def cached_arrays(
    cache_dir: str | Path,
    name: str,
    key: dict,
    n: int,
    make_item: Callable[[int], dict[str, np.ndarray]] | None = None,
    desc: str = "building cache",
    *,
    make_batch: Callable[[int, int], dict[str, np.ndarray]] | None = None,
    batch_size: int = 256,
) -> dict[str, np.ndarray]:
    """``{field: (n, ...) array}`` stacked from ``make_item(0 .. n-1)``, read from the cache file for
    ``key`` under ``cache_dir`` or computed once and written there. ``name`` is a readable file-name
    prefix; ``key`` must be JSON-serialisable and determine the items completely.

    ``make_batch(start, stop)`` instead of ``make_item`` returns the stacked arrays of items start..stop-1
    at once (``batch_size`` at a time): for a network that encodes a whole batch per call."""
    if (make_item is None) == (make_batch is None):
        raise ValueError("cached_arrays needs exactly one of make_item and make_batch")
    path, key_json = cache_file(cache_dir, name, key)
    arrays = _read(path, key_json)
    if arrays is not None:
        return arrays
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DifflabError(f"cannot create cache folder '{path.parent}': {e.strerror}") from None
    if make_batch is not None:
        starts = range(0, n, batch_size)
        parts = [
            make_batch(s, min(s + batch_size, n)) for s in tqdm(starts, desc=desc, leave=False, disable=None)
        ]
        arrays = {f: np.concatenate([p[f] for p in parts]) for f in parts[0]}
    else:
        items = [make_item(i) for i in tqdm(range(n), desc=desc, leave=False, disable=None)]
        arrays = {f: np.stack([it[f] for it in items]) for f in items[0]}
    try:
        write_atomic(path, save_arrays(arrays, metadata={"key": key_json}))
    except OSError as e:
        raise DifflabError(f"cannot write cache file '{path}': {e.strerror}") from None
    return arrays
