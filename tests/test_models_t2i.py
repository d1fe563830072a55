"""Text-to-image (Stable-Diffusion style): cross-attention and its maps, guidance batching, the captioned
training set with held-out pairs, a tiny model that learns to follow colour words, the run directory, the
CLI and the demo. Sources: closed forms (softmax rows sum to one, the fused kernel), independent
computations (two separate passes), properties (no held-out pair is ever drawn), the reader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.config import apply_overrides
from difflab.data.toy import scene_image
from difflab.diffusion.denoiser import Denoiser
from difflab.diffusion.guidance import classifier_free_guidance
from difflab.diffusion.schedules import make_schedule
from difflab.errors import DifflabError
from difflab.models import clip, t2i, t2i_eval, vae
from difflab.models.attention_maps import CrossAttentionMaps
from difflab.models.registry import get_preset
from difflab.models.t2i_network import TextConditionedUNet
from difflab.models.text_encoder import export_text_encoder
from difflab.nn.attention import MultiHeadAttention
from difflab.nn.unet import UNet, UNetConfig
from difflab.world.geneval import CATEGORIES, category, eval_prompts, mentions_heldout
from difflab.world.prompts import holds, scene_for
from difflab.world.reader import read
from difflab.world.scene import Obj, Scene, scene_at, world_preset
from tests.t2i_checks import colour_accuracy

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    return clip.train(get_preset("clip_tiny").build(), tmp_path_factory.mktemp("clip") / "run")


@pytest.fixture(scope="module")
def encoder_dir(clip_run, tmp_path_factory):
    return export_text_encoder(clip_run, tmp_path_factory.mktemp("encoder") / "te")


def _cfg(encoder_dir, *overrides):
    return apply_overrides(get_preset("t2i_tiny").build(), [f"text_encoder={encoder_dir}", *overrides])


@pytest.fixture(scope="module")
def t2i_run(encoder_dir, tmp_path_factory):
    """t2i_tiny in pixels on the tiny world (2 shapes x 2 colours), trained in seconds."""
    return t2i.train(_cfg(encoder_dir), tmp_path_factory.mktemp("t2i") / "run")


# ------------------------------------------------------------------------------------ cross-attention


def test_cross_attention_shapes_and_padding_mask():
    """Queries (B, N, dim) attend to a context (B, M, context_dim); masked (padding) tokens have no
    influence on the output, whatever they hold."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(32, 4, context_dim=24)
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 6, 24)
    mask = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    out = attn(x, ctx, mask)
    assert out.shape == (2, 10, 32)
    ctx2 = ctx.clone()
    ctx2[0, 4:] = 100 * torch.randn(2, 24)  # change only the padding of item 0
    assert torch.allclose(attn(x, ctx2, mask), out, atol=1e-6)
    assert not torch.allclose(attn(x, ctx2, None)[0], out[0], atol=1e-3)  # unmasked, it would matter


def test_probs_hook_path_equals_fused_kernel_and_rows_sum_to_one():
    """The written-out softmax(QK^T/sqrt(d))V that the hook sees gives the fused kernel's output, and
    every query's probabilities over the unmasked tokens sum to 1 (masked ones are 0)."""
    torch.manual_seed(1)
    attn = MultiHeadAttention(32, 4, context_dim=16)
    x, ctx = torch.randn(3, 9, 32), torch.randn(3, 5, 16)
    mask = torch.tensor([[True] * 3 + [False] * 2] * 3)
    fused = attn(x, ctx, mask)
    seen = []
    attn.probs_hook = seen.append
    written = attn(x, ctx, mask)
    assert torch.allclose(written, fused, atol=1e-5)
    (probs,) = seen
    assert probs.shape == (3, 4, 9, 5)
    assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 9), atol=1e-6)
    assert probs[..., 3:].abs().max() == 0


def test_probs_hook_can_replace_the_probabilities():
    """Prompt-to-Prompt's seam: a hook that returns new probabilities changes the output to them @ V."""
    torch.manual_seed(2)
    attn = MultiHeadAttention(16, 2, context_dim=8)
    x, ctx = torch.randn(1, 4, 16), torch.randn(1, 3, 8)
    attn.probs_hook = lambda p: torch.zeros_like(p).index_fill_(-1, torch.tensor([1]), 1.0)  # all on token 1
    out = attn(x, ctx)
    v = attn.to_v(ctx)  # (1, 3, 16): every query now reads token 1's value
    assert torch.allclose(out, attn.to_out(v[:, 1:2].expand(1, 4, 16)), atol=1e-6)


def _unzeroed(unet: UNet) -> UNet:
    """The UNet with its zero-initialised layers (output conv, each block's last conv) made random: at
    initialisation they hide every effect of the conditioning."""
    for p in unet.parameters():
        if p.ndim > 1 and not p.detach().any():
            torch.nn.init.normal_(p, std=0.1)
    return unet


def test_unet_text_conditioning_shapes_and_pooled_embedding():
    cfg = UNetConfig(in_channels=4, out_channels=4, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8,), heads=2, norm_groups=4, context_dim=12, pooled_dim=6)  # fmt: skip
    torch.manual_seed(3)
    unet = _unzeroed(UNet(cfg))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    ctx, mask, pooled = torch.randn(2, 7, 12), torch.ones(2, 7, dtype=torch.bool), torch.randn(2, 6)
    out = unet(x, t, context=ctx, context_mask=mask, pooled=pooled)
    assert out.shape == (2, 4, 8, 8)
    assert not torch.allclose(unet(x, t, context=ctx, context_mask=mask, pooled=-pooled), out, atol=1e-4)
    assert not torch.allclose(unet(x, t, context=-ctx, context_mask=mask, pooled=pooled), out, atol=1e-4)


def test_guidance_batch_equals_two_separate_passes():
    """Classifier-free guidance with text conditioning runs [cond; null] in one batch; the result equals
    eps_null + w (eps_cond - eps_null) from two separate passes (the null prompt broadcast to the batch)."""
    cfg = UNetConfig(in_channels=3, out_channels=3, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                     attention_resolutions=(8, 4), heads=2, norm_groups=4, context_dim=12, pooled_dim=6)  # fmt: skip
    torch.manual_seed(4)
    unet = _unzeroed(UNet(cfg)).eval()
    denoiser = Denoiser(unet, make_schedule("cosine", 1000), "v_prediction")
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([999, 400, 20])
    cond = {"context": torch.randn(3, 7, 12), "context_mask": torch.tensor([[True] * 5 + [False] * 2] * 3),
            "pooled": torch.randn(3, 6)}  # fmt: skip
    null = {"context": torch.randn(1, 7, 12), "context_mask": torch.tensor([[True] * 2 + [False] * 5]),
            "pooled": torch.randn(1, 6)}  # fmt: skip
    with torch.no_grad():
        eps_g, x0_g = classifier_free_guidance(denoiser, 4.0, null)(x, t, **cond)
        eps_c, x0_c = denoiser(x, t, **cond)
        eps_u, x0_u = denoiser(x, t, **{k: v.expand(3, *v.shape[1:]) for k, v in null.items()})
    assert torch.allclose(eps_g, eps_u + 4.0 * (eps_c - eps_u), atol=1e-5)
    assert torch.allclose(x0_g, x0_u + 4.0 * (x0_c - x0_u), atol=1e-5)


def test_text_layers_pick_hidden_states(clip_run):
    """Layer -1 is the CLIP tower's own output; (0, -1) puts the token embeddings (through the final
    LayerNorm) beside it, so the context is twice as wide; a layer the tower lacks is an error."""
    from difflab.models.text_encoder import load_text_encoder

    last = load_text_encoder(clip_run)
    both = load_text_encoder(clip_run, layers=(0, -1))
    model, _ = clip.load_model(clip_run)
    ids, mask = last.tokenizer.encode(["a red circle", "a blue square"])
    _, tokens = model.text(ids, mask)
    enc, enc2 = last.encode_ids(ids, mask), both.encode_ids(ids, mask)
    assert torch.allclose(enc.tokens, tokens, atol=1e-6) and both.width == 2 * last.width == 64
    assert torch.allclose(enc2.tokens[..., 32:], tokens, atol=1e-6)
    embedded = model.text.token_embed(ids) + model.text.pos_embed[: ids.shape[1]]
    assert torch.allclose(enc2.tokens[..., :32], model.text.norm(embedded), atol=1e-6)
    with pytest.raises(DifflabError, match=r"text layer 3 is out of range; this text tower has layers 0..1"):
        load_text_encoder(clip_run, layers=(3,))


def test_context_pool_adds_the_masked_mean_of_the_context():
    """Imagen-style pooling: only the unmasked tokens' mean reaches the time embedding."""
    cfg = UNetConfig(in_channels=3, out_channels=3, image_size=8, channels=16, channel_mult=(1,), num_res_blocks=1,
                     attention_resolutions=(), heads=2, norm_groups=4, context_dim=6, context_pool=True)  # fmt: skip
    torch.manual_seed(5)
    unet = _unzeroed(UNet(cfg))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 300])
    ctx, mask = torch.randn(2, 5, 6), torch.tensor([[True, True, False, False, False]] * 2)
    out = unet(x, t, context=ctx, context_mask=mask)
    moved = ctx.clone()
    moved[:, 2:] += 50  # padding: no effect
    assert torch.allclose(unet(x, t, context=moved, context_mask=mask), out, atol=1e-5)
    swapped = ctx.clone()
    swapped[:, [0, 1]] = ctx[:, [1, 0]]  # the same mean: no effect (no cross-attention in this UNet)
    assert torch.allclose(unet(x, t, context=swapped, context_mask=mask), out, atol=1e-5)
    assert not torch.allclose(unet(x, t, context=ctx * 2, context_mask=mask), out, atol=1e-3)


# ---------------------------------------------------------------------------------------------- data


def test_captioned_scenes_hold_out_pairs_and_captions_are_true():
    """No training scene shows a held-out (colour, shape) pair, every caption is true of its scene, and
    an item is a pure function of its index (exact resume)."""
    data = t2i.TextDataConfig(world="scene32", n=400)
    scenes = t2i.captioned_scenes(data, clip.world_tokenizer(24))
    pairs = data.pairs()
    assert len(pairs) == 5
    for i in range(400):
        scene = scenes.scene(i)
        text, prompt, _ = scenes.caption(i)
        assert not mentions_heldout(scene, pairs), i
        assert holds(prompt, scene) and text == prompt.text(), text
    a, b = scenes[7], scenes[7]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["ids"], b["ids"])
    assert a["ids"].shape == a["mask"].shape == (24,) and a["image"].shape == (3, 32, 32)


def test_short_captions_take_their_share_and_leave_the_rest_unchanged():
    """short_prob takes its share of the captions, in GenEval's forms, true of the scene; every other item
    keeps the caption it had without short captions (one draw picks the kind), so earlier runs' data
    is unchanged by the option's existence."""
    base = t2i.captioned_scenes(t2i.TextDataConfig(world="scene32", n=600))
    mixed = t2i.captioned_scenes(t2i.TextDataConfig(world="scene32", n=600, short_prob=0.5))
    short = 0
    for i in range(600):
        text, prompt, _ = mixed.caption(i)
        assert holds(prompt, mixed.scene(i)), text
        if text != base.caption(i)[0]:
            short += 1
            assert category(prompt) in CATEGORIES, text  # a GenEval form, without sizes or positions
    # a short caption can coincide with the partial one it replaced ('a circle'), so a few are not counted
    assert 0.40 * 600 < short <= 0.5 * 600 + 3 * (0.5 * 0.5 * 600) ** 0.5, short
    with pytest.raises(
        DifflabError,
        match=r"short_prob 0.8 is invalid; expected a probability in \[0, 1 - "
        r"describe_prob = 0.75\]",
    ):
        t2i.TextDataConfig(short_prob=0.8)


def test_min_objects_draws_only_scenes_with_that_many_and_none_keeps_the_world():
    """min_objects = 2 on scene32 gives two objects in every scene (the reader counts them in the pixels),
    with true captions; None leaves the world's own scenes, so earlier runs' data is unchanged."""
    two = t2i.captioned_scenes(t2i.TextDataConfig(world="scene32", n=200, min_objects=2))
    default = t2i.captioned_scenes(t2i.TextDataConfig(world="scene32", n=200))
    world = world_preset("scene32")
    for i in range(200):
        scene = two.scene(i)
        assert len(scene.objects) == 2 and holds(two.caption(i)[1], scene), i
        drawn = scene_at(world, 0, i)  # the world's own scene i (seed 0), unless it shows a held-out pair
        if not mentions_heldout(drawn, default.heldout):
            assert default.scene(i) == drawn, i
    assert {len(default.scene(i).objects) for i in range(200)} == {1, 2}
    assert all(len(read(two[i]["image"], world).objects) == 2 for i in range(20))
    with pytest.raises(
        DifflabError, match="min_objects 3 is invalid; the 'scene32' world has 1 to 2 objects"
    ):
        t2i.TextDataConfig(world="scene32", min_objects=3)


def test_heldout_pairs_are_checked():
    with pytest.raises(
        DifflabError, match="held-out pair 'purple circle' is invalid; expected 'colour shape'"
    ):
        t2i.TextDataConfig(heldout_pairs=("purple circle",))
    assert apply_overrides(get_preset("t2i_demo").build(), ["data.heldout_pairs="]).data.heldout_pairs == ()


# ------------------------------------------------------------------------------------------- learning


def test_tiny_text_to_image_follows_colour_words(t2i_run):
    """The tiny world has 2 colours, so chance is 0.5: the prompt's one colour word must decide the colour
    of what is drawn, far above chance."""
    model, cfg = t2i.load_model(t2i_run)
    assert colour_accuracy(model, cfg, 8) >= 0.85


@pytest.mark.slow  # 45 s of training: in .ci/run's second, end-to-end pass, to keep the default run under 10 minutes
def test_tiny_text_to_image_in_pixel_patches_follows_colour_words(encoder_dir, tmp_path):
    """Pixels folded into 2 x 2 patches (8x8x12 for the 16px tiny world) and normalised: the recorded
    shift and scale make the training pixels zero-mean, unit-variance, and the model learns colour words:
    of 32 images, chance (2 colours) is 0.5 ± 0.09, so 0.75 is more than two and a half standard errors
    above it. Patches learn more slowly than the tiny pixel model (0.81 here at 400 steps, against 0.85+ at
    200), as at demo scale (docs/t2i.md, "The demo in less time")."""
    run = t2i.train(
        _cfg(encoder_dir, "pixel_patch=2", "pixel_norm=true", "train.steps=400"), tmp_path / "run"
    )
    model, cfg = t2i.load_model(run)
    assert (cfg.unet.in_channels, cfg.unet.image_size) == (12, 8)
    images = torch.stack([t2i.captioned_scenes(cfg.data)[i]["image"] for i in range(t2i.PIXEL_STATS_N)])
    x = t2i.codec(cfg).encode(images)
    assert abs(x.mean().item()) < 1e-3 and x.std().item() == pytest.approx(1.0, abs=1e-3)
    assert colour_accuracy(model, cfg, 8) >= 0.75
    with pytest.raises(DifflabError, match="pixel_patch 3 does not divide the 16px images"):
        t2i.resolve(_cfg(encoder_dir, "pixel_patch=3"))
    with pytest.raises(
        DifflabError, match="pixel_patch 2 / pixel_norm False are set with vae .*only on pixels"
    ):
        _cfg(encoder_dir, "pixel_patch=2", f"vae={tmp_path}")


def test_eval_reports_faithfulness_per_category_with_n(t2i_run):
    report = t2i.evaluate(t2i_run, 4, steps=5)
    faith = report["faithfulness"]["all"]
    # the tiny world has one object a scene: single object, counting and colours (2 + 2 + 4 prompts)
    assert set(faith) == {"single_object", "counting", "colors", "overall"}
    assert {faith[c]["n"] for c in ("single_object", "counting", "colors")} == {4}
    assert faith["overall"]["n"] == 12 and 0 <= faith["overall"]["score"] <= 1
    assert report["steps"] == 5 and report["prompts_per_category"] == 4


def test_score_of_a_perfect_model_is_one_and_counts_its_objects():
    """Images of scenes in which each prompt holds (world.prompts.scene_for: a perfect text-to-image model)
    score 1.0 in every category, and objects_read counts exactly the objects those scenes hold (the reader
    is exact on real scenes), category by category."""
    world = world_preset("scene32")
    prompts = eval_prompts("scene32", 5)
    rng = np.random.default_rng(0)
    scenes = [scene_for(p, rng, world) for p in prompts]
    images = torch.stack([scene_image(s, world) for s in scenes])
    report = t2i_eval.score(prompts, images, "scene32", ())
    assert all(v["score"] == 1.0 for v in report["all"].values())
    expected: dict[str, dict[str, int]] = {}
    for p, s in zip(prompts, scenes, strict=True):
        counts = expected.setdefault(category(p), {})
        counts[str(len(s.objects))] = counts.get(str(len(s.objects)), 0) + 1
    assert report["objects_read"] == {c: dict(sorted(h.items())) for c, h in expected.items()}
    assert {sum(h.values()) for h in report["objects_read"].values()} == {5}
    assert set(report["objects_read"]["attribute_binding"]) == {"2"}  # two named objects, at most two
    assert report["two_coloured_objects"] == {c: 0 for c in expected}  # the world draws one colour each


def test_two_coloured_objects_are_counted_apart_from_extra_ones():
    """An image of one shape painted half in another colour: the reader reads two objects (the prompt of
    one fails), and two_coloured_objects says it was one object in two colours, not an extra one."""
    world = world_preset("scene32")
    prompts = [p for p in eval_prompts("scene32", 5) if category(p) == "single_object"][:2]
    red = scene_image(Scene((Obj("square", "red", "large", 0.5, 0.5),)), world)
    blue = scene_image(Scene((Obj("square", "blue", "large", 0.5, 0.5),)), world)
    half = torch.cat([blue[:, :, :16], red[:, :, 16:]], dim=2)  # (3, 32, 32): left half blue
    report = t2i_eval.score(prompts, torch.stack([half, red]), "scene32", ())
    assert report["objects_read"]["single_object"] == {"1": 1, "2": 1}
    assert report["two_coloured_objects"] == {"single_object": 1}


def test_attention_maps_are_probabilities_over_tokens(t2i_run):
    """Averaged over heads, layers and steps, each pixel's map over the prompt's tokens still sums to 1."""
    model, cfg = t2i.load_model(t2i_run)
    maps = CrossAttentionMaps(16)
    t2i.generate(model, cfg, ["a red circle", "a blue square"], steps=4, cfg_scale=3.0, attention=maps)
    m = maps.maps()
    assert m.shape == (2, 16, 16, 16)  # (prompts, context length, H, W)
    assert torch.allclose(m.sum(1), torch.ones(2, 16, 16), atol=1e-4)
    assert m[:, 5:].abs().max() < 1e-6  # 'a red circle' is <bos> a red circle <eos>: the rest is padding
    assert all(
        layer.probs_hook is None for layer in model.network.modules() if isinstance(layer, MultiHeadAttention)
    )


def test_resume_is_exact(encoder_dir, tmp_path):
    cfg = _cfg(encoder_dir, "train.steps=6", "train.checkpoint_every=3", "train.sample_every=null")
    whole = t2i.train(cfg, tmp_path / "whole")
    half = t2i.train(apply_overrides(cfg, ["train.steps=3"]), tmp_path / "half")
    t2i.train(cfg, half, resume=True)
    a, _ = t2i.load_model(whole)
    b, _ = t2i.load_model(half)
    for (name, p), q in zip(a.network.state_dict().items(), b.network.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------- latents, errors


def test_latent_text_to_image_trains_on_cached_latents(encoder_dir, tmp_path):
    vae_run = vae.train(apply_overrides(get_preset("vae_tiny").build(), ["train.steps=20"]), tmp_path / "vae")
    cfg = _cfg(encoder_dir, f"vae={vae_run}", "train.steps=4", "sample.grid=2")
    run = t2i.train(cfg, tmp_path / "t2i")
    saved = t2i.load_config(run)
    assert saved.unet.in_channels == 4 and saved.unet.image_size == 8 and saved.latent_scale > 0
    assert saved.unet.context_dim == 32 and saved.unet.pooled_dim == 32
    assert list((vae_run / "latent_cache").glob("latents-*.safetensors"))
    model, cfg = t2i.load_model(run)
    assert t2i.generate(model, cfg, ["a red circle"], steps=2).shape == (1, 3, 16, 16)


def test_text_refiner_is_trained_saved_and_resumed(encoder_dir, tmp_path):
    """With text_refiner_layers the network is refiner + UNet; the refiner sees the padding mask (padding
    tokens change nothing), is saved with the run, and a resume with another depth is refused."""
    cfg = _cfg(encoder_dir, "text_refiner_layers=1", "train.steps=3", "sample.grid=2")
    run = t2i.train(cfg, tmp_path / "run")
    model, saved = t2i.load_model(run)
    net = model.network
    assert isinstance(net, TextConditionedUNet) and saved.text_refiner_layers == 1
    assert any(name.startswith("refiner.") for name, _ in net.named_parameters())
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 500])
    enc = model.conditioner.encoder(["a red circle", "a blue square"])
    out = net(x, t, context=enc.tokens, context_mask=enc.mask, pooled=enc.pooled)
    padded = enc.tokens.clone()
    padded[:, 6:] = 7.0  # beyond <eos>
    assert torch.allclose(net(x, t, context=padded, context_mask=enc.mask, pooled=enc.pooled), out, atol=1e-5)
    with pytest.raises(DifflabError, match="cannot resume"):
        t2i.train(apply_overrides(cfg, ["text_refiner_layers=2", "train.steps=4"]), run, resume=True)


def test_errors_name_the_problem(encoder_dir, t2i_run, tmp_path, capsys):
    with pytest.raises(
        DifflabError, match="text-to-image needs a frozen text encoder: --set text_encoder=DIR"
    ):
        t2i.train(get_preset("t2i_tiny").build(), tmp_path / "x")
    model, cfg = t2i.load_model(t2i_run)
    with pytest.raises(DifflabError, match="unknown word 'purple'"):
        t2i.generate(model, cfg, ["a purple circle"])
    with pytest.raises(DifflabError, match="prompts must be a non-empty list of strings"):
        t2i.generate(model, cfg, "a red circle")
    with pytest.raises(DifflabError, match=r"--n 101 is invalid; expected 1..100 prompts per category"):
        eval_prompts("scene32", 101)
    assert main(["generate", str(tmp_path / "nothing"), "a red circle"]) == 2
    assert "is not a difflab run directory" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", str(t2i_run), "--temperature", "0.5"]) == 2  # an 'sd' run has no planner
    assert "--temperature is the layout planner's; " in capsys.readouterr().err


def test_changed_text_encoder_is_refused(clip_run, tmp_path):
    import shutil

    te = export_text_encoder(clip_run, tmp_path / "te")
    run = t2i.train(apply_overrides(get_preset("t2i_tiny").build(), [f"text_encoder={te}", "train.steps=2"]),
                    tmp_path / "run")  # fmt: skip
    shutil.copy(te / "text_encoder.safetensors", tmp_path / "w")
    weights = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(tmp_path / "w"))
    weights["text_proj.weight"] += 1
    __import__("safetensors.torch", fromlist=["save_file"]).save_file(
        weights, str(te / "text_encoder.safetensors")
    )
    with pytest.raises(DifflabError, match="has changed since"):
        t2i.load_model(run)


# ------------------------------------------------------------------------------------------------ CLI


def test_generate_writes_grid_and_attention(t2i_run, tmp_path, capsys):
    out, att = tmp_path / "g.png", tmp_path / "a.png"
    argv = ["generate", str(t2i_run), "a red circle", "a blue square", "--n", "2", "--steps", "4",
            "--out", str(out), "--attention", str(att)]  # fmt: skip
    assert main(argv) == 0
    assert out.read_bytes()[:4] == att.read_bytes()[:4] == b"\x89PNG"
    assert "wrote 4 images of 2 prompt(s)" in capsys.readouterr().out


def test_eval_cli_json(t2i_run, capsys):
    assert main(["eval", str(t2i_run), "--n", "2", "--steps", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["faithfulness"]["all"]["overall"]["n"] == 6


def test_demo_text_to_image_tiny(tmp_path, capsys):
    """The main job's text-to-image path end to end on tiny presets: text encoder, model, grid, attention
    maps, and a report with faithfulness per category. On pixel patches the default --vae-preset (auto)
    trains no autoencoder."""
    argv = ["demo", "--out", str(tmp_path), "--preset", "t2i_tiny", "--text-preset", "clip_tiny", "--n", "3",
            "--set", "train.steps=30", "--set", "pixel_patch=2"]  # fmt: skip
    assert main(argv) == 0
    assert (
        not (tmp_path / "vae").exists()
        and "vae_seconds" not in json.loads((tmp_path / "report.json").read_text())["timings"]
    )
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("world.png", "samples.png", "attention.png", "text_encoder/text_encoder.safetensors",
                 "run/config.json"):  # fmt: skip
        assert (tmp_path / name).is_file(), name
    assert report["eval"]["faithfulness"]["all"]["overall"]["n"] == 9
    assert set(report["timings"]) >= {"text_encoder_seconds", "t2i_seconds", "eval_seconds", "total_seconds"}
    assert "faithfulness" in capsys.readouterr().out
