"""What a benchmark ran on, in one shape for every script.

Every benchmark result must say on what it was measured, or its figures cannot be compared with another
run's; each script used to describe the machine in its own way (a string here, a dict there, the thread
count under two names). Scripts import it by bare name (``from machine import machine``), as they import
their other siblings: ``python benchmarks/X.py`` puts this folder first on ``sys.path``.
"""

from __future__ import annotations

import os
import platform

import torch

from difflab.train.device import cpu_model


def machine(diffusers: bool = False) -> dict:
    """CPU model and core count, torch's thread count at the time of the call, torch and Python versions;
    with ``diffusers``, diffusers' version too (imported only then: only the benchmarks that compare
    against it need it)."""
    out = {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if diffusers:
        import diffusers as diffusers_module

        out["diffusers"] = diffusers_module.__version__
    return out
