"""Layout-grounded text-to-image (LMD + GLIGEN): word-to-object grounding of true captions, the caption ->
layout planner, grounding tokens and gated self-attention, and a tiny grounded model that learns.
Sources: the prompt's own ``holds`` (grounding), closed forms (Fourier features, pixel boxes), GLIGEN's
zero-initialised gate (bitwise equality with the base UNet), properties (valid slots), the reader."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.cli import main
from difflab.config import apply_overrides
from difflab.errors import DifflabError
from difflab.models import clip, planner, t2i
from difflab.models.conditioners import GroundedPrompts, Layouts
from difflab.models.layout import layout_fields, object_box, phrase_index, phrases
from difflab.models.registry import get_preset
from difflab.models.text_encoder import export_text_encoder, load_text_encoder
from difflab.nn.gligen import (
    BOX_COORD_FEATURES,
    BOX_COORD_FREQS,
    GatedSelfAttention,
    GroundingMap,
    box_coordinates,
    coverage,
    fourier_boxes,
    pixel_boxes,
)
from difflab.nn.unet import UNet, UNetConfig
from difflab.world.geneval import eval_prompts
from difflab.world.grounding import caption_order, ground
from difflab.world.language import caption, short_caption
from difflab.world.prompts import Exists, ObjectSpec, Relation, matches, relation_holds
from difflab.world.scene import placeable, scene_at, world_preset
from tests.t2i_checks import colour_accuracy

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    run = clip.train(get_preset("clip_tiny").build(), tmp_path_factory.mktemp("clip") / "run")
    return export_text_encoder(run, tmp_path_factory.mktemp("encoder") / "te")


@pytest.fixture(scope="module")
def layout_run(encoder_dir, tiny_planner, tmp_path_factory):
    cfg = apply_overrides(get_preset("t2i_layout_tiny").build(),
                          [f"text_encoder={encoder_dir}", f"planner={tiny_planner}"])  # fmt: skip
    return t2i.train(cfg, tmp_path_factory.mktemp("layout") / "run")


# ------------------------------------------------------------------------------------------ grounding


@pytest.mark.parametrize("world_name", ["scene32", "scene64"])
def test_ground_names_the_objects_of_every_mention(world_name):
    """For true captions of every style, each mention's objects match its phrase, a relation's pair stands
    in the relation, a count names exactly n objects, and the caption order lists every object once,
    the named ones first."""
    world = world_preset(world_name)
    for i in range(300):
        scene = scene_at(world, 5, i)
        rng = np.random.default_rng(i)
        _, prompt = (caption if i % 2 else short_caption)(scene, rng)
        groups = ground(prompt, scene)
        specs = [prompt.spec] if hasattr(prompt, "spec") else [prompt.a, prompt.b] if isinstance(prompt, Relation) \
            else list(prompt.parts)  # fmt: skip
        assert len(groups) == len(specs)
        for spec, group in zip(specs, groups, strict=True):
            assert group and all(matches(spec, scene.objects[j]) for j in group)
        if isinstance(prompt, Relation):
            assert relation_holds(prompt.relation, scene.objects[groups[0][0]], scene.objects[groups[1][0]])
        if hasattr(prompt, "n"):
            assert len(groups[0]) == prompt.n
        named = [j for g in groups for j in g]
        assert len(set(named)) == len(named)  # distinct objects for distinct mentions
        order = caption_order(prompt, scene)
        assert sorted(order) == list(range(len(scene.objects))) and order[: len(named)] == named


def test_ground_refuses_a_false_caption():
    scene = scene_at(world_preset("scene32"), 0, 0)
    absent = next(s for s in world_preset("scene32").shapes if all(o.shape != s for o in scene.objects))
    with pytest.raises(DifflabError, match="does not hold"):
        ground(Exists(ObjectSpec(shape=absent)), scene)


# ------------------------------------------------------------------------------- GLIGEN building blocks


def test_fourier_boxes_closed_form_and_pixel_boxes_tile_the_canvas():
    box = torch.tensor([[0.25, 0.5, 0.75, 1.0]])
    f = fourier_boxes(
        box, freqs=2
    )  # (1, 16): per coordinate c, sin(pi c), sin(2 pi c), cos(pi c), cos(2 pi c)
    expected = [
        g(math.pi * c * s) for c in (0.25, 0.5, 0.75, 1.0) for g in (math.sin, math.cos) for s in (1, 2)
    ]
    assert torch.allclose(f[0], torch.tensor(expected), atol=1e-6)
    boxes = pixel_boxes(4)  # (16, 4)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).sum()
    assert torch.isclose(area, torch.tensor(1.0)) and boxes.min() == 0 and boxes.max() == 1
    assert torch.equal(boxes[1], torch.tensor([0.25, 0.0, 0.5, 0.25]))  # row-major: pixel (0, 1)


def _unet_cfg(grounding_dim, grounding_map=False, coords=False):
    return UNetConfig(in_channels=3, out_channels=3, image_size=8, channels=16, channel_mult=(1, 2),
                      num_res_blocks=1, attention_resolutions=(8, 4), heads=2, norm_groups=4, context_dim=12,
                      grounding_dim=grounding_dim, grounding_map=grounding_map,
                      grounding_map_coords=coords)  # fmt: skip


@pytest.mark.parametrize(("grounding_map", "coords"), [(False, False), (True, False), (True, True)])
def test_zero_gate_leaves_the_grounded_unet_bitwise_equal_to_the_base(grounding_map, coords):
    """GLIGEN Eq. 8 with gamma = 0: v + tanh(0) * attention = v, exactly, whatever the grounding says; the
    grounding map's zero-initialised projection adds exactly 0 too."""
    torch.manual_seed(0)
    base = UNet(_unet_cfg(None))
    grounded = UNet(_unet_cfg(6, grounding_map, coords))
    missing, unexpected = grounded.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and missing and all(".grounding." in k or "grounding_map." in k for k in missing)
    for p in base.conv_out.parameters():  # a non-zero output layer, so equality is not 0 == 0
        torch.nn.init.normal_(p)
    grounded.conv_out.load_state_dict(base.conv_out.state_dict())
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([3, 700]), torch.randn(2, 5, 12)
    tokens = 10 * torch.randn(2, 3, 6)
    boxes = torch.tensor([0.1, 0.2, 0.6, 0.9]).expand(2, 3, 4)
    out = grounded(
        x, t, context=ctx, grounding=tokens, grounding_boxes=boxes,
        grounding_mask=torch.tensor([[1, 1, 0], [1, 0, 0]]).bool(),
    )  # fmt: skip
    assert torch.equal(out, base(x, t, context=ctx))
    assert out.abs().max() > 0
    for m in grounded.modules():  # open the gates: now the grounding must matter
        if isinstance(m, GatedSelfAttention):
            m.gate.data.fill_(1.0)
    assert not torch.allclose(
        grounded(x, t, context=ctx, grounding=tokens, grounding_boxes=boxes), out, atol=1e-4
    )


def test_coverage_is_the_share_of_each_pixel_inside_the_box():
    """Closed form on a 4 x 4 canvas: a box over the left half of the first row and half of the second."""
    cover = coverage(pixel_boxes(4), torch.tensor([[[0.0, 0.0, 0.5, 0.375]]]))  # (1, 16, 1)
    expected = torch.zeros(4, 4)
    expected[0, :2], expected[1, :2] = 1.0, 0.5
    assert torch.allclose(cover[0, :, 0].reshape(4, 4), expected)
    whole = coverage(pixel_boxes(4), torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]))
    assert torch.allclose(whole, torch.ones_like(whole))


def test_grounding_map_paints_each_object_only_inside_its_box():
    torch.manual_seed(2)
    painter = GroundingMap(grounding_dim=6, channels=5)
    torch.nn.init.normal_(painter.proj.weight)  # trained: no longer zero
    torch.nn.init.normal_(painter.proj.bias)
    h = torch.randn(1, 5, 4, 4)
    tokens = torch.randn(1, 2, 6)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])  # top-left and bottom-right quarters
    delta = painter(h, tokens, torch.tensor([[True, False]]), boxes) - h  # the second object is padding
    assert torch.allclose(
        delta[0, :, :2, :2], painter.proj(tokens[0, 0])[:, None, None].expand(5, 2, 2), atol=1e-6
    )
    assert delta[0, :, 2:, :].abs().max() == 0 and delta[0, :, :, 2:].abs().max() == 0
    assert torch.equal(painter(h, None), h)
    with pytest.raises(DifflabError, match="needs the objects' boxes"):
        painter(h, tokens)


def test_box_coordinates_put_each_pixel_centre_in_the_box_frame():
    """Closed form: on a 4 x 4 canvas the box (0, 0, 0.5, 1) has the first two columns' centres at
    u = -0.5 and 0.5, the rows' at v = -0.75 .. 0.75; features are u, v, then sin and cos of 2^k pi/2 u, v."""
    features = box_coordinates(pixel_boxes(4), torch.tensor([[[0.0, 0.0, 0.5, 1.0]]]))  # (1, 16, 1, F)
    assert features.shape == (1, 16, 1, BOX_COORD_FEATURES)
    uv = features[0, :, 0, :2].reshape(4, 4, 2)
    assert torch.allclose(uv[0, :, 0], torch.tensor([-0.5, 0.5, 1.5, 2.5]))
    assert torch.allclose(uv[:, 0, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    k = BOX_COORD_FREQS
    assert torch.allclose(
        features[0, 0, 0, 2 : 2 + k], torch.sin(-0.5 * torch.pi / 2 * 2.0 ** torch.arange(k))
    )


def test_grounding_map_with_coordinates_paints_where_in_the_box_and_only_inside_it():
    torch.manual_seed(3)
    painter = GroundingMap(grounding_dim=6, channels=5, coords=True)
    h, tokens = torch.randn(1, 5, 4, 4), torch.randn(1, 1, 6)
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])
    assert torch.equal(painter(h, tokens, None, boxes), h)  # zero-initialised: the base model
    torch.nn.init.normal_(painter.proj.weight)
    delta = painter(h, tokens, None, boxes) - h
    assert delta[0, :, 2:, :].abs().max() == 0 and delta[0, :, :, 2:].abs().max() == 0
    inside = delta[0, :, :2, :2].reshape(5, 4)  # the box's four pixels get four different vectors
    assert torch.cdist(inside.T, inside.T).add(torch.eye(4)).min() > 1e-3


def test_gated_attention_ignores_padded_objects_and_passes_without_grounding():
    torch.manual_seed(1)
    gated = GatedSelfAttention(16, 2, grounding_dim=6)
    gated.gate.data.fill_(1.0)
    v, tokens = torch.randn(2, 16, 16), torch.randn(2, 3, 6)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = gated(v, 4, tokens, mask)
    changed = tokens.clone()
    changed[0, 2], changed[1, 1:] = 100.0, -100.0  # padding only
    assert torch.allclose(gated(v, 4, changed, mask), out, atol=1e-6)
    changed[0, 0] = 100.0  # a real object
    assert not torch.allclose(gated(v, 4, changed, mask)[0], out[0], atol=1e-3)
    assert torch.equal(gated(v, 4, None), v)


def test_layout_fields_name_each_object_and_box_it():
    world = world_preset("scene32")
    assert len(set(phrases(world))) == len(world.sizes) * len(world.colors) * len(world.shapes)
    for i in range(50):
        scene = scene_at(world, 1, i)
        f = layout_fields(scene, world)
        assert f["g_mask"].sum() == len(scene.objects)
        for k, obj in enumerate(scene.objects):
            assert phrases(world)[int(f["g_phrase"][k])] == f"{obj.size} {obj.color} {obj.shape}"
            assert phrase_index(obj, world) == int(f["g_phrase"][k])
            x0, y0, x1, y1 = f["g_box"][k].tolist()
            assert x0 < obj.x < x1 and y0 < obj.y < y1
            assert math.isclose(x1 - x0, 2 * world.radius[obj.size], rel_tol=1e-6)
            assert object_box(obj, world) == pytest.approx((x0, y0, x1, y1))


# ---------------------------------------------------------------------------------------------- planner


@pytest.mark.parametrize("world_name", ["scene32", "scene64"])
@pytest.mark.parametrize("slot_fields", ["sequential", "parallel"])
def test_untrained_planner_emits_only_valid_slots(world_name, slot_fields):
    """Constrained decoding: whatever the weights, every layout has the world's number of objects, each a
    shape, colour, size and a free cell its size fits in; the scene puts each object in its cell."""
    base = get_preset("planner_tiny").build()
    cfg = dataclasses.replace(base, slot_fields=slot_fields,
                              data=dataclasses.replace(base.data, world=world_name, heldout_pairs=()))  # fmt: skip
    world = world_preset(world_name)
    tokenizer = planner.make_tokenizer(dataclasses.replace(cfg, context_length=40))
    torch.manual_seed(0)
    model = planner.LayoutPlanner(dataclasses.replace(cfg, context_length=40), tokenizer).eval()
    prompts = ["a red circle", "two squares", "a cross to the left of a blue diamond"] * 20
    ids, mask = tokenizer.encode(prompts)
    layouts = model.sample(ids, mask, torch.Generator().manual_seed(0))
    counts = set()
    for slots in layouts:
        counts.add(len(slots))
        assert world.min_objects <= len(slots) <= world.max_objects
        cells = [s["cell"] for s in slots]
        assert len(set(cells)) == len(cells)
        for s in slots:
            assert s["shape"] in world.shapes and s["color"] in world.colors and s["size"] in world.sizes
            assert placeable(world, s["size"], *divmod(s["cell"], 3))
        scene = planner.layout_scene(slots, world, np.random.default_rng(0))
        assert [3 * o.cell[0] + o.cell[1] for o in scene.objects] == cells
    assert len(counts) > 1  # random weights draw layouts of several sizes


def test_planner_temperature_sharpens_the_draws_to_the_argmax():
    """Logits / T before the softmax: as T -> 0 every draw is the most likely allowed token, so two seeds
    plan the same layouts and each prompt gets one layout (diversity 1); at T = 1 they differ."""
    cfg = get_preset("planner_tiny").build()
    tokenizer = planner.make_tokenizer(cfg)
    torch.manual_seed(0)
    model = planner.LayoutPlanner(cfg, tokenizer).eval()
    ids, mask = tokenizer.encode(
        ["a red circle", "two squares", "a cross to the left of a blue diamond"] * 10
    )

    def at(temperature: float) -> planner.LayoutPlanner:  # the same weights, sampled at another temperature
        other = planner.LayoutPlanner(dataclasses.replace(cfg, temperature=temperature), tokenizer).eval()
        other.load_state_dict(model.state_dict())
        return other

    cold = [at(1e-3).sample(ids, mask, torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert cold[0] == cold[1]
    warm = [at(1.0).sample(ids, mask, torch.Generator().manual_seed(s)) for s in (0, 1)]
    assert warm[0] != warm[1]
    prompts = eval_prompts("scene32", 3)
    frozen = planner.diversity(at(1e-3), cfg, prompts)
    assert frozen["overall"] == 1.0 and set(frozen) >= {"position", "attribute_binding", "draws"}
    assert planner.diversity(model, cfg, prompts)["overall"] > 1.5  # the untrained planner at its default 0.5
    with pytest.raises(DifflabError, match="temperature"):
        dataclasses.replace(cfg, temperature=0.0)


PROMPT_TEXT = st.one_of(
    st.text(max_size=60),  # any unicode: control characters, emoji, right-to-left, empty
    st.lists(
        st.sampled_from(
            [
                "a",
                "red",
                "blue",
                "circle",
                "square",
                "two",
                "left",
                "of",
                "the",
                "and",
                "zz",
                "",
                "  ",
                "\n",
                ",",
                "seven",
                "above",
            ]
        ),
        max_size=25,
    ).map(" ".join),  # fmt: skip
)


@settings(max_examples=60, deadline=None)
@given(prompt=PROMPT_TEXT)
def test_generated_prompts_are_planned_or_refused_by_name(prompt):
    """Any text given as a prompt is planned into a valid scene of the world, or refused with a
    DifflabError; never another exception."""
    cfg = dataclasses.replace(get_preset("planner_tiny").build(), context_length=16)
    tokenizer = planner.make_tokenizer(cfg)
    torch.manual_seed(0)
    model = planner.LayoutPlanner(cfg, tokenizer).eval()
    world = world_preset(cfg.data.world)
    try:
        (scene,) = planner.plan(model, tokenizer, [prompt], seed=1)
    except DifflabError:
        return
    assert world.min_objects <= len(scene.objects) <= world.max_objects


def test_planner_learns_the_prompt(tiny_planner):
    """On the tiny world every prompt is a colour and/or shape of the one object: the trained planner's
    layouts satisfy them (chance: 1/2 per named attribute), where the untrained one does not."""
    report = planner.evaluate(tiny_planner, 20)
    assert report["temperature"] == 0.5 and 1 <= report["diversity"]["overall"] <= planner.DIVERSITY_DRAWS
    assert report["faithfulness"]["all"]["overall"]["score"] >= 0.95
    assert report["faithfulness"]["all"]["colors"]["score"] >= 0.95
    assert planner.evaluate(tiny_planner, 5, temperature=2.0)["temperature"] == 2.0


# ---------------------------------------------------------------------------------------- grounded model


def test_grounded_prompts_drop_the_layout_with_the_caption(encoder_dir):
    encoder = load_text_encoder(encoder_dir)
    world = world_preset("scene32")
    cond = GroundedPrompts(encoder, 0.5, pooled=True, world=world)
    scenes = [scene_at(world, 0, i) for i in range(64)]
    fields = [layout_fields(s, world) for s in scenes]
    ids, mask = encoder.tokenizer.encode(["a circle"] * 64)
    batch = {k: torch.stack([f[k] for f in fields]) for k in fields[0]} | {"ids": ids, "mask": mask}
    out = cond.for_training(batch, torch.Generator().manual_seed(0), 64, "cpu")
    dropped = (out["context_mask"] == cond.null_mask).all(1)
    assert 0 < dropped.sum() < 64
    assert not out["grounding_mask"][dropped].any()
    assert torch.equal(out["grounding_mask"][~dropped], batch["g_mask"][~dropped])
    assert out["grounding_phrases"].shape == (64, world.max_objects, encoder.width)
    c, null = cond.condition(Layouts(["a circle"], scenes[:1]), 1, "cpu")
    assert not null["grounding_mask"].any() and c["grounding_mask"].sum() == len(scenes[0].objects)
    with pytest.raises(DifflabError, match="no planner"):
        cond.condition(["a circle"], 1, "cpu")


def test_tiny_layout_model_follows_colour_words(layout_run):
    """Chance is 0.5 (two colours): the planned layout's phrase and box must decide what is drawn."""
    model, cfg = t2i.load_model(layout_run)
    assert colour_accuracy(model, cfg, 8) >= 0.85


def test_layout_recipe_checks_its_inputs(encoder_dir, tiny_planner):
    cfg = get_preset("t2i_layout_tiny").build()
    with pytest.raises(DifflabError, match="needs a layout planner"):
        t2i.resolve(dataclasses.replace(cfg, text_encoder=str(encoder_dir)))
    scene32 = apply_overrides(cfg, [f"text_encoder={encoder_dir}", f"planner={tiny_planner}", "data.world=scene32",
                                    "data.heldout_pairs="])  # fmt: skip
    with pytest.raises(DifflabError, match="plans 'tiny' scenes"):
        t2i.resolve(scene32)
    with pytest.raises(DifflabError, match="grounding_dim 8 is set but recipe 'sd'"):
        t2i.resolve(apply_overrides(get_preset("t2i_tiny").build(), ["unet.grounding_dim=8"]), attach=False)
    with pytest.raises(DifflabError, match="recipe 'mmdit2' is invalid|text-to-image recipe"):
        apply_overrides(cfg, ["recipe=mmdit2"])


def test_demo_layout_recipe_tiny(tmp_path, capsys):
    """The main job's default path (planner + grounded painter) end to end on tiny presets: the planner is
    trained for the painter's world, the grid shows the planned layouts, the report scores every category."""
    argv = ["demo", "--out", str(tmp_path), "--preset", "t2i_layout_tiny", "--vae-preset", "none", "--text-preset",
            "clip_tiny", "--planner-preset", "planner_tiny", "--n", "3", "--set", "train.steps=30"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert json.loads((tmp_path / "planner" / "config.json").read_text())["data"]["world"] == "tiny"
    for name in ("samples.png", "attention.png", "planner/config.json", "run/config.json"):
        assert (tmp_path / name).is_file(), name
    assert report["eval"]["faithfulness"]["all"]["overall"]["n"] == 9
    assert "planner_seconds" in report["timings"]
    assert "faithfulness" in capsys.readouterr().out


def test_a_grounding_map_option_without_its_parts_is_refused_by_name():
    with pytest.raises(DifflabError, match="grounding_map is set but grounding_dim is None"):
        _unet_cfg(None, grounding_map=True)
    with pytest.raises(DifflabError, match="grounding_map_coords is set but grounding_map is off"):
        _unet_cfg(6, grounding_map=False, coords=True)


def test_an_adapter_teaches_a_layout_run_the_star(layout_run, tmp_path):
    """A layout base learns the star too (models/adapt_layout.py): the planner plans it as a stand-in shape,
    the phrase table gains its phrases, and the adapter loads back onto a fresh base that then plans and
    paints stars; the base's files stay as they were."""
    from difflab.models import adapt

    before = {p.name: p.read_bytes() for p in sorted(layout_run.rglob("*.safetensors"))}
    cfg = apply_overrides(
        get_preset("lora_tiny").build(), [f"base={layout_run}", "train.steps=20", "images=16"]
    )
    run = adapt.train(cfg, tmp_path / "star")
    assert {p.name: p.read_bytes() for p in sorted(layout_run.rglob("*.safetensors"))} == before
    system, _ = t2i.load_model(layout_run)
    adapt.apply_adapter(system, run)
    request = system.conditioner.plan(["a red star", "a blue circle"], seed=0)
    assert [o.shape for o in request.scenes[0].objects] == ["star"]
    assert "star" not in [o.shape for o in request.scenes[1].objects]
    images = t2i.generate(system, t2i.load_config(layout_run), request, steps=4)
    assert images.shape[0] == 2 and torch.isfinite(images).all()
