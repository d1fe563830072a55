"""A trainer's whole state in a checkpoint: what it saves, and what makes a resume exact or refused.

:class:`ResumableTraining` is the checkpoint half of :class:`~difflab.train.trainer.Trainer` (a mixin:
it reads and restores the trainer's model, EMA, optimizer, generators, data position and step). A resume
is refused when it would not continue the same run:

- the model config differs in any key, except an architecture option newer than the checkpoint that
  is off (:data:`OPTION_OFF`): that is the network the checkpoint trained;
- a train-config key that defines the run differs (``config.RESUME_MUST_MATCH``); any other train-config
  change is allowed and printed.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import difflab
from difflab.config import to_dict
from difflab.errors import DifflabError
from difflab.train.checkpoint import check_compatible, prune_checkpoints, read_checkpoint, save_checkpoint
from difflab.train.config import RESUME_MUST_MATCH, TrainConfig
from difflab.train.device import is_main_process
from difflab.train.ema import EMA
from difflab.train.seeding import derive_seed, global_rng_state, set_global_rng_state

OPTION_OFF = (None, False, 0, [], ())
"""Values of a model-config key that a checkpoint written before the key existed is taken to have. Every
architecture option (``UNetConfig.head_dim``, ``attention_positions``, ...) is added with an 'off'
default (None, False, 0, empty), so runs trained before it resume, and switching it on for them is refused."""


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _as_json(obj) -> Any:
    """A config (dataclass or dict) as plain JSON values, tuples as lists, for storing and comparing."""
    if obj is None:
        return None
    if dataclasses.is_dataclass(obj):
        obj = to_dict(obj)
    return json.loads(json.dumps(obj))


class ResumableTraining:
    """Checkpointing for :class:`~difflab.train.trainer.Trainer`: :meth:`state_dict`,
    :meth:`save_checkpoint` and :meth:`load_checkpoint`, over the trainer attributes declared here and
    its ``elapsed_seconds``, ``_rank_key`` and ``_note``."""

    cfg: TrainConfig
    model: nn.Module
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    generator: torch.Generator
    device: torch.device
    rank: int
    data: Any
    extra_state: dict
    model_config: Any
    checkpoint_dir: Path
    last_checkpoint: Path | None
    step: int
    _elapsed_before: float

    def state_dict(self) -> dict:
        """Everything a resume needs, as one nested dict (tensors anywhere; see ``checkpoint.py``)."""
        rng_tensors, rng_plain = global_rng_state()
        data_state = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        return {
            "trainer": {"step": self.step, "elapsed_seconds": self.elapsed_seconds()},
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "loss_generator": self.generator.get_state(),
                "loss_generator_device": self.device.type,
                "global": rng_tensors,
                "global_plain": rng_plain,
            },
            "data": data_state,
            "extra": {name: obj.state_dict() for name, obj in self.extra_state.items()},
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
        }

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoints/step_XXXXXXX`` (main process only) and prune to ``keep_last``."""
        if not is_main_process():
            return None
        meta = {
            "difflab_version": difflab.__version__,
            "torch_version": torch.__version__,
            "train_config": _as_json(self.cfg),
            "model_config": self.model_config,
        }
        path = save_checkpoint(self.checkpoint_dir, self.step, self.state_dict(), meta)
        self.last_checkpoint = path
        prune_checkpoints(self.checkpoint_dir, self.cfg.keep_last)
        return path

    def _check_resumable(self, meta: dict, path: Path) -> None:
        saved = meta.get("model_config")
        if saved is not None and self.model_config is not None:
            old, new = _flatten(saved), _flatten(self.model_config)
            for key in sorted(old.keys() | new.keys()):
                if key not in old and new[key] in OPTION_OFF:
                    continue  # an architecture option newer than the checkpoint, off: the network it trained
                if old.get(key, "<absent>") != new.get(key, "<absent>"):
                    raise DifflabError(
                        f"cannot resume from '{path}': model config key '{key}' was "
                        f"{old.get(key, '<absent>')!r}, now {new.get(key, '<absent>')!r}"
                    )
        old, new = meta.get("train_config") or {}, _as_json(self.cfg)
        for key in RESUME_MUST_MATCH:
            if key in old and old[key] != new[key]:
                raise DifflabError(
                    f"cannot resume from '{path}': train config key '{key}' was {old[key]!r}, now "
                    f"{new[key]!r}; it defines the run, so start a new run dir to change it"
                )
        changed = [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]]
        if changed:
            self._note(f"resuming '{path.name}' with a changed train config: {', '.join(changed)}")

    def load_checkpoint(self, path: str | Path, *, verify: bool = True) -> None:
        """Restore the full training state from a checkpoint directory (see ``state_dict``)."""
        path = Path(path)
        state, meta = read_checkpoint(path, verify=verify)
        self._check_resumable(meta, path)
        check_compatible(self.model, state["model"], f"checkpoint '{path}'")
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state["ema"] is not None:
                self.ema.load_state_dict(state["ema"])
            else:
                self._note(f"'{path.name}' has no EMA weights; the EMA restarts from the current weights")
                self.ema = EMA(self.model, self.cfg.ema_decay, warmup=self.cfg.ema_warmup)
        self.optimizer.load_state_dict(state["optimizer"])
        rng, step = state["rng"], int(state["trainer"]["step"])
        if rng["loss_generator_device"] == self.device.type:
            self.generator.set_state(rng["loss_generator"])
        else:  # CPU and CUDA generators are different algorithms; their states do not transfer
            self._note(f"'{path.name}' was trained on {rng['loss_generator_device']}; loss noise is reseeded")
            self.generator.manual_seed(derive_seed(self.cfg.seed, f"loss@{step}"))
        set_global_rng_state(rng["global"], rng["global_plain"])
        if self.rank > 0:  # the checkpoint holds rank 0's streams; the others draw new ones
            self.generator.manual_seed(derive_seed(self.cfg.seed, self._rank_key(f"loss@{step}")))
            torch.manual_seed(derive_seed(self.cfg.seed, self._rank_key(f"global@{step}")))
        if self.scaler.is_enabled() and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        if hasattr(self.data, "load_state_dict") and state["data"] is not None:
            self.data.load_state_dict(state["data"])
        else:
            self._note("the data stream has no saved position; the resumed run sees different batches")
        for name, obj in self.extra_state.items():
            if name in state["extra"]:
                obj.load_state_dict(state["extra"][name])
            else:
                self._note(f"'{path.name}' has no state for '{name}'; it starts fresh")
        self.step = step
        self._elapsed_before = float(state["trainer"]["elapsed_seconds"])
        self.last_checkpoint = path
