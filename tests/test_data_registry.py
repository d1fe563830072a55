"""Datasets by name: every name builds, and typos are one-line errors naming the bad word."""

import pytest
from PIL import Image

from difflab.data import DATASETS, DigitsDataset, ImageFolderDataset, ToyWorldDataset, make_dataset
from difflab.errors import DifflabError


def test_every_name_builds_its_dataset(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    assert isinstance(make_dataset("toy", cfg="tiny", n=3), ToyWorldDataset)
    assert isinstance(make_dataset("digits", split="test", size=8), DigitsDataset)
    assert isinstance(make_dataset("folder", root=tmp_path, size=8), ImageFolderDataset)
    assert set(DATASETS) == {"toy", "digits", "folder"}


@pytest.mark.parametrize(("name", "options", "message"), [
    ("toys", {}, "unknown dataset 'toys' \\(did you mean 'toy'\\?\\); choose one of: toy, digits, folder"),
    ("digits", {"sise": 32}, "unknown digits dataset option 'sise' \\(did you mean 'size'\\?\\)"),
    ("folder", {"size": 8}, "dataset 'folder' needs option\\(s\\): root"),
    ("toy", {}, "dataset 'toy' needs option\\(s\\): cfg, n"),
])  # fmt: skip
def test_mistakes_are_one_line_errors(name, options, message):
    with pytest.raises(DifflabError, match=message):
        make_dataset(name, **options)
