"""The shapes world's fixed vocabulary and geometry, shared by the renderer and the detector.

One definition of every shape serves both sides: :func:`draw_shape` rasterises it with Pillow (on a supersampled
canvas, so the downsampled image is antialiased) and :func:`shape_mask` evaluates the same region analytically at
pixel centres, which is the template the detector matches components against. Keeping both here is what makes the
detector exact on clean images: a shape's template is, by construction, what the renderer drew.

Palette: GenEval's ten colour names with RGB values chosen to be far apart (closest pair, orange/yellow: 96 in RGB
Euclidean distance) and a mid-grey background that is none of them (closest colour: purple, 117). Every blend of a
colour with the background (an antialiased edge) stays at least 67 away from every third colour, so edge pixels
never quantise into a spurious third-colour component (checked in tests/test_shapes_world.py).

Boxes are ``(x0, y0, x1, y1)`` in pixels with ``x1``/``y1`` exclusive (Pillow's crop convention); a shape fills
the continuous square ``[x0, x1) x [y0, y1)``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import ImageDraw

Box = tuple[int, int, int, int]

# GenEval's colour list, in its order (prompts/create_prompts.py of djghosh13/geneval).
COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 130, 20),
    "yellow": (250, 225, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "purple": (130, 40, 180),
    "pink": (250, 130, 200),
    "brown": (120, 70, 25),
    "black": (20, 20, 20),
    "white": (250, 250, 250),
}
BACKGROUND: tuple[int, int, int] = (150, 150, 150)
BACKGROUND_NAME = "gray"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE_RELATION: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
GENEVAL_POSITION_THRESHOLD = 0.1  # GenEval's default ``position_threshold`` option


def _circle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25


def _square(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.ones(np.broadcast(u, v).shape, dtype=bool)


def _triangle(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u - 0.5) <= v / 2  # apex at the top centre, base along the bottom edge


def _diamond(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.abs(u - 0.5) + np.abs(v - 0.5) <= 0.5


# Membership in normalised box coordinates (u right, v down, both in [0, 1]).
_REGIONS: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {
    "circle": _circle,
    "square": _square,
    "triangle": _triangle,
    "diamond": _diamond,
}
assert set(_REGIONS) == set(SHAPES)


def shape_mask(shape: str, width: int, height: int) -> np.ndarray:
    """Boolean ``(height, width)`` mask of ``shape`` filling a ``width`` x ``height`` box, sampled at pixel centres."""
    u = (np.arange(width, dtype=np.float64) + 0.5) / width
    v = (np.arange(height, dtype=np.float64) + 0.5) / height
    return _REGIONS[shape](u[None, :], v[:, None])


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, scale: int, fill: tuple[int, int, int]) -> None:
    """Draw ``shape`` into ``box`` (image pixels) on a canvas ``scale`` times larger than the image."""
    x0, y0, x1, y1 = (c * scale for c in box)
    # Pillow's coordinates are inclusive pixel indices: the last covered pixel is x1 - 1.
    xe, ye = x1 - 1, y1 - 1
    xm, ym = (x0 + xe) / 2, (y0 + ye) / 2
    if shape == "circle":
        draw.ellipse([x0, y0, xe, ye], fill=fill)
    elif shape == "square":
        draw.rectangle([x0, y0, xe, ye], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, ye), (xm, y0), (xe, ye)], fill=fill)
    elif shape == "diamond":
        draw.polygon([(xm, y0), (xe, ym), (xm, ye), (x0, ym)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def box_center(box: Box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def boxes_separated(a: Box, b: Box, margin: int) -> bool:
    """True when at least ``margin`` empty pixels separate the boxes horizontally or vertically."""
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def relative_position(box_a: Box, box_b: Box, threshold: float = GENEVAL_POSITION_THRESHOLD) -> set[str]:
    """Relations of A to B by GenEval's rule (evaluation/evaluate_images.py, ``relative_position``).

    The centre offset is shrunk on each axis by ``threshold`` times the summed box extents (so touching or
    overlapping boxes are not "left of" each other), then normalised by the raw offset length; a relation holds
    when its axis component of that unit-ish vector exceeds 0.5 (within ~60 degrees of the axis). Image y grows
    downwards, so "above" is a negative dy. Re-implemented, not copied.
    """
    (cax, cay), (cbx, cby) = box_center(box_a), box_center(box_b)
    off = np.array([cax - cbx, cay - cby], dtype=np.float64)
    dims = np.array([box_a[2] - box_a[0] + box_b[2] - box_b[0], box_a[3] - box_a[1] + box_b[3] - box_b[1]], dtype=np.float64)
    revised = np.maximum(np.abs(off) - threshold * dims, 0.0) * np.sign(off)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(off)
    rels = set()
    if dx < -0.5:
        rels.add("left of")
    if dx > 0.5:
        rels.add("right of")
    if dy < -0.5:
        rels.add("above")
    if dy > 0.5:
        rels.add("below")
    return rels


def robust_relations(box_a: Box, box_b: Box) -> set[str] | None:
    """GenEval's relations of A to B, or None when a small change of threshold would change them.

    A box re-measured from pixels can differ from the drawn one by a pixel; relations that survive thresholds
    0.05 to 0.2 (GenEval uses 0.1) survive that, so questions and position scenes only use those.
    """
    rels = relative_position(box_a, box_b)
    if relative_position(box_a, box_b, 0.05) != rels or relative_position(box_a, box_b, 0.2) != rels:
        return None
    return rels


def article(word: str) -> str:
    """``a``/``an`` by the first letter, as GenEval's prompt generator does."""
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return f"{shape}es" if shape.endswith("s") else f"{shape}s"


NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
