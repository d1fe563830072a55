"""What a model needs from ``torch.distributed`` beyond DDP's gradient averaging.

Contrastive losses (CLIP) compare every image with every text of the *global* batch, so each process
needs the other processes' embeddings, and the gradient of its loss must reach those embeddings' owners.
``torch.distributed.nn.functional.all_gather`` is the autograd-aware gather: its backward sums the
gradients that every process computed for a shard and hands that sum to the shard's owner.

Why that gives the single-process gradient: every process computes the same global loss L, so the shard
owner receives W * dL/d(own embeddings) (W processes); DDP then averages parameter gradients over the W
processes, and (1/W) * W * dL/dtheta = dL/dtheta.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    """Processes in the default group (1 when ``torch.distributed`` is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every process along dim 0, in rank order: (W * B, ...).

    A single process gets ``x`` itself. Every process must pass the same shape.
    """
    if world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x), dim=0)
