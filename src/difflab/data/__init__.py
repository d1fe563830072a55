"""Datasets: the toy world, scikit-learn's digits and image folders, all returning ``image`` as float32
``(C, H, W)`` in [-1, 1] (see :mod:`difflab.data.images`); ``make_dataset(name, **options)`` builds one
by name."""

from difflab.data.digits import DigitsDataset
from difflab.data.folder import ImageFolderDataset
from difflab.data.images import quantize, to_signed, to_uint8
from difflab.data.registry import DATASETS, make_dataset
from difflab.data.toy import FIELDS, ToyWorldDataset, collate

__all__ = [
    "DATASETS",
    "FIELDS",
    "DigitsDataset",
    "ImageFolderDataset",
    "ToyWorldDataset",
    "collate",
    "make_dataset",
    "quantize",
    "to_signed",
    "to_uint8",
]
