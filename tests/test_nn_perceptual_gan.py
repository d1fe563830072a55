"""The first-stage autoencoder's extra losses: the download-free perceptual distance (metric properties,
reproducibility from a seed, monotonicity in distortion) and the VQGAN adversarial pieces (PatchGAN
shapes, hinge losses in closed form, Eq. 7's adaptive weight against independent gradients, and a
discriminator that learns to tell sharp from blurred)."""

import pytest
import torch
import torch.nn.functional as F

from difflab.errors import DifflabError
from difflab.nn.discriminator import (
    PatchDiscriminator,
    adaptive_gan_weight,
    generator_hinge_loss,
    hinge_d_loss,
)
from difflab.nn.perceptual import RandomFeaturePerceptualLoss

pytestmark = pytest.mark.usefixtures("single_thread")  # tiny tensors: see tests/conftest.py


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Random smooth images in [-1, 1]: 4x4 noise upsampled bilinearly."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    return F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


def _box_blur(x: torch.Tensor, k: int = 3) -> torch.Tensor:
    return F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)


# --- perceptual distance ---------------------------------------------------------------------------


def test_perceptual_is_zero_on_identical_inputs_and_symmetric():
    loss = RandomFeaturePerceptualLoss()
    x = _smooth_images(4, seed=1)
    y = _smooth_images(4, seed=2)
    assert loss(x, x.clone()).shape == (4,)
    assert torch.equal(loss(x, x.clone()), torch.zeros(4))
    assert torch.allclose(loss(x, y), loss(y, x), atol=1e-7)
    assert (loss(x, y) > 0).all()
    assert (loss(x, -x) <= 4).all()  # each layer averages ||a - b||^2 over unit vectors a, b


def test_perceptual_ignores_a_global_positive_scale():
    # Documented limitation: bias-free ReLU convs are positively homogeneous and every layer is
    # unit-normalised, so a contrast change x -> a x is invisible (hence the pixel loss beside it).
    loss = RandomFeaturePerceptualLoss()
    x = _smooth_images(2, seed=1)
    assert (loss(x, 0.5 * x) < 1e-4).all()  # 0 but for the eps; 2% pixel noise gives ~2.5e-3
    assert (loss(x, -x) > 0.1).all()


def test_perceptual_is_reproducible_from_the_seed_only():
    x, y = _smooth_images(3, seed=1), _smooth_images(3, seed=2)
    a, b = RandomFeaturePerceptualLoss(seed=7), RandomFeaturePerceptualLoss(seed=7)
    assert torch.equal(a(x, y), b(x, y))
    assert not torch.allclose(a(x, y), RandomFeaturePerceptualLoss(seed=8)(x, y))


def test_perceptual_has_no_parameters_no_state_and_leaves_global_rng_alone():
    state = torch.get_rng_state()
    loss = RandomFeaturePerceptualLoss(in_channels=1, widths=(8, 16), seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    assert list(loss.parameters()) == []
    assert loss.state_dict() == {}
    assert len(list(loss.buffers())) == 2  # the conv weights, kept off the checkpoint


def test_perceptual_gradient_flows_to_both_inputs():
    loss = RandomFeaturePerceptualLoss()
    x = _smooth_images(2, seed=1).requires_grad_()
    y = _smooth_images(2, seed=2).requires_grad_()
    loss(x, y).sum().backward()
    for t in (x, y):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_perceptual_grows_with_noise_strength():
    # Property: more corruption is farther. Averaged over a batch so one unlucky draw cannot decide it.
    loss = RandomFeaturePerceptualLoss()
    x = _smooth_images(16, seed=4)
    gen = torch.Generator().manual_seed(5)
    noise = torch.randn(x.shape, generator=gen)
    d = [loss(x, x + s * noise).mean() for s in (0.02, 0.1, 0.3)]
    assert d[0] < d[1] < d[2]


def test_perceptual_blur_is_farther_than_a_tiny_perturbation():
    loss = RandomFeaturePerceptualLoss()
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(6)) * 2 - 1  # sharp texture
    nudged = x + 1e-3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    assert (loss(x, _box_blur(x)) > 10 * loss(x, nudged)).all()


def test_perceptual_shape_mismatch_names_both_shapes():
    loss = RandomFeaturePerceptualLoss()
    with pytest.raises(DifflabError, match=r"\(2, 3, 16, 16\) and \(2, 3, 8, 8\)"):
        loss(torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 8, 8))


# --- PatchGAN discriminator and the VQGAN losses -------------------------------------------------


@pytest.mark.parametrize(
    ("size", "n_layers", "grid"),
    [(32, 2, 6), (16, 1, 6), (12, 2, 1), (64, 3, 6)],  # floor(size / 2**n_layers) - 2, as documented
)
def test_patch_discriminator_grid_shape(size, n_layers, grid):
    disc = PatchDiscriminator(in_channels=3, channels=8, n_layers=n_layers, norm_groups=4)
    assert disc(torch.randn(2, 3, size, size)).shape == (2, 1, grid, grid)


def test_patch_discriminator_rejects_too_small_input():
    disc = PatchDiscriminator(channels=8, n_layers=2, norm_groups=4)
    with pytest.raises(DifflabError, match=r"11x11.*n_layers=2.*12x12"):
        disc(torch.randn(1, 3, 11, 11))


def test_patch_discriminator_is_per_sample():
    # GroupNorm (not BatchNorm): a sample's logits must not depend on its batch companions.
    torch.manual_seed(0)
    disc = PatchDiscriminator(channels=8, n_layers=2, norm_groups=4)
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(disc(x)[:1], disc(x[:1]), atol=1e-6)


def test_hinge_d_loss_hand_computed():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # relu(1 - real) = [0, 0.5], relu(1 + fake) = [0, 1.5]  ->  0.5 * (0.25 + 0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)


def test_generator_hinge_loss_is_minus_mean():
    logits = torch.tensor([[1.0, -3.0], [0.5, 2.5]])
    assert generator_hinge_loss(logits).item() == pytest.approx(-0.25)


def test_adaptive_gan_weight_is_ratio_of_independent_gradient_norms():
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x, target = torch.randn(5, 4), torch.randn(5, 3)

    def losses():
        out = layer(x)
        return (out - target).abs().mean(), -(out * torch.tensor([1.0, -2.0, 0.5])).mean()

    rec, gan = losses()
    weight = adaptive_gan_weight(rec, gan, layer.weight)
    assert not weight.requires_grad

    # Independent reference: two fresh graphs, two ordinary backward passes.
    rec, _ = losses()
    rec.backward()
    g_rec = layer.weight.grad.norm().item()
    layer.weight.grad = None
    _, gan = losses()
    gan.backward()
    g_gan = layer.weight.grad.norm().item()
    assert weight.item() == pytest.approx(g_rec / (g_gan + 1e-4), rel=1e-5)

    # Clamped: a vanishing GAN gradient would otherwise give rec_norm / 1e-4.
    rec, gan = losses()
    assert adaptive_gan_weight(rec, 1e-9 * gan, layer.weight, max_weight=2.0).item() == 2.0


def _square_images(n: int, gen: torch.Generator, size: int = 16) -> torch.Tensor:
    """Sharp images: 2 axis-aligned squares of random size, place and sign on a flat background, each at
    least 0.5 away from it (a square the background's shade has no edge to blur)."""
    imgs = torch.zeros(n, 1, size, size)
    for i in range(n):
        for _ in range(2):
            s = int(torch.randint(3, 8, (1,), generator=gen))
            r, c = torch.randint(0, size - s, (2,), generator=gen).tolist()
            shade = 0.5 + 0.5 * float(torch.rand(1, generator=gen))
            sign = 1.0 if torch.rand(1, generator=gen) < 0.5 else -1.0
            imgs[i, 0, r : r + s, c : c + s] = sign * shade
    return imgs


def test_patch_discriminator_learns_sharp_from_blurred():
    # The job it has in a VQGAN: penalise a decoder's blur that pixel losses accept.
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    disc = PatchDiscriminator(in_channels=1, channels=8, n_layers=1, norm_groups=4)
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    for _ in range(120):
        real = _square_images(16, gen)
        loss = hinge_d_loss(disc(real), disc(_box_blur(real)))
        opt.zero_grad()
        loss.backward()
        opt.step()

    held_out = _square_images(64, torch.Generator().manual_seed(99))
    with torch.no_grad():
        real_logit = disc(held_out).mean(dim=(1, 2, 3))  # (B,) mean over the patch grid
        fake_logit = disc(_box_blur(held_out)).mean(dim=(1, 2, 3))
    assert real_logit.mean() > fake_logit.mean()
    accuracy = torch.cat([real_logit > 0, fake_logit < 0]).float().mean()
    assert accuracy > 0.9
