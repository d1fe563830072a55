"""Training: one trainer (AdamW, warmup, grad clipping, EMA, exact resume), safetensors checkpoints
written atomically, a resumable data loader, and a JSONL metrics log."""

from difflab.train.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    prune_checkpoints,
    read_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from difflab.train.config import TrainConfig
from difflab.train.device import is_main_process, resolve_device
from difflab.train.ema import EMA, ema_decay_at
from difflab.train.loader import InfiniteLoader
from difflab.train.metrics import MetricsLogger, read_metrics
from difflab.train.schedule import lr_factor
from difflab.train.seeding import derive_seed, seed_everything
from difflab.train.trainer import Trainer, make_loader

__all__ = [
    "EMA",
    "InfiniteLoader",
    "MetricsLogger",
    "TrainConfig",
    "Trainer",
    "derive_seed",
    "ema_decay_at",
    "is_main_process",
    "latest_checkpoint",
    "list_checkpoints",
    "load_model_weights",
    "lr_factor",
    "make_loader",
    "prune_checkpoints",
    "read_checkpoint",
    "read_metrics",
    "resolve_device",
    "save_checkpoint",
    "seed_everything",
    "verify_checkpoint",
]
