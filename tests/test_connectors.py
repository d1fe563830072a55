"""The LLaVA projectors, the grid pool and Flamingo's Perceiver Resampler (difflab.nn.connectors): shapes,
the pool against ``F.avg_pool2d`` on the grid, the projectors against their formulas, the registry."""

import pytest
import torch
import torch.nn.functional as F

from difflab.errors import DifflabError
from difflab.nn.connectors import (
    CONNECTORS,
    LinearProjector,
    MLPProjector,
    PerceiverResampler,
    TokenPool,
    build_connector,
)
from difflab.nn.qformer import QFormer

pytestmark = pytest.mark.usefixtures("single_thread")

D_VISION, D_LM = 12, 16


def _features(b: int = 2, n: int = 64, d: int = D_VISION) -> torch.Tensor:
    return torch.randn(b, n, d, generator=torch.Generator().manual_seed(0))


def test_linear_projector_is_llava_eq1():
    """H_v = W Z_v (+ b), token by token."""
    proj, z = LinearProjector(D_VISION, D_LM), _features()
    assert proj(z).shape == (2, 64, D_LM)
    torch.testing.assert_close(proj(z), z @ proj.proj.weight.T + proj.proj.bias)


def test_mlp_projector_is_linear_gelu_linear():
    proj, z = MLPProjector(D_VISION, D_LM), _features()
    first, second = proj.net[0], proj.net[2]
    assert (first.in_features, first.out_features, second.out_features) == (D_VISION, D_LM, D_LM)
    expected = F.gelu(z @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(proj(z), expected)


@pytest.mark.parametrize("n, tokens", [(64, 16), (64, 4), (64, 64), (64, 1), (36, 9)])
def test_token_pool_is_avg_pool2d_on_the_grid(n, tokens):
    """The row-major grid of patches, pooled in (side/k)^2 windows: what ``F.avg_pool2d`` computes."""
    z = _features(n=n)
    side, k = int(n**0.5), int(tokens**0.5)
    grid = z.transpose(1, 2).reshape(2, D_VISION, side, side)  # (B, D, H, W), row-major as a ViT flattens
    expected = F.avg_pool2d(grid, side // k).flatten(2).transpose(1, 2)  # (B, k*k, D)
    out = TokenPool(tokens)(z)
    assert out.shape == (2, tokens, D_VISION)
    torch.testing.assert_close(out, expected)


def test_token_pool_keeps_each_window_apart():
    """64 -> 16: token 0 is the mean of patches 0, 1, 8, 9 (the top-left 2 x 2 window) and of nothing else."""
    z = torch.zeros(1, 64, 1)
    z[0, [0, 1, 8, 9], 0] = torch.tensor([1.0, 2.0, 3.0, 6.0])
    out = TokenPool(16)(z)[0, :, 0]
    assert out[0] == 3.0 and out[1:].abs().sum() == 0


@pytest.mark.parametrize(
    "tokens, n, bad", [(15, 64, "tokens 15"), (9, 64, "tokens 9"), (16, 60, "patches 60")]
)
def test_token_pool_refuses_what_does_not_tile(tokens, n, bad):
    with pytest.raises(DifflabError, match=bad):
        TokenPool(tokens)(_features(n=n))


def test_perceiver_resampler_shapes_and_latents():
    torch.manual_seed(0)
    resampler = PerceiverResampler(D_VISION, D_LM, num_latents=8, depth=2, heads=4)
    z = _features(b=3)
    out = resampler(z)
    assert out.shape == (3, 8, D_LM)
    assert not torch.allclose(out[0], resampler(z[1:2])[0])  # the latents read the image
    torch.testing.assert_close(out[1:2], resampler(z[1:2]))  # and each image alone
    # The position embedding makes the patches' order matter.
    assert not torch.allclose(out, resampler(z.flip(1)), atol=1e-4)


def test_perceiver_resampler_keys_are_features_and_latents():
    """Fig. 5: a layer's keys and values are [features; latents] (N + R of them), every one normalised."""
    torch.manual_seed(0)
    resampler = PerceiverResampler(D_VISION, D_LM, num_latents=5, depth=1, heads=2)
    seen = []
    attn = resampler.layers[0].attn
    attn.probs_hook = lambda probs: seen.append(probs.shape)  # (B, heads, queries, keys)
    resampler(_features())
    assert seen == [(2, 2, 5, 64 + 5)]


def test_perceiver_resampler_refuses_bad_arguments():
    with pytest.raises(DifflabError, match="heads=3"):
        PerceiverResampler(D_VISION, D_LM, 4, 1, 3)
    with pytest.raises(DifflabError, match="num_latents 0"):
        PerceiverResampler(D_VISION, D_LM, 0, 1, 4)
    with pytest.raises(DifflabError, match=r"\(2, 16, 12\)"):
        PerceiverResampler(D_VISION, D_LM, 4, 1, 4)(_features(n=16))


@pytest.mark.parametrize("name", sorted(CONNECTORS))
def test_every_connector_gives_the_same_number_of_tokens(name):
    """The controlled comparison: 16 visual tokens from 64 patches, whatever the connector."""
    torch.manual_seed(0)
    module = build_connector(name, D_VISION, D_LM, 16, depth=1, heads=4, vocab_size=20, context_length=8)
    z = _features()
    out = module.encode_image(z) if isinstance(module, QFormer) else module(z)
    assert out.shape == (2, 16, D_LM)


def test_registry_names_what_is_wrong():
    with pytest.raises(DifflabError, match="unknown connector 'percevier' \\(did you mean 'perceiver'\\?\\)"):
        build_connector("percevier", D_VISION, D_LM, 16)
    with pytest.raises(DifflabError, match="unknown connector size 'dpeth'"):
        build_connector("perceiver", D_VISION, D_LM, 16, dpeth=2)
    with pytest.raises(DifflabError, match="vocab_size and context_length"):
        build_connector("qformer", D_VISION, D_LM, 16)
