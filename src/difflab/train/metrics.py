"""``metrics.jsonl``: one JSON object per logged step, appended and flushed as training goes.

JSON Lines is greppable, survives a crash (every line already written stays valid), and loads with
one line of pandas (``pd.read_json(path, lines=True)``). On resume, records past the checkpoint's step
(written by the interrupted run after its last checkpoint, and about to be redone) are dropped first,
so the file never holds a step twice.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from difflab.train.device import is_main_process


def _plain(value):
    """A JSON-friendly number: tensors and numpy scalars become Python floats/ints."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # strict JSON has no NaN/inf; keep the line valid
    return value


class MetricsLogger:
    """Appends records to ``path`` (only on the main process)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def log(self, record: dict) -> None:
        if not is_main_process():
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> None:
        """Keep only records with ``record['step'] <= step`` (and drop a half-written last line)."""
        if not is_main_process() or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def log_curve_point(path: str | os.PathLike, step: int, record: dict) -> None:
    """Append one point of a learning curve measured at sample grids (``{"step": step} | record``), first
    dropping any point at or after ``step``: a resumed run redraws those grids, and a curve never holds a
    step twice."""
    log = MetricsLogger(path)
    log.truncate_after(step - 1)
    log.log({"step": step} | record)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All complete records of a ``metrics.jsonl`` (a line cut short by a crash is skipped)."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
