"""Mixture-of-Transformers (MoT) layers: per-modality weights with global attention across modalities within the
document. Two styles (``config.mot_style``):

``ours``       every layer has per-modality q/k/v/o, norms and FFN (``ffn_vision_size``). A MoT layer is then exactly
               a Uni-X separated layer whose attention always sees the whole document (the ``all_modal_visible=1``
               case): text tokens go through the text branch, vision tokens through the vision branch, and keys/values
               of every token (each projected by its own branch) are visible to every query.
``reference``  the reference's MoT baseline (its ``modeling/mot_qwen.py``, the paper's MoT row): per-modality q/k/v
               (and, on Qwen3, q/k head norms) and FFN, but ONE ``input_layernorm``, ONE ``post_attention_layernorm``
               and the text ``o_proj`` for every token. The reference starts its vision weights at random (nothing
               copies them); ``modeling/conversion.py`` does the same for this style unless told otherwise
               (``init_vision_with_text``).

Only the visibility rule and, for the reference style, the missing vision submodules differ from
`SeparatedDecoderLayer`, so this file states only that difference. The parameter names stay ours
(``model.layers.{i}.vision.self_attn.q_proj``, ``.vision.mlp.*``); the vision branch simply has no ``o_proj`` and no
norms of its own in the reference style.
"""

from __future__ import annotations

from modeling.configuration_uni_x import UniXConfig
from modeling.layers import SeparatedDecoderLayer

# the vision-branch submodules the reference's MoT layer does not have (it uses the text layer's for every token)
REFERENCE_SHARED = ("input_layernorm", "post_attention_layernorm", "self_attn.o_proj")


class MoTDecoderLayer(SeparatedDecoderLayer):
    """Per-modality parameters, global (document-level) attention; ``mot_style`` says which parameters."""

    def __init__(self, config: UniXConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.same_modality_only = False
        self.reference_style = config.mot_style == "reference"
        if self.reference_style:
            for name in REFERENCE_SHARED:  # the routing falls back to this layer's own module where one is absent
                parent, _, child = name.rpartition(".")
                delattr(self.vision.get_submodule(parent) if parent else self.vision, child)

    @staticmethod
    def vision_ffn_width(config: UniXConfig) -> int:
        return config.vision_ffn_size

    def ffn_branches(self):
        if not self.reference_style:
            return super().ffn_branches()
        return ((lambda h: self.mlp(self.post_attention_layernorm(h))),
                (lambda h: self.vision.mlp(self.post_attention_layernorm(h))))


__all__ = ["MoTDecoderLayer", "REFERENCE_SHARED"]
