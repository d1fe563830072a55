"""Toy-world scenes: what is in a picture, before any pixel is drawn.

A scene is a short list of objects on a background. Each object has a shape, a named colour, a size
(small or large), a continuous position and a depth. Positions are named by a 3x3 grid
("top left" ... "bottom right"); an object's centre is always sampled from the inner part of its grid
cell and no two objects share a cell, so every position name and every left/right/above/below
relation is unambiguous - both for the captions written here and for the reader that checks them.

Everything is a frozen dataclass with a JSON round trip, so scenes, prompts and edits can be stored
in run directories and versioned evaluation sets.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from difflab.errors import DifflabError, check_choice
from difflab.world import camera

# Named colours (sRGB in [0, 1]). Chosen to be far apart from each other (min pairwise distance 0.36,
# orange vs yellow) and from the dark background, so nearest-palette colour reading is robust.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12),
    "green": (0.12, 0.72, 0.22),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.90, 0.12),
    "magenta": (0.88, 0.15, 0.85),
    "cyan": (0.10, 0.85, 0.90),
    "orange": (1.00, 0.55, 0.05),
    "white": (0.95, 0.95, 0.95),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross")
EXTENSION_SHAPES: tuple[str, ...] = ("star",)
"""Shapes the world can draw but no base preset does: new concepts to teach a trained model (LoRA,
docs/lora.md). A world that draws them names them in ``WorldConfig.shapes`` (the 'star32' preset)."""
ALL_SHAPES: tuple[str, ...] = SHAPES + EXTENSION_SHAPES
SIZES: tuple[str, ...] = ("small", "large")

# The 3x3 grid, row-major: index = 3 * row + col.
ROW_NAMES = ("top", "middle", "bottom")
COL_NAMES = ("left", "center", "right")
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip


def position_name(row: int, col: int) -> str:
    """Name of grid cell (row, col), e.g. (0, 0) -> 'top left', (1, 1) -> 'center'."""
    return POSITIONS[3 * row + col]


def cell_of(x: float, y: float) -> tuple[int, int]:
    """Grid cell (row, col) of a point in canvas fractions (x to the right, y downwards, both in [0, 1])."""
    return min(int(y * 3), 2), min(int(x * 3), 2)


@dataclass(frozen=True)
class Obj:
    """One object. ``x``, ``y`` are the centre of its bounding circle in canvas fractions (y down);
    ``depth`` is its distance from the camera in (0, 1) (smaller is nearer; the background is at 1)."""

    shape: str
    color: str
    size: str
    x: float
    y: float
    depth: float = 0.5

    @property
    def cell(self) -> tuple[int, int]:
        return cell_of(self.x, self.y)

    @property
    def position(self) -> str:
        return position_name(*self.cell)

    def key(self) -> tuple[str, str, str, str]:
        """What the reader can recover from pixels: (shape, colour, size, grid position)."""
        return (self.shape, self.color, self.size, self.position)


@dataclass(frozen=True)
class Scene:
    """A list of objects (back to front) on a background.

    ``background`` is ``'plain'``, ``'gradient'`` or ``'texture'``; ``background_seed`` fixes the
    gradient direction or the texture so that rendering stays a pure function of the scene.
    """

    objects: tuple[Obj, ...]
    background: str = "plain"
    background_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))

    def keys(self) -> list[tuple[str, str, str, str]]:
        """Sorted (shape, colour, size, position) of every object: two scenes that look the same to
        the reader have equal ``keys()``."""
        return sorted(o.key() for o in self.objects)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(
            objects=tuple(Obj(**o) for o in d["objects"]),
            background=d.get("background", "plain"),
            background_seed=int(d.get("background_seed", 0)),
        )


BACKGROUNDS = ("plain", "gradient", "texture")
STYLES = ("flat", "perspective")
"""How a world is seen: 'flat' shapes on a background, their depth a label with no trace in the pixels; or
'perspective' (the depth world): shaded solids on a ground plane under a horizon, seen by the pinhole
camera of :mod:`difflab.world.camera`, where depth can be seen (size, height, shading, occlusion)."""


@dataclass(frozen=True)
class WorldConfig:
    """How scenes are sampled and rendered. Use a named preset: ``world_preset('scene32')``."""

    resolution: int = 32
    """Image side in pixels (square images)."""
    min_objects: int = 1
    max_objects: int = 2
    shapes: tuple[str, ...] = SHAPES
    colors: tuple[str, ...] = COLORS
    sizes: tuple[str, ...] = SIZES
    radius: dict[str, float] = field(default_factory=lambda: {"small": 0.125, "large": 0.2})
    """Bounding-circle radius of each size, as a fraction of the image side."""
    background: str = "plain"
    background_color: tuple[float, float, float] = (0.10, 0.10, 0.12)
    background_amplitude: float = 0.06
    """Peak deviation of gradient/texture backgrounds from ``background_color``."""
    cell_margin: float = 0.2
    """Object centres keep this fraction of a cell's width away from the cell's borders."""
    gap: float = 1.5
    """Minimum gap in pixels between the bounding circles of two objects (no overlaps)."""
    supersample: int = 4
    """Anti-aliasing: each pixel is the mean of supersample x supersample point samples."""
    style: str = "flat"
    """'flat' or 'perspective' (:data:`STYLES`). In a perspective world ``radius`` is each size's physical
    radius in camera heights, and an object's image radius follows its distance (:mod:`camera`)."""

    def __post_init__(self) -> None:
        if not 8 <= self.resolution <= 1024:
            raise DifflabError(f"resolution {self.resolution} is out of range; expected 8..1024 pixels")
        if not 1 <= self.min_objects <= self.max_objects <= 9:
            raise DifflabError(
                f"objects per scene {self.min_objects}..{self.max_objects} is invalid; "
                "expected 1 <= min_objects <= max_objects <= 9 (one per grid cell)"
            )
        for s in self.shapes:
            check_choice("shape", s, ALL_SHAPES)
        for c in self.colors:
            check_choice("colour", c, COLORS)
        for z in self.sizes:
            check_choice("size", z, SIZES)
        check_choice("background", self.background, BACKGROUNDS)
        check_choice("world style", self.style, STYLES)
        if self.style == "perspective" and not all(0 < r < camera.CAMERA_HEIGHT for r in self.radius.values()):
            raise DifflabError(
                f"perspective radii {self.radius} are invalid; expected each in (0, {camera.CAMERA_HEIGHT}) "
                "camera heights (an object taller than the camera would hide the horizon)"
            )

    @property
    def num_classes(self) -> int:
        """Number of (shape, colour) classes, the labels of class-conditional models."""
        return len(self.shapes) * len(self.colors)

    def class_index(self, shape: str, color: str) -> int:
        """Class label of a (shape, colour) pair: ``shape_index * len(colors) + colour_index``."""
        return self.shapes.index(shape) * len(self.colors) + self.colors.index(color)

    def class_name(self, index: int) -> tuple[str, str]:
        """Inverse of :meth:`class_index`: the (shape, colour) of a class label."""
        if not 0 <= index < self.num_classes:
            raise DifflabError(f"class {index} is out of range; expected 0..{self.num_classes - 1}")
        return self.shapes[index // len(self.colors)], self.colors[index % len(self.colors)]

    def radius_px(self, size: str) -> float:
        """Image radius in pixels of an object of ``size`` in a flat world (a perspective world's object has
        its own, by distance: :func:`object_radius_px`)."""
        return self.radius[size] * self.resolution


def object_radius_px(obj: Obj, cfg: WorldConfig) -> float:
    """The image radius in pixels of ``obj``: its size's radius in a flat world; in a perspective world the
    projection of its physical radius from where it stands (:func:`camera.image_radius`)."""
    if cfg.style == "perspective":
        return camera.image_radius(obj.y, cfg.radius[obj.size]) * cfg.resolution
    return cfg.radius_px(obj.size)


WORLD_PRESETS: dict[str, tuple[str, WorldConfig]] = {
    "tiny": (
        "16x16, one large object, 2 shapes x 2 colours: for tests that must learn in seconds",
        WorldConfig(resolution=16, min_objects=1, max_objects=1, shapes=("circle", "square"),
                    colors=("red", "blue"), sizes=("large",), radius={"small": 0.2, "large": 0.3}),
    ),
    "single32": (
        "32x32, exactly one object: shape x colour is the class label (40 classes)",
        WorldConfig(resolution=32, min_objects=1, max_objects=1),
    ),
    "scene32": (
        "32x32, one or two objects: the default world",
        WorldConfig(resolution=32, min_objects=1, max_objects=2),
    ),
    "star32": (
        "32x32, one star: a shape no other preset draws, the new concept a LoRA teaches (docs/lora.md)",
        WorldConfig(resolution=32, min_objects=1, max_objects=1, shapes=("star",)),
    ),
    "scene64": (
        "64x64, one to four objects: captions with relations and counts",
        WorldConfig(resolution=64, min_objects=1, max_objects=4),
    ),
    "depth16": (
        "16x16, one large solid (2 shapes x 2 colours) on a ground plane in perspective: depth tests in seconds",
        WorldConfig(resolution=16, min_objects=1, max_objects=1, shapes=("circle", "square"),
                    colors=("red", "blue"), sizes=("large",), radius={"small": 0.2, "large": 0.3},
                    style="perspective"),
    ),
    "depth32": (
        "32x32, one or two shaded solids on a ground plane in perspective, may occlude: depth can be seen",
        WorldConfig(resolution=32, min_objects=1, max_objects=2, radius={"small": 0.25, "large": 0.35},
                    style="perspective"),
    ),
    "depth64": (
        "64x64, one to three shaded solids on a ground plane in perspective, may occlude (Marigold's world)",
        WorldConfig(resolution=64, min_objects=1, max_objects=3, radius={"small": 0.18, "large": 0.28},
                    style="perspective"),
    ),
}  # fmt: skip


def world_preset(name: str, **overrides) -> WorldConfig:
    """A named world configuration, optionally with fields replaced (``background='texture'``)."""
    check_choice("world preset", name, WORLD_PRESETS)
    cfg = WORLD_PRESETS[name][1]
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def _axis_range(index: int, r_px: float, cfg: WorldConfig) -> tuple[float, float]:
    """Allowed centre coordinates (in pixels) along one axis for grid index ``index``: the inner part
    of the cell, intersected with 'the whole object stays on the canvas'."""
    w = cfg.resolution / 3
    lo = max(w * (index + cfg.cell_margin), r_px + 0.5)
    hi = min(w * (index + 1 - cfg.cell_margin), cfg.resolution - r_px - 0.5)
    return lo, hi


def placeable(cfg: WorldConfig, size: str, row: int, col: int) -> bool:
    """Whether an object of ``size`` fits in cell (row, col) entirely on the canvas."""
    r = cfg.radius_px(size)
    return all(lo <= hi for lo, hi in (_axis_range(row, r, cfg), _axis_range(col, r, cfg)))


def sample_object_in_cell(
    rng: np.random.Generator,
    cfg: WorldConfig,
    shape: str,
    color: str,
    size: str,
    row: int,
    col: int,
    depth: float = 0.5,
) -> Obj:
    """An object with a continuous centre drawn uniformly from the allowed part of cell (row, col)."""
    r = cfg.radius_px(size)
    (ylo, yhi), (xlo, xhi) = _axis_range(row, r, cfg), _axis_range(col, r, cfg)
    if xlo > xhi or ylo > yhi:
        raise DifflabError(f"a {size} object does not fit in the {position_name(row, col)} cell")
    x = rng.uniform(xlo, xhi) / cfg.resolution
    y = rng.uniform(ylo, yhi) / cfg.resolution
    return Obj(shape, color, size, float(x), float(y), float(depth))


def overlaps(a: Obj, b: Obj, cfg: WorldConfig) -> bool:
    """Whether the bounding circles of ``a`` and ``b`` come closer than ``cfg.gap`` pixels."""
    d = np.hypot(a.x - b.x, a.y - b.y) * cfg.resolution
    return bool(d < cfg.radius_px(a.size) + cfg.radius_px(b.size) + cfg.gap)


def fits(obj: Obj, others: tuple[Obj, ...] | list[Obj], cfg: WorldConfig) -> bool:
    """Whether ``obj`` can join ``others``: its own grid cell, and no overlap with any of them."""
    return all(o.cell != obj.cell and not overlaps(obj, o, cfg) for o in others)


def sample_depths(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` depths drawn uniformly from (0.2, 0.9), sorted farthest first: assigned to a scene's objects
    in list order, they make list order the painter's (back-to-front) order. Distinct with probability 1."""
    return np.sort(rng.uniform(0.2, 0.9, size=n))[::-1]


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """Draw a random scene: a number of objects, each with a random shape, colour and size in its own
    grid cell, placed without overlap; depths are distinct and the list is ordered back to front."""
    if cfg.style == "perspective":
        return _sample_perspective_scene(rng, cfg)
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    for _ in range(100):
        objects: list[Obj] = []
        cells = rng.permutation(9)
        for cell in cells:
            if len(objects) == n:
                break
            row, col = divmod(int(cell), 3)
            shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
            color = cfg.colors[int(rng.integers(len(cfg.colors)))]
            size = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
            if not placeable(cfg, size, row, col):
                continue
            obj = sample_object_in_cell(rng, cfg, shape, color, size, row, col)
            if fits(obj, objects, cfg):
                objects.append(obj)
        if len(objects) == n:
            break
    else:  # pragma: no cover - only reachable with configurations far outside the presets
        raise DifflabError(
            f"could not place {n} objects without overlap at {cfg.resolution}x{cfg.resolution}"
        )
    depths = sample_depths(rng, n)
    objects = [dataclasses.replace(o, depth=float(d)) for o, d in zip(objects, depths, strict=True)]
    return Scene(tuple(objects), background=cfg.background, background_seed=int(rng.integers(2**31)))


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of scene ``index`` of the dataset with ``seed``: random access, so any item of a
    dataset can be regenerated alone, identically, on any machine."""
    return np.random.default_rng([int(seed), int(index)])


def scene_at(cfg: WorldConfig, seed: int, index: int) -> Scene:
    """Scene ``index`` of the dataset with ``seed`` (deterministic)."""
    return sample_scene(scene_rng(seed, index), cfg)


MAX_HIDDEN = 0.5
"""In a perspective world a nearer object may hide a farther one, by at most this fraction of the farther
one's radius (the depth of the overlap of their bounding circles): occlusion is a depth cue, but the
reader must still see what the farther object is."""


def _may_join(obj: Obj, others: list[Obj], cfg: WorldConfig) -> bool:
    """Whether ``obj`` can join ``others`` in a perspective world: its own grid cell, and each overlap a
    partial occlusion (:data:`MAX_HIDDEN`); two objects of one colour never touch, since a reader could not
    tell them from one object."""
    r = object_radius_px(obj, cfg)
    for o in others:
        if o.cell == obj.cell:
            return False
        ro = object_radius_px(o, cfg)
        d = np.hypot(o.x - obj.x, o.y - obj.y) * cfg.resolution
        far = ro if o.depth > obj.depth else r
        limit = -cfg.gap if o.color == obj.color else MAX_HIDDEN * far
        if r + ro - d > limit:
            return False
    return True


def _sample_perspective_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """A perspective scene (the depth world): each object stands on the ground, so its row fixes its
    distance and its distance its image size (:mod:`camera`); centres lie in the inner part of their own
    cell within :data:`camera.CENTRE_ROWS`, so the top row stays empty (far away and the sky). The list is
    ordered back to front and each object's ``depth`` is its centre's distance (:func:`camera.stored_depth`)."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    m, half_px = cfg.cell_margin, 0.5 / cfg.resolution
    for _ in range(100):
        objects: list[Obj] = []
        for cell in rng.permutation(9):
            if len(objects) == n:
                break
            row, col = divmod(int(cell), 3)
            shape = cfg.shapes[int(rng.integers(len(cfg.shapes)))]
            color = cfg.colors[int(rng.integers(len(cfg.colors)))]
            size = cfg.sizes[int(rng.integers(len(cfg.sizes)))]
            ylo, yhi = max((row + m) / 3, camera.CENTRE_ROWS[0]), min((row + 1 - m) / 3, camera.CENTRE_ROWS[1])
            if ylo > yhi:
                continue
            y = float(rng.uniform(ylo, yhi))
            radius = cfg.radius[size]
            r = camera.image_radius(y, radius)
            xlo, xhi = max((col + m) / 3, r + half_px), min((col + 1 - m) / 3, 1 - r - half_px)
            if xlo > xhi:
                continue
            depth = float(camera.stored_depth(camera.object_distance(y, radius)))
            obj = Obj(shape, color, size, float(rng.uniform(xlo, xhi)), y, depth)
            if _may_join(obj, objects, cfg):
                objects.append(obj)
        if len(objects) == n:
            break
    else:  # pragma: no cover - only reachable with configurations far outside the presets
        raise DifflabError(f"could not place {n} objects in a perspective world at {cfg.resolution} pixels")
    objects.sort(key=lambda o: -o.depth)
    return Scene(tuple(objects), background="plain", background_seed=0)
