"""The command line: --version, --help on every command, the world commands and the demo."""

import json
import subprocess
import sys

import pytest

from difflab import __version__
from difflab.cli import build_parser, main


def test_version():
    out = subprocess.run(
        [sys.executable, "-m", "difflab", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"difflab {__version__}"


def _commands(parser, prefix=()):
    """Every (sub)command path, e.g. ('world', 'check')."""
    for action in parser._actions:
        if action.__class__.__name__ == "_SubParsersAction":
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from _commands(sub, (*prefix, name))


@pytest.mark.parametrize("command", list(_commands(build_parser())))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert len(capsys.readouterr().out) > 100


def test_world_check_json(capsys):
    assert main(["world", "check", "--preset", "scene32", "--n", "30", "--noise", "0.05", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 30 and report["noise_sigma"] == 0.05
    assert {"exact_scene_accuracy", "object_count_accuracy", "attribute_accuracy"} <= set(report)
    assert report["exact_scene_accuracy"] >= 0.95


def test_world_preview_writes_png(tmp_path):
    out = tmp_path / "grid.png"
    assert (
        main(["world", "preview", "--n", "4", "--preset", "scene64", "--field", "depth", "--out", str(out)])
        == 0
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_trains_samples_and_scores(tmp_path, capsys):
    """The main job end to end on the tiny preset (seconds): a trained run, a grid, and a report whose
    class accuracy is the reader's verdict on fresh samples (4 classes, so chance is 0.25)."""
    assert main(["demo", "--out", str(tmp_path), "--preset", "tiny", "--n", "40"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("world.png", "samples.png", "run/config.json", "run/metrics.jsonl"):
        assert (tmp_path / name).is_file(), name
    assert report["reader"]["exact_scene_accuracy"] >= 0.95
    assert report["eval"]["n"] == 40 and report["eval"]["judge"] == "toy-world reader"
    assert report["eval"]["class_accuracy"] > 0.5
    assert report["train"]["steps"] == 150
    assert set(report["timings"]) >= {"train_seconds", "eval_seconds", "total_seconds"}
    assert str(tmp_path / "report.json") in capsys.readouterr().out
    # a second demo into the same directory would overwrite a trained run: refused
    assert main(["demo", "--out", str(tmp_path), "--preset", "tiny"]) == 2


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["world", "check", "--preset", "scene23"],
            "unknown world preset 'scene23' (did you mean 'scene32'?)",
        ),
        (["world", "check", "--n", "0"], "--n 0 is invalid"),
        (["world", "check", "--noise", "-1"], "--noise -1.0 is invalid"),
        (["demo", "--n", "0"], "--n 0 is invalid"),
        (["demo", "--preset", "demoo"], "unknown preset 'demoo'"),
    ],
)
def test_bad_input_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
