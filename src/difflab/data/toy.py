"""The toy world as a PyTorch dataset: item ``i`` is scene ``scene_at(cfg, seed, i)``, drawn and described.

Random access and no state: any item can be regenerated alone, identically, in any process, so
DataLoader workers, DDP ranks and a resumed run all see the same data without coordination. Language
fields draw from their own random stream per item (``default_rng([seed, i, stream])``), so captions are
as deterministic as pixels, and asking for one more field never changes the values of the others.

Fields (ask for any subset with ``fields=``):

- ``image``: float32 ``(3, H, W)`` in [-1, 1] on the 8-bit grid (see :mod:`difflab.data.images`);
- ``label``: int, the (shape, colour) class ``cfg.class_index(shape, colour)``; only one-object worlds
  have one, so it is refused at construction for worlds that allow more;
- ``caption``: str, a random true caption (``caption_style`` fixes the template);
- ``questions``: list of ``num_questions`` ``(question, answer, kind)`` string triples;
- ``edit``: str, an instruction, plus ``edited_image`` (like ``image``) and ``edited_scene`` (dict): the
  InstructPix2Pix pair (``edit_kind`` fixes the kind of edit);
- ``depth``: float32 ``(1, H, W)``, distance from the camera in the renderer's units (background 1.0,
  nearer is smaller), not rescaled: a depth model chooses its own normalisation;
- ``edges``: float32 ``(1, H, W)`` in [0, 1], object outlines (ControlNet's conditioning convention);
- ``mask``: int64 ``(H, W)``, 0 for background and ``k + 1`` for ``scene['objects'][k]``;
- ``scene``: the scene as a dict (``Scene.to_dict()``).

``cache_dir``: render every item once into a uint8/float32 safetensors file there (see
:mod:`difflab.data.cache`) and read items back from memory afterwards; ``benchmarks/world_throughput.py``
measures what that buys. Cached items are bit-identical to rendered ones. The cache key holds the world
config, seed, size, fields and ``RENDERER_VERSION``, and also a fingerprint of a few sampled scenes and
one render, so that a change to scene sampling or drawing that no version number records still makes a
new cache instead of serving stale items.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import operator

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from difflab.data.cache import cached_arrays
from difflab.data.images import quantize, to_signed
from difflab.errors import DifflabError, check_choice
from difflab.world.edits import EDIT_KINDS, edit
from difflab.world.language import CAPTION_STYLES, caption, questions
from difflab.world.render import RENDERER_VERSION, render
from difflab.world.scene import Scene, WorldConfig, scene_at, world_preset

FIELDS = ("image", "label", "caption", "questions", "edit", "depth", "edges", "mask", "scene")
RENDERED = ("image", "depth", "edges", "mask")
"""Fields that come from pixels; with ``label`` these are what a disk cache holds."""
CACHEABLE = (*RENDERED, "label")

# Per-item random streams of the language fields, apart from the scene's own [seed, index] stream.
_CAPTION_STREAM, _QUESTIONS_STREAM, _EDIT_STREAM = 1, 2, 3


def scene_image(scene: Scene, cfg: WorldConfig) -> torch.Tensor:
    """A scene drawn as the ``image`` field draws it: float32 ``(3, H, W)`` in [-1, 1] on the 8-bit grid.
    For code that already holds the scene (captions, evaluation sets), so it need not be drawn again."""
    return to_signed(quantize(render(scene, cfg).image))


class ToyWorldDataset(Dataset):
    """``n`` toy-world items of world ``cfg`` (a :class:`WorldConfig` or a preset name) with ``seed``.

    ``dataset[i]`` is a dict holding the requested ``fields`` (see the module docstring).
    """

    _cached: dict[str, np.ndarray] | None = None

    def __init__(
        self,
        cfg: WorldConfig | str,
        n: int,
        seed: int = 0,
        fields: tuple[str, ...] | list[str] = ("image", "label"),
        *,
        caption_style: str | None = None,
        num_questions: int = 4,
        edit_kind: str | None = None,
        cache_dir: str | None = None,
    ):
        self.cfg = world_preset(cfg) if isinstance(cfg, str) else cfg
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise DifflabError(f"dataset size n={n!r} is invalid; expected an integer >= 1")
        self.n, self.seed = int(n), int(seed)
        if isinstance(fields, str):
            fields = (fields,)
        if not fields:
            raise DifflabError(f"no fields requested; choose some of: {', '.join(FIELDS)}")
        self.fields = tuple(dict.fromkeys(check_choice("field", f, FIELDS) for f in fields))
        if "label" in self.fields and self.cfg.max_objects != 1:
            raise DifflabError(
                f"field 'label' needs one-object scenes, but this world has {self.cfg.min_objects}.."
                f"{self.cfg.max_objects} objects; use a one-object world (preset 'single32') or drop 'label'"
            )
        if caption_style is not None:
            check_choice("caption style", caption_style, CAPTION_STYLES)
        if edit_kind is not None:
            check_choice("edit kind", edit_kind, EDIT_KINDS)
        if isinstance(num_questions, bool) or not isinstance(num_questions, int) or num_questions < 1:
            raise DifflabError(f"num_questions={num_questions!r} is invalid; expected an integer >= 1")
        self.caption_style, self.num_questions, self.edit_kind = caption_style, num_questions, edit_kind

        cache_fields = [f for f in CACHEABLE if f in self.fields]
        if cache_dir is not None and cache_fields:
            key = {
                "world": dataclasses.asdict(self.cfg),
                "seed": self.seed,
                "n": self.n,
                "fields": cache_fields,
                "renderer_version": RENDERER_VERSION,
                "fingerprint": self._fingerprint(),
            }
            name = f"toy-{self.cfg.resolution}px-n{self.n}-seed{self.seed}"
            self._cached = cached_arrays(
                cache_dir,
                name,
                key,
                self.n,
                lambda i: self._arrays(self.scene(i)),
                desc="rendering toy world",
            )

    @property
    def num_classes(self) -> int:
        """Number of label classes (shape x colour) of this world."""
        return self.cfg.num_classes

    def __len__(self) -> int:
        return self.n

    def scene(self, index: int) -> Scene:
        """The scene of item ``index``."""
        return scene_at(self.cfg, self.seed, index)

    def _fingerprint(self) -> str:
        """Hash of scenes 0, n/2 and n-1 and of item 0's arrays: changes whenever sampling or drawing does."""
        h = hashlib.sha256()
        for i in sorted({0, self.n // 2, self.n - 1}):
            h.update(json.dumps(self.scene(i).to_dict(), sort_keys=True).encode())
        for name, a in sorted(self._arrays(self.scene(0)).items()):
            h.update(name.encode() + np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]

    def _arrays(self, scene: Scene) -> dict[str, np.ndarray]:
        """The cacheable fields of one item as compact arrays: what the cache stores."""
        out: dict[str, np.ndarray] = {}
        if any(f in self.fields for f in RENDERED):
            r = render(scene, self.cfg)
            parts = {
                "image": quantize(r.image),
                "depth": r.depth,
                "edges": r.edges,
                "mask": r.mask.astype(np.uint8),  # instance ids are at most 9 (one object per grid cell)
            }
            out.update({f: parts[f] for f in RENDERED if f in self.fields})
        if "label" in self.fields:
            (obj,) = scene.objects
            out["label"] = np.asarray(self.cfg.class_index(obj.shape, obj.color), dtype=np.int64)
        return out

    def __getitem__(self, index: int) -> dict:
        i = operator.index(index)
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} is out of range for a toy-world dataset of {self.n} items")
        i %= self.n
        scene = None
        if self._cached is not None:
            arrays = {f: a[i] for f, a in self._cached.items()}
        else:
            scene = self.scene(i)
            arrays = self._arrays(scene)
        item: dict = {}
        if "image" in arrays:
            item["image"] = to_signed(arrays["image"])
        if "label" in arrays:
            item["label"] = int(arrays["label"])
        for f in ("depth", "edges"):
            if f in arrays:
                item[f] = torch.from_numpy(np.array(arrays[f], dtype=np.float32))[None]
        if "mask" in arrays:
            item["mask"] = torch.from_numpy(arrays["mask"].astype(np.int64))
        if any(f in self.fields for f in ("caption", "questions", "edit", "scene")):
            item.update(self._language(i, scene if scene is not None else self.scene(i)))
        return {f: item[f] for f in self._keys()}

    def _keys(self) -> list[str]:
        keys = []
        for f in self.fields:
            keys += ["edit", "edited_image", "edited_scene"] if f == "edit" else [f]
        return keys

    def _language(self, index: int, scene: Scene) -> dict:
        """The fields made from the scene rather than its pixels, each with its own random stream."""
        out: dict = {}
        if "caption" in self.fields:
            out["caption"], _ = caption(scene, self._rng(index, _CAPTION_STREAM), style=self.caption_style)
        if "questions" in self.fields:
            qas = questions(scene, self._rng(index, _QUESTIONS_STREAM), self.num_questions, cfg=self.cfg)
            out["questions"] = [(qa.question, qa.answer, qa.kind) for qa in qas]
        if "edit" in self.fields:
            out["edit"], edited = edit(scene, self._rng(index, _EDIT_STREAM), self.cfg, kind=self.edit_kind)
            out["edited_image"] = scene_image(edited, self.cfg)
            out["edited_scene"] = edited.to_dict()
        if "scene" in self.fields:
            out["scene"] = scene.to_dict()
        return out

    def _rng(self, index: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index, stream])

    def __repr__(self) -> str:
        cached = ", cached" if self._cached is not None else ""
        return (
            f"ToyWorldDataset({self.cfg.resolution}x{self.cfg.resolution}, "
            f"{self.cfg.min_objects}..{self.cfg.max_objects} objects, n={self.n}, seed={self.seed}, "
            f"fields={self.fields}{cached})"
        )


def collate(items: list[dict]) -> dict:
    """Batch toy-world items: tensors are stacked and numbers become tensors (as ``default_collate``
    does); strings, question lists and scene dicts, whose lengths vary, stay Python lists."""
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if isinstance(values[0], torch.Tensor | int | float) and not isinstance(values[0], bool):
            out[key] = default_collate(values)
        else:
            out[key] = values
    return out
