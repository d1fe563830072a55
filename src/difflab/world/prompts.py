"""Structured prompts: one small language that is rendered to English and checked against scenes.

A prompt is a frozen dataclass with ``text()`` (English), ``holds(scene)`` (truth in a scene) and a JSON
round trip. The same ``holds`` serves two jobs: a caption of a scene is a prompt that holds in it, and a
text-to-image model is scored by whether the prompt holds in the scene that the reader reads back from
its image - the reader-based evaluation of GenEval (Ghosh et al., 2023, "GenEval: An Object-Focused
Framework for Evaluating Text-to-Image Alignment"), whose six categories are realised here:

=================  ========================================  ==================================
category           text                                      holds when
=================  ========================================  ==================================
single_object      a circle                                  some object is a circle
two_objects        a circle and a square                     two distinct objects match
counting           three circles                             exactly three circles
colors             a red circle                              some object is a red circle
position           a circle to the left of a square          a pair in those grid columns
attribute_binding  a red circle and a blue square            two distinct objects match
=================  ========================================  ==================================

Relations compare grid cells (A is left of B iff col(A) < col(B)); the scene model keeps every object in
its own cell, so these are unambiguous for the writer and for the reader alike.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from difflab.errors import DifflabError, check_choice
from difflab.world.scene import (
    COLORS,
    POSITIONS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    WorldConfig,
    fits,
    placeable,
    sample_object_in_cell,
    world_preset,
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
_VOCABULARY = {"shape": ("shape", SHAPES), "color": ("colour", COLORS), "size": ("size", SIZES),
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


# ---------------------------------------------------------------------------------- GenEval categories

CATEGORIES = ("single_object", "two_objects", "counting", "colors", "position", "attribute_binding")
_SHAPE, _SHAPE_COLOR = frozenset({"shape"}), frozenset({"shape", "color"})


def category(prompt: Prompt) -> str:
    """The GenEval category a prompt realises (read off its structure), or 'caption' for richer forms."""
    if isinstance(prompt, Exists):
        return {_SHAPE: "single_object", _SHAPE_COLOR: "colors"}.get(prompt.spec.fields(), "caption")
    if isinstance(prompt, Count) and prompt.n >= 1 and prompt.spec.fields() == _SHAPE:
        return "counting"
    if isinstance(prompt, Relation) and prompt.a.fields() == prompt.b.fields() == _SHAPE:
        return "position"
    if isinstance(prompt, Conjunction) and len(prompt.parts) == 2 and not prompt.exact:
        a, b = prompt.parts
        if a.shape != b.shape and a.fields() == b.fields():
            return {_SHAPE: "two_objects", _SHAPE_COLOR: "attribute_binding"}.get(a.fields(), "caption")
    return "caption"


def check_faithfulness(prompts: list[Prompt], scenes: list[Scene]) -> dict:
    """GenEval-style score: the fraction of (prompt, read scene) pairs where the prompt holds, per
    category, and 'overall' as the mean of the category scores (GenEval's convention, so a large
    category does not dominate). Pass the scenes the reader read from the generated images."""
    if len(prompts) != len(scenes):
        raise DifflabError(f"got {len(prompts)} prompts but {len(scenes)} scenes; expected one scene each")
    hits: dict[str, list[bool]] = {}
    for p, s in zip(prompts, scenes, strict=True):
        hits.setdefault(category(p), []).append(holds(p, s))
    result = {c: {"n": len(h), "score": float(np.mean(h))} for c, h in hits.items()}
    scores = [r["score"] for r in result.values()]
    result["overall"] = {"n": len(prompts), "score": float(np.mean(scores)) if scores else float("nan")}
    return result


# ------------------------------------------------------------------------------- scenes from prompts


def mentioned(prompt: Prompt) -> list[ObjectSpec]:
    """The object specs a prompt mentions."""
    if isinstance(prompt, Exists | Count):
        return [prompt.spec]
    if isinstance(prompt, Relation):
        return [prompt.a, prompt.b]
    return list(prompt.parts)


def _required(prompt: Prompt) -> list[ObjectSpec]:
    """One spec per object a scene needs for ``prompt`` to hold."""
    return [prompt.spec] * prompt.n if isinstance(prompt, Count) else mentioned(prompt)


def scene_for(prompt: Prompt, rng: np.random.Generator, cfg: WorldConfig, tries: int = 200) -> Scene | None:
    """A random scene of world ``cfg`` in which ``prompt`` holds (the objects it needs, plus random
    others up to a random scene size), or None if ``tries`` attempts fail - a perfect text-to-image
    model, used to prove that evaluation prompts are satisfiable and to test the evaluation itself."""
    need = _required(prompt)
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
        depths = np.sort(rng.uniform(0.2, 0.9, size=n))[::-1]
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


# ------------------------------------------------------------------------------- held-out prompt sets

PROMPT_SET_VERSION = 1
"""Bump when a code change alters the prompt sets; the old file stays loadable by its version."""
PROMPT_SET_WORLDS = ("scene32", "scene64")
PROMPT_SET_SIZE, PROMPT_SET_SEED = 100, 0
_PROMPT_SET_DIR = Path(__file__).parent / "prompt_sets"


def category_pool(name: str, cfg: WorldConfig) -> list[Prompt]:
    """Every distinct prompt of a GenEval category over ``cfg``'s vocabulary that needs at most
    ``cfg.max_objects`` objects. As in GenEval, paired objects have distinct shapes (and colours)."""
    check_choice("category", name, CATEGORIES)
    S, C, O = cfg.shapes, cfg.colors, ObjectSpec
    pool: list[Prompt] = {
        "single_object": lambda: [Exists(O(s)) for s in S],
        "two_objects": lambda: [Conjunction((O(a), O(b))) for a, b in itertools.permutations(S, 2)],
        "counting": lambda: [Count(O(s), n) for s in S for n in range(1, cfg.max_objects + 1)],
        "colors": lambda: [Exists(O(s, c)) for s in S for c in C],
        "position": lambda: [
            Relation(O(a), r, O(b)) for a, b in itertools.permutations(S, 2) for r in RELATIONS
        ],
        "attribute_binding": lambda: [
            Conjunction((O(a, c), O(b, d)))
            for a, b in itertools.permutations(S, 2)
            for c, d in itertools.permutations(C, 2)
        ],
    }[name]()
    return [p for p in pool if len(_required(p)) <= cfg.max_objects]


def make_prompt_set(cfg: WorldConfig, n: int = PROMPT_SET_SIZE, seed: int = PROMPT_SET_SEED) -> dict:
    """``n`` prompts per category: the category's pool in a seeded random order, cycled when the pool is
    smaller than ``n`` (so every distinct prompt appears equally often, give or take one)."""
    sets = {}
    for i, name in enumerate(CATEGORIES):
        pool = category_pool(name, cfg)
        if pool:
            order = np.random.default_rng([seed, i]).permutation(len(pool))
            sets[name] = [pool[order[j % len(pool)]] for j in range(n)]
    return sets


def build_prompt_sets() -> dict:
    """The JSON document of the current version's prompt sets (what ``v{PROMPT_SET_VERSION}.json`` holds)."""
    worlds = {
        w: {
            c: [{"text": p.text(), **p.to_dict()} for p in ps]
            for c, ps in make_prompt_set(world_preset(w)).items()
        }
        for w in PROMPT_SET_WORLDS
    }
    return {"version": PROMPT_SET_VERSION, "size": PROMPT_SET_SIZE, "seed": PROMPT_SET_SEED, "worlds": worlds}


def prompt_set_path(version: int = PROMPT_SET_VERSION) -> Path:
    """Where version ``version`` of the prompt sets is shipped (package data)."""
    return _PROMPT_SET_DIR / f"v{version}.json"


def write_prompt_sets() -> Path:
    """Write the current version's file, one prompt per line: ``python -m difflab.world.prompts``."""
    doc = build_prompt_sets()
    lines = ["{", *(f' "{k}": {json.dumps(doc[k])},' for k in ("version", "size", "seed")), ' "worlds": {']
    for wi, (w, sets) in enumerate(doc["worlds"].items()):
        lines.append(f'  "{w}": {{')
        for ci, (c, ps) in enumerate(sets.items()):
            lines += [
                f'   "{c}": [',
                ",\n".join("    " + json.dumps(p) for p in ps),
                "   ]" + "," * (ci < len(sets) - 1),
            ]
        lines.append("  }" + "," * (wi < len(doc["worlds"]) - 1))
    path = prompt_set_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([*lines, " }", "}"]) + "\n")
    return path


def load_prompt_set(world: str = "scene64", version: int = PROMPT_SET_VERSION) -> dict[str, list[Prompt]]:
    """The fixed evaluation prompts of ``world``: ``{category: [prompt, ...]}``."""
    path = prompt_set_path(version)
    if not path.exists():
        have = sorted(int(p.stem[1:]) for p in _PROMPT_SET_DIR.glob("v*.json"))
        raise DifflabError(f"no prompt set version {version}; choose one of: {', '.join(map(str, have))}")
    worlds = json.loads(path.read_text())["worlds"]
    check_choice("prompt-set world", world, worlds)
    return {c: [prompt_from_dict(d) for d in ps] for c, ps in worlds[world].items()}


# (colour, shape) pairs kept out of training for compositional generalisation: one per shape, each
# colour at most once, so every colour and every shape is still seen in training.
HELDOUT_PAIRS: tuple[tuple[str, str], ...] = (
    ("orange", "circle"), ("cyan", "square"), ("magenta", "triangle"),
    ("green", "diamond"), ("yellow", "cross"),
)  # fmt: skip


def mentions_heldout(item: Prompt | Scene, pairs=HELDOUT_PAIRS) -> bool:
    """Whether a scene contains, or a prompt names, a held-out (colour, shape) pair. Filter training
    *scenes* with it (not only captions), so that no image of a held-out pair is ever seen."""
    pairs = set(map(tuple, pairs))
    if isinstance(item, Scene):
        return any((o.color, o.shape) in pairs for o in item.objects)
    return any((s.color, s.shape) in pairs for s in mentioned(item))


if __name__ == "__main__":
    print(write_prompt_sets())
