"""Run directories, the same for every model family: ``config.json`` (whose ``kind`` names the family),
``checkpoints/`` and the checks made before training into one.

A family (:mod:`difflab.models.family`) keeps its own config class and network; everything about where
they live on disk is here, so ``difflab train/eval`` treat every family alike.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from difflab.config import from_dict, to_dict
from difflab.errors import DifflabError
from difflab.train import distributed
from difflab.train.checkpoint import latest_checkpoint, load_model_weights, read_meta
from difflab.train.device import is_main_process
from difflab.train.run_dir import (
    check_not_in_use,
    discard_pending_config,
    run_lock,
    stage_config,
    user_entries,
)


def has_checkpoints(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` already holds a trained run (anything under checkpoints/)."""
    checkpoints = Path(run_dir) / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.iterdir())


def read_run_config(run_dir: str | Path) -> tuple[str, dict]:
    """The model family ("kind", as written; :func:`difflab.models.registry.family_of_run` checks it) and
    the raw config dict of ``run_dir``'s config.json."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise DifflabError(f"'{run_dir}' is not a difflab run directory (no config.json)")
    try:
        data = json.loads(path.read_text())
        kind = data.get("kind", "pixel")
    except (json.JSONDecodeError, AttributeError) as err:
        raise DifflabError(f"'{path}' is not a valid run config ({err})") from None
    return kind, data


def load_run_config(run_dir: str | Path, cls, kind: str, what: str):
    """The ``cls`` config stored in ``run_dir``; an error naming both when the run is of another kind."""
    found, data = read_run_config(run_dir)
    if found != kind:
        raise DifflabError(f"'{run_dir}' holds a '{found}' run; expected {what}")
    return from_dict(cls, data)


@contextlib.contextmanager
def claim_run_dir(
    run_dir: str | Path, cfg, resume: bool, load_config, inputs: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Hold ``run_dir`` for one training (the block): lock it, check that training ``cfg`` into it is what
    the user meant, and write its config.json.

    - Only one training writes into a run directory at a time (:func:`~difflab.train.run_dir.run_lock`).
    - A fresh run refuses a directory that holds anything (checkpoints, or a user's files it would
      overwrite: config.json, metrics.jsonl, samples.png are the run's names).
    - A resumed one refuses a run trained on other data, or on other inputs: ``inputs`` names the config
      fields that record the runs this one is built on (``vae_checkpoint``, ``text_encoder_checkpoint``).
      The trainer itself checks the network and the run-defining train settings, so the new config.json
      is staged and lands only when it accepts the checkpoint
      (:func:`~difflab.train.run_dir.commit_pending_config`): a refused resume changes nothing.

    Under torchrun rank 0 makes the checks and writes; every rank learns whether it succeeded.
    """
    run_dir = Path(run_dir)
    main = is_main_process()
    with contextlib.ExitStack() as stack:
        error = None
        if main:
            try:
                # Checked before the lock too, so that a refused run leaves not even a .lock behind in a
                # user's folder; and again under it, against a run that started in between.
                check_not_in_use(run_dir)
                _check_claim(run_dir, cfg, resume, load_config, inputs)
                stack.enter_context(run_lock(run_dir))
                _check_claim(run_dir, cfg, resume, load_config, inputs)
                has_config = (run_dir / "config.json").is_file()
                stage_config(run_dir, to_dict(cfg), pending=resume and has_config)
            except DifflabError as err:
                error = err
        refused = distributed.any_rank(error is not None)  # also the barrier: the run dir now exists
        if error is not None:
            raise error
        if refused:
            raise DifflabError(f"rank 0 refused run directory '{run_dir}' (its message says why)")
        try:
            yield run_dir
        finally:
            if main:
                discard_pending_config(run_dir)


def _check_claim(run_dir: Path, cfg, resume: bool, load_config, inputs: tuple[str, ...]) -> None:
    if not resume:
        if has_checkpoints(run_dir):
            raise DifflabError(
                f"run directory '{run_dir}' already has checkpoints; pass --resume or pick a new --out"
            )
        held = user_entries(run_dir)
        if held:
            shown = ", ".join(held[:5]) + (f" and {len(held) - 5} more" if len(held) > 5 else "")
            hint = " (a run that stopped before its first checkpoint: --resume starts it over)"
            raise DifflabError(
                f"run directory '{run_dir}' is not empty ({shown}); training would overwrite what it holds, "
                f"so pick a new --out{hint if 'config.json' in held else ''}"
            )
    if resume and (run_dir / "config.json").is_file():
        saved = load_config(run_dir)
        if saved.data != cfg.data:
            raise DifflabError(f"cannot resume '{run_dir}': it was trained on other data ({saved.data})")
        for name in inputs:
            was, now = getattr(saved, name), getattr(cfg, name)
            if was != now:
                raise DifflabError(f"cannot resume '{run_dir}': it was trained with {name} {was}, now {now}")


def load_latest_weights(run_dir: str | Path, model: nn.Module, *, ema: bool = True) -> nn.Module:
    """Load the newest good checkpoint of ``run_dir`` into ``model`` (its EMA weights when it has them
    and ``ema``); an error when the run has none yet."""
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        raise DifflabError(f"run '{run_dir}' has no checkpoint yet (train it first)")
    load_model_weights(ckpt, model, ema=ema)
    return model


def checkpoint_id(run_dir: str | Path, what: str = "run") -> str:
    """``step_XXXXXXX:<sha256 prefix>`` of the newest good checkpoint of ``run_dir``: what a run built on
    another run (latent diffusion on an autoencoder, text-to-image on a text encoder) records of it, to
    notice when it is retrained. ``what`` names the run in errors ("autoencoder run")."""
    if not Path(run_dir).is_dir():
        raise DifflabError(f"{what} '{run_dir}' does not exist (moved or deleted?)")
    ckpt = latest_checkpoint(Path(run_dir) / "checkpoints")
    if ckpt is None:
        raise DifflabError(f"{what} '{run_dir}' has no checkpoint yet (train it first)")
    return f"{ckpt.name}:{read_meta(ckpt)['tensors']['sha256'][:16]}"
