"""Structured prompts: one small language that is rendered to English and checked against scenes.

A prompt is a frozen dataclass with ``text()`` (English), ``holds(scene)`` (truth in a scene) and a JSON
round trip. The same ``holds`` serves two jobs: a caption of a scene is a prompt that holds in it
(:mod:`difflab.world.language`), and a text-to-image model is scored by whether the prompt holds in the
scene that the reader reads back from its image (:mod:`difflab.world.geneval`).

=================  ========================================  =====================================
prompt             text                                      holds when
=================  ========================================  =====================================
Exists             a large red circle at the top left        some object matches
Count              two green circles                         exactly that many objects match
Relation           a circle to the left of a square          two distinct objects in that relation
Conjunction        a red circle and a blue square            distinct objects match the parts
=================  ========================================  =====================================

Relations compare grid cells (A is left of B iff col(A) < col(B)); the scene model keeps every object in
its own cell, so these are unambiguous for the writer and for the reader alike. ``scene_for`` draws a
scene in which a prompt holds: a perfect text-to-image model.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np

from difflab.errors import DifflabError, check_choice
from difflab.world.scene import (
    ALL_SHAPES,
    COLORS,
    POSITIONS,
    SIZES,
    Obj,
    Scene,
    WorldConfig,
    fits,
    placeable,
    sample_depths,
    sample_object_in_cell,
)

# ---------------------------------------------------------------------------------------------- English

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def article(phrase: str) -> str:
    """'a' or 'an' for a phrase, by its first letter ('an orange circle'); the vocabulary has no
    words where spelling and sound disagree."""
    return "an" if phrase[:1] in "aeiou" else "a"


def plural(noun: str) -> str:
    """'circle' -> 'circles', 'cross' -> 'crosses'."""
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def at_position(position: str) -> str:
    """'at the top left', 'in the center'."""
    return "in the center" if position == "center" else f"at the {position}"


def join_and(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


# ------------------------------------------------------------------------------------ object references

ATTRIBUTES = ("shape", "color", "size", "position")
_VOCABULARY = {"shape": ("shape", ALL_SHAPES), "color": ("colour", COLORS), "size": ("size", SIZES),
               "position": ("position", POSITIONS)}  # fmt: skip


@dataclass(frozen=True)
class ObjectSpec:
    """A description of one object by any subset of its attributes; ``None`` means 'any'."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        for name, (label, choices) in _VOCABULARY.items():
            if getattr(self, name) is not None:
                check_choice(label, getattr(self, name), choices)

    def fields(self) -> frozenset[str]:
        """Names of the attributes this spec constrains."""
        return frozenset(a for a in ATTRIBUTES if getattr(self, a) is not None)

    def noun(self, det: str | None = "a", plural_form: bool = False) -> str:
        """English noun phrase: ``det`` is 'a' (chooses a/an), 'the', a number word, or None."""
        words = [w for w in (self.size, self.color) if w is not None]
        head = self.shape or "object"
        words.append(plural(head) if plural_form else head)
        phrase = " ".join(words)
        if self.position is not None:
            phrase += " " + at_position(self.position)
        if det == "a":
            det = article(phrase)
        return phrase if det is None else f"{det} {phrase}"

    def to_dict(self) -> dict:
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}


def matches(spec: ObjectSpec, obj: Obj) -> bool:
    """Whether ``obj`` has every attribute that ``spec`` names."""
    return all(getattr(spec, a) in (None, getattr(obj, a)) for a in ATTRIBUTES)


def spec_of(obj: Obj, attributes=ATTRIBUTES) -> ObjectSpec:
    """The spec naming ``attributes`` of ``obj``."""
    return ObjectSpec(**{a: getattr(obj, a) for a in attributes})


# Attribute subsets in order of preference for referring expressions: no position if avoidable (it is
# always unique, so it would make every question trivial), then with a shape, then short.
_REFERENCE_ORDER = sorted(
    (c for k in range(1, 5) for c in itertools.combinations(ATTRIBUTES, k)),
    key=lambda c: ("position" in c, "shape" not in c, len(c)),
)


def refer(obj: Obj, scene: Scene, exclude: tuple[str, ...] = ()) -> ObjectSpec | None:
    """The preferred spec that picks out ``obj`` alone in ``scene`` without naming ``exclude``
    ('the square', 'the red square', 'the square at the top left'); None if there is none."""
    for attributes in _REFERENCE_ORDER:
        if set(attributes) & set(exclude):
            continue
        spec = spec_of(obj, attributes)
        if sum(matches(spec, o) for o in scene.objects) == 1:
            return spec
    return None


# ----------------------------------------------------------------------------------------- prompt kinds

RELATIONS: dict[str, str] = {
    "left_of": "to the left of",
    "right_of": "to the right of",
    "above": "above",
    "below": "below",
}


def relation_holds(relation: str, a: Obj, b: Obj) -> bool:
    """Whether ``a`` is ``relation`` ``b``, comparing grid rows and columns."""
    (ra, ca), (rb, cb) = a.cell, b.cell
    return {"left_of": ca < cb, "right_of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


@dataclass(frozen=True)
class Exists:
    """'a large red circle at the top left': some object matches."""

    spec: ObjectSpec

    def text(self) -> str:
        return self.spec.noun("a")

    def holds(self, scene: Scene) -> bool:
        return any(matches(self.spec, o) for o in scene.objects)

    def to_dict(self) -> dict:
        return {"kind": "exists", "object": self.spec.to_dict()}


@dataclass(frozen=True)
class Count:
    """'two green circles', 'one square', 'no crosses': exactly ``n`` objects match."""

    spec: ObjectSpec
    n: int

    def __post_init__(self) -> None:
        if not 0 <= self.n <= 9:
            raise DifflabError(f"count {self.n} is out of range; expected 0..9 (one object per grid cell)")

    def text(self) -> str:
        return self.spec.noun(NUMBER_WORDS[self.n], plural_form=self.n != 1)

    def holds(self, scene: Scene) -> bool:
        return sum(matches(self.spec, o) for o in scene.objects) == self.n

    def to_dict(self) -> dict:
        return {"kind": "count", "object": self.spec.to_dict(), "n": self.n}


@dataclass(frozen=True)
class Relation:
    """'a red circle to the left of a blue square': two distinct objects stand in ``relation``."""

    a: ObjectSpec
    relation: str
    b: ObjectSpec

    def __post_init__(self) -> None:
        check_choice("relation", self.relation, RELATIONS)

    def text(self) -> str:
        return f"{self.a.noun('a')} {RELATIONS[self.relation]} {self.b.noun('a')}"

    def holds(self, scene: Scene) -> bool:
        return any(
            matches(self.a, p) and matches(self.b, q) and relation_holds(self.relation, p, q)
            for p, q in itertools.permutations(scene.objects, 2)
        )

    def to_dict(self) -> dict:
        return {"kind": "relation", "a": self.a.to_dict(), "relation": self.relation, "b": self.b.to_dict()}


@dataclass(frozen=True)
class Conjunction:
    """'a red circle and a blue square': distinct objects match the parts. With ``exact`` the scene has
    no other objects (a full description); the text is the same."""

    parts: tuple[ObjectSpec, ...]
    exact: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))

    def text(self) -> str:
        return join_and([p.noun("a") for p in self.parts]) if self.parts else "an empty scene"

    def holds(self, scene: Scene) -> bool:
        if self.exact and len(scene.objects) != len(self.parts):
            return False
        # At most 9 objects: trying every injective assignment of parts to objects is cheap.
        return any(
            all(matches(p, o) for p, o in zip(self.parts, chosen, strict=True))
            for chosen in itertools.permutations(scene.objects, len(self.parts))
        )

    def to_dict(self) -> dict:
        return {"kind": "and", "objects": [p.to_dict() for p in self.parts], "exact": self.exact}


Prompt = Exists | Count | Relation | Conjunction


def holds(prompt: Prompt, scene: Scene) -> bool:
    """Whether ``prompt`` is true of ``scene``."""
    return prompt.holds(scene)


def prompt_from_dict(d: dict) -> Prompt:
    """Inverse of ``prompt.to_dict()`` (extra keys such as 'text' are ignored)."""
    kind = check_choice("prompt kind", d.get("kind"), ("exists", "count", "relation", "and"))
    if kind == "exists":
        return Exists(ObjectSpec(**d["object"]))
    if kind == "count":
        return Count(ObjectSpec(**d["object"]), int(d["n"]))
    if kind == "relation":
        return Relation(ObjectSpec(**d["a"]), d["relation"], ObjectSpec(**d["b"]))
    return Conjunction(tuple(ObjectSpec(**p) for p in d["objects"]), bool(d.get("exact", False)))


# ------------------------------------------------------------------------------- scenes from prompts


def mentioned(prompt: Prompt) -> list[ObjectSpec]:
    """The object specs a prompt mentions."""
    if isinstance(prompt, Exists | Count):
        return [prompt.spec]
    if isinstance(prompt, Relation):
        return [prompt.a, prompt.b]
    return list(prompt.parts)


def required_objects(prompt: Prompt) -> list[ObjectSpec]:
    """One spec per object a scene needs for ``prompt`` to hold."""
    return [prompt.spec] * prompt.n if isinstance(prompt, Count) else mentioned(prompt)


def scene_for(prompt: Prompt, rng: np.random.Generator, cfg: WorldConfig, tries: int = 200) -> Scene | None:
    """A random scene of world ``cfg`` in which ``prompt`` holds (the objects it needs, plus random
    others up to a random scene size), or None if ``tries`` attempts fail - a perfect text-to-image
    model, used to prove that evaluation prompts are satisfiable and to test the evaluation itself."""
    need = required_objects(prompt)
    exact = isinstance(prompt, Conjunction) and prompt.exact
    low = len(need) if exact else max(len(need), cfg.min_objects)
    high = len(need) if exact else cfg.max_objects
    if low > high:
        return None
    vocab = {"shape": cfg.shapes, "color": cfg.colors, "size": cfg.sizes}
    for _ in range(tries):
        n = int(rng.integers(low, high + 1))
        specs = need + [ObjectSpec()] * (n - len(need))
        objects: list[Obj] = []
        for spec, cell in zip(specs, rng.permutation(9), strict=False):
            row, col = divmod(POSITIONS.index(spec.position) if spec.position else int(cell), 3)
            pick = {a: getattr(spec, a) or v[int(rng.integers(len(v)))] for a, v in vocab.items()}
            if not placeable(cfg, pick["size"], row, col):
                break
            obj = sample_object_in_cell(rng, cfg, pick["shape"], pick["color"], pick["size"], row, col)
            if not fits(obj, objects, cfg):
                break
            objects.append(obj)
        if len(objects) != n:
            continue
        depths = sample_depths(rng, n)
        order = rng.permutation(n)  # required objects should not always be the farthest
        scene = Scene(
            tuple(
                dataclasses.replace(objects[i], depth=float(d)) for i, d in zip(order, depths, strict=True)
            ),
            background=cfg.background,
            background_seed=int(rng.integers(2**31)),
        )
        if holds(prompt, scene):
            return scene
    return None
