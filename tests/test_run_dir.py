"""A run directory nothing can corrupt: one writer at a time, refused resumes that change nothing, no
overwritten user files, clean interrupts that resume exactly, and no fresh start over bad checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from difflab.cli import main
from difflab.errors import DifflabError
from difflab.train import distributed, list_checkpoints, read_metrics
from difflab.train.run_dir import LOCK_FILE, PENDING_CONFIG, run_lock
from difflab.train.signals import Interrupted
from tests.test_train_trainer import CFG, assert_same_state, denoise_loss, make_trainer

TINY = ["--preset", "tiny", "--device", "cpu", "--set", "train.batch_size=4", "--set", "sample.grid=4",
        "--set", "sample.steps=2"]  # fmt: skip


def train(out, *extra) -> int:
    return main(["train", *TINY, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread_module):
    """A tiny pixel run of 4 steps (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert train(out, "--set", "train.steps=4", "--set", "train.checkpoint_every=2") == 0
    return out


def snapshot(run_dir) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def test_a_refused_resume_changes_nothing_in_the_run(trained, capsys):
    before = snapshot(trained)
    code = train(trained, "--set", "train.steps=6", "--set", "unet.channels=8", "--set", "unet.norm_groups=4",
                 "--resume")  # fmt: skip
    assert code == 2
    assert "model config key 'channels' was 16, now 8" in capsys.readouterr().err
    assert snapshot(trained) == before  # config.json included: it still describes the checkpoints
    assert not (trained / PENDING_CONFIG).exists()
    assert main(["sample", str(trained), "--n", "2", "--out", str(trained.parent / "s.png")]) == 0


def test_resuming_a_finished_run_says_it_did_nothing(trained, capsys):
    before = snapshot(trained)
    assert train(trained, "--set", "train.steps=4", "--set", "train.checkpoint_every=2", "--resume") == 0
    out = capsys.readouterr().out
    assert "already trained to step 4" in out and "samples.png" not in out
    assert snapshot(trained) == before


def test_a_fresh_run_refuses_a_folder_with_the_users_files(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "samples.png").write_bytes(b"my picture")
    assert train(tmp_path, "--set", "train.steps=1") == 2
    err = capsys.readouterr().err
    assert "not empty (notes.txt, samples.png)" in err and "--out" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "samples.png"]
    assert (tmp_path / "samples.png").read_bytes() == b"my picture"


def _hold_lock_in_another_process(run_dir) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from difflab.train.run_dir import run_lock\n"
        "with run_lock(sys.argv[1]):\n"
        "    print('locked', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_writer_is_refused_while_the_first_holds_the_run(tmp_path, capsys):
    holder = _hold_lock_in_another_process(tmp_path / "run")
    try:
        assert train(tmp_path / "run", "--set", "train.steps=1", "--resume") == 2
        err = capsys.readouterr().err
        assert f"in use by another training (pid {holder.pid})" in err
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # The operating system released the lock with the process: no stale lock to remove by hand.
    with run_lock(tmp_path / "run"):
        pass


def test_two_concurrent_trainings_into_one_directory_leave_one_intact_run(tmp_path):
    """Two real `difflab train` processes started together: exactly one trains, the other is refused
    before writing anything, and the run left behind is whole (one config, one metrics stream)."""
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    out = tmp_path / "run"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "difflab",
                "train",
                *TINY,
                "--out",
                str(out),
                "--set",
                "train.steps=30",
                "--set",
                f"train.seed={seed}",
                "--set",
                "train.log_every=1",
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for seed in (1, 2)
    ]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, err in results if code == 2)
    assert "in use by another training" in loser, loser
    winner_seed = 1 + [code for code, _ in results].index(0)
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == winner_seed
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 31))
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [30]


def _signal_at_step(number: int, at_step: int):
    calls = {"n": 0}

    def loss(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 2 * (at_step - 1) + 1:  # the first micro-batch of step `at_step` (grad_accum 2)
            os.kill(os.getpid(), number)
        return denoise_loss(model, batch, generator)

    return loss


@pytest.mark.parametrize("number, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_the_step_in_progress_and_the_resume_is_exact(tmp_path, number, code):
    straight = make_trainer(tmp_path / "straight")
    straight.fit()
    handler = signal.getsignal(number)
    with pytest.raises(Interrupted) as stop:
        make_trainer(tmp_path / "stopped", loss_fn=_signal_at_step(number, 13)).fit()
    assert stop.value.exit_code == code
    assert f"after step 13; saved {tmp_path / 'stopped' / 'checkpoints' / 'step_0000013'}" in str(stop.value)
    assert [s for s, _ in list_checkpoints(tmp_path / "stopped" / "checkpoints")] == [10, 13]
    assert signal.getsignal(number) is handler  # the handlers are the caller's again
    resumed = make_trainer(tmp_path / "stopped", model_seed=7)
    resumed.fit(resume=True)
    assert_same_state(straight, resumed)
    a = read_metrics(tmp_path / "straight" / "metrics.jsonl")
    b = read_metrics(tmp_path / "stopped" / "metrics.jsonl")
    assert [r["loss"] for r in a] == [r["loss"] for r in b]


def test_sigterm_ends_the_command_with_one_line_and_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "difflab", "train", *TINY, "--out", str(out), "--set",
                             "train.steps=100000", "--set", "train.log_every=1"],
                            env=env, stderr=subprocess.PIPE, text=True)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    err = proc.stderr.read().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("difflab: interrupted by SIGTERM after step "), err
    assert "Traceback" not in "".join(err)
    (step, _), *_ = reversed(list_checkpoints(out / "checkpoints"))
    assert f"step_{step:07d}" in err[0]
    assert read_metrics(metrics)[-1]["step"] == step


def test_resume_over_only_bad_checkpoints_is_refused_not_started_over(tmp_path, capsys):
    t = make_trainer(tmp_path)
    t.fit()
    for _, ckpt in list_checkpoints(tmp_path / "checkpoints"):
        (ckpt / "state.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(DifflabError, match="no checkpoint in .* passes its checks"):
        make_trainer(tmp_path).fit(resume=True)
    assert len(list_checkpoints(tmp_path / "checkpoints")) == CFG.keep_last  # nothing pruned or added


def test_metrics_after_a_resume_say_which_steps_they_average(tmp_path):
    import dataclasses

    cfg = dataclasses.replace(CFG, log_every=4, checkpoint_every=6, steps=12)
    calls = {"n": 0}

    def crash_at_step_8(model, batch, generator):
        calls["n"] += 1
        if calls["n"] == 2 * 7 + 1:
            raise RuntimeError("crash")
        return denoise_loss(model, batch, generator)

    with pytest.raises(RuntimeError):
        make_trainer(tmp_path, cfg=cfg, loss_fn=crash_at_step_8).fit()
    make_trainer(tmp_path, cfg=cfg).fit(resume=True)
    windows = [(r["from_step"], r["step"]) for r in read_metrics(tmp_path / "metrics.jsonl")]
    # Steps 5-6 were averaged into no record before the crash: the first record after the resume
    # (from the step-6 checkpoint) covers steps 7-8 and says so.
    assert windows == [(1, 4), (7, 8), (9, 12)]


def test_world_size_without_the_rest_of_torchruns_environment_is_named(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(DifflabError, match="WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set"):
        distributed.init_from_env("cpu")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(DifflabError, match="RANK 5 is not below WORLD_SIZE 2"):
        distributed.init_from_env("cpu")


def test_the_process_group_timeout_is_the_configs(monkeypatch):
    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, timeout: seen.update(
        backend=backend, timeout=timeout))  # fmt: skip
    monkeypatch.setattr(distributed, "is_initialized", lambda: False)
    assert distributed.init_from_env("cpu", timeout_s=42.0)
    assert seen["backend"] == "gloo" and seen["timeout"].total_seconds() == 42.0
