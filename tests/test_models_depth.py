"""Depth by diffusion (Marigold) and its single-step end-to-end fine-tuning: the network's start, the
judge, and a tiny estimator that learns (slow: it trains its own latent base on the 16x16 depth world)."""

import copy

import numpy as np
import pytest
import torch

from difflab.config import apply_overrides
from difflab.errors import DifflabError
from difflab.models import depth, depth_eval, vae
from difflab.models.registry import get_preset
from difflab.models.t2i_network import build_network
from difflab.world.render import render
from difflab.world.scene import Scene, world_preset


def test_duplicated_halved_input_weights_give_the_base_when_image_and_depth_latents_agree():
    """Marigold, Sec. 3.2: the widened first layer's weights are the base's, duplicated and halved, so with
    the image latent equal to the noisy depth latent the estimator computes exactly what the base does."""
    cfg = get_preset("t2i_tiny").build()
    torch.manual_seed(0)
    base = build_network(cfg)
    with torch.no_grad():  # away from the zero-initialised output layers, so equal outputs mean something
        for w in base.parameters():
            w.add_(0.1 * torch.randn_like(w))
    net = depth.DepthNet(copy.deepcopy(base), cfg.unet.in_channels)
    x, t = torch.randn(2, cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size), torch.tensor([3, 700])
    context = torch.randn(2, 4, cfg.unet.context_dim)
    kw = {"context": context, "pooled": torch.randn(2, cfg.unet.pooled_dim)} if cfg.unet.pooled_dim else {
        "context": context}
    torch.testing.assert_close(net(x, t, edit_image=x, **kw), base(x, t, **kw), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(net(x, t, edit_image=torch.zeros_like(x), **kw), base(x, t, **kw), atol=1e-3)


def test_the_judge_scores_the_truth_perfectly_and_a_constant_as_the_mean():
    world = world_preset("depth32")
    rs = [render(s, world) for s in depth_eval.eval_scenes(world, 6)]
    truth = torch.from_numpy(np.stack([r.depth for r in rs]))
    masks = torch.from_numpy(np.stack([r.mask for r in rs]))
    perfect = depth_eval.summary(depth_eval.score(3 * truth + 1, truth, masks))  # any positive affine map
    assert perfect["abs_rel"] == pytest.approx(0, abs=1e-6) and perfect["delta1"] == 1.0
    assert perfect["pair_order"] == 1.0
    flat = depth_eval.score(torch.zeros_like(truth), truth, masks)
    expected = ((truth - truth.mean(dim=(1, 2), keepdim=True)).abs() / truth).mean(dim=(1, 2))
    torch.testing.assert_close(flat["abs_rel"], expected.double(), rtol=1e-6, atol=1e-6)
    swapped = depth_eval.score(-truth, truth, masks)  # near and far exchanged: every pair wrong
    assert swapped["pairs"] > 0 and swapped["pair_order"] == 0.0


def test_depth_images_are_eq3_normalised_and_three_channels():
    d = render(Scene(()), world_preset("depth16")).depth
    img = depth_eval.depth_image(d)
    assert img.shape == (3, 16, 16) and img.min() == -1 and img.max() == 1
    torch.testing.assert_close(img[0], img[2])


def test_an_autoencoder_can_see_depth_maps_in_a_share_of_its_items():
    cfg = apply_overrides(get_preset("vae_tiny").build(), ["data.world=depth16", "depth_share=0.5"])
    data = vae.training_set(vae.resolve(cfg))
    plain = vae.training_set(vae.resolve(apply_overrides(cfg, ["depth_share=0.0"])))
    swapped = [not torch.equal(data[i]["image"], plain[i]["image"]) for i in range(200)]
    assert 0.4 < np.mean(swapped) < 0.6
    i = swapped.index(True)
    torch.testing.assert_close(data[i]["image"], depth_eval.depth_image(render(plain.scene(i), plain.cfg).depth))
    with pytest.raises(DifflabError, match="depth_share 0.5 needs the toy world"):
        apply_overrides(cfg, ["data.dataset=digits"])


def test_a_base_must_be_a_latent_run_on_a_world_with_visible_depth(tiny_t2i_base):
    with pytest.raises(DifflabError, match="draws pixels"):
        depth.resolve(apply_overrides(get_preset("depth_tiny").build(), [f"base={tiny_t2i_base}"]))
    with pytest.raises(DifflabError, match="--set base=RUN"):
        depth.resolve(get_preset("depth_tiny").build())
    with pytest.raises(DifflabError, match="depth objective 'regress'"):
        apply_overrides(get_preset("depth_tiny").build(), ["objective=regress"])


@pytest.mark.slow
def test_a_tiny_marigold_learns_depth_and_one_step_fine_tuning_keeps_it(depth_base, tmp_path):
    """Far better than each image's mean depth (what an estimator that saw nothing would give, aligned);
    then the end-to-end fine-tuning from it estimates in one deterministic step, as well or better."""
    run = depth.train(apply_overrides(get_preset("depth_tiny").build(), [f"base={depth_base}"]), tmp_path / "m")
    report = depth.evaluate(run, 32, steps=4, ensemble=2)
    assert report["n"] == 32 and report["ensemble"] == 2 and report["spacing"] == "trailing"
    assert report["abs_rel"] < 0.5 * report["mean_depth"]["abs_rel"], report
    assert report["delta1"] > report["mean_depth"]["delta1"] + 0.3, report
    assert (tmp_path / "m" / "samples.png").is_file()
    # Garcia et al.'s flaw: one 'leading' step tells the network t = 0 (clean) while it sees pure noise
    leading = depth.evaluate(run, 16, steps=1, spacing="leading")
    trailing = depth.evaluate(run, 16, steps=1, spacing="trailing")
    assert trailing["abs_rel"] < 0.5 * leading["abs_rel"], (leading, trailing)
    e2e_cfg = apply_overrides(get_preset("depth_tiny").build(), [f"base={run}", "objective=end_to_end",
                                                                 "train.steps=30"])
    e2e = depth.train(e2e_cfg, tmp_path / "e2e")
    one = depth.evaluate(e2e, 32)
    assert one["steps"] == 1 and one["abs_rel"] < 0.5 * one["mean_depth"]["abs_rel"], one
    assert depth.load_config(e2e).painter == str(depth_base)
    system, cfg = depth.load_model(e2e)
    images = depth_eval.grid_images(cfg)[:2]
    a, b = depth.estimate(system, cfg, images)[0], depth.estimate(system, cfg, images, seed=5)[0]
    torch.testing.assert_close(a, b)  # one deterministic step: no noise, whatever the seed


@pytest.mark.slow
def test_the_apps_depth_tab_estimates_held_out_scenes_and_names_a_wrong_run(depth_base, tmp_path):
    from difflab.app import depth_tab

    run = depth.train(apply_overrides(get_preset("depth_tiny").build(), [f"base={depth_base}", "train.steps=30"]),
                      tmp_path / "m")  # fmt: skip
    view = depth_tab.estimate_scenes(str(run), 0, 2, 4, 1, "trailing")
    report = depth.evaluate(run, 2, steps=4)  # the same scenes (seed 0) and noise through difflab eval
    assert np.mean([r for r, _ in view.scores]) == pytest.approx(report["abs_rel"], abs=1e-3)
    assert view.picture.shape[0] > view.picture.shape[1] / 4 and "2 held-out scenes of depth16" in view.summary
    with pytest.raises(DifflabError, match="is a t2i run; the Depth tab takes a depth run"):
        depth_tab.estimate_scenes(str(depth_base), 0, 2, 4, 1, "trailing")
