"""Config overrides and the config.json round trip."""

from dataclasses import dataclass, field

import pytest
from hypothesis import given
from hypothesis import strategies as st

from difflab.config import apply_overrides, from_dict, to_dict, valid_keys
from difflab.errors import DifflabError
from difflab.nn.unet import UNetConfig


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    steps: int = 10
    ema: float | None = 0.999


@dataclass(frozen=True)
class Outer:
    name: str = "demo"
    flag: bool = False
    unet: UNetConfig = field(default_factory=UNetConfig)
    train: Inner = field(default_factory=Inner)


def test_overrides_are_typed_and_nested():
    cfg = apply_overrides(
        Outer(), ["train.lr=3e-4", "train.steps=7", "unet.channel_mult=1,2", "flag=true", "train.ema=none"]
    )
    assert cfg.train.lr == 3e-4 and cfg.train.steps == 7 and cfg.flag is True and cfg.train.ema is None
    assert cfg.unet.channel_mult == (1, 2)


def test_unknown_key_lists_valid_ones_and_suggests():
    with pytest.raises(DifflabError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"):
        apply_overrides(Outer(), ["train.lrr=1"])


@pytest.mark.parametrize(
    "item,message",
    [
        ("train.steps=ten", "bad value 'ten' for config key 'train.steps'; expected int"),
        ("flag=maybe", "bad value 'maybe' for config key 'flag'; expected bool"),
        ("train", "bad override 'train'; expected key=value"),
        ("train=1", "is a group"),
        ("unet.image_size=30", "unet.image_size=30' is invalid"),
    ],
)
def test_bad_overrides_are_named(item, message):
    with pytest.raises(DifflabError, match=message.replace("(", r"\(").replace(")", r"\)")):
        apply_overrides(Outer(), [item])


def test_round_trip_and_incompatible_keys():
    cfg = apply_overrides(Outer(), ["unet.attention_resolutions=8,16", "train.lr=0.5"])
    assert from_dict(Outer, to_dict(cfg)) == cfg
    with pytest.raises(DifflabError, match="unknown keys"):
        from_dict(Outer, {**to_dict(cfg), "bogus": 1})


@given(st.text(max_size=30))
def test_fuzzed_overrides_succeed_or_raise_the_documented_error(text):
    try:
        apply_overrides(Outer(), [text])
    except DifflabError:
        pass


def test_valid_keys_reach_nested_fields():
    keys = valid_keys(Outer)
    assert "unet.channels" in keys and "train.lr" in keys and "name" in keys
