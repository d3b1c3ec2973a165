"""The shapes world, split by concern; ``data_process/shapes_world.py`` is the entry point and re-exports this API.

* :mod:`.geometry` - palette, shapes, their drawing and templates, GenEval's position rule
* :mod:`.scene` - ``ShapeObject`` and ``Scene``
* :mod:`.world` - ``ShapesWorld``: seeded scenes and rendering
* :mod:`.text` - captions, VQA, GenEval metadata, plain sentences
* :mod:`.detect` - the detector and GenEval scoring
"""

from data_process.shapes.detect import Detection, detect, evaluate_geneval, score_geneval
from data_process.shapes.geometry import BACKGROUND, COLORS, PALETTE, RELATIONS, SHAPES, relative_position
from data_process.shapes.scene import TAGS, Scene, ShapeObject
from data_process.shapes.world import ShapesWorld

__all__ = [
    "BACKGROUND", "COLORS", "PALETTE", "RELATIONS", "SHAPES", "TAGS", "Detection", "Scene", "ShapeObject",
    "ShapesWorld", "detect", "evaluate_geneval", "relative_position", "score_geneval",
]
