"""What a model needs from ``torch.distributed`` beyond DDP's gradient averaging.

Contrastive losses (CLIP) compare every image with every text of the *global* batch, so each process
needs the other processes' embeddings, and the gradient of its loss must reach those embeddings' owners.
``torch.distributed.nn.functional.all_gather`` is the autograd-aware gather: its backward sums the
gradients that every process computed for a shard and hands that sum to the shard's owner.

Why that gives the single-process gradient: every process computes the same global loss L, so the shard
owner receives W * dL/d(own embeddings) (W processes); DDP then averages parameter gradients over the W
processes, and (1/W) * W * dL/dtheta = dL/dtheta.

Launching: ``torchrun --nproc_per_node=N -m difflab train ...`` sets ``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE`` and the rendezvous address in each process's environment; :func:`init_from_env` reads
them and joins the process group (gloo on the CPU, nccl on CUDA). Several machines use the same command
with torchrun's ``--nnodes``, ``--node_rank`` and ``--rdzv-endpoint`` (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

from difflab.errors import DifflabError


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the default group (1 when ``torch.distributed`` is not initialised)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group (0 when ``torch.distributed`` is not initialised)."""
    return dist.get_rank() if is_initialized() else 0


def launched_by_torchrun() -> bool:
    """True when the environment describes more than one process (torchrun sets ``WORLD_SIZE``)."""
    text = os.environ.get("WORLD_SIZE", "1")
    if not text.isdigit() or int(text) < 1:
        raise DifflabError(f"bad WORLD_SIZE {text!r} in the environment; expected a positive integer")
    return int(text) > 1


# What ``init_process_group``'s env:// rendezvous reads, beside WORLD_SIZE; torchrun sets all of them.
_RENDEZVOUS_ENV = ("RANK", "MASTER_ADDR", "MASTER_PORT")


def check_rendezvous_env() -> None:
    """Name what is missing or malformed when WORLD_SIZE > 1 comes without the rest of torchrun's
    environment (``init_process_group`` would otherwise fail with a ValueError deep in its rendezvous)."""
    missing = [k for k in _RENDEZVOUS_ENV if not os.environ.get(k)]
    if missing:
        raise DifflabError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set in the environment; "
            "launch with torchrun (it sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)"
        )
    for key in ("RANK", "MASTER_PORT", "LOCAL_RANK"):
        text = os.environ.get(key, "0")
        if not text.isdigit():
            raise DifflabError(f"bad {key} {text!r} in the environment; expected a non-negative integer")
    rank_, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if rank_ >= world:
        raise DifflabError(f"RANK {rank_} is not below WORLD_SIZE {world}")


def init_from_env(device: str = "auto", timeout_s: float = 1800.0) -> bool:
    """Join the process group that torchrun describes in the environment; False when there is none.

    The backend follows the device: nccl when training runs on CUDA (``device`` 'auto' with a GPU,
    'cuda' or 'cuda:N'), gloo otherwise. On CUDA each process takes the GPU of its ``LOCAL_RANK``.
    ``timeout_s`` bounds every collective (``train.dist_timeout_s``): a rank that stops answering
    (stopped, hung, killed without torchrun noticing) makes the others fail after it instead of waiting
    for gloo's and nccl's 30-minute default.
    """
    if is_initialized() or not launched_by_torchrun():
        return is_initialized()
    if not dist.is_available():
        raise DifflabError("WORLD_SIZE > 1 but this build of PyTorch has no torch.distributed")
    check_rendezvous_env()
    name = str(device).strip().lower()
    cuda = name.startswith("cuda") or (name == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def shutdown() -> None:
    """Leave the process group (a no-op without one), so that every rank exits cleanly."""
    if is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the block on rank 0 first and on the other ranks after it: for work that fills a cache
    (rendered scenes, encoded latents) that the other ranks then read instead of recomputing."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


def any_rank(flag: bool) -> bool:
    """True on every process when ``flag`` is true on any (one all-reduce; ``flag`` itself alone): how
    the ranks agree to stop together when a signal reached only some of them."""
    if world_size() == 1:
        return flag
    # nccl reduces only tensors on this rank's GPU (init_from_env set it); gloo, CPU tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    value = torch.tensor([int(flag)], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over every process (``values`` itself for one process)."""
    if world_size() == 1:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values / world_size()


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every process along dim 0, in rank order: (W * B, ...).

    A single process gets ``x`` itself. Every process must pass the same shape.
    """
    if world_size() == 1:
        return x
    # Imported here, not at the top: torch.distributed.nn.functional raises ImportError on PyTorch builds
    # without torch.distributed (USE_DISTRIBUTED=0), which this module otherwise supports, and importing
    # it builds torch's RPC RemoteModule template. Reaching this line means a process group exists.
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
