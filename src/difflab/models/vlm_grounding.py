"""Grounding a VLM's attention: the words that name an object sent to that object's visual tokens.

The failure this answers (docs/vlm.md, "Where is the diamond?"): LLaVA-style models on the toy world read
every object's place (one-object scenes: all right) but answer "where is the diamond?" in a two-object scene
with the other object's place half the time: the LM never learns to attend from a named object to its visual
tokens, although one attention readout trained on the same frozen features finds it (0.85 of two-object
scenes after a few hundred steps). Grounded VLMs learn this from region-annotated data (Kosmos-2, Peng et al.
2023; Shikra, Chen et al. 2023). Here the renderer's instance masks give the same supervision, applied to
attention as TokenCompose does for a text-to-image UNet (Wang et al. 2024, Sec. 3;
:mod:`difflab.models.attention_supervision`), with the roles turned round:

==================  ===============================================================================
queries             a question's phrase end ('diamond' in 'where is the red diamond ?': by causal
                    attention it has read the whole phrase); a caption mention's size, colour and noun
                    (:func:`~difflab.models.attention_supervision.phrase_tokens`); in LM blocks >= 1
keys                the K visual tokens (LLaVA's pooled patch grid, row-major)
``A[j, k]``         its attention to visual token k, averaged over heads, renormalised over the K
M_j                 the visual tokens its object covers (any of it: ``object_masks(...) > 0``); a
                    count's mention ('two circles'), all of its objects'
``L_token``         ``(1 - sum_{k in M_j} A[j, k] / sum_k A[j, k])^2``, TokenCompose's token loss
``L``               ``L_LM + grounding * mean over blocks of L_token``
==================  ===============================================================================

Colour, shape and position questions name exactly one object. Counts and existence probes may name several or
none: a count is grounded on the objects it counts, an existence probe ('is there a red square ?') on the
objects of its shape, the word its phrase ends on, whether or not the colour is theirs: the 'no' beside a
blue square is read on the square (POPE's adversarial probes are such swaps, docs/vlm.md); neither is
supervised where its objects are absent. Captions bind words to objects the same way questions do: without their
own grounding, 43 of 58 wrong shapes in a grounded-questions model's captions were the other object's
(docs/vlm.md). The model, its inputs and its sampling are unchanged: the masks are a training signal only,
and every evaluation reads pixels alone.

Where the supervised tokens sit in a training row (``<bos> q1 a1 <eos> q2 a2 <eos> ...``) is read from the row's
labels: each turn's target starts a run of labelled tokens, so a token is stored as (turn, offset from its
turn's target start): -2 for a question's phrase end (before '?'), k - 1 for caption word k.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import Dataset

from difflab.data.vqa import VQAScenes, collate
from difflab.errors import DifflabError
from difflab.models.attention_supervision import grounding_loss, object_masks, supervision_fields
from difflab.models.vlm_network import IGNORE
from difflab.nn.gpt import GPT
from difflab.world.parse import parse_caption, parse_question
from difflab.world.prompts import ObjectSpec, matches
from difflab.world.scene import WorldConfig

GROUNDED_KINDS = ("color", "shape", "position")
"""The question kinds that name exactly one object (:func:`difflab.world.language.answer`)."""
SET_KINDS = ("count", "existence")
"""The question kinds about a set of objects, maybe empty (:func:`question_mask`)."""
GROUNDABLE = (*GROUNDED_KINDS, *SET_KINDS, "caption")
"""What ``VLMConfig.grounding_kinds`` may name: those questions, and captions."""
DEFAULT_KINDS = (*GROUNDED_KINDS, "caption")
"""``VLMConfig.grounding_kinds`` unless set: the one-object questions and the captions."""
TOKENS_PER_MENTION = 3
"""A mention's supervised words: its size, colour and noun, at most."""
_UNUSED = -(10**6)
"""Offset of an unused token slot."""


def mentions_per_turn(world: WorldConfig) -> int:
    """Slots per turn: a caption mentions every object (a description) or two (a relation)."""
    return max(2, world.max_objects)


def question_mask(question: str, masks: torch.Tensor, scene) -> torch.Tensor | None:
    """The (side, side) target of a question's phrase end. ``masks`` (K, side, side): :func:`object_masks` of
    ``scene``. A colour, shape or position question (:data:`GROUNDED_KINDS`): the mask of the one object it
    names; a count: the union of the objects it counts; an existence probe: of the objects of its shape (its
    noun), so that the answer is read on them. None where a count or probe has no such objects."""
    parsed = parse_question(question)
    if parsed is None:
        raise DifflabError(f"'{question}' is not a question of the world; expected one of its question forms")
    spec = parsed.spec
    if parsed.kind == "existence" and spec.shape is not None:
        spec = ObjectSpec(shape=spec.shape)
    found = [k for k, o in enumerate(scene.objects) if matches(spec, o)]
    if parsed.kind in GROUNDED_KINDS and len(found) != 1:
        raise DifflabError(f"the question '{question}' names {len(found)} objects of its scene; expected one")
    return masks[found].amax(dim=0) if found else None


class WithObjectMasks(Dataset):
    """:class:`VQAScenes` items with their grounding, in slots of ``mentions_per_turn`` per turn (slot
    ``turn * M + m``): ``"ground"`` (turns * M, side, side), each slot's target (the share of each visual
    token's cell its object(s) cover; zeros: unsupervised), and ``"ground_at"`` (turns * M, 3), the offsets of
    its tokens from the turn's target start (:data:`_UNUSED` where none). Batch with :func:`collate_grounded`.
    ``tokenizer`` and ``length``: the LM's, to place a caption's words (:func:`phrase_tokens`); ``kinds``: the
    turns grounded (of :data:`GROUNDABLE`), the others left unsupervised."""

    def __init__(self, scenes: VQAScenes, side: int, tokenizer, length: int, kinds=DEFAULT_KINDS):
        self.scenes, self.side, self.tokenizer, self.length = scenes, side, tokenizer, length
        self.mentions = mentions_per_turn(scenes.world)
        self.kinds = frozenset(kinds)

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, j: int) -> dict:
        item = self.scenes[j]
        data, world, m = self.scenes.data, self.scenes.world, self.mentions
        scene = self.scenes.scenes.scene(j * data.turns // data.questions_per_scene)
        masks = object_masks(scene, world, self.side)  # (objects, side, side)
        texts = ([(item["question"], item["answer"], item["kind"])] if data.turns == 1
                 else list(zip(item["question"], item["answer"], item["kind"], strict=True)))  # fmt: skip
        ground = torch.zeros(len(texts) * m, self.side, self.side)
        at = torch.full((len(texts) * m, TOKENS_PER_MENTION), _UNUSED, dtype=torch.long)
        for t, (question, answer, kind) in enumerate(texts):
            if kind not in self.kinds:
                continue
            if kind == "caption":
                fields = supervision_fields(parse_caption(answer, world).prompt, scene, world, self.tokenizer,
                                            self.length, self.side, m)  # fmt: skip
                for k in range(m):
                    words = (
                        torch.nonzero(fields["token_mask_index"] == k + 1).flatten() - 1
                    )  # caption word 1 at 0
                    ground[t * m + k] = fields["target_masks"][k]
                    at[t * m + k, : len(words)] = words
            elif (target := question_mask(question, masks, scene)) is not None:
                ground[t * m] = target
                at[t * m, 0] = -2  # '... diamond ?' then the answer
        return {**item, "ground": ground, "ground_at": at}


def collate_grounded(items: list[dict]) -> dict:
    """:func:`difflab.data.vqa.collate` plus ``"ground"`` (B, slots, side, side) and ``"ground_at"`` (B, slots, 3)."""
    return {**collate(items), **{k: torch.stack([it[k] for it in items]) for k in ("ground", "ground_at")}}


def target_starts(labels: torch.Tensor) -> list[list[int]]:
    """Per row of ``labels`` (B, L), the first position of each turn's target: where a run of labelled
    tokens (a target and its ``<eos>``) begins."""
    on = labels != IGNORE  # (B, L)
    begins = on & ~torch.cat([torch.zeros_like(on[:, :1]), on[:, :-1]], dim=1)
    return [torch.nonzero(row).flatten().tolist() for row in begins]


def token_mask_index(labels: torch.Tensor, ground_at: torch.Tensor) -> torch.Tensor:
    """(B, L): slot s's tokens marked s + 1, every other token 0; with the slots' targets (``"ground"``), the
    layout of :func:`difflab.models.attention_supervision.grounding_loss`. ``ground_at`` (B, slots, 3) as
    :class:`WithObjectMasks` gives it."""
    b, slots, _ = ground_at.shape
    index = torch.zeros_like(labels)
    for row, starts in enumerate(target_starts(labels)):
        turns = len(starts)
        if slots % max(turns, 1) or not turns:
            raise DifflabError(
                f"row {row} has {turns} answers for {slots} grounding slots; expected a divisor"
            )
        per_turn = slots // turns
        for s in range(slots):
            offsets = ground_at[row, s][ground_at[row, s] != _UNUSED]
            index[row, starts[s // per_turn] + offsets] = s + 1
    return index


class LMAttentionProbs:
    """Records, with gradients, the head-averaged attention probabilities (B, L, L) of chosen GPT blocks
    during a forward pass (those blocks run the written-out softmax instead of the fused kernel)."""

    def __init__(self, lm: GPT, blocks: list[int]):
        self.lm, self.blocks = lm, blocks
        self.records: list[torch.Tensor] = []

    @contextlib.contextmanager
    def recording(self):
        attns = [self.lm.blocks[i].attn for i in self.blocks]
        previous = [a.probs_hook for a in attns]
        self.records = []

        def hook(probs: torch.Tensor) -> None:  # (B, heads, L, L)
            self.records.append(probs.mean(dim=1))

        for a in attns:
            a.probs_hook = hook
        try:
            yield self
        finally:
            for a, p in zip(attns, previous, strict=True):
                a.probs_hook = p


def visual_grounding_loss(
    records: list[torch.Tensor], visual_tokens: int, index: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean over the recorded blocks of TokenCompose's ``L_token`` for text queries over the visual keys:
    ``records`` each (B, K + L, K + L) over the LM's whole sequence (K visual tokens first); ``index`` (B, L)
    from :func:`token_mask_index` and ``targets`` (B, slots, side, side), the slots' targets."""
    k = visual_tokens
    # (B, K, L): the visual keys in the place of TokenCompose's pixels, the text queries in that of its tokens
    losses = [grounding_loss(p[:, k:, :k].transpose(1, 2), index, targets, pixel_weight=0.0) for p in records]
    return torch.stack(losses).mean()
