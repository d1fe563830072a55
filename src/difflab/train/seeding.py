"""Seeds and random-number state: everything random in a run can be saved and put back exactly.

The trainer owns its randomness explicitly. Noise, timesteps and condition dropout come from one
``torch.Generator`` handed to the loss function; data order comes from the loader's (seed, epoch)
permutation. What it cannot own (``nn.Dropout`` draws from the global torch RNG; user code may call
``random`` or ``numpy.random``) is captured with ``global_rng_state`` and restored on resume.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, name: str) -> int:
    """An independent 63-bit seed for the stream called ``name``.

    Seeding the noise generator and the data permutation with the same integer would make their
    streams start identically; hashing (seed, name) keeps them unrelated yet reproducible.
    """
    digest = hashlib.sha256(f"{int(seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed the global RNGs of ``random``, ``numpy`` and ``torch`` (all devices), e.g. before building a
    model so that its initial weights are reproducible."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    """A ``torch.Generator`` on ``device`` (so the loss draws noise where the batch lives), seeded."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def global_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """The global RNG states: byte tensors (torch CPU, each CUDA device, MPS) and a JSON-able dict
    (``random``, legacy ``numpy.random``)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        tensors["torch_mps"] = torch.mps.get_rng_state()
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    plain = {
        "python_random": [version, list(internal), gauss_next],
        "numpy_global": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
    }
    return tensors, plain


def set_global_rng_state(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    """Restore what ``global_rng_state`` captured (a state for a device this machine lacks is skipped)."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        for key in cuda[: torch.cuda.device_count()]:
            torch.cuda.set_rng_state(tensors[key], device=int(key.rsplit("_", 1)[1]))
    if "torch_mps" in tensors and getattr(torch.backends, "mps", None) is not None:
        if torch.backends.mps.is_available():
            torch.mps.set_rng_state(tensors["torch_mps"])
    version, internal, gauss_next = plain["python_random"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached_gaussian = plain["numpy_global"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
