"""InstructPix2Pix (difflab.models.instruct): the widened first convolution leaves the base exactly as it was,
the three dropouts partition 15 % of the steps, the training pairs are the world's edits, the judge is exact,
and a tiny editor learns recolouring far above the untrained one and the naive regeneration."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.cli import main
from difflab.config import apply_overrides
from difflab.data.toy import scene_image
from difflab.errors import DifflabError
from difflab.models import instruct, instruct_eval, t2i
from difflab.models.codecs import Latents, Pixels
from difflab.models.conditioners import InstructedPrompts, Instructions, TextPrompts
from difflab.models.registry import get_preset
from difflab.models.t2i_network import build_network
from difflab.models.text_encoder import TextEncoding
from difflab.nn.attention import SpatialAttention
from difflab.nn.vae import KLAutoencoder
from difflab.world.edits import Edit, edit_holds
from difflab.world.prompts import ObjectSpec
from difflab.world.scene import Obj, Scene, world_preset

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def editor_run(tiny_t2i_base, tmp_path_factory):
    cfg = apply_overrides(get_preset("instruct_tiny").build(), [f"base={tiny_t2i_base}"])
    return instruct.train(cfg, tmp_path_factory.mktemp("instruct") / "run")


# ------------------------------------------------------------------------------------------ the network


@pytest.mark.parametrize("recipe,added,positions", [("sd", (), False), ("layout", (), False),
                                                    ("layout", (16,), False), ("layout", (16,), True)])  # fmt: skip
def test_a_fresh_editor_is_the_base_bitwise_whatever_the_image(recipe, added, positions):
    """Sec. 3.2.1: the added input channels start at zero, so before training the editor is the base; so
    do the attention layers it adds where the base has none (their output projections are zero) and the
    position embeddings it gives every attention layer (zero)."""
    cfg = t2i.resolve(get_preset(f"t2i_{'layout_' if recipe == 'layout' else ''}tiny").build(), attach=False)
    torch.manual_seed(0)
    base = build_network(cfg)
    for p in base.parameters():  # a base whose output layer is not a fresh zero
        p.data.normal_(0, 0.1)
    editor = instruct.InstructNet(copy.deepcopy(base), cfg.unet.in_channels, added, positions=positions)
    attention = [m for m in editor.modules() if isinstance(m, SpatialAttention)]
    embeddings = [m.pos for m in attention if m.pos is not None]
    assert len(embeddings) == (len(attention) if positions else 0) and not any(p.any() for p in embeddings)
    # the tiny presets attend at 8x8 and in the middle; at side 16 one resblock down and two up gain a layer
    new = [m for m in editor.modules() if isinstance(m, SpatialAttention) and not m.self_attn.to_out.weight.any()]
    assert len(new) == 3 * len(added)
    side, c = cfg.unet.image_size, cfg.unet.in_channels
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, c, side, side, generator=g), torch.tensor([5, 800])
    cond = {"context": torch.randn(2, 6, cfg.unet.context_dim, generator=g)}
    want = base(x, t, **cond)
    for image in (None, torch.zeros(2, c, side, side), torch.randn(2, c, side, side, generator=g)):
        assert torch.equal(editor(x, t, edit_image=image, **cond), want)
    conv = getattr(editor.net, "unet", editor.net).conv_in
    assert conv.weight.shape[1] == 2 * c and not conv.weight[:, c:].any()
    if added:  # the new layers train: a step moves their zero output projections (and the positions)
        editor(x, t, edit_image=x, **cond).square().mean().backward()
        assert all(a.self_attn.to_out.weight.grad.abs().sum() > 0 for a in new)
        # positions of the base's layers move at once (a new layer's, once its output projection has)
        assert all(m.pos.grad.abs().sum() > 0 for m in attention if positions and m not in new)



def test_without_global_text_the_editor_starts_as_the_base_reading_the_empty_prompt():
    """global_text=False removes the two paths that add the whole sentence to every block (pooled
    embedding, mean token feature); the constant in their place is what they added for "", so the fresh
    editor is the base on the empty prompt, and no prompt reaches it but through cross-attention."""
    cfg = t2i.resolve(apply_overrides(get_preset("t2i_layout_tiny").build(),
                                      ["unet.context_pool=true", "text_refiner_layers=1"]), attach=False)  # fmt: skip
    torch.manual_seed(0)
    base = build_network(cfg)
    for p in base.parameters():
        p.data.normal_(0, 0.1)
    side, c, width = cfg.unet.image_size, cfg.unet.in_channels, cfg.unet.context_dim
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, c, side, side, generator=g), torch.tensor([5, 800])

    def encoding(n_tokens: int) -> TextEncoding:  # a text encoder's output, unit-length pooled as CLIP's
        tokens, pooled = torch.randn(1, 6, width, generator=g), torch.randn(1, cfg.unet.pooled_dim, generator=g)
        return TextEncoding(tokens, torch.arange(6)[None] < n_tokens, pooled / pooled.norm())

    empty, prompt = encoding(2), encoding(5)  # '<bos> <eos>', and a five-token prompt

    def cond(e: TextEncoding) -> dict:
        return {"context": e.tokens.expand(2, -1, -1), "context_mask": e.mask.expand(2, -1),
                "pooled": e.pooled.expand(2, -1)}  # fmt: skip

    editor = instruct.InstructNet(copy.deepcopy(base), c, global_text=False, null_text=empty)
    unet = editor.net.unet
    assert unet.pooled_embed is None and unet.context_pool is None
    out = editor(x, t, edit_image=torch.randn_like(x), **cond(empty))
    torch.testing.assert_close(out, base(x, t, **cond(empty)), rtol=0, atol=1e-5)
    other = prompt._replace(pooled=-prompt.pooled)  # another sentence vector, the same tokens
    assert torch.equal(editor(x, t, **cond(prompt)), editor(x, t, **cond(other)))
    assert not torch.allclose(base(x, t, **cond(prompt)), base(x, t, **cond(other)))
    reloaded = instruct.InstructNet(build_network(cfg), c, global_text=False)  # the constant is a weight
    reloaded.load_state_dict(editor.state_dict())
    assert torch.equal(reloaded(x, t, **cond(prompt)), editor(x, t, **cond(prompt)))

def test_added_attention_names_a_side_the_unet_lacks():
    cfg = t2i.resolve(get_preset("t2i_layout_tiny").build(), attach=False)
    with pytest.raises(DifflabError, match=r"added_attention 8 is not a side .* expected one of \[16\]"):
        instruct.InstructNet(build_network(cfg), cfg.unet.in_channels, (8,))


def test_the_dropouts_partition_fifteen_percent_of_the_steps(tiny_t2i_base):
    """5 % instruction alone, 5 % image alone, 5 % both, never overlapping (Sec. 3.2.1)."""
    system, cfg = t2i.load_model(tiny_t2i_base)
    conditioner = InstructedPrompts(TextPrompts(system.conditioner.encoder, 0.0, pooled=False), system.codec,
                                    (3, 16, 16), (0.05, 0.05, 0.05))  # fmt: skip
    b = 20_000
    ids, mask = system.conditioner.encoder.tokenizer.encode("make the circle blue")
    batch = {"ids": ids.expand(b, -1), "mask": mask.expand(b, -1), "source": torch.ones(b, 3, 16, 16)}
    out = conditioner.for_training(batch, torch.Generator().manual_seed(0), b, "cpu")
    null = conditioner.inner.encode([""])["context"][0]
    text_dropped = (out["context"] == null).flatten(1).all(1)
    image_dropped = (out["edit_image"] == 0).flatten(1).all(1)
    rates = [(text_dropped & ~image_dropped).float().mean(), (image_dropped & ~text_dropped).float().mean(),
             (text_dropped & image_dropped).float().mean()]  # fmt: skip
    for rate in rates:  # binomial sd at p = 0.05, n = 20,000: 0.0015
        assert abs(rate - 0.05) < 0.006


def test_requests_and_configs_name_their_bad_values(tiny_t2i_base):
    with pytest.raises(DifflabError, match=r"input images of shape \(1, 3, 16, 16\) for 2 instructions"):
        Instructions(["make the circle blue", "remove the circle"], torch.zeros(1, 3, 16, 16))
    with pytest.raises(DifflabError, match=r"drops \(0.5, 0.3, 0.3\) is invalid"):
        instruct.InstructConfig(drops=(0.5, 0.3, 0.3))
    with pytest.raises(DifflabError, match="base=RUN"):
        instruct.resolve(get_preset("instruct_tiny").build())


# ------------------------------------------------------------------------------------------------ data


def test_training_pairs_are_the_world_s_edits_of_the_base_s_scenes(tiny_t2i_base):
    base_cfg = t2i.load_config(tiny_t2i_base)
    cfg = instruct.resolve(apply_overrides(get_preset("instruct_tiny").build(), [f"base={tiny_t2i_base}"]))
    encoder = t2i.load_model(tiny_t2i_base)[0].conditioner.encoder
    pairs = instruct.training_pairs(cfg, base_cfg, encoder.tokenizer)
    world = pairs.world
    for i in (0, 7):
        item, (edit, after) = pairs[i], pairs.edit(i)
        before = pairs.scenes.scene(i)
        assert torch.equal(item["source"], scene_image(before, world))
        assert torch.equal(item["image"], scene_image(after, world))
        assert torch.equal(item["ids"], encoder.tokenizer.encode(edit.text())[0][0])
        assert edit_holds(edit, before, after) and pairs.edit(i) == (edit, after)  # deterministic


# --------------------------------------------------------------------------------------------- judging


def _case() -> instruct_eval.EditCase:
    circle = Obj("circle", "red", "large", 0.3, 0.3, 0.3)
    square = Obj("square", "blue", "small", 0.75, 0.75, 0.7)
    before = Scene((circle, square))
    after = Scene((Obj("circle", "green", "large", 0.3, 0.3, 0.3), square))
    return instruct_eval.EditCase(before, Edit("recolor", ObjectSpec(shape="circle"), color="green"), after)


def test_the_judge_passes_the_asked_for_scene_and_fails_the_untouched_input():
    world = world_preset("scene32")
    case = _case()
    done = instruct_eval.judge(case, scene_image(case.after, world), world)
    assert done == {"success": True, "preserved": True, "psnr_background": 100.0}
    untouched = instruct_eval.judge(case, scene_image(case.before, world), world)
    assert untouched["success"] is False and untouched["preserved"] is True
    wrong = Scene((case.after.objects[0],))  # recoloured, but the unnamed square is gone
    gone = instruct_eval.judge(case, scene_image(wrong, world), world)
    assert gone["success"] is False and gone["preserved"] is False


def test_the_codec_ceiling_is_exact_in_pixels_and_below_it_through_an_autoencoder():
    """Pixels pass the asked-for scene unchanged, so a perfect pixel editor scores 1; an (untrained)
    autoencoder's reconstructions are what a perfect latent editor could output at best."""
    world = world_preset("scene32")
    cases = instruct_eval.edit_cases(world, 6)
    exact = instruct_eval.through_codec(Pixels(), cases, world)
    assert torch.equal(exact, torch.stack([scene_image(c.after, world) for c in cases]))
    assert all(instruct_eval.judge(c, e, world)["success"] for c, e in zip(cases, exact, strict=True))
    blurred = instruct_eval.through_codec(Latents(KLAutoencoder(get_preset("vae_tiny").build().vae), 1.0), cases,
                                          world, batch_size=4)  # fmt: skip
    assert blurred.shape == exact.shape and not torch.equal(blurred, exact)


# ------------------------------------------------------------------------------------------ training


@pytest.mark.slow  # trains the tiny editor (~40 s); the default run keeps under 10 minutes
def test_a_tiny_editor_learns_recolouring_far_above_the_untrained_one(editor_run, tiny_t2i_base):
    """Held-out scenes: the trained editor does what it is told; the untrained one (the base, which cannot
    see the input) and the naive regeneration from the asked-for description do not keep the picture."""
    system, cfg = instruct.load_model(editor_run)
    report = instruct.evaluate_editor(system, cfg, 32)
    trained, naive = report["instruct"]["all"], report["naive"]["all"]
    fresh = instruct.InstructNet(t2i.load_model(tiny_t2i_base)[0].network, cfg.unet.in_channels)
    untrained = instruct.evaluate_editor(type(system)(fresh, system.conditioner, system.codec).eval(), cfg, 32,
                                         baseline=False)["instruct"]["all"]  # fmt: skip
    assert trained["success"] >= 0.9, report
    assert trained["success"] >= untrained["success"] + 0.3, (trained, untrained)
    assert trained["psnr_background"] >= naive["psnr_background"] + 6, (trained, naive)
    assert report["codec"]["all"]["success"] == 1.0  # a pixel base: the ceiling is the rendered scene itself
    lines = [json.loads(line) for line in (editor_run / "edits.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == cfg.train.steps and (editor_run / "pairs.png").exists()


@pytest.mark.slow  # trains the tiny editor (~40 s); the default run keeps under 10 minutes
def test_edit_draws_an_image_file_and_names_bad_input(editor_run, tmp_path, capsys):
    world = world_preset("tiny")
    scene = Scene((Obj("circle", "red", "large", 0.5, 0.5),))
    path = tmp_path / "in.png"
    Image.fromarray(((scene_image(scene, world).permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()).save(path)
    out = tmp_path / "edit.png"
    assert main(["edit", str(editor_run), "make the circle blue", "--image", str(path), "--seeds", "2", "--steps",
                 "4", "--out", str(out)]) == 0  # fmt: skip
    assert out.exists() and "2 edit(s)" in capsys.readouterr().out
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "small.png")
    assert main(["edit", str(editor_run), "make the circle blue", "--image", str(tmp_path / "small.png")]) == 2
    assert "16" in capsys.readouterr().err
    assert main(["edit", str(editor_run), "make the circle blue"]) == 2
    assert "--image FILE" in capsys.readouterr().err


@pytest.mark.slow  # trains the tiny editor (~40 s); the default run keeps under 10 minutes
def test_edit_eval_prints_a_table_per_kind_and_refuses_a_text_to_image_run(editor_run, tiny_t2i_base, capsys):
    assert main(["edit", str(editor_run), "--eval", "4", "--steps", "4", "--json", "--no-baseline"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["instruct"]["all"]["n"] == 4 and "naive" not in report
    assert main(["edit", str(editor_run), "--eval", "2", "--steps", "3", "--json", "--p2p"]) == 0
    report = json.loads(capsys.readouterr().out)  # the tiny world's edits are all recolours: word swaps
    assert report["p2p"]["all"]["n"] == 2 and report["naive"]["all"]["n"] == 2
    assert main(["edit", str(tiny_t2i_base), "--eval", "4"]) == 2
    assert "t2i run" in capsys.readouterr().err
