"""Draw a shapes-world scene: PIL polygons at 4× supersampling, box-downsampled (anti-aliased).

Unit outlines are computed once; a shape of radius r stays inside the circle of radius r
around its centre. The same scene and size always give the same pixels.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from unclip.data.world import BACKGROUNDS, COLORS, SIZES, Scene

SUPERSAMPLE = 4


def _fit(points: np.ndarray) -> np.ndarray:
    """Scale an outline [N, 2] so that its farthest point lies on the unit circle."""
    return points / np.hypot(points[:, 0], points[:, 1]).max()


def _regular(n: int, start: float, radius: float = 1.0) -> np.ndarray:
    angles = start + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(angles), radius * np.sin(angles)], axis=1)


def _star() -> np.ndarray:
    outer = _regular(5, -math.pi / 2)
    inner = _regular(5, -math.pi / 2 + math.pi / 5, radius=0.45)
    return np.stack([outer, inner], axis=1).reshape(10, 2)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # y down
    y -= (y.max() + y.min()) / 2  # the lobes' top and the tip sit equally far from the centre
    return _fit(np.stack([x, y], axis=1))


def _cross() -> np.ndarray:
    a, w = 0.95, 0.32
    return np.array([(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w),
                     (-a, -w), (-w, -w)])


# Unit outlines [N, 2] (x right, y down), each inside the unit circle; the circle is drawn as an ellipse.
OUTLINES: dict[str, np.ndarray] = {
    "square": _fit(np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)])),
    "triangle": _fit(_regular(3, -math.pi / 2) + np.array([0.0, 0.12])),  # lowered a little: looks centred
    "star": _star(),
    "heart": _heart(),
    "cross": _fit(_cross()),
    "hexagon": _regular(6, 0.0),
    "diamond": np.array([(0.0, -1.0), (0.68, 0.0), (0.0, 1.0), (-0.68, 0.0)]),
}


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as a size×size RGB image: drawn at 4× the size, then box-downsampled."""
    big = size * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background][0])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        r = SIZES[obj.size] * big
        cx, cy = obj.cx * big, obj.cy * big
        fill = COLORS[obj.colour].rgb
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            points = OUTLINES[obj.shape] * r + (cx, cy)  # [N, 2] in supersampled pixels
            draw.polygon(points.ravel().tolist(), fill=fill)
    return image.reduce(SUPERSAMPLE)
