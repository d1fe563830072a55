"""``difflab app`` in a real browser: the page is served on a free port of 127.0.0.1 in this process and headless
Chromium (the system's package, /usr/bin/chromium) is driven through it by Playwright, as a person would: open
the page, read the World tab, type a prompt into Generate and press the button, switch tabs, and make mistakes.

These are end-to-end tests (``pytest -m slow``; .ci/run installs Chromium first). Without a browser they fail,
saying how to install one; they are never skipped. With DIFFLAB_SCREENSHOTS=1 they also save the pictures of
docs/app.md (assets/app_*.png); otherwise they write nothing into the repository.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

# gradio's queue calls pandas options that pandas 3 deprecates: their warnings are gradio's, not ours
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::Warning:gradio.queueing")]

CHROMIUM = os.environ.get("DIFFLAB_CHROMIUM", "/usr/bin/chromium")
# The flags this closed-network machine needs (docs/app.md): no sandbox as root, no GPU, and no background
# connections, which the network refuses. Playwright adds --headless and a fresh, empty --user-data-dir itself.
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
GENERATE_SECONDS = 30
"""Pressing Generate shows the images and the reader's verdicts within this time (measured here: about 1 s
for the tiny run on 2 CPU cores; the rest is headroom for a loaded machine)."""
PAGE_SECONDS = 30
"""Opening the page (or a tab) shows its first pictures within this time."""
ASSETS = Path(__file__).resolve().parents[1] / "assets"


def _screenshot(tab, name: str) -> None:
    if os.environ.get("DIFFLAB_SCREENSHOTS") == "1":
        tab.screenshot(path=str(ASSETS / f"app_{name}.png"), full_page=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_control(tiny_t2i_base, tmp_path_factory):
    """A ControlNet on the tiny run's edges after 10 steps (about 3 s): enough for the Control tab to draw."""
    from difflab.config import apply_overrides
    from difflab.models import control
    from difflab.models.registry import get_preset

    cfg = apply_overrides(get_preset("controlnet_tiny").build(),
                          [f"base={tiny_t2i_base}", "train.steps=10", "sample.grid=4"])  # fmt: skip
    return control.train(cfg, tmp_path_factory.mktemp("browser_control") / "edges")


@pytest.fixture(scope="module")
def tiny_depth(depth_base, tmp_path_factory):
    """A tiny Marigold after 30 steps on the depth world's latent base, for the Depth tab."""
    from difflab.config import apply_overrides
    from difflab.models import depth
    from difflab.models.registry import get_preset

    cfg = apply_overrides(get_preset("depth_tiny").build(), [f"base={depth_base}", "train.steps=30"])
    return depth.train(cfg, tmp_path_factory.mktemp("browser_depth") / "marigold")


@pytest.fixture(scope="module")
def app_url(tiny_t2i_base, tiny_control, tiny_vlm, tiny_depth):
    """The page, with the tiny text-to-image run offered in Generate, Edit (Prompt-to-Prompt) and Train, its
    ControlNet in Control, a tiny Marigold in Depth and a tiny LLaVA in Ask, served until the module ends."""
    from difflab.app.page import build_page, serve

    page = build_page([str(tiny_t2i_base), str(tiny_control), str(tiny_vlm), str(tiny_depth)])
    url = serve(page, "127.0.0.1", _free_port())
    yield url
    page.close()


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser, checked first (before any run is trained): a failure that says how to install it."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"no Chromium at {CHROMIUM}: the browser tests drive the system's Chromium; install it with "
                    "`apt-get install -y chromium` (Debian; .ci/run does this), or set DIFFLAB_CHROMIUM to a "
                    "Chromium binary", pytrace=False)  # fmt: skip
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the Python package playwright is missing: pip install -e '.[dev]'", pytrace=False)
    return CHROMIUM


@pytest.fixture(scope="module")
def tab(chromium):
    """A headless Chromium tab."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(PAGE_SECONDS * 1000)
        yield page
        browser.close()


def test_world_tab_shows_scenes_and_the_readers_reading(tab, app_url):
    from playwright.sync_api import expect

    from difflab.app.page import TABS

    tab.goto(app_url)
    for name in TABS:
        expect(tab.get_by_role("tab", name=name)).to_be_visible()
    expect(tab.locator("#world-gallery img").first).to_be_visible()
    expect(tab.locator("#world-gallery img")).to_have_count(8)
    readings = tab.locator("#world-readings")
    expect(readings).to_contain_text("the reader reads (from pixels alone)")
    expect(readings).to_contain_text("The reader read 8 of 8 scenes exactly")  # scene32, seed 0 (test_app.py)
    expect(tab.locator("#world-fields img")).to_have_count(4)  # image, depth, edges, mask of scene 0
    _screenshot(tab, "world")
    tab.locator("#world-gallery button.thumbnail-item").nth(2).click()  # scene 2: its fields and questions
    expect(tab.locator("#world-detail")).to_contain_text("Scene 2: ")
    tab.keyboard.press("Escape")  # close the enlarged preview the click opened

    tab.locator("#world-preset input").fill("scene33")  # a typo: the CLI's own line, in the page
    tab.locator("#world-preset input").press("Enter")
    tab.locator("#world-draw").click()
    expect(tab.locator("#world-status")).to_contain_text(
        "difflab: error: unknown world preset 'scene33' (did you mean 'scene32'?); choose one of: tiny"
    )
    expect(tab.locator("#world-gallery img")).to_have_count(0)


def test_generate_tab_draws_a_prompt_with_the_readers_verdict(tab, app_url):
    from playwright.sync_api import expect

    tab.goto(app_url)
    tab.get_by_role("tab", name="Generate").click()
    expect(tab.locator("#generate-status")).to_contain_text("samples with ddim, 10 steps")  # the run's own
    tab.locator("#generate-prompt textarea").fill("a red circle")
    start = time.monotonic()
    tab.locator("#generate-go").click()
    expect(tab.locator("#generate-gallery img")).to_have_count(4, timeout=GENERATE_SECONDS * 1000)
    verdicts = tab.locator("#generate-verdicts li")
    expect(verdicts).to_have_count(4, timeout=GENERATE_SECONDS * 1000)
    seconds = time.monotonic() - start
    assert seconds < GENERATE_SECONDS
    for i in range(4):
        expect(verdicts.nth(i)).to_contain_text("the reader reads:")
        assert any(mark in verdicts.nth(i).inner_text() for mark in ("✓ holds", "✗ fails"))
    expect(tab.locator("#generate-status")).to_contain_text("4 images of 'a red circle'")
    expect(tab.locator("#generate-trajectory img")).to_be_visible()  # x_t and x0-hat at the last step
    expect(tab.locator("#generate-attention img").first).to_be_visible()  # the image, then a map per word
    _screenshot(tab, "generate")

    tab.locator("#generate-prompt textarea").fill("")
    tab.locator("#generate-go").click()
    expect(tab.locator("#generate-status")).to_contain_text(
        "difflab: error: the prompt is empty; expected a description such as"
    )
    tab.locator("#generate-prompt textarea").fill("a purple circle")  # a word the run's tokenizer never saw
    tab.locator("#generate-go").click()
    expect(tab.locator("#generate-status")).to_contain_text(
        "difflab: error: unknown word 'purple' in 'a purple circle'"
    )


def test_schedules_and_train_tabs(tab, app_url, tiny_t2i_base, tmp_path):
    from playwright.sync_api import expect

    tab.goto(app_url)
    tab.get_by_role("tab", name="Schedules").click()
    expect(tab.locator("#schedules-why")).to_contain_text("Why is ᾱ_T of DDPM's linear schedule 4.0e-5?")
    expect(tab.locator("#schedules-figure img")).to_be_visible()
    expect(tab.locator("#schedules-table")).to_contain_text("4.04e-5")
    _screenshot(tab, "schedules")

    tab.get_by_role("tab", name="Train").click()
    expect(tab.locator("#train-status")).to_contain_text(f"t2i run {tiny_t2i_base}: step")
    expect(tab.locator("#train-status")).to_contain_text("(done)")
    expect(tab.locator("#train-curve img")).to_be_visible()
    expect(tab.locator("#train-grid img")).to_be_visible()
    _screenshot(tab, "train")

    tab.locator("#train-run input").fill(str(tmp_path))  # a folder that is not a run
    tab.locator("#train-run input").press("Enter")
    expect(tab.locator("#train-status")).to_contain_text(
        f"difflab: error: '{tmp_path}' is not a difflab run directory (no config.json)"
    )


def test_edit_tab_runs_prompt_to_prompt_with_verdicts(tab, app_url):
    from playwright.sync_api import expect

    tab.goto(app_url)
    tab.get_by_role("tab", name="Edit").click()
    expect(tab.locator("#edit-status")).to_contain_text("edited by Prompt-to-Prompt")  # a t2i run: P2P
    tab.locator("#p2p-source textarea").fill("a red circle")
    tab.locator("#p2p-target textarea").fill("a blue circle")
    tab.locator("#p2p-go").click()
    # two rows of source | Prompt-to-Prompt | the naive regeneration, each under the reader's reading
    expect(tab.locator("#edit-gallery img")).to_have_count(6, timeout=GENERATE_SECONDS * 1000)
    verdicts = tab.locator("#edit-verdicts li")
    expect(verdicts).to_have_count(6)
    for i, column in enumerate(("source", "Prompt-to-Prompt", "naive") * 2):
        expect(verdicts.nth(i)).to_contain_text(f"{column}: ")
        expect(verdicts.nth(i)).to_contain_text("the reader reads:")
    _screenshot(tab, "edit")

    tab.locator("#p2p-target textarea").fill("")
    tab.locator("#p2p-go").click()
    expect(tab.locator("#edit-status")).to_contain_text("difflab: error:")
    expect(tab.locator("#edit-status")).to_contain_text("target")


def test_control_tab_draws_under_a_scenes_condition(tab, app_url):
    from playwright.sync_api import expect

    tab.goto(app_url)
    tab.get_by_role("tab", name="Control").click()
    expect(tab.locator("#control-status")).to_contain_text("a ControlNet on edges")
    expect(tab.locator("#control-condition img")).to_be_visible()  # the scene's edges, before generating
    tab.locator("#control-go").click()
    expect(tab.locator("#control-gallery img")).to_have_count(4, timeout=GENERATE_SECONDS * 1000)
    verdicts = tab.locator("#control-verdicts li")
    expect(verdicts).to_have_count(4)
    expect(verdicts.first).to_contain_text("the reader reads:")
    _screenshot(tab, "control")

    tab.locator("#control-prompt textarea").fill("a purple circle")  # a word the run's tokenizer never saw
    tab.locator("#control-go").click()
    expect(tab.locator("#control-status")).to_contain_text("difflab: error: unknown word 'purple'")


def test_ask_tab_answers_with_the_truth_beside(tab, app_url):
    from playwright.sync_api import expect

    tab.goto(app_url)
    tab.get_by_role("tab", name="Ask").click()
    expect(tab.locator("#ask-image img")).to_be_visible()  # the held-out scene, before anything is asked
    tab.locator("#ask-suggest").click()
    rows = tab.locator("#ask-table tbody tr")
    expect(rows.first).to_be_visible(timeout=GENERATE_SECONDS * 1000)
    assert rows.count() >= 3  # one question per kind the scene allows
    tab.locator("#ask-question textarea").fill("how many circles?")
    tab.locator("#ask-go").click()
    expect(tab.locator("#ask-answer")).to_contain_text("model:")
    expect(tab.locator("#ask-answer")).to_contain_text("truth:")
    tab.locator("#ask-caption-go").click()
    expect(tab.locator("#ask-caption")).to_contain_text("truth:")
    _screenshot(tab, "ask")

    tab.locator("#ask-question textarea").fill("how many circels?")
    tab.locator("#ask-go").click()
    expect(tab.locator("#ask-status")).to_contain_text("difflab: error: unknown word 'circels'")


def test_depth_tab_estimates_held_out_scenes(tab, app_url):
    from playwright.sync_api import expect

    tab.goto(app_url)
    tab.get_by_role("tab", name="Depth").click()
    tab.locator("#depth-go").click()
    expect(tab.locator("#depth-picture img")).to_be_visible(timeout=GENERATE_SECONDS * 1000)
    expect(tab.locator("#depth-status")).to_contain_text("AbsRel")
    _screenshot(tab, "depth")
