"""Any folder of images as a dataset: ``{"image": (C, size, size) in [-1, 1], "path": str}``.

Files are collected recursively by extension (:data:`EXTENSIONS`, any case) and sorted by relative path,
so item ``i`` is the same file on every machine. Hidden files and folders (names starting with '.') are
left out: macOS ``._photo.jpg`` companions carry an image extension but hold no image. Symlinked folders
are followed (a folder of links to datasets elsewhere is a common layout), each real folder once, so a
link back up the tree (a loop) or a second link to the same folder adds nothing.

Every file is checked at construction (:func:`verify_image`): PIL's ``verify()`` (headers and PNG chunk
checksums) and then a full decode, since a truncated JPEG passes ``verify()`` and would otherwise stop
training at the step that first draws it. A bad file then stops the run before training starts, named;
``skip_bad=True`` (``--skip-bad``) drops such files instead, lists them in ``dataset.skipped`` and warns
once with their count. The decode costs about a millisecond a file or less (seconds for 10,000 small
JPEGs, against a fraction of that for ``verify()`` alone), paid once before a run of hours; JPEGs are
decoded at 1/8 scale (PIL's ``draft``, which still reads every byte, so truncation shows), on a few
threads. A file that fails later all the same (changed since) raises then, naming it.

Each image is made RGB, resized so its short side is ``size`` (bicubic; PIL's resize filters widen with
the scale factor, so downscaling is antialiased) and centre-cropped to ``size`` x ``size``. EXIF
orientation is applied first. Modes: transparency (RGBA, LA, P with a transparent colour) is composited
over a white matte by default (``matte='black'`` for black), as an image viewer shows it; 16-bit and
32-bit integer images (I;16, I) are scaled from 0..65535 to 0..255 (PIL's own conversion clips them);
float images (F) are taken to lie in [0, 1]; every other mode (L, P, CMYK, YCbCr, 1, ...) goes through
PIL's ``convert('RGB')``. ``channels=1`` converts the result to grey (ITU-R 601-2 luma, PIL's ``L``).
"""

from __future__ import annotations

import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

from difflab.data.images import to_signed
from difflab.errors import DifflabError, check_choice

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MATTES = {"white": (255, 255, 255), "black": (0, 0, 0)}


def find_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursively, symlinked folders followed, each real folder once, hidden
    entries left out), sorted by relative path."""
    found = []
    seen = {os.path.realpath(root)}  # real paths of the folders walked or queued: a loop stops here
    for folder, dirs, files in os.walk(root, followlinks=True):
        keep = []
        for d in sorted(dirs):  # sorted, so which of two links to one folder is walked is fixed
            real = os.path.realpath(os.path.join(folder, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        found += [Path(folder, f) for f in files if not f.startswith(".") and f.lower().endswith(EXTENSIONS)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def verify_image(path: Path) -> str | None:
    """None if PIL can identify ``path``, its structure checks out (``verify()``) and it decodes in full;
    else the reason, in a few words. JPEGs are decoded at 1/8 scale, which reads every byte all the same."""
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the file unusable: open it again to decode
            im.draft(im.mode, (1, 1))
            im.load()
    except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ...)
        return str(e) or type(e).__name__
    return None


def verify_images(paths: list[Path], progress: bool | None = None) -> list[str | None]:
    """:func:`verify_image` of each path, in order, on a few threads (PIL decodes without the GIL); a bar
    on a terminal for large folders."""
    show = len(paths) >= 2000 and sys.stderr.isatty() if progress is None else progress
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return list(tqdm(pool.map(verify_image, paths), total=len(paths), desc="checking images",
                         unit="file", disable=not show, leave=False))  # fmt: skip


def to_rgb(im: Image.Image, matte: tuple[int, int, int] = MATTES["white"]) -> Image.Image:
    """``im`` as an 8-bit RGB image, by the mode rules in the module docstring."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(im).astype(np.float64) / 257.0  # 65535 -> 255
        im = Image.fromarray(np.rint(np.clip(grey, 0, 255)).astype(np.uint8))
    elif im.mode == "F":
        im = Image.fromarray(np.rint(np.clip(np.asarray(im), 0, 1) * 255).astype(np.uint8))
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGBA", im.size, (*matte, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im.convert("RGB")


def resize_center_crop(im: Image.Image, size: int) -> Image.Image:
    """Scale so the short side is ``size`` (bicubic), then cut the central ``size`` x ``size`` square."""
    w, h = im.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return im.crop((left, top, left + size, top + size))


class ImageFolderDataset(Dataset):
    """The images under ``root`` as ``{"image": float32 (channels, size, size) in [-1, 1], "path": str}``."""

    def __init__(
        self, root: str | Path, size: int, skip_bad: bool = False, channels: int = 3, matte: str = "white"
    ):
        self.root = Path(root)
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
            raise DifflabError(f"image size {size!r} is invalid; expected an integer in 1..4096 pixels")
        if channels not in (1, 3):
            raise DifflabError(f"channels={channels!r} is invalid; expected 1 (grey) or 3 (RGB)")
        self.size, self.channels = size, channels
        self.matte = MATTES[check_choice("matte", matte, MATTES)]
        if not self.root.exists():
            raise DifflabError(f"image folder '{self.root}' does not exist")
        if not self.root.is_dir():
            raise DifflabError(f"image folder '{self.root}' is not a folder")
        files = find_images(self.root)
        if not files:
            raise DifflabError(
                f"no images in '{self.root}'; expected files ending in {', '.join(EXTENSIONS)} "
                "(any case, searched recursively)"
            )
        self.paths: list[Path] = []
        self.skipped: list[tuple[Path, str]] = []
        """``(path, reason)`` of every file left out by ``skip_bad=True``."""
        for path, reason in zip(files, verify_images(files), strict=True):
            if reason is None:
                self.paths.append(path)
            elif skip_bad:
                self.skipped.append((path, reason))
            else:
                raise DifflabError(
                    f"'{path}' is not a readable image ({reason}); remove it, or pass --skip-bad "
                    "(skip_bad=True, data.skip_bad=true) to leave unreadable files out"
                )
        if self.skipped:
            first, reason = self.skipped[0]
            warnings.warn(
                f"skipped {len(self.skipped)} unreadable file(s) under '{self.root}' "
                f"(first: '{first}': {reason})",
                stacklevel=2,
            )
        if not self.paths:
            raise DifflabError(f"no readable images in '{self.root}'; all {len(self.skipped)} were skipped")

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, index: int) -> Image.Image:
        """Item ``index`` as a ``size`` x ``size`` PIL image (RGB, or L for ``channels=1``)."""
        path = self.paths[index]
        try:
            with Image.open(path) as im:
                im = to_rgb(ImageOps.exif_transpose(im), self.matte)
        except (OSError, SyntaxError, ValueError) as e:
            raise DifflabError(
                f"'{path}' could not be decoded ({e}); it decoded when the dataset was built, so it has "
                "changed since: restore or remove it"
            ) from None
        im = resize_center_crop(im, self.size)
        return im.convert("L") if self.channels == 1 else im

    def __getitem__(self, index: int) -> dict:
        arr = np.array(self.load(index), dtype=np.uint8)  # a writable copy: tensors may be changed in place
        if arr.ndim == 2:
            arr = arr[..., None]  # (H, W) -> (H, W, 1)
        return {"image": to_signed(arr), "path": str(self.paths[index])}

    def __repr__(self) -> str:
        skipped = f", skipped={len(self.skipped)}" if self.skipped else ""
        return (
            f"ImageFolderDataset('{self.root}', n={len(self)}, size={self.size}, "
            f"channels={self.channels}{skipped})"
        )
