"""GenEval-style evaluation: categories, the faithfulness score, the shipped prompt sets, held-out pairs."""

import json

import numpy as np
import pytest

from difflab.errors import DifflabError
from difflab.world.geneval import (
    CATEGORIES,
    HELDOUT_PAIRS,
    PROMPT_SET_VERSION,
    PROMPT_SET_WORLDS,
    build_prompt_sets,
    category,
    category_pool,
    check_faithfulness,
    load_prompt_set,
    mentions_heldout,
    prompt_set_path,
)
from difflab.world.prompts import Conjunction, Exists, ObjectSpec, prompt_from_dict, scene_for
from difflab.world.reader import read
from difflab.world.render import render
from difflab.world.scene import Obj, Scene, world_preset
from tests.test_world_prompts import SCENE

O = ObjectSpec


@pytest.mark.parametrize("world", PROMPT_SET_WORLDS)
def test_every_category_pool_is_categorised_and_round_trips(world):
    cfg = world_preset(world)
    for name in CATEGORIES:
        for p in category_pool(name, cfg):
            assert category(p) == name
            assert prompt_from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert category(Exists(O("circle", "red", "large"))) == "caption"
    assert category(Conjunction((O("circle"), O("circle")))) == "caption"


def test_counting_respects_the_worlds_object_limit():
    assert {p.n for p in category_pool("counting", world_preset("scene32"))} == {1, 2}
    assert {p.n for p in category_pool("counting", world_preset("scene64"))} == {1, 2, 3, 4}


def test_shipped_prompt_sets_equal_regenerated_ones():
    """A code change that alters the evaluation prompts must bump PROMPT_SET_VERSION and write a new
    file (``python -m difflab.world.geneval``), never silently change v1."""
    assert PROMPT_SET_VERSION == 1
    shipped = json.loads(prompt_set_path(1).read_text())
    assert shipped == json.loads(json.dumps(build_prompt_sets()))
    for world in PROMPT_SET_WORLDS:
        sets = load_prompt_set(world)
        assert list(sets) == list(CATEGORIES) and all(len(ps) == 100 for ps in sets.values())
        assert all(category(p) == c for c, ps in sets.items() for p in ps)


def test_load_errors_name_the_bad_value():
    with pytest.raises(DifflabError, match="no prompt set version 7; choose one of: 1"):
        load_prompt_set("scene64", version=7)
    with pytest.raises(DifflabError, match="unknown prompt-set world 'scene16'"):
        load_prompt_set("scene16")


@pytest.mark.parametrize("world", PROMPT_SET_WORLDS)
def test_every_evaluation_prompt_is_satisfiable_and_read_back(world):
    """A perfect model (``scene_for``) scores 1.0 through the renderer and the reader in every category,
    and the same images score far lower against other prompts of the category: the check discriminates."""
    cfg, rng = world_preset(world), np.random.default_rng(0)
    prompts = sorted({p for ps in load_prompt_set(world).values() for p in ps}, key=lambda p: p.text())
    scenes = [scene_for(p, rng, cfg) for p in prompts]
    assert all(s is not None and cfg.min_objects <= len(s.objects) <= cfg.max_objects for s in scenes)
    read_back = [read(render(s, cfg).image, cfg) for s in scenes]
    result = check_faithfulness(prompts, read_back)
    assert set(result) == {*CATEGORIES, "overall"}
    assert all(r["score"] == 1.0 for r in result.values()), result
    mismatched = check_faithfulness(prompts, read_back[1:] + read_back[:1])
    assert mismatched["overall"]["score"] < 0.7


def test_faithfulness_arithmetic():
    prompts = [Exists(O("circle")), Exists(O("square")), Exists(O("triangle")), Exists(O("circle", "red"))]
    r = check_faithfulness(prompts, [SCENE] * 4)
    assert r["single_object"] == {"n": 3, "score": pytest.approx(2 / 3)}
    assert r["colors"] == {"n": 1, "score": 1.0}
    assert r["overall"] == {"n": 4, "score": pytest.approx((2 / 3 + 1) / 2)}  # mean over categories
    with pytest.raises(DifflabError, match="2 prompts but 1 scenes"):
        check_faithfulness(prompts[:2], [SCENE])


def test_heldout_pairs():
    assert len({c for c, _ in HELDOUT_PAIRS}) == len({s for _, s in HELDOUT_PAIRS}) == len(HELDOUT_PAIRS)
    assert mentions_heldout(Conjunction((O("square"), O("circle", "orange"))))
    assert not mentions_heldout(Exists(O("circle", "red")))
    assert mentions_heldout(Scene((Obj("circle", "orange", "large", 0.5, 0.5),)))
    assert not mentions_heldout(SCENE)
    assert mentions_heldout(SCENE, pairs=[("red", "circle")])
