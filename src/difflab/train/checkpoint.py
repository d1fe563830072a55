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
  one truncated by a full disk or copied half-way.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import sys
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from difflab.errors import DifflabError

FORMAT = "difflab-checkpoint"
FORMAT_VERSION = 1
TENSORS_FILE = "state.safetensors"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TEMP_PREFIXES = (".tmp-", ".trash-")
_MARKERS = ("__tensor__", "__tuple__", "__items__")
# A safetensors header is JSON describing the tensors; anything claiming more than this is not one.
_MAX_HEADER_BYTES = 100 * 2**20


# ----------------------------------------------------------------------------------------- state trees


def split_state(tree) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, numbers, strings, tensors) into a JSON-able tree and
    a flat ``{name: tensor}`` dict for safetensors. Each tensor's name is its path in the tree.

    Tuples and dicts with non-string keys (the optimizer's ``{param_index: state}``) are tagged so that
    ``merge_state`` gives back exactly the same types.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(obj, path: str):
        if isinstance(obj, torch.Tensor):
            name, n = path, 1
            while name in tensors:
                name, n = f"{path}#{n}", n + 1
            # A private CPU copy: safetensors refuses tensors that share storage (tied weights), and a
            # snapshot cannot change while it is being written.
            tensors[name] = obj.detach().to("cpu", copy=True).contiguous()
            return {"__tensor__": name}
        if isinstance(obj, dict):
            child = (lambda k: f"{path}/{k}") if path else str
            if all(isinstance(k, str) for k in obj) and not any(k in _MARKERS for k in obj):
                return {k: encode(v, child(k)) for k, v in obj.items()}
            return {"__items__": [[encode(k, child(k)), encode(v, child(k))] for k, v in obj.items()]}
        if isinstance(obj, tuple):
            return {"__tuple__": [encode(v, f"{path}/{i}") for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return [encode(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, np.generic):
            return obj.item()
        if obj is None or isinstance(obj, bool | int | float | str):
            return obj
        raise TypeError(f"cannot store a {type(obj).__name__} at '{path}' in a checkpoint")

    return encode(tree, ""), tensors


def merge_state(tree, tensors: dict[str, torch.Tensor]):
    """Inverse of ``split_state``."""
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            name = tree["__tensor__"]
            if name not in tensors:
                raise DifflabError(f"checkpoint is missing tensor '{name}' named in its {META_FILE}")
            return tensors[name]
        if set(tree) == {"__tuple__"}:
            return tuple(merge_state(v, tensors) for v in tree["__tuple__"])
        if set(tree) == {"__items__"}:
            return {merge_state(k, tensors): merge_state(v, tensors) for k, v in tree["__items__"]}
        return {k: merge_state(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [merge_state(v, tensors) for v in tree]
    return tree


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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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


# ------------------------------------------------------------------------------------- reading, checks


def check_safetensors_header(path: str | os.PathLike) -> dict:
    """Parse and check the header of a safetensors file without loading (or unpickling) anything.

    A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor
    bytes, whose extent the header states exactly; so a pickle, a zip (``torch.save``) or a truncated
    file fails here. Returns the header.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        raw = f.read(n) if 0 < n <= min(size - 8, _MAX_HEADER_BYTES) else b""
    try:
        header = json.loads(raw.decode("utf-8")) if raw[:1] == b"{" else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise DifflabError(
            f"'{path}' is not a safetensors file (a pickle or torch.save file?); refusing to load it"
        )
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise DifflabError(f"'{path}' has a malformed safetensors header") from None
    if 8 + n + end != size:
        raise DifflabError(
            f"'{path}' is truncated or padded: its header describes {8 + n + end} bytes, the file has {size}"
        )
    return header


def _checkpoint_dir(path: Path) -> Path:
    if path.is_dir():
        return path
    if path.is_file():
        if path.name in (TENSORS_FILE, META_FILE):
            return path.parent
        check_safetensors_header(path)  # names the file if it is a pickle or anything else
        raise DifflabError(
            f"'{path}' is a bare safetensors file, not a difflab checkpoint directory (with {META_FILE})"
        )
    raise DifflabError(f"checkpoint '{path}' does not exist")


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of checkpoint directory ``path``, checked to be a difflab checkpoint."""
    ckpt = _checkpoint_dir(Path(path))
    meta_path = ckpt / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise DifflabError(f"checkpoint '{ckpt}' has no {META_FILE} (an interrupted write?)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DifflabError(f"checkpoint '{ckpt}' has an unreadable {META_FILE}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise DifflabError(f"'{meta_path}' is not a difflab checkpoint description")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise DifflabError(
            f"checkpoint '{ckpt}' has format version {meta['format_version']}, newer than this difflab "
            f"reads ({FORMAT_VERSION}); upgrade difflab"
        )
    return meta


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint without loading its tensors: meta, recorded size, safetensors header, sha256.
    Returns the meta; raises ``DifflabError`` naming what is wrong."""
    ckpt = _checkpoint_dir(Path(path))
    meta = read_meta(ckpt)
    tensor_path = ckpt / meta["tensors"]["file"]
    if not tensor_path.is_file():
        raise DifflabError(f"checkpoint '{ckpt}' is missing {tensor_path.name}")
    size = tensor_path.stat().st_size
    if size != meta["tensors"]["bytes"]:
        raise DifflabError(
            f"'{tensor_path}' has {size} bytes but {META_FILE} recorded "
            f"{meta['tensors']['bytes']} (truncated?)"
        )
    check_safetensors_header(tensor_path)
    if _sha256(tensor_path) != meta["tensors"]["sha256"]:
        raise DifflabError(f"'{tensor_path}' does not match the sha256 in {META_FILE} (corrupted?)")
    return meta


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict, dict]:
    """Load a checkpoint directory: returns ``(state, meta)`` with every tensor on the CPU."""
    ckpt = _checkpoint_dir(Path(path))
    meta = verify_checkpoint(ckpt) if verify else read_meta(ckpt)
    tensor_path = ckpt / meta["tensors"]["file"]
    check_safetensors_header(tensor_path)
    try:
        tensors = load_file(str(tensor_path), device="cpu")
    except Exception as err:  # safetensors raises its own error types; report them as the user's file
        raise DifflabError(f"cannot read '{tensor_path}': {err}") from None
    return merge_state(meta["state"], tensors), meta


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
        except DifflabError as err:
            print(f"difflab: warning: skipping bad checkpoint '{ckpt}': {err}", file=sys.stderr)
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


# ----------------------------------------------------------------------------------------- weights only


def check_compatible(model: torch.nn.Module, state_dict: dict, what: str) -> None:
    """Raise ``DifflabError`` naming the first key whose presence or shape differs between ``model`` and
    ``state_dict`` (a checkpoint of another architecture)."""
    own = model.state_dict()
    for key in own:
        if key not in state_dict:
            raise DifflabError(f"{what} has no weight '{key}' that the model needs (another architecture?)")
        if tuple(state_dict[key].shape) != tuple(own[key].shape):
            raise DifflabError(
                f"{what}: weight '{key}' has shape {tuple(state_dict[key].shape)}, the model expects "
                f"{tuple(own[key].shape)} (another model config?)"
            )
    for key in state_dict:
        if key not in own:
            raise DifflabError(f"{what} has weight '{key}' that the model does not (another architecture?)")


def load_model_weights(path: str | os.PathLike, model: torch.nn.Module, *, ema: bool = True) -> dict:
    """Load a checkpoint's weights into ``model`` (its EMA weights when present and ``ema``, which is
    what to sample with). Returns the checkpoint's meta."""
    state, meta = read_checkpoint(path)
    use_ema = ema and state.get("ema") is not None
    weights = state["ema"]["model"] if use_ema else state["model"]
    check_compatible(model, weights, f"checkpoint '{path}'")
    model.load_state_dict(weights)
    return meta
