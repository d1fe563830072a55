"""The functions behind the app's tabs (difflab.app), without a browser: what each tab computes, and that bad
input becomes the CLI's own one-line error. tests/test_app_browser.py drives the page itself."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from difflab.app import generate_tab, schedules_tab, train_tab, world_tab
from difflab.app.pictures import enlarge, strip
from difflab.app.status import error_html, error_line
from difflab.app.verdict import judge, parse_prompt
from difflab.errors import DifflabError
from difflab.world.geneval import CATEGORIES, prompt_sets
from difflab.world.language import CAPTION_STYLES, caption, describe, short_caption, short_forms
from difflab.world.reader import read
from difflab.world.render import render
from difflab.world.scene import scene_at, world_preset


@pytest.fixture(scope="module")
def tiny_class_run(tmp_path_factory, single_thread_module):
    """A class-conditional pixel run of the tiny world after 2 steps (1.5 s): enough to load and sample."""
    from difflab.config import apply_overrides
    from difflab.models import pixel
    from difflab.models.registry import get_preset

    return pixel.train(
        apply_overrides(get_preset("tiny").build(), ["train.steps=2"]), tmp_path_factory.mktemp("app") / "run"
    )


# ----------------------------------------------------------------------------------------- the verdict


def test_parse_prompt_inverts_the_worlds_prompt_sets():
    """Every shipped GenEval prompt (six categories) is read back as the prompt that wrote it."""
    prompts = [p for c in CATEGORIES for p in prompt_sets("scene32")[c]]
    assert len(prompts) >= 6
    for p in prompts:
        assert parse_prompt(p.text()) == p, p.text()


def test_parse_prompt_reads_every_caption_style_and_the_caption_holds():
    """A caption of each style (long and short) is parsed into a prompt with the same text that holds in its scene."""
    cfg = world_preset("scene64")
    rng = np.random.default_rng(0)
    for i in range(60):
        scene = scene_at(cfg, 3, i)
        texts = [
            caption(scene, rng, style)[0]
            for style in CAPTION_STYLES
            if len(scene.objects) > 1 or style not in ("relation", "pair")
        ]  # those need two objects
        texts += [short_caption(scene, rng, form)[0] for form in short_forms(scene)]
        for text in texts:
            parsed = parse_prompt(text)
            assert parsed is not None and parsed.text() == text, text
            assert parsed.holds(scene), text


@pytest.mark.parametrize("text", ["", "a purple circle", "circle red", "a orange circle", "ten circles",
                                  "a red circle to the left of"])  # fmt: skip
def test_parse_prompt_gives_no_guess(text):
    assert parse_prompt(text) is None


def test_judge_reads_the_scene_and_decides_the_prompt():
    cfg = world_preset("scene32")
    scene = scene_at(cfg, 0, 0)
    image = np.round(render(scene, cfg).image * 255).astype(np.uint8)
    assert read(image, cfg).keys() == scene.keys()  # the reader gets this scene right: the premise
    (right,) = judge(describe(scene), [image], cfg)
    assert right.holds is True and right.reading == describe(scene)
    missing = (
        "a red cross" if all(o.key()[:2] != ("cross", "red") for o in scene.objects) else "a blue circle"
    )
    (wrong,) = judge(missing, [image], cfg)
    assert wrong.holds is False
    (none,) = judge("something else entirely", [image], cfg)
    assert none.holds is None and "no verdict" in none.caption()


# ----------------------------------------------------------------------------------------- world tab


def test_world_tab_draws_what_the_world_draws():
    views = world_tab.draw_world("scene32", 5, 3)
    cfg = world_preset("scene32")
    assert [v.index for v in views] == [0, 1, 2]
    for v in views:
        scene = scene_at(cfg, 5, v.index)
        assert v.caption == describe(scene)
        assert v.image.shape == (32, 32, 3) and v.image.dtype == np.uint8
        assert set(v.fields) == {"depth", "edges", "mask"} and all(
            f.shape == (32, 32, 3) for f in v.fields.values()
        )
        assert v.read_right == (read(v.image, cfg).keys() == scene.keys())
        assert len(v.questions) == world_tab.QUESTIONS_PER_SCENE
    assert "the reader reads" in world_tab.readings_html(views)


def test_world_tab_draws_the_perspective_worlds():
    (view,) = world_tab.draw_world("depth32", 0, 1)
    assert view.caption == describe(scene_at(world_preset("depth32"), 0, 0))


def test_world_tab_errors_are_the_clis(capsys):
    """The page shows the very line 'difflab world preview' prints for an unknown preset."""
    from difflab.cli import main

    assert main(["world", "preview", "--preset", "scene33"]) == 2
    printed = capsys.readouterr().err.strip()
    with pytest.raises(DifflabError) as err:
        world_tab.draw_world("scene33", 0, 4)
    assert error_line(err.value) == printed
    assert printed.startswith("difflab: error: unknown world preset 'scene33' (did you mean 'scene32'?)")
    assert "difflab: error: unknown world preset &#x27;scene33&#x27;" in error_html(err.value)
    with pytest.raises(DifflabError, match=r"^n 0 is invalid; expected an integer in \[1, 16\]"):
        world_tab.draw_world("scene32", 0, 0)
    with pytest.raises(DifflabError, match="seed -1 is invalid"):
        world_tab.draw_world("scene32", -1, 2)


# ----------------------------------------------------------------------------------------- schedules tab


def test_schedules_tab_explains_alpha_bar_T_from_the_schedule():
    """The numbers beside the plot are the closed form's: prod(1 - beta_t) of DDPM's betas (numpy, float64)."""
    alpha_bar_T = float(np.prod(1 - np.linspace(1e-4, 0.02, 1000)))
    text = schedules_tab.why_markdown(1000)
    assert f"{alpha_bar_T:.2e}".replace("e-05", "e-5") == "4.04e-5" and "= 4.04e-5." in text
    assert "linear schedule 4.0e-5?" in text
    assert f"{np.sqrt(alpha_bar_T):.4f}·x₀" in text  # 0.0064
    assert "−10.05" in text  # -T (beta_1 + beta_T) / 2
    assert "4.0e-5" not in schedules_tab.why_markdown(500).split("?")[0]  # computed, not typed in


def test_schedules_tab_table_and_plot():
    chosen = schedules_tab.schedules(["linear", "cosine"], 1000)
    table = schedules_tab.table_markdown(chosen)
    assert table.count("\n") == 3 and "| `linear` | 0.9999 | 0.0786 | 4.04e-5 |" in table
    assert "−∞" in schedules_tab.table_markdown(schedules_tab.schedules(["linear"], 100, zero_snr=True))
    picture = schedules_tab.plot(chosen)
    assert picture.ndim == 3 and picture.shape[2] == 3 and picture.shape[1] > picture.shape[0]


def test_schedules_tab_errors():
    with pytest.raises(DifflabError, match="no schedule is chosen; choose one or more of: linear, cosine"):
        schedules_tab.schedules([], 1000)
    with pytest.raises(DifflabError, match=r"timesteps 1 is invalid; expected an integer in \[2, 100000\]"):
        schedules_tab.schedules(["linear"], 1)
    with pytest.raises(DifflabError, match="unknown schedule 'linaer'"):
        schedules_tab.schedules(["linaer"], 10)


# ----------------------------------------------------------------------------------------- generate tab


def test_generate_tab_draws_a_class_run_with_verdicts_and_a_trajectory(tiny_class_run):
    done = generate_tab.generate_images(str(tiny_class_run), "a blue square", n=3, steps=6, seed=1)
    assert done.images.shape == (3, 16, 16, 3) and done.images.dtype == np.uint8
    assert len(done.verdicts) == 3 and all(v.holds in (True, False) for v in done.verdicts)
    cfg = world_preset("tiny")
    for image, v in zip(done.images, done.verdicts, strict=True):
        assert v.reading == describe(read(image, cfg))
    assert [len(x) for _, x, _ in done.frames] == [3] * 6  # every one of the 6 steps, all 3 images
    assert "6 steps" in done.summary and "seed 1" in done.summary
    picture, label = generate_tab.trajectory_picture(done.frames, 5)
    assert picture.shape[2] == 3 and label.startswith("step 6 of 6")
    again = generate_tab.generate_images(str(tiny_class_run), "a blue square", n=3, steps=6, seed=1)
    np.testing.assert_array_equal(again.images, done.images)  # a seed is a seed, in the page too


def test_generate_tab_errors_are_named(tiny_class_run, tmp_path):
    run = str(tiny_class_run)
    cases = [
        (("", "a red circle"), {}, "no run is chosen"),
        (
            (str(tmp_path), "a red circle"),
            {},
            f"'{tmp_path}' is not a difflab run directory (no config.json)",
        ),
        ((run, "a green circle"), {}, "'a green circle' names no class of"),
        ((run, "a red circle"), {"sampler": "ddmi"}, "unknown sampler 'ddmi' (did you mean"),
        ((run, "a red circle"), {"steps": 5000}, "steps 5000 is invalid"),
        ((run, "a red circle"), {"guidance": -1}, "guidance scale -1 is invalid"),
        ((run, "a red circle"), {"n": 17}, "n 17 is invalid"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(DifflabError) as err:
            generate_tab.generate_images(*args, **kwargs)
        assert message in str(err.value)
    assert generate_tab.run_settings(run) == ("ddim", 10, 1.0)


def test_generate_tab_refuses_an_empty_prompt_for_text_to_image(tmp_path, monkeypatch):
    """The check comes before any sampling: a stand-in text-to-image run is enough."""
    from types import SimpleNamespace

    from difflab.models.recipe import SampleConfig

    cfg = SimpleNamespace(sample=SampleConfig(), data=SimpleNamespace(world="tiny"))
    family = SimpleNamespace(name="t2i", draws="prompts")
    monkeypatch.setattr(generate_tab, "load_run", lambda run_dir: (family, None, cfg))
    with pytest.raises(DifflabError, match="^the prompt is empty; expected a description"):
        generate_tab.generate_images("run", "   ")


# ----------------------------------------------------------------------------------------- train tab


def test_train_tab_shows_a_runs_curve_and_newest_grid(tmp_path):
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"kind": "pixel", "train": {"steps": 30}}))
    records = [{"step": s, "loss": 1.0 / s, "items_per_s": 100.0} for s in (10, 20)] + [
        {"step": 20, "fid": 3.0}
    ]
    lines = "".join(json.dumps(r) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(lines + '{"loss": 0.1, "st')  # a line cut short by a crash: skipped
    for step, colour in ((10, 0), (20, 255)):
        Image.fromarray(np.full((8, 8, 3), colour, np.uint8)).save(run / "samples" / f"step_{step:07d}.png")
    before = train_tab.signature(str(run))
    progress = train_tab.run_progress(str(run))
    assert progress.step == 20 and progress.steps == 30 and progress.grid_name == "samples/step_0000020.png"
    assert (progress.grid == 255).all() and progress.curve.shape[2] == 3
    assert "step 20 of 30" in progress.summary and "loss 0.075" in progress.summary  # mean of 1/10 and 1/20
    (run / "metrics.jsonl").write_text(lines + json.dumps({"step": 30, "loss": 0.01}) + "\n")
    assert train_tab.signature(str(run)) != before
    assert "(done)" in train_tab.run_progress(str(run)).summary


def test_train_tab_errors(tmp_path):
    with pytest.raises(DifflabError, match=f"^'{tmp_path}' is not a difflab run directory"):
        train_tab.run_progress(str(tmp_path))
    with pytest.raises(DifflabError, match="^unknown preset to start here 'base'; choose one of: tiny"):
        train_tab.start_training("base", str(tmp_path / "x"))
    with pytest.raises(DifflabError, match="^no output directory is given"):
        train_tab.start_training("tiny", " ")
    with pytest.raises(DifflabError, match="^no training started here is running"):
        train_tab.stop_training()


@pytest.mark.slow  # a subprocess that imports torch: a few seconds
def test_train_tab_start_reports_the_trainings_own_error(tmp_path):
    """A training refused by 'difflab train' (its folder holds a file) shows train's own named line."""
    import time

    (tmp_path / "notes.txt").write_text("mine")
    training = train_tab.start_training("tiny", str(tmp_path))
    deadline = time.monotonic() + 60
    while training.state() == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert training.state().startswith("difflab: error:") and str(tmp_path) in training.state()


# ----------------------------------------------------------------------------------------- the page


def test_pictures():
    tile = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    big = enlarge(tile, side=8)
    assert big.shape == (8, 8, 3) and (big[:4, :4] == tile[0, 0]).all()
    row = strip([[tile, tile], [tile]])
    assert row.shape == (2 * 3 + 1, 2 * 3 + 1, 3) and (row[0] == 255).all()


def test_app_command_names_a_bad_run_before_serving(tmp_path, capsys):
    from difflab.cli import main

    assert main(["app", str(tmp_path)]) == 2
    assert (
        capsys.readouterr().err.strip()
        == f"difflab: error: '{tmp_path}' is not a difflab run directory (no config.json)"
    )
