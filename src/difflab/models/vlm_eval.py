"""Judging a vision-language model exactly, by the world's own truth: what it answers and what it says.

Every case is a rendered scene no training set draws (:mod:`difflab.data.vqa`), and the model is two
callables, so any VLM (LLaVA, Flamingo, BLIP-2 connectors alike) and any oracle can be judged the same way:
``answer_fn(images (B, 3, S, S), questions) -> answers`` and ``caption_fn(images) -> captions``.

- **VQA**: exact match of the answer with the world's (:func:`difflab.world.language.answer`), up to case,
  spacing and a final full stop; overall, per question kind, and on scenes that show a held-out (colour,
  shape) pair apart from the rest ('seen'): compositional generalisation, not recall.
- **Captions**: each caption parsed into what it asserts (:func:`difflab.world.parse.parse_caption`) and
  checked against the scene, per attribute (:func:`caption_claims`), with CHAIR's object hallucination
  rate (Rohrbach et al. 2018, "Object Hallucination in Image Captioning").
- **POPE** (Li et al. 2023): yes/no existence probes in three settings, scored by POPE's own metrics.

Every share comes with its count ``n`` and a binomial standard error ``sqrt(p (1 - p) / n)``, which treats
the ``n`` judgements as independent (the claims of one caption are not quite, so there it is a little low).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import torch

from difflab.data.vqa import EVAL_SEED, POPE_SETTINGS, VQAItem, caption_cases, pope_cases, vqa_cases
from difflab.errors import DifflabError, check_int
from difflab.world.geneval import HELDOUT_PAIRS
from difflab.world.language import QUESTION_KINDS
from difflab.world.parse import ParsedCaption, normalized, parse_caption
from difflab.world.prompts import ObjectSpec, matches
from difflab.world.scene import Obj, Scene, WorldConfig, world_preset

CAPTION_ATTRIBUTES = ("shape", "color", "size", "count", "position")
"""What a caption is scored on; 'position' holds the grid positions it names and the relations it claims."""
_OBJECT_ATTRIBUTES = ("shape", "color", "size", "position")


def _share(hits: int, n: int, name: str = "value") -> dict:
    p = hits / n if n else None
    return {name: p, "n": n, "se": math.sqrt(p * (1 - p) / n) if n else None}


def _check_lengths(cases: Sequence, outputs: Sequence, what: str) -> None:
    if len(outputs) != len(cases):
        raise DifflabError(f"got {len(outputs)} {what} for {len(cases)} cases; expected one per case")


# ------------------------------------------------------------------------------------------------- VQA


def score_vqa(cases: Sequence[VQAItem], answers: Sequence[str]) -> dict:
    """Exact-match accuracy of ``answers`` (one per case) overall, per kind, and on held-out-pair scenes
    ('heldout_pairs') apart from the others ('seen')."""
    _check_lengths(cases, answers, "answers")
    right = [normalized(str(a)) == normalized(c.answer) for c, a in zip(cases, answers, strict=True)]

    def accuracy(keep) -> dict:
        hits = [r for c, r in zip(cases, right, strict=True) if keep(c)]
        return _share(sum(hits), len(hits), "accuracy")

    return {
        "overall": accuracy(lambda c: True),
        "kinds": {k: accuracy(lambda c, k=k: c.kind == k) for k in QUESTION_KINDS},
        "seen": accuracy(lambda c: not c.heldout_pair),
        "heldout_pairs": accuracy(lambda c: c.heldout_pair),
    }


# --------------------------------------------------------------------------------------------- captions


def align(instances: Sequence[ObjectSpec], objects: Sequence[Obj]) -> list[int | None]:
    """Each asserted instance's object (distinct objects, or None), chosen to make the most instances match
    their object in full and, among those choices, the most named attributes agree: the reading of the
    caption that is as true of the scene as it can be. Exact, by dynamic programming over the sets of
    objects taken (a scene has at most 9)."""
    best: dict[int, tuple[tuple[int, int], tuple]] = {0: ((0, 0), ())}  # objects taken -> (score, choice)
    for spec in instances:
        named = spec.fields()
        step: dict[int, tuple[tuple[int, int], tuple]] = {}
        for taken, ((full, agree), chosen) in best.items():
            options = [(taken, (full, agree), (*chosen, None))]
            for j, obj in enumerate(objects):
                if not taken >> j & 1:
                    same = sum(getattr(spec, a) == getattr(obj, a) for a in named)
                    options.append(
                        (taken | 1 << j, (full + (same == len(named)), agree + same), (*chosen, j))
                    )
            for key, score, choice in options:
                if key not in step or score > step[key][0]:
                    step[key] = (score, choice)
        best = step
    return list(max(best.values(), key=lambda v: v[0])[1])


def caption_claims(parsed: ParsedCaption | None, scene: Scene) -> dict:
    """What one caption gets right about ``scene``, as (true, asserted) and (named, present) counts.

    The caption's instances (a count of n asserts n objects) are aligned to distinct objects (:func:`align`).

    - **precision** of shape, colour, size: of the instances that name it, those whose object has that
      value (an instance left without an object is wrong in all it names). Position: the same for named
      grid positions, plus the relation claims that hold in the scene. Count: the number claims ('two red
      circles') that hold exactly.
    - **recall** (of the scene's objects): an object is *named* when an instance aligned to it matches it in
      full - the caption describes that object and says nothing false of it. Recall of shape, colour, size
      or position is the share of objects named with that attribute said; of count, the share named at all
      (the objects the caption accounts for).
    - **hallucination** (CHAIR_i): the caption's mentions (:attr:`ParsedCaption.objects`) that match no
      object in the scene.

    An unparsable caption (None) asserts nothing and names nothing: it counts in recall, not in precision.
    """
    objects = scene.objects
    precision = {a: [0, 0] for a in CAPTION_ATTRIBUTES}
    named: list[ObjectSpec | None] = [None] * len(objects)
    mentions = hallucinated = 0
    if parsed is not None:
        instances = parsed.instances
        for spec, j in zip(instances, align(instances, objects), strict=True):
            for a in spec.fields():
                precision[a][0] += j is not None and getattr(objects[j], a) == getattr(spec, a)
                precision[a][1] += 1
            if j is not None and matches(spec, objects[j]):
                named[j] = spec
        for claims, attribute in ((parsed.relations, "position"), (parsed.counts, "count")):
            precision[attribute][0] += sum(c.holds(scene) for c in claims)
            precision[attribute][1] += len(claims)
        mentions = len(parsed.objects)
        hallucinated = sum(not any(matches(spec, o) for o in objects) for spec in parsed.objects)
    recall = {a: [sum(s is not None and getattr(s, a) is not None for s in named), len(objects)]
              for a in _OBJECT_ATTRIBUTES}  # fmt: skip
    recall["count"] = [sum(s is not None for s in named), len(objects)]
    return {"precision": precision, "recall": recall, "mentions": mentions, "hallucinated": hallucinated}


def score_captions(cases: Sequence[VQAItem], captions: Sequence[str], world: WorldConfig | str) -> dict:
    """Captions judged against their cases' scenes (:func:`caption_claims`), pooled over the cases: per
    attribute precision and recall, the parse rate, the hallucination rate CHAIR_i (hallucinated mentions
    over all mentions) and CHAIR_s (captions with any hallucinated mention, over parsed captions)."""
    _check_lengths(cases, captions, "captions")
    world = world_preset(world) if isinstance(world, str) else world
    parsed = [parse_caption(text, world) for text in captions]
    totals = {part: {a: [0, 0] for a in CAPTION_ATTRIBUTES} for part in ("precision", "recall")}
    mentions = hallucinated = hallucinating = 0
    for case, p in zip(cases, parsed, strict=True):
        claims = caption_claims(p, case.scene)
        for part in ("precision", "recall"):
            for a, (hits, n) in claims[part].items():
                totals[part][a][0] += hits
                totals[part][a][1] += n
        mentions += claims["mentions"]
        hallucinated += claims["hallucinated"]
        hallucinating += claims["hallucinated"] > 0
    n_parsed = sum(p is not None for p in parsed)
    return {
        "n": len(cases),
        "parsed": _share(n_parsed, len(cases), "rate"),
        "attributes": {
            a: {part: _share(*totals[part][a]) for part in ("precision", "recall")}
            for a in CAPTION_ATTRIBUTES
        },  # fmt: skip
        "hallucination": _share(hallucinated, mentions, "rate"),
        "hallucinated_captions": _share(hallucinating, n_parsed, "rate"),
    }


# ------------------------------------------------------------------------------------------------- POPE


def pope_answer(text) -> str:
    """'yes' or 'no' as POPE's own scoring reads an answer: 'no' when the first sentence has the word 'no'
    or 'not', 'yes' otherwise (so an answer that is neither counts as a yes)."""
    words = str(text).split(".")[0].replace(",", " ").lower().split()
    return "no" if {"no", "not"} & set(words) else "yes"


def score_pope(cases: Sequence[VQAItem], answers: Sequence[str]) -> dict:
    """POPE's metrics per setting (positive = 'yes'): accuracy (with ``n`` and its ``se``), precision,
    recall, F1 and the yes-ratio. Precision is None where the model never says yes; F1 is written
    2 TP / (2 TP + FP + FN), which is 2PR / (P + R) wherever that is defined and 0 where it is not."""
    _check_lengths(cases, answers, "answers")
    groups: dict[str, list[tuple[bool, bool]]] = {}  # setting -> (truly yes, answered yes) per probe
    for c, a in zip(cases, answers, strict=True):
        groups.setdefault(getattr(c, "setting", "random"), []).append(
            (c.answer == "yes", pope_answer(a) == "yes")
        )
    out = {}
    for setting, pairs in groups.items():
        tp = sum(t and p for t, p in pairs)
        fp = sum(p and not t for t, p in pairs)
        fn = sum(t and not p for t, p in pairs)
        n = len(pairs)
        out[setting] = _share(n - fp - fn, n, "accuracy") | {
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None,
            "yes_ratio": (tp + fp) / n,
        }
    return out


# ------------------------------------------------------------------------------------------ all three


def batched(fn: Callable, cases: Sequence[VQAItem], batch_size: int, with_questions: bool) -> list[str]:
    """``fn``'s outputs over ``cases``, ``batch_size`` images at a time: ``fn(images, questions)`` (an answerer)
    or ``fn(images)`` (a captioner), one output per case."""
    out: list[str] = []
    for start in range(0, len(cases), batch_size):
        batch = cases[start : start + batch_size]
        images = torch.stack([c.image for c in batch])  # (B, 3, S, S)
        got = list(fn(images, [c.question for c in batch]) if with_questions else fn(images))
        _check_lengths(batch, got, "outputs of one batch")
        out += got
    return out


def evaluate_vlm(answer_fn: Callable, caption_fn: Callable, world: WorldConfig | str, n: int, seed: int = 0,
                 *, batch_size: int = 64, heldout=HELDOUT_PAIRS) -> dict:  # fmt: skip
    """The three tests on ``n`` cases each (POPE: ``n`` probes per setting, rounded up to even), run through
    ``answer_fn(images, questions)`` and ``caption_fn(images)`` in batches of ``batch_size``; one
    JSON-able report. ``heldout``: the (colour, shape) pairs the model never trained on."""
    check_int("number of evaluation cases", n, 1)
    check_int("batch_size", batch_size, 1)
    world_cfg = world_preset(world) if isinstance(world, str) else world
    vqa = vqa_cases(world_cfg, n, seed, heldout=heldout)
    captions = caption_cases(world_cfg, n, seed, heldout=heldout)
    pope = [c for s in POPE_SETTINGS for c in pope_cases(world_cfg, n + n % 2, seed, s, heldout=heldout)]
    return {
        "world": world if isinstance(world, str) else dataclasses.asdict(world),
        "scenes": f"evaluation streams of seed {EVAL_SEED + seed} (data.vqa.EVAL_SEED + {seed}), unseen in training",
        "heldout_pairs": [" ".join(p) for p in heldout],
        "vqa": score_vqa(vqa, batched(answer_fn, vqa, batch_size, True)),
        "captions": score_captions(captions, batched(caption_fn, captions, batch_size, False), world_cfg),
        "pope": score_pope(pope, batched(answer_fn, pope, batch_size, True)),
    }
