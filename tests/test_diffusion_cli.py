"""``difflab schedule``: JSON numbers, the plot, --help and errors, through the real dispatcher."""

from __future__ import annotations

import json

import pytest

from difflab.cli import main
from difflab.diffusion.schedules import BETA_SCHEDULES


def run_json(capsys, *args) -> dict:
    assert main(["schedule", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_schedule_json_for_the_ddpm_linear_schedule(capsys):
    d = run_json(capsys, "--schedule", "linear", "--timesteps", "1000")
    ab = d["alpha_bar_at_1based_t"]
    assert set(ab) == {"1", "500", "1000"}
    assert ab["1"] == pytest.approx(1 - 1e-4)  # alpha_bar_1 = 1 - beta_1
    assert ab["1000"] == pytest.approx(4.0358e-5, rel=1e-4)  # prod(1 - beta_t), linear 1e-4..0.02
    assert d["sqrt_alpha_bar_at_1based_T"] == pytest.approx(0.006353, rel=1e-3)
    assert d["beta_range"] == pytest.approx([1e-4, 0.02])
    snr_min, snr_max = d["snr_range"]
    assert snr_min == pytest.approx(ab["1000"] / (1 - ab["1000"])) and snr_max == pytest.approx(9999)


def test_schedule_json_zero_snr_writes_null_for_minus_infinity(capsys):
    d = run_json(capsys, "--schedule", "cosine", "--rescale-zero-snr", "--timesteps", "100")
    assert d["alpha_bar_at_1based_t"]["100"] == 0 and d["snr_range"][0] == 0
    assert d["log_snr_range"][0] is None and d["timesteps"] == 100


def test_schedule_summary_and_plot(capsys, tmp_path):
    out = tmp_path / "schedules.png"
    assert (
        main(["schedule", "--schedule", "scaled_linear", "--plot", str(out), "--compare", "linear,cosine"])
        == 0
    )
    captured = capsys.readouterr()
    assert "alpha_bar at t =  1000" in captured.out and "1-based" in captured.out
    assert "wrote" in captured.err and "scaled_linear, linear, cosine" not in captured.err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["schedule", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--schedule",
        "--timesteps",
        "--rescale-zero-snr",
        "--beta-start",
        "--beta-end",
        "--json",
        "--plot",
        "--compare",
    ):
        assert option in text
    assert "1-based" in text


def test_bad_input_is_one_line(capsys):
    assert main(["schedule", "--schedule", "cosin"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("difflab: error: unknown schedule 'cosin'") and err.count("\n") == 1
    assert main(["schedule", "--schedule", "cosine", "--beta-end", "0.1"]) == 2
    assert "does not apply to the cosine schedule" in capsys.readouterr().err


def test_cli_help_and_plot_default_name_every_library_schedule(capsys):
    # the command line offers what the library has (the names come from BETA_SCHEDULES, not a copy)
    with pytest.raises(SystemExit):
        main(["schedule", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for name in BETA_SCHEDULES:
        assert name in help_text, name
    assert f"(default: {','.join(BETA_SCHEDULES)})" in help_text
