"""The pixel convention of every dataset here: ``image`` is float32 ``(C, H, W)`` in [-1, 1].

Why [-1, 1]: DDPM scales data to [-1, 1] so that images and the N(0, I) noise they are mixed with share
one scale (Ho et al. 2020, Sec. 3.3); every diffusion model, sampler and VAE in difflab assumes it.

Why 8-bit: real images are 8-bit, so the toy world's renders are quantised to 8 bits as well, in every
code path. A rendered item and the same item read back from a uint8 disk cache are then bit-identical,
so whether a run used the cache never changes its data. The quantisation step (1/255 in [0, 1]) is far
below anything the reader or a model at these sizes resolves.

Here: ``quantize`` ([0, 1] float -> uint8), ``to_signed`` (uint8 ``(H, W, C)`` -> model input) and its
inverse ``to_uint8`` (model output -> uint8 ``(H, W, C)``, for saving samples and for the reader).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difflab.errors import DifflabError


def read_square(path: str | Path, side: int, mode: str, what: str, hint: str) -> np.ndarray:
    """An image file in PIL ``mode`` ('RGB', 'L') -> uint8 (side, side[, 3]), a writable copy; a named error when
    it cannot be read or is not ``side`` pixels square (``what`` names the file's role, ``hint`` the side's)."""
    try:
        with Image.open(path) as img:
            pixels = img.convert(mode)
    except (OSError, ValueError) as e:
        raise DifflabError(f"{what} '{path}' cannot be read ({e}); expected a PNG") from None
    if pixels.size != (side, side):
        raise DifflabError(f"{what} '{path}' is {pixels.size[0]}x{pixels.size[1]}; expected {side}x{side}, {hint}")
    return np.array(pixels)


def quantize(image: np.ndarray) -> np.ndarray:
    """Round an image in [0, 1] to uint8 (values outside are clipped first)."""
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_signed(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., H, W, C)`` -> float32 ``(..., C, H, W)`` in [-1, 1]: 0 -> -1, 255 -> 1 exactly."""
    t = torch.as_tensor(image)
    if t.dtype != torch.uint8:
        raise TypeError(f"to_signed expects uint8 pixels, got {t.dtype}")
    return (t.movedim(-1, -3).to(torch.float32) / 127.5 - 1.0).contiguous()


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_signed`: float ``(..., C, H, W)`` in [-1, 1] (clipped) -> uint8
    ``(..., H, W, C)``."""
    unit = (image.detach().to(torch.float32).clamp(-1.0, 1.0) + 1.0) / 2.0
    return quantize(unit.movedim(-3, -1).cpu().numpy())
