"""Where a command writes: paths checked before any work starts, sizes that fit, and files written whole.

Every file a command is told to write (``--out``, ``--trajectory``, ``--attention``, ``--plot``) goes through
:func:`image_file` before anything is sampled, so that an hour of sampling never ends in a traceback about
the path:

- no suffix (``--out samples``): ``.png`` is added and the printed line names the file written; a suffix
  the writer cannot write is refused, listing the ones it can;
- missing parent folders are created (as PIL's ``save`` users and diffusers' ``save_pretrained`` expect);
  one that cannot be (a file in the way, a read-only or virtual file system such as /proc) is refused.
  Whether a folder takes a new file is tested by creating and removing an empty hidden file in it: the
  permission bits say nothing for root, and nothing about read-only mounts;
- an existing folder where a file is expected, or something that is not a regular file (/dev/null, a
  FIFO), is refused instead of replaced.

``difflab sample`` and ``generate`` also write one PNG per image into a folder (:func:`sample_target`: a path
ending in '/' or an existing folder), batch by batch, as FID tools (diffusers' and k-diffusion's users,
clean-fid, torch-fidelity) read them; :func:`check_disk` refuses a request the disk cannot hold.

Sizes. One picture holds at most :data:`GRID_MAX` images and :data:`MAX_PIXELS` pixels; a matplotlib
figure at most :data:`FIGURE_MAX` panels and :data:`MAX_SIDE` pixels a side (:func:`picture_problem`).

Files are written through :func:`difflab.config.atomic_path` (a temporary file beside the target, fsynced
and renamed onto it), so an interrupted write never leaves half a PNG under the real name.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from difflab.config import atomic_path
from difflab.errors import DifflabError

GRID_MAX = 4096
"""Images in one grid picture. A 64 x 64 mosaic is already more than a person looks at image by image; at
32 px, upscaled 4x, it is 8,452 pixels square (71 M pixels, 214 MB decoded), just under :data:`MAX_PIXELS`.
More images go to a folder, one PNG each."""

FIGURE_MAX = 1024
"""Panels in one matplotlib figure (captioned grids, the world preview): matplotlib lays out and draws a
captioned panel in about 50 ms, so 1,024 of them take about a minute; more would look hung."""

MAX_PIXELS = Image.MAX_IMAGE_PIXELS
"""PIL's decompression-bomb limit (89.5 M pixels): a bigger picture makes PIL, and the tools built on it,
warn or refuse when they open it."""

MAX_SIDE = 2**16 - 1
"""The widest side matplotlib's Agg renderer draws, in pixels."""

GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""Formats of a grid picture (written by PIL); a path without a suffix gets .png."""


def _pil_formats() -> dict[str, str]:
    Image.init()
    registered = Image.registered_extensions()
    return {s: registered[s] for s in GRID_SUFFIXES if registered.get(s) in Image.SAVE}


def _figure_formats() -> dict[str, str]:
    from matplotlib.backend_bases import FigureCanvasBase

    # pgf writes LaTeX source and needs a TeX installation; every other type matplotlib lists is drawn.
    return {f".{k}": k for k in FigureCanvasBase.get_supported_filetypes() if k != "pgf"}


WRITERS = {"image": _pil_formats, "figure": _figure_formats}
"""What writes the file: PIL (grids, one PNG per sample) or matplotlib (captioned grids, plots)."""


def human(n_bytes: float) -> str:
    """Bytes as a person reads them: 4.1 TB, 12 MB."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n_bytes < 1000 or unit == "TB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1000
    raise AssertionError


def wants_folder(out: str | Path) -> bool:
    """True when ``out`` names a folder: it ends in '/' or is an existing folder."""
    text = str(out)
    return text.endswith(("/", os.sep)) or Path(text).is_dir()


def _writable_folder(folder: Path, flag: str, out: str | Path) -> None:
    """Create ``folder`` (and its parents) and check that a file can be made in it; else a named error."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise DifflabError(f"{flag} '{out}' cannot be written: '{existing}' is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".difflab-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise DifflabError(
            f"{flag} '{out}' cannot be written: folder '{folder}' does not take new files ({reason}); "
            "expected a path in a folder you can write to"
        ) from None


def image_file(out: str | Path, flag: str = "--out", writer: str = "image") -> Path:
    """``out`` checked as a file ``writer`` ('image': PIL, 'figure': matplotlib) will write, with ``.png``
    added when it has no suffix and its folder created; a named error when it cannot be written. Call it
    before the work whose result it will hold."""
    text = str(out)
    if not text.strip():
        raise DifflabError(f"{flag} '' is empty; expected a file name such as samples.png")
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        raise DifflabError(
            f"{flag} '{out}' is a folder; expected an image file such as '{path / 'samples.png'}'"
        )
    if path.exists() and not path.is_file():
        raise DifflabError(
            f"{flag} '{out}' is not a regular file (a device or pipe); expected an image file path"
        )
    formats = WRITERS[writer]()
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    elif path.suffix.lower() not in formats:
        raise DifflabError(f"{flag} '{out}' has suffix '{path.suffix}', which cannot be written; "
                           f"expected one of: {', '.join(formats)}")  # fmt: skip
    _writable_folder(path.parent, flag, out)
    return path


def shown(path: Path, given: str | Path) -> str:
    """``path`` for a printed line, saying so when :func:`image_file` added ``.png`` to ``given``."""
    added = Path(str(given)).expanduser() != Path(path)
    return f"{path} (.png added: '{given}' had no suffix)" if added else str(path)


def image_folder(out: str | Path, flag: str = "--out") -> Path:
    """``out`` checked as a folder to write one PNG per image into, created with its parents."""
    path = Path(str(out)).expanduser()
    if path.exists() and not path.is_dir():
        raise DifflabError(f"{flag} '{out}' is a file, not a folder; expected a folder (end the path in '/')")
    _writable_folder(path, flag, out)
    return path


def sample_target(out: str | Path, n: int, flag: str = "--out", most: int = GRID_MAX,
                  asked: str | None = None) -> tuple[Path, bool]:  # fmt: skip
    """``(path, is_folder)`` for ``n`` samples: a folder (one PNG each) when ``out`` names one, else a grid
    picture of at most ``most`` images; checked and created as :func:`image_file` and :func:`image_folder`.
    ``asked``: the request as the user wrote it, for the error (default: ``--n N``)."""
    if wants_folder(out):
        folder = image_folder(out, flag)
        check_no_clash(folder, n, flag)
        return folder, True
    if n > most:
        raise DifflabError(
            f"{asked or f'--n {n}'} is too many for one grid picture (at most {most} images); give {flag} a "
            "folder (a path ending in '/') to write one PNG per image"
        )
    return image_file(out, flag), False


def check_no_clash(
    folder: Path, n: int, flag: str = "--out", also: tuple[str, ...] = ("prompts.txt",)
) -> None:
    """Refuse a folder that already holds any file the ``n`` numbered images (or ``also``) would be written
    to: samples of another run or seed, or a user's own ``000000.png``, are never overwritten."""
    names = {numbered(folder, i, n).name for i in range(n)} | set(also)
    taken = sorted(e.name for e in folder.iterdir() if e.name in names) if folder.is_dir() else []
    if taken:
        shown_ = ", ".join(taken[:3]) + (f" and {len(taken) - 3} more" if len(taken) > 3 else "")
        raise DifflabError(
            f"{flag} '{folder}' already holds {shown_}; expected a folder without the files it would write "
            "(pick a new folder, or move them away)"
        )


def picture_problem(panels: int, width: int, height: int, most: int = GRID_MAX) -> str | None:
    """Why a picture of ``panels`` images, ``width`` x ``height`` pixels, should not be made, or None."""
    if panels > most:
        return f"{panels} images are more than one picture holds (at most {most})"
    if width * height > MAX_PIXELS:
        return (f"the picture would be {width} x {height} pixels, over PIL's limit of {MAX_PIXELS:,} "
                "(the size image viewers and PIL open without a decompression-bomb warning)")  # fmt: skip
    if max(width, height) > MAX_SIDE:
        return f"the picture would be {width} x {height} pixels; matplotlib draws at most {MAX_SIDE} a side"
    return None


def largest(fits: Callable[[int], bool], upto: int) -> int:
    """The largest n in 1..``upto`` for which ``fits(n)`` holds (0 if none), scanning down from ``upto``."""
    for n in range(upto, 0, -1):
        if fits(n):
            return n
    return 0


def png_bytes(channels: int, height: int, width: int, block: int = 4096) -> int:
    """A generous size on disk of one PNG of that shape: the raw pixels, one filter byte a row and 1 kB of
    chunks (deflate barely shrinks noisy samples), rounded up to the file system's block."""
    raw = channels * height * width + height + 1024
    return math.ceil(raw / block) * block


def check_disk(folder: Path, n: int, per_image: int, flag: str = "--out") -> None:
    """Refuse ``n`` files of about ``per_image`` bytes each when ``folder``'s disk has less free space."""
    free = shutil.disk_usage(folder).free
    if n * per_image > free:
        raise DifflabError(
            f"--n {n} needs about {human(n * per_image)} in {flag} '{folder}' ({human(per_image)} a PNG) but "
            f"{human(free)} is free; expected --n <= {free // per_image}"
        )


def block_size(folder: Path) -> int:
    """The file system's allocation unit under ``folder`` (4096 where it cannot be read)."""
    try:
        return os.statvfs(folder).f_frsize or 4096
    except (AttributeError, OSError):
        return 4096


def numbered(folder: Path, index: int, n: int) -> Path:
    """``folder/000042.png``: zero-padded so names sort in image order (six digits, more when n needs)."""
    return folder / f"{index:0{max(6, len(str(n - 1)))}d}.png"


def write_file(path: str | Path, write: Callable[[Path, str], None], writer: str = "image") -> Path:
    """Write ``path`` (``.png`` added when it has no suffix) atomically: ``write(tmp, fmt)`` writes a
    temporary file beside it in format ``fmt`` (PIL's name for 'image', matplotlib's for 'figure'), which
    then replaces ``path`` (its folder made first); the temporary file is removed if writing fails or is
    interrupted. Returns the path written."""
    path = Path(path)
    if not path.suffix:
        path = path.with_name(path.name + ".png")
    formats = WRITERS[writer]()
    fmt = formats.get(path.suffix.lower())
    if fmt is None:
        raise DifflabError(f"cannot write '{path}': unknown suffix '{path.suffix}'; expected one of: "
                           f"{', '.join(formats)}")  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        with atomic_path(path) as tmp:
            write(tmp, fmt)
    except BaseException:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    return path


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image atomically (:func:`write_file`)."""
    return write_file(path, lambda tmp, fmt: image.save(tmp, format=fmt))


def save_numbered(folder: Path, start: int, tiles: np.ndarray, n: int) -> None:
    """uint8 tiles (B, H, W, C) of images ``start..start+B-1`` of ``n`` as ``folder``'s numbered PNGs
    (:func:`numbered`; grey for one channel), at their own size."""
    for k, tile in enumerate(tiles):
        save_image(
            Image.fromarray(tile[..., 0] if tile.shape[-1] == 1 else tile), numbered(folder, start + k, n)
        )
