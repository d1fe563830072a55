"""Where training runs: ``--device auto`` picks CUDA, then MPS, then the CPU; and which process writes.

Every file the trainer writes (checkpoints, ``metrics.jsonl``, sample grids) goes through
``is_main_process()``, so that under ``torchrun`` (DDP) only rank 0 writes and nothing else changes.
"""

from __future__ import annotations

import platform

import torch

from difflab.errors import DifflabError
from difflab.train import distributed

DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(name: str) -> torch.device:
    """Turn a device string into a ``torch.device``, checking that the hardware is really there.

    ``auto`` picks CUDA, then Apple's MPS, then the CPU. ``cuda`` and ``cuda:N`` fail with a clear
    message when no such GPU exists, rather than later inside the first ``.to(device)``.
    """
    text = str(name).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise DifflabError("device 'mps' was asked for but MPS is not available on this machine")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise DifflabError(f"bad device '{name}'; expected cuda or cuda:N with N a GPU index")
        if not torch.cuda.is_available():
            raise DifflabError(f"device '{name}' was asked for but CUDA is not available on this machine")
        if index_text and int(index_text) >= torch.cuda.device_count():
            raise DifflabError(
                f"device '{name}' does not exist; this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
        return torch.device(text)
    raise DifflabError(f"unknown device '{name}'; choose one of: {', '.join(DEVICE_CHOICES)}")


def is_main_process() -> bool:
    """True on the one process that writes files: always, unless ``torch.distributed`` runs as rank > 0."""
    return distributed.rank() == 0


def cpu_model() -> str:
    """The CPU's model name ('AMD EPYC 7B13', 'Intel(R) Xeon(R) Processor'), which ``platform`` does not give on
    Linux (it says 'x86_64'). Timings are only comparable on the same model: the demo took 853 s on an AMD EPYC
    and 528 s on an Intel Xeon with AMX, both on 2 cores (docs/t2i.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
