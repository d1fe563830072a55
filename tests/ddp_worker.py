"""The data-parallel training run of tests/test_train_distributed.py, launched there by ``torchrun``.

A tiny denoiser trained by the real ``Trainer``. Its noise and "timestep" are stored with each item
instead of drawn from the trainer's generator, so a 2-process run (each process with its half of every
global batch) must follow the single-process run with the same global batch up to float rounding:
data sharding, DDP's gradient averaging, gradient accumulation, clipping, AdamW and the EMA are all that
is left to differ. Each rank writes its final weights and EMA weights to ``OUT/rank{r}.safetensors``.

    torchrun --standalone --nproc_per_node=2 tests/ddp_worker.py OUT RUN_DIR
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from difflab.train import TrainConfig, Trainer, make_loader

CFG = TrainConfig(steps=8, batch_size=8, grad_accum=2, lr=1e-2, weight_decay=0.01, warmup_steps=2,
                  lr_schedule="cosine", grad_clip=0.5, ema_decay=0.9, log_every=1, checkpoint_every=4,
                  device="cpu", progress=False)  # fmt: skip


class ItemNoiseDataset(torch.utils.data.Dataset):
    """Points with their own noise and noise level: item i is the same whichever process loads it."""

    def __init__(self, n: int = 40):
        g = torch.Generator().manual_seed(0)
        self.x, self.noise, self.t = (
            torch.randn(n, 6, generator=g),
            torch.randn(n, 6, generator=g),
            torch.rand(n, 1, generator=g),
        )

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "noise": self.noise[i], "t": self.t[i]}


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 32), nn.GELU(), nn.Linear(32, 6))


def item_noise_loss(model, batch, generator):
    x = batch["x"]
    noisy = x + batch["t"] * batch["noise"]
    return ((model(noisy) - x) ** 2).mean(), {"t_mean": batch["t"].mean()}


def run(run_dir: str, rank: int = 0) -> Trainer:
    # Every rank starts from other weights: DDP broadcasts rank 0's, so the runs must still agree.
    model = make_model(seed=rank)
    trainer = Trainer(model, item_noise_loss, make_loader(ItemNoiseDataset(), CFG), CFG, run_dir)
    trainer.fit()
    return trainer


def final_weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    weights = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    return weights | {f"ema.{k}": v for k, v in trainer.ema.model.state_dict().items()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    from difflab.train import distributed

    out, run_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    distributed.init_from_env("cpu")
    try:
        rank = distributed.rank()
        weights = final_weights(run(run_dir, rank))
        save_file({k: v.contiguous() for k, v in weights.items()}, f"{out}/rank{rank}.safetensors")
    finally:
        distributed.shutdown()
