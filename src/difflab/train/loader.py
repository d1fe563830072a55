"""A resumable, endless stream of batches: data order is a pure function of (seed, epoch).

Epoch ``e`` visits the dataset in the order ``torch.randperm(len(dataset), generator=
torch.Generator().manual_seed(seed + e))``. The loader's whole state is therefore two integers,
``{epoch, position}`` (``position`` = items of this epoch already handed out), which a checkpoint stores
as JSON; resuming rebuilds the same permutation and continues at the same item. Nothing depends on
pickling a ``DataLoader`` or its worker processes.

Two consequences worth knowing:
- seeds are ``seed + epoch``, so seed 0's epoch 1 equals seed 1's epoch 0; pick seeds far apart (the
  trainer's ``make_loader`` derives the data seed from the run seed by hashing) if that matters.
- with ``num_workers > 0`` the dataset must be a deterministic function of the index for an exact
  resume: random augmentation belongs in the loss function, which draws from the trainer's generator.

Data parallel (``world > 1``): ``batch_size`` is the *global* batch. Every process builds the same
permutation and cuts the same global batches; process ``rank`` takes the ``rank``-th of ``world`` equal,
contiguous slices of each. Together the processes see exactly the batches one process would, and the
state (epoch, position) counts global items, so it is the same on every rank and a run may resume on
another number of processes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

from difflab.errors import DifflabError


class InfiniteLoader:
    """Endless batches from a map-style dataset, in a per-epoch permutation seeded by ``seed + epoch``.

    ``drop_last`` (default) keeps every batch the same size; the tail of each epoch that does not fill
    a batch is skipped for that epoch (it lands elsewhere in the next permutation).
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        collate_fn: Callable[[list], Any] | None = None,
        *,
        drop_last: bool = True,
        rank: int = 0,
        world: int = 1,
    ):
        n = len(dataset)
        if batch_size < 1:
            raise DifflabError(f"bad batch_size {batch_size}; expected an integer >= 1")
        if n == 0:
            raise DifflabError("the dataset is empty; there is nothing to train on")
        if drop_last and batch_size > n:
            raise DifflabError(
                f"batch_size {batch_size} is larger than the dataset ({n} items); "
                "lower it or pass drop_last=False"
            )
        if num_workers < 0:
            raise DifflabError(f"bad num_workers {num_workers}; expected an integer >= 0")
        if world < 1 or not 0 <= rank < world:
            raise DifflabError(f"bad rank {rank} of world size {world}; expected 0 <= rank < world")
        if batch_size % world or (world > 1 and not drop_last):
            raise DifflabError(
                f"batch_size {batch_size} (the global batch) must split evenly over {world} processes, "
                "with drop_last; pick a multiple of the process count"
            )
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.collate_fn = collate_fn or default_collate
        self.drop_last = drop_last
        self.rank, self.world = int(rank), int(world)
        self.epoch = 0
        self.position = 0
        self._batches: Iterator | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The order in which epoch ``epoch`` visits the dataset."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.dataset), generator=gen)

    def _index_batches(self) -> list[list[int]]:
        """The index lists of this process's share of the rest of the current epoch's global batches,
        from ``position`` on."""
        order = self.permutation(self.epoch).tolist()
        stop = len(order) - len(order) % self.batch_size if self.drop_last else len(order)
        per = self.batch_size // self.world
        start = self.rank * per
        return [order[i + start : i + start + per] for i in range(self.position, stop, self.batch_size)]

    def _epoch_batches(self) -> Iterator[tuple[int, Any]]:
        """Yield (global items in batch, this process's batch) for the rest of the current epoch."""
        index_batches = self._index_batches()
        if self.num_workers == 0:
            for indices in index_batches:
                yield len(indices) * self.world, self.collate_fn([self.dataset[i] for i in indices])
            return
        # The permutation is already fixed, so the DataLoader only fetches and collates, in order.
        # Its own generator is seeded so that creating it never draws from the global torch RNG.
        loader = DataLoader(
            self.dataset,
            batch_sampler=index_batches,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(self.seed + self.epoch),
            pin_memory=torch.cuda.is_available(),
        )
        for indices, batch in zip(index_batches, loader, strict=True):
            yield len(indices) * self.world, batch

    def __iter__(self) -> InfiniteLoader:
        return self

    def __next__(self):
        while True:
            if self._batches is None:
                self._batches = self._epoch_batches()
            try:
                count, batch = next(self._batches)
            except StopIteration:
                self._batches = None
                self.epoch += 1
                self.position = 0
                continue
            # Counted as the batch is handed out (not as workers prefetch it), so a checkpoint taken
            # now resumes with the next unseen batch.
            self.position += count
            return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.dataset):
            raise DifflabError(
                f"bad loader state epoch={epoch} position={position} "
                f"for a dataset of {len(self.dataset)} items"
            )
        self.epoch, self.position = epoch, position
        self._batches = None
