"""The toy-world disk cache: bit-identical to rendering, keyed by everything the pixels depend on, and
never trusted when it is torn or made for something else."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import difflab.data.toy as toy
from difflab.data.cache import cache_file, cached_arrays
from difflab.data.toy import ToyWorldDataset
from difflab.errors import DifflabError

FIELDS = ("image", "label", "depth", "edges", "mask")


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


def _files(path):
    return sorted(p.name for p in path.iterdir())


def test_cached_items_are_bit_identical_to_rendered_ones(tmp_path):
    fresh = ToyWorldDataset("tiny", 12, seed=3, fields=FIELDS)
    cached = ToyWorldDataset("tiny", 12, seed=3, fields=FIELDS, cache_dir=tmp_path)
    assert all(_equal(fresh[i], cached[i]) for i in range(12))
    (name,) = _files(tmp_path)  # one file, no temporary left behind
    assert name.startswith("toy-16px-n12-seed3-") and name.endswith(".safetensors")


def test_a_second_dataset_reads_the_file_instead_of_rendering(tmp_path, monkeypatch):
    first = ToyWorldDataset("tiny", 6, seed=0, fields=FIELDS, cache_dir=tmp_path)
    calls = []
    original = toy.render
    monkeypatch.setattr(toy, "render", lambda *a: calls.append(1) or original(*a))
    second = ToyWorldDataset("tiny", 6, seed=0, fields=FIELDS, cache_dir=tmp_path)
    assert all(_equal(first[i], second[i]) for i in range(6))
    assert len(calls) == 1  # the key's fingerprint draws item 0; the six items come from the file


def test_language_fields_still_work_on_a_cached_dataset(tmp_path):
    fields = ("image", "caption", "scene")
    fresh = ToyWorldDataset("scene32", 4, seed=1, fields=fields)
    cached = ToyWorldDataset("scene32", 4, seed=1, fields=fields, cache_dir=tmp_path)
    assert all(_equal(fresh[i], cached[i]) for i in range(4))


def test_the_key_separates_seed_size_fields_and_world(tmp_path):
    for kwargs in [
        {"cfg": "tiny", "n": 4, "seed": 0},
        {"cfg": "tiny", "n": 4, "seed": 1},
        {"cfg": "tiny", "n": 5, "seed": 0},
        {"cfg": "tiny", "n": 4, "seed": 0, "fields": ("image",)},
        {"cfg": "single32", "n": 4, "seed": 0},
    ]:
        ToyWorldDataset(**{"fields": ("image", "label"), **kwargs}, cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 5


def test_a_change_in_drawing_without_a_version_bump_makes_a_new_cache(tmp_path, monkeypatch):
    ToyWorldDataset("tiny", 4, seed=0, fields=("image",), cache_dir=tmp_path)
    original = toy.render
    monkeypatch.setattr(toy, "render", lambda scene, cfg: dataclasses.replace(
        original(scene, cfg), image=original(scene, cfg).image * 0.5))  # fmt: skip
    changed = ToyWorldDataset("tiny", 4, seed=0, fields=("image",), cache_dir=tmp_path)
    assert len(_files(tmp_path)) == 2
    assert torch.equal(changed[1]["image"], ToyWorldDataset("tiny", 4, seed=0, fields=("image",))[1]["image"])


def test_a_torn_or_foreign_cache_file_is_rebuilt(tmp_path):
    fresh = ToyWorldDataset("tiny", 5, seed=2, fields=FIELDS)
    ToyWorldDataset("tiny", 5, seed=2, fields=FIELDS, cache_dir=tmp_path)
    (path,) = tmp_path.iterdir()
    path.write_bytes(path.read_bytes()[:100])  # torn
    with pytest.warns(UserWarning, match="unreadable.*rebuilding"):
        again = ToyWorldDataset("tiny", 5, seed=2, fields=FIELDS, cache_dir=tmp_path)
    assert all(_equal(fresh[i], again[i]) for i in range(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rebuilt file is good: no warning now
        ToyWorldDataset("tiny", 5, seed=2, fields=FIELDS, cache_dir=tmp_path)


def test_a_file_made_for_another_key_is_not_used(tmp_path):
    path, _ = cache_file(tmp_path, "x", {"a": 1})
    cached_arrays(tmp_path, "x", {"a": 2}, 2, lambda i: {"v": np.full(3, 9)})
    (tmp_path / _files(tmp_path)[0]).rename(path)  # the key-2 file under key 1's name
    with pytest.warns(UserWarning, match="different key"):
        arrays = cached_arrays(tmp_path, "x", {"a": 1}, 2, lambda i: {"v": np.full(3, i)})
    assert arrays["v"].tolist() == [[0, 0, 0], [1, 1, 1]]


def test_an_unusable_cache_folder_is_a_one_line_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(DifflabError, match="cannot create cache folder .*file"):
        ToyWorldDataset("tiny", 2, fields=("image",), cache_dir=blocker / "cache")


def test_dataloader_workers_see_the_cached_items(tmp_path):
    fresh = ToyWorldDataset("tiny", 8, seed=4, fields=("image", "label"))
    cached = ToyWorldDataset("tiny", 8, seed=4, fields=("image", "label"), cache_dir=tmp_path)
    batches = list(DataLoader(cached, batch_size=4, num_workers=2))
    assert torch.equal(
        torch.cat([b["image"] for b in batches]), torch.stack([fresh[i]["image"] for i in range(8)])
    )
    assert torch.cat([b["label"] for b in batches]).tolist() == [fresh[i]["label"] for i in range(8)]
