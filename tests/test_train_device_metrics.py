"""Device resolution and the metrics.jsonl log."""

import platform
from pathlib import Path

import pytest
import torch

from difflab.errors import DifflabError
from difflab.train import MetricsLogger, read_metrics, resolve_device


def test_device_strings():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("AUTO").type in ("cuda", "mps", "cpu")
    with pytest.raises(
        DifflabError, match="unknown device 'gpu'; choose one of: auto, cpu, cuda, cuda:N, mps"
    ):
        resolve_device("gpu")
    with pytest.raises(DifflabError, match="bad device 'cuda:x'"):
        resolve_device("cuda:x")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_without_a_gpu_says_so():
    with pytest.raises(DifflabError, match="'cuda:1' was asked for but CUDA is not available"):
        resolve_device("cuda:1")


def test_metrics_append_truncate_and_survive_a_torn_line(tmp_path):
    log = MetricsLogger(tmp_path / "metrics.jsonl")
    for step in range(1, 6):
        log.log({"step": step, "loss": torch.tensor(1.0 / step, dtype=torch.float64)})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')  # a crash mid-line
    assert [r["step"] for r in read_metrics(log.path)] == [1, 2, 3, 4, 5]
    log.truncate_after(3)
    assert read_metrics(log.path) == [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)]
    log.log({"step": 4, "loss": float("nan")})
    assert read_metrics(log.path)[-1] == {"step": 4, "loss": "nan"}


def test_cpu_model_names_the_processor_not_the_architecture():
    """On Linux the model name comes from /proc/cpuinfo (``platform.processor()`` is empty there, and
    'x86_64' would make two machines' timings look comparable when they are not)."""
    from difflab.train.device import cpu_model

    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")]
    if names:
        assert cpu_model() == names[0]
    else:  # no /proc/cpuinfo (macOS, Windows): what platform says
        assert cpu_model() in (platform.processor(), platform.machine())
