"""Classifier-free guidance: one batched pass, the w = 1 and w = 0 identities, guidance rescale."""

from __future__ import annotations

import pytest
import torch

from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.guidance import classifier_free_guidance, instruct_guidance, rescale_guidance
from difflab.diffusion.samplers import get_sampler
from difflab.diffusion.schedules import make_schedule
from difflab.errors import DifflabError

SCHEDULE = make_schedule("scaled_linear")
NULL = 3  # the "no class" label


class ClassNet:
    """A toy conditional network: a per-class offset on top of a fixed linear map; counts its calls."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(6, 6, generator=g, dtype=torch.float64) / 3
        self.emb = torch.randn(4, 6, generator=g, dtype=torch.float64)
        self.batches = []

    def __call__(self, x, t, class_labels):
        self.batches.append(x.shape[0])
        return x @ self.w + self.emb[class_labels] * (1 + t[:, None] / 1000)


def pair(pt="v_prediction"):
    net = ClassNet()
    return net, Denoiser(net, SCHEDULE, pt)


def test_guidance_is_one_batched_pass_equal_to_two_separate_passes():
    net, den = pair()
    x = torch.randn(5, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 0, 1])
    guided = classifier_free_guidance(den, 4.0, {"class_labels": torch.tensor([NULL])})
    eps, x0 = guided(x, 700, class_labels=labels)
    assert net.batches == [10]  # one call on the stacked [cond; null] batch
    eps_c, x0_c = den(x, 700, class_labels=labels)
    eps_u, x0_u = den(x, 700, class_labels=torch.full((5,), NULL))
    assert torch.allclose(eps, eps_u + 4.0 * (eps_c - eps_u), atol=1e-12)
    assert torch.allclose(x0, x0_u + 4.0 * (x0_c - x0_u), atol=1e-12)
    # the guided pair is still one consistent reading of x_t: x = alpha x0 + sigma eps
    alpha, sigma = (float(v) for v in SCHEDULE.alpha_sigma(torch.tensor(700)))
    assert torch.allclose(alpha * x0 + sigma * eps, x, atol=1e-12)


def test_scale_one_is_the_conditional_model_and_zero_the_unconditional():
    _, den = pair("epsilon")
    x = torch.randn(3, 6, dtype=torch.float64)
    labels = torch.tensor([2, 0, 1])
    null = {"class_labels": torch.full((3,), NULL)}
    for scale, ref in ((1.0, den(x, 300, class_labels=labels)), (0.0, den(x, 300, **null))):
        eps, x0 = classifier_free_guidance(den, scale, null)(x, 300, class_labels=labels)
        assert torch.allclose(eps, ref[0], atol=1e-12) and torch.allclose(x0, ref[1], atol=1e-12)


def test_guidance_rescale_matches_eqs_15_16_on_the_networks_output():
    """Lin et al. (2024): x_final = phi * x_cfg * std(x_pos)/std(x_cfg) + (1 - phi) * x_cfg, computed per
    sample on the network's own output (here v)."""
    _, den = pair("v_prediction")
    x = torch.randn(4, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 1])
    null = {"class_labels": torch.tensor([NULL])}
    plain = classifier_free_guidance(den, 7.5, null)(x, 500, class_labels=labels)
    v_cfg = den.to_output(*plain, x, 500)
    v_pos = den.to_output(*den(x, 500, class_labels=labels), x, 500)
    for phi in (0.0, 0.7, 1.0):
        eps, x0 = classifier_free_guidance(den, 7.5, null, guidance_rescale=phi)(x, 500, class_labels=labels)
        expected = phi * v_cfg * v_pos.std(1, keepdim=True) / v_cfg.std(1, keepdim=True) + (1 - phi) * v_cfg
        assert torch.allclose(den.to_output(eps, x0, x, 500), expected, atol=1e-12)
    assert torch.allclose(rescale_guidance(v_cfg, v_pos, 1.0).std(1), v_pos.std(1))


def test_guided_sampling_runs_through_every_sampler():
    net, den = pair("v_prediction")
    guided = classifier_free_guidance(den, 3.0, {"class_labels": torch.tensor([NULL])}, guidance_rescale=0.5)
    x_T = torch.randn(2, 6, dtype=torch.float64)
    for name in ("ddim", "dpmpp_2m", "heun"):
        out = get_sampler(name)(guided, x_T, SCHEDULE, 4, cond={"class_labels": torch.tensor([0, 1])})
        assert out.shape == x_T.shape and torch.isfinite(out).all()
    assert set(net.batches) == {4}


def test_guidance_errors():
    _, den = pair()
    guided = classifier_free_guidance(den, 2.0, {"class_labels": torch.tensor([NULL])})
    with pytest.raises(DifflabError, match=r"cond keys \['context'\] and null_cond keys \['class_labels'\]"):
        guided(torch.zeros(1, 6), 0, context=torch.zeros(1, 2))
    with pytest.raises(DifflabError, match="guidance_rescale 1.5 is invalid"):
        classifier_free_guidance(den, 2.0, {}, guidance_rescale=1.5)
    with pytest.raises(DifflabError, match="needs a Denoiser"):
        classifier_free_guidance(lambda x, t: (x, x), 2.0, {}, guidance_rescale=0.5)


# ------------------------------------------------------------------------- InstructPix2Pix's two scales


class ImageTextNet:
    """A toy network of two conditions: a text label and an image vector, each shifting the output."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.w = torch.randn(6, 6, generator=g, dtype=torch.float64) / 3
        self.text = torch.randn(4, 6, generator=g, dtype=torch.float64)
        self.batches = []

    def __call__(self, x, t, class_labels, image):
        self.batches.append(x.shape[0])
        return x @ self.w + self.text[class_labels] + torch.tanh(image) * x


def _two_scale(text_scale, image_scale):
    net = ImageTextNet()
    den = Denoiser(net, SCHEDULE, "v_prediction")
    null_text = {"class_labels": torch.tensor([NULL])}
    null_image = {"image": torch.zeros(1, 6, dtype=torch.float64)}
    return net, den, instruct_guidance(den, text_scale, image_scale, null_text, null_image)


def test_two_scale_guidance_is_eq_3_of_instructpix2pix_in_one_pass():
    """eps~ = eps(0,0) + s_I [eps(c_I,0) - eps(0,0)] + s_T [eps(c_I,c_T) - eps(c_I,0)], from three separate
    passes, equals the guided denoiser's one pass of 3B."""
    net, den, guided = _two_scale(4.0, 1.7)
    x, t = torch.randn(3, 6, dtype=torch.float64), torch.tensor([10, 500, 900])
    labels, image = torch.tensor([0, 1, 2]), torch.randn(3, 6, dtype=torch.float64)
    eps, x0 = guided(x, t, class_labels=labels, image=image)
    assert net.batches == [9]
    full = den(x, t, class_labels=labels, image=image)
    image_only = den(x, t, class_labels=torch.full((3,), NULL), image=image)
    neither = den(x, t, class_labels=torch.full((3,), NULL), image=torch.zeros(3, 6, dtype=torch.float64))
    for k, got in enumerate((eps, x0)):
        want = neither[k] + 1.7 * (image_only[k] - neither[k]) + 4.0 * (full[k] - image_only[k])
        torch.testing.assert_close(got, want)


def test_two_scale_guidance_with_image_scale_one_is_text_guidance():
    """s_I = 1 cancels eps(0,0): ordinary classifier-free guidance of the text, the image in both halves."""
    _, den, guided = _two_scale(3.0, 1.0)
    x, t = torch.randn(2, 6, dtype=torch.float64), torch.tensor([100, 700])
    labels, image = torch.tensor([0, 2]), torch.randn(2, 6, dtype=torch.float64)
    plain = classifier_free_guidance(den, 3.0, {"class_labels": torch.tensor([NULL]), "image": image})
    got = guided(x, t, class_labels=labels, image=image)
    want = plain(x, t, class_labels=labels, image=image)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_two_scale_guidance_names_missing_conditions():
    _, den, guided = _two_scale(3.0, 1.5)
    with pytest.raises(DifflabError, match=r"lack \['image'\]"):
        guided(torch.zeros(1, 6, dtype=torch.float64), 0, class_labels=torch.tensor([0]))
    with pytest.raises(DifflabError, match="null_image is empty"):
        instruct_guidance(den, 3.0, 1.5, {"class_labels": torch.tensor([NULL])}, {})
