"""Prompt-to-Prompt (models/p2p.py) and its exact judge (models/p2p_eval.py), on the session's tiny
text-to-image base: the properties of the paper's edit functions, checked where they can be exact."""

from __future__ import annotations

import json

import pytest
import torch

from difflab.cli import main
from difflab.models import inversion, p2p_eval, t2i
from difflab.models.p2p import P2PEdit, alignment, edited_layout, naive, prompt_to_prompt, swapped_words
from difflab.world.prompts import Conjunction, ObjectSpec
from difflab.world.scene import Obj, Scene, world_preset

pytestmark = pytest.mark.usefixtures("single_thread_module")


@pytest.fixture(scope="module")
def base(tiny_t2i_base):
    return t2i.load_model(tiny_t2i_base)


def test_identical_prompts_with_full_injection_reproduce_the_source_bitwise(base):
    """Hertz et al.'s sanity check: with the same prompt and every map injected, the edit is the source."""
    system, cfg = base
    edits = [P2PEdit("a red circle", "a red circle", tau=1.0, tau_self=1.0),
             P2PEdit("a blue square", "a blue square", tau=1.0, tau_self=1.0)]  # fmt: skip
    source, edited = prompt_to_prompt(system, cfg, edits, seed=3)
    assert torch.equal(source, edited)


def test_the_naive_pass_is_the_target_prompt_drawn_as_a_source(base):
    """With nothing injected, the target row is the target prompt regenerated from the edit's noise: the
    same image the target gives as a source row of its own."""
    system, cfg = base
    _, regenerated = prompt_to_prompt(system, cfg, [naive(P2PEdit("a red circle", "a blue circle"))], seed=5)
    alone, _ = prompt_to_prompt(system, cfg, [P2PEdit("a blue circle", "a red circle")], seed=5)
    torch.testing.assert_close(regenerated, alone, atol=1e-5, rtol=0)


def test_a_local_blend_mask_that_covers_nothing_gives_back_the_source(base):
    """LocalBlend: outside the mask the target takes the source's predictions, so an empty mask (threshold
    1: no normalised map exceeds it) from the first step on makes the edit the source exactly."""
    system, cfg = base
    edit = P2PEdit("a red circle", "a blue circle", tau=0.0, tau_self=0.0, blend=("red", "blue"), threshold=1.0,
                   blend_start=0.0)  # fmt: skip
    source, edited = prompt_to_prompt(system, cfg, [edit], seed=1)
    assert torch.equal(source, edited)
    _, free = prompt_to_prompt(system, cfg, [naive(edit)], seed=1)
    assert not torch.equal(source, free)  # the prompt alone does change the image


def test_word_swap_and_refinement_alignments(base):
    system, _ = base
    tok = system.conditioner.encoder.tokenizer
    mapper, aligned = alignment(tok, "a red circle", "a blue circle")  # a swap: one to one, all injected
    assert mapper[:5].tolist() == [0, 1, 2, 3, 4] and aligned[:5].all()
    mapper, aligned = alignment(tok, "a circle", "a large circle")  # a refinement: 'large' keeps its own map
    # <bos> a large circle <eos> -> <bos> a - circle <eos>
    assert aligned[:5].tolist() == [True, True, False, True, True]
    assert mapper[[0, 1, 3, 4]].tolist() == [0, 1, 2, 3]
    assert swapped_words("a red circle and a blue square", "a red circle and a green square") == [("blue", "green")]


def test_reweighting_needs_its_word_and_a_sane_factor(base):
    system, cfg = base
    with pytest.raises(Exception, match="re-weighting"):
        P2PEdit("a red circle", "a red circle", reweight=(("red", -1.0),))
    with pytest.raises(Exception, match="not in the target prompt 'a red circle'"):
        prompt_to_prompt(system, cfg, [P2PEdit("a red circle", "a red circle", reweight=(("blue", 2.0),))])


def test_edited_layout_swaps_the_attribute_of_the_planned_object():
    scene = Scene((Obj("circle", "red", "small", 0.2, 0.2), Obj("square", "blue", "large", 0.8, 0.8)))
    recoloured = edited_layout(scene, "a red circle and a blue square", "a red circle and a green square")
    assert recoloured.keys() == sorted([("circle", "red", "small", "top left"),
                                        ("square", "green", "large", "bottom right")])  # fmt: skip
    grown = edited_layout(scene, "a small red circle", "a large red circle")
    assert grown.objects[0].size == "large" and grown.objects[0].x == 0.2
    # the mention's other words pick the objects: only the red square turns, not every red object
    reds = Scene((Obj("circle", "red", "small", 0.2, 0.2), Obj("square", "red", "large", 0.8, 0.8)))
    turned = edited_layout(reds, "a red circle and a red square", "a red circle and a blue square")
    assert [o.color for o in turned.objects] == ["red", "blue"]
    extra = Scene((Obj("circle", "red", "large", 0.5, 0.2), Obj("circle", "white", "small", 0.5, 0.8)))
    squared = edited_layout(extra, "a white circle", "a white square")  # an unasked red circle stays
    assert [o.shape for o in squared.objects] == ["circle", "square"]


def test_judge_separates_the_change_from_what_stays():
    case = p2p_eval.SwapCase(Conjunction((ObjectSpec("circle", "red"), ObjectSpec("square", "blue"))), 0,
                             "color", "green")  # fmt: skip
    assert case.target.text() == "a green circle and a blue square"
    circle, square = Obj("circle", "red", "small", 0.2, 0.2), Obj("square", "blue", "large", 0.8, 0.8)
    source = Scene((circle, square))
    green = Obj("circle", "green", "small", 0.2, 0.2)
    assert p2p_eval.judge(case, source, Scene((green, square))) == {"changed": True, "kept": True, "exact": True}
    moved = Obj("square", "blue", "large", 0.8, 0.2)
    assert p2p_eval.judge(case, source, Scene((green, moved))) == {"changed": True, "kept": False, "exact": False}
    assert p2p_eval.judge(case, source, source) == {"changed": False, "kept": True, "exact": False}
    assert p2p_eval.judge(case, Scene((square,)), source) is None  # the source failed its prompt: not judged


def test_swap_cases_are_real_swaps_of_the_world_vocabulary():
    world = world_preset("scene32")
    cases = p2p_eval.swap_cases(world, 60, seed=4)
    assert {c.attribute for c in cases} == {"color", "shape", "size"}
    for c in cases:
        # the attribute word, and at most the article before it ('an orange' -> 'a blue')
        assert (c.old, c.new) in swapped_words(c.source.text(), c.target.text())
        assert set(swapped_words(c.source.text(), c.target.text())) <= {(c.old, c.new), ("an", "a"), ("a", "an")}
        assert c.new not in {getattr(p, c.attribute) for p in c.source.parts}


def test_p2p_command_writes_the_edit_and_evaluates(tiny_t2i_base, tmp_path, capsys):
    out = tmp_path / "edit.png"
    assert main(["p2p", str(tiny_t2i_base), "a red circle", "a blue circle", "--seeds", "2", "--blend", "red",
                 "blue", "--out", str(out)]) == 0  # fmt: skip
    assert out.stat().st_size > 0 and "source | Prompt-to-Prompt | the naive" in capsys.readouterr().out
    assert main(["p2p", str(tiny_t2i_base), "--eval", "6", "--json", "--examples", str(tmp_path / "ex.png")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (tmp_path / "ex.png").stat().st_size > 0
    assert report["n"] == 6 and {"p2p", "naive"} <= set(report)
    assert main(["p2p", str(tiny_t2i_base), "a red circle", "a blue circle", "--reweight", "red"]) == 2
    assert "--reweight 'red' is invalid" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- inversion


@pytest.fixture(scope="module")
def scene_image_and_prompt(base):
    from difflab.data.toy import scene_image
    from difflab.world.language import describe
    from difflab.world.scene import scene_at

    world = world_preset(base[1].data.world)
    scene = scene_at(world, 5, 0)
    return scene_image(scene, world)[None], describe(scene)


def test_ddim_inversion_redraws_the_image_closer_with_more_steps(base, scene_image_and_prompt):
    """Unguided DDIM inversion reuses each level's noise estimate for the next: its error is the ODE's
    discretisation error, which shrinks with the step count (measured on this base: 29, 37, 46 dB at 10, 50,
    200 steps; the largest pixel error 0.28, 0.11, 0.037), so at 160 steps under 0.08."""
    system, cfg = base
    image, prompt = scene_image_and_prompt
    errors = []
    for steps in (10, 40, 160):
        redrawn = inversion.redraw(system, cfg, inversion.ddim_invert(system, cfg, image, prompt, steps=steps,
                                                                      cfg_scale=1.0))  # fmt: skip
        errors.append((redrawn - image).abs().max().item())
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.08, errors


def test_null_text_optimisation_retraces_the_inversion_under_guidance(base, scene_image_and_prompt):
    """Under guidance DDIM inversion's redraw drifts; optimising each step's null condition (Mokady et al.,
    Algorithm 1) brings it back: on this base the squared error fell five-fold (0.0088 -> 0.0017)."""
    system, cfg = base
    image, prompt = scene_image_and_prompt
    assert cfg.sample.cfg_scale > 1
    plain = inversion.redraw(system, cfg, inversion.ddim_invert(system, cfg, image, prompt))
    optimised = inversion.null_text_inversion(system, cfg, image, prompt)
    redrawn = inversion.redraw(system, cfg, optimised)
    assert (redrawn - image).pow(2).mean() < 0.5 * (plain - image).pow(2).mean()
    assert len(optimised.nulls) == cfg.sample.steps and all(not v.requires_grad for v in optimised.nulls[0].values())


def test_an_inverted_image_is_the_source_of_its_edits(base, scene_image_and_prompt):
    """Prompt-to-Prompt of an inverted image: its source row is the inversion's redraw, and the same prompt
    with every map injected gives it back bitwise."""
    system, cfg = base
    image, prompt = scene_image_and_prompt
    inverted = inversion.null_text_inversion(system, cfg, image, prompt, iterations=2)
    source, edited = prompt_to_prompt(system, cfg, [P2PEdit(prompt, prompt, tau=1.0, tau_self=1.0)],
                                      inversion=inverted)  # fmt: skip
    assert torch.equal(source, edited)
    torch.testing.assert_close(source, inversion.redraw(system, cfg, inverted), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="source must be the inverted image's prompt"):
        prompt_to_prompt(system, cfg, [P2PEdit("a blue square", "a red square")], inversion=inverted)


def test_invert_and_edit_a_given_image_from_the_command_line(tiny_t2i_base, tmp_path, capsys):
    image = tmp_path / "in.png"
    assert main(["world", "condition", "--preset", "tiny", "--field", "image", "--out", str(image)]) == 0
    prompt = capsys.readouterr().out.split('"')[1]
    assert main(["invert", str(tiny_t2i_base), "--image", str(image), "--steps", "5", "--out",
                 str(tmp_path / "inv.png")]) == 0  # fmt: skip
    assert "null-text inversion (" in capsys.readouterr().out and (tmp_path / "inv.png").stat().st_size > 0
    assert main(["p2p", str(tiny_t2i_base), prompt, prompt.replace("red", "blue", 1), "--image", str(image),
                 "--steps", "5", "--out", str(tmp_path / "edit.png")]) == 0  # fmt: skip
    assert (tmp_path / "edit.png").stat().st_size > 0
    (tmp_path / "big.png").write_bytes((tmp_path / "inv.png").read_bytes())
    assert main(["invert", str(tiny_t2i_base), "--image", str(tmp_path / "big.png")]) == 2
    assert "expected 16x16" in capsys.readouterr().err
