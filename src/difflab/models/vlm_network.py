"""A vision-language model as one module: a vision encoder, a connector, and a language model, fused one of
two ways. Every design of the controlled comparison (docs/vlm.md) is this class with other settings.

    images (B, 3, S, S)
      -> vision encoder: a ViT's patch features at layer ``vision_layer``   (B, N, d_vision)
         (LLaVA reads CLIP's penultimate layer, Liu et al. 2023, Sec. 4.1; the class token is dropped),
         with the features of the earlier ``dense_layers`` concatenated along channels
         (the Dense Connector's sparse channel integration, Yao et al. 2024, Sec. 3.2)
      -> connector                                                         (B, K, d)
           linear     LLaVA 1.0: H_v = W Z_v (Eq. 1), after average-pooling the grid to K tokens
           mlp        LLaVA-1.5: Linear -> GELU -> Linear, pooled the same way
           perceiver  Flamingo's resampler: K learned latents read the patches (Sec. 2.1)
           qformer    BLIP-2's Q-Former: K learned queries (Sec. 3.1); InstructBLIP also feeds it the
                      instruction (Dai et al. 2023, Sec. 2.3)
      -> fusion
           autoregressive   the K visual tokens are the first K inputs of the LM (LLaVA, BLIP-2's
                            soft prompt): logits = LM([H_v; embed(text)])
           cross_attention  the LM reads them through gated cross-attention layers before every n-th
                            block, tanh gates at 0 (Flamingo, Sec. 2.2): logits = LM(text, hook)

The text is ``<bos> prompt target <eos>``: a question and its answer, or the instruction
:data:`CAPTION_PROMPT` and a caption. The loss is next-token cross-entropy on the target and ``<eos>``
only (LLaVA trains on the answers, never on the instruction, Sec. 4.2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.errors import DifflabError
from difflab.models.lm import qa_text
from difflab.nn.connectors import build_connector
from difflab.nn.flamingo import FlamingoLayers
from difflab.nn.gpt import GPT
from difflab.nn.vit import VisionTransformer
from difflab.text.normalize import normalize

FUSIONS = ("autoregressive", "cross_attention")
CAPTION_PROMPT = "describe the image ."
"""The instruction that asks for a caption (the LM's tokenizer adds 'describe' and 'image' to the world's
words)."""
IGNORE = -100
"""Label of a position the loss skips (the visual tokens, ``<bos>``, the prompt, padding)."""


def patch_features(vit: VisionTransformer, images: torch.Tensor, layer: int | Sequence[int]) -> torch.Tensor:
    """(B, 3, S, S) -> (B, N, width): the ViT's patch tokens after block ``layer`` (negative: from the end;
    -1 is the last block, before the final LayerNorm), the class token dropped. A sequence of layers gives
    their tokens concatenated along channels in that order, (B, N, width * len(layer)), from one pass."""
    depth = len(vit.transformer.blocks)
    wanted = [i % depth for i in ([layer] if isinstance(layer, int) else layer)]
    b = images.shape[0]
    x = vit.patch_embed(images).flatten(2).transpose(1, 2)  # (B, N, D)
    x = torch.cat([vit.cls_token.expand(b, 1, -1), x], dim=1) + vit.pos_embed  # (B, 1 + N, D)
    x = vit.norm_pre(x)
    kept = {}
    for i, block in enumerate(vit.transformer.blocks[: max(wanted) + 1]):
        x = block(x)
        kept[i] = x[:, 1:]
    return torch.cat([kept[i] for i in wanted], dim=-1)  # (B, N, D * len(wanted))


def check_dense_layer(layer: int, depth: int, top: int) -> int:
    """A dense layer's block index (0-based, after negative indices count from the end), which must come
    before ``top``, the block the connector's main features are read from."""
    if not isinstance(layer, int) or not -depth <= layer < depth or layer % depth >= top:
        raise DifflabError(f"dense layer {layer!r} is not a ViT block before vision_layer's (block {top} of "
                           f"{depth}); expected an int in {-depth}..{depth - 1} naming a block below {top}")
    return layer % depth


class VisionLanguageModel(nn.Module):
    """Vision encoder + connector + LM; see the module docstring. ``freeze_vision`` keeps the encoder's
    weights out of training and the encoder in eval mode (LLaVA, Flamingo and BLIP-2 all freeze it). Load a
    pretrained encoder's weights into ``vision`` before building: the blocks after ``vision_layer`` are dropped."""

    def __init__(self, vision: VisionTransformer, lm: GPT, *, connector: str, fusion: str, visual_tokens: int,
                 vision_layer: int = -2, freeze_vision: bool = True, cross_every: int = 1,
                 qformer_depth: int = 2, instruct: bool = False, vocab_size: int | None = None,
                 visual_positions: bool = False, dense_layers: Sequence[int] = ()) -> None:  # fmt: skip
        super().__init__()
        if fusion not in FUSIONS:
            raise DifflabError(f"unknown fusion '{fusion}'; expected one of {', '.join(FUSIONS)}")
        if instruct and connector != "qformer":
            raise DifflabError(f"instruct=True feeds the instruction to a Q-Former; connector is '{connector}'")
        # The blocks after vision_layer and the final LayerNorm are never read: they are dropped, so that a
        # ViT trained from scratch has no weights without gradients (and a frozen one carries no dead weight).
        depth = len(vision.transformer.blocks)
        if not -depth <= vision_layer < depth:
            raise DifflabError(f"vision_layer {vision_layer} is outside the ViT's {depth} blocks; expected "
                               f"{-depth}..{depth - 1}")  # fmt: skip
        top = vision_layer % depth
        dense = [check_dense_layer(i, depth, top) for i in dense_layers]
        if len(set(dense)) != len(dense):
            raise DifflabError(f"dense_layers {tuple(dense_layers)} name a block twice; expected distinct blocks")
        vision.transformer.blocks = vision.transformer.blocks[: top + 1]
        self.feature_layers = (*dense, top)  # what features() reads, concatenated along channels in this order
        vision.norm_post = nn.Identity()
        self.vision, self.lm = vision, lm
        self.connector_name, self.fusion, self.instruct = connector, fusion, instruct
        self.freeze_vision = freeze_vision
        if freeze_vision:
            vision.requires_grad_(False)
        d_vision, d_lm = vision.cfg.width * len(self.feature_layers), lm.cfg.width
        # linear/mlp pool the patch grid to K first; the Q-Former reads the world's words (its ITG head and
        # InstructBLIP's instruction)
        self.connector = build_connector(connector, d_vision, d_lm, visual_tokens, depth=qformer_depth,
                                         heads=lm.cfg.heads, num_patches=vision.cfg.num_patches,
                                         vocab_size=vocab_size or lm.cfg.vocab_size,
                                         context_length=lm.cfg.context_length)  # fmt: skip
        if connector == "qformer":
            self.qformer_proj = nn.Linear(d_lm, d_lm)  # BLIP-2's fully-connected layer into the LM (Fig. 3)
        self.flamingo = (
            FlamingoLayers(d_lm, d_lm, len(lm.blocks), cross_every, lm.cfg.heads)
            if fusion == "cross_attention" else None
        )  # fmt: skip
        self.visual_tokens = visual_tokens
        # An experiment (docs/vlm.md, "Where is the diamond?"): where each visual token sits, written at the
        # tokens' own scale (std 0.5 per coordinate is about the connector's initial output norm, 6.4, where the
        # LM's additive wpe rows are 0.34). Measured: it does not lift position answers and slows the rest.
        self.visual_pos = nn.Parameter(0.5 * torch.randn(visual_tokens, d_lm)) if visual_positions else None

    def unused_parameters(self, objective: str = "lm") -> list[nn.Parameter]:
        """The parameters ``objective`` never reaches, which a training freezes so that the optimizer carries no
        dead weight: for BLIP-2's first stage ('qformer') the LM side; for the language-modelling objective the
        Q-Former's first-stage heads (contrast, matching, its own text decoder) and, unless InstructBLIP feeds
        it the question, its text path."""
        if objective == "qformer":
            parts = [self.lm, self.qformer_proj] + ([self.flamingo] if self.flamingo is not None else [])
            return [p for m in parts for p in m.parameters()]
        if self.connector_name != "qformer":
            return []
        names = {"dec_embed", "image_proj", "itm_head", "logit_scale", "text_proj"}
        if not self.instruct:
            names |= {"token_embed", "pos_embed", "text_ffw"}
        return [p for n, p in self.connector.named_parameters() if names & set(n.split("."))]

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_vision:  # a frozen encoder keeps its eval-mode behaviour (no dropout) while training
            self.vision.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> patch features (B, N, d_vision): the ``dense_layers``' tokens and ``vision_layer``'s,
        concatenated along channels; no graph through a frozen encoder."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_vision):
            return patch_features(self.vision, images, self.feature_layers)  # (B, N, d_vision)

    def visual(self, images: torch.Tensor, instruction: tuple[torch.Tensor, torch.Tensor] | None = None):
        """(B, 3, S, S) -> the K visual tokens (B, K, d_lm) the LM reads. ``instruction``: (ids, mask) of the
        prompt, read by an instruction-aware Q-Former (InstructBLIP) and ignored otherwise."""
        z = self.features(images)
        if self.connector_name == "qformer":
            ids, mask = instruction if (self.instruct and instruction is not None) else (None, None)
            h = self.qformer_proj(self.connector.encode_image(z, ids, mask))
        else:
            h = self.connector(z)
        return h if self.visual_pos is None else h + self.visual_pos  # (B, K, d_lm)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                instruction: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """Images (B, 3, S, S) and text (B, L) -> next-token logits at the text positions (B, L, vocab)."""
        return self.fuse(self.visual(images, instruction), ids, mask)

    def fuse(self, h: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Visual tokens (B, K, D) and text (B, L) -> the LM's logits at the text positions (B, L, vocab): the
        visual tokens first in the sequence, or read through Flamingo's gated layers."""
        if self.flamingo is not None:
            return self.lm(ids, mask=mask, hook=self.flamingo.hook(h))
        k = h.shape[1]
        embeds = torch.cat([h, self.lm.embed(ids)], dim=1)  # (B, K + L, D)
        full_mask = torch.cat([torch.ones(mask.shape[0], k, dtype=torch.bool, device=mask.device), mask], dim=1)
        return self.lm(embeds=embeds, mask=full_mask)[:, k:]  # (B, L, vocab)

    def loss(self, images, ids, mask, labels, instruction=None, *, average: str = "token") -> torch.Tensor:
        """Next-token cross-entropy over the labelled positions (logits at text position j predict
        ``labels[j + 1]``), averaged over every labelled token of the batch (``average='token'``, as LLaVA's
        code does) or within each sequence first, then over sequences (``'example'``): a one-word answer then
        weighs as much as an eighteen-token caption."""
        logits = self(images, ids, mask, instruction)
        target = labels[:, 1:]  # (B, L - 1)
        per_token = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=IGNORE, reduction="none")
        counted = (target != IGNORE).float()  # (B, L - 1)
        if average == "token":
            return (per_token * counted).sum() / counted.sum().clamp(min=1)
        return ((per_token * counted).sum(1) / counted.sum(1).clamp(min=1)).mean()

    @torch.no_grad()
    def generate(self, images: torch.Tensor, prompt_ids: list[list[int]], *, max_new_tokens: int, max_length: int,
                 eos_id: int, pad_id: int, instruction=None) -> list[list[int]]:  # fmt: skip
        """Greedy continuation of each row's ``<bos> prompt`` ids after its image; returns each row's new ids up
        to (not including) ``<eos>``, at most ``max_new_tokens`` of them and never past ``max_length`` tokens in
        the row (the text positions the model was trained on). Rows are right-padded; row i's next token is
        read from the logits at its length - 1, which causal attention keeps independent of what follows."""
        b = len(prompt_ids)
        lengths = torch.tensor([len(p) for p in prompt_ids])
        limits = torch.clamp(lengths + max_new_tokens, max=max_length)  # (B,): each row's last length
        width = int(limits.max())
        ids = torch.full((b, width), pad_id, dtype=torch.long)
        for i, p in enumerate(prompt_ids):
            ids[i, : len(p)] = torch.tensor(p)
        device = images.device
        ids, lengths, limits = ids.to(device), lengths.to(device), limits.to(device)
        h = self.visual(images, instruction)
        done = lengths >= limits
        out: list[list[int]] = [[] for _ in range(b)]
        rows = torch.arange(b, device=device)
        while not bool(done.all()):
            mask = torch.arange(width, device=device)[None] < lengths[:, None]  # (B, W)
            logits = self.fuse(h, ids, mask)
            nxt = logits[rows, lengths - 1].argmax(-1)  # (B,)
            done = done | (nxt == eos_id)
            grow = ~done
            for i in torch.nonzero(grow).flatten().tolist():
                out[i].append(int(nxt[i]))
            ids[rows[grow], lengths[grow]] = nxt[grow]
            lengths = lengths + grow.long()
            done = done | (lengths >= limits)
        return out


def prompt_length(prompt: str) -> int:
    """Tokens of ``<bos> prompt`` (the world's word tokenizer: one token per word or punctuation mark)."""
    return 1 + len(normalize(prompt))


def labels_for(ids: torch.Tensor, mask: torch.Tensor, prompt_lengths: list[int]) -> torch.Tensor:
    """(B, L) labels: each row's ids after its ``<bos> prompt`` up to ``<eos>`` inclusive, :data:`IGNORE`
    elsewhere (the prompt and padding)."""
    labels = ids.masked_fill(~mask, IGNORE)
    for i, n in enumerate(prompt_lengths):
        labels[i, :n] = IGNORE
    return labels


def encode_conversations(tokenizer, rows: list[list[tuple[str, str]]]) -> tuple[torch.Tensor, ...]:
    """(ids, mask, labels), each (B, L) with L the longest row, of rows of (prompt, target) turns:
    ``<bos> p1 t1 <eos> p2 t2 <eos> ...`` - LLaVA's multi-turn instruction data (Liu et al. 2023, Sec. 3 and
    4.2), whose loss is on every answer. Labels are each turn's target and its ``<eos>``, :data:`IGNORE` on
    ``<bos>``, the prompts and the padding. A one-turn row is ``tokenizer.encode("p t")`` with
    :func:`labels_for`, trimmed to the batch's longest row. ``tokenizer`` holds one turn per encoded row
    (unknown words and over-long turns are its named errors)."""
    turns = [turn for row in rows for turn in row]
    ids, mask = tokenizer.encode([qa_text(p, t) for p, t in turns])  # (turns in all, text_length): <bos> p t <eos>
    turn_labels = labels_for(ids, mask, [prompt_length(p) for p, _ in turns])
    seqs, targets, k = [], [], 0
    for row in rows:
        seq, target = [tokenizer.bos_id], [IGNORE]
        for _ in row:  # each turn without its <bos>: p t <eos>
            n = int(mask[k].sum())
            seq += ids[k, 1:n].tolist()
            target += turn_labels[k, 1:n].tolist()
            k += 1
        seqs.append(seq)
        targets.append(target)
    width = max(map(len, seqs))
    out_ids = torch.full((len(rows), width), tokenizer.pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (seq, target) in enumerate(zip(seqs, targets, strict=True)):
        out_ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, : len(seq)] = torch.tensor(target)
    lengths = torch.tensor([len(s) for s in seqs])
    return out_ids, torch.arange(width)[None] < lengths[:, None], labels
