"""The UNet and its parts: shapes, identities, and the conditioning seams later systems rely on."""

import math

import pytest
import torch

from difflab.nn.attention import MultiHeadAttention
from difflab.nn.embeddings import sinusoidal_embedding
from difflab.nn.unet import UNet, UNetConfig, count_parameters, training_step_flops

TINY = UNetConfig(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,), heads=2,
                  image_size=16, norm_groups=4, num_classes=3, context_dim=8)  # fmt: skip


def _randomise_output(model):
    # conv_out and each block's last conv start at zero (every block is the identity, the untrained UNet
    # predicts 0); give them weights so conditioning can be seen to flow through.
    for name, p in model.named_parameters():
        if name.endswith(("conv2.weight", "conv_out.weight")):
            torch.nn.init.normal_(p, std=0.1)


def test_sinusoidal_embedding_closed_form():
    t = torch.tensor([0.0, 3.0, 250.5])
    emb = sinusoidal_embedding(t, 8)
    w = [10000 ** (-i / 4) for i in range(4)]
    expected = [[math.cos(s * wi) for wi in w] + [math.sin(s * wi) for wi in w] for s in t.tolist()]
    assert torch.allclose(emb, torch.tensor(expected), atol=1e-5)


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    att = MultiHeadAttention(8, heads=2, context_dim=6)
    x, ctx = torch.randn(2, 5, 8), torch.randn(2, 3, 6)
    q = att.to_q(x).view(2, 5, 2, 4).transpose(1, 2)
    k = att.to_k(ctx).view(2, 3, 2, 4).transpose(1, 2)
    v = att.to_v(ctx).view(2, 3, 2, 4).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)  # sqrt(d_head) = 2
    expected = att.to_out((w @ v).transpose(1, 2).reshape(2, 5, 8))
    assert torch.allclose(att(x, ctx), expected, atol=1e-6)


def test_masked_context_tokens_are_ignored():
    torch.manual_seed(0)
    att = MultiHeadAttention(8, heads=2, context_dim=6)
    x, ctx = torch.randn(1, 4, 8), torch.randn(1, 3, 6)
    mask = torch.tensor([[True, True, False]])
    changed = ctx.clone()
    changed[:, 2] = 100.0
    assert torch.allclose(att(x, ctx, mask), att(x, changed, mask), atol=1e-6)


def test_forward_shapes_and_zero_init():
    model = UNet(TINY)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 500])
    out = model(x, t, class_labels=torch.tensor([0, 2]), context=torch.randn(2, 4, 8))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # zero-initialised output conv: the untrained model predicts 0


def test_conditioning_changes_output_and_null_class_is_default():
    torch.manual_seed(0)
    model = UNet(TINY)
    _randomise_output(model)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 10])
    a = model(x, t, class_labels=torch.tensor([0, 0]))
    b = model(x, t, class_labels=torch.tensor([1, 1]))
    null = model(x, t, class_labels=torch.tensor([3, 3]))
    assert not torch.allclose(a, b)
    assert torch.equal(model(x, t), null)
    with_ctx = model(x, t, context=torch.randn(2, 4, 8))
    assert not torch.allclose(with_ctx, null)


def test_control_residuals_zero_is_identity_and_count_is_checked():
    torch.manual_seed(0)
    model = UNet(TINY)
    _randomise_output(model)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    n = len(model.skip_widths) + 1
    # One residual per skip: conv_in and the level-0 block at 16x16, then the downsample and the
    # level-1 block at 8x8; the last residual is for the middle block (8x8).
    sides = [16, 16, 8, 8]
    zeros = [torch.zeros(1, w, s, s) for w, s in zip(model.skip_widths, sides, strict=True)]
    zeros.append(torch.zeros(1, model.skip_widths[-1], 8, 8))
    assert len(zeros) == n
    assert torch.allclose(model(x, t, control=zeros), model(x, t), atol=1e-6)
    with pytest.raises(ValueError, match=f"this UNet takes {n}"):
        model(x, t, control=zeros[:-1])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = UNet(TINY)
    _randomise_output(model)
    out = model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.tensor([0, 1]), torch.randn(2, 4, 8))
    out.square().mean().backward()
    # conv2 of every block starts at zero, so only parameters *before* a zero layer may see zero grads
    # on step one; all parameters must at least be connected to the loss.
    assert all(p.grad is not None for p in model.parameters())


def test_parameter_and_flop_counts_are_positive_and_scale():
    small, wide = UNet(TINY), UNet(UNetConfig(**{**TINY.__dict__, "channels": 32}))
    assert count_parameters(wide) > 3 * count_parameters(small)  # widths double: ~4x weights
    inputs = {"x": torch.randn(2, 3, 16, 16), "t": torch.tensor([1, 2])}
    assert training_step_flops(wide, inputs) > 3 * training_step_flops(small, inputs)


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="image_size 30"):
        UNetConfig(image_size=30, channel_mult=(1, 2, 2))


def test_factorised_class_embedding_is_a_sum_of_digit_embeddings():
    from difflab.nn.unet import ClassEmbedding

    torch.manual_seed(0)
    emb = ClassEmbedding(40, 6, factors=(5, 8))
    shape_table, colour_table = emb.tables
    labels = torch.tensor([0, 13, 39, 40])  # 13 = shape 1, colour 5; 40 is the null class
    out = emb(labels)
    assert torch.allclose(out[1], shape_table.weight[1] + colour_table.weight[5])
    assert torch.allclose(out[2], shape_table.weight[4] + colour_table.weight[7])
    assert torch.allclose(out[3], shape_table.weight[5] + colour_table.weight[8])  # the null rows
    # Shared digits share parameters: classes 8 and 13 (shape 1) differ only in their colour row.
    assert torch.allclose(emb(torch.tensor([8]))[0] - colour_table.weight[0], out[1] - colour_table.weight[5])


def test_class_factors_must_multiply_to_num_classes():
    with pytest.raises(ValueError, match=r"class_factors \(5, 7\) do not multiply to num_classes=40"):
        UNetConfig(num_classes=40, class_factors=(5, 7))


def test_head_dim_sets_heads_per_layer_width_and_changes_no_parameter():
    """``head_dim`` gives each attention layer width // head_dim heads (64-wide layers, 32-wide heads: 2),
    the same network as ``heads=2`` there: same parameter names and shapes, and with the same weights
    the same output. Another split of the same weights computes something else."""
    base = dict(channels=32, channel_mult=(1, 2), image_size=16, attention_resolutions=(8,), num_res_blocks=1)
    torch.manual_seed(0)
    by_width = UNet(UNetConfig(**base, head_dim=32))
    by_count = UNet(UNetConfig(**base, heads=2))
    other = UNet(UNetConfig(**base, heads=4))
    assert {m.heads for m in by_width.modules() if isinstance(m, MultiHeadAttention)} == {2}
    by_count.load_state_dict(by_width.state_dict())
    other.load_state_dict(by_width.state_dict())
    for m in (by_width, by_count, other):  # a non-zero output layer, so attention shows in the output
        m.conv_out.weight.data.fill_(0.01)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    assert torch.equal(by_width(x, t), by_count(x, t))
    assert not torch.allclose(by_width(x, t), other(x, t))
    with pytest.raises(ValueError, match="head_dim 24 does not divide the attention width 64 at 8px"):
        UNetConfig(**base, head_dim=24)


def test_attention_positions_break_pixel_permutation_equivariance():
    """Attention alone is equivariant to permuting the pixels (it cannot know where a pixel is); the
    learned position embedding breaks that, and with the embedding at zero the layer is the plain one."""
    from difflab.errors import DifflabError
    from difflab.nn.attention import SpatialAttention

    torch.manual_seed(0)
    x, ctx = torch.randn(2, 16, 4, 4), torch.randn(2, 3, 8)
    perm = torch.randperm(16)

    def permuted(t):  # the same permutation of the 4x4 pixels, (B, C, H, W) -> (B, C, H, W)
        return t.flatten(2)[:, :, perm].reshape(t.shape)

    plain = SpatialAttention(16, 2, 4, context_dim=8)
    placed = SpatialAttention(16, 2, 4, context_dim=8, positions=16)
    placed.load_state_dict(plain.state_dict(), strict=False)  # everything but the embedding
    assert torch.allclose(plain(permuted(x), ctx), permuted(plain(x, ctx)), atol=1e-5)
    assert not torch.allclose(placed(permuted(x), ctx), permuted(placed(x, ctx)), atol=1e-3)
    with torch.no_grad():
        placed.pos.zero_()
    assert torch.allclose(placed(x, ctx), plain(x, ctx), atol=1e-6)
    with pytest.raises(
        DifflabError, match="a 2x2 feature map does not fit the position embedding of 16 pixels"
    ):
        placed(torch.randn(1, 16, 2, 2))
    cfg = UNetConfig(image_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(16, 8), norm_groups=4, attention_positions=True)  # fmt: skip
    rows = {n: p.shape[1] for n, p in UNet(cfg).named_parameters() if n.endswith(".pos")}
    assert rows == {"down.0.1.pos": 256, "down.2.1.pos": 64, "mid_attn.pos": 64, "up.0.1.pos": 64,
                    "up.1.1.pos": 64, "up.3.1.pos": 256, "up.4.1.pos": 256}  # fmt: skip
