"""A deterministic detector for shapes-world images and GenEval's scoring rules on top of it.

Detection, numpy only:

1. Quantise every pixel to the nearest palette colour, kept when within ``color_tolerance`` of it or clearly
   nearer to it than to the runner-up (``ambiguity_ratio``); ambiguous pixels (antialiased edges, heavy noise)
   and background pixels are left unlabelled. Both thresholds sit below the worst case of a colour/background
   blend landing near a third colour, so edges never become spurious objects.
2. Connected components per colour (8-connectivity) by union-find over horizontal runs: a 64x64 image has a few
   hundred runs, so the Python loop is over runs, not pixels.
3. Components smaller than ``min_area`` are noise. Each remaining one is classified by IoU against every shape's
   analytic template (:func:`~data_process.shapes.geometry.shape_mask`) fitted to its bounding box; the best IoU
   is the detection score and a component below ``min_score`` is not a shape. On clean renders the right template
   scores ~0.9-1.0 and the runner-up at most ~0.8 (circle vs square), which is what makes detection exact.

Scoring (:func:`evaluate_geneval`) re-implements GenEval's ``evaluate``: includes are ANDed, excludes ORed; the
colour and position of an include are checked on its ``count`` most confident detections; position uses GenEval's
centre-offset rule with threshold 0.1. Not copied; behaviour matched to djghosh13/geneval evaluate_images.py.
One difference: GenEval raises its confidence threshold for ``counting`` (0.9 vs 0.3) because Mask2Former emits
duplicate low-confidence boxes; connected components cannot duplicate an object, so one ``min_score`` serves all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from data_process.shapes.geometry import (
    BACKGROUND, COLORS, GENEVAL_POSITION_THRESHOLD, PALETTE, SHAPES, relative_position, shape_mask,
)

_PALETTE_RGB = np.array([PALETTE[c] for c in COLORS] + [BACKGROUND], dtype=np.float32)  # (11, 3); last = background
_BG_LABEL = len(COLORS)
DEFAULT_COLOR_TOLERANCE = 60.0  # < 67, the closest any colour/background blend gets to a third colour
DEFAULT_AMBIGUITY_RATIO = 0.6  # < 0.697, the lowest nearest/runner-up ratio of a blend nearest to a third colour
DEFAULT_MIN_SCORE = 0.5


@dataclass(frozen=True)
class Detection:
    """One detected object; ``box`` as in :class:`~data_process.shapes.scene.ShapeObject`, ``score`` = template IoU.

    The GenEval rules read ``shape`` as the class name, so other detectors reuse them with any class names and
    float boxes (``evaluation/benchmarks/geneval.py``: COCO classes from Mask2Former, ``color`` from CLIP or ""
    where no rule asks for it)."""

    shape: str
    color: str
    box: tuple[int, int, int, int]
    score: float
    area: int = 0


def quantize(image: Image.Image | np.ndarray, color_tolerance: float = DEFAULT_COLOR_TOLERANCE,
             ambiguity_ratio: float = DEFAULT_AMBIGUITY_RATIO) -> np.ndarray:
    """``(H, W)`` int labels: index into ``COLORS``, or -1 for background and for pixels matching no colour.

    A pixel takes its nearest palette entry when within ``color_tolerance`` of it or when that distance is below
    ``ambiguity_ratio`` times the distance to the runner-up; otherwise it is left unlabelled.
    """
    rgb_HW3 = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if rgb_HW3.ndim != 3 or rgb_HW3.shape[2] != 3:
        raise ValueError(f"image: expected an RGB image of shape (H, W, 3), got {rgb_HW3.shape}")
    # |x - p|^2 = |x|^2 - 2 x.p + |p|^2 as one matmul: 4x faster than broadcasting (H, W, K, 3).
    x_N3 = rgb_HW3.reshape(-1, 3)
    d2_NK = (x_N3 ** 2).sum(1, keepdims=True) - 2.0 * x_N3 @ _PALETTE_RGB.T + (_PALETTE_RGB ** 2).sum(1)[None]
    two_NK = np.partition(d2_NK, 1, axis=1)[:, :2]  # squared distances to the nearest and second nearest
    labels_N = d2_NK.argmin(1)
    # Keep a pixel when it is close to its colour, or clearly closer to it than to anything else (squared ratio):
    # the second rule keeps JPEG/VQ-shifted interiors; neither fires on colour/background blends near a third colour.
    ok_N = (two_NK[:, 0] <= color_tolerance ** 2) | (two_NK[:, 0] < (ambiguity_ratio ** 2) * two_NK[:, 1])
    labels_N = np.where(ok_N & (labels_N != _BG_LABEL), labels_N, -1)
    return labels_N.reshape(rgb_HW3.shape[:2]).astype(np.int64)


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def connected_components(labels_HW: np.ndarray) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """8-connected components of equal non-negative labels: ``[(label, [(row, start, stop), ...])]``."""
    h, w = labels_HW.shape
    # Run boundaries of all rows at once: padding with -2 (no label) puts a boundary at 0 and at w in every row.
    pad = np.full((h, 1), -2, dtype=labels_HW.dtype)
    padded = np.concatenate([pad, labels_HW, pad], axis=1)
    rows, cols = np.nonzero(padded[:, 1:] != padded[:, :-1])  # sorted by row, then column
    same_row = rows[:-1] == rows[1:]
    r_, s_, e_ = rows[:-1][same_row], cols[:-1][same_row], cols[1:][same_row]
    lab_ = labels_HW[r_, s_]
    keep = lab_ >= 0
    runs = list(zip(r_[keep].tolist(), s_[keep].tolist(), e_[keep].tolist(), lab_[keep].tolist()))
    row_runs: list[list[int]] = [[] for _ in range(h)]  # run ids per row, sorted by start
    for i, run in enumerate(runs):
        row_runs[run[0]].append(i)
    parent = list(range(len(runs)))
    for r in range(1, len(row_runs)):
        prev, cur = row_runs[r - 1], row_runs[r]
        j = 0
        for i in cur:  # both lists sorted by start: two-pointer sweep over overlapping (8-connected) runs
            _, s, e, lab = runs[i]
            while j < len(prev) and runs[prev[j]][2] < s:  # prev run ends left of s - 1: never touches again
                j += 1
            k = j
            while k < len(prev) and runs[prev[k]][1] <= e:
                if runs[prev[k]][3] == lab:
                    a, b = _find(parent, i), _find(parent, prev[k])
                    if a != b:
                        parent[max(a, b)] = min(a, b)
                k += 1
    comps: dict[int, list[tuple[int, int, int]]] = {}
    for i, (r, s, e, _) in enumerate(runs):
        comps.setdefault(_find(parent, i), []).append((r, s, e))
    return [(runs[root][3], members) for root, members in comps.items()]


def classify_shape(mask_HW: np.ndarray, max_grow: int = 2) -> tuple[str, float]:
    """Best-matching shape for a component mask cropped to its bounding box, and its IoU.

    Templates are tried on the bounding box and on boxes grown by up to ``max_grow`` px per side: blur or JPEG
    erase the thin tips of a diamond or triangle, which shrinks the measured box and would otherwise make the
    rounded remainder fit a circle better. A grown template costs 0.01 IoU per pixel, so ties keep the tight box.
    """
    h, w = mask_HW.shape
    best, best_score = SHAPES[0], -1.0
    for grow in range(max_grow + 1):
        padded = np.pad(mask_HW, grow) if grow else mask_HW
        for shape in SHAPES:
            tmpl = shape_mask(shape, w + 2 * grow, h + 2 * grow)
            score = float((tmpl & padded).sum()) / float((tmpl | padded).sum()) - 0.01 * grow
            if score > best_score:
                best, best_score = shape, score
    return best, best_score


def detect(image: Image.Image | np.ndarray, min_area: int | None = None,
           color_tolerance: float = DEFAULT_COLOR_TOLERANCE, ambiguity_ratio: float = DEFAULT_AMBIGUITY_RATIO,
           min_score: float = DEFAULT_MIN_SCORE) -> list[Detection]:
    """Detected objects, most confident first.

    ``min_area`` defaults to 0.4% of the image (16 px at 64x64; the smallest object the world draws, an 11 px
    triangle, covers ~60), so specks in generated images are ignored.
    """
    labels_HW = quantize(image, color_tolerance, ambiguity_ratio)
    h, w = labels_HW.shape
    if min_area is None:
        min_area = max(4, round(0.004 * h * w))
    out: list[Detection] = []
    for label, runs in connected_components(labels_HW):
        area = sum(e - s for _, s, e in runs)
        if area < min_area:
            continue
        y0, y1 = min(r for r, _, _ in runs), max(r for r, _, _ in runs) + 1
        x0, x1 = min(s for _, s, _ in runs), max(e for _, _, e in runs)
        mask = np.zeros((y1 - y0, x1 - x0), dtype=bool)
        for r, s, e in runs:
            mask[r - y0, s - x0:e - x0] = True
        shape, score = classify_shape(mask)
        if score >= min_score:
            out.append(Detection(shape, COLORS[label], (x0, y0, x1, y1), round(score, 4), area))
    out.sort(key=lambda d: (-d.score, d.box))
    return out


# --------------------------------------------------------------------------------------------- GenEval rules
def _validate_metadata(metadata: dict[str, Any]) -> None:
    if not isinstance(metadata, dict) or not isinstance(metadata.get("include"), list):
        raise ValueError(f"metadata: expected a GenEval dict with an 'include' list, got {metadata!r}")
    for key in ("include", "exclude"):
        for i, req in enumerate(metadata.get(key, [])):
            if not isinstance(req, dict) or not isinstance(req.get("class"), str) or not isinstance(req.get("count"), int):
                raise ValueError(f"metadata.{key}[{i}]: needs 'class' (str) and 'count' (int), got {req!r}")
            if key == "include" and "position" in req:
                pos = req["position"]
                if not (isinstance(pos, (list, tuple)) and len(pos) == 2 and isinstance(pos[1], int) and 0 <= pos[1] < i):
                    raise ValueError(f"metadata.include[{i}].position: expected [relation, index of an earlier include], got {pos!r}")


def evaluate_geneval(detections: list[Detection], metadata: dict[str, Any],
                     position_threshold: float = GENEVAL_POSITION_THRESHOLD) -> tuple[bool, list[str]]:
    """GenEval's verdict on one image's detections: ``(correct, reasons it is not)``."""
    _validate_metadata(metadata)
    by_class: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        by_class.setdefault(d.shape, []).append(d)
    reasons: list[str] = []
    matched: list[list[Detection] | None] = []
    for req in metadata["include"]:
        cls, count = req["class"], req["count"]
        found = by_class.get(cls, [])[:count]
        ok = len(found) >= count
        if not ok:
            reasons.append(f"expected {cls}>={count}, found {len(found)}")
        if ok and "color" in req:
            n_color = sum(d.color == req["color"] for d in found)
            if n_color < count:
                ok = False
                reasons.append(f"expected {req['color']} {cls}>={count}, found {n_color} {req['color']}")
        if ok and "position" in req:
            rel, target = req["position"]
            targets = matched[target]
            if targets is None:
                ok = False
                reasons.append(f"no target for {cls} to be {rel}")
            else:
                for d in found:
                    bad = next((t for t in targets if rel not in relative_position(d.box, t.box, position_threshold)), None)
                    if bad is not None:
                        ok = False
                        got = relative_position(d.box, bad.box, position_threshold)
                        reasons.append(f"expected {cls} {rel} target, found {' and '.join(sorted(got)) or 'no relation'}")
                        break
        matched.append(found if ok else None)
    for req in metadata.get("exclude", []):
        n = len(by_class.get(req["class"], []))
        if n >= req["count"]:
            reasons.append(f"expected {req['class']}<{req['count']}, found {n}")
    return not reasons, reasons


def score_geneval(image: Image.Image | np.ndarray, metadata: dict[str, Any], **detect_kwargs: Any) -> bool:
    """True when ``image`` satisfies ``metadata`` by GenEval's rules, with :func:`detect` as the detector."""
    return evaluate_geneval(detect(image, **detect_kwargs), metadata)[0]
