"""The checkpoint format: names, bounds, and the state tree that ``meta.json`` stores beside the tensors.

A trainer's state is a nested tree (dicts, lists, tuples, numbers, strings, tensors). :func:`split_state`
cuts it into a JSON-able tree, with each tensor replaced by ``{"__tensor__": name}``, and a flat
``{name: tensor}`` dict for safetensors; :func:`merge_state` puts it back together, exactly (tuples stay
tuples, integer dict keys stay integers). Writing is in :mod:`difflab.train.checkpoint`, reading and its
checks in :mod:`difflab.train.checkpoint_read`.
"""

from __future__ import annotations

import hashlib
import re
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
