"""Clean interrupts: SIGINT (Ctrl-C) and SIGTERM end a training with a checkpoint and one line.

Python turns SIGINT into a ``KeyboardInterrupt`` wherever the main thread happens to be, which can be
halfway through an optimizer step or a checkpoint write, and SIGTERM (what ``kill``, a batch scheduler,
Docker and torchrun send to stop a job) ends the process with no cleanup at all. While a training runs,
:class:`StopSignals` records either signal instead, and the trainer stops at the next step boundary,
where the state is whole: it saves a checkpoint of that step and raises :class:`Interrupted`, which the
command line prints as one line, exiting with the shell's convention ``128 + signal number`` (130 for
Ctrl-C, 143 for SIGTERM). A resume from that checkpoint is exact, like any other.

A second Ctrl-C means "now": it raises ``KeyboardInterrupt`` at once, and the run keeps its last
periodic checkpoint. Under torchrun every rank receives the signal (torchrun forwards it) and the
ranks agree on stopping through one all-reduce per step, so they save the same step and leave together.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from difflab.errors import DifflabError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(DifflabError):
    """A training stopped by a signal after saving ``checkpoint``; ``exit_code`` is 128 + the signal."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        number = getattr(signal, signal_name, None) if signal_name.startswith("SIG") else None
        self.exit_code = 128 + int(number) if number is not None else 130
        super().__init__(
            f"interrupted by {signal_name} after step {step}; saved {checkpoint} (continue with --resume)"
        )


class StopSignals:
    """Within the block, SIGINT and SIGTERM set :attr:`received` (the signal's name) instead of ending the
    process; the previous handlers come back on exit. Outside the main thread (where Python cannot
    install handlers) it does nothing."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, frame) -> None:
        if self.received == "SIGINT" and number == signal.SIGINT:
            raise KeyboardInterrupt  # pressed twice: stop now, without the checkpoint
        if self.received is None:
            self.received = signal.Signals(number).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
