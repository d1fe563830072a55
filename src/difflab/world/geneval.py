"""GenEval-style evaluation: fixed prompt sets by category, scored on what the reader reads back.

GenEval (Ghosh et al., 2023, "GenEval: An Object-Focused Framework for Evaluating Text-to-Image
Alignment") scores a text-to-image model by detecting the objects in each generated image and checking
the prompt against them. Here the detector is the reader (:mod:`difflab.world.reader`) and the check is
the prompt's own ``holds`` (:mod:`difflab.world.prompts`). GenEval's six categories are realised as:

=================  ========================================  ==================================
category           text                                      holds when
=================  ========================================  ==================================
single_object      a circle                                  some object is a circle
two_objects        a circle and a square                     two distinct objects match
counting           three circles                             exactly three circles
colors             a red circle                              some object is a red circle
position           a circle to the left of a square          a pair in those grid rows/columns
attribute_binding  a red circle and a blue square            two distinct objects match
=================  ========================================  ==================================

The prompts of each category are fixed per world and versioned (``prompt_sets/v1.json``, package data);
``HELDOUT_PAIRS`` are (colour, shape) pairs kept out of training to test compositional generalisation.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from difflab.errors import DifflabError, check_choice
from difflab.world.prompts import (
    RELATIONS,
    Conjunction,
    Count,
    Exists,
    ObjectSpec,
    Prompt,
    Relation,
    holds,
    mentioned,
    prompt_from_dict,
    required_objects,
)
from difflab.world.scene import Scene, WorldConfig, world_preset

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
    return [p for p in pool if len(required_objects(p)) <= cfg.max_objects]


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
    """Write the current version's file, one prompt per line: ``python -m difflab.world.geneval``."""
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


MAX_PER_CATEGORY = PROMPT_SET_SIZE
"""The most prompts per category an evaluation draws (what the shipped sets hold)."""


def prompt_sets(world: str) -> dict[str, list[Prompt]]:
    """``{category: prompts}`` of ``world``: the shipped, versioned set, or for a world without one (tiny)
    the same construction made on the fly."""
    try:
        return load_prompt_set(world)
    except DifflabError:
        return make_prompt_set(world_preset(world))


def eval_prompts(world: str, n: int, seed: int | None = None) -> list[Prompt]:
    """The first ``n`` prompts of every category of ``world``'s prompt set, category by category; with a
    ``seed``, of a freshly drawn set instead (the same construction, another order of each category's pool:
    scores that hold there were not tuned to the shipped set)."""
    if not 1 <= n <= MAX_PER_CATEGORY:
        raise DifflabError(f"--n {n} is invalid; expected 1..{MAX_PER_CATEGORY} prompts per category")
    sets = prompt_sets(world) if seed is None else make_prompt_set(world_preset(world), seed=seed)
    return [p for ps in sets.values() for p in ps[:n]]


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
