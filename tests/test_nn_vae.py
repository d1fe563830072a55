"""The KL autoencoder's parts: shapes of both layouts at f = 2, 4, 8, the diagonal Gaussian posterior
(KL against torch.distributions, reparameterised samples with the right moments, reproducible and
differentiable), config and input errors that name the bad value, and the batched latent cache."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from difflab.data.cache import cache_file, cached_arrays
from difflab.errors import DifflabError
from difflab.nn.vae import AutoencoderConfig, DiagonalGaussian, KLAutoencoder

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def _small(**over) -> AutoencoderConfig:
    kwargs = dict(
        in_channels=3, image_size=16, latent_channels=3, channels=8, num_res_blocks=1, norm_groups=4
    )
    return AutoencoderConfig(**{**kwargs, **over})


def _params(b: int, c: int, h: int, seed: int = 0) -> torch.Tensor:
    """Random encoder output (B, 2c, h, h): means around +-2, log-variances in [-3, 2]."""
    gen = torch.Generator().manual_seed(seed)
    mean = 2 * torch.randn(b, c, h, h, generator=gen)
    logvar = torch.rand(b, c, h, h, generator=gen) * 5 - 3
    return torch.cat([mean, logvar], dim=1)


# --- shapes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["patch", "pyramid"])
@pytest.mark.parametrize("f", [2, 4, 8])
def test_shapes_of_both_layouts(layout, f):
    cfg = _small(layout=layout, downsample_factor=f, mid_attention=f == 8)
    assert cfg.latent_size == 16 // f
    assert cfg.latent_shape == (3, 16 // f, 16 // f)
    assert len(cfg.widths) == (1 if layout == "patch" else f.bit_length())
    model = KLAutoencoder(cfg).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        posterior = model.encode(x)
        assert posterior.mean.shape == posterior.logvar.shape == posterior.std.shape == (2, *cfg.latent_shape)
        assert model.decode(posterior.mode()).shape == x.shape
        rec, post = model(x, torch.Generator().manual_seed(0))
        assert rec.shape == x.shape and post.mean.shape == (2, *cfg.latent_shape)
        rec_mode, _ = model(x, sample=False)
        assert torch.equal(rec_mode, model.decode(posterior.mean))


def test_patch_decoder_ends_in_pixel_shuffle_and_returns_the_exact_input_shape():
    for f in (2, 4, 8):
        cfg = _small(layout="patch", downsample_factor=f, image_size=24 if f != 8 else 16, in_channels=1)
        model = KLAutoencoder(cfg)
        last = list(model.decoder.modules())[-1]
        assert isinstance(last, nn.PixelShuffle) and last.upscale_factor == f
        assert isinstance(model.encoder.layers[0], nn.PixelUnshuffle)
        # the adaptive GAN weight's G_L: the conv that feeds the shuffle, C f^2 output channels
        assert model.last_layer is model.decoder.conv_out.weight
        assert model.last_layer.shape[0] == cfg.in_channels * f * f
        x = torch.randn(3, 1, cfg.image_size, cfg.image_size)
        with torch.no_grad():
            assert model(x)[0].shape == x.shape  # untrained, yet exactly the input's shape


def test_a_patch_layout_ignores_channel_mult():
    assert _small(layout="patch", downsample_factor=4, channel_mult=(1, 2)).widths == (8,)


# --- the diagonal Gaussian -------------------------------------------------------------------------


def test_kl_matches_torch_distributions():
    params = _params(4, 3, 5)
    q = DiagonalGaussian(params)
    mean, logvar = params.chunk(2, dim=1)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1)
    assert q.kl().shape == (4,)
    torch.testing.assert_close(q.kl(), expected, rtol=1e-5, atol=1e-4)
    assert (q.kl() > 0).all()


def test_kl_is_zero_for_the_standard_normal():
    q = DiagonalGaussian(torch.zeros(3, 8, 4, 4))
    assert torch.equal(q.kl(), torch.zeros(3))
    assert torch.equal(q.std, torch.ones(3, 4, 4, 4))


def test_logvar_is_clamped_so_nothing_overflows():
    params = torch.cat(
        [torch.zeros(1, 2, 2, 2), torch.tensor([1e4, -1e4]).view(1, 2, 1, 1).expand(1, 2, 2, 2)], 1
    )
    q = DiagonalGaussian(params)
    assert q.logvar[0, 0].eq(20.0).all() and q.logvar[0, 1].eq(-30.0).all()
    assert torch.isfinite(q.std).all() and torch.isfinite(q.kl()).all()


def test_samples_have_the_posterior_mean_and_std():
    n = 20_000
    one = _params(1, 2, 3, seed=1)
    q = DiagonalGaussian(one.expand(n, -1, -1, -1))
    z = q.sample(torch.Generator().manual_seed(0))
    target = DiagonalGaussian(one)
    # sampling error of a mean of n draws is std / sqrt(n); 5 of them is a loose but meaningful bound
    assert ((z.mean(0) - target.mean[0]).abs() <= 5 * target.std[0] / n**0.5).all()
    torch.testing.assert_close(z.std(0), target.std[0], rtol=0.04, atol=0.0)
    assert torch.equal(q.mode(), q.mean)


def test_sample_is_reproducible_from_a_generator():
    q = DiagonalGaussian(_params(2, 3, 4))
    a = q.sample(torch.Generator().manual_seed(7))
    b = q.sample(torch.Generator().manual_seed(7))
    c = q.sample(torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_gradient_flows_through_the_sample_to_mean_and_logvar():
    params = _params(2, 3, 4).requires_grad_(True)
    q = DiagonalGaussian(params)
    z = q.sample(torch.Generator().manual_seed(0))
    z.sum().backward()
    eps = ((z - q.mean) / q.std).detach()
    d_mean, d_logvar = params.grad.chunk(2, dim=1)
    torch.testing.assert_close(d_mean, torch.ones_like(d_mean))  # dz/dmean = 1
    torch.testing.assert_close(d_logvar, 0.5 * q.std.detach() * eps)  # dz/dlogvar = std eps / 2
    assert d_logvar.abs().sum() > 0


def test_gradient_of_the_kl_reaches_the_encoder():
    model = KLAutoencoder(_small(downsample_factor=2))
    model(torch.randn(2, 3, 16, 16))[1].kl().sum().backward()
    assert all(p.grad is not None for p in model.encoder.parameters())
    assert all(p.grad is None for p in model.decoder.parameters())


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "over,message",
    [
        ({"downsample_factor": 3}, "downsample_factor 3 is invalid"),
        ({"downsample_factor": 1}, "downsample_factor 1 is invalid"),
        ({"downsample_factor": 0}, "downsample_factor 0 is invalid"),
        ({"downsample_factor": 6}, "downsample_factor 6 is invalid"),
        ({"image_size": 30, "downsample_factor": 4}, "image_size 30 is not divisible by downsample_factor 4"),
        (
            {"layout": "pyramid", "downsample_factor": 4, "channel_mult": (1, 2)},
            r"channel_mult \(1, 2\) has 2",
        ),
        (
            {"layout": "pyramid", "downsample_factor": 2, "channel_mult": (1, 2, 2)},
            r"channel_mult \(1, 2, 2\)",
        ),
        ({"layout": "pyramids"}, "unknown autoencoder layout 'pyramids'"),
        ({"channels": 10}, "width 10 is not divisible by norm_groups=4"),
        ({"latent_channels": 0}, "latent_channels 0 is invalid"),
    ],
)
def test_bad_configs_name_the_bad_value(over, message):
    with pytest.raises(DifflabError, match=message):
        _small(**over)


def test_inputs_of_the_wrong_shape_are_errors():
    model = KLAutoencoder(_small(downsample_factor=4))  # 16x16x3 <-> 4x4x3
    for x in (
        torch.randn(2, 3, 32, 32),
        torch.randn(2, 1, 16, 16),
        torch.randn(3, 16, 16),
        torch.randn(2, 3, 16, 8),
    ):
        with pytest.raises(
            DifflabError, match=rf"image batch of shape \({x.shape[0]}, .*expected \(B, 3, 16, 16\)"
        ):
            model.encode(x)
    for z in (torch.randn(2, 4, 4, 4), torch.randn(2, 3, 8, 8), torch.randn(3, 4, 4)):
        with pytest.raises(DifflabError, match=r"latent batch of shape .*expected \(B, 3, 4, 4\)"):
            model.decode(z)
    with pytest.raises(DifflabError, match="image batch"):
        model(torch.randn(1, 3, 8, 8))


# --- the batched cache -----------------------------------------------------------------------------


def test_cached_arrays_from_batches_equal_those_from_items_and_are_read_back(tmp_path):
    n, key = 10, {"kind": "test", "v": 1}

    def item(i):
        return {"x": np.arange(6, dtype=np.float32).reshape(2, 3) * i, "y": np.int64(i * i)}

    calls = []

    def batch(start, stop):
        calls.append((start, stop))
        items = [item(i) for i in range(start, stop)]
        return {k: np.stack([it[k] for it in items]) for k in ("x", "y")}

    by_item = cached_arrays(tmp_path / "a", "t", key, n, item)
    by_batch = cached_arrays(tmp_path / "b", "t", key, n, make_batch=batch, batch_size=3)
    assert calls == [(0, 3), (3, 6), (6, 9), (9, 10)]  # the last batch is short
    assert by_item.keys() == by_batch.keys() == {"x", "y"}
    for k in by_item:
        assert by_item[k].dtype == by_batch[k].dtype and np.array_equal(by_item[k], by_batch[k]), k
    assert by_batch["x"].shape == (10, 2, 3)
    path, _ = cache_file(tmp_path / "b", "t", key)
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == [path.name]  # the same name as by item
    assert (tmp_path / "a" / path.name).is_file()

    calls.clear()
    again = cached_arrays(tmp_path / "b", "t", key, n, make_batch=batch, batch_size=3)
    assert calls == []  # read from disk, nothing recomputed
    assert all(np.array_equal(again[k], by_batch[k]) for k in by_batch)
    # the item-built file serves a batch caller too: the key, not the builder, names the arrays
    from_item_file = cached_arrays(tmp_path / "a", "t", key, n, make_batch=batch)
    assert calls == [] and np.array_equal(from_item_file["x"], by_batch["x"])


def test_cached_arrays_needs_exactly_one_builder(tmp_path):
    with pytest.raises(ValueError, match="exactly one of make_item and make_batch"):
        cached_arrays(tmp_path, "t", {}, 2)
    with pytest.raises(ValueError, match="exactly one"):
        cached_arrays(tmp_path, "t", {}, 2, lambda i: {"v": np.zeros(1)}, make_batch=lambda a, b: {})
