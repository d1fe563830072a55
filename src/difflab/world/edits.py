"""Edits: (instruction, edited scene) pairs such as 'make the circle green' or 'move the square to the left'.

These are the training pairs of instruction-based editing (InstructPix2Pix, Brooks et al., 2023): render
the scene before and after, and the instruction says what changed. Each edit is a structured
:class:`Edit`, so whether an edit was carried out can be checked on any pair of scenes - in particular
on what the reader reads from a model's input and output images - with :func:`edit_holds`: the edited
object changed as instructed and every other object is unchanged (compared by ``Scene.keys()``).

Edits keep scenes inside their world: a moved or added object gets its own free grid cell and does not
overlap any other, a scene never drops below ``cfg.min_objects`` or grows past ``cfg.max_objects``
(presets have at least one object, so 'remove' needs two), and an added object goes in front of all
others. The edited object is named as briefly as the scene allows: 'the circle', 'the red circle', 'the
small red circle', then by its position.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from difflab.errors import DifflabError, check_choice
from difflab.world.geneval import mentions_heldout
from difflab.world.prompts import ObjectSpec, matches, refer, spec_of
from difflab.world.scene import (
    COLORS,
    POSITIONS,
    Scene,
    WorldConfig,
    fits,
    placeable,
    position_name,
    sample_object_in_cell,
)

EDIT_KINDS = ("recolor", "move", "remove", "add")
# direction -> (row step, column step, English)
DIRECTIONS: dict[str, tuple[int, int, str]] = {
    "left": (0, -1, "to the left"),
    "right": (0, 1, "to the right"),
    "up": (-1, 0, "up"),
    "down": (1, 0, "down"),
}
_PLACEMENT_TRIES = 10


@dataclass(frozen=True)
class Edit:
    """One edit. ``target`` names the object to change (for 'add': the new object, all four attributes);
    ``color`` is the new colour of a recolour, ``direction`` the one-cell step of a move."""

    kind: str
    target: ObjectSpec
    color: str | None = None
    direction: str | None = None

    def __post_init__(self) -> None:
        check_choice("edit kind", self.kind, EDIT_KINDS)
        if self.kind == "recolor":
            check_choice("colour", self.color, COLORS)
        if self.kind == "move":
            check_choice("direction", self.direction, DIRECTIONS)
        if self.kind == "add" and len(self.target.fields()) != 4:
            raise DifflabError(f"an added object needs shape, colour, size and position; got {self.target}")

    def text(self) -> str:
        the = self.target.noun("the")
        return {
            "recolor": lambda: f"make {the} {self.color}",
            "move": lambda: f"move {the} {DIRECTIONS[self.direction][2]}",
            "remove": lambda: f"remove {the}",
            "add": lambda: f"add {self.target.noun('a')}",
        }[self.kind]()

    def to_dict(self) -> dict:
        extra = {"color": self.color, "direction": self.direction}
        return {"kind": self.kind, "object": self.target.to_dict()} | {k: v for k, v in extra.items() if v}

    @classmethod
    def from_dict(cls, d: dict) -> Edit:
        return cls(d["kind"], ObjectSpec(**d["object"]), d.get("color"), d.get("direction"))


def _step(position: str, direction: str) -> str | None:
    """The grid position one cell from ``position`` in ``direction``, or None off the grid."""
    row, col = divmod(POSITIONS.index(position), 3)
    dr, dc, _ = DIRECTIONS[direction]
    return position_name(row + dr, col + dc) if 0 <= row + dr < 3 and 0 <= col + dc < 3 else None


def expected_keys(edit: Edit, before: Scene) -> list[tuple[str, str, str, str]] | None:
    """The ``keys()`` a scene must have after ``edit`` is applied to ``before``; None if the edit does
    not apply (its target is not exactly one object of ``before``, or a move leaves the grid)."""
    keys = before.keys()
    if edit.kind == "add":
        t = edit.target
        return sorted([*keys, (t.shape, t.color, t.size, t.position)])
    found = [o for o in before.objects if matches(edit.target, o)]
    if len(found) != 1:
        return None
    shape, color, size, position = old = found[0].key()
    keys.remove(old)
    if edit.kind == "remove":
        return keys
    if edit.kind == "recolor":
        return sorted([*keys, (shape, edit.color, size, position)])
    moved = _step(position, edit.direction)
    return None if moved is None else sorted([*keys, (shape, color, size, moved)])


def edit_holds(edit: Edit, before: Scene, after: Scene) -> bool:
    """Whether ``after`` is ``before`` with ``edit`` carried out and nothing else changed (as the reader
    sees scenes: shape, colour, size and grid position of every object)."""
    want = expected_keys(edit, before)
    return want is not None and after.keys() == want


# ------------------------------------------------------------------------------------------------ sampling


def _recolor(scene: Scene, rng: np.random.Generator, cfg: WorldConfig):
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    colors = [c for c in cfg.colors if c != obj.color]
    if not colors:
        return None
    color = colors[int(rng.integers(len(colors)))]
    objects = list(scene.objects)
    objects[i] = dataclasses.replace(obj, color=color)
    return Edit("recolor", refer(obj, scene), color=color), objects


def _move(scene: Scene, rng: np.random.Generator, cfg: WorldConfig):
    candidates = [(i, d) for i in range(len(scene.objects)) for d in DIRECTIONS]
    for k in rng.permutation(len(candidates)):
        i, direction = candidates[k]
        obj, others = scene.objects[i], scene.objects[:i] + scene.objects[i + 1 :]
        to = _step(obj.position, direction)
        if to is None:
            continue
        row, col = divmod(POSITIONS.index(to), 3)
        if not placeable(cfg, obj.size, row, col):
            continue
        for _ in range(_PLACEMENT_TRIES):
            new = sample_object_in_cell(rng, cfg, obj.shape, obj.color, obj.size, row, col, obj.depth)
            if fits(new, others, cfg):
                objects = list(scene.objects)
                objects[i] = new
                return Edit("move", refer(obj, scene), direction=direction), objects
    return None


def _remove(scene: Scene, rng: np.random.Generator, cfg: WorldConfig):
    if len(scene.objects) <= cfg.min_objects:
        return None
    i = int(rng.integers(len(scene.objects)))
    return Edit("remove", refer(scene.objects[i], scene)), scene.objects[:i] + scene.objects[i + 1 :]


def _add(scene: Scene, rng: np.random.Generator, cfg: WorldConfig):
    if len(scene.objects) >= cfg.max_objects:
        return None
    taken = {o.cell for o in scene.objects}
    free = [divmod(c, 3) for c in range(9) if divmod(c, 3) not in taken]
    depth = min((o.depth for o in scene.objects), default=1.0) / 2  # in front of everything
    for k in rng.permutation(len(free)):
        row, col = free[k]
        shape, color, size = (v[int(rng.integers(len(v)))] for v in (cfg.shapes, cfg.colors, cfg.sizes))
        if not placeable(cfg, size, row, col):
            continue
        for _ in range(_PLACEMENT_TRIES):
            new = sample_object_in_cell(rng, cfg, shape, color, size, row, col, depth)
            if fits(new, scene.objects, cfg):
                return Edit("add", spec_of(new)), (*scene.objects, new)
    return None


_SAMPLERS = {"recolor": _recolor, "move": _move, "remove": _remove, "add": _add}


def sample_edit(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, kind: str | None = None
) -> tuple[Edit, Scene]:
    """A random edit of ``scene`` and the edited scene (deterministic given ``rng``). ``kind`` picks one
    of :data:`EDIT_KINDS`; by default a kind is drawn uniformly from those this scene allows."""
    kinds = (
        [check_choice("edit kind", kind, EDIT_KINDS)] if kind else [EDIT_KINDS[k] for k in rng.permutation(4)]
    )
    for k in kinds:
        made = _SAMPLERS[k](scene, rng, cfg)
        if made is not None:
            e, objects = made
            return e, dataclasses.replace(scene, objects=tuple(objects))
    what = f"'{kind}' edit" if kind else "edit"
    raise DifflabError(
        f"no {what} applies to this scene of {len(scene.objects)} objects "
        f"(the world allows {cfg.min_objects}..{cfg.max_objects} objects, one per free grid cell)"
    )


EDIT_STREAM = 31
"""The random stream of scene i's edit in :func:`edit_at` (captions use 11 and 21)."""


def edit_at(scene: Scene, cfg: WorldConfig, seed: int, i: int, heldout=()) -> tuple[Edit, Scene]:
    """Item i's edit of ``scene`` and the edited scene, drawn from stream (seed, i, :data:`EDIT_STREAM`) and
    redrawn while the result shows a held-out (colour, shape) pair (``heldout``; a model that never saw one
    does not see one here either): a pure function of its arguments, as a dataset's items must be."""
    rng = np.random.default_rng([seed, i, EDIT_STREAM])
    for _ in range(100):
        made = sample_edit(scene, rng, cfg)
        if not mentions_heldout(made[1], heldout):
            return made
    raise DifflabError(f"could not draw an edit of item {i} without the held-out pairs {sorted(heldout)}")


def edit(
    scene: Scene, rng: np.random.Generator, cfg: WorldConfig, kind: str | None = None
) -> tuple[str, Scene]:
    """An (instruction, edited scene) pair: ``('make the circle green', scene')``."""
    e, edited = sample_edit(scene, rng, cfg, kind)
    return e.text(), edited
