"""Conditioners: what a user asks a diffusion system for, turned into the network's keyword arguments.

Every conditioner answers two calls:

- ``for_training(batch, generator, b, device) -> kwargs``: the condition of a training batch, replaced by the
  null condition with probability ``cond_drop`` (drawn from the trainer's generator), so that one network
  learns both p(x|c) and p(x) for classifier-free guidance (Ho & Salimans 2022, Algorithm 1);
- ``condition(request, n, device, seed) -> (cond, null)``: the keyword arguments for ``n`` samples of a request
  (class labels, prompts) and the null condition (batch 1, broadcast) that guidance steers away from,
  or None for an unconditional model.

Systems add conditioners here (grounding tokens, control residuals, an input image on channels);
the recipe in :mod:`difflab.models.recipe` does not change.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from difflab.data.config import DataConfig, num_classes
from difflab.errors import DifflabError
from difflab.models.codecs import Latents
from difflab.models.layout import layout_fields, phrase_embeddings
from difflab.models.text_encoder import FrozenTextEncoder
from difflab.world.scene import Scene, WorldConfig


class Unconditional(nn.Module):
    """No condition: p(x)."""

    def for_training(self, batch: dict, generator: torch.Generator, b: int, device) -> dict:
        return {}

    def condition(self, request, n: int, device, seed: int = 0) -> tuple[dict, None]:
        if request is not None:
            raise DifflabError("this model is unconditional; it takes no class labels")
        return {}, None


class ClassLabels(nn.Module):
    """Class labels 0..classes-1, and ``classes`` itself as the null class (one extra embedding row)."""

    def __init__(self, classes: int, cond_drop: float):
        super().__init__()
        self.classes, self.cond_drop = classes, cond_drop

    def for_training(self, batch: dict, generator: torch.Generator, b: int, device) -> dict:
        labels = batch["label"].to(device).long()
        drop = torch.rand(b, generator=generator, device=device) < self.cond_drop
        return {"class_labels": torch.where(drop, torch.full_like(labels, self.classes), labels)}

    def condition(self, labels, n: int, device, seed: int = 0) -> tuple[dict, dict]:
        """``labels`` (N,), or None to cycle through all classes."""
        if labels is None:
            labels = torch.arange(n) % self.classes
        labels = torch.as_tensor(labels).long().to(device)
        bad = labels[(labels < 0) | (labels >= self.classes)]
        if bad.numel():
            raise DifflabError(f"class {int(bad[0])} is out of range; expected 0..{self.classes - 1}")
        null = torch.full((1,), self.classes, device=device, dtype=torch.long)
        return {"class_labels": labels}, {"class_labels": null}


def class_conditioner(data: DataConfig, cond_drop: float) -> ClassLabels | Unconditional:
    """The conditioner of an image dataset: its class labels, or none when it has none."""
    classes = num_classes(data)
    return Unconditional() if classes is None else ClassLabels(classes, cond_drop)


class TextPrompts(nn.Module):
    """Captions through a frozen text encoder (Rombach et al. 2022, Sec. 3.3): per-token features for
    cross-attention (``context``, ``context_mask``) and, with ``pooled``, the sentence embedding added to
    the time embedding (as SDXL). The null condition is the empty prompt ""."""

    def __init__(self, encoder: FrozenTextEncoder, cond_drop: float, pooled: bool):
        super().__init__()
        self.encoder, self.cond_drop, self.pooled = encoder, cond_drop, pooled
        self.null_ids, self.null_mask = encoder.tokenizer.encode("")  # (1, L) each

    def for_training(self, batch: dict, generator: torch.Generator, b: int, device) -> dict:
        return self.captions(batch, self.drops(generator, b, device), device)

    def drops(self, generator: torch.Generator, b: int, device) -> torch.Tensor:
        """(B,) True where a training caption is replaced by the empty prompt."""
        return torch.rand(b, generator=generator, device=device) < self.cond_drop

    def captions(self, batch: dict, drop: torch.Tensor, device) -> dict:
        """The network's keyword arguments for a batch's captions, "" where ``drop``."""
        drop = drop[:, None]  # (B, 1)
        ids = torch.where(drop, self.null_ids.to(device), batch["ids"])
        mask = torch.where(drop, self.null_mask.to(device), batch["mask"])
        enc = self.encoder.to(device).encode_ids(ids, mask)
        return {
            "context": enc.tokens,
            "context_mask": enc.mask,
            "pooled": enc.pooled if self.pooled else None,
        }

    def encode(self, texts: list[str]) -> dict:
        """The network's keyword arguments for ``texts``: context (B, L, width), context_mask (B, L) and,
        when the network takes it, pooled (B, E)."""
        enc = self.encoder(texts)
        cond = {"context": enc.tokens, "context_mask": enc.mask}
        if self.pooled:
            cond["pooled"] = enc.pooled
        return cond

    def condition(self, prompts, n: int, device, seed: int = 0) -> tuple[dict, dict]:
        check_prompts(prompts)
        return self.encode(list(prompts)), self.encode([""])


def check_prompts(prompts) -> None:
    if isinstance(prompts, str) or not prompts:
        raise DifflabError(f"prompts must be a non-empty list of strings; got {prompts!r}")


class Layouts(NamedTuple):
    """A grounded request: prompts and the layout (a scene) each is painted on."""

    prompts: list[str]
    scenes: list[Scene]


class GroundedPrompts(TextPrompts):
    """Captions plus a layout, GLIGEN's grounding input (Li et al. 2023, Sec. 3.1): each object's phrase
    embedding and box (:mod:`difflab.models.layout`), read by the network's grounding tokens. A request
    is prompts (laid out by ``planner(prompts, seed) -> scenes``, LMD's first stage) or :class:`Layouts`.
    Dropping a caption for guidance drops its layout too, so the null condition is "" with no objects."""

    def __init__(self, encoder: FrozenTextEncoder, cond_drop: float, pooled: bool, world: WorldConfig,
                 planner: Callable[[list[str], int], list[Scene]] | None = None):  # fmt: skip
        super().__init__(encoder, cond_drop, pooled)
        self.world, self.planner = world, planner
        self.register_buffer(
            "phrase_table", phrase_embeddings(encoder, world), persistent=False
        )  # (P, width)

    def for_training(self, batch: dict, generator: torch.Generator, b: int, device) -> dict:
        drop = self.drops(generator, b, device)
        return self.captions(batch, drop, device) | self.grounding(batch, device, drop)

    def grounding(self, fields: dict, device, drop: torch.Tensor | None = None) -> dict:
        """Layout fields (``g_phrase``, ``g_box``, ``g_mask``) -> the network's grounding arguments."""
        mask = fields["g_mask"].to(device)
        if drop is not None:
            mask = mask & ~drop[:, None]
        return {"grounding_phrases": self.phrase_table[fields["g_phrase"].to(device)],  # (B, M, width)
                "grounding_boxes": fields["g_box"].to(device), "grounding_mask": mask}  # fmt: skip

    def plan(self, prompts: list[str], seed: int = 0) -> Layouts:
        if self.planner is None:
            raise DifflabError("this grounded model has no planner; pass Layouts(prompts, scenes)")
        return Layouts(list(prompts), self.planner(list(prompts), seed))

    def condition(self, request, n: int, device, seed: int = 0) -> tuple[dict, dict]:
        if not isinstance(request, Layouts):
            check_prompts(request)
            request = self.plan(request, seed)
        fields = [layout_fields(s, self.world) for s in request.scenes]
        stacked = {k: torch.stack([f[k] for f in fields]) for k in fields[0]}
        cond = self.encode(request.prompts) | self.grounding(stacked, device)
        empty = layout_fields(Scene(()), self.world)
        null = self.encode([""]) | self.grounding({k: v[None] for k, v in empty.items()}, device)
        return cond, null


class Controls:
    """A controlled request: prompts (or :class:`Layouts`) and one condition image per prompt, ``hints``
    (N, C, S, S) in [0, 1]; ``scenes``, where the conditions were drawn from planned scenes, those scenes (to
    draw the layouts over the samples). Slices like a list, so it is sampled in batches as prompts are."""

    def __init__(self, request: list[str] | Layouts, hints: torch.Tensor, scenes: list[Scene] | None = None):
        n = len(request.prompts) if isinstance(request, Layouts) else len(request)
        if hints.ndim != 4 or hints.shape[0] != n:
            raise DifflabError(f"condition images of shape {tuple(hints.shape)} for {n} prompts; expected "
                               f"({n}, channels, side, side)")  # fmt: skip
        self.request, self.hints, self.scenes = request, hints, scenes

    def __len__(self) -> int:
        return self.hints.shape[0]

    def __getitem__(self, part: slice) -> Controls:
        r = self.request
        r = Layouts(r.prompts[part], r.scenes[part]) if isinstance(r, Layouts) else r[part]
        return Controls(r, self.hints[part], None if self.scenes is None else self.scenes[part])


class ControlledPrompts(nn.Module):
    """A base conditioner's condition plus a ControlNet's condition image, ``control_hint`` (Zhang et al.
    2023). Training drops the caption with the inner conditioner's ``cond_drop`` (the paper's 50 %, Sec.
    3.3, so the copy learns to read the image alone), never the image; guidance's null condition keeps the
    image too, since the image steers both halves and only the prompt is guided.

    ``planner(prompts, seed) -> Controls``, where given (a ControlNet on layouts), lets a request be plain
    prompts: each is laid out first and its layout becomes its condition image (LMD's first stage, Lian et
    al. 2023), as :class:`GroundedPrompts` plans for the grounding tokens."""

    def __init__(self, inner: TextPrompts, hint_channels: int, hint_side: int,
                 planner: Callable[[list[str], int], Controls] | None = None):  # fmt: skip
        super().__init__()
        self.inner, self.hint_shape, self.planner = inner, (hint_channels, hint_side, hint_side), planner

    def for_training(self, batch: dict, generator: torch.Generator, b: int, device) -> dict:
        return self.inner.for_training(batch, generator, b, device) | {
            "control_hint": batch["hint"].to(device)
        }

    def condition(self, request, n: int, device, seed: int = 0) -> tuple[dict, dict]:
        if not isinstance(request, Controls) and self.planner is not None:
            check_prompts(request)
            request = self.planner(list(request), seed)
        if not isinstance(request, Controls):
            raise DifflabError("a ControlNet run needs a condition image with each prompt; got "
                               f"{type(request).__name__}")  # fmt: skip
        if tuple(request.hints.shape[1:]) != self.hint_shape:
            raise DifflabError(f"condition images of shape {tuple(request.hints.shape[1:])}; expected "
                               f"{self.hint_shape} (channels, side, side)")  # fmt: skip
        cond, null = self.inner.condition(request.request, n, device, seed)
        hints = request.hints.to(device)
        return cond | {"control_hint": hints}, null | {"control_hint": hints}


class Instructions:
    """An editing request: instructions and one input image per instruction, ``images`` (N, C, S, S) in
    [-1, 1]. Slices like a list, so it is sampled in batches as prompts are."""

    def __init__(self, instructions: list[str], images: torch.Tensor):
        check_prompts(instructions)
        if images.ndim != 4 or images.shape[0] != len(instructions):
            raise DifflabError(f"input images of shape {tuple(images.shape)} for {len(instructions)} instructions; "
                               f"expected ({len(instructions)}, channels, side, side)")  # fmt: skip
        self.instructions, self.images = list(instructions), images

    def __len__(self) -> int:
        return len(self.instructions)

    def __getitem__(self, part: slice) -> Instructions:
        return Instructions(self.instructions[part], self.images[part])


class InstructedPrompts(nn.Module):
    """InstructPix2Pix's two conditions (Brooks et al. 2023, Sec. 3.2.1): the instruction through the base's
    text conditioner, and the input image's latents ``edit_image`` (the codec's encoding, as the noisy
    latents are), which the network concatenates to its input. Training drops the instruction alone with
    probability ``drops[0]``, the image alone with ``drops[1]`` and both with ``drops[2]`` (the paper's 5 %
    each), so one network learns the three predictions that two-scale guidance mixes
    (:func:`~difflab.diffusion.guidance.instruct_guidance`). The null image is the zero latent.

    ``condition`` returns the image-kept null (the empty prompt with the image), i.e. guidance of the text
    alone (s_I = 1); :meth:`null_image` is the other null for two-scale guidance."""

    def __init__(self, inner: TextPrompts, codec: nn.Module, image_shape: tuple[int, int, int],
                 drops: tuple[float, float, float]):  # fmt: skip
        super().__init__()
        if inner.__class__ is not TextPrompts:
            raise DifflabError(
                f"an instructed editor reads its instruction as plain text; got {type(inner).__name__}"
            )
        self.inner, self.codec, self.image_shape, self.drops = inner, codec, tuple(image_shape), tuple(drops)

    def source(self, batch: dict, device) -> torch.Tensor:
        """A training batch's input images in the diffusion space: a latent codec's cached posterior mean
        (``source``), scaled as :meth:`Latents.encode` scales it, or the codec's encoding of pixels."""
        x = batch["source"].to(device)
        return x * self.codec.scale if isinstance(self.codec, Latents) else self.codec.encode(x)

    def for_training(self, batch: dict, generator: torch.Generator, b: int, device) -> dict:
        u = torch.rand(b, generator=generator, device=device)
        text_only, image_only, both = self.drops
        drop_text = (u < text_only) | ((u >= text_only + image_only) & (u < text_only + image_only + both))
        drop_image = (u >= text_only) & (u < text_only + image_only + both)
        image = self.source(batch, device)
        image = torch.where(drop_image[:, None, None, None], torch.zeros_like(image), image)
        return self.inner.captions(batch, drop_text, device) | {"edit_image": image}

    def condition(self, request, n: int, device, seed: int = 0) -> tuple[dict, dict]:
        if not isinstance(request, Instructions):
            raise DifflabError(f"an instructed editor needs an input image with each instruction; got "
                               f"{type(request).__name__}")  # fmt: skip
        cond, null = self.inner.condition(request.instructions, n, device, seed)
        image = self.codec.encode(request.images.to(device))
        return cond | {"edit_image": image}, null | {"edit_image": image}

    def null_image(self, device) -> dict:
        """The image's null condition: the zero latent (batch 1, broadcast by guidance)."""
        return {"edit_image": torch.zeros(1, *self.image_shape, device=device)}
