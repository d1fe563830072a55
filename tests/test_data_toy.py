"""The toy-world dataset: field shapes and ranges, determinism, and agreement with the world it draws."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from difflab.data.toy import FIELDS, ToyWorldDataset, collate
from difflab.errors import DifflabError
from difflab.world.render import render
from difflab.world.scene import COLORS, SHAPES, Scene, scene_at, world_preset

ALL = tuple(f for f in FIELDS if f != "label")  # scene32 has no labels; tested on single32


@pytest.fixture(scope="module")
def items():
    ds = ToyWorldDataset("scene32", 6, seed=5, fields=ALL)
    return ds, [ds[i] for i in range(len(ds))]


def test_every_field_has_its_documented_shape_type_and_range(items):
    ds, its = items
    for it in its:
        assert list(it) == ["image", "caption", "questions", "edit", "edited_image", "edited_scene",
                            "depth", "edges", "mask", "scene"]  # fmt: skip
        for key in ("image", "edited_image"):
            assert it[key].shape == (3, 32, 32) and it[key].dtype == torch.float32
            assert -1.0 <= it[key].min() and it[key].max() <= 1.0
        assert it["depth"].shape == (1, 32, 32) and it["depth"].dtype == torch.float32
        assert it["edges"].shape == (1, 32, 32) and 0.0 <= it["edges"].min() <= it["edges"].max() <= 1.0
        assert it["mask"].shape == (32, 32) and it["mask"].dtype == torch.int64
        assert isinstance(it["caption"], str) and it["caption"]
        assert isinstance(it["edit"], str) and it["edit"]
        assert len(it["questions"]) == 4
        assert all(isinstance(s, str) for qa in it["questions"] for s in qa)


def test_pixels_are_the_renderers_on_the_8_bit_grid(items):
    ds, its = items
    for i, it in enumerate(its):
        scene = scene_at(ds.cfg, ds.seed, i)
        r = render(scene, ds.cfg)
        # (x + 1) / 2 undoes the [-1, 1] scaling; rounding to 8 bits moves a value by at most 0.5/255.
        assert np.abs((it["image"].permute(1, 2, 0).numpy() + 1) / 2 - r.image).max() <= 0.5 / 255 + 1e-6
        assert np.array_equal(it["depth"][0].numpy(), r.depth)
        assert np.array_equal(it["edges"][0].numpy(), r.edges)
        assert np.array_equal(it["mask"].numpy(), r.mask)
        assert it["scene"] == scene.to_dict()
        # Background is at depth 1 and every object is at its own depth somewhere.
        assert it["depth"].max() == 1.0
        assert set(it["mask"].unique().tolist()) == set(range(len(scene.objects) + 1))


def test_edit_pair_is_the_edited_scene_rendered(items):
    ds, its = items
    for it in its:
        edited = Scene.from_dict(it["edited_scene"])
        assert edited != Scene.from_dict(it["scene"])
        expected = (render(edited, ds.cfg).image * 2 - 1).transpose(2, 0, 1)
        assert np.abs(it["edited_image"].numpy() - expected).max() <= 1 / 255 + 1e-6


def test_labels_are_the_class_of_the_one_object():
    cfg = world_preset("single32")
    ds = ToyWorldDataset(cfg, 30, seed=1, fields=("label", "scene"))
    seen = set()
    for it in (ds[i] for i in range(len(ds))):
        (obj,) = it["scene"]["objects"]
        shape, color = cfg.class_name(it["label"])
        assert (shape, color) == (obj["shape"], obj["color"])
        assert it["label"] == SHAPES.index(shape) * len(COLORS) + COLORS.index(color)
        seen.add(it["label"])
    assert len(seen) > 10 and ds.num_classes == 40


def test_items_are_deterministic_and_depend_on_the_seed():
    a = ToyWorldDataset("tiny", 5, seed=7, fields=("image", "label", "caption", "questions"))
    b = ToyWorldDataset("tiny", 5, seed=7, fields=("image", "label", "caption", "questions"))
    c = ToyWorldDataset("tiny", 5, seed=8, fields=("image", "label", "caption", "questions"))
    for i in range(5):
        assert (
            a[i]["image"].numpy().tobytes()
            == a[i]["image"].numpy().tobytes()
            == b[i]["image"].numpy().tobytes()
        )
        assert a[i]["caption"] == b[i]["caption"] and a[i]["questions"] == b[i]["questions"]
    assert any(not torch.equal(a[i]["image"], c[i]["image"]) for i in range(5))


def test_asking_for_more_fields_does_not_change_the_others():
    alone = ToyWorldDataset("scene32", 8, seed=2, fields=("caption",))
    many = ToyWorldDataset("scene32", 8, seed=2, fields=("questions", "edit", "caption", "image"))
    assert [alone[i]["caption"] for i in range(8)] == [many[i]["caption"] for i in range(8)]


def test_caption_style_and_edit_kind_are_passed_through():
    ds = ToyWorldDataset(
        "scene32", 4, fields=("caption", "edit"), caption_style="describe", edit_kind="recolor"
    )
    for i in range(4):
        assert ds[i]["caption"].startswith(("a ", "an "))
        assert ds[i]["edit"].startswith("make the ")


def test_indexing_follows_python_sequences():
    ds = ToyWorldDataset("tiny", 3, fields=("image",))
    assert torch.equal(ds[-1]["image"], ds[2]["image"])
    assert torch.equal(ds[np.int64(1)]["image"], ds[1]["image"])
    with pytest.raises(IndexError, match="index 3 is out of range"):
        ds[3]
    with pytest.raises(TypeError):
        ds[1.5]
    assert len(list(ds)) == 3  # iteration stops at the IndexError


def test_collate_batches_tensors_and_keeps_text_as_lists():
    ds = ToyWorldDataset("scene32", 5, fields=("image", "caption", "questions", "mask", "scene"))
    batch = next(iter(DataLoader(ds, batch_size=5, collate_fn=collate)))
    assert batch["image"].shape == (5, 3, 32, 32) and batch["mask"].shape == (5, 32, 32)
    assert batch["caption"] == [ds[i]["caption"] for i in range(5)]
    assert batch["questions"][3] == ds[3]["questions"] and batch["scene"][4] == ds[4]["scene"]
    labels = collate([{"label": 3}, {"label": 1}])["label"]
    assert labels.dtype == torch.int64 and labels.tolist() == [3, 1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"cfg": "scene32", "n": 4}, "field 'label' needs one-object scenes.*1..2 objects"),
        ({"cfg": "tiny", "n": 0}, "n=0 is invalid; expected an integer >= 1"),
        ({"cfg": "tiny", "n": 4, "fields": ("image", "colour")}, "unknown field 'colour'"),
        ({"cfg": "tiny", "n": 4, "fields": ()}, "no fields requested"),
        (
            {"cfg": "tiny", "n": 4, "fields": ("caption",), "caption_style": "poem"},
            "unknown caption style 'poem'",
        ),
        ({"cfg": "tiny", "n": 4, "fields": ("edit",), "edit_kind": "rotate"}, "unknown edit kind 'rotate'"),
        ({"cfg": "tiny", "n": 4, "num_questions": 0}, "num_questions=0 is invalid"),
        ({"cfg": "scene31", "n": 4}, "unknown world preset 'scene31'"),
    ],
)
def test_bad_arguments_are_one_line_errors_naming_the_value(kwargs, message):
    with pytest.raises(DifflabError, match=message):
        ToyWorldDataset(**kwargs)


def test_scene_image_is_the_image_field():
    from difflab.data.toy import scene_image

    ds = ToyWorldDataset("scene32", 8, seed=3, fields=("image",))
    for i in range(8):
        assert torch.equal(scene_image(ds.scene(i), ds.cfg), ds[i]["image"])
