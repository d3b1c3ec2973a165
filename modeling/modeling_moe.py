"""Modality-routed MoE layers: attention and norms shared, the FFN hard-routed by modality.

Every ``moe_every_k``-th layer (``config.layer_kinds == "moe"``) keeps the stock text FFN (``mlp``, so a Qwen2/Qwen3
checkpoint loads unchanged) and adds ``vision_mlp`` (``ffn_vision_size``) for vision tokens. Routing is the token's
modality, not a learned gate: no load-balancing loss, no capacity, each token runs exactly one expert.
"""

from __future__ import annotations

from modeling.configuration_uni_x import UniXConfig
from modeling.layers import SharedDecoderLayer, stock_mlp


class MoEDecoderLayer(SharedDecoderLayer):
    """Shared attention + post-attention norm; text tokens -> ``mlp``, vision tokens -> ``vision_mlp``."""

    def __init__(self, config: UniXConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.vision_mlp = stock_mlp(config, config.vision_ffn_size)

    def ffn_branches(self):
        return ((lambda h: self.mlp(self.post_attention_layernorm(h))),
                (lambda h: self.vision_mlp(self.post_attention_layernorm(h))))


__all__ = ["MoEDecoderLayer"]
