"""The judges of class-conditional samples, checked on real data."""

import torch

from difflab.data.images import quantize, to_signed
from difflab.eval.conditional import DigitsJudge, toy_class_hits
from difflab.world.render import render
from difflab.world.scene import Obj, Scene, world_preset


def test_reader_judge_passes_true_renders_and_fails_wrong_labels():
    cfg = world_preset("single32")
    scenes = [
        Scene((Obj("circle", "red", "large", 0.5, 0.5),)),
        Scene((Obj("cross", "blue", "small", 0.2, 0.8),)),
    ]
    images = torch.stack([to_signed(quantize(render(s, cfg).image)) for s in scenes])
    right = torch.tensor([cfg.class_index("circle", "red"), cfg.class_index("cross", "blue")])
    wrong = torch.tensor([cfg.class_index("circle", "blue"), cfg.class_index("square", "blue")])
    assert toy_class_hits(images, right, cfg).tolist() == [True, True]
    assert toy_class_hits(images, wrong, cfg).tolist() == [False, False]
    # Two objects when one was asked for is a miss even if one of them is right.
    two = Scene((*scenes[0].objects, Obj("square", "green", "small", 0.15, 0.15)))
    assert not toy_class_hits(to_signed(quantize(render(two, cfg).image))[None], right[:1], cfg)[0]


def test_digits_judge_is_accurate_on_real_heldout_digits():
    judge = DigitsJudge(size=32)
    # An RBF SVC on the UCI digits is ~98-99% accurate (scikit-learn's own digits example); 0.95 is a floor.
    assert judge.heldout_accuracy >= 0.95 and judge.heldout_n > 150
