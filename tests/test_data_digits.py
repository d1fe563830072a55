"""scikit-learn's digits: shapes, range, labels, a fixed stratified split, and upsampling checked against
PIL's independent resampler."""

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from difflab.data.digits import DigitsDataset
from difflab.errors import DifflabError


@pytest.fixture(scope="module")
def raw():
    d = load_digits()
    return d.images.astype(np.float32), d.target


def test_shapes_range_and_labels():
    train, test = DigitsDataset("train"), DigitsDataset("test")
    item = train[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    assert set(train.labels.tolist()) == set(test.labels.tolist()) == set(range(10))
    assert isinstance(item["label"], int) and train.num_classes == 10


def test_split_is_disjoint_stratified_complete_and_deterministic(raw):
    _, labels = raw
    train, test = DigitsDataset("train"), DigitsDataset("test")
    assert not set(train.indices) & set(test.indices)
    assert sorted([*train.indices, *test.indices]) == list(range(len(labels)))
    for c in range(10):  # per class, round(10%) of its images are test
        assert (test.labels == c).sum() == round(0.1 * (labels == c).sum())
    assert np.array_equal(DigitsDataset("test").indices, test.indices)
    assert not np.array_equal(DigitsDataset("test", seed=1).indices, test.indices)
    assert len(DigitsDataset("all")) == len(labels)


@pytest.mark.parametrize(("interpolation", "pil_filter", "size"), [
    ("bilinear", Image.Resampling.BILINEAR, 32),
    ("bilinear", Image.Resampling.BILINEAR, 28),
    ("nearest", Image.Resampling.NEAREST, 32),
])  # fmt: skip
def test_upsampling_matches_pil(raw, interpolation, pil_filter, size):
    images, _ = raw
    ds = DigitsDataset("all", size=size, interpolation=interpolation)
    for i in (0, 1, 500):
        ref = np.asarray(Image.fromarray(images[i]).resize((size, size), pil_filter)) / 16 * 2 - 1
        assert np.abs(ds[i]["image"][0].numpy() - ref).max() < 1e-5


def test_bicubic_stays_in_range_and_three_channels_repeat_the_grey():
    cubic = DigitsDataset("test", interpolation="bicubic")
    assert cubic.images.min() >= -1.0 and cubic.images.max() <= 1.0
    rgb = DigitsDataset("test", channels=3, size=16)
    assert rgb[3]["image"].shape == (3, 16, 16)
    assert torch.equal(rgb[3]["image"], DigitsDataset("test", size=16)[3]["image"].expand(3, -1, -1))


def test_missing_scikit_learn_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(DifflabError, match=r"pip install 'difflab\[digits\]'"):
        DigitsDataset()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"split": "val"}, "unknown split 'val'"),
    ({"interpolation": "lanczos"}, "unknown interpolation 'lanczos'"),
    ({"size": 4}, "size 4 is invalid"),
    ({"channels": 2}, "channels=2 is invalid"),
    ({"test_fraction": 1.0}, "test_fraction=1.0 is invalid"),
])  # fmt: skip
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(DifflabError, match=message):
        DigitsDataset(**kwargs)
