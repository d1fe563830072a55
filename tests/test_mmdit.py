"""MMDiT (Esser et al. 2024): shapes, adaLN-Zero identities, padding masks, position embedding, a text-
conditioned task that only the joint attention can solve, and config errors."""

import math

import pytest
import torch

from difflab.errors import DifflabError
from difflab.nn.mmdit import MMDiT, MMDiTConfig, example_inputs, sincos_2d_position_embedding

TINY = MMDiTConfig(in_channels=3, out_channels=3, image_size=8, patch_size=2, width=32, depth=2, heads=2,
                   context_dim=16, pooled_dim=8)  # fmt: skip


def _randomise(model: MMDiT) -> MMDiT:
    # adaLN-Zero starts every block as the identity and the output at zero; random weights everywhere let
    # the properties below be seen through the whole network.
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def test_output_shape_for_batches_and_a_scalar_timestep():
    model = MMDiT(TINY)
    for batch in (1, 3):
        inputs = example_inputs(TINY, batch, context_length=5)
        assert model(**inputs).shape == (batch, 3, 8, 8)
    x = torch.randn(3, 3, 8, 8)
    assert model(x, torch.tensor(500), context=torch.randn(3, 5, 16)).shape == (3, 3, 8, 8)
    assert model(x, torch.tensor(0.25)).shape == (3, 3, 8, 8)  # no text at all, fractional t
    wide = MMDiT(MMDiTConfig(**{**TINY.__dict__, "out_channels": 5}))
    assert wide(x, torch.tensor([1, 2, 3])).shape == (3, 5, 8, 8)


def test_adaln_zero_output_is_zero_and_blocks_are_identities():
    """DiT Sec. 3.2: zero modulation makes every gate 0, so ``h + gate * f(...)`` is exactly ``h``; the
    zero output layer makes the untrained model predict exactly 0."""
    torch.manual_seed(0)
    model = MMDiT(TINY)
    inputs = example_inputs(TINY, 2, context_length=5)
    inputs["context_mask"][0, 3:] = False
    assert torch.count_nonzero(model(**inputs)) == 0
    with torch.no_grad():  # a live output layer, so the blocks' outputs reach the prediction
        for p in model.final.parameters():
            p.normal_(0.0, 0.1)
    seen = []

    def check(block, args, out):
        img, txt = args[0], args[1]
        assert torch.equal(out[0], img)
        assert out[1] is None if block.text.pre_only else torch.equal(out[1], txt)
        seen.append(block)

    handles = [block.register_forward_hook(check) for block in model.blocks]
    out = model(**inputs)
    for handle in handles:
        handle.remove()
    assert seen == list(model.blocks)
    assert out.abs().max() > 0.1
    # The last block's text stream has only the pre-attention half: its output is never read.
    assert [b.text.pre_only for b in model.blocks] == [False, True]


def test_padded_text_tokens_do_not_change_the_output():
    model = _randomise(MMDiT(TINY))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 700])
    context, pooled = torch.randn(2, 5, 16, generator=g), torch.randn(2, 8, generator=g)
    mask = torch.tensor([[True, True, True, False, False], [True, True, True, True, False]])
    out = model(x, t, context, mask, pooled)

    padded = context.clone()
    padded[0, 3:] = 100 * torch.randn(2, 16, generator=g)
    padded[1, 4] = -50.0
    assert torch.allclose(model(x, t, padded, mask, pooled), out, atol=1e-5)

    real = context.clone()
    real[:, 1] = torch.randn(2, 16, generator=g)
    assert (model(x, t, real, mask, pooled) - out).abs().amax(dim=(1, 2, 3)).min() > 1e-3

    # A caption that is all padding is no caption: the image tokens attend only to each other.
    none = torch.zeros(2, 5, dtype=torch.bool)
    assert torch.allclose(model(x, t, context, none, pooled), model(x, t, None, None, pooled), atol=1e-5)
    assert not torch.allclose(model(x, t, context, None, pooled), model(x, t, None, None, pooled), atol=1e-3)
    assert not torch.allclose(model(x, t, context, mask, None), out, atol=1e-3)  # the pooled path is live


def test_position_embedding_breaks_patch_permutation_equivariance():
    """Joint attention, the per-token MLPs and the patchify/unpatchify pair are all equivariant to permuting
    the patches, so without a position embedding rolling the image by one patch rolls the output; the
    sine-cosine embedding tells the tokens where they are and breaks that."""
    model = _randomise(MMDiT(TINY))
    g = torch.Generator().manual_seed(0)
    x, t, context = (
        torch.randn(2, 3, 8, 8, generator=g),
        torch.tensor([3, 900]),
        torch.randn(2, 4, 16, generator=g),
    )

    def roll(z):  # one patch to the right, cyclically: a permutation of the patch tokens
        return z.roll(TINY.patch_size, dims=3)

    shifted, out = model(roll(x), t, context), model(x, t, context)
    assert (shifted - roll(out)).abs().max() > 1e-2
    with torch.no_grad():
        model.pos_embed.zero_()
    assert torch.allclose(model(roll(x), t, context), roll(model(x, t, context)), atol=1e-5)


def test_sincos_position_embedding_closed_form():
    """Row half then column half, each ``[cos(p w_i), sin(p w_i)]`` with ``w_i = 10000^(-i / (dim/4))``."""
    emb = sincos_2d_position_embedding(side=4, dim=8)
    assert emb.shape == (16, 8)
    w = [10000 ** (-i / 2) for i in range(2)]

    def axis(p):
        return [math.cos(p * wi) for wi in w] + [math.sin(p * wi) for wi in w]

    row, col = 1, 2  # patch index row * side + col = 6 in row-major order
    assert torch.allclose(emb[6], torch.tensor(axis(row) + axis(col)), atol=1e-6)
    assert len({tuple(r.tolist()) for r in emb}) == 16  # every patch is told apart


def test_every_parameter_gets_a_gradient():
    model = _randomise(MMDiT(TINY))
    model(**example_inputs(TINY, 2, context_length=5)).square().mean().backward()
    # DistributedDataParallel waits for every parameter's gradient: none may be outside the graph.
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


COLOURS = torch.tensor([[1.0, -1.0, -1.0], [-1.0, -1.0, 1.0]])  # word 0 -> red, word 1 -> blue


def _batch(g: torch.Generator, batch: int, word: torch.Tensor | None = None):
    """Pure noise in, a flat image out whose colour only the caption names: a one-hot word at a random
    place among padding tokens of random features (masked out)."""
    word = torch.randint(0, 2, (batch,), generator=g) if word is None else word
    context = torch.randn(batch, 4, 16, generator=g)
    place = torch.randint(0, 4, (batch,), generator=g)
    rows = torch.arange(batch)
    context[rows, place] = torch.nn.functional.one_hot(word, 16).float()
    mask = torch.zeros(batch, 4, dtype=torch.bool)
    mask[rows, place] = True
    target = COLOURS[word][:, :, None, None].expand(batch, 3, 8, 8)
    return torch.randn(batch, 3, 8, 8, generator=g), context, mask, target


def _train(use_text: bool, steps: int = 80) -> tuple[MMDiT, float, float]:
    torch.manual_seed(0)
    model = MMDiT(TINY)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    t = torch.full((32,), 999)  # x_T of a diffusion: the input says nothing about the colour

    def loss_of(batch):
        x, context, mask, target = batch
        out = model(x, t, context, mask) if use_text else model(x, t)
        return (out - target).square().mean()

    with torch.no_grad():
        first = loss_of(_batch(g, 32)).item()
    for _ in range(steps):
        loss = loss_of(_batch(g, 32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = loss_of(_batch(g, 32)).item()
    return model, first, last


def test_learns_a_colour_named_only_by_the_text(single_thread):
    """The target's colour is named only by a word placed among padding: with no pooled embedding the
    only route from it is the joint attention (and the mask). The untrained model predicts 0, loss 1;
    a model that cannot read the text can at best predict the mean colour, loss 2/3 (channels 0 and 2
    are +-1 with probability 1/2, channel 1 is always -1)."""
    model, first, last = _train(use_text=True)
    assert first == pytest.approx(1.0)
    assert last < 0.05
    _, blind_first, blind_last = _train(use_text=False)
    assert blind_first == pytest.approx(1.0)
    assert blind_last > 0.5

    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for word in (0, 1):
            x, context, mask, _ = _batch(g, 4, torch.full((4,), word))
            mean = model(x, torch.full((4,), 999), context, mask).mean(dim=(0, 2, 3))  # (3,) per channel
            assert torch.all(mean * COLOURS[word] > 0.7)  # each channel on the named colour's side


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"image_size": 10, "patch_size": 4}, "patch_size 4 does not divide image_size 10"),
        ({"width": 36, "heads": 8}, "width 36 is not divisible by heads=8"),
        ({"width": 30, "heads": 3}, "width 30 is not divisible by 4"),
        ({"depth": 0}, "depth 0 is not a positive integer"),
        ({"pooled_dim": -8}, "pooled_dim -8 is not a positive integer"),
        ({"context_dim": 12.0}, "context_dim 12.0 is not a positive integer"),
        ({"mlp_ratio": 0.0}, "mlp_ratio 0.0 is not a positive number"),
    ],
)
def test_bad_config_is_named(fields, message):
    with pytest.raises(DifflabError, match=message):
        MMDiTConfig(**fields)


def test_bad_inputs_are_named():
    model = MMDiT(TINY)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    assert model(x, t, class_labels=None).shape == x.shape  # a seam left empty is fine
    with pytest.raises(DifflabError, match="MMDiT takes no class_labels"):
        model(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(DifflabError, match=r"expected \(B, 3, 8, 8\)"):
        model(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(DifflabError, match=r"context of shape \(2, 4, 12\); expected \(2, L, 16\)"):
        model(x, t, torch.randn(2, 4, 12))
    with pytest.raises(DifflabError, match="pooled_dim=None"):
        MMDiT(MMDiTConfig(**{**TINY.__dict__, "pooled_dim": None}))(x, t, pooled=torch.randn(2, 8))
