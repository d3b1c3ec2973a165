"""``config.layer_kinds`` entry -> decoder-layer class: the one registry of layer kinds.

It sits above every layer module (layers, MoT, MoE, share-FFN) and below the model, so no module imports another in a cycle.
"""

from __future__ import annotations

from modeling.configuration_uni_x import LAYER_KINDS
from modeling.layers import SeparatedDecoderLayer, SharedDecoderLayer
from modeling.modeling_moe import MoEDecoderLayer
from modeling.modeling_mot import MoTDecoderLayer
from modeling.modeling_share_ffn import ShareFFNDecoderLayer

LAYER_CLASSES: dict[str, type[SharedDecoderLayer]] = {
    "shared": SharedDecoderLayer,
    "separated": SeparatedDecoderLayer,
    "mot": MoTDecoderLayer,
    "moe": MoEDecoderLayer,
    "share_ffn": ShareFFNDecoderLayer,
}
assert set(LAYER_CLASSES) == set(LAYER_KINDS), "every kind UniXConfig can derive needs a class here"


def layer_class(kind: str) -> type[SharedDecoderLayer]:
    """The layer class of one ``layer_kinds`` entry."""
    if kind not in LAYER_CLASSES:
        raise ValueError(f"unknown layer kind {kind!r}; known: {sorted(LAYER_CLASSES)}")
    return LAYER_CLASSES[kind]


__all__ = ["LAYER_CLASSES", "layer_class"]
