"""The pinhole camera of the depth world: where a ground plane and the objects standing on it appear.

The camera stands ``CAMERA_HEIGHT`` above a flat ground and looks horizontally, so the horizon is a
straight image row ``HORIZON`` (canvas fractions, y down). With focal length ``FOCAL`` (canvas fractions),
a point at height ``Y`` above the ground and distance ``Z`` along the optical axis projects to the row

    v = HORIZON + FOCAL * (CAMERA_HEIGHT - Y) / Z                 (pinhole projection)

so the ground (``Y = 0``) at row ``v`` is at ``Z = FOCAL * CAMERA_HEIGHT / (v - HORIZON)``: its depth rises
continuously toward the horizon. Linear fog (OpenGL's ``GL_LINEAR``) fades the ground into the fog colour
between ``FOG_START`` and ``Z_FAR``; the sky, and everything beyond ``Z_FAR``, is fog, stored at depth
``Z_FAR`` - a backdrop, so every pixel has a finite depth. No object stands beyond ``FOG_START``.
An object of physical radius ``R`` resting on the ground has its centre at height ``R``: it appears
with image radius ``r = FOCAL * R / Z`` centred at ``v = HORIZON + FOCAL * (CAMERA_HEIGHT - R) / Z``.
Eliminating ``Z``: ``r = R (v - HORIZON) / (CAMERA_HEIGHT - R)`` - a far object is small and high, a near
one large and low (perspective) - and, inverted, ``R = CAMERA_HEIGHT * r / (v - HORIZON + r)``: the reader
recovers an object's true size from its image size and height in the picture, as a person does.

Depths are stored as ``Z / Z_FAR`` in (0, 1] (the flat world's convention: smaller is nearer, the
farthest thing at 1).
"""

from __future__ import annotations

import numpy as np

HORIZON = 0.2
"""Image row of the horizon, as a fraction of the image height from the top."""
FOCAL = 1.0
"""Focal length in canvas fractions (a field of view of 2 atan(0.5) = 53 degrees)."""
CAMERA_HEIGHT = 1.0
"""Height of the camera above the ground; physical sizes are in these units."""
FOG_START = 3.0
"""Fog begins at this distance (beyond every object: the farthest stands at 0.82 / 0.3 = 2.7)."""
Z_FAR = 6.0
"""The far plane: full fog; the sky and the ground beyond it are stored at depth 1 (this distance)."""
CENTRE_ROWS = (0.5, 0.9)
"""Object centres are placed in these rows (canvas fractions): far enough from the horizon that the
farthest object is at most (0.9 - 0.2) / (0.5 - 0.2) = 2.3 times smaller than the nearest of its size."""


def ground_distance(v: np.ndarray) -> np.ndarray:
    """Distance ``Z`` of the ground seen at rows ``v`` (canvas fractions); ``inf`` at and above the horizon."""
    v = np.asarray(v, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(v > HORIZON, FOCAL * CAMERA_HEIGHT / np.maximum(v - HORIZON, 1e-12), np.inf)


def object_distance(y: float, radius: float) -> float:
    """Distance ``Z`` of an object of physical radius ``radius`` whose image centre is at row ``y``."""
    return FOCAL * (CAMERA_HEIGHT - radius) / (y - HORIZON)


def image_radius(y: float, radius: float) -> float:
    """Image radius (canvas fractions) of an object of physical radius ``radius`` centred at row ``y``."""
    return radius * (y - HORIZON) / (CAMERA_HEIGHT - radius)


def physical_radius(r: float, y: float) -> float:
    """Inverse of :func:`image_radius`: the physical radius of an object seen with image radius ``r``
    centred at row ``y`` (both canvas fractions)."""
    return CAMERA_HEIGHT * r / (y - HORIZON + r)


def stored_depth(z: np.ndarray | float) -> np.ndarray:
    """A distance as stored in a depth map: ``Z / Z_FAR`` clipped to 1."""
    return np.minimum(np.asarray(z, dtype=np.float64) / Z_FAR, 1.0)
