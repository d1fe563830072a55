"""The app's Edit tab (difflab.app.edit_tab), without a browser: its InstructPix2Pix edits are the library's
own (``instruct.edit`` on the evaluation's case, judged by ``instruct_eval.judge``), its Prompt-to-Prompt keeps
the paper's identities, and bad input becomes a one-line error naming the bad value."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.app import edit_tab
from difflab.app.status import error_html
from difflab.app.verdict import parse_prompt
from difflab.data.images import to_uint8
from difflab.data.toy import scene_image
from difflab.errors import DifflabError
from difflab.models import instruct, instruct_eval, t2i
from difflab.world.language import describe
from difflab.world.reader import read
from difflab.world.scene import scene_at

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def editor_run(tiny_t2i_base, tmp_path_factory, single_thread_module):
    """An InstructPix2Pix run on the session's tiny base after 2 steps: enough to load and edit (what it
    edits is checked against the library's own functions, not for quality)."""
    from difflab.config import apply_overrides
    from difflab.models.registry import get_preset

    cfg = apply_overrides(get_preset("instruct_tiny").build(),
                          [f"base={tiny_t2i_base}", "train.steps=2", "sample.grid=2"])  # fmt: skip
    return str(instruct.train(cfg, tmp_path_factory.mktemp("edit_tab") / "instruct"))


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    """Run directories of families the tab does not edit with (their config.json is all the check reads)."""
    root = tmp_path_factory.mktemp("other_runs")
    runs = {}
    for kind in ("pixel", "depth"):
        (root / kind).mkdir()
        (root / kind / "config.json").write_text(json.dumps({"kind": kind}))
        runs[kind] = str(root / kind)
    return runs


def _png(path, image: torch.Tensor) -> str:
    Image.fromarray(to_uint8(image)).save(path)
    return str(path)


# ------------------------------------------------------------------------------------------ InstructPix2Pix


def test_instruct_edits_are_instruct_edit_on_the_evaluations_case(editor_run):
    """A drawn scene with its proposed instruction is the evaluation's case (instruct_eval.edit_cases), its
    edits are instruct.edit of that case's request at seeds seed, seed + 1 (as difflab edit --seed draws them),
    bitwise, and each verdict is instruct_eval.judge of that case."""
    system, cfg = instruct.load_model(editor_run)
    world = cfg.data.world_config()
    cases = instruct_eval.edit_cases(world, 8, edit_tab.SCENE_SEED, cfg.data.pairs())
    # case i is scene i while no earlier scene was skipped for showing a held-out pair
    index = max(i for i, c in enumerate(cases) if c.before == scene_at(world, edit_tab.SCENE_SEED, i))
    case = cases[index]
    assert edit_tab.draw_case(editor_run, edit_tab.SCENE_SEED, index) == case
    view = edit_tab.edit_image(editor_run, case.edit.text(), index=index, image_scale=1.2, text_scale=2.0,
                               seed=7, n=2)  # fmt: skip
    request = instruct_eval.request([case], world)
    want = torch.cat(
        [instruct.edit(system, cfg, request, image_scale=1.2, text_scale=2.0, seed=s) for s in (7, 8)]
    )
    assert torch.equal(view.edits, want)
    assert torch.equal(view.image, request.images[0])
    assert view.case == case and torch.equal(view.asked, scene_image(case.after, world))
    assert view.verdicts == [instruct_eval.judge(case, e, world) for e in want]
    assert view.readings == [describe(read(x, world)) for x in (request.images[0], *want)]
    assert "s_I 1.2, s_T 2" in view.summary and "seed 7..8" in view.summary
    tiles = edit_tab.instruct_tiles(view)
    assert len(tiles) == 4 and tiles[1][1] == f"asked for: {describe(case.after)}"
    assert all(t.dtype == np.uint8 and t.shape[2] == 3 for t, _ in tiles)
    assert "rest kept" in tiles[2][1] and "the reader reads" in edit_tab.verdicts_html(tiles)


def test_an_uploaded_scene_is_edited_as_the_drawn_one_without_a_verdict(editor_run, tmp_path):
    """A scene saved as a PNG reads back to the same pixels (the world's images are on the 8-bit grid), so its
    edits equal the drawn scene's bitwise; the instruction is free text there, so no verdict is given.
    Defaults are the run's s_I and s_T."""
    world = instruct.load_config(editor_run).data.world_config()
    case = edit_tab.draw_case(editor_run, 3, 1)
    path = _png(tmp_path / "scene.png", scene_image(case.before, world))
    drawn = edit_tab.edit_image(editor_run, case.edit.text(), scene_seed=3, index=1)
    uploaded = edit_tab.edit_image(editor_run, case.edit.text(), image=path)
    assert torch.equal(uploaded.edits, drawn.edits) and uploaded.case is None and uploaded.verdicts == []
    assert "1 edit(s) of 'scene.png' by" in uploaded.summary
    _, s_i, s_t = edit_tab.run_settings(editor_run)
    assert (s_i, s_t) == (1.5, 3.0) and f"s_I {s_i:g}, s_T {s_t:g}" in uploaded.summary
    free = next(t for t in ("make the circle green", "make the circle blue") if t != case.edit.text())
    other = edit_tab.edit_image(editor_run, free, scene_seed=3, index=1)
    assert other.case is None and other.verdicts == []  # not the drawn edit: nothing to judge against


def test_instruct_bad_input_is_named(editor_run, tmp_path):
    big = _png(tmp_path / "big.png", torch.zeros(3, 20, 20))
    cases = [
        ({"instruction": "  "}, "the instruction is empty; expected what to change"),
        ({"image_scale": -1}, "image guidance -1 is invalid; expected a finite number in [0, 100]"),
        ({"text_scale": float("nan")}, "text guidance nan is invalid"),
        ({"seed": -1}, "seed -1 is invalid; expected an integer in [0, 2**63)"),
        ({"n": 5}, f"edits 5 is invalid; expected an integer in [1, {edit_tab.MAX_EDITS}]"),
        ({"scene_seed": -3}, "scene seed -3 is invalid"),
        ({"index": 1.5}, "scene index 1.5 is invalid; expected an integer"),
        ({"image": big}, f"image '{big}' is 20x20; expected 16x16"),
    ]
    for kwargs, message in cases:
        args = {"instruction": "make the circle blue"} | kwargs
        with pytest.raises(DifflabError) as err:
            edit_tab.edit_image(editor_run, args.pop("instruction"), **args)
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(DifflabError, match="unknown word 'purpel'"):  # the run's tokenizer names it
        edit_tab.edit_image(editor_run, "make the circle purpel")


# ------------------------------------------------------------------------------------------ Prompt-to-Prompt


def test_p2p_with_the_source_as_target_and_full_injection_is_the_source(tiny_t2i_base):
    """Hertz et al.'s sanity check, through the tab: the same prompt with every cross-attention map injected
    (tau = 1) redraws the source bitwise, on every row."""
    view = edit_tab.p2p_edit(str(tiny_t2i_base), "a red circle", "a red circle", tau=1.0, seed=3, n=2)
    assert view.edits.shape == (2, 3, 16, 16) and torch.equal(view.sources, view.edits)


def test_p2p_rows_and_the_naive_baseline_are_the_clis(tiny_t2i_base):
    """Row k comes from noise k of the seed, and the naive column is the target prompt from that noise: the
    same image the target gives as a source of its own (test_p2p's identity), row by row. The verdicts are
    the target prompt's (parse_prompt) read by the reader."""
    run = str(tiny_t2i_base)
    view = edit_tab.p2p_edit(run, "a red circle", "a blue circle", seed=5, n=2)
    swapped = edit_tab.p2p_edit(run, "a blue circle", "a red circle", seed=5, n=2)
    torch.testing.assert_close(view.naive, swapped.sources, atol=1e-5, rtol=0)
    one = edit_tab.p2p_edit(run, "a red circle", "a blue circle", seed=5, n=1)
    assert torch.equal(one.sources[0], view.sources[0])  # row 0 is row 0 however many rows are drawn
    world = t2i.load_config(run).data.world_config()
    target = parse_prompt("a blue circle")
    for image, verdict in zip(view.edits, view.verdicts["edit"], strict=True):
        scene = read(to_uint8(image), world)
        assert verdict.reading == describe(scene) and verdict.holds == target.holds(scene)
    tiles = edit_tab.p2p_tiles(view)
    assert (
        len(tiles) == 6 and tiles[1][1].startswith("Prompt-to-Prompt: ") and tiles[2][1].startswith("naive: ")
    )


def test_p2p_of_an_uploaded_image_starts_from_its_inversion(tiny_t2i_base, tmp_path):
    """Null-text inversion of a given image (difflab p2p --image): with the source as target and every map
    injected, the edit is the image's redraw from its inversion (test_p2p's identity)."""
    run = str(tiny_t2i_base)
    world = t2i.load_config(run).data.world_config()
    scene = scene_at(world, 5, 0)
    path = _png(tmp_path / "scene.png", scene_image(scene, world))
    view = edit_tab.p2p_edit(run, describe(scene), describe(scene), tau=1.0, tau_self=1.0, image=path, n=3)
    assert view.edits.shape[0] == 1 and torch.equal(view.sources[0], scene_image(scene, world))
    torch.testing.assert_close(view.edits, view.redrawn, atol=1e-5, rtol=0)
    assert "after null-text inversion (redrawn at" in view.summary and len(edit_tab.p2p_tiles(view)) == 4


def test_p2p_bad_input_is_named(tiny_t2i_base, tmp_path):
    run, small = str(tiny_t2i_base), _png(tmp_path / "small.png", torch.zeros(3, 8, 8))
    cases = [
        ({"tau": 1.5}, "tau 1.5 is invalid; expected a finite number in [0, 1]"),
        ({"tau_self": -0.1}, "tau_self -0.1 is invalid"),
        ({"source": ""}, "the source prompt is empty; expected a description"),
        ({"target": None}, "the target prompt is empty"),
        ({"seed": 2**63}, "seed 9223372036854775808 is invalid; expected an integer in [0, 2**63)"),
        ({"n": 0}, "rows 0 is invalid; expected an integer in [1, 4]"),
        ({"image": small}, f"image '{small}' is 8x8; expected 16x16"),
    ]
    for kwargs, message in cases:
        args = {"source": "a red circle", "target": "a blue circle"} | kwargs
        with pytest.raises(DifflabError) as err:
            edit_tab.p2p_edit(run, args.pop("source"), args.pop("target"), **args)
        assert str(err.value).startswith(message), str(err.value)


# ------------------------------------------------------------------------------------------ the runs


def test_the_run_picks_the_editor_and_other_runs_are_refused_by_name(editor_run, tiny_t2i_base, other_runs,
                                                                     tmp_path):  # fmt: skip
    assert edit_tab.editor_of(editor_run) == "instruct" and edit_tab.editor_of(str(tiny_t2i_base)) == "t2i"
    pixel = other_runs["pixel"]
    with pytest.raises(DifflabError) as err:
        edit_tab.editor_of(pixel)
    want = (f"'{pixel}' is a pixel run; the Edit tab takes an InstructPix2Pix run (difflab train --preset "
            "instruct_demo --set base=RUN) or a text-to-image run (Prompt-to-Prompt)")  # fmt: skip
    assert str(err.value) == want
    for call in (lambda r: edit_tab.edit_image(r, "make the circle blue"), lambda r: edit_tab.p2p_edit(r, "a", "b"),
                 lambda r: edit_tab.draw_case(r, 0, 0)):  # fmt: skip
        with pytest.raises(
            DifflabError, match=f"^'{other_runs['depth']}' is a depth run; the Edit tab takes"
        ):
            call(other_runs["depth"])
    with pytest.raises(
        DifflabError, match="is an InstructPix2Pix run; Prompt-to-Prompt takes a text-to-image run"
    ):
        edit_tab.p2p_edit(editor_run, "a red circle", "a blue circle")
    with pytest.raises(
        DifflabError, match="is a text-to-image run; InstructPix2Pix takes an InstructPix2Pix run"
    ):
        edit_tab.edit_image(str(tiny_t2i_base), "make the circle blue")
    with pytest.raises(DifflabError, match="^no run is chosen; expected an InstructPix2Pix run"):
        edit_tab.editor_of("")
    with pytest.raises(DifflabError, match=f"^'{tmp_path}' is not a difflab run directory"):
        edit_tab.editor_of(str(tmp_path))
    first = edit_tab.load_editor(editor_run, "instruct")
    assert edit_tab.load_editor(editor_run, "instruct")[0] is first[0]  # loaded once per path


def test_build_lays_out_the_tab_and_shows_errors_in_its_status(editor_run, tiny_t2i_base, other_runs):
    import gradio as gr

    with gr.Blocks() as page:
        edit_tab.build(page, [other_runs["pixel"], editor_run, str(tiny_t2i_base)])
    handlers = {f.fn.__name__: f.fn for f in page.fns.values()}
    assert {"on_run", "on_draw", "on_edit", "on_p2p"} <= set(handlers)
    status, *_ = handlers["on_run"](other_runs["pixel"])
    assert "is a pixel run; the Edit tab takes" in status and 'class="difflab-error"' in status
    status, gallery, _ = handlers["on_edit"](editor_run, edit_tab.INPUTS[0], None, 0, 0, "", None, None, 0, 1)
    assert gallery is None
    assert status == error_html(DifflabError("the instruction is empty; expected what to change, e.g. 'make the "
                                             "circle blue' or 'move the square to the left'"))  # fmt: skip
    status, gallery, _ = handlers["on_p2p"](str(tiny_t2i_base), "a red circle", "a blue circle", edit_tab.INPUTS[1],
                                            None, 0.8, 0.4, 0, 1)  # fmt: skip
    assert "no image is uploaded" in status and gallery is None
    status, instruction, tiles, _ = handlers["on_draw"](editor_run, 0, 2)
    assert instruction == edit_tab.draw_case(editor_run, 0, 2).edit.text() and len(tiles) == 2
