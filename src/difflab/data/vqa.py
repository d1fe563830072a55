"""What the vision-language models (LLaVA, Flamingo, BLIP-2 on the toy world) train on and are judged on.

**Training** (:class:`VQAScenes`): scene i of a world, redrawn while it shows a held-out (colour, shape)
pair exactly as the text-to-image data are (:class:`~difflab.data.captioned.CaptionedScenes`), with
``questions_per_scene`` texts: item j is text ``j % q`` of scene ``j // q``. A text is a caption with
probability ``caption_prob`` - the image-to-caption task of LLaVA's first stage (Liu et al. 2023, "Visual
Instruction Tuning", Sec. 4.2) and of BLIP-2's generative pre-training (Li et al. 2023, Sec. 3.3) - and
otherwise a question with its answer, the instruction data of LLaVA's second stage. Every text is written
by the world's own language (:mod:`difflab.world.language`) from the item's random stream
``default_rng([seed, i, stream, k])``, so an item is a pure function of (config, j), the same in every
process and after a resume. Texts stay strings: tokenizing is the model's business. No question names a
held-out pair either ('is there an orange circle?' -> 'no' on every training image would teach that the
pair never exists, a prior the held-out score would then measure instead of generalisation).

**Evaluation** (:func:`vqa_cases`, :func:`caption_cases`, :func:`pope_cases`): scenes of the stream
``default_rng([EVAL_SEED + seed, i, set])``. Training scenes come from two-word streams ``[seed, i]``,
which numpy's seeding pads with zeros, and ``set`` is never zero, so no training set of any seed draws an
evaluation scene. Scenes showing a held-out pair are kept on purpose and flagged, to be scored apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from difflab.data.captioned import Caption, CaptionedScenes
from difflab.data.toy import scene_image
from difflab.errors import MAX_COUNT, DifflabError, check_choice, check_float, check_int, check_seed
from difflab.world.geneval import HELDOUT_PAIRS, mentions_heldout
from difflab.world.language import (
    QA,
    QUESTION_KINDS,
    Question,
    caption,
    describe,
    description,
    questions,
    swapped_pairs,
)
from difflab.world.prompts import ObjectSpec
from difflab.world.scene import Scene, WorldConfig, sample_scene, world_preset

VLM_CAPTIONS, VLM_QUESTIONS = 31, 32
"""The random streams of the training texts: which task and which caption (one per text), and the scene's
list of questions (one per scene, so that its questions are distinct)."""
EVAL_SEED = 50_021
"""Seed of the evaluation scenes (``EVAL_SEED + seed``); each set has its own stream beside it."""
_VQA_SET, _CAPTION_SET, _POPE_SET = 1, 2, 3
POPE_SETTINGS = ("random", "popular", "adversarial")


@dataclass(frozen=True, eq=False)  # eq=False: a tensor field has no truth value to compare by
class VQAItem:
    """One image and one text about it."""

    image: torch.Tensor
    """(3, S, S) float32 in [-1, 1], drawn as every dataset here draws (:func:`difflab.data.toy.scene_image`)."""
    scene: Scene
    question: str
    """The question, or '' for a caption (the model words its own request for one)."""
    answer: str
    """The answer, or the caption (in an evaluation set: the full description, the reference)."""
    kind: str
    """A question kind of :data:`difflab.world.language.QUESTION_KINDS`, or 'caption'."""
    heldout_pair: bool
    """Whether the scene shows a held-out (colour, shape) pair (never in training)."""

    @property
    def task(self) -> str:
        return "caption" if self.kind == "caption" else "vqa"


@dataclass(frozen=True, eq=False)
class POPECase(VQAItem):
    """A POPE probe: 'is there a <colour> <shape>?', 'yes' for a present object, 'no' for an absent one."""

    setting: str = "random"
    """How the absent object was chosen: one of :data:`POPE_SETTINGS`."""


# ------------------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class VQADataConfig:
    world: str = "scene32"
    """Toy-world preset of the training scenes."""
    n: int = 100_000
    """Scenes; the dataset has ``n * questions_per_scene`` items."""
    seed: int = 0
    questions_per_scene: int = 4
    """Texts drawn per scene (distinct questions where the scene allows; at most 100, as a scene of a few
    objects has only some dozens of distinct questions to ask)."""
    caption_prob: float = 0.25
    """Share of texts that are captions (task 'caption'); the rest are questions (task 'vqa')."""
    describe_prob: float = 0.5
    """Share of captions that are the scene's full description; the rest are random true captions of any
    style ('two green circles', 'a red circle to the left of a square', ...)."""
    heldout_pairs: tuple[str, ...] = tuple(f"{c} {s}" for c, s in HELDOUT_PAIRS)
    """'colour shape' pairs no training image shows and no training text names."""
    turns: int = 1
    """Texts per training item: 1, or a conversation of ``turns`` texts about one image, as LLaVA's
    instruction data are multi-turn conversations (Liu et al. 2023, "Visual Instruction Tuning", Sec. 3 and
    Table 2; Sec. 4.2: the loss is on every answer of the conversation). One image forward then teaches
    ``turns`` answers. A divisor of ``questions_per_scene``: item j is texts ``j * turns ...`` of one scene."""
    existence_swaps: float = 0.0
    """Share of the existence questions answered 'no' that ask an attribute swap of the scene ('is there a
    red square?' beside a red circle and a blue square; :func:`~difflab.world.language.swapped_pairs`), the
    hard negatives of LRV-Instruction (Liu et al. 2023). 0: every absent pair is drawn at random, and a
    two-object scene's swaps are then about 2 of the 38 absent pairs."""

    def __post_init__(self) -> None:
        world = world_preset(self.world)
        check_int("n", self.n, 1, MAX_COUNT)
        check_seed("seed", self.seed)
        check_int("questions_per_scene", self.questions_per_scene, 1, 100)
        check_float("caption_prob", self.caption_prob, 0.0, 1.0)
        check_float("describe_prob", self.describe_prob, 0.0, 1.0)
        check_float("existence_swaps", self.existence_swaps, 0.0, 1.0)
        check_int("turns", self.turns, 1, 100)
        if self.questions_per_scene % self.turns:
            raise DifflabError(f"turns {self.turns} does not divide questions_per_scene "
                               f"{self.questions_per_scene}; expected a divisor, so that a conversation is "
                               "about one scene")  # fmt: skip
        for pair in self.heldout_pairs:
            words = pair.split()
            if len(words) != 2 or words[0] not in world.colors or words[1] not in world.shapes:
                raise DifflabError(
                    f"held-out pair '{pair}' is invalid; expected 'colour shape' with a colour of "
                    f"{', '.join(world.colors)} and a shape of {', '.join(world.shapes)}"
                )

    def world_config(self) -> WorldConfig:
        return world_preset(self.world)

    def pairs(self) -> tuple[tuple[str, str], ...]:
        """The held-out pairs as (colour, shape) tuples."""
        return tuple(tuple(p.split()) for p in self.heldout_pairs)


def captioner(data: VQADataConfig):
    """The full description with probability ``describe_prob``, else a random true caption."""

    def caption_of(scene: Scene, rng: np.random.Generator) -> Caption:
        if rng.random() < data.describe_prob:
            prompt = description(scene)
            return Caption(prompt.text(), prompt)
        return Caption(*caption(scene, rng))

    return caption_of


def _names_pair(spec: ObjectSpec, pairs) -> bool:
    return (spec.color, spec.shape) in pairs


class VQAScenes(Dataset):
    """Item j: ``{"image", "task", "question", "answer", "kind"}`` (strings but the image; see the module
    docstring); :meth:`item` gives text j as a :class:`VQAItem`, with its scene. With ``turns`` > 1, item j
    is a conversation: each text field a tuple of its ``turns`` texts (texts ``j * turns ...``); batch such
    items with :func:`collate`."""

    def __init__(self, data: VQADataConfig):
        self.data, self.world = data, data.world_config()
        self._pairs = set(data.pairs())
        self.scenes = CaptionedScenes(self.world, data.n, data.seed, captioner(data), stream=VLM_CAPTIONS,
                                      heldout=data.pairs())  # fmt: skip

    def __len__(self) -> int:
        return self.texts // self.data.turns

    @property
    def texts(self) -> int:
        """How many texts the data hold (``n * questions_per_scene``), in items of ``turns`` texts."""
        return self.data.n * self.data.questions_per_scene

    def scene_questions(self, i: int, scene: Scene) -> list[QA]:
        """The ``questions_per_scene`` question/answer pairs of scene ``i``, none naming a held-out pair."""
        q = self.data.questions_per_scene
        rng = np.random.default_rng([self.data.seed, i, VLM_QUESTIONS])
        # Twice as many as needed, so that dropping those naming a held-out pair still leaves distinct ones.
        asked = [
            qa
            for qa in questions(scene, rng, 2 * q, self.world, swaps=self.data.existence_swaps)
            if not _names_pair(qa.struct.spec, self._pairs)
        ]
        if not asked:
            raise DifflabError(f"no question about scene {i} avoids the held-out pairs; this is a bug")
        return [asked[k % len(asked)] for k in range(q)]

    def text(self, j: int) -> tuple[str, str, str]:
        """Text ``j``'s (question, answer, kind) without drawing its image: ('', caption, 'caption') or a
        question of a kind of :data:`QUESTION_KINDS`."""
        if not 0 <= j < self.texts:
            raise IndexError(f"text {j} is out of range; expected 0..{self.texts - 1}")
        i, k = divmod(j, self.data.questions_per_scene)
        scene = self.scenes.scene(i)
        rng = np.random.default_rng([self.data.seed, i, VLM_CAPTIONS, k])
        if rng.random() < self.data.caption_prob:
            return "", self.scenes.captioner(scene, rng).text, "caption"
        question, answer, kind, _ = self.scene_questions(i, scene)[k]
        return question, answer, kind

    def item(self, j: int) -> VQAItem:
        question, answer, kind = self.text(j)
        scene = self.scenes.scene(j // self.data.questions_per_scene)
        return VQAItem(scene_image(scene, self.world), scene, question, answer, kind, heldout_pair=False)

    def __getitem__(self, j: int) -> dict:
        t = self.data.turns
        if t == 1:
            it = self.item(j)
            return {"image": it.image, "task": it.task, "question": it.question, "answer": it.answer,
                    "kind": it.kind}  # fmt: skip
        if not 0 <= j < len(self):
            raise IndexError(f"item {j} is out of range; expected 0..{len(self) - 1}")
        question, answer, kind = zip(*(self.text(j * t + k) for k in range(t)), strict=True)
        return {"image": scene_image(self.scenes.scene(j * t // self.data.questions_per_scene), self.world),
                "task": tuple("caption" if k == "caption" else "vqa" for k in kind), "question": question,
                "answer": answer, "kind": kind}  # fmt: skip


def collate(items: list[dict]) -> dict:
    """A batch of :class:`VQAScenes` items: images stacked (B, 3, S, S), every text field a list of B values
    (strings, or a conversation's tuples), kept per item where torch's default collate would transpose them."""
    return {"image": torch.stack([it["image"] for it in items]),
            **{k: [it[k] for it in items] for k in ("task", "question", "answer", "kind")}}  # fmt: skip


# ------------------------------------------------------------------------------------------ evaluation


def _world(world: WorldConfig | str) -> WorldConfig:
    return world_preset(world) if isinstance(world, str) else world


def eval_scene(world: WorldConfig, seed: int, which: int, i: int) -> Scene:
    """Scene ``i`` of evaluation set ``which`` (a stream no training set draws: see the module docstring)."""
    return sample_scene(np.random.default_rng([EVAL_SEED + seed, i, which]), world)


def vqa_scene(world: WorldConfig, seed: int, i: int) -> Scene:
    """Scene ``i`` of the VQA set of seed ``seed`` (what :func:`vqa_cases` and the app's Ask tab draw)."""
    return eval_scene(world, seed, _VQA_SET, i)


def vqa_question_rng(seed: int, i: int) -> np.random.Generator:
    """The random stream of the question :func:`vqa_cases` asks of scene ``i`` of seed ``seed``."""
    return np.random.default_rng([EVAL_SEED + seed, i, _VQA_SET, 1])


def vqa_cases(world: WorldConfig | str, n: int, seed: int = 0, *, heldout=HELDOUT_PAIRS) -> list[VQAItem]:
    """``n`` questions, kind ``QUESTION_KINDS[j % 5]`` for case j (balanced), each about its own scene of
    the VQA set; a scene where that kind cannot be asked (two objects alike but for their place cannot be
    asked the place of) is skipped. Flagged by whether the scene shows a ``heldout`` pair."""
    world, pairs = _world(world), set(map(tuple, heldout))
    check_int("number of VQA cases", n, 1, MAX_COUNT)
    cases: list[VQAItem] = []
    i = 0
    while len(cases) < n:
        if i > 100 * n:
            raise DifflabError(f"could not ask {n} questions of world {world}; expected askable scenes")
        kind = QUESTION_KINDS[len(cases) % len(QUESTION_KINDS)]
        scene = vqa_scene(world, seed, i)
        rng = vqa_question_rng(seed, i)
        asked = questions(scene, rng, 1, world, kinds=(kind,))
        i += 1
        if asked:
            question, answer, kind, _ = asked[0]
            cases.append(VQAItem(scene_image(scene, world), scene, question, answer, kind,
                                 mentions_heldout(scene, pairs)))  # fmt: skip
    return cases


def caption_cases(world: WorldConfig | str, n: int, seed: int = 0, *, heldout=HELDOUT_PAIRS) -> list[VQAItem]:
    """``n`` scenes of the caption set, each with its full description as the reference caption."""
    world, pairs = _world(world), set(map(tuple, heldout))
    check_int("number of caption cases", n, 1, MAX_COUNT)
    scenes = [eval_scene(world, seed, _CAPTION_SET, i) for i in range(n)]
    return [
        VQAItem(scene_image(s, world), s, "", describe(s), "caption", mentions_heldout(s, pairs))
        for s in scenes
    ]


def _absent_pair(scene: Scene, world: WorldConfig, setting: str, heldout: set, rng: np.random.Generator):
    """An absent (colour, shape) pair of ``world`` chosen by POPE's ``setting`` (see :func:`pope_cases`)."""
    present = {(o.color, o.shape) for o in scene.objects}
    absent = [(c, s) for s in world.shapes for c in world.colors if (c, s) not in present]
    if setting == "popular":
        absent = [p for p in absent if p not in heldout] or absent
    elif setting == "adversarial":
        absent = swapped_pairs(scene, world.colors, world.shapes)
    return absent[int(rng.integers(len(absent)))]


def pope_cases(world: WorldConfig | str, n: int, seed: int = 0, setting: str = "random", *,
               heldout=HELDOUT_PAIRS) -> list[POPECase]:  # fmt: skip
    """``n`` POPE probes (Li et al. 2023, "Evaluating Object Hallucination in Large Vision-Language
    Models"): scene i of the POPE set gives 'is there a <colour> <shape>?' about one of its objects
    (answer 'yes') and about an absent pair (answer 'no'), so the set is balanced. The text is the world's
    own existence question (:class:`difflab.world.language.Question`), the form the model trained on.

    The three settings share the scenes and the present probes and differ in the absent pair:

    - 'random': uniform over the world's pairs not in the scene (held-out pairs included).
    - 'popular': POPE asks about the objects most frequent in the training data. Here every seen pair is
      exactly as frequent as any other (colour and shape are drawn uniformly and independently, and the
      redraw removes held-out pairs wherever they fall), and the held-out pairs never occur: so the most
      frequent are all the seen pairs, and this draws uniformly among the absent seen ones. It differs
      from 'random' in never asking about a pair the model never saw.
    - 'adversarial': POPE asks about the objects that co-occur most with the present ones (a fork beside
      a dining table). Toy objects are drawn independently, so co-occurrence is flat and that rule would be
      'random' again. What a model of this world confuses instead is a shown colour on a shown shape: the
      absent pairs sharing the most attributes with what is shown are drawn uniformly - a present colour on
      another present shape (the attribute-binding swap, 'is there a red square?' beside a red circle and a
      blue square) where the scene allows, otherwise one present object with its colour or its shape
      changed (same shape other colour, or same colour other shape, whichever the draw falls on).
    """
    world, pairs = _world(world), set(map(tuple, heldout))
    check_choice("POPE setting", setting, POPE_SETTINGS)
    check_int("number of POPE probes", n, 2, MAX_COUNT)
    if n % 2:
        raise DifflabError(
            f"number of POPE probes {n} is odd; expected an even number (half 'yes', half 'no')"
        )
    cases: list[POPECase] = []
    for i in range(n // 2):
        scene = eval_scene(world, seed, _POPE_SET, i)
        image, flag = scene_image(scene, world), mentions_heldout(scene, pairs)
        pick = np.random.default_rng([EVAL_SEED + seed, i, _POPE_SET, 1])
        shown = scene.objects[int(pick.integers(len(scene.objects)))]
        rng = np.random.default_rng([EVAL_SEED + seed, i, _POPE_SET, 2 + POPE_SETTINGS.index(setting)])
        colour, shape = _absent_pair(scene, world, setting, pairs, rng)
        for spec, answer in ((ObjectSpec(shape=shown.shape, color=shown.color), "yes"),
                             (ObjectSpec(shape=shape, color=colour), "no")):  # fmt: skip
            cases.append(POPECase(image, scene, Question("existence", spec).text(), answer, "existence", flag,
                                  setting))  # fmt: skip
    return cases
