"""The shapes world: seeded scenes of GenEval's attributes in miniature, rendered with Pillow.

Every scene is generated for one GenEval tag (uniform over the six): one object (``single_object``/``colors``),
two objects of different shapes (``two_object``, ``color_attr`` with different colours, ``position`` with one clear
relation by GenEval's rule), or two to four objects of one shape (``counting``; half of them in mixed colours).
Objects keep a margin of empty pixels between their boxes, so each is its own connected component and the
detector (:mod:`data_process.shapes.detect`) can recover the scene exactly.

Determinism: each item draws from its own ``numpy`` generator seeded with ``(seed, stream, index)``, so a scene
depends only on the world seed and its index, never on call order. Streams keep the training scenes, the held-out
GenEval prompts, the text corpus and the per-image choices (caption, questions) independent of each other.

Rendering draws on a canvas ``supersample`` times larger and box-filters it down: antialiased edges (as a VQ
decoder will produce) at ~0.3 ms per 64x64 image.

Compositional split (``heldout_pairs=K``, default 0): K (colour, shape) pairs, chosen by the seed, never appear in
training: a training scene or text sentence that would show or name one is re-drawn from the next generator of its
item (``(seed, stream, index, attempt)``; attempt 0 is the plain generator, so every other item is the same as in
the world without the split), and existence questions never ask about one. Held-out scenes (evaluation) keep every
pair, so prompts that name a held-out pair measure generalisation to unseen combinations.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from data_process.shapes import text as _text
from data_process.shapes.geometry import (
    BACKGROUND, COLORS, PALETTE, RELATIONS, SHAPES, Box, boxes_separated, draw_shape, robust_relations,
)
from data_process.shapes.scene import TAGS, Scene, ShapeObject

# Seed streams: (seed, stream, ...) -> one independent generator per item.
STREAM_TRAIN, STREAM_HELDOUT, STREAM_TEXT, STREAM_CAPTION, STREAM_VQA, STREAM_PAIRS = 0, 1, 2, 3, 4, 5
MAX_REDRAWS = 1000  # re-draws of one training item that shows a held-out pair (each has p <~ 0.5 of doing so)
_MAX_SIDE_FRACTION = {1: 0.36, 2: 0.32, 3: 0.27, 4: 0.25}  # largest object side per object count, of image_size
MIN_SIDE_FRACTION = 0.2
MIN_SIDE_PX = 12  # below ~12 px a blurred diamond or triangle tip is gone and shapes stop being separable
SPLITS = ("heldout", "train")


class ShapesWorld:
    """Deterministic generator of scenes, images, captions, VQA pairs, GenEval metadata and text.

    ``ShapesWorld(seed, image_size).scene(i)`` is a pure function of ``(seed, image_size, i)``.
    """

    def __init__(self, seed: int = 0, image_size: int = 64, supersample: int = 4, heldout_pairs: int = 0):
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {seed!r}")
        if not isinstance(image_size, (int, np.integer)) or image_size < 32:
            raise ValueError(f"image_size: must be an integer >= 32 (room for four objects), got {image_size!r}")
        if supersample < 1:
            raise ValueError(f"supersample: must be >= 1, got {supersample!r}")
        n_pairs = len(COLORS) * len(SHAPES)
        if not isinstance(heldout_pairs, (int, np.integer)) or not 0 <= heldout_pairs <= n_pairs // 2:
            raise ValueError(f"heldout_pairs: must be an integer in [0, {n_pairs // 2}] (half of the {n_pairs} "
                             f"(colour, shape) pairs), got {heldout_pairs!r}")
        self.seed, self.image_size, self.supersample = int(seed), int(image_size), int(supersample)
        self.min_side = max(MIN_SIDE_PX, round(MIN_SIDE_FRACTION * image_size))
        self.margin = max(2, round(0.05 * image_size))  # empty pixels between boxes
        self.border = max(1, image_size // 64)  # empty pixels along the image edge
        self.unseen_pairs = self._choose_unseen_pairs(int(heldout_pairs))

    def __repr__(self) -> str:
        held = f", heldout_pairs={len(self.unseen_pairs)}" if self.unseen_pairs else ""
        return f"ShapesWorld(seed={self.seed}, image_size={self.image_size}{held})"

    def _choose_unseen_pairs(self, k: int) -> tuple[tuple[str, str], ...]:
        """``k`` (colour, shape) pairs drawn uniformly by the world's own generator, sorted (``world.json``
        records them as ``heldout_pairs``)."""
        if k == 0:
            return ()
        pairs = [(c, s) for s in SHAPES for c in COLORS]
        picked = self.rng(STREAM_PAIRS).choice(len(pairs), size=k, replace=False)
        return tuple(sorted(pairs[int(i)] for i in picked))

    def shows_unseen(self, scene: Scene) -> bool:
        """True when ``scene`` has an object of a held-out (colour, shape) pair."""
        return bool(self.unseen_pairs) and any((o.color, o.shape) in self.unseen_pairs for o in scene.objects)

    def names_unseen(self, text: str) -> bool:
        """True when ``text`` names a held-out pair (``red circle`` / ``red circles``)."""
        low = text.lower()
        return any(f"{c} {s}" in low for c, s in self.unseen_pairs)  # "red circle" is a prefix of "red circles"

    def rng(self, stream: int, *keys: int) -> np.random.Generator:
        """The generator of one item; ``keys`` locate it inside its stream."""
        return np.random.default_rng([self.seed, stream, *(int(k) for k in keys)])

    # ----------------------------------------------------------------------------------------- scenes
    def scene(self, index: int) -> Scene:
        """Training scene ``index`` (its tag drawn uniformly from GenEval's six)."""
        if index < 0:
            raise ValueError(f"index: must be >= 0, got {index}")
        for attempt in range(MAX_REDRAWS):
            rng = self.rng(STREAM_TRAIN, index, *((attempt,) if attempt else ()))
            scene = self.sample_scene(rng, TAGS[int(rng.integers(len(TAGS)))], index)
            if not self.shows_unseen(scene):
                return scene
        raise RuntimeError(f"training scene {index}: every re-draw shows a held-out pair {self.unseen_pairs}")

    def heldout_scene(self, tag: str, k: int) -> Scene:
        """The ``k``-th held-out scene of ``tag``: a separate stream, never one of the training scenes' draws."""
        if tag not in TAGS:
            raise ValueError(f"tag: {tag!r} is not one of {', '.join(TAGS)}")
        return self.sample_scene(self.rng(STREAM_HELDOUT, TAGS.index(tag), k), tag, k)

    def sample_scene(self, rng: np.random.Generator, tag: str, index: int) -> Scene:
        """Draw the objects of a ``tag`` scene from ``rng`` (attributes first, then a non-overlapping layout)."""
        shape_ids = rng.choice(len(SHAPES), size=2, replace=False)
        color_ids = rng.choice(len(COLORS), size=4, replace=True)
        relation = None
        if tag in ("single_object", "colors"):
            specs = [(SHAPES[shape_ids[0]], COLORS[color_ids[0]])]
        elif tag == "counting":
            n = int(rng.integers(2, 5))
            same_color = rng.random() < 0.5
            specs = [(SHAPES[shape_ids[0]], COLORS[color_ids[0 if same_color else i]]) for i in range(n)]
        else:
            if tag == "color_attr":
                color_ids = rng.choice(len(COLORS), size=2, replace=False)
            if tag == "position":
                relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
            specs = [(SHAPES[shape_ids[i]], COLORS[color_ids[i]]) for i in range(2)]
        boxes = self._layout(rng, len(specs), relation)
        objects = tuple(ShapeObject(s, c, b) for (s, c), b in zip(specs, boxes))
        return Scene(objects, self.image_size, index, tag)

    def _layout(self, rng: np.random.Generator, n: int, relation: str | None, max_restarts: int = 1000) -> list[Box]:
        """Rejection-sample ``n`` square boxes with ``margin`` px between them; with ``relation`` the first box must
        stand in exactly that relation to the second by GenEval's rule, robustly to a one-pixel re-measurement."""
        size, lo = self.image_size, self.min_side
        hi = max(lo, round(_MAX_SIDE_FRACTION[n] * size))
        for _ in range(max_restarts):
            boxes: list[Box] = []
            for _ in range(n):
                for _ in range(100):
                    side = int(rng.integers(lo, hi + 1))
                    x0, y0 = (int(v) for v in rng.integers(self.border, size - self.border - side + 1, size=2))
                    box = (x0, y0, x0 + side, y0 + side)
                    if all(boxes_separated(box, other, self.margin) for other in boxes):
                        boxes.append(box)
                        break
                else:
                    break
            if len(boxes) < n:
                continue
            if relation is not None and robust_relations(boxes[0], boxes[1]) != {relation}:
                continue
            return boxes
        raise RuntimeError(f"no layout of {n} objects found in {max_restarts} tries for image_size={size}")

    # ----------------------------------------------------------------------------------------- pixels
    def render(self, scene: Scene) -> Image.Image:
        """The RGB image of ``scene`` (antialiased by supersampling)."""
        size, f = scene.image_size, self.supersample
        canvas = Image.new("RGB", (size * f, size * f), BACKGROUND)
        draw = ImageDraw.Draw(canvas)
        for o in scene.objects:
            draw_shape(draw, o.shape, o.box, f, PALETTE[o.color])
        return canvas.resize((size, size), Image.Resampling.BOX) if f > 1 else canvas

    # ----------------------------------------------------------------------------------------- words
    def captions(self, scene: Scene) -> list[str]:
        """Every phrasing of ``scene``; the first is its GenEval prompt."""
        return _text.captions(scene)

    def caption(self, scene: Scene) -> str:
        """The one caption used for ``scene`` (deterministic per seed and index)."""
        return _text.choose_caption(scene, self.rng(STREAM_CAPTION, scene.index))

    def vqa(self, scene: Scene) -> list[tuple[str, str]]:
        """3-4 question/answer pairs (count, attribute, yes/no existence, position when clear)."""
        return _text.vqa(scene, self.rng(STREAM_VQA, scene.index), exclude_pairs=self.unseen_pairs)

    def geneval_metadata(self, scene: Scene) -> dict[str, Any]:
        return _text.geneval_metadata(scene)

    def text_corpus(self, n: int, start: int = 0) -> list[str]:
        """``n`` plain sentences (items ``start .. start+n-1`` of the text stream)."""
        out = []
        for i in range(start, start + n):
            for attempt in range(MAX_REDRAWS):
                rng = self.rng(STREAM_TEXT, i, *((attempt,) if attempt else ()))
                scene = self.sample_scene(rng, TAGS[int(rng.integers(len(TAGS)))], i)
                sentence = _text.text_sentence(rng, scene)
                if not (self.shows_unseen(scene) or self.names_unseen(sentence)):
                    break
            else:
                raise RuntimeError(f"text item {i}: every re-draw names a held-out pair {self.unseen_pairs}")
            out.append(sentence)
        return out

    def geneval_prompts(self, n_per_tag: int, split: str = "heldout") -> list[dict[str, Any]]:
        """``n_per_tag`` GenEval metadata lines per tag, grouped by tag in GenEval's order.

        ``heldout`` draws from its own seed stream (the evaluation set); ``train`` takes the first ``n_per_tag``
        training scenes of each tag. Unlike GenEval we do not de-duplicate prompts: with four shapes the space of
        e.g. single-object prompts is tiny, and each line stands for an independent draw.
        """
        if split not in SPLITS:
            raise ValueError(f"split: {split!r} is not one of {', '.join(SPLITS)}")
        if split == "heldout":
            return [self.geneval_metadata(self.heldout_scene(t, k)) for t in TAGS for k in range(n_per_tag)]
        found: dict[str, list[dict[str, Any]]] = {t: [] for t in TAGS}
        index = 0
        while any(len(v) < n_per_tag for v in found.values()):
            scene = self.scene(index)
            if len(found[scene.resolved_tag()]) < n_per_tag:
                found[scene.resolved_tag()].append(self.geneval_metadata(scene))
            index += 1
        return [m for t in TAGS for m in found[t]]

    def info(self) -> dict[str, Any]:
        """What ``world.json`` records about this world."""
        return {"seed": self.seed, "image_size": self.image_size, "supersample": self.supersample,
                "palette": {c: list(PALETTE[c]) for c in COLORS}, "background": list(BACKGROUND),
                "shapes": list(SHAPES), "relations": list(RELATIONS), "tags": list(TAGS),
                "min_side": self.min_side, "margin": self.margin, "position_rule": "geneval(threshold=0.1)",
                "heldout_pairs": [list(p) for p in self.unseen_pairs]}

    @classmethod
    def from_info(cls, info: dict[str, Any], where: str = "world.json") -> "ShapesWorld":
        """The world a ``world.json`` describes (a file written before the split existed has no held-out pairs);
        the recorded pairs must be the ones the seed draws, else the file is not this code's world."""
        try:
            world = cls(int(info["seed"]), int(info["image_size"]), int(info.get("supersample", 4)),
                        len(info.get("heldout_pairs", [])))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: not a shapes world description ({type(e).__name__}: {e})") from e
        recorded = tuple(sorted(tuple(p) for p in info.get("heldout_pairs", [])))
        if recorded != world.unseen_pairs:
            raise ValueError(f"{where}: heldout_pairs: recorded {recorded} but seed {world.seed} draws "
                             f"{world.unseen_pairs}")
        return world


__all__ = ["ShapesWorld", "STREAM_TRAIN", "STREAM_HELDOUT", "STREAM_TEXT", "SPLITS"]
