"""The Control tab (difflab.app.control_tab) and the Generate tab's cross-attention maps per word, without a
browser: each checked against the library function that computes the same thing on its own (a ControlNet's
request and sampling, ``difflab world condition``, the evaluation's fidelity score, ``CrossAttentionMaps``
recorded by ``t2i.generate``), and bad input as a named one-line error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.app import control_tab, generate_tab
from difflab.app.verdict import judge
from difflab.data.images import to_uint8
from difflab.errors import DifflabError
from difflab.models import control, control_eval, t2i
from difflab.models.attention_maps import CrossAttentionMaps
from difflab.text.tokenizer import normalize
from difflab.world.language import describe
from difflab.world.render import condition
from difflab.world.scene import scene_at, world_preset

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def control_run(tiny_t2i_base, tmp_path_factory, single_thread_module):
    """A ControlNet on the edges of the tiny text-to-image run after 10 steps: enough to load and sample;
    how well it follows edges is test_models_control's business."""
    from difflab.config import apply_overrides
    from difflab.models.registry import get_preset

    cfg = apply_overrides(get_preset("controlnet_tiny").build(),
                          [f"base={tiny_t2i_base}", "train.steps=10", "sample.grid=4"])  # fmt: skip
    return str(control.train(cfg, tmp_path_factory.mktemp("app_control") / "edges"))


@pytest.fixture(scope="module")
def class_run(tmp_path_factory, single_thread_module):
    """A class-conditional pixel run of the tiny world after 2 steps: it reads a class label, no words."""
    from difflab.config import apply_overrides
    from difflab.models import pixel
    from difflab.models.registry import get_preset

    cfg = apply_overrides(get_preset("tiny").build(), ["train.steps=2"])
    return str(pixel.train(cfg, tmp_path_factory.mktemp("app_control") / "class"))


# ------------------------------------------------------------------------------------------ control tab


def _tile(picture: np.ndarray, side: int, rows: int, r: int, c: int) -> np.ndarray:
    """Tile (r, c) of a :func:`~difflab.app.pictures.strip` of ``rows`` rows of side-pixel tiles (1-pixel
    borders), read back from its enlarged picture one pixel per block."""
    k = picture.shape[0] // (rows * (side + 1) + 1)
    y, x = (1 + r * (side + 1)) * k, (1 + c * (side + 1)) * k
    return picture[y : y + side * k : k, x : x + side * k : k]


def test_a_scene_s_condition_is_the_one_difflab_world_condition_draws(control_run, tmp_path, capsys):
    from difflab.cli import main

    scene, hint = control_tab.scene_condition(control_run, 3, 5)
    world = world_preset("tiny")
    assert scene == scene_at(world, 3, 5)
    assert torch.equal(hint, torch.from_numpy(condition(scene, world, "edges"))[None])  # (1, S, S)
    out = tmp_path / "c.png"
    args = ["--preset", "tiny", "--seed", "3", "--index", "5", "--field", "edges", "--out", str(out)]
    assert main(["world", "condition", *args]) == 0
    assert f'"{describe(scene)}"' in capsys.readouterr().out
    with Image.open(out) as img:
        written = torch.from_numpy(np.array(img).astype(np.float32) / 255)
    assert (written - hint[0]).abs().max() <= 0.5 / 255 + 1e-6  # the file is the same image on 8 bits
    picture = control_tab.condition_picture(hint[None])
    assert picture.dtype == np.uint8 and picture.shape[2] == 3
    assert np.array_equal(_tile(picture, 16, 1, 0, 0)[..., 0], (hint[0].numpy() * 255).round())


def test_a_layout_condition_shows_its_colours_above_its_shape_levels():
    world = world_preset("tiny")
    hint = control_eval.condition_image(scene_at(world, 0, 1), world, "layout")  # (4, S, S)
    picture = control_tab.condition_picture(torch.stack([hint, hint]))
    for c in (0, 1):
        assert np.array_equal(_tile(picture, 16, 2, 0, c), (hint[:3].permute(1, 2, 0).numpy() * 255).round())
        assert np.array_equal(_tile(picture, 16, 2, 1, c)[..., 0], (hint[3].numpy() * 255).round())


def test_a_scene_draws_as_the_evaluation_s_request_with_its_fidelity_score(control_run):
    """An empty prompt is the scene's description; the images are control.generate's on control_eval.controls
    (the request ``difflab eval`` scores), and each caption's numbers are control_eval.score's."""
    view = control_tab.control_images(
        control_run, "", source="scene", scene_seed=3, index=5, n=2, steps=4, seed=7
    )
    world = world_preset("tiny")
    scene = scene_at(world, 3, 5)
    model, cfg = control.load_model(control_run)
    request = control_eval.controls([scene, scene], world, "edges", t2i.load_config(cfg.base))
    images = control.generate(model, cfg, request, steps=4, seed=7)
    assert view.prompt == describe(scene)
    assert np.array_equal(view.images, to_uint8(images))
    assert torch.equal(view.hints, request.hints)
    assert view.verdicts == judge(describe(scene), view.images, world)
    assert view.fidelity == [control_eval.score(images[i : i + 1], [scene], world)[0] for i in range(2)]
    assert "control scale 1" in view.summary and "scene 5 of seed 3" in view.summary
    assert "mask IoU" in control_tab.caption(view.verdicts[0], view.fidelity[0])


def test_an_uploaded_condition_draws_as_difflab_generate_control_bitwise(control_run, tmp_path):
    from difflab.cli import main

    out = tmp_path / "edges.png"
    assert main(["world", "condition", "--preset", "tiny", "--index", "2", "--out", str(out)]) == 0
    view = control_tab.control_images(control_run, "a red circle", source="upload", upload=str(out), scale=1.5, n=2,
                                      steps=4, guidance=3, seed=1)  # fmt: skip
    model, cfg = control.load_model(control_run)
    request = control.control_request(model, cfg, ["a red circle"] * 2, str(out), 1.5, 1)
    images = control.generate(model, cfg, request, steps=4, cfg_scale=3.0, seed=1)
    assert np.array_equal(view.images, to_uint8(images))
    assert view.fidelity == [] and "control scale 1.5" in view.summary
    control_tab.control_images(control_run, "a red circle", source="upload", upload=str(out), n=1, steps=1)
    shared = control_tab.load_control_run(control_run)[0]
    assert shared.network.scales == [1.0]  # the run's own scale again, not the last press's


def test_control_tab_errors_are_named(control_run, tiny_t2i_base, tmp_path):
    Image.new("L", (20, 20)).save(tmp_path / "big.png")
    cases = [
        (("", "a red circle"), {}, "no run is chosen"),
        ((str(tmp_path), "x"), {}, f"'{tmp_path}' is not a difflab run directory"),
        (
            (str(tiny_t2i_base), "x"),
            {},
            f"'{tiny_t2i_base}' is a t2i run; the Control tab takes a ControlNet",
        ),
        ((control_run, "x"), {"source": "sketch"}, "unknown condition source 'sketch'"),
        ((control_run, "x"), {"scale": -1}, "control scale -1 is invalid"),
        ((control_run, "x"), {"n": 9}, "n 9 is invalid"),
        ((control_run, "x"), {"index": -1}, "scene index -1 is invalid"),
        ((control_run, "x"), {"scene_seed": -2}, "scene seed -2 is invalid"),
        ((control_run, "x"), {"sampler": "ddmi"}, "unknown sampler 'ddmi'"),
        (
            (control_run, "x"),
            {"source": "upload"},
            "no condition image is uploaded; expected a 16x16 PNG of edges",
        ),
        (
            (control_run, "x"),
            {"source": "upload", "upload": str(tmp_path / "big.png")},
            "is 20x20; expected 16x16",
        ),
        ((control_run, " "), {"source": "upload"}, "the prompt is empty"),
        ((control_run, "x"), {"source": "planner"}, f"'{control_run}' has no layout planner"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(DifflabError) as err:
            control_tab.control_images(*args, **kwargs)
        assert message in str(err.value), (kwargs, str(err.value))
    settings = control_tab.control_settings(control_run)
    assert settings == {"condition": "edges", "planner": False, "control_scale": 1.0, "sampler": "ddim",
                        "steps": 10, "guidance": 2.0}  # fmt: skip
    with pytest.raises(DifflabError, match="use the Control tab"):
        generate_tab.load_run(control_run)


def test_the_tabs_lay_out_inside_blocks(control_run, tiny_t2i_base):
    import gradio as gr

    with gr.Blocks() as page:
        with gr.Tab("Control"):
            control_tab.build(page, [str(tiny_t2i_base), control_run])
        with gr.Tab("Generate"):
            generate_tab.build(page, [str(tiny_t2i_base)])
    ids = {getattr(c, "elem_id", None) for c in page.blocks.values()}
    assert {"control-run", "control-condition", "control-gallery", "generate-attention"} <= ids


# ------------------------------------------------------------------------------- cross-attention maps


def test_maps_per_word_are_cross_attention_maps_own(tiny_t2i_base):
    """One map per token of the prompt, labelled with its words in order, non-negative and at most a
    probability in total (the <bos>, <eos> and padding columns hold the rest): CrossAttentionMaps' own
    maps from t2i.generate with the same seed and settings, which also draws the same images."""
    world = world_preset("tiny")
    prompt = describe(scene_at(world, 0, 0))
    done = generate_tab.generate_images(str(tiny_t2i_base), prompt, n=2, steps=4, guidance=2, seed=3)
    model, cfg = t2i.load_model(tiny_t2i_base)
    maps = CrossAttentionMaps(cfg.data.image_size)
    used = cfg.sample.resolve(None, 4, 2)
    images = t2i.generate(model, cfg, [prompt] * 2, sampler=used.sampler, steps=4, cfg_scale=2.0, seed=3,
                          attention=maps)  # fmt: skip
    words = normalize(prompt)
    assert done.words == tuple(words) and done.maps_note == ""
    assert np.array_equal(done.images, to_uint8(images))
    assert done.maps.shape == (2, len(words), 16, 16)
    assert np.array_equal(done.maps, maps.maps()[:, 1 : 1 + len(words)].numpy())
    assert (done.maps >= 0).all() and (done.maps.sum(axis=1) <= 1 + 1e-5).all()
    pairs = generate_tab.word_maps(done, 1)
    assert [w for w, _ in pairs] == words and all(
        np.array_equal(m, done.maps[1, j]) for j, (_, m) in enumerate(pairs)
    )
    tiles = generate_tab.attention_tiles(done, 1)
    assert [c for _, c in tiles] == ["image 2", *words] and all(t.dtype == np.uint8 for t, _ in tiles)
    with pytest.raises(DifflabError, match="image index 2 is invalid"):
        generate_tab.word_maps(done, 2)
    plain = generate_tab.generate_images(
        str(tiny_t2i_base), prompt, n=2, steps=4, guidance=2, seed=3, attention=False
    )
    assert plain.maps is None and plain.words == ()


def test_a_class_run_gets_a_note_not_maps(class_run):
    done = generate_tab.generate_images(class_run, "a red circle", n=2, steps=3)
    assert done.maps is None and "is a class-conditional pixel run" in done.maps_note
    with pytest.raises(DifflabError, match="class-conditional"):
        generate_tab.word_maps(done)


def test_an_mmdit_gets_a_note_not_maps():
    """An MMDiT reads the text in its joint attention: it has no cross-attention layers to record."""
    from types import SimpleNamespace

    from difflab.nn.mmdit import MMDiT, MMDiTConfig

    net = MMDiT(MMDiTConfig(width=16, depth=1, heads=2, context_dim=16, pooled_dim=None))
    cfg = SimpleNamespace(data=SimpleNamespace(image_size=16))
    family = SimpleNamespace(name="t2i", draws="prompts")
    maps, note = generate_tab.attention_recorder("run", family, SimpleNamespace(network=net), cfg)
    assert maps is None and note.startswith("no cross-attention maps for 'run'") and "MMDiT" in note
