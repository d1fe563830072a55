"""The toy world's vocabulary, collected from the world's own code rather than kept by hand.

:func:`_world_words` is every word of every text the toy world can say - captions of every style,
descriptions, questions and their answers, edit instructions and the shipped GenEval prompt sets - as
:func:`~difflab.text.normalize.normalize` splits them: the vocabulary of
:meth:`~difflab.text.word.WordTokenizer.for_world`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

from difflab.text.normalize import normalize
from difflab.world.edits import DIRECTIONS, Edit
from difflab.world.geneval import PROMPT_SET_VERSION, prompt_set_path
from difflab.world.language import QUESTION_KINDS, Question
from difflab.world.prompts import (
    NUMBER_WORDS,
    RELATIONS,
    Conjunction,
    Count,
    Exists,
    ObjectSpec,
    Relation,
)
from difflab.world.scene import COLORS, POSITIONS, SHAPES, SIZES


@functools.cache
def _world_words() -> tuple[str, ...]:
    return tuple(sorted({w for text in _world_texts() for w in normalize(text)}))


def _world_texts() -> Iterator[str]:
    """Every template of the toy world's language, rendered by the world's own code with every value of
    every attribute, plus the answers and the shipped prompt sets. Collecting the words of these texts
    (rather than keeping a word list by hand) means a new template or attribute value reaches the
    vocabulary without anyone remembering to add it; ``tests/test_tokenizer.py`` checks the result
    against sampled captions, questions and edits."""
    full = ObjectSpec(SHAPES[0], COLORS[0], SIZES[0], POSITIONS[0])
    specs = [
        ObjectSpec(),  # 'object'
        *(ObjectSpec(shape=s) for s in SHAPES),
        *(ObjectSpec(color=c) for c in COLORS),
        *(ObjectSpec(size=z) for z in SIZES),
        *(ObjectSpec(position=p) for p in POSITIONS),
    ]
    for spec in specs:
        for det in ("a", "the", None, *NUMBER_WORDS):
            yield spec.noun(det)
            yield spec.noun(det, plural_form=True)
        yield Exists(spec).text()
        yield from (Count(spec, n).text() for n in range(10))
        yield from (Relation(spec, r, spec).text() for r in RELATIONS)
        yield from (Question(kind, spec).text() for kind in QUESTION_KINDS)
        yield from (Edit("recolor", spec, color=c).text() for c in COLORS)
        yield from (Edit("move", spec, direction=d).text() for d in DIRECTIONS)
        yield Edit("remove", spec).text()
    yield Edit("add", full).text()
    yield Conjunction((full, full, full)).text()  # 'a, b and c'
    yield Conjunction(()).text()  # 'an empty scene'
    # Answers (language.answer): a count as a digit, yes/no, or a colour, shape or position name.
    yield from (str(n) for n in range(10))
    yield from ("yes", "no", *COLORS, *SHAPES, *POSITIONS)
    # The prompt sets are versioned files that older code may have written: read their texts too.
    for version in range(1, PROMPT_SET_VERSION + 1):
        path = prompt_set_path(version)
        if path.exists():
            for sets in json.loads(path.read_text())["worlds"].values():
                yield from (p["text"] for prompts in sets.values() for p in prompts)
