"""The table of model families: every preset resolves, builds and trains a step; ``difflab info`` builds
the network a run trains (the text refiner included); requests and run records are distinct objects."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from difflab.cli import main
from difflab.config import apply_overrides
from difflab.errors import DifflabError
from difflab.models import clip, pixel, t2i
from difflab.models.registry import FAMILIES, PRESETS, family_of_run, get_family, get_preset
from difflab.models.text_encoder import export_text_encoder
from difflab.nn.unet import count_parameters


def test_every_preset_resolves_builds_and_takes_one_step():
    # nerfstudio-style smoke test over every preset of every family: the request resolves (without parent
    # runs) into a record whose network trains a step at batch 2.
    assert set(FAMILIES) == {"pixel", "vae", "ldm", "clip", "planner", "t2i", "control", "lora", "instruct", "depth",
                             "lm", "vlm"}  # fmt: skip
    for name, preset in PRESETS.items():
        family = FAMILIES[preset.family]
        record = family.resolve(preset.build(), attach=False)
        record = dataclasses.replace(record, train=dataclasses.replace(record.train, batch_size=2))
        model, inputs, loss_fn = family.network(record)
        out = model(**inputs)
        (out.float().square().mean() if loss_fn is None else loss_fn(out)).backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        assert trained and all(p.grad is not None for p in trained), name


def test_resolve_derives_from_the_data_and_leaves_the_request_alone():
    request = apply_overrides(get_preset("tiny").build(), ["data.dataset=digits", "data.image_size=32"])
    record = pixel.resolve(request)
    assert (record.unet.in_channels, record.unet.image_size, record.unet.num_classes) == (1, 32, 10)
    assert request.unet.in_channels == 3  # the request is what the user asked for, not rewritten
    assert pixel.resolve(record) == record  # resolving a record changes nothing
    c = clip.resolve(get_preset("clip_tiny").build())
    assert c.vision.image_size == 16 and c.text.vocab_size == clip.world_tokenizer(16).vocab_size


@pytest.mark.parametrize(
    "override, message",
    [
        ("sample.sampler=heunn", "unknown sampler 'heunn' (did you mean 'heun'?)"),
        ("sample.steps=0", "sampling steps 0 is invalid"),
        ("sample.spacing=lin", "unknown timestep spacing 'lin'"),
        ("sample.cfg_scale=nan", "guidance scale nan is invalid"),
    ],
)
def test_sampling_settings_are_refused_before_training(override, message):
    with pytest.raises(DifflabError, match=re.escape(message)):
        apply_overrides(get_preset("tiny").build(), [override])


def test_more_sampling_steps_than_the_schedule_has_are_refused_at_resolution(tmp_path, capsys):
    assert (
        main(["train", "--preset", "tiny", "--out", str(tmp_path / "r"), "--set", "sample.steps=5000"]) == 2
    )
    assert (
        "sample.steps 5000 is invalid; expected at most diffusion.timesteps (1000)" in capsys.readouterr().err
    )
    assert not (tmp_path / "r").exists()  # refused before any work


def test_info_counts_the_network_a_t2i_run_trains(tmp_path, capsys):
    """``difflab info`` builds what training builds: the text refiner in front of the UNet included."""
    clip_run = clip.train(
        apply_overrides(get_preset("clip_tiny").build(), ["train.steps=2"]), tmp_path / "clip"
    )
    encoder = export_text_encoder(clip_run, tmp_path / "te")
    overrides = ["text_refiner_layers=1", "train.steps=2", "sample.grid=2", "sample.steps=2"]
    run = t2i.train(apply_overrides(get_preset("t2i_tiny").build(), [f"text_encoder={encoder}", *overrides]),
                    tmp_path / "t2i")  # fmt: skip
    model, _ = t2i.load_model(run)
    trained = count_parameters(model.network)
    assert model.network.refiner is not None
    sets = [x for o in overrides for x in ("--set", o)]
    assert main(["info", "--preset", "t2i_tiny", *sets, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == trained
    assert main(["info", "--preset", "t2i_tiny", *sets, "--set", f"text_encoder={encoder}", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["parameters"] == trained  # widths read from the encoder
    assert main(["info", "--preset", "t2i_tiny", "--set", "train.steps=2", "--json"]) == 0  # no refiner
    assert json.loads(capsys.readouterr().out)["parameters"] < trained


def test_family_of_run_and_unknown_names(tmp_path):
    with pytest.raises(DifflabError, match="unknown preset 'tinny' \\(did you mean 'tiny'\\?\\)"):
        get_preset("tinny")
    with pytest.raises(DifflabError, match="unknown model family 'gan'"):
        get_family("gan")
    (tmp_path / "config.json").write_text(json.dumps({"kind": "gan"}))
    with pytest.raises(DifflabError, match="unknown model family 'gan'"):
        family_of_run(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"kind": "clip"}))
    assert family_of_run(tmp_path) is FAMILIES["clip"]
