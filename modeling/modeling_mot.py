"""Mixture-of-Transformers (MoT) layers: every layer has per-modality q/k/v/o, norms and FFN (``ffn_vision_size``),
with global attention across modalities within the document.

A MoT layer is exactly a Uni-X separated layer whose attention always sees the whole document (the
``all_modal_visible=1`` case): text tokens go through the text branch, vision tokens through the vision branch, and
keys/values of every token (each projected by its own branch) are visible to every query. Only the visibility rule
differs, so this file states only that difference.
"""

from __future__ import annotations

from modeling.configuration_uni_x import UniXConfig
from modeling.layers import SeparatedDecoderLayer


class MoTDecoderLayer(SeparatedDecoderLayer):
    """Per-modality parameters everywhere, global (document-level) attention."""

    def __init__(self, config: UniXConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.same_modality_only = False


__all__ = ["MoTDecoderLayer"]
