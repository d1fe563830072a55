"""Data-parallel training under torchrun: the loader's shards, and 2 gloo processes against 1 process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difflab.errors import DifflabError
from difflab.train import InfiniteLoader, list_checkpoints, read_metrics
from tests import ddp_worker

TESTS = Path(__file__).parent


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 ARGS`` on one thread per process (2 cores here)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_shards_of_every_global_batch_are_the_single_process_batch():
    data = list(range(30))
    one = InfiniteLoader(data, 6, seed=3, collate_fn=list)
    ranks = [InfiniteLoader(data, 6, seed=3, collate_fn=list, rank=r, world=3) for r in range(3)]
    for _ in range(12):  # across epoch boundaries (5 batches per epoch)
        assert next(one) == [x for loader in ranks for x in next(loader)]
        assert all(loader.state_dict() == one.state_dict() for loader in ranks)
    # The state counts global items, so a 3-process position resumes a 1-process run (and back).
    again = InfiniteLoader(data, 6, seed=3, collate_fn=list)
    again.load_state_dict(ranks[0].state_dict())
    assert next(again) == next(one)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rank": 2, "world": 2}, "bad rank 2 of world size 2"),
        ({"rank": 0, "world": 4}, "batch_size 6 .* over 4"),
    ],
)
def test_bad_shards_are_named(kwargs, message):
    with pytest.raises(DifflabError, match=message):
        InfiniteLoader(list(range(30)), 6, seed=0, **kwargs)


def test_two_processes_follow_one_process_with_the_same_global_batch(tmp_path, single_thread):
    """torchrun with 2 gloo processes, each with half of every global batch of 8 (grad_accum 2, clipping,
    AdamW, EMA), against 1 process: the logged losses agree to 1e-6 relative and the final weights and EMA
    weights to 1e-5 (float sums in another order); the ranks' weights are identical to each other."""
    single = ddp_worker.run(str(tmp_path / "single"))
    result = torchrun(str(TESTS / "ddp_worker.py"), str(tmp_path), str(tmp_path / "ddp"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2)]
    for name, value in ddp_worker.final_weights(single).items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # DDP keeps the ranks in step
        assert torch.allclose(ranks[0][name], value, rtol=1e-5, atol=1e-6), name

    one, two = (
        read_metrics(tmp_path / "single" / "metrics.jsonl"),
        read_metrics(tmp_path / "ddp" / "metrics.jsonl"),
    )
    assert [r["step"] for r in two] == list(range(1, 9))  # rank 0 alone logged: no duplicate records
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["t_mean"] == pytest.approx(a["t_mean"], rel=1e-6)  # metrics are averaged over ranks
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    assert [s for s, _ in list_checkpoints(tmp_path / "ddp" / "checkpoints")] == [4, 8]


def test_torchrun_runs_the_train_command_and_rank_0_alone_reports(tmp_path):
    out = tmp_path / "run"
    result = torchrun("-m", "difflab", "train", "--preset", "tiny", "--out", str(out), "--device", "cpu",
                      "--set", "train.steps=4", "--set", "train.progress=false", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("trained 'tiny'") == 1
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][-1] == 4
    assert (out / "samples.png").is_file()


def test_sigterm_to_torchrun_reaches_every_rank_and_they_save_one_step_together(tmp_path):
    """torchrun forwards SIGTERM to its workers; the ranks agree (one all-reduce per step) to stop after
    the same step, rank 0 saves it, and each says so in one line."""
    import signal
    import time

    out = tmp_path / "run"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "difflab",
           "train", "--preset", "tiny", "--out", str(out), "--device", "cpu", "--set", "train.steps=100000",
           "--set", "train.log_every=1", "--set", "train.progress=false"]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    said = [line for line in proc.stderr.read().splitlines() if line.startswith("difflab:")]
    (step, _), *_ = reversed(list_checkpoints(out / "checkpoints"))
    assert said == [f"difflab: interrupted by SIGTERM after step {step}; saved "
                    f"{out / 'checkpoints' / f'step_{step:07d}'} (continue with --resume)"] * 2  # fmt: skip
    assert read_metrics(metrics)[-1]["step"] == step
