"""Checkpoints: exact round trip, atomic writes under a crash, corrupt-checkpoint fallback, no pickle."""

import json
import os
import pickle
import shutil

import pytest
import torch

import difflab.train.checkpoint as ckpt
from difflab.errors import DifflabError
from difflab.train import (
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
)


def sample_state(scale: float = 1.0) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"w": scale * torch.randn(3, 4, generator=g), "b": torch.zeros(4, dtype=torch.bfloat16)},
        # The optimizer's shape: int keys, tuples, 0-dim tensors, floats that must survive JSON exactly.
        "optimizer": {
            "state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4, generator=g)}},
            "param_groups": [
                {"params": [0], "betas": (0.9, 0.999), "lr": 0.1, "eps": 1e-300, "foreach": None}
            ],
        },
        "rng": {"cpu": torch.get_rng_state(), "idx": torch.arange(5)},
        "loader": {"epoch": 2, "position": 16},
        "flag": True,
        "nothing": None,
    }


def assert_equal_trees(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_equal_trees(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_equal_trees(x, y)
    else:
        assert a == b


def test_round_trip_is_exact_and_layout_is_documented(tmp_path):
    state = sample_state()
    path = save_checkpoint(tmp_path, 100, state, {"train_config": {"lr": 0.1}})
    assert path == tmp_path / "step_0000100"
    assert sorted(os.listdir(path)) == ["meta.json", "state.safetensors"]
    loaded, meta = read_checkpoint(path)
    assert_equal_trees(state, loaded)
    assert meta["step"] == 100 and meta["train_config"] == {"lr": 0.1}
    assert meta["tensors"]["bytes"] == (path / "state.safetensors").stat().st_size
    # Tensors are named by their path in the state tree.
    header = ckpt.check_safetensors_header(path / "state.safetensors")
    assert {"model/w", "optimizer/state/0/exp_avg", "rng/cpu"} <= set(header)


def test_loading_never_touches_pickle(tmp_path, monkeypatch):
    path = save_checkpoint(tmp_path, 1, sample_state())

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle/torch.load used while loading a checkpoint")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert_equal_trees(read_checkpoint(path)[0], sample_state())


def test_keep_last_prunes_the_oldest(tmp_path):
    for step in (10, 20, 30, 40):
        save_checkpoint(tmp_path, step, sample_state())
    deleted = prune_checkpoints(tmp_path, keep_last=2)
    assert [p.name for p in deleted] == ["step_0000010", "step_0000020"]
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]
    assert sorted(os.listdir(tmp_path)) == ["step_0000030", "step_0000040"]


@pytest.mark.parametrize("fail_at", ["tensor_writer", "rename"])
def test_crash_mid_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch, fail_at):
    good = save_checkpoint(tmp_path, 5, sample_state())
    before = (good / "state.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk on fire")

    if fail_at == "tensor_writer":
        monkeypatch.setattr(ckpt, "save_file", crash)
    else:
        monkeypatch.setattr(ckpt.os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        save_checkpoint(tmp_path, 10, sample_state(scale=2.0))
    monkeypatch.undo()
    assert not (tmp_path / "step_0000010").exists()
    assert latest_checkpoint(tmp_path) == good
    assert (good / "state.safetensors").read_bytes() == before


def test_a_hard_crash_leaves_only_a_temporary_that_is_ignored_then_removed(tmp_path):
    good = save_checkpoint(tmp_path, 5, sample_state())
    # What a killed process leaves: a complete-looking directory under its temporary name.
    shutil.copytree(good, tmp_path / ".tmp-step_0000010-deadbeef")
    assert latest_checkpoint(tmp_path) == good
    save_checkpoint(tmp_path, 6, sample_state())
    assert sorted(os.listdir(tmp_path)) == ["step_0000005", "step_0000006"]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_meta"])
def test_corrupt_latest_is_skipped_with_a_warning_naming_it(tmp_path, capsys, damage):
    good = save_checkpoint(tmp_path, 5, sample_state())
    bad = save_checkpoint(tmp_path, 10, sample_state(scale=2.0))
    tensors = bad / "state.safetensors"
    data = tensors.read_bytes()
    if damage == "truncate":
        tensors.write_bytes(data[: len(data) // 2])
    elif damage == "flip_byte":
        tensors.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    else:
        (bad / "meta.json").unlink()
    assert latest_checkpoint(tmp_path) == good
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and "step_0000010" in err[0]
    with pytest.raises(DifflabError, match="step_0000010"):
        read_checkpoint(bad)


class _Evil:
    """Unpickling this creates a marker file: the proof that a loader ran pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_is_refused_without_being_unpickled(tmp_path):
    marker = tmp_path / "UNPICKLED"
    payload = pickle.dumps({"model": _Evil(marker)})
    evil = tmp_path / "model.pt"
    evil.write_bytes(payload)
    with pytest.raises(DifflabError, match="model.pt' is not a safetensors file"):
        read_checkpoint(evil)
    with pytest.raises(DifflabError, match="model.pt' is not a safetensors file"):
        load_model_weights(evil, torch.nn.Linear(2, 2))

    # The same payload inside a checkpoint whose meta.json vouches for its size and hash.
    good = save_checkpoint(tmp_path / "run", 20, sample_state())
    (good / "state.safetensors").write_bytes(payload)
    meta = json.loads((good / "meta.json").read_text())
    meta["tensors"].update(bytes=len(payload), sha256=ckpt._sha256(good / "state.safetensors"))
    (good / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DifflabError, match="state.safetensors' is not a safetensors file"):
        read_checkpoint(good)
    assert latest_checkpoint(tmp_path / "run") is None
    assert not marker.exists()

    # The payload is live: real unpickling would have created the marker.
    pickle.loads(payload)
    assert marker.exists()
