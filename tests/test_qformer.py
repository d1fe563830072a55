"""BLIP-2's Q-Former (difflab.nn.qformer): the three masks of Fig. 2 written out and checked by perturbation
(what may and may not change an output), the image reaching the queries only through cross-attention,
InstructBLIP's instruction, and the three losses: finite, ITC by hand on a 2 x 2 batch, each learnable."""

import math

import pytest
import torch
import torch.nn.functional as F

from difflab.errors import DifflabError
from difflab.nn.qformer import (
    QFormer,
    hard_negatives,
    itc_loss,
    itc_similarity,
    itg_loss,
    itm_loss,
    self_attention_mask,
    stage1_losses,
)

pytestmark = pytest.mark.usefixtures("single_thread")

Q, WIDTH, D_VISION, VOCAB, CONTEXT = 3, 16, 12, 20, 8
B, N, L = 2, 9, 6


def _qformer(depth: int = 2, cross_every: int = 2) -> QFormer:
    torch.manual_seed(0)
    return QFormer(Q, WIDTH, depth, 4, D_VISION, VOCAB, CONTEXT, cross_every).eval()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(B, N, D_VISION, generator=g)
    ids = torch.randint(4, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 4:] = False  # row 1: four real tokens, two of padding
    return features, ids, mask


def _other_image(features):
    return features + torch.randn(features.shape, generator=torch.Generator().manual_seed(9))


def _changed(a, b) -> bool:
    return (a - b).abs().max() > 1e-5


# ------------------------------------------------------------------------------------------------ masks


def test_masks_are_those_of_figure_2():
    """Q = 2 queries, L = 3 text tokens of which the last is padding; rows attend to columns. The padded
    row (the last) keeps its own diagonal, so its softmax stays finite; no real row reads it."""
    text_mask = torch.tensor([[True, True, False]])
    itc = [[1, 1, 0, 0, 0],
           [1, 1, 0, 0, 0],
           [0, 0, 1, 1, 0],
           [0, 0, 1, 1, 0],
           [0, 0, 1, 1, 1]]  # fmt: skip
    itg = [[1, 1, 0, 0, 0],
           [1, 1, 0, 0, 0],
           [1, 1, 1, 0, 0],
           [1, 1, 1, 1, 0],
           [1, 1, 1, 1, 1]]  # fmt: skip
    itm = [[1, 1, 1, 1, 0],
           [1, 1, 1, 1, 0],
           [1, 1, 1, 1, 0],
           [1, 1, 1, 1, 0],
           [1, 1, 1, 1, 1]]  # fmt: skip
    for kind, expected in [("itc", itc), ("itg", itg), ("itm", itm)]:
        mask = self_attention_mask(kind, 2, text_mask)
        assert mask.dtype == torch.bool and mask.shape == (1, 5, 5)
        assert mask[0].int().tolist() == expected, kind


def test_cross_attention_sits_in_blocks_0_and_every_cross_every():
    assert [b.cross_attn is not None for b in _qformer(4, 2).blocks] == [True, False, True, False]
    assert [b.cross_attn is not None for b in _qformer(3, 1).blocks] == [True, True, True]
    assert [b.cross_attn is not None for b in _qformer(3, 5).blocks] == [True, False, False]


# ------------------------------------------------------------------------------------------------ shapes


def test_shapes():
    qf, (features, ids, mask) = _qformer(), _inputs()
    assert qf.encode_image(features).shape == (B, Q, WIDTH)
    for kind in ("itc", "itg", "itm"):
        queries, text = qf(features, ids, mask, kind)
        assert queries.shape == (B, Q, WIDTH) and text.shape == (B, L, WIDTH)
    assert qf.itg_logits(features, ids, mask).shape == (B, L, VOCAB)
    image_emb, text_emb = qf.contrastive_embeddings(features, ids, mask)
    assert image_emb.shape == (B, Q, WIDTH) and text_emb.shape == (B, WIDTH)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(B, Q))
    instructed = qf.encode_image(features, ids, mask)
    assert instructed.shape == (B, Q, WIDTH)


def test_encode_image_is_the_query_side_of_itc_and_itg():
    """Under ITC and ITG the queries see only queries, so their outputs are encode_image's."""
    qf, (features, ids, mask) = _qformer(), _inputs()
    alone = qf.encode_image(features)
    torch.testing.assert_close(qf(features, ids, mask, "itc")[0], alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(qf(features, ids, mask, "itg")[0], alone, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------ perturbation tests


def test_itg_is_causal_over_text_and_queries_never_read_it():
    qf, (features, ids, mask) = _qformer(), _inputs()
    queries, text = qf(features, ids, mask, "itg")
    for k in range(1, L):  # change token k: positions before k keep their outputs, bit for bit
        other = ids.clone()
        other[:, k] = (other[:, k] + 1) % VOCAB
        q2, t2 = qf(features, other, mask, "itg")
        assert torch.equal(t2[:, :k], text[:, :k]), k
        assert _changed(t2[0, k:], text[0, k:]), k
        assert torch.equal(q2, queries), k
    # The text reads the image through the queries (depth 2: cross-attention in block 0, text reads in block 1).
    assert _changed(qf(_other_image(features), ids, mask, "itg")[1], text)


def test_itg_starts_from_dec_not_from_the_first_id():
    """ITG's decoder starts with [DEC] in place of <bos>: position 0's id is never read."""
    qf, (features, ids, mask) = _qformer(), _inputs()
    other = ids.clone()
    other[:, 0] = (other[:, 0] + 1) % VOCAB
    assert torch.equal(qf.itg_logits(features, other, mask), qf.itg_logits(features, ids, mask))


def test_itc_keeps_the_two_sides_apart():
    qf, (features, ids, mask) = _qformer(), _inputs()
    queries, text = qf(features, ids, mask, "itc")
    other_ids = (ids + 1) % VOCAB
    q2, t2 = qf(features, other_ids, mask, "itc")
    assert torch.equal(q2, queries)  # queries do not depend on the text
    q3, t3 = qf(_other_image(features), ids, mask, "itc")
    assert torch.equal(t3, text)  # text does not depend on the image
    assert _changed(q3, queries) and _changed(t2, text)
    # Bidirectional text: [CLS] (position 0) reads the last token.
    last = ids.clone()
    last[:, -1] = (last[:, -1] + 1) % VOCAB
    assert _changed(qf(features, last, mask, "itc")[1][0, 0], text[0, 0])


def test_itm_lets_everything_see_everything():
    qf, (features, ids, mask) = _qformer(), _inputs()
    queries, text = qf(features, ids, mask, "itm")
    last = ids.clone()
    last[:, 3] = (last[:, 3] + 1) % VOCAB  # a real token of both rows
    q2, t2 = qf(features, last, mask, "itm")
    assert _changed(q2[0], queries[0]) and _changed(q2[1], queries[1])  # queries read the text
    assert _changed(t2[:, 0], text[:, 0])  # an earlier token reads a later one
    assert _changed(qf(_other_image(features), ids, mask, "itm")[1], text)  # text reads the image


def test_padding_is_never_read():
    qf, (features, ids, mask) = _qformer(), _inputs()
    padded = ids.clone()
    padded[1, 4:] = 0  # row 1's padding, changed
    for kind in ("itc", "itg", "itm"):
        q1, t1 = qf(features, ids, mask, kind)
        q2, t2 = qf(features, padded, mask, kind)
        assert torch.equal(q1, q2) and torch.equal(t1[:, :4], t2[:, :4]), kind


def test_queries_read_the_image_only_through_cross_attention():
    """With every cross-attention's output projection at zero, the Q-Former ignores the image entirely.
    (Block 0 always cross-attends, as in BLIP-2, so a large cross_every cannot switch it off.)"""
    qf, (features, ids, mask) = _qformer(depth=3, cross_every=1), _inputs()
    other = _other_image(features)
    assert _changed(qf.encode_image(features), qf.encode_image(other))
    with torch.no_grad():
        for block in qf.blocks:
            block.cross_attn.to_out.weight.zero_()
            block.cross_attn.to_out.bias.zero_()
    assert torch.equal(qf.encode_image(features), qf.encode_image(other))
    assert torch.equal(qf(features, ids, mask, "itm")[1], qf(other, ids, mask, "itm")[1])


def test_instructblip_instruction_steers_the_queries():
    """Fig. 3: instruction tokens join the queries' self-attention both ways; padding stays unread."""
    qf, (features, ids, mask) = _qformer(), _inputs()
    plain, instructed = qf.encode_image(features), qf.encode_image(features, ids, mask)
    assert _changed(plain, instructed)
    other = ids.clone()
    other[:, 2] = (other[:, 2] + 1) % VOCAB
    assert _changed(qf.encode_image(features, other, mask), instructed)
    padded = ids.clone()
    padded[1, 4:] = 0
    assert torch.equal(qf.encode_image(features, padded, mask), instructed)
    # It is the query side of the ITM pass over (image, instruction).
    torch.testing.assert_close(qf(features, ids, mask, "itm")[0], instructed, atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ losses


def test_itc_loss_by_hand_on_a_2x2_batch():
    """s(i, j) = max over queries of <z_iq, t_j>, then the symmetric cross-entropy at scale 2."""
    # (2 images, 2 queries, 2): image 0's queries are the two axes, image 1's (0.6, 0.8) and (-1, 0)
    image_emb = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
    text_emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # image 0: max(1, 0) = 1 against text 0, max(0, 1) = 1 against text 1; image 1: max(0.6, -1), max(0.8, 0)
    torch.testing.assert_close(itc_similarity(image_emb, text_emb), torch.tensor([[1.0, 1.0], [0.6, 0.8]]))
    # logits 2 S = [[2, 2], [1.2, 1.6]]
    image_to_text = (math.log(2) + math.log(1 + math.exp(-0.4))) / 2  # rows, diagonal right
    text_to_image = (math.log(1 + math.exp(-0.8)) + math.log(1 + math.exp(0.4))) / 2  # columns
    assert itc_loss(image_emb, text_emb, torch.tensor(2.0)).item() == pytest.approx(
        (image_to_text + text_to_image) / 2, abs=1e-6
    )


def test_hard_negatives_are_never_the_partner_and_follow_similarity():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g)
    for _ in range(20):
        neg_text, neg_image = hard_negatives(logits, g)
        assert (neg_text != torch.arange(5)).all() and (neg_image != torch.arange(5)).all()
    peaked = torch.zeros(3, 3)
    peaked[0, 2] = peaked[1, 0] = peaked[2, 1] = 50.0  # image i confuses text (i + 2) % 3 ...
    neg_text, neg_image = hard_negatives(peaked, g)
    assert neg_text.tolist() == [2, 0, 1]
    assert neg_image.tolist() == [1, 2, 0]  # ... so text j is confused with image (j + 1) % 3
    with pytest.raises(DifflabError, match="batch size 1"):
        hard_negatives(torch.zeros(1, 1))


def test_itg_loss_is_next_token_cross_entropy_over_real_tokens():
    _, ids, mask = _inputs()
    logits = torch.randn(B, L, VOCAB, generator=torch.Generator().manual_seed(1))
    terms = [F.cross_entropy(logits[b, j], ids[b, j + 1], reduction="sum")
             for b in range(B) for j in range(L - 1) if mask[b, j + 1]]  # fmt: skip
    torch.testing.assert_close(itg_loss(logits, ids, mask), torch.stack(terms).mean())
    with pytest.raises(DifflabError, match="1 text token"):
        itg_loss(logits[:, :1], ids[:, :1], mask[:, :1])


def test_the_three_losses_are_finite_and_each_learns():
    """20 Adam steps on one tiny batch of 4 pairs lower each loss trained alone by a fifth or more (a
    learning check, not a benchmark: over initialisation seeds, ITC can rest near log 4 for a while before
    it falls, so falling below chance within 20 steps is not asserted)."""
    g = torch.Generator().manual_seed(0)
    features, ids = torch.randn(4, N, D_VISION, generator=g), torch.randint(4, VOCAB, (4, L), generator=g)
    mask = torch.ones(4, L, dtype=torch.bool)
    mask[1, 4:] = False
    losses = stage1_losses(_qformer(), features, ids, mask, torch.Generator().manual_seed(0))
    assert sorted(losses) == ["itc", "itg", "itm"] and all(v.isfinite() for v in losses.values())
    for name in ("itc", "itm", "itg"):
        qf = _qformer().train()
        opt = torch.optim.Adam(qf.parameters(), lr=3e-3)
        history = []
        for _ in range(20):
            loss = stage1_losses(qf, features, ids, mask, torch.Generator().manual_seed(0))[name]
            opt.zero_grad()
            loss.backward()
            opt.step()
            history.append(loss.item())
        assert history[-1] < 0.8 * history[0], (name, history)


def test_itm_loss_needs_a_batch_of_pairs():
    qf, (features, ids, mask) = _qformer(), _inputs()
    assert itm_loss(qf, features, ids, mask, torch.zeros(B, B)).isfinite()
    with pytest.raises(DifflabError, match="batch size 1"):
        itm_loss(qf, features[:1], ids[:1], mask[:1], torch.zeros(1, 1))


# ------------------------------------------------------------------------------------------------ errors


def test_bad_arguments_are_named():
    qf, (features, ids, mask) = _qformer(), _inputs()
    with pytest.raises(DifflabError, match="unknown Q-Former objective 'itx'"):
        qf(features, ids, mask, "itx")
    with pytest.raises(DifflabError, match="unknown Q-Former objective 'ctc'"):
        self_attention_mask("ctc", Q, mask)
    with pytest.raises(DifflabError, match="9 text tokens"):
        qf(features, torch.zeros(B, 9, dtype=torch.long), torch.ones(B, 9, dtype=torch.bool), "itm")
    with pytest.raises(DifflabError, match=r"\(2, 9, 5\)"):
        qf.encode_image(torch.randn(B, N, 5))
    with pytest.raises(DifflabError, match="mask None"):
        qf.encode_image(features, ids)
    with pytest.raises(DifflabError, match="heads=5"):
        QFormer(Q, WIDTH, 2, 5, D_VISION, VOCAB, CONTEXT)
    with pytest.raises(DifflabError, match="num_queries 0"):
        QFormer(0, WIDTH, 2, 4, D_VISION, VOCAB, CONTEXT)
    with pytest.raises(DifflabError, match="cross_every 0"):
        QFormer(Q, WIDTH, 2, 4, D_VISION, VOCAB, CONTEXT, cross_every=0)
