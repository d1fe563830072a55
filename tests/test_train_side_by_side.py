"""Trainings side by side (difflab.train.side_by_side): results, threads, and errors come back whole."""

import multiprocessing
import operator
import os
import time
from pathlib import Path

import pytest
import torch

from difflab.train.side_by_side import Job, JobFailed, run_side_by_side


def test_jobs_run_in_their_own_processes_with_their_share_of_threads():
    finished = []
    results = run_side_by_side(
        [Job("pid", os.getpid), Job("threads", torch.get_num_threads, on_done=lambda n, s: finished.append(n)),
         Job("sum", operator.add, (2, 3))],
        workers=2, threads=1,
    )  # fmt: skip
    assert results["pid"][0] != os.getpid()  # spawned, not run here
    assert results["threads"][0] == 1
    assert results["sum"][0] == 5 and results["sum"][1] >= 0
    assert finished == ["threads"]


def test_one_worker_runs_the_jobs_here_in_order():
    order = []
    results = run_side_by_side(
        [Job("a", os.getpid, on_done=lambda n, s: order.append(n)), Job("b", os.getpid,
                                                                        on_done=lambda n, s: order.append(n))],
        workers=1,
    )  # fmt: skip
    assert results["a"][0] == os.getpid() and order == ["a", "b"]


def _sleep_then_touch(path: str, seconds: float) -> None:
    """A job that leaves a trace only if it is allowed to finish (module level: spawned processes import it)."""
    time.sleep(seconds)
    Path(path).touch()


def test_the_first_failure_is_raised_with_its_message_and_stops_the_others(tmp_path):
    trace = tmp_path / "finished"
    before = set(multiprocessing.active_children())  # other tests' loader workers may still be alive
    with pytest.raises(JobFailed, match="ZeroDivisionError: division by zero") as info:
        run_side_by_side(
            [Job("slow", _sleep_then_touch, (str(trace), 30)), Job("broken", operator.truediv, (1, 0))],
            workers=2,
        )
    assert info.value.exit_code == 1
    # Every process this call started has ended, and the slow one was terminated, not waited for.
    assert set(multiprocessing.active_children()) - before == set() and not trace.exists()


def test_a_difflab_error_keeps_its_one_line_and_names_the_job():
    from difflab.config import apply_overrides
    from difflab.models.registry import get_preset

    cfg = get_preset("clip_tiny").build()
    with pytest.raises(JobFailed, match=r"^bad: .*train.stepz") as info:
        run_side_by_side(
            [Job("bad", apply_overrides, (cfg, ["train.stepz=3"])), Job("ok", os.getpid)], workers=2
        )
    assert info.value.exit_code == 2


@pytest.mark.parametrize(("workers", "threads"), [(0, 1), (2, 0)])
def test_bad_worker_or_thread_counts_are_named(workers, threads):
    with pytest.raises(ValueError, match=f"workers={workers} and threads={threads}"):
        run_side_by_side([Job("a", os.getpid)], workers=workers, threads=threads)


def test_repeated_job_names_are_refused():
    with pytest.raises(ValueError, match="repeat"):
        run_side_by_side([Job("a", os.getpid), Job("a", os.getpid)])
