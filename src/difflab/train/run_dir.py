"""One writer per run directory, and a resumed run's config that lands only once its resume is accepted.

**The lock.** Two trainings pointed at one ``--out`` used to wreck each other: one save removed the
other's in-flight ``.tmp-*`` checkpoint, ``metrics.jsonl`` interleaved both runs, and ``config.json``
ended up describing the other run. :func:`run_lock` takes an exclusive advisory lock on
``RUN_DIR/.lock`` for as long as a training writes there (``fcntl.flock`` on POSIX, ``msvcrt.locking``
on Windows). The operating system drops the lock when the process ends, however it ends (SIGKILL, a
power cut needs no cleanup: the next run simply takes it), so there is no stale lock to delete by hand
and no PID-file guesswork. Readers (``sample``, ``eval``, ``generate``) do not lock: checkpoints
appear atomically, so reading beside a training is safe.

**The pending config.** A ``--resume`` that changes the config writes the new ``config.json`` only
after the trainer has checked the checkpoint against it: until then it waits as ``.config.pending.json``
(:func:`stage_config`), which :func:`commit_pending_config` moves into place. A refused resume (another
network width, say) thus leaves the run exactly as it was, where it used to leave a ``config.json``
describing a network the checkpoints do not hold.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from difflab.config import save_json
from difflab.errors import DifflabError

LOCK_FILE = ".lock"
PENDING_CONFIG = ".config.pending.json"
CONFIG = "config.json"
# Entries a run directory may hold without being someone's files: a fresh run may start over them.
INTERNAL = (LOCK_FILE, PENDING_CONFIG)

try:  # POSIX
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # Windows
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _in_use(run_dir: Path, fd: int) -> DifflabError:
    os.lseek(fd, 0, os.SEEK_SET)
    holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
    return DifflabError(
        f"run directory '{run_dir}' is in use by another training (pid {holder}); wait for it to finish "
        "or pick another --out"
    )


def check_not_in_use(run_dir: str | os.PathLike) -> None:
    """Raise the "in use" error of :func:`run_lock` when another process holds ``run_dir``'s lock; creates
    nothing (a look before the checks that would otherwise blame the running training's own files)."""
    try:
        fd = os.open(Path(run_dir) / LOCK_FILE, os.O_RDWR)
    except OSError:
        return  # no lock file (or none we may open): nobody trains there through difflab
    try:
        if not _try_lock(fd):
            raise _in_use(Path(run_dir), fd)
        _unlock(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[Path]:
    """Hold the exclusive lock of ``run_dir`` (created if absent) for the block; a ``DifflabError`` naming
    the process that holds it when another training is writing there."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise DifflabError(f"cannot write into run directory '{run_dir}': {err.strerror}") from None
    try:
        if not _try_lock(fd):
            raise _in_use(run_dir, fd)
        # The holder's pid, for the message above; the lock itself is the flock, not this text.
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, str(os.getpid()).encode())
        try:
            yield run_dir
        finally:
            _unlock(fd)
    finally:
        os.close(fd)


def user_entries(run_dir: Path) -> list[str]:
    """What ``run_dir`` holds besides the lock and a pending config, sorted (empty when it is absent)."""
    if not run_dir.is_dir():
        return []
    return sorted(e.name for e in run_dir.iterdir() if e.name not in INTERNAL)


def stage_config(run_dir: Path, record: dict, *, pending: bool) -> None:
    """Write ``record`` as ``config.json``, or (``pending``) as the config that lands once the trainer
    accepts the resume."""
    (run_dir / PENDING_CONFIG).unlink(missing_ok=True)
    save_json(record, run_dir / (PENDING_CONFIG if pending else CONFIG))


def commit_pending_config(run_dir: str | os.PathLike) -> None:
    """Move a staged config into place (atomic rename; nothing to do when none is staged)."""
    pending = Path(run_dir) / PENDING_CONFIG
    if pending.is_file():
        os.replace(pending, Path(run_dir) / CONFIG)


def discard_pending_config(run_dir: str | os.PathLike) -> None:
    (Path(run_dir) / PENDING_CONFIG).unlink(missing_ok=True)
