"""Scene records of the shapes world: what is in an image, independent of how it is drawn or described."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from data_process.shapes.geometry import COLORS, RELATIONS, SHAPES, relative_position

# GenEval's six tags, in the order its evaluation_metadata.jsonl lists them.
TAGS: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


@dataclass(frozen=True)
class ShapeObject:
    """One object: ``box`` is ``(x0, y0, x1, y1)`` in pixels, ``x1``/``y1`` exclusive."""

    shape: str
    color: str
    box: tuple[int, int, int, int]

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"ShapeObject.shape: {self.shape!r} is not one of {', '.join(SHAPES)}")
        if self.color not in COLORS:
            raise ValueError(f"ShapeObject.color: {self.color!r} is not one of {', '.join(COLORS)}")
        box = tuple(int(c) for c in self.box)
        if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f"ShapeObject.box: {self.box!r} is not (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
        object.__setattr__(self, "box", box)

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.color} {self.shape}"

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "box": list(self.box)}


@dataclass(frozen=True)
class Scene:
    """The objects of one image. ``tag`` is the GenEval tag the scene was generated for (None: inferred).

    Scenes built by hand (tests, other tools) may leave ``tag`` out; :meth:`resolved_tag` then infers one from
    the structure (one object: ``colors``; one shape repeated: ``counting``; two shapes: ``color_attr`` when the
    colours differ, else ``two_object``).
    """

    objects: tuple[ShapeObject, ...]
    image_size: int
    index: int
    tag: str | None = None

    def __post_init__(self) -> None:
        objects = tuple(self.objects)
        if not objects or not all(isinstance(o, ShapeObject) for o in objects):
            raise ValueError(f"Scene.objects: need a non-empty sequence of ShapeObject, got {self.objects!r}")
        object.__setattr__(self, "objects", objects)
        for o in objects:
            if min(o.box) < 0 or max(o.box[2], o.box[3]) > self.image_size:
                raise ValueError(f"Scene.objects: box {o.box} of {o.name} leaves the {self.image_size}px image")
        if self.tag is not None and self.tag not in TAGS:
            raise ValueError(f"Scene.tag: {self.tag!r} is not one of {', '.join(TAGS)}")

    def resolved_tag(self) -> str:
        if self.tag is not None:
            return self.tag
        shapes = {o.shape for o in self.objects}
        if len(self.objects) == 1:
            return "colors"
        if len(shapes) == 1:
            return "counting"
        if len(self.objects) == 2 and len(shapes) == 2:
            return "color_attr" if self.objects[0].color != self.objects[1].color else "two_object"
        raise ValueError(f"Scene {self.index}: no GenEval tag fits {len(self.objects)} objects of {len(shapes)} shapes")

    def count(self, shape: str | None = None, color: str | None = None) -> int:
        return sum((shape is None or o.shape == shape) and (color is None or o.color == color) for o in self.objects)

    def relations(self, a: ShapeObject, b: ShapeObject) -> set[str]:
        """Relations of ``a`` to ``b`` by GenEval's rule on the boxes."""
        return relative_position(a.box, b.box)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "image_size": self.image_size, "tag": self.resolved_tag(),
                "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        objs = [ShapeObject(o["shape"], o["color"], tuple(o["box"])) for o in d["objects"]]
        return cls(tuple(objs), int(d["image_size"]), int(d["index"]), d.get("tag"))


def group_objects(objects: Sequence[ShapeObject]) -> list[tuple[int, str, str]]:
    """``[(count, color, shape)]`` in order of first appearance: the unit every description counts in."""
    counts: dict[tuple[str, str], int] = {}
    for o in objects:
        counts[(o.color, o.shape)] = counts.get((o.color, o.shape), 0) + 1
    return [(n, c, s) for (c, s), n in counts.items()]


__all__ = ["ShapeObject", "Scene", "TAGS", "RELATIONS", "group_objects"]
