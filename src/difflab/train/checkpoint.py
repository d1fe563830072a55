"""Checkpoints: safetensors for every tensor, JSON for everything else, written atomically.

Layout of one checkpoint, a directory named after its optimizer step::

    checkpoints/step_0000100/
        state.safetensors   every tensor, named by its path in the state tree ("model/conv.weight",
                            "ema/model/conv.weight", "optimizer/state/0/exp_avg", "rng/loss_generator", ...)
        meta.json           format + version, step, configs, library versions, the rest of the state tree
                            (tensors replaced by {"__tensor__": name}), and the size + sha256 of
                            state.safetensors

Why this shape:
- Nothing is ever unpickled. ``torch.load`` is not used at all; even RNG states are uint8 tensors in
  the safetensors file. A file that is not safetensors is rejected from its header, before any parsing.
- A checkpoint is atomic as a unit: both files are written into a hidden temporary directory in the
  same parent, each fsynced, the directory is fsynced and renamed into place, and the parent fsynced.
  A crash at any point leaves either the whole new checkpoint or none of it (plus a ``.tmp-*``
  directory that discovery ignores and the next save removes).
- ``latest_checkpoint`` walks back from the newest step, checks the recorded size, the safetensors
  header and the sha256, and skips (with a one-line warning naming it) a checkpoint that fails, e.g.
  one truncated by a full disk or copied half-way. It skips a checkpoint that fails in any way, so one
  bad checkpoint never hides an older good one.

The format and the state tree are in :mod:`difflab.train.checkpoint_format`; reading and what it checks
(every file treated as hostile input, sizes and nesting bounded) in :mod:`difflab.train.checkpoint_read`.
This module writes checkpoints and finds them, and re-exports the names of both.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

from safetensors.torch import save_file

from difflab.errors import DifflabError
from difflab.train.checkpoint_format import (
    _MAX_DEPTH,
    _STEP_DIR,
    _TEMP_PREFIXES,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    TENSORS_FILE,
    _nested_deeper_than,
    _sha256,
    merge_state,
    split_state,
)
from difflab.train.checkpoint_read import (
    check_compatible,
    check_safetensors_header,
    load_model_weights,
    read_checkpoint,
    read_meta,
    verify_checkpoint,
)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "META_FILE",
    "TENSORS_FILE",
    "check_compatible",
    "check_safetensors_header",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "merge_state",
    "prune_checkpoints",
    "read_checkpoint",
    "read_meta",
    "save_checkpoint",
    "split_state",
    "step_dir_name",
    "verify_checkpoint",
]


# ---------------------------------------------------------------------------------- durable file writes


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable. Not possible on Windows, where it is skipped."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def _remove_temporaries(root: Path) -> None:
    """Remove what an interrupted save or prune left behind."""
    for entry in root.iterdir():
        if entry.name.startswith(_TEMP_PREFIXES) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(root: str | os.PathLike, step: int, state: dict, meta: dict | None = None) -> Path:
    """Write ``state`` (a nested dict holding tensors anywhere) as checkpoint ``root/step_XXXXXXX``.

    ``meta`` (JSON-able: configs, versions) is stored next to the state in ``meta.json``. Returns the
    checkpoint directory. Atomic: either the complete checkpoint appears under its final name, or
    nothing does.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_temporaries(root)
    final = root / step_dir_name(step)
    tmp = root / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tree, tensors = split_state(state)
    merge_state(tree, tensors, where="cannot save checkpoint")  # what is written must read back
    tmp.mkdir()
    try:
        tensor_path = tmp / TENSORS_FILE
        save_file(tensors, str(tensor_path), metadata={"format": FORMAT})
        _fsync_file(tensor_path)
        record = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "step": int(step),
            **(meta or {}),
            "tensors": {
                "file": TENSORS_FILE,
                "bytes": tensor_path.stat().st_size,
                "sha256": _sha256(tensor_path),
            },
            "state": tree,
        }
        if _nested_deeper_than(record, _MAX_DEPTH):
            raise DifflabError(
                f"cannot save checkpoint: its {META_FILE} would nest more than {_MAX_DEPTH} levels deep"
            )
        meta_path = tmp / META_FILE
        with open(meta_path, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Saving the same step again: move the old one aside first, since a directory cannot be
            # renamed over a non-empty one.
            trash = root / f".trash-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, trash)
            os.replace(tmp, final)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# ------------------------------------------------------------------------------ discovery and pruning


def list_checkpoints(root: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, directory)`` of every checkpoint-named directory under ``root``, oldest first (unchecked)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The newest checkpoint under ``root`` that passes ``verify_checkpoint``; each one that fails is
    skipped with a one-line warning on stderr naming it. ``None`` if there is no good one."""
    for _, ckpt in reversed(list_checkpoints(root)):
        try:
            verify_checkpoint(ckpt)
        except Exception as err:  # whatever is wrong with this one, an older one may still be good
            reason = str(err) if isinstance(err, DifflabError) else f"{type(err).__name__}: {err}"
            reason = " ".join(reason.splitlines())
            print(f"difflab: warning: skipping bad checkpoint '{ckpt}': {reason}", file=sys.stderr)
            continue
        return ckpt
    return None


def prune_checkpoints(root: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints; returns what was deleted."""
    root = Path(root)
    doomed = [ckpt for _, ckpt in list_checkpoints(root)[:-keep_last]] if keep_last > 0 else []
    for ckpt in doomed:
        # Renamed first, so a crash mid-delete leaves a hidden .trash- directory, not a half checkpoint.
        trash = root / f".trash-{ckpt.name}-{uuid.uuid4().hex[:8]}"
        os.replace(ckpt, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed
