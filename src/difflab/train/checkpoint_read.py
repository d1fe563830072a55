"""Reading a checkpoint, and the checks that come first.

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

import json
import os
import reprlib
import stat
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

from difflab.errors import DifflabError
from difflab.train.checkpoint_format import (
    _MAX_DEPTH,
    _MAX_HEADER_BYTES,
    _MAX_META_BYTES,
    _SHA256_HEX,
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    TENSORS_FILE,
    _decode_state,
    _nested_deeper_than,
    _sha256,
    merge_state,
)

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
