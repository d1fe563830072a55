"""Language about scenes: captions and question/answer pairs, all true by construction.

A caption is a structured prompt (:mod:`difflab.world.prompts`) that holds in the scene, rendered to
English; so every caption can be checked against the scene, or against the reader's reading of the
image, with the same ``holds``. Questions are structured too: ``answer(question, scene)`` computes the
answer from any scene, which is how a VLM's answers are scored and how these pairs are tested against
the reader.

Captions ("a large red circle at the top left", "a blue square to the right of a small yellow
triangle", "two green circles") train text-to-image models and CLIP; questions ("what colour is the
square?" -> "blue", "how many circles?" -> "2") train and evaluate LLaVA-style VLMs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

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
    matches,
    refer,
    relation_holds,
    spec_of,
)
from difflab.world.scene import POSITIONS, Scene, WorldConfig

# ---------------------------------------------------------------------------------------------- captions

CAPTION_STYLES = ("object", "count", "relation", "pair", "describe")
"""object: 'a large red circle at the top left' (random detail); count: 'two green circles';
relation: 'a red circle to the left of a small blue square'; pair: 'a red circle and a blue square';
describe: every object with size, colour, shape and position (exact)."""


def description(scene: Scene) -> Conjunction:
    """Every object with all four attributes, in reading order (top left to bottom right); exact, so it
    holds only in scenes with no other objects."""
    objects = sorted(scene.objects, key=lambda o: o.cell)
    return Conjunction(tuple(spec_of(o) for o in objects), exact=True)


def describe(scene: Scene) -> str:
    """A full, deterministic description: 'a large red circle at the top left and a small blue square at
    the bottom right'."""
    return description(scene).text()


def _detail(obj, rng: np.random.Generator, position: bool) -> ObjectSpec:
    """A spec of ``obj`` that always names its shape and names each other attribute at random."""
    chance = {"color": 0.7, "size": 0.35, "position": 0.35 if position else 0.0}
    return spec_of(obj, ["shape"] + [a for a, p in chance.items() if rng.random() < p])


def _true_relation(a, b, rng: np.random.Generator) -> str:
    """A random relation that holds between objects ``a`` and ``b`` (never none: distinct cells)."""
    true = [r for r in RELATIONS if relation_holds(r, a, b)]
    return true[int(rng.integers(len(true)))]


def _styles(scene: Scene) -> tuple[str, ...]:
    return CAPTION_STYLES if len(scene.objects) >= 2 else ("object", "count", "describe")


def caption(scene: Scene, rng: np.random.Generator, style: str | None = None) -> tuple[str, Prompt]:
    """A random true caption of ``scene`` and its structured prompt; ``style`` picks one of
    :data:`CAPTION_STYLES` (default: uniform over those the scene allows; relation and pair need two
    objects)."""
    if not scene.objects:
        raise DifflabError("cannot caption an empty scene; expected at least one object")
    if style is None:
        allowed = _styles(scene)
        style = allowed[int(rng.integers(len(allowed)))]
    check_choice("caption style", style, CAPTION_STYLES)
    if style not in _styles(scene):
        raise DifflabError(f"caption style '{style}' needs two objects; the scene has {len(scene.objects)}")
    objs = scene.objects
    if style == "describe":
        prompt: Prompt = description(scene)
    elif style == "object":
        prompt = Exists(_detail(objs[int(rng.integers(len(objs)))], rng, position=True))
    elif style == "count":
        o = objs[int(rng.integers(len(objs)))]
        spec = spec_of(o, ("color", "shape") if rng.random() < 0.5 else ("shape",))
        prompt = Count(spec, sum(matches(spec, p) for p in objs))
    else:
        i, j = rng.choice(len(objs), size=2, replace=False)
        a, b = objs[i], objs[j]
        sa, sb = _detail(a, rng, position=False), _detail(b, rng, position=False)
        if style == "relation":
            prompt = Relation(sa, _true_relation(a, b, rng), sb)
        else:
            if sa == sb:  # 'a circle and a circle' is true but reads badly: tell them apart
                sa, sb = spec_of(a), spec_of(b)
            prompt = Conjunction((sa, sb))
    return prompt.text(), prompt


SHORT_FORMS = ("shape", "colored", "count", "two", "position", "binding")
"""The short forms a person types into a text-to-image model, which are also GenEval's six categories
(:mod:`difflab.world.geneval`): 'a circle', 'a red circle', 'two circles', 'a circle and a square',
'a circle to the left of a square', 'a red circle and a blue square'."""


def _shape_pairs(scene: Scene) -> list[tuple]:
    """Ordered pairs of the scene's objects that have different shapes: what two-object short forms name."""
    return [(a, b) for a in scene.objects for b in scene.objects if a.shape != b.shape]


def short_forms(scene: Scene) -> tuple[str, ...]:
    """The short forms that can describe ``scene`` truly: the two-object forms need two objects of
    different shapes (as GenEval's prompts name them), and binding also two different colours."""
    forms = ["shape", "colored", "count"]
    pairs = _shape_pairs(scene)
    if pairs:
        forms += ["two", "position"]
        if any(a.color != b.color for a, b in pairs):
            forms.append("binding")
    return tuple(forms)


def short_caption(scene: Scene, rng: np.random.Generator, form: str | None = None) -> tuple[str, Prompt]:
    """A random true caption of ``scene`` in one of the :data:`SHORT_FORMS` (default: uniform over
    :func:`short_forms` of the scene), without sizes or positions, and its structured prompt.

    The full captioner (:func:`caption`) names size and position at random and adds long descriptions;
    in the text-to-image data (scene32) only a small share of two-object scenes' captions have a
    two-object short form (counted: docs/t2i.md). Mixing short captions with descriptive ones, so that
    short prompts stay in-distribution, is what DALL-E 3 does (Betker et al. 2023, "Improving Image
    Generation with Better Captions")."""
    if not scene.objects:
        raise DifflabError("cannot caption an empty scene; expected at least one object")
    allowed = short_forms(scene)
    if form is None:
        form = allowed[int(rng.integers(len(allowed)))]
    check_choice("short caption form", form, SHORT_FORMS)
    if form not in allowed:
        raise DifflabError(f"short caption form '{form}' does not fit this scene; expected one of {allowed}")
    objs = scene.objects
    if form in ("shape", "colored", "count"):
        o = objs[int(rng.integers(len(objs)))]
        spec = spec_of(o, ("shape",) if form != "colored" else ("color", "shape"))
        prompt: Prompt = Exists(spec) if form != "count" else Count(spec, sum(matches(spec, p) for p in objs))
    else:
        pairs = _shape_pairs(scene)
        if form == "binding":
            pairs = [(a, b) for a, b in pairs if a.color != b.color]
        a, b = pairs[int(rng.integers(len(pairs)))]
        if form == "position":
            prompt = Relation(spec_of(a, ("shape",)), _true_relation(a, b, rng), spec_of(b, ("shape",)))
        else:
            attributes = ("shape",) if form == "two" else ("color", "shape")
            prompt = Conjunction((spec_of(a, attributes), spec_of(b, attributes)))
    return prompt.text(), prompt


# ------------------------------------------------------------------------------------- contrast captions

_OPPOSITE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}
# How often :func:`contrast` edits each attribute (among those the object names). Shape is favoured: it
# is the attribute a contrastive model learns last, since colour, size and position already tell most
# scenes of a batch apart. Position is rare because an edited position can break the reading order of a
# full description, a tell that the text alone gives away.
CONTRAST_WEIGHTS = {"shape": 0.5, "color": 0.3, "size": 0.1, "position": 0.1}


def object_specs(prompt: Prompt) -> tuple[ObjectSpec, ...]:
    """The object descriptions a prompt names, in order ('a red circle left of a square': two)."""
    if isinstance(prompt, Exists | Count):
        return (prompt.spec,)
    if isinstance(prompt, Relation):
        return (prompt.a, prompt.b)
    return prompt.parts


def _with_specs(prompt: Prompt, specs: tuple[ObjectSpec, ...]) -> Prompt:
    if isinstance(prompt, Exists | Count):
        return dataclasses.replace(prompt, spec=specs[0])
    if isinstance(prompt, Relation):
        return dataclasses.replace(prompt, a=specs[0], b=specs[1])
    return dataclasses.replace(prompt, parts=specs)


def contrast(prompt: Prompt, scene: Scene, rng: np.random.Generator, cfg: WorldConfig | None = None):
    """A caption one edit away from ``prompt`` that is false in ``scene``, or None if none was found.

    The edit changes one named attribute of one object ('a red circle' -> 'a red square'), swaps the
    colours of two named objects ('a red circle and a blue square' -> 'a blue circle and a red square':
    the same words, bound differently) or reverses a relation. These are the hard negatives of NegCLIP
    (Yuksekgonul et al. 2023): a caption that differs in one word from a true one can only be told apart
    by reading that word against the image, which in-batch negatives rarely force.
    """
    world = cfg or WorldConfig()
    values = {"shape": world.shapes, "color": world.colors, "size": world.sizes, "position": POSITIONS}
    for _ in range(20):
        specs = list(object_specs(prompt))
        coloured = [i for i, sp in enumerate(specs) if sp.color is not None]
        swappable = len(coloured) >= 2 and specs[coloured[0]].color != specs[coloured[1]].color
        move = rng.random()
        if swappable and move < 0.25:
            i, j = coloured[0], coloured[1]
            specs[i], specs[j] = (dataclasses.replace(specs[i], color=specs[j].color),
                                  dataclasses.replace(specs[j], color=specs[i].color))  # fmt: skip
            candidate = _with_specs(prompt, tuple(specs))
        elif isinstance(prompt, Relation) and move < 0.4:
            candidate = dataclasses.replace(prompt, relation=_OPPOSITE[prompt.relation])
        else:
            i = int(rng.integers(len(specs)))
            # Attributes this object names and that have another value in this world (one size: none).
            named = [a for a in sorted(specs[i].fields()) if len(values[a]) > 1]
            if not named:
                continue
            weights = np.array([CONTRAST_WEIGHTS[a] for a in named])
            attribute = named[int(rng.choice(len(named), p=weights / weights.sum()))]
            others = [v for v in values[attribute] if v != getattr(specs[i], attribute)]
            specs[i] = dataclasses.replace(specs[i], **{attribute: others[int(rng.integers(len(others)))]})
            candidate = _with_specs(prompt, tuple(specs))
        if not candidate.holds(scene):
            return candidate
    return None


# --------------------------------------------------------------------------------------------- questions

QUESTION_KINDS = ("color", "shape", "count", "existence", "position")


@dataclass(frozen=True)
class Question:
    """A question about the objects matching ``spec``: their colour, shape or position (asked only of a
    unique object), their number, or whether there is one."""

    kind: str
    spec: ObjectSpec

    def __post_init__(self) -> None:
        check_choice("question kind", self.kind, QUESTION_KINDS)

    def text(self) -> str:
        if self.kind == "count":
            return f"how many {self.spec.noun(None, plural_form=True)}?"
        if self.kind == "existence":
            return f"is there {self.spec.noun('a')}?"
        if self.kind == "position":
            return f"where is {self.spec.noun('the')}?"
        return f"what {'colour' if self.kind == 'color' else 'shape'} is {self.spec.noun('the')}?"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "object": self.spec.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> Question:
        return cls(d["kind"], ObjectSpec(**d["object"]))


def answer(question: Question, scene: Scene) -> str | None:
    """The answer in ``scene``: a colour, shape or position name, a count ('2'), or 'yes'/'no'. None when
    a colour/shape/position question does not pick out exactly one object in this scene."""
    found = [o for o in scene.objects if matches(question.spec, o)]
    if question.kind == "count":
        return str(len(found))
    if question.kind == "existence":
        return "yes" if found else "no"
    return getattr(found[0], question.kind) if len(found) == 1 else None


class QA(NamedTuple):
    question: str
    answer: str
    kind: str
    struct: Question


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


def _absent(rng, scene, vocab, attributes) -> ObjectSpec | None:
    """A random spec over ``attributes`` that no object matches, or None after a few tries."""
    for _ in range(20):
        spec = ObjectSpec(**{a: _pick(rng, vocab[a]) for a in attributes})
        if not any(matches(spec, o) for o in scene.objects):
            return spec
    return None


def swapped_pairs(scene: Scene, colors, shapes) -> list[tuple[str, str]]:
    """The absent (colour, shape) pairs of the vocabulary that share the most attributes with ``scene``: a
    shown colour on another shown shape where the scene allows ('a red square' beside a red circle and a
    blue square), otherwise a shown object with its colour or its shape changed. What a model that does not
    bind colour to shape answers 'yes' to: POPE's adversarial probes here (:func:`difflab.data.vqa.pope_cases`)
    and the existent-object manipulations of LRV-Instruction's negative instructions (Liu et al. 2023,
    "Mitigating Hallucination in Large Multi-Modal Models via Robust Instruction Tuning", Sec. 3)."""
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [(c, s) for s in shapes for c in colors if (c, s) not in present]
    shown_colors, shown_shapes = {o.color for o in scene.objects}, {o.shape for o in scene.objects}
    shared = [(c in shown_colors) + (s in shown_shapes) for c, s in absent]
    return [p for p, k in zip(absent, shared, strict=True) if k == max(shared)]


def _question(
    kind: str, scene: Scene, rng: np.random.Generator, vocab: dict, swaps: float = 0.0
) -> Question | None:
    objs = scene.objects
    if kind in ("color", "shape", "position"):
        refs = [s for s in (refer(o, scene, exclude=(kind,)) for o in objs) if s is not None]
        return Question(kind, _pick(rng, refs)) if refs else None
    if kind == "count":
        attributes = _pick(rng, [("shape",), ("color",), ("color", "shape")])
        spec = _absent(rng, scene, vocab, attributes) if rng.random() < 0.25 else None
        return Question(kind, spec or spec_of(_pick(rng, objs), attributes))
    # Existence: 'yes' and 'no' equally often; a size is named now and then; a share ``swaps`` of the 'no's
    # are attribute swaps (no draw is made for it when 0: the default question stream stays as it was).
    attributes = ("size", "color", "shape") if rng.random() < 0.3 else ("color", "shape")
    if rng.random() < 0.5:
        spec = spec_of(_pick(rng, objs), attributes)
    elif swaps and rng.random() < swaps:
        color, shape = _pick(rng, swapped_pairs(scene, vocab["color"], vocab["shape"]))
        spec = ObjectSpec(color=color, shape=shape)
    else:
        spec = _absent(rng, scene, vocab, attributes)
    return Question(kind, spec) if spec is not None else None


def questions(
    scene: Scene, rng: np.random.Generator, n: int, cfg: WorldConfig | None = None, kinds=QUESTION_KINDS,
    swaps: float = 0.0,
) -> list[QA]:  # fmt: skip
    """``n`` question/answer pairs about ``scene`` (distinct where the scene allows), each kind equally
    likely. Counts and 'no' answers draw absent shapes and colours from ``cfg``'s vocabulary (default:
    the whole world's); a share ``swaps`` of the existence 'no's ask a :func:`swapped_pairs` pair instead."""
    if not scene.objects:
        raise DifflabError("cannot ask about an empty scene; expected at least one object")
    for k in kinds:
        check_choice("question kind", k, QUESTION_KINDS)
    world = cfg or WorldConfig()
    vocab = {"shape": world.shapes, "color": world.colors, "size": world.sizes}
    out: list[QA] = []
    for attempt in range(20 * n):
        if len(out) == n:
            break
        q = _question(_pick(rng, list(kinds)), scene, rng, vocab, swaps)
        if q is None or (attempt < 10 * n and any(q == qa.struct for qa in out)):
            continue
        out.append(QA(q.text(), answer(q, scene), q.kind, q))
    return out
