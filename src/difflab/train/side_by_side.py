"""Independent trainings side by side: one process each, the CPU's cores split between them.

A small network uses two cores poorly. Its steps are many short operations (and, for the demo's
planner, Python that draws its batch), and splitting each one over two threads saves little: on one
thread, beside another training, the planner took 171-181 s against 151 s on two threads alone, CLIP
90 s against 81 (docs/t2i.md, "The demo in less time").
Trainings that do not need each other can instead run at once, one thread each, which is how the demo
trains the painter's three parents (autoencoder, CLIP, planner) before the painter, which needs them all.

Each job runs in a fresh (spawned) process, so nothing of the parent's threads or caches leaks into it,
and its result comes back through a pipe. Jobs start in the order given as workers free up: give the
longest first. The first job to fail stops the others (they are terminated: each training writes its
checkpoints atomically, so nothing half-written is left) and its error is raised here, with the same
message it would have had alone.

Ctrl-C reaches every process of the terminal's group: each training saves the step in progress and
stops (:mod:`difflab.train.signals`), and the first such stop is raised here as the same
:class:`~difflab.train.signals.Interrupted` line. SIGTERM sent to this process alone is passed on to the
jobs, which stop the same way.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from difflab.errors import DifflabError
from difflab.train.signals import StopSignals


@dataclass
class Job:
    """``fn(*args)`` under ``name``; ``fn`` must be importable (a module-level function) and the args
    picklable, since it runs in a spawned process."""

    name: str
    fn: Callable
    args: tuple = ()
    on_done: Callable[[str, float], None] | None = field(default=None, compare=False)
    """Called here (in the parent) with the job's name and seconds as soon as it finishes."""


class JobFailed(DifflabError):
    """A side-by-side job's error, as its own process raised it: the message, and the exit code of an
    interrupted training (128 + the signal) or 2."""

    def __init__(self, message: str, exit_code: int = 2):
        self.exit_code = exit_code
        super().__init__(message)

    def __reduce__(self):  # so the exception itself can travel through a pipe
        return (JobFailed, (str(self), self.exit_code))


def _child(conn, threads: int, fn: Callable, args: tuple) -> None:
    """A job's process: ``threads`` intra-op threads, the job, then ("ok", result, seconds) or ("error",
    message, exit code) through ``conn``."""
    import torch

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        conn.send(("ok", fn(*args), time.perf_counter() - t0))
    except DifflabError as e:
        conn.send(("error", str(e), getattr(e, "exit_code", 2)))
    except KeyboardInterrupt:  # a second Ctrl-C: stopped without a checkpoint
        conn.send(("error", "interrupted", 130))
    except BaseException as e:  # a bug: the traceback is the useful part
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", 1))
    finally:
        conn.close()


def run_side_by_side(jobs: list[Job], workers: int = 2, threads: int = 1) -> dict[str, tuple[object, float]]:
    """Run ``jobs``, at most ``workers`` at once with ``threads`` threads each; returns ``{name: (result,
    seconds)}``. ``workers=1`` runs them one after another in this process (no spawn)."""
    if workers < 1 or threads < 1:
        raise ValueError(f"workers={workers} and threads={threads}; expected both >= 1")
    names = [j.name for j in jobs]
    if len(set(names)) != len(names):
        raise ValueError(f"job names {names} repeat; expected one name per job")
    if workers == 1:
        return _one_after_another(jobs)
    ctx = multiprocessing.get_context("spawn")
    waiting, running, results = list(jobs), {}, {}  # running: receiving end -> (job, process)
    with StopSignals() as stop:  # a signal here is passed on, not raised mid-wait
        forwarded = None
        try:
            while waiting or running:
                while waiting and len(running) < workers:
                    job = waiting.pop(0)
                    parent_end, child_end = ctx.Pipe(duplex=False)
                    proc = ctx.Process(
                        target=_child, args=(child_end, threads, job.fn, job.args), daemon=True
                    )
                    proc.start()
                    child_end.close()
                    running[parent_end] = (job, proc)
                if stop.received and stop.received != forwarded:  # SIGTERM to us alone: on to the jobs
                    forwarded = stop.received
                    for _, proc in running.values():
                        os.kill(proc.pid, getattr(signal, forwarded))
                for conn in multiprocessing.connection.wait(list(running), timeout=0.2):
                    job, proc = running.pop(conn)
                    try:
                        status, *payload = conn.recv()
                    except EOFError:  # the process died without a word (killed, out of memory)
                        proc.join()
                        raise JobFailed(
                            f"{job.name}: its process ended with exit code {proc.exitcode}"
                        ) from None
                    proc.join()
                    if status == "error":
                        message, code = payload
                        raise JobFailed(message if code != 2 else f"{job.name}: {message}", code)
                    results[job.name] = tuple(payload)
                    if job.on_done is not None:
                        job.on_done(job.name, payload[1])
        finally:
            _stop_all(running, stop.received)
    return results


def _stop_all(running: dict, received: str | None) -> None:
    """End the jobs still running: an interrupted run lets them save (they got the signal too), a failed
    one terminates them."""
    if received:  # each is saving its step in progress; give them the time to
        for _, proc in running.values():
            proc.join(timeout=60)
    for _, proc in running.values():
        if proc.is_alive():
            proc.terminate()
            proc.join()


def _one_after_another(jobs: list[Job]) -> dict[str, tuple[object, float]]:
    results = {}
    for job in jobs:
        t0 = time.perf_counter()
        results[job.name] = (job.fn(*job.args), time.perf_counter() - t0)
        if job.on_done is not None:
            job.on_done(job.name, results[job.name][1])
    return results
