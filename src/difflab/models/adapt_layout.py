"""A new concept on a layout-grounded base (LMD + GLIGEN, recipe 'layout'): where the planner and the
grounding tokens learn the new shape without being retrained.

A layout base reads its prompt twice: the planner turns it into objects in boxes, and the painter reads each
object's phrase ('large red circle', through the frozen text encoder) with its box. Teaching it a shape
therefore needs three things, and only the third is trained:

- **the plan.** Where objects go does not depend on which shape they are (every shape of the world fills
  the same bounding circle), so the planner, which has no word for the new shape, plans it as a *stand-in*:
  a shape of the world the prompt does not mention takes the new word's place ('a red star and a blue
  circle' is planned as 'a red square and a blue circle'), and the stand-in's objects are the concept's
  (:func:`stand_in_planner`). The planner is not touched;
- **the phrase.** The painter's phrases are embedded by the frozen text encoder, which now knows the word:
  'large red star' gets its embedding as every phrase does, in a phrase table over the world's shapes and
  the concept (:func:`~difflab.models.adapt_eval.reading_world`, the reader's; old phrases keep their embeddings, in new
  places);
- **the drawing.** The adapter (LoRA, or full fine-tuning) learns to paint the new phrase in its box.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from difflab.models.adapt_eval import reading_world
from difflab.models.conditioners import GroundedPrompts
from difflab.text.normalize import normalize
from difflab.world.prompts import plural
from difflab.world.scene import Scene


def stand_in_planner(plan: Callable[[list[str], int], list[Scene]], concept: str, shapes: tuple[str, ...]):
    """``plan(prompts, seed) -> scenes`` for prompts that may name ``concept``: each is planned with the first
    of ``shapes`` (the planner's own) it does not mention in the concept's place (singular and plural), and
    the planned objects of that shape become the concept's."""

    def planned(prompts: list[str], seed: int) -> list[Scene]:
        texts, stand_ins = [], []
        for prompt in prompts:
            words = normalize(prompt)
            if concept not in words and plural(concept) not in words:
                texts.append(prompt)
                stand_ins.append(None)
                continue
            free = [s for s in shapes if s not in words and plural(s) not in words]
            sub = free[0] if free else shapes[0]  # every shape named: the first one is shared (rare)
            swap = {concept: sub, plural(concept): plural(sub)}
            texts.append(" ".join(swap.get(w, w) for w in words))
            stand_ins.append(sub)
        scenes = plan(texts, seed)
        return [scene if sub is None else
                dataclasses.replace(scene, objects=tuple(dataclasses.replace(o, shape=concept) if o.shape == sub
                                                         else o for o in scene.objects))
                for scene, sub in zip(scenes, stand_ins, strict=True)]  # fmt: skip

    return planned


def ground_concept(system, concept: str) -> None:
    """Give a loaded layout system (whose text encoder knows the concept's words) the concept: a phrase table
    over the world's shapes and the concept, and the stand-in planner. Other systems are left as they are."""
    old = system.conditioner
    if not isinstance(old, GroundedPrompts):
        return
    world = reading_world(old.world, concept)
    plan = None if old.planner is None else stand_in_planner(old.planner, concept, old.world.shapes)
    new = GroundedPrompts(old.encoder, old.cond_drop, old.pooled, world, plan)
    system.conditioner = new.to(old.phrase_table.device)
