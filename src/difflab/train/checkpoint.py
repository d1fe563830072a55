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

What reading trusts (a checkpoint may come from elsewhere, so its files are treated as hostile input):
- Every failure to read or parse either file is a ``DifflabError`` naming the file and what is wrong,
  never another exception type: unreadable files, bad UTF-8 or JSON, JSON nested too deeply for the
  parser, a ``meta.json`` of the wrong shape.
- Sizes are bounded before parsing: ``meta.json`` at 64 MiB (``_MAX_META_BYTES``), the safetensors
  header at 100 MiB (``_MAX_HEADER_BYTES``, the bound safetensors itself applies), and JSON nesting in
  ``meta.json`` and in the state tree at 64 levels (``_MAX_DEPTH``; a real state is under ten), so no
  walk over them can exhaust the stack. Saving refuses a state that could not be read back.
- ``meta.json`` is checked field by field: ``format``, ``format_version`` (an int this difflab reads),
  ``step`` (an int), ``tensors`` (``file``, ``bytes``, a 64-hex ``sha256``) and ``state`` (an object).
  ``tensors.file`` must be ``state.safetensors`` and must not be a link leading out of the checkpoint
  directory, so a ``meta.json`` cannot point the reader at another file on disk.
- The safetensors header's entries are checked to tile the data exactly, and every
  ``{"__tensor__": name}`` in the state tree must name a tensor in that header: a checkpoint that
  passes ``verify_checkpoint`` merges back into a state without a missing name or a malformed tag.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import shutil
import stat
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
# A meta.json holds configs and the state's non-tensor leaves: kilobytes, megabytes for a huge optimizer.
_MAX_META_BYTES = 64 * 2**20
# JSON nesting allowed in meta.json and a state tree: far above any real state, far below the stack.
_MAX_DEPTH = 64
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


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


def merge_state(tree, tensors: dict[str, torch.Tensor], *, where: str = "checkpoint"):
    """Inverse of ``split_state``. A malformed tree (a tag holding the wrong type, a tensor name missing
    from ``tensors``, nesting over ``_MAX_DEPTH``) is a ``DifflabError`` that starts with ``where``."""

    def tensor(name):
        if not isinstance(name, str) or name not in tensors:
            raise DifflabError(f"{where}: the state names tensor {reprlib.repr(name)}, which is missing")
        return tensors[name]

    return _decode_state(tree, tensor, where)


def _decode_state(tree, tensor, where: str):
    """Walk a JSON state tree, undoing ``split_state``'s tags; ``tensor(name)`` stands in for each
    ``{"__tensor__": name}``. Shared by ``merge_state`` and ``verify_checkpoint``, so that what verifies
    is exactly what merges. Depth counts JSON containers, as the parser does, and is bounded so that a
    hostile tree cannot exhaust the stack."""

    def malformed(tag: str, value, expected: str) -> DifflabError:
        return DifflabError(
            f'{where}: a {{"{tag}": ...}} in the state holds {reprlib.repr(value)}, expected {expected}'
        )

    def walk(node, depth: int):
        if not isinstance(node, dict | list):
            return node
        if depth > _MAX_DEPTH:
            raise DifflabError(f"{where}: the state is nested more than {_MAX_DEPTH} levels deep")
        if isinstance(node, list):
            return [walk(v, depth + 1) for v in node]
        if set(node) == {"__tensor__"}:
            return tensor(node["__tensor__"])
        if set(node) == {"__tuple__"}:
            items = node["__tuple__"]
            if not isinstance(items, list):
                raise malformed("__tuple__", items, "a list")
            return tuple(walk(v, depth + 2) for v in items)
        if set(node) == {"__items__"}:
            pairs = node["__items__"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise malformed("__items__", pairs, "a list of [key, value] pairs")
            out = {}
            for k, v in pairs:
                key = walk(k, depth + 3)
                try:
                    hash(key)
                except TypeError:
                    raise malformed("__items__", k, "keys that are numbers, strings or tuples") from None
                out[key] = walk(v, depth + 3)
            return out
        return {k: walk(v, depth + 1) for k, v in node.items()}

    state = walk(tree, 1)
    if not isinstance(state, dict):
        raise DifflabError(f"{where}: the state is {reprlib.repr(state)}, expected a dict")
    return state


def _nested_deeper_than(obj, limit: int) -> bool:
    """Whether JSON ``obj`` nests containers more than ``limit`` deep; iterative, so any depth is safe."""
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            stack.extend((v, depth + 1) for v in (node.values() if isinstance(node, dict) else node))
    return False


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


# ------------------------------------------------------------------------------------- reading, checks


def _unreadable(path: Path, err: OSError) -> DifflabError:
    return DifflabError(f"cannot read '{path}': {err.strerror or err}")


def check_safetensors_header(path: str | os.PathLike) -> dict:
    """Parse and check the header of a safetensors file without loading (or unpickling) anything.

    A safetensors file is an 8-byte little-endian header length N, N bytes of JSON, then the tensor
    bytes, whose extent the header states exactly; so a pickle, a zip (``torch.save``) or a truncated
    file fails here. The header's entries must tile the data with neither gap nor overlap, as the
    format requires. Returns the header.
    """
    path = Path(path)
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            raise DifflabError(f"'{path}' is not a regular file")
        size = st.st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            raw = f.read(n) if 0 < n <= min(size - 8, _MAX_HEADER_BYTES) else b""
    except OSError as err:
        raise _unreadable(path, err) from None
    header = None
    if raw[:1] == b"{":
        try:
            header = json.loads(raw.decode("utf-8"))
        except RecursionError:
            raise DifflabError(f"'{path}' has a safetensors header nested too deeply to parse") from None
        except (ValueError, MemoryError):  # not JSON, not UTF-8: not safetensors, as said below
            pass
    if not isinstance(header, dict):
        raise DifflabError(
            f"'{path}' is not a safetensors file (a pickle or torch.save file?); refusing to load it"
        )
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = entry["data_offsets"]
            shape = entry["shape"]
            ok = type(start) is int and type(end) is int and 0 <= start <= end
            ok = ok and isinstance(entry["dtype"], str) and isinstance(shape, list)
            ok = ok and all(type(d) is int and d >= 0 for d in shape)
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise DifflabError(f"'{path}' has a malformed safetensors header entry {reprlib.repr(name)}")
        spans.append((start, end))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise DifflabError(
                f"'{path}' has a malformed safetensors header: the tensors' bytes have a gap or an "
                f"overlap at offset {end}"
            )
        end = stop
    if 8 + n + end != size:
        raise DifflabError(
            f"'{path}' is truncated or padded: its header describes {8 + n + end} bytes, the file has {size}"
        )
    return header


def _checkpoint_dir(path: Path) -> Path:
    try:
        if path.is_dir():
            return path
        is_file = path.is_file()
    except OSError as err:
        raise _unreadable(path, err) from None
    if is_file:
        if path.name in (TENSORS_FILE, META_FILE):
            return path.parent
        check_safetensors_header(path)  # names the file if it is a pickle or anything else
        raise DifflabError(
            f"'{path}' is a bare safetensors file, not a difflab checkpoint directory (with {META_FILE})"
        )
    raise DifflabError(f"checkpoint '{path}' does not exist")


def _check_meta(meta, meta_path: Path) -> None:
    """Raise ``DifflabError`` naming ``meta_path`` and the field unless ``meta`` has the shape that
    ``save_checkpoint`` writes: the rest of this module indexes it without further checks."""

    def field(record: dict, label: str, ok, expected: str):
        key = label.rpartition(".")[2]
        if key not in record:
            raise DifflabError(f"'{meta_path}' has no {label}; expected {expected}")
        if not ok(record[key]):
            raise DifflabError(f"'{meta_path}': {label} is {reprlib.repr(record[key])}, expected {expected}")
        return record[key]

    def whole(v) -> bool:
        return type(v) is int and v >= 0  # not a bool, a float or a string of digits

    if not isinstance(meta, dict):
        raise DifflabError(f"'{meta_path}' holds a JSON {type(meta).__name__}, not a checkpoint description")
    if meta.get("format") != FORMAT:
        raise DifflabError(
            f"'{meta_path}' is not a difflab checkpoint description "
            f"(format {reprlib.repr(meta.get('format'))}, expected '{FORMAT}')"
        )
    version = field(
        meta, "format_version", lambda v: whole(v) and v >= 1, f"an int from 1 to {FORMAT_VERSION}"
    )
    if version > FORMAT_VERSION:
        raise DifflabError(
            f"checkpoint '{meta_path.parent}' has format version {version}, newer than this difflab "
            f"reads ({FORMAT_VERSION}); upgrade difflab"
        )
    field(meta, "step", whole, "an int >= 0")
    tensors = field(meta, "tensors", lambda v: isinstance(v, dict), "an object with file, bytes and sha256")
    # One name only: a meta.json must not send the reader to another file ("../../x", "/etc/x").
    field(tensors, "tensors.file", lambda v: v == TENSORS_FILE, f"'{TENSORS_FILE}', the file beside it")
    field(tensors, "tensors.bytes", whole, "an int >= 0")
    is_hex = lambda v: isinstance(v, str) and _SHA256_HEX.fullmatch(v)  # noqa: E731
    field(tensors, "tensors.sha256", is_hex, "64 lowercase hex digits")
    field(meta, "state", lambda v: isinstance(v, dict), "an object (the state tree)")


def read_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of checkpoint directory ``path``, checked to be a difflab checkpoint of the shape
    ``save_checkpoint`` writes (see the module docstring); raises ``DifflabError`` naming what is wrong."""
    ckpt = _checkpoint_dir(Path(path))
    meta_path = ckpt / META_FILE
    try:
        if not meta_path.exists():
            raise DifflabError(f"checkpoint '{ckpt}' has no {META_FILE} (an interrupted write?)")
        if not meta_path.is_file():  # a FIFO would block the read forever
            raise DifflabError(f"'{meta_path}' is not a regular file")
        with open(meta_path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > _MAX_META_BYTES:
                raise DifflabError(
                    f"'{meta_path}' has {size} bytes, over the {_MAX_META_BYTES} a checkpoint description "
                    f"may have; refusing to parse it"
                )
            raw = f.read(_MAX_META_BYTES + 1)  # bounded even if the file grows meanwhile
    except OSError as err:
        raise _unreadable(meta_path, err) from None
    if len(raw) > _MAX_META_BYTES:
        raise DifflabError(f"'{meta_path}' grew past {_MAX_META_BYTES} bytes while being read")
    try:
        meta = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise DifflabError(f"'{meta_path}' is nested too deeply to parse") from None
    except MemoryError:
        raise DifflabError(f"'{meta_path}' is too large to parse") from None
    except ValueError as err:  # bad UTF-8 or JSON, or an integer too long to convert
        raise DifflabError(f"'{meta_path}' is not valid JSON ({err})") from None
    if _nested_deeper_than(meta, _MAX_DEPTH):
        raise DifflabError(f"'{meta_path}' is nested more than {_MAX_DEPTH} levels deep")
    _check_meta(meta, meta_path)
    return meta


def _tensor_path(ckpt: Path, meta: dict) -> Path:
    """The checkpoint's tensor file, refused if it is missing or a link leading out of ``ckpt``."""
    tensor_path = ckpt / meta["tensors"]["file"]
    try:
        inside = tensor_path.resolve().parent == ckpt.resolve()
        is_file = tensor_path.is_file()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop, before Python 3.13
        inside, is_file = False, False
    if not inside:
        raise DifflabError(f"'{tensor_path}' leads outside checkpoint '{ckpt}'; refusing to read it")
    if not is_file:
        raise DifflabError(f"checkpoint '{ckpt}' is missing {tensor_path.name}")
    return tensor_path


def verify_checkpoint(path: str | os.PathLike) -> dict:
    """Check a checkpoint without loading its tensors: meta, recorded size, safetensors header, sha256,
    and that every tensor the state names is in the header. Returns the meta; raises ``DifflabError``
    naming what is wrong."""
    ckpt = _checkpoint_dir(Path(path))
    meta = read_meta(ckpt)
    tensor_path = _tensor_path(ckpt, meta)
    try:
        size = tensor_path.stat().st_size
    except OSError as err:
        raise _unreadable(tensor_path, err) from None
    if size != meta["tensors"]["bytes"]:
        raise DifflabError(
            f"'{tensor_path}' has {size} bytes but {META_FILE} recorded "
            f"{meta['tensors']['bytes']} (truncated?)"
        )
    header = check_safetensors_header(tensor_path)
    try:
        digest = _sha256(tensor_path)
    except OSError as err:
        raise _unreadable(tensor_path, err) from None
    if digest != meta["tensors"]["sha256"]:
        raise DifflabError(f"'{tensor_path}' does not match the sha256 in {META_FILE} (corrupted?)")

    def tensor(name):
        if not isinstance(name, str) or name == "__metadata__" or name not in header:
            raise DifflabError(
                f"'{ckpt / META_FILE}' names tensor {reprlib.repr(name)}, which '{tensor_path}' does not hold"
            )
        return name

    _decode_state(meta["state"], tensor, f"'{ckpt / META_FILE}'")
    return meta


def read_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> tuple[dict, dict]:
    """Load a checkpoint directory: returns ``(state, meta)`` with every tensor on the CPU."""
    ckpt = _checkpoint_dir(Path(path))
    meta = verify_checkpoint(ckpt) if verify else read_meta(ckpt)
    tensor_path = _tensor_path(ckpt, meta)
    check_safetensors_header(tensor_path)
    try:
        tensors = load_file(str(tensor_path), device="cpu")
    except Exception as err:  # safetensors raises its own error types; report them as the user's file
        raise DifflabError(f"cannot read '{tensor_path}': {err}") from None
    return merge_state(meta["state"], tensors, where=f"'{ckpt / META_FILE}'"), meta


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
