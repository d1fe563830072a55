"""The Querying Transformer of BLIP-2 (Li et al. 2023, "BLIP-2: Bootstrapping Language-Image Pre-training
with Frozen Image Encoders and Large Language Models", Sec. 3.1-3.2, Fig. 2) and its instruction-aware
use in InstructBLIP (Dai et al. 2023, Sec. 2.3, Fig. 3).

    image features (B, N, d_vision)   a frozen ViT's patch features, LayerNormed on the way in (BLIP-2's
                                      ``ln_vision``: a pre-LN encoder's inner layers are not normalised)
    queries (Q, width)                learned, shared by every image
    text ids (B, L)                   own token embeddings + learned positions; position 0 is ``<bos>``,
                                      BLIP-2's [CLS] (ITC, ITM) or, for ITG, a learned [DEC] in its place

    [queries; text] (B, Q + L, width) -> depth blocks, each:
        shared self-attention over queries and text, under the objective's mask (below)
        cross-attention to the image, queries only, in blocks 0, cross_every, 2 cross_every, ...
        (BLIP-2 inserts it "every other transformer block", at the even blocks of its released model)
        feed-forward: a separate one for the queries and for the text
    -> LayerNorm -> query outputs (B, Q, width), text outputs (B, L, width)

**Separate feed-forwards**, as BLIP-2 does (its image and text transformers "share the same self-attention
layers"; the released model gives the queries their own intermediate/output layers): queries summarise an
image and text tokens model language, so each side's MLP fits its own kind of token, and self-attention is
where the two meet. The cost is one more MLP per block.

**Cross-attention at blocks 0, cross_every, ...** (the released model's placement, not 1, 3, 5, ...): the
image reaches the queries in the first block, so every later self-attention lets the text read
image-informed queries. Counting the other way, a 2-block Q-Former would cross-attend only in its last
block, after the text's last look at the queries, and ITG would train a language model blind to the image.

**The self-attention masks of Fig. 2 (right)**, :func:`self_attention_mask`; True = may attend:

    ITC  uni-modal             queries see queries, text sees text: the two sides are encoded apart
                               and compared only by their features (contrastive, Sec. 3.2)
    ITG  multimodal causal     queries see queries only; text token j sees every query and text <= j
                               (the queries must carry all the image information the text needs)
    ITM  bidirectional         everything sees everything (a cross-encoder judging one pair)

Text padding is masked as a key everywhere. Pre-LN blocks, as the rest of difflab, where BLIP-2's BERT
is post-LN: trained from scratch, a pre-LN stack needs no warmup (:mod:`difflab.nn.transformer`).

The query outputs are the connector's visual tokens (:meth:`QFormer.encode_image`); the VLM maps them into
the LM's width with one ``nn.Linear(width, d_lm)`` (BLIP-2's fully-connected layer, Fig. 3), which is not
part of this module. The three stage-1 losses are functions at the end of this file.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import MAX_SIZE, DifflabError, check_choice, check_float, check_int
from difflab.nn.attention import MultiHeadAttention
from difflab.nn.flamingo import FeedForward, check_heads
from difflab.nn.transformer import causal_padding_mask

MASK_KINDS = ("itc", "itg", "itm")
MAX_LOGIT_SCALE = 100.0
"""1 / temperature is capped as CLIP caps it (Radford et al. 2021, Sec. 2.5), against instability."""


def self_attention_mask(kind: str, num_queries: int, text_mask: torch.Tensor) -> torch.Tensor:
    """The self-attention mask of objective ``kind`` ('itc', 'itg', 'itm'; Fig. 2 right) over
    [queries; text]: (B, Q + L, Q + L) bool, True where row (query side) may attend to column (key).

    ``text_mask`` (B, L) is True on real text tokens. Every row keeps its own diagonal, so a padded text
    row (whose output is never read) still attends to something and its softmax stays finite.
    """
    kind = check_choice("Q-Former objective", kind, MASK_KINDS)
    check_int("num_queries", num_queries, 1, MAX_SIZE)
    text = text_mask.bool()
    b, length = text.shape
    q, device = num_queries, text.device
    mask = torch.zeros(b, q + length, q + length, dtype=torch.bool, device=device)
    mask[:, :q, :q] = True  # queries see queries, whatever the objective
    real = text[:, None, :]  # (B, 1, L): the real text keys
    if kind == "itm":
        mask[:, :q, q:] = real  # queries see the text ...
        mask[:, q:, :q] = True  # ... text sees the queries
        mask[:, q:, q:] = real  # ... and all of the text
    elif kind == "itg":
        mask[:, q:, :q] = True  # text sees every query ...
        mask[:, q:, q:] = causal_padding_mask(text)  # ... and the text up to itself: (B, L, L)
    else:  # itc: text sees text only, bidirectionally (BLIP-2's unimodal text encoder is BERT's)
        mask[:, q:, q:] = real
    return mask | torch.eye(q + length, dtype=torch.bool, device=device)


class _QFormerBlock(nn.Module):
    """Shared self-attention, cross-attention for the queries (when ``cross``), separate feed-forwards."""

    def __init__(self, width: int, heads: int, d_vision: int, cross: bool, ff_mult: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = MultiHeadAttention(width, heads)
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.cross_attn = MultiHeadAttention(width, heads, context_dim=d_vision) if cross else None
        self.query_ffw = FeedForward(width, ff_mult)
        self.text_ffw = FeedForward(width, ff_mult)

    def forward(
        self, x: torch.Tensor, image: torch.Tensor, mask: torch.Tensor | None, q: int
    ) -> torch.Tensor:
        x = x + self.self_attn(self.norm_self(x), mask=mask)  # (B, Q + L, W)
        queries, text = x[:, :q], x[:, q:]  # (B, Q, W), (B, L, W)
        if self.cross_attn is not None:  # the only path from the image into the Q-Former
            queries = queries + self.cross_attn(self.norm_cross(queries), image)
        queries = queries + self.query_ffw(queries)
        if text.shape[1]:
            text = text + self.text_ffw(text)
        return torch.cat([queries, text], dim=1)


class QFormer(nn.Module):
    """BLIP-2's Q-Former (see the module docstring): ``num_queries`` learned queries read image features
    (B, N, d_vision) and share self-attention with text of up to ``context_length`` tokens.

    - :meth:`encode_image` (features[, instruction]) -> query outputs (B, Q, width): the visual tokens.
    - :meth:`forward` (features, ids, mask, kind) -> (query outputs (B, Q, width), text outputs (B, L, width)).
    - :meth:`itg_logits` -> (B, L, vocab_size): the ITG language-model head on the text outputs.
    - :meth:`contrastive_embeddings` -> the unit-length ITC features; ``itm_head`` scores an ITM pair.

    ``embed_dim``: the width of the ITC features (BLIP-2: 256 from a 768-wide Q-Former); default ``width``.
    """

    def __init__(self, num_queries: int, width: int, depth: int, heads: int, d_vision: int, vocab_size: int,
                 context_length: int, cross_every: int = 2, ff_mult: int = 4, *, embed_dim: int | None = None,
                 init_temperature: float = 0.07):  # fmt: skip
        super().__init__()
        self.num_queries = check_int("num_queries", num_queries, 1, MAX_SIZE)
        check_int("width", width, 1, MAX_SIZE)
        check_int("depth", depth, 1, MAX_SIZE)
        check_heads("Q-Former", width, heads)
        self.d_vision = check_int("d_vision", d_vision, 1, MAX_SIZE)
        self.vocab_size = check_int("vocab_size", vocab_size, 1, 2**20)
        self.context_length = check_int("context_length", context_length, 1, MAX_SIZE)
        self.cross_every = check_int("cross_every", cross_every, 1, MAX_SIZE)
        embed_dim = width if embed_dim is None else check_int("embed_dim", embed_dim, 1, MAX_SIZE)
        check_float("init_temperature", init_temperature, 1.0 / MAX_LOGIT_SCALE, None)

        self.queries = nn.Parameter(0.02 * torch.randn(num_queries, width))  # (Q, W), BERT's init scale
        self.token_embed = nn.Embedding(vocab_size, width)
        nn.init.normal_(self.token_embed.weight, std=0.02)
        self.pos_embed = nn.Parameter(0.01 * torch.randn(context_length, width))  # text positions only
        self.dec_embed = nn.Parameter(0.02 * torch.randn(width))  # ITG's [DEC], replacing <bos>'s embedding
        self.vision_norm = nn.LayerNorm(d_vision)
        self.blocks = nn.ModuleList(
            _QFormerBlock(width, heads, d_vision, i % cross_every == 0, ff_mult) for i in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab_size, bias=False)
        self.lm_head.weight = self.token_embed.weight  # tied, as BERT's (and BLIP-2's) LM head is
        self.image_proj = nn.Linear(width, embed_dim)  # ITC: BLIP-2's vision_proj
        self.text_proj = nn.Linear(width, embed_dim)  # ITC: BLIP-2's text_proj
        self.itm_head = nn.Linear(width, 2)  # ITM: (no match, match)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))  # log(1 / tau)

    # ------------------------------------------------------------------------------------------- inputs

    def _check(self, features: torch.Tensor, ids: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        if features.ndim != 3 or features.shape[-1] != self.d_vision:
            raise DifflabError(
                f"image features of shape {tuple(features.shape)} do not fit; expected (B, N, {self.d_vision})"
            )
        if ids is None:
            return
        if mask is None or ids.ndim != 2 or mask.shape != ids.shape or len(ids) != len(features):
            shape = None if mask is None else tuple(mask.shape)
            raise DifflabError(
                f"text ids {tuple(ids.shape)} and mask {shape} do not fit; expected both ({len(features)}, L)"
            )
        if not 1 <= ids.shape[1] <= self.context_length:
            raise DifflabError(
                f"{ids.shape[1]} text tokens do not fit the Q-Former; expected 1 to {self.context_length}"
            )

    def _embed_text(self, ids: torch.Tensor, decoder: bool) -> torch.Tensor:
        """(B, L) -> (B, L, W); ``decoder``: position 0 is the [DEC] token (BLIP-2 Sec. 3.2, ITG)."""
        x = self.token_embed(ids)  # (B, L, W)
        if decoder:
            x = torch.cat([self.dec_embed.expand(len(ids), 1, -1), x[:, 1:]], dim=1)
        return x + self.pos_embed[: ids.shape[1]]

    def _encode(self, features: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        image = self.vision_norm(features)  # (B, N, d_vision)
        for block in self.blocks:
            x = block(x, image, mask, self.num_queries)
        return self.norm(x)  # (B, Q + L, W)

    # ------------------------------------------------------------------------------------------- modes

    def encode_image(self, features: torch.Tensor, instruction_ids: torch.Tensor | None = None,
                     instruction_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """(B, N, d_vision) -> query outputs (B, Q, width), the visual tokens.

        With an instruction (B, L) (InstructBLIP, Sec. 2.3, Fig. 3), its tokens join the queries in
        self-attention, both ways (the ITM mask), so the queries extract what the instruction asks about;
        only the queries' outputs are returned."""
        queries = self.queries.expand(len(features), -1, -1)  # (B, Q, W)
        if instruction_ids is None:
            self._check(features, None, None)
            return self._encode(features, queries, None)
        self._check(features, instruction_ids, instruction_mask)
        x = torch.cat([queries, self._embed_text(instruction_ids, decoder=False)], dim=1)  # (B, Q + L, W)
        mask = self_attention_mask("itm", self.num_queries, instruction_mask)
        return self._encode(features, x, mask)[:, : self.num_queries]

    def forward(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                kind: str) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Image features (B, N, d_vision) and text (B, L) under objective ``kind``'s mask ->
        (query outputs (B, Q, width), text outputs (B, L, width))."""
        kind = check_choice("Q-Former objective", kind, MASK_KINDS)
        self._check(features, ids, mask)
        queries = self.queries.expand(len(features), -1, -1)  # (B, Q, W)
        x = torch.cat([queries, self._embed_text(ids, decoder=kind == "itg")], dim=1)  # (B, Q + L, W)
        out = self._encode(features, x, self_attention_mask(kind, self.num_queries, mask))
        return out[:, : self.num_queries], out[:, self.num_queries :]

    def itg_logits(self, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ITG: (B, L, vocab_size), position j's scores for text token j + 1 (see :func:`itg_loss`)."""
        return self.lm_head(self(features, ids, mask, "itg")[1])

    def contrastive_embeddings(self, features: torch.Tensor, ids: torch.Tensor,
                               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """ITC features, unit length: every query's (B, Q, embed_dim) and the text's [CLS] (B, embed_dim)."""
        queries, text = self(features, ids, mask, "itc")
        return F.normalize(self.image_proj(queries), dim=-1), F.normalize(self.text_proj(text[:, 0]), dim=-1)

    def scale(self) -> torch.Tensor:
        """1 / temperature, learned, capped at :data:`MAX_LOGIT_SCALE`; past the cap it gets no gradient."""
        return self.logit_scale.clamp(max=math.log(MAX_LOGIT_SCALE)).exp()


# ------------------------------------------------------------------------------------------------ losses


def itc_similarity(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """BLIP-2 Sec. 3.2: s(image i, text j) = max over queries q of <z_iq, t_j>, for query features
    (B_i, Q, E) and text features (B_t, E) -> (B_i, B_t)."""
    return torch.einsum("iqe,je->ijq", image_emb, text_emb).amax(dim=-1)  # (B_i, B_t, Q) -> (B_i, B_t)


def itc_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Image-text contrastive loss (BLIP-2 Sec. 3.2): the symmetric InfoNCE of CLIP (Radford et al. 2021,
    Fig. 3; :func:`difflab.models.clip.clip_loss`, which ``nn`` may not import) over the max-over-queries
    similarity of :func:`itc_similarity`, with pair i the right answer for image i and for text i:

        L = (CE(scale * S, diag) + CE(scale * S^T, diag)) / 2,   S = itc_similarity(image_emb, text_emb)
    """
    logits = logit_scale * itc_similarity(image_emb, text_emb)  # (B, B): row i = image i against every text
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def hard_negatives(itc_logits: torch.Tensor, generator: torch.Generator | None = None):
    """ITM's hard negatives as ALBEF (Li et al. 2021, Sec. 3.2) and BLIP-2 draw them from a batch of B pairs:
    for image i a text j != i with probability softmax(itc_logits[i]) (renormalised without i), for text j
    an image i != j by softmax over column j. ``itc_logits`` (B, B): the scaled ITC similarities.
    -> (negative text of each image (B,), negative image of each text (B,)), indices into the batch."""
    b = len(itc_logits)
    if b < 2:
        raise DifflabError(
            f"ITM draws its negatives from the batch; batch size {b} is too small, expected >= 2"
        )
    with torch.no_grad():
        # ALBEF's +1e-4 keeps every other item drawable when the softmax underflows.
        not_self = 1.0 - torch.eye(b, device=itc_logits.device)  # (B, B)
        text_weights = (itc_logits.float().softmax(dim=1) + 1e-4) * not_self  # row i: image i's texts
        image_weights = (itc_logits.float().T.softmax(dim=1) + 1e-4) * not_self  # row j: text j's images
        neg_text = torch.multinomial(text_weights, 1, generator=generator).squeeze(1)  # (B,)
        neg_image = torch.multinomial(image_weights, 1, generator=generator).squeeze(1)  # (B,)
    return neg_text, neg_image


def itm_loss(qformer: QFormer, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
             itc_logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
    """Image-text matching (BLIP-2 Sec. 3.2): is (image, text) a pair? A two-way linear head on the mean
    of the query outputs under the ITM mask (BLIP-2 averages the head's per-query logits: the same, by
    linearity), cross-entropy over the B pairs and 2B :func:`hard_negatives`, one per image and per text.

    Captions repeated within a batch can be drawn as negatives of each other (BLIP-2 masks its duplicates
    by image id; here the batch has no ids).
    """
    b = len(ids)
    neg_text, neg_image = hard_negatives(itc_logits, generator)
    all_features = torch.cat([features, features, features[neg_image]])  # (3B, N, d_vision)
    all_ids = torch.cat([ids, ids[neg_text], ids])  # (3B, L)
    all_mask = torch.cat([mask, mask[neg_text], mask])  # (3B, L)
    queries, _ = qformer(all_features, all_ids, all_mask, "itm")
    logits = qformer.itm_head(queries.mean(dim=1))  # (3B, 2)
    labels = torch.zeros(3 * b, dtype=torch.long, device=logits.device)
    labels[:b] = 1  # the B true pairs come first
    return F.cross_entropy(logits, labels)


def itg_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Image-grounded text generation (BLIP-2 Sec. 3.2): next-token cross-entropy, the logits at position j
    (B, L, V) scoring text token j + 1, over the real tokens after the first. Position 0's input is the
    [DEC] token that starts the decoder (:meth:`QFormer.itg_logits`); padding is never a target."""
    if ids.shape[1] < 2:
        raise DifflabError(
            f"ITG predicts the next token; {ids.shape[1]} text token(s) are too few, expected >= 2"
        )
    targets = ids[:, 1:].masked_fill(~mask[:, 1:].bool(), -100)  # (B, L - 1), -100: ignored
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=-100)  # logits (B, V, L - 1)


def stage1_losses(qformer: QFormer, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                  generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """BLIP-2's representation-learning stage (Sec. 3.2): the three losses of one batch of pairs, each
    under its own mask; BLIP-2 trains on their sum. ``{'itc', 'itm', 'itg'}``, scalars."""
    image_emb, text_emb = qformer.contrastive_embeddings(features, ids, mask)
    scale = qformer.scale()
    itc_logits = scale * itc_similarity(image_emb, text_emb)  # (B, B)
    return {
        "itc": itc_loss(image_emb, text_emb, scale),
        "itm": itm_loss(qformer, features, ids, mask, itc_logits.detach(), generator),
        "itg": itg_loss(qformer.itg_logits(features, ids, mask), ids, mask),
    }
