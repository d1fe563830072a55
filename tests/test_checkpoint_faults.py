"""Checkpoints as hostile input: whatever is wrong with the newest checkpoint, reading it raises a
``DifflabError`` naming it (never another exception type), and discovery falls back to the older good
one with a one-line warning. Also: an exported text encoder pins its tokenizer as well as its weights.

Each damage below is one an adversarial tester found ending ``difflab sample`` / ``--resume`` with a
traceback, or one the fixed reader now bounds (sizes, nesting depth, where ``meta.json`` may point)."""

from __future__ import annotations

import builtins
import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import difflab.train.checkpoint as ckpt
import difflab.train.checkpoint_format as ckpt_format
import difflab.train.checkpoint_read as ckpt_read
from difflab.errors import DifflabError
from difflab.train import latest_checkpoint, read_checkpoint, save_checkpoint, verify_checkpoint

GOOD, BAD = "step_0000015", "step_0000020"


def sample_state(scale: float) -> dict:
    """Small, but with every tag ``split_state`` writes: tensors, int keys (``__items__``), tuples."""
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"w": scale * torch.randn(3, 4, generator=g), "b": torch.zeros(4)},
        "optimizer": {"state": {0: {"exp_avg": torch.randn(3, 4, generator=g)}}, "betas": (0.9, 0.999)},
        "loader": {"epoch": 2},
    }


@pytest.fixture
def run(tmp_path):
    """``(root, good, bad)``: two good checkpoints, steps 15 and 20; the tests damage the newer one."""
    good = save_checkpoint(tmp_path, 15, sample_state(1.0))
    bad = save_checkpoint(tmp_path, 20, sample_state(2.0))
    return tmp_path, good, bad


def _meta(path) -> dict:
    return json.loads((path / "meta.json").read_text())


def _edit_meta(path, edit) -> None:
    meta = _meta(path)
    edit(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def _put_tensors(path, data: bytes) -> None:
    """Replace state.safetensors and make meta.json vouch for it, so only the content is at fault."""
    (path / "state.safetensors").write_bytes(data)
    _edit_meta(
        path, lambda m: m["tensors"].update(bytes=len(data), sha256=ckpt._sha256(path / "state.safetensors"))
    )


def _safetensors(header: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + data


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def _deny_open(monkeypatch, victim) -> None:
    """Make ``victim`` unreadable to the checkpoint module as ``chmod 000`` would (even for root)."""

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == os.fspath(victim):
            raise PermissionError(13, "Permission denied", os.fspath(file))
        return builtins.open(file, *args, **kwargs)

    for module in (ckpt_read, ckpt_format):  # the reader, and the sha256 of the format module
        monkeypatch.setattr(module, "open", guarded_open, raising=False)


def _set(*keys, value):
    """An edit of meta.json setting the value at ``keys``."""

    def edit(meta):
        node = meta
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


def _rename_tensor(meta):
    meta["state"]["model"]["w"] = {"__tensor__": "not/in/the/file"}


def _deep_state(meta):
    meta["state"]["loader"] = json.loads(_nested(100))  # valid JSON well within the parser's limit


def _huge_meta(path, monkeypatch):
    monkeypatch.setattr(ckpt_read, "_MAX_META_BYTES", (path.parent / GOOD / "meta.json").stat().st_size + 16)
    with open(path / "meta.json", "a") as f:
        f.write(" " * 1000)  # still valid JSON: refused for its size alone


def _symlink_out(path, monkeypatch):
    (path / "state.safetensors").unlink()
    (path / "state.safetensors").symlink_to(path.parent / GOOD / "state.safetensors")


def _fifo_meta(path, monkeypatch):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    (path / "meta.json").unlink()
    os.mkfifo(path / "meta.json")


def _overlapping_header(path, monkeypatch):
    entry = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
    _put_tensors(path, _safetensors(json.dumps({"x": entry, "y": entry}).encode(), b"\0" * 4))


def _truncate_vouched(path, monkeypatch):
    data = (path / "state.safetensors").read_bytes()
    _put_tensors(path, data[: len(data) - 7])


def _truncate(path, monkeypatch):
    data = (path / "state.safetensors").read_bytes()
    (path / "state.safetensors").write_bytes(data[: len(data) // 2])


# damage name -> (what to do to the newest checkpoint, a regex the error must match)
DAMAGE = {
    "no_tensors_key": (lambda m: m.pop("tensors"), r"meta.json' has no tensors"),
    "format_version_abc": (_set("format_version", value="abc"), r"format_version is 'abc', expected an int"),
    "format_version_bool": (_set("format_version", value=True), r"format_version is True"),
    "step_a_float": (_set("step", value=20.5), r"step is 20.5, expected an int"),
    "bytes_a_string": (_set("tensors", "bytes", value="1234"), r"tensors.bytes is '1234'"),
    "sha256_wrong": (_set("tensors", "sha256", value="0" * 64), r"does not match the sha256"),
    "sha256_not_hex": (_set("tensors", "sha256", value="xyz"), r"tensors.sha256 is 'xyz', expected 64"),
    "file_dotdot": (_set("tensors", "file", value="../x"), r"tensors.file is '\.\./x', expected"),
    "file_absolute": (_set("tensors", "file", value="/etc/passwd"), r"tensors.file is '/etc/passwd'"),
    "file_a_list": (_set("tensors", "file", value=["x"]), r"tensors.file is \['x'\]"),
    "state_missing": (lambda m: m.pop("state"), r"has no state"),
    "state_a_list": (_set("state", value=[]), r"state is \[\], expected an object"),
    "tensor_name_missing": (_rename_tensor, r"names tensor 'not/in/the/file', which .* does not hold"),
    "tensor_name_a_list": (_set("state", "model", "w", value={"__tensor__": [1]}), r"names tensor \[1\]"),
    "tensor_name_metadata": (
        _set("state", "model", "w", value={"__tensor__": "__metadata__"}),
        "names tensor",
    ),
    "items_not_pairs": (
        _set("state", "optimizer", "state", value={"__items__": "x"}),
        r"\[key, value\] pairs",
    ),
    "items_unhashable_key": (
        _set("state", "optimizer", "state", value={"__items__": [[[1], 2]]}),
        r"keys that",
    ),
    "tuple_not_a_list": (
        _set("state", "optimizer", "betas", value={"__tuple__": 3}),
        r"holds 3, expected a list",
    ),
    "deep_state_tree": (_deep_state, r"nested more than 64 levels deep"),
    # raw meta.json contents
    "meta_a_list": (b"[1, 2]", r"holds a JSON list, not a checkpoint description"),
    "meta_a_number": (b"7", r"holds a JSON int"),
    "meta_not_json": (b"{not json", r"is not valid JSON"),
    "meta_not_utf8": (b'{"format": "\xff"}', r"is not valid JSON"),
    "meta_empty": (b"", r"is not valid JSON"),
    "meta_deeply_nested": (_nested(100_000).encode(), r"meta.json' is nested too deeply to parse"),
    "meta_int_too_long": (b'{"step": 1' + b"0" * 5000 + b"}", r"is not valid JSON"),
    # files
    "meta_huge": (_huge_meta, r"meta.json' has \d+ bytes, over the \d+"),
    "meta_missing": (lambda p, mp: (p / "meta.json").unlink(), r"has no meta.json"),
    "meta_a_fifo": (_fifo_meta, r"meta.json' is not a regular file"),
    "meta_unreadable": (lambda p, mp: _deny_open(mp, p / "meta.json"), r"cannot read .*meta.json'"),
    "tensors_unreadable": (
        lambda p, mp: _deny_open(mp, p / "state.safetensors"),
        r"cannot read .*state.safetensors': Permission denied",
    ),
    "tensors_missing": (lambda p, mp: (p / "state.safetensors").unlink(), r"is missing state.safetensors"),
    "tensors_link_out": (_symlink_out, r"state.safetensors' leads outside checkpoint"),
    "tensors_truncated": (_truncate, r"bytes but meta.json recorded"),
    "tensors_truncated_vouched": (_truncate_vouched, r"is truncated or padded"),
    "header_deeply_nested": (
        lambda p, mp: _put_tensors(p, _safetensors(_nested(100_000).encode())),
        r"safetensors header nested too deeply to parse",
    ),
    "header_overlap": (_overlapping_header, r"gap or an overlap"),
    "header_bad_entry": (
        lambda p, mp: _put_tensors(
            p, _safetensors(b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": "ab"}}')
        ),
        r"malformed safetensors header entry 'x'",
    ),
    "header_a_list": (lambda p, mp: _put_tensors(p, _safetensors(b"[1]")), r"is not a safetensors file"),
}


def _damage(bad, monkeypatch, how) -> None:
    if isinstance(how, bytes):
        (bad / "meta.json").write_bytes(how)
    elif how.__code__.co_argcount == 1:
        _edit_meta(bad, how)
    else:
        how(bad, monkeypatch)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_bad_newest_checkpoint_falls_back_to_the_older_good_one(run, capsys, monkeypatch, damage):
    root, good, bad = run
    how, message = DAMAGE[damage]
    _damage(bad, monkeypatch, how)
    assert latest_checkpoint(root) == good
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and BAD in err[0], err
    with pytest.raises(DifflabError, match=message):
        verify_checkpoint(bad)
    with pytest.raises(DifflabError, match=BAD):
        read_checkpoint(bad)
    try:  # unverified, it may load (a wrong hash goes unnoticed), but fails only as a DifflabError
        read_checkpoint(bad, verify=False)
    except DifflabError:
        pass
    assert_equal_states(read_checkpoint(good)[0], sample_state(1.0))


def assert_equal_states(a, b):
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict | list | tuple):
        assert len(a) == len(b)
        for x, y in zip(
            a.items() if isinstance(a, dict) else a, b.items() if isinstance(b, dict) else b, strict=True
        ):
            assert_equal_states(x, y)
    else:
        assert a == b


def test_an_unforeseen_failure_is_skipped_too(run, capsys, monkeypatch):
    """Discovery is the last line: even an exception type no check foresaw skips only that checkpoint."""
    root, good, bad = run
    verify = ckpt.verify_checkpoint

    def fragile(path):
        if path == bad:
            raise KeyError("something no one checked\non two lines")
        return verify(path)

    monkeypatch.setattr(ckpt, "verify_checkpoint", fragile)
    assert latest_checkpoint(root) == good
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and BAD in err[0] and "KeyError" in err[0], err


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads a chmod 000 file")
def test_a_chmod_000_checkpoint_is_skipped(run, capsys):
    """The real permission bits (``meta_unreadable`` / ``tensors_unreadable`` above cover this as root)."""
    root, good, bad = run
    (bad / "state.safetensors").chmod(0)
    try:
        assert latest_checkpoint(root) == good
        assert BAD in capsys.readouterr().err
        with pytest.raises(DifflabError, match="cannot read"):
            verify_checkpoint(bad)
    finally:
        (bad / "state.safetensors").chmod(0o600)


def test_an_unsaveable_state_is_refused_before_anything_is_written(tmp_path):
    """What is saved must read back: a state nested past the bound is refused at save, not at resume."""
    deep: dict = {}
    node = deep
    for _ in range(70):
        node["a"] = {}
        node = node["a"]
    with pytest.raises(DifflabError, match="cannot save checkpoint: the state is nested more than 64"):
        save_checkpoint(tmp_path, 1, {"x": deep})
    assert list(tmp_path.iterdir()) == []


def test_merge_state_bounds_depth_and_names_missing_tensors():
    deep = json.loads("[" * 500 + "]" * 500)
    with pytest.raises(DifflabError, match="nested more than 64 levels deep"):
        ckpt.merge_state({"x": deep}, {})
    with pytest.raises(DifflabError, match="names tensor 'w', which is missing"):
        ckpt.merge_state({"w": {"__tensor__": "w"}}, {})


# ------------------------------------------------------------------------------------- random input

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_meta_keys = st.sampled_from(
    [("format",), ("format_version",), ("step",), ("tensors",), ("state",), ("tensors", "file"),
     ("tensors", "bytes"), ("tensors", "sha256"), ("state", "model"), ("state", "model", "w"),
     ("state", "optimizer", "state"), ("state", "optimizer", "betas"), ("state", "optimizer", "betas", "__tuple__")]
)  # fmt: skip
_entry = st.fixed_dictionaries(
    {"dtype": st.sampled_from(["F32", "U8", "BF16", "nope"]), "shape": st.lists(st.integers(-1, 5), max_size=3),
     "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2)}
)  # fmt: skip
_tensor_files = st.one_of(
    st.binary(max_size=120),
    st.builds(
        lambda header, data: _safetensors(json.dumps(header).encode(), data),
        st.dictionaries(st.text(max_size=4), _entry | _json, max_size=3),
        st.binary(max_size=40),
    ),
)


def _only_difflab_errors(call) -> None:
    try:
        call()
    except DifflabError:
        pass


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    meta=st.one_of(
        st.binary(max_size=120).map(lambda b: ("raw", b)),
        _json.map(lambda j: ("json", j)),
        st.tuples(_meta_keys, _json).map(lambda kv: ("edit", kv)),
        st.just(("keep", None)),
    ),
    tensors=st.one_of(st.none(), _tensor_files),
)
def test_random_files_raise_only_difflab_errors(run, meta, tensors):
    """Random meta.json (bytes, JSON, or the real one with one field replaced) and random tensor files
    (bytes, or a safetensors frame around a random header) that meta.json vouches for: reading raises
    nothing but ``DifflabError``, and discovery never raises."""
    root, good, bad = run
    (bad / "meta.json").write_bytes((root / GOOD / "meta.json").read_bytes())
    (bad / "state.safetensors").write_bytes((root / GOOD / "state.safetensors").read_bytes())
    if tensors is not None:
        _put_tensors(bad, tensors)
    kind, value = meta
    if kind == "raw":
        (bad / "meta.json").write_bytes(value)
    elif kind == "json":
        (bad / "meta.json").write_text(json.dumps(value))
    elif kind == "edit":
        keys, new = value

        def edit(m):
            node = m
            for key in keys[:-1]:
                if not isinstance(node, dict) or key not in node:
                    return
                node = node[key]
            if isinstance(node, dict):
                node[keys[-1]] = new

        _edit_meta(bad, edit)
    assert latest_checkpoint(root) in (good, bad)
    _only_difflab_errors(lambda: verify_checkpoint(bad))
    _only_difflab_errors(lambda: read_checkpoint(bad))
    _only_difflab_errors(lambda: read_checkpoint(bad, verify=False))


# ----------------------------------------------------------------------------------- text encoders


@pytest.fixture(scope="module")
def exported(tmp_path_factory, single_thread_module):
    """A CLIP run trained for two steps, its text encoder exported: what the checks need is the folder."""
    from difflab.config import apply_overrides
    from difflab.models import clip
    from difflab.models.registry import get_preset
    from difflab.models.text_encoder import export_text_encoder

    base = tmp_path_factory.mktemp("te")
    run_dir = clip.train(apply_overrides(get_preset("clip_tiny").build(), ["train.steps=2"]), base / "clip")
    return export_text_encoder(run_dir, base / "te")


@pytest.fixture
def encoder_dir(exported, tmp_path):
    import shutil

    return shutil.copytree(exported, tmp_path / "te")


def test_an_edited_tokenizer_is_refused_and_changes_the_id(encoder_dir):
    from difflab.models.text_encoder import load_text_encoder, text_encoder_id

    before = text_encoder_id(encoder_dir)
    assert before.startswith("text_encoder:") and len(before) == len("text_encoder:") + 16
    load_text_encoder(encoder_dir)
    # Swap two words: every prompt that uses them now maps to other ids, so other images.
    tokenizer = json.loads((encoder_dir / "tokenizer.json").read_text())
    words = tokenizer["words"]
    words[-1], words[-2] = words[-2], words[-1]
    (encoder_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    assert text_encoder_id(encoder_dir) != before
    with pytest.raises(DifflabError, match=r"tokenizer.json' does not match the sha256 recorded in"):
        load_text_encoder(encoder_dir)


def test_edited_weights_are_refused_and_change_the_id(encoder_dir):
    from difflab.models.text_encoder import load_text_encoder, text_encoder_id

    before = text_encoder_id(encoder_dir)
    weights = load_file(str(encoder_dir / "text_encoder.safetensors"))
    weights["text_proj.weight"] += 1
    save_file(weights, str(encoder_dir / "text_encoder.safetensors"))
    assert text_encoder_id(encoder_dir) != before
    with pytest.raises(DifflabError, match=r"text_encoder.safetensors' does not match the sha256"):
        load_text_encoder(encoder_dir)


def test_a_folder_exported_before_hashes_loads_with_its_old_id(encoder_dir):
    """Old exports record no hashes: they load unchecked and keep the weights-only id that text-to-image
    runs trained on them recorded, so those runs keep loading."""
    import hashlib

    from difflab.models.text_encoder import load_text_encoder, text_encoder_id

    config = json.loads((encoder_dir / "text_encoder.json").read_text())
    del config["sha256"]
    (encoder_dir / "text_encoder.json").write_text(json.dumps(config))
    weights = (encoder_dir / "text_encoder.safetensors").read_bytes()
    assert (
        text_encoder_id(encoder_dir) == f"text_encoder.safetensors:{hashlib.sha256(weights).hexdigest()[:16]}"
    )
    load_text_encoder(encoder_dir)


def test_a_malformed_hash_record_is_named(encoder_dir):
    from difflab.models.text_encoder import load_text_encoder

    config = json.loads((encoder_dir / "text_encoder.json").read_text())
    config["sha256"] = "abc"
    (encoder_dir / "text_encoder.json").write_text(json.dumps(config))
    with pytest.raises(DifflabError, match=r"text_encoder.json': sha256 is 'abc', expected the sha256 of"):
        load_text_encoder(encoder_dir)
