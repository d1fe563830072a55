"""Reading the world's English back into structure: the inverse of ``text()`` for prompts and questions.

The world writes English from structures (:mod:`difflab.world.prompts`, :mod:`difflab.world.language`);
this module goes back, for the texts the world itself writes - 'a red circle', 'two squares', 'a circle to
the left of a square', 'a red circle and a blue square', 'a large cyan diamond at the top left', 'how many
circles?' - and answers None for anything else. No guess is ever made: a candidate structure is accepted
only if its own ``text()`` is the given text, word for word (up to case, spacing and a final full stop).
That is what lets a caption a model wrote be judged against a scene exactly (:func:`parse_caption`): a text
that parses means exactly what the world means by it, and one that does not is a failure, not a guess.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from difflab.world.language import Question
from difflab.world.prompts import (
    NUMBER_WORDS,
    RELATIONS,
    Conjunction,
    Count,
    Exists,
    ObjectSpec,
    Prompt,
    Relation,
    plural,
)
from difflab.world.scene import ALL_SHAPES, COLORS, POSITIONS, SIZES, WorldConfig

_HEADS = {**{s: (s, False) for s in (*ALL_SHAPES, "object")},
          **{plural(s): (s, True) for s in (*ALL_SHAPES, "object")}}  # fmt: skip
_PLACES = {("in the center" if p == "center" else f"at the {p}"): p for p in POSITIONS}


def normalized(text: str) -> str:
    """Lowercase, one space between words, a space after each comma, no full stop at the end."""
    return " ".join(text.lower().replace(",", ", ").split()).removesuffix(".").strip()


def _phrase(words: str) -> ObjectSpec | None:
    """'large red circle at the top left' (no determiner; the head singular or plural) -> its spec."""
    place = None
    for place_words, position in _PLACES.items():
        if words.endswith(" " + place_words):
            words, place = words.removesuffix(" " + place_words), position
            break
    *attributes, head = words.split() or [""]
    if head not in _HEADS or len(attributes) > 2:
        return None
    size = attributes.pop(0) if attributes and attributes[0] in SIZES else None
    color = attributes.pop(0) if attributes and attributes[0] in COLORS else None
    if attributes:
        return None
    shape = _HEADS[head][0]
    return ObjectSpec(shape=None if shape == "object" else shape, color=color, size=size, position=place)


def _noun(phrase: str) -> tuple[str, ObjectSpec] | None:
    """'a large red circle at the top left' -> ('a', ObjectSpec(...)); the determiner is kept apart."""
    det, _, rest = phrase.partition(" ")
    spec = _phrase(rest)
    return None if spec is None else (det, spec)


def _candidates(text: str):
    for relation, words in RELATIONS.items():
        a, found, b = text.partition(f" {words} ")
        if found and (na := _noun(a)) and (nb := _noun(b)):
            yield Relation(na[1], relation, nb[1])
    parts = [_noun(p) for p in re.split(r", | and ", text)]
    if len(parts) > 1 and all(parts):
        yield Conjunction(tuple(p[1] for p in parts))
    if (one := _noun(text)) is not None:
        det, spec = one
        if det in ("a", "an"):
            yield Exists(spec)
        elif det in NUMBER_WORDS:
            yield Count(spec, NUMBER_WORDS.index(det))


def parse_prompt(text: str) -> Prompt | None:
    """The world's prompt whose ``text()`` is ``text`` (up to case, spacing and a full stop), or None.

    A full description (:func:`difflab.world.language.describe`) comes back as a plain
    :class:`~difflab.world.prompts.Conjunction` - its ``exact`` flag ('nothing else is there') has no words -
    and the description of a one-object scene as :class:`~difflab.world.prompts.Exists`, the same words."""
    want = normalized(text)
    for prompt in _candidates(want):
        try:
            if prompt.text() == want:
                return prompt
        except (KeyError, IndexError):  # a count word with no such number
            continue
    return None


# The question forms of :meth:`difflab.world.language.Question.text`, each with how its noun is written.
_QUESTION_FORMS = (("how many ", "count"), ("is there ", "existence"), ("where is the ", "position"),
                   ("what colour is the ", "color"), ("what shape is the ", "shape"))  # fmt: skip


def parse_question(text: str) -> Question | None:
    """The world's question whose ``text()`` is ``text`` ('how many red circles?', 'is there a square?'),
    or None: how a judge that holds only the text can answer it from a scene
    (:func:`difflab.world.language.answer`)."""
    if not isinstance(text, str):
        return None
    want = normalized(text)
    for opening, kind in _QUESTION_FORMS:
        if not (want.startswith(opening) and want.endswith("?")):
            continue
        rest = want.removeprefix(opening).removesuffix("?")
        # 'is there a red circle?' keeps its article; the other forms' nouns have none left.
        spec = (one[1] if (one := _noun(rest)) else None) if kind == "existence" else _phrase(rest)
        if spec is not None and (question := Question(kind, spec)).text() == want:
            return question
    return None


# ---------------------------------------------------------------------------------------------- captions


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption asserts about a scene, read off its structured prompt.

    - ``objects``: the object descriptions it mentions, once each as written ('two red circles' mentions
      one, 'a circle to the left of a square' two); a count of 'no' mentions nothing, it asserts absence.
      These are CHAIR's mentions (Rohrbach et al. 2018), the unit of the hallucination rate.
    - ``instances``: the objects it asserts exist as distinct objects, a count of n giving n of them.
    - ``counts``: its number claims ('two red circles': exactly two objects match).
    - ``relations``: its spatial relation claims between two objects.
    """

    prompt: Prompt

    @property
    def objects(self) -> tuple[ObjectSpec, ...]:
        if isinstance(self.prompt, Count):
            return (self.prompt.spec,) if self.prompt.n else ()
        if isinstance(self.prompt, Exists):
            return (self.prompt.spec,)
        if isinstance(self.prompt, Relation):
            return (self.prompt.a, self.prompt.b)
        return tuple(self.prompt.parts)

    @property
    def instances(self) -> tuple[ObjectSpec, ...]:
        return (self.prompt.spec,) * self.prompt.n if isinstance(self.prompt, Count) else self.objects

    @property
    def counts(self) -> tuple[Count, ...]:
        return (self.prompt,) if isinstance(self.prompt, Count) else ()

    @property
    def relations(self) -> tuple[Relation, ...]:
        return (self.prompt,) if isinstance(self.prompt, Relation) else ()


def _in_world(parsed: ParsedCaption, world: WorldConfig) -> bool:
    """Whether every shape, colour and size the caption names is one ``world`` draws ('no stars' too)."""
    allowed = {"shape": world.shapes, "color": world.colors, "size": world.sizes}
    specs = parsed.objects + tuple(c.spec for c in parsed.counts)
    return all(getattr(spec, a) in (None, *values) for spec in specs for a, values in allowed.items())


def parse_caption(text, world: WorldConfig) -> ParsedCaption | None:
    """What ``text`` asserts, when it is a caption in the language of ``world`` (see :func:`parse_prompt`);
    None for anything else, never an exception: a caption a model wrote may be garbled or not a string.

    A caption that names a shape, colour or size ``world`` never draws ('a star' of scene32) is also None:
    the world's captions never say it, so it is a failure to speak the language, not a claim to check."""
    if not isinstance(text, str):
        return None
    prompt = parse_prompt(text)
    parsed = None if prompt is None else ParsedCaption(prompt)
    return parsed if parsed is not None and _in_world(parsed, world) else None
