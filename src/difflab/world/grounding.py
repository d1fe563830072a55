"""Which object each phrase of a caption names: the word-to-object alignment of a true caption.

A caption of a scene is a structured prompt that holds in it (:mod:`difflab.world.prompts`). Its *mentions*
are the object phrases in the order the text says them ('a red circle to the left of a blue square':
red circle, then blue square; 'two circles': the one phrase names both circles). Grounding a caption
finds, for every mention, the scene objects it names, by an assignment under which the prompt holds:

=========== ============================================ ============================================
prompt      mentions                                     objects
=========== ============================================ ============================================
Exists      its spec                                     the first object (back to front) matching it
Count       its spec, once                               every object matching it, in reading order
Relation    a, b                                         the first pair (p, q) in that relation
Conjunction the parts, in order                          the first injective assignment that matches
=========== ============================================ ============================================

Two uses build on it. A layout planner learns object slots *in the order the caption names them*
(LMD, Lian et al. 2023): the order in which a left-to-right reader can write them, which is what makes
binding and position learnable (docs/t2i.md). Attention supervision (TokenCompose, Wang et al. 2024)
sends each phrase's cross-attention to its object's mask.
"""

from __future__ import annotations

import itertools

from difflab.errors import DifflabError
from difflab.world.prompts import Conjunction, Count, Exists, Prompt, Relation, matches, relation_holds
from difflab.world.scene import Scene


def ground(prompt: Prompt, scene: Scene) -> list[tuple[int, ...]]:
    """For every mention of ``prompt`` in text order, the indices into ``scene.objects`` of the objects it
    names (one each, or the n objects of a count). An error when the prompt does not hold in the scene:
    only a true caption can be grounded."""
    objects = scene.objects
    if isinstance(prompt, Exists):
        found = [i for i, o in enumerate(objects) if matches(prompt.spec, o)]
        if found:
            return [(found[0],)]
    elif isinstance(prompt, Count):
        found = [i for i, o in enumerate(objects) if matches(prompt.spec, o)]
        if len(found) == prompt.n:
            return [tuple(sorted(found, key=lambda i: objects[i].cell))]  # in reading order
    elif isinstance(prompt, Relation):
        for i, j in itertools.permutations(range(len(objects)), 2):
            p, q = objects[i], objects[j]
            if matches(prompt.a, p) and matches(prompt.b, q) and relation_holds(prompt.relation, p, q):
                return [(i,), (j,)]
    elif isinstance(prompt, Conjunction):
        if not (prompt.exact and len(objects) != len(prompt.parts)):
            for chosen in itertools.permutations(range(len(objects)), len(prompt.parts)):
                if all(matches(p, objects[i]) for p, i in zip(prompt.parts, chosen, strict=True)):
                    return [(i,) for i in chosen]
    raise DifflabError(f"caption '{prompt.text()}' does not hold in the scene {scene.keys()}; "
                       "expected a true caption")  # fmt: skip


def caption_order(prompt: Prompt, scene: Scene) -> list[int]:
    """Every object of ``scene`` once: those the caption names, in the order it names them, then the
    unnamed ones in reading order (row by row, left to right)."""
    named = [i for group in ground(prompt, scene) for i in group]
    rest = sorted(set(range(len(scene.objects))) - set(named), key=lambda i: scene.objects[i].cell)
    return named + rest
