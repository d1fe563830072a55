"""What a vision-language model trains on: a batch's texts as the LM's rows, and its objective's loss.

- ``objective='lm'`` (every design): next-token cross-entropy on the answers and captions, never on the
  questions (LLaVA, Liu et al. 2023, Sec. 4.2; :meth:`VisionLanguageModel.loss`), over rows that are one text
  or a conversation (:func:`conversations`, :func:`difflab.models.vlm_network.encode_conversations`); plus
  ``grounding`` times the grounding loss of :mod:`difflab.models.vlm_grounding` when it is weighted.
- ``objective='qformer'``: BLIP-2's first stage (Li et al. 2023, Sec. 3.2), the Q-Former's three losses.
"""

from __future__ import annotations

import contextlib

import torch

from difflab.models import vlm_grounding
from difflab.models.vlm_network import CAPTION_PROMPT, VisionLanguageModel, encode_conversations
from difflab.nn.qformer import stage1_losses


def conversations(batch: dict) -> list[list[tuple[str, str]]]:
    """Each row's (prompt, target) turns: a question and its answer, or :data:`CAPTION_PROMPT` and a caption;
    one turn per row, or a conversation's (``data.turns``)."""
    rows = []
    for tasks, questions, answers in zip(batch["task"], batch["question"], batch["answer"], strict=True):
        if isinstance(tasks, str):  # one text per item
            tasks, questions, answers = (tasks,), (questions,), (answers,)
        rows.append([(CAPTION_PROMPT if t == "caption" else q, a)
                     for t, q, a in zip(tasks, questions, answers, strict=True)])  # fmt: skip
    return rows


def make_loss_fn(cfg, tokenizer):
    """``loss_fn(model, batch, generator)`` of a :class:`~difflab.models.vlm.VLMConfig`'s objective over
    ``tokenizer``'s rows (the LM's). (The config is not imported here: vlm.py imports this module.)"""
    if cfg.objective == "qformer":
        return _qformer_loss_fn(tokenizer)

    def loss_fn(model: VisionLanguageModel, batch: dict, generator: torch.Generator):
        rows = conversations(batch)
        ids, mask, labels = encode_conversations(tokenizer, rows)  # (B, longest row)
        device = batch["image"].device
        instruction = instruction_ids(tokenizer, [r[0][0] for r in rows], device) if cfg.instruct else None
        recorder = vlm_grounding.LMAttentionProbs(model.lm, list(range(1, len(model.lm.blocks))))
        with recorder.recording() if cfg.grounding else contextlib.nullcontext():
            lm_loss = model.loss(batch["image"], ids.to(device), mask.to(device), labels.to(device), instruction,
                                 average=cfg.loss_average)  # fmt: skip
        if not cfg.grounding:
            return lm_loss
        index = vlm_grounding.token_mask_index(labels, batch["ground_at"])
        g = vlm_grounding.visual_grounding_loss(recorder.records, cfg.visual_tokens, index.to(device),
                                                batch["ground"].to(device))  # fmt: skip
        return lm_loss + cfg.grounding * g, {"loss_lm": lm_loss.detach(), "loss_ground": g.detach()}

    return loss_fn


def _qformer_loss_fn(tokenizer):
    """BLIP-2's representation learning: image-text contrast, matching with hard negatives and image-grounded
    generation of the caption, summed (Sec. 3.2), on the frozen encoder's patch features."""

    def loss_fn(model: VisionLanguageModel, batch: dict, generator: torch.Generator):
        ids, mask = tokenizer.encode(list(batch["answer"]))  # the captions
        device = batch["image"].device
        losses = stage1_losses(model.connector, model.features(batch["image"]), ids.to(device), mask.to(device),
                               generator)  # fmt: skip
        return sum(losses.values()), {f"loss_{k}": v.detach() for k, v in losses.items()}

    return loss_fn


def instruction_ids(tokenizer, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the prompts on ``device``: what an instruction-aware Q-Former reads (InstructBLIP)."""
    ids, mask = tokenizer.encode(prompts)
    return ids.to(device), mask.to(device)
