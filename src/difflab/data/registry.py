"""Datasets by name, so configs and the command line can say ``dataset: digits`` and pass options.

``make_dataset(name, **options)`` checks the name and every option against the dataset's constructor
before calling it, so a typo is reported as one line naming it and the valid choices rather than as a
``TypeError`` from deep inside.
"""

from __future__ import annotations

import inspect

from torch.utils.data import Dataset

from difflab.data.digits import DigitsDataset
from difflab.data.folder import ImageFolderDataset
from difflab.data.toy import ToyWorldDataset
from difflab.errors import DifflabError, check_choice

DATASETS: dict[str, type[Dataset]] = {
    "toy": ToyWorldDataset,
    "digits": DigitsDataset,
    "folder": ImageFolderDataset,
}


def make_dataset(name: str, **options) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`) built with ``options``:
    ``make_dataset('toy', cfg='single32', n=1000)``, ``make_dataset('folder', root='photos', size=64)``."""
    cls = DATASETS[check_choice("dataset", name, DATASETS)]
    params = {
        p.name: p
        for p in list(inspect.signature(cls.__init__).parameters.values())[1:]
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    for key in options:
        check_choice(f"{name} dataset option", key, params)
    missing = [p for p in params if params[p].default is inspect.Parameter.empty and p not in options]
    if missing:
        raise DifflabError(f"dataset '{name}' needs option(s): {', '.join(missing)}")
    return cls(**options)
