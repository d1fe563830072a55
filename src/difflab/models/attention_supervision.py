"""Attention supervision: each object phrase's cross-attention sent to its object's mask (TokenCompose).

Wang et al. (2024), "TokenCompose: Text-to-Image Diffusion with Token-level Supervision" (CVPR), Sec. 3,
fine-tune a text-to-image UNet with its denoising loss plus two *grounding* terms on the cross-attention
probabilities of the noun tokens of the caption. Glossary (one cross-attention layer at side s):

==================  =================================================================================
``A[p, j]``         ``probs``: softmax over tokens j of pixel p's query, averaged over heads; in [0, 1]
``M_j``             binary target of supervised token j at side s (its phrase's object(s) visible there)
``L_token``         ``(1 - sum_{p in M_j} A[p, j] / sum_p A[p, j])^2``: the share of token j's attention
                    outside its object, squared; averaged over a phrase's tokens, then over phrases
``L_pixel``         ``BCE(sum_{j in phrase} A[:, j], M)``: the phrase's attention at every pixel, read as
                    the probability that the pixel shows the object
``L``               ``L_LDM + lambda L_token + beta L_pixel``, lambda = 1e-3, beta = 5e-5 (the paper's)
==================  =================================================================================

The toy world knows what TokenCompose buys with a POS tagger and Grounded-SAM: a caption is a structured
prompt, :func:`difflab.world.grounding.ground` names the objects of each mention, and the renderer's
instance mask is exact. The pieces, in the order a batch meets them:

1. :func:`phrase_tokens`: the token positions of each mention's words (size, colour, noun);
2. :func:`object_masks`, :func:`supervision_fields`, :class:`WithAttentionTargets`: the fixed-shape
   targets of one item (``token_mask_index`` (L,), ``target_masks`` (M, s, s));
3. :class:`CrossAttentionProbs`: every cross-attention layer's probabilities, with gradients, during the
   training forward pass;
4. :func:`grounding_loss` per layer, and :func:`make_supervised_loss_fn`: the recipe's diffusion loss plus
   ``weight`` times their mean.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from difflab.errors import DifflabError, check_choice
from difflab.models.recipe import make_loss_fn
from difflab.nn.attention import SpatialAttention
from difflab.text.tokenizer import normalize
from difflab.world.grounding import ground
from difflab.world.prompts import (
    NUMBER_WORDS,
    RELATIONS,
    Conjunction,
    Count,
    Exists,
    ObjectSpec,
    Prompt,
    Relation,
)
from difflab.world.render import render
from difflab.world.scene import Scene, WorldConfig

TOKEN_WEIGHT = 1e-3
"""lambda of ``L_LDM + lambda L_token + beta L_pixel``, as Wang et al. (2024) train: the ``weight`` of
:func:`make_supervised_loss_fn` that reproduces the paper."""
PIXEL_WEIGHT = 5e-5 / TOKEN_WEIGHT
"""beta / lambda = 5e-5 / 1e-3: the pixel term's weight relative to the token term in
:func:`grounding_loss`, so that ``weight * grounding_loss`` is the paper's ``lambda L_token + beta L_pixel``."""

_EPS = 1e-12
"""Floor of the probabilities inside BCE's logarithms (log 1e-12 = -27.6)."""

LAYER_CHOICES: dict[str, tuple[str, ...]] = {
    "all": ("down", "mid", "up"),
    "mid_up": ("mid", "up"),
    "down": ("down",),
    "mid": ("mid",),
    "up": ("up",),
}
"""Which cross-attention layers are supervised, by UNet block. TokenCompose supervises the middle block
and the decoder of Stable Diffusion, not the encoder ('mid_up')."""


# ------------------------------------------------------------------------------------- tokens of phrases


def _pieces(prompt: Prompt) -> list[str | tuple[ObjectSpec, str, bool]]:
    """The prompt's text as it is written, in order: glue text, and noun phrases as (spec, determiner,
    plural). Mirrors each kind's ``text()``; :func:`phrase_tokens` checks the two agree word for word."""
    if isinstance(prompt, Exists):
        return [(prompt.spec, "a", False)]
    if isinstance(prompt, Count):
        return [(prompt.spec, NUMBER_WORDS[prompt.n], prompt.n != 1)]
    if isinstance(prompt, Relation):
        return [(prompt.a, "a", False), RELATIONS[prompt.relation], (prompt.b, "a", False)]
    if isinstance(prompt, Conjunction):
        if not prompt.parts:
            return [prompt.text()]  # 'an empty scene' mentions nothing
        pieces: list[str | tuple[ObjectSpec, str, bool]] = []
        for i, part in enumerate(prompt.parts):
            if i:  # join_and: 'a, b and c'
                pieces.append("," if i < len(prompt.parts) - 1 else "and")
            pieces.append((part, "a", False))
        return pieces
    raise DifflabError(
        f"prompt {prompt!r} is a {type(prompt).__name__}; expected Exists, Count, Relation or Conjunction"
    )


def phrase_tokens(prompt: Prompt, tokenizer, length: int) -> list[list[int]]:
    """For every mention of ``prompt`` in text order (as :func:`~difflab.world.grounding.ground` lists
    them), the positions in ``tokenizer.encode(prompt.text())``'s ids of the words that name the object:
    its size and colour adjectives and its noun ('a large red circle at the top left': 'large', 'red',
    'circle'; 'two red circles': 'red', 'circles'; a spec without a shape: 'object(s)').

    TokenCompose supervises the noun tokens (found by a POS tagger); the adjectives are added because they
    describe the same object, and binding a colour to the right object is what compositional prompts
    test. Determiners and number words ('a', 'two') and position phrases ('at the top left') are left
    out: they say how many or where, not what is drawn at the object's pixels.

    The positions come from walking the text's words piece by piece (a mention's own words, then the glue
    between mentions), so 'a circle and a circle' gives each circle its own word; the walk is checked to
    give exactly ``normalize(prompt.text())``, and the tokenizer to lay out one token per word after
    ``<bos>`` (a word-level tokenizer: word k is at position k + 1)."""
    words: list[str] = []
    mentions: list[list[int]] = []
    for piece in _pieces(prompt):
        if isinstance(piece, str):
            words += normalize(piece)
            continue
        spec, det, plural_form = piece
        phrase = normalize(spec.noun(det, plural_form))
        # the object's own words: size, colour, noun (the spec without its position, bare)
        named = normalize(ObjectSpec(spec.shape, spec.color, spec.size).noun(None, plural_form))
        first = len(phrase) - len(normalize(spec.noun(None, plural_form)))  # after the determiner
        if phrase[first : first + len(named)] != named:
            raise DifflabError(
                f"noun phrase {' '.join(phrase)!r} does not start with {' '.join(named)!r} after its determiner"
            )
        start = 1 + len(words) + first  # 1: <bos> is position 0
        mentions.append(list(range(start, start + len(named))))
        words += phrase
    text = prompt.text()
    if words != normalize(text):
        raise DifflabError(
            f"the words of {text!r} walked by mention are {' '.join(words)!r}; expected the text's own"
        )
    ids, mask = tokenizer.encode(text)
    if ids.shape[1] != length:
        raise DifflabError(
            f"the tokenizer lays texts out in {ids.shape[1]} columns; expected length {length}"
        )
    if int(mask[0].sum()) != len(words) + 2:
        raise DifflabError(
            f"the tokenizer splits {text!r} into {int(mask[0].sum()) - 2} tokens; expected one per word "
            f"({len(words)}): attention supervision needs a word-level tokenizer"
        )
    for positions in mentions:  # the layout promise, checked where it is used
        for p in positions:
            if tokenizer.decode([int(ids[0, p])]).strip() != words[p - 1]:
                raise DifflabError(f"token {p} of {text!r} is not the word {words[p - 1]!r}")
    return mentions


# ---------------------------------------------------------------------------------------------- targets


def object_masks(scene: Scene, world: WorldConfig, side: int) -> torch.Tensor:
    """Each object's visible mask, (K, side, side) float in [0, 1]: the share of each cell of a
    ``side`` x ``side`` grid where object k is what the renderer shows (``render(scene, world).mask``),
    i.e. the instance mask area-downsampled (average pooling) to an attention layer's side."""
    mask = render(scene, world).mask  # (H, W): 0 background, k + 1 object k
    h = mask.shape[0]
    if not isinstance(side, int) or side < 1 or h % side:
        raise DifflabError(
            f"side {side!r} is invalid; expected a positive divisor of the world's resolution {h}"
        )
    k = len(scene.objects)
    onehot = mask[None] == np.arange(1, k + 1)[:, None, None]  # (K, H, W)
    masks = torch.from_numpy(onehot.astype(np.float32))
    return F.avg_pool2d(masks[None], h // side)[0] if k else masks.new_zeros(0, side, side)  # (K, side, side)


def supervision_fields(
    prompt: Prompt, scene: Scene, world: WorldConfig, tokenizer, length: int, side: int, max_objects: int
) -> dict[str, torch.Tensor]:
    """The fixed-shape supervision of one captioned scene (the caption ``prompt`` must hold in it).

    Layout: slot m of ``"target_masks"`` (max_objects, side, side) is the target of mention m (text
    order): the union of the visible masks of the objects the mention names (one object, or all n of a
    count: 'two circles' -> both circles), area-downsampled as in :func:`object_masks`; unused slots are
    zero. ``"token_mask_index"`` (length,) int64 is m + 1 at the positions of mention m's words
    (:func:`phrase_tokens`) and 0 elsewhere (unsupervised: <bos>, determiners, glue, <eos>, padding). A
    mention of no object ('no crosses') is left unsupervised: there is nothing to attend to."""
    positions = phrase_tokens(prompt, tokenizer, length)
    groups = ground(prompt, scene)
    if len(groups) > max_objects:
        raise DifflabError(
            f"caption {prompt.text()!r} has {len(groups)} mentions; expected at most max_objects={max_objects}"
        )
    masks = object_masks(scene, world, side)  # (K, side, side)
    index = torch.zeros(length, dtype=torch.long)
    targets = torch.zeros(max_objects, side, side)
    for m, (tokens, objects) in enumerate(zip(positions, groups, strict=True)):
        if objects:
            # visible masks are disjoint (one instance per pixel): their sum is their union
            targets[m] = masks[list(objects)].sum(0).clamp(max=1.0)
            index[tokens] = m + 1
    return {"token_mask_index": index, "target_masks": targets}


class WithAttentionTargets(Dataset):
    """A :class:`~difflab.data.captioned.CaptionedScenes` built with a tokenizer, whose items also carry
    :func:`supervision_fields` of their caption: ``"token_mask_index"`` (L,) and ``"target_masks"``
    (max_objects, side, side), ``max_objects`` defaulting to the world's. Length and all other fields are
    the dataset's own."""

    def __init__(self, dataset, side: int, max_objects: int | None = None):
        if getattr(dataset, "tokenizer", None) is None:
            raise DifflabError(
                "the captioned dataset has no tokenizer; expected one built with tokenizer=..."
            )
        self.dataset, self.side = dataset, side
        self.max_objects = dataset.world.max_objects if max_objects is None else max_objects

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        scene = self.dataset.scene(i)
        caption = self.dataset.caption(i, scene)
        tokenizer = self.dataset.tokenizer
        fields = supervision_fields(caption.prompt, scene, self.dataset.world, tokenizer,
                                    tokenizer.context_length, self.side, self.max_objects)  # fmt: skip
        return item | fields


# ------------------------------------------------------------------------------------------------- loss


def _side(n: int) -> int:
    side = math.isqrt(n)
    if side * side != n:
        raise DifflabError(
            f"attention over {n} pixels is not a square feature map; expected side * side pixels"
        )
    return side


def grounding_loss(
    probs: torch.Tensor,
    token_mask_index: torch.Tensor,
    target_masks: torch.Tensor,
    *,
    pixel_weight: float = PIXEL_WEIGHT,
) -> torch.Tensor:
    """``L_token + pixel_weight * L_pixel`` of one cross-attention layer (Wang et al. 2024, Sec. 3).

    ``probs`` (B, N, L): head-averaged cross-attention probabilities at side s (N = s * s);
    ``token_mask_index`` (B, L) and ``target_masks`` (B, M, s', s') as :func:`supervision_fields` makes
    them. The targets are area-resized to s and made binary as the paper does (``M = resized > 0``: a cell
    that shows any of the object); a token whose target is empty at s (an object hidden behind others) is
    left out.

    - ``L_token``: per supervised token j, ``(1 - sum_{p in M_j} A[p, j] / sum_p A[p, j])^2``, averaged
      over a mention's tokens, then over the mentions of the batch. It is exactly 0 when every token's
      attention lies inside its mask (its map is any multiple of the mask, the normalised mask included).
    - ``L_pixel``: per mention, the binary cross-entropy between ``sum_{j in mention} A[:, j]`` and M,
      averaged over pixels, then over mentions. No further normalisation: softmax over tokens already
      makes ``A[p, j]`` the probability that pixel p attends to token j, and the paper applies BCE to it
      (summing the tokens of one word; here, of one phrase, so that the adjectives and the noun share one
      target instead of competing for it). It is exactly 0 when the phrase's map equals the binary mask:
      the phrase takes all the attention of its object's cells and none elsewhere.

    The paper's objective is ``L_LDM + lambda L_token + beta L_pixel`` with lambda = 1e-3, beta = 5e-5: the
    default ``pixel_weight`` is beta / lambda = 0.05, and :data:`TOKEN_WEIGHT` = lambda is the weight of
    the sum. A batch with no supervised token gives 0 (still part of the graph)."""
    probs = probs.float()  # the loss in float32, whatever precision the forward pass ran in
    if probs.ndim != 3:
        raise DifflabError(
            f"probs has shape {tuple(probs.shape)}; expected (B, N, L) head-averaged probabilities"
        )
    b, n, length = probs.shape
    side = _side(n)
    if token_mask_index.shape != (b, length):
        raise DifflabError(
            f"token_mask_index has shape {tuple(token_mask_index.shape)}; expected {(b, length)}"
        )
    if target_masks.ndim != 4 or target_masks.shape[0] != b:
        raise DifflabError(
            f"target_masks has shape {tuple(target_masks.shape)}; expected (B={b}, M, side, side)"
        )
    slots = target_masks.shape[1]
    targets = target_masks.to(probs)
    if targets.shape[-1] != side:
        targets = F.interpolate(targets, size=(side, side), mode="area")  # (B, M, s, s)
    binary = (targets > 0).to(probs).flatten(2)  # (B, M, N)
    index = token_mask_index.to(probs.device).long()
    if index.numel() and not 0 <= int(index.min()) <= int(index.max()) <= slots:
        raise DifflabError(
            f"token_mask_index has values {int(index.min())}..{int(index.max())}; expected 0..{slots}"
        )
    # membership[b, j, m] = 1 when token j is supervised with slot m and that target is not empty
    membership = F.one_hot(index, slots + 1)[..., 1:].to(probs)  # (B, L, M)
    membership = membership * (binary.sum(-1) > 0).to(probs)[:, None, :]
    tokens = membership.sum(1)  # (B, M): supervised tokens per mention
    mentions = tokens > 0
    if not mentions.any():
        return probs.sum() * 0.0
    attn = probs.transpose(1, 2)  # (B, L, N): token j's map over the pixels
    token_targets = membership @ binary  # (B, L, N): each token's mask, zero when unsupervised
    share = (attn * token_targets).sum(-1) / attn.sum(-1).clamp_min(torch.finfo(probs.dtype).tiny)  # (B, L)
    per_mention = ((1.0 - share) ** 2)[..., None] * membership  # (B, L, M)
    l_token = (per_mention.sum(1)[mentions] / tokens[mentions]).mean()
    phrase_maps = membership.transpose(1, 2) @ attn  # (B, M, N): the attention each phrase takes per pixel
    # BCE written out (F.binary_cross_entropy refuses autocast); the clamp bounds log 0 as BCELoss does,
    # and keeps a map that rounds above 1 finite
    bce = -(
        binary * phrase_maps.clamp_min(_EPS).log() + (1 - binary) * (1 - phrase_maps).clamp_min(_EPS).log()
    )
    bce = bce.mean(-1)  # (B, M)
    l_pixel = bce[mentions].mean()
    return l_token + pixel_weight * l_pixel


# ------------------------------------------------------------------------------------ recording probs


class LayerProbs(NamedTuple):
    name: str
    """The cross-attention module's name in the network ('down.3.1.cross_attn', 'mid_attn.cross_attn')."""
    side: int
    """Side of the layer's feature map: ``probs`` covers side * side pixels."""
    probs: torch.Tensor
    """(B, N, L): probabilities averaged over heads, still in the autograd graph."""


def _block(name: str) -> str | None:
    """The UNet block a module belongs to, read from its name: 'down', 'mid' or 'up'."""
    parts = name.split(".")
    for part, block in (("down", "down"), ("mid_attn", "mid"), ("up", "up")):
        if part in parts:
            return block
    return None


class CrossAttentionProbs:
    """Records, during a forward pass, the probabilities of every cross-attention layer of a network
    (``SpatialAttention.cross_attn``; self-attention and a text refiner's attention are not touched), with
    gradients, for a training loss. Unlike :class:`difflab.models.attention_maps.CrossAttentionMaps`
    (sampling, no_grad, averaged) it keeps each call of each layer separately in ``records``.

    While recording, those layers run the written-out softmax instead of the fused kernel (the same
    values to rounding, ~1e-7). ``layers`` picks blocks (:data:`LAYER_CHOICES`)."""

    def __init__(self, layers: str = "all"):
        self.blocks = LAYER_CHOICES[check_choice("attention layers", layers, LAYER_CHOICES)]
        self.records: list[LayerProbs] = []

    def _hook(self, name: str):
        def hook(probs: torch.Tensor) -> None:  # (B, heads, N, L)
            n = probs.shape[2]
            self.records.append(LayerProbs(name, _side(n), probs.mean(dim=1)))  # (B, N, L)

        return hook

    @contextlib.contextmanager
    def recording(self, network: torch.nn.Module):
        """Set the hooks of the chosen cross-attention layers of ``network``; ``records`` starts empty and
        fills with every call inside; the previous hooks are put back on exit."""
        layers = []
        for name, module in network.named_modules():
            if isinstance(module, SpatialAttention) and module.cross_attn is not None:
                block = _block(name)
                if block is None and self.blocks != LAYER_CHOICES["all"]:
                    raise DifflabError(
                        f"cannot tell which UNet block attention layer '{name}' is in; "
                        "expected down, mid_attn or up in its name"
                    )
                if block is None or block in self.blocks:
                    layers.append((f"{name}.cross_attn" if name else "cross_attn", module.cross_attn))
        if not layers:
            raise DifflabError(
                f"the network has no cross-attention layers in blocks {', '.join(self.blocks)}; "
                "expected a text-conditioned UNet"
            )
        previous = [attn.probs_hook for _, attn in layers]
        self.records = []
        for name, attn in layers:
            attn.probs_hook = self._hook(name)
        try:
            yield self
        finally:
            for (_, attn), hook in zip(layers, previous, strict=True):
                attn.probs_hook = hook


# ----------------------------------------------------------------------------------------- training loss


class _KeptCaptions:
    """The conditioner, passed through, remembering which captions of the last training batch it kept.

    Classifier-free guidance replaces a caption by the empty prompt with probability ``cond_drop``
    (``TextPrompts.for_training``, from the trainer's generator); the empty prompt's mask (<bos>, <eos>)
    differs from every caption's, so a sample was kept exactly when the context mask it was given is its
    own caption's. Nothing here draws from the generator: the recipe's draws are unchanged."""

    def __init__(self, conditioner):
        self.conditioner = conditioner
        self.kept: torch.Tensor | None = None

    def for_training(self, batch: dict, generator: torch.Generator, b: int, device) -> dict:
        kwargs = self.conditioner.for_training(batch, generator, b, device)
        mask = kwargs.get("context_mask")
        if mask is None:
            raise DifflabError(
                "the conditioner gives no context_mask; attention supervision needs text prompts"
            )
        self.kept = (mask == batch["mask"].to(mask.device)).all(dim=1)  # (B,)
        return kwargs

    def __getattr__(self, name: str):
        if name == "conditioner":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.conditioner, name)


def make_supervised_loss_fn(
    cfg,
    schedule,
    conditioner,
    codec,
    weight: float,
    layers: str = "all",
    *,
    pixel_weight: float = PIXEL_WEIGHT,
):
    """``loss_fn(network, batch, generator) -> (loss, metrics)``: the recipe's diffusion loss
    (:func:`difflab.models.recipe.make_loss_fn`, run as it is) plus ``weight`` times the mean over the
    recorded cross-attention layers (``layers``: :data:`LAYER_CHOICES`) of :func:`grounding_loss`, over
    the samples whose caption was not dropped for guidance. The batch needs the fields of
    :class:`WithAttentionTargets`. ``weight`` = :data:`TOKEN_WEIGHT` (1e-3) is TokenCompose's lambda.

    ``metrics["grounding"]`` is the mean grounding loss (a detached scalar tensor). With ``weight`` 0 the
    loss function is the recipe's own, bit for bit (fused attention kernel, nothing recorded, no
    grounding metric): a baseline run is exactly the baseline."""
    if not (math.isfinite(weight) and weight >= 0):
        raise DifflabError(f"grounding weight {weight} is invalid; expected a finite number >= 0")
    if weight == 0:
        return make_loss_fn(cfg, schedule, conditioner, codec)
    kept_captions = _KeptCaptions(conditioner)
    diffusion_loss_fn = make_loss_fn(cfg, schedule, kept_captions, codec)
    recorder = CrossAttentionProbs(layers)

    def loss_fn(network: torch.nn.Module, batch: dict, generator: torch.Generator):
        for key in ("token_mask_index", "target_masks"):
            if key not in batch:
                raise DifflabError(
                    f"the batch has no '{key}'; expected a dataset wrapped in WithAttentionTargets"
                )
        with recorder.recording(network):
            loss, metrics = diffusion_loss_fn(network, batch, generator)
        kept = kept_captions.kept
        index = batch["token_mask_index"].to(kept.device) * kept[:, None]  # (B, L); dropped: unsupervised
        grounding = torch.stack(
            [
                grounding_loss(r.probs, index, batch["target_masks"], pixel_weight=pixel_weight)
                for r in recorder.records
            ]
        ).mean()
        recorder.records = []  # free the graph's references once the loss holds them
        return loss + weight * grounding, {**metrics, "grounding": grounding.detach()}

    return loss_fn
