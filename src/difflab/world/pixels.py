"""Pixel helpers shared by the world's readers: accept an image in any of difflab's conventions, group
foreground pixels into connected components, and smooth per-pixel colour labels."""

from __future__ import annotations

from collections import deque

import numpy as np

from difflab.errors import DifflabError


def components(fg: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) array, each as an (n, 2) array of (row, col)."""
    h, w = fg.shape
    seen = np.zeros_like(fg, dtype=bool)
    comps = []
    for r0, c0 in zip(*np.nonzero(fg), strict=True):
        if seen[r0, c0]:
            continue
        seen[r0, c0] = True
        queue, pixels = deque([(r0, c0)]), []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= rr < h and 0 <= cc < w and fg[rr, cc] and not seen[rr, cc]:
                    seen[rr, cc] = True
                    queue.append((rr, cc))
        comps.append(np.array(pixels))
    return comps


def as_image(image) -> np.ndarray:
    """Accept (H, W, 3) float in [0, 1], uint8, or a torch tensor (3, H, W) in [-1, 1]."""
    if hasattr(image, "detach"):  # a torch tensor in the diffusion convention
        image = ((image.detach().cpu().float().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    image = np.asarray(image)
    if image.dtype == np.uint8:
        image = image.astype(np.float32) / 255.0
    if image.ndim != 3 or image.shape[-1] != 3:
        raise DifflabError(f"reader expects an (H, W, 3) RGB image; got an array of shape {image.shape}")
    bad = int((~np.isfinite(image)).any(axis=-1).sum())
    if bad:  # a diverged model: say so rather than read noise into shapes
        raise DifflabError(
            f"reader got an image with NaN or infinite values at {bad} pixels; expected finite ones"
        )
    return image.astype(np.float64)


def majority_3x3(labels: np.ndarray, pix: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Replace each pixel's colour label by the most common label among the component's pixels in its
    3x3 neighbourhood: noise flips isolated labels, while a real second object is a contiguous blob."""
    ks = np.unique(labels)
    votes = np.zeros((len(ks), hw[0] + 2, hw[1] + 2))  # one padded indicator map per label
    votes[np.searchsorted(ks, labels), pix[:, 0] + 1, pix[:, 1] + 1] = 1.0
    box = sum(
        votes[:, 1 + dr : hw[0] + 1 + dr, 1 + dc : hw[1] + 1 + dc] for dr in (-1, 0, 1) for dc in (-1, 0, 1)
    )
    return ks[box[:, pix[:, 0], pix[:, 1]].argmax(axis=0)]


def grown(region: np.ndarray) -> np.ndarray:
    """A boolean (H, W) region grown by one pixel (4-connected): where a soft mask also counts the faint
    anti-aliased rim just outside an object's thresholded pixels."""
    out = region.copy()
    out[1:] |= region[:-1]
    out[:-1] |= region[1:]
    out[:, 1:] |= region[:, :-1]
    out[:, :-1] |= region[:, 1:]
    return out
