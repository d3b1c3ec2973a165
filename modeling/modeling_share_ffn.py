"""The reference's shared-FFN middle layers (``add_share_ffn=1``; its ``UniShareQwen3MLP`` in ``uni_x_qwen3.py``).

With ``add_share_ffn=1`` the reference replaces the FFN of every Uni-X middle layer ``[N, L-M)`` by three FFNs over
the shared post-attention norm: the stock text FFN (``intermediate_size``, loaded from the base checkpoint), a vision
FFN (``ffn_vision_size``, absent when 0) and a shared FFN (``ffn_share_size``, absent when 0) that every token runs::

    text token:   mlp(h) + share_mlp(h)
    vision token: vision_mlp(h) + share_mlp(h)        (h = post_attention_layernorm(x))

Attention and both norms stay shared. Routing is the token's modality, like MoE (`MoEDecoderLayer`), plus the
shared term; the parameter names are ours (``share_mlp.*``, ``vision_mlp.*``), ``modeling/conversion.py`` maps them
to the reference's ``mlp.share_*_proj`` / ``mlp.vision_*_proj``.
"""

from __future__ import annotations

from modeling.configuration_uni_x import UniXConfig
from modeling.layers import SharedDecoderLayer, stock_mlp


class ShareFFNDecoderLayer(SharedDecoderLayer):
    """Shared attention and norms; FFN = own-modality FFN (text ``mlp`` / ``vision_mlp``) + ``share_mlp``."""

    def __init__(self, config: UniXConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        if config.vision_ffn_size:
            self.vision_mlp = stock_mlp(config, config.vision_ffn_size)
        if config.share_ffn_size:
            self.share_mlp = stock_mlp(config, config.share_ffn_size)

    def _with_share(self, own):
        """``h -> own(norm(h)) + share(norm(h))``; ``own`` None: the shared FFN alone (no vision FFN)."""
        share = getattr(self, "share_mlp", None)

        def ffn(h):
            x = self.post_attention_layernorm(h)
            if own is None:
                return share(x)
            return own(x) if share is None else own(x) + share(x)
        return ffn

    def ffn_branches(self):
        return self._with_share(self.mlp), self._with_share(getattr(self, "vision_mlp", None))


__all__ = ["ShareFFNDecoderLayer"]
