"""The decoder-layer kinds' shared machinery: the routing context and the shared and separated layers.

Every kind is built from the stock decoder layer of ``config.backbone`` (`STOCK_DECODER_LAYERS`: Qwen2's or
Qwen3's): a layer adopts the stock layer's submodules under their stock names (``self_attn``, ``mlp``,
``input_layernorm``, ``post_attention_layernorm``), so a Qwen2/Qwen3 checkpoint loads into the text path unchanged,
and only the routing is written here. The one backbone difference the routing must know is Qwen3's per-head RMSNorm
of q and k (``q_norm``/``k_norm``), applied by the token's own branch before RoPE (`SharedDecoderLayer._qkv`).

``SharedDecoderLayer`` is the base of every kind (its ``forward`` does gather -> branch -> scatter through
`ModalityRouting`); ``SeparatedDecoderLayer`` adds the parallel vision layer of Uni-X's two ends. MoT and MoE
(`modeling.modeling_mot`, `modeling.modeling_moe`) subclass these; `modeling.layer_registry` maps
``config.layer_kinds`` entries to classes. Nothing here imports the model, so the imports run one way:
layers <- mot/moe <- layer_registry <- modeling_uni_x.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import Qwen2Config
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2MLP,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention, Qwen3DecoderLayer, Qwen3MLP

from modeling.configuration_uni_x import UniXConfig
from modeling.modality import ModalityRouting


def ffn_config(config: Qwen2Config, intermediate_size: int) -> Qwen2Config:
    """A shallow copy of ``config`` with another FFN width, for building a stock layer/MLP of that width."""
    cfg = copy.copy(config)
    cfg.__dict__["intermediate_size"] = intermediate_size
    return cfg


# backbone -> the stock decoder layer / FFN every layer kind is built from (UniXConfig.backbone)
STOCK_DECODER_LAYERS: dict[str, type[GradientCheckpointingLayer]] = {"qwen2": Qwen2DecoderLayer,
                                                                      "qwen3": Qwen3DecoderLayer}
STOCK_MLPS: dict[str, type[torch.nn.Module]] = {"qwen2": Qwen2MLP, "qwen3": Qwen3MLP}


def stock_decoder_layer(config: UniXConfig, intermediate_size: int, layer_idx: int) -> GradientCheckpointingLayer:
    """A stock decoder layer of ``config.backbone`` with an FFN of ``intermediate_size``."""
    return STOCK_DECODER_LAYERS[config.backbone](ffn_config(config, intermediate_size), layer_idx)


def stock_mlp(config: UniXConfig, intermediate_size: int) -> torch.nn.Module:
    """A stock FFN of ``config.backbone`` (MoE's vision expert)."""
    return STOCK_MLPS[config.backbone](ffn_config(config, intermediate_size))


@dataclass
class LayerContext:
    """Everything a layer needs about the current batch, computed once in `UniXModel.forward`."""

    routing: ModalityRouting
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: [B, T, head_dim], row order
    position_embeddings_concat: tuple[torch.Tensor, torch.Tensor] | None  # packed rows, concat order
    mask_document: torch.Tensor | None  # [B, 1, T, S] additive, None on the varlen path
    mask_same_modality: torch.Tensor | None
    use_varlen: bool  # packed row + an implementation that consumes cu_seq_lens


class SharedDecoderLayer(GradientCheckpointingLayer):
    """A stock decoder layer for every token; the base of the other kinds, which override the branch hooks."""

    same_modality_only = False

    def __init__(self, config: UniXConfig, layer_idx: int):
        super().__init__()
        # The stock layer's own submodules, under their stock names: its parameter names (and so every checkpoint)
        # are the stock ones; only its forward is replaced by the routing below.
        for name, module in stock_decoder_layer(config, config.intermediate_size, layer_idx).named_children():
            self.add_module(name, module)
        self.hidden_size = config.hidden_size
        self.config = config  # the model's own config object: follows set_attn_implementation
        self.layer_idx = layer_idx

    # -- branch hooks: the vision side returns None for "shared with text"
    def attention_branches(self) -> tuple[torch.nn.Module, torch.nn.Module | None]:
        """Modules owning ``self_attn`` (q/k/v, and ``input_layernorm`` / ``o_proj`` unless the branch shares this
        layer's: the reference-style MoT) for text and vision tokens."""
        return self, None

    def ffn_branches(self):
        """Callables ``h -> FFN(post_attention_layernorm(h))`` for text and vision tokens."""
        return (lambda h: self.mlp(self.post_attention_layernorm(h))), None

    def forward(
        self,
        hidden_states: torch.Tensor,
        layer_ctx: LayerContext | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if layer_ctx is None:
            raise ValueError(f"{type(self).__name__} is driven by UniXModel.forward (it needs the routing context)")
        routing = layer_ctx.routing
        batch, seq, hidden = hidden_states.shape
        x_MD = hidden_states.reshape(batch * seq, hidden)  # [B, T, D] -> [B*T, D], row order
        text_ffn, vision_ffn = self.ffn_branches()
        if self.attention_branches()[1] is None:  # shared attention; the FFN may still be routed (MoE)
            x_MD = x_MD + self._shared_attention(x_MD, layer_ctx, past_key_values)
            x_MD = x_MD + routing.route(x_MD, text_ffn, vision_ffn)
            return x_MD.view(batch, seq, hidden)
        # modality-separated layer: one gather in, one scatter out; concat order (text rows, then vision) inside
        xc_MD = routing.rows_to_concat(x_MD)
        xc_MD = xc_MD + self._separated_attention(xc_MD, layer_ctx, past_key_values)
        xc_MD = xc_MD + routing.branch(xc_MD, text_ffn, vision_ffn)
        return routing.concat_to_rows(xc_MD).view(batch, seq, hidden)

    def _qkv(self, branch: torch.nn.Module):
        """``x -> [q | k | v]`` of one branch (its input norm, or this layer's where the branch has none; its
        projections and, on Qwen3, its q/k head norms)."""
        norm = getattr(branch, "input_layernorm", self.input_layernorm)

        def project(x_MD: torch.Tensor) -> torch.Tensor:
            h_MD = norm(x_MD)
            attn = branch.self_attn
            q_MF, k_MF, v_MF = attn.q_proj(h_MD), attn.k_proj(h_MD), attn.v_proj(h_MD)
            if isinstance(attn, Qwen3Attention):
                # Qwen3: RMSNorm over each head's channels, before RoPE, with this branch's own norm weights
                q_MF = attn.q_norm(q_MF.unflatten(-1, (-1, attn.head_dim))).flatten(-2)  # [M, H*d] -> [M, H, d] -> back
                k_MF = attn.k_norm(k_MF.unflatten(-1, (-1, attn.head_dim))).flatten(-2)
            return torch.cat([q_MF, k_MF, v_MF], dim=-1)
        return project

    def _shared_attention(self, x_MD, ctx: LayerContext, past_key_values) -> torch.Tensor:
        out_MF = self._attend_rows(self._qkv(self)(x_MD), ctx, past_key_values)
        return self.self_attn.o_proj(out_MF)

    def _separated_attention(self, xc_MD, ctx: LayerContext, past_key_values) -> torch.Tensor:
        """Attention sublayer of a separated/MoT layer; input and output in concat order."""
        routing = ctx.routing
        text, vision = self.attention_branches()
        qkv_c = routing.branch(xc_MD, self._qkv(text), self._qkv(vision))
        if ctx.use_varlen and self.same_modality_only:
            # packed row, own-modality attention: (modality, document) segments are contiguous in concat order
            out_c = self._attend(qkv_c, 1, routing.seq, ctx.position_embeddings_concat, None, None,
                                 routing.modality_segments.kwargs())
        else:
            out_c = routing.rows_to_concat(self._attend_rows(routing.concat_to_rows(qkv_c), ctx, past_key_values))
        vision_o_proj = getattr(vision.self_attn, "o_proj", text.self_attn.o_proj)  # absent: shared (reference MoT)
        return routing.branch(out_c, text.self_attn.o_proj, vision_o_proj)

    def _attend_rows(self, qkv_MF, ctx: LayerContext, past_key_values) -> torch.Tensor:
        """Attention over row-ordered tokens: the documents (varlen) or the explicit mask of this layer's kind."""
        routing = ctx.routing
        if ctx.use_varlen:
            return self._attend(qkv_MF, routing.batch, routing.seq, ctx.position_embeddings, None, None,
                                routing.docs.kwargs())
        mask = ctx.mask_same_modality if self.same_modality_only else ctx.mask_document
        return self._attend(qkv_MF, routing.batch, routing.seq, ctx.position_embeddings, mask, past_key_values, {})

    def _attend(self, qkv_MF, batch, seq, position_embeddings, mask, past_key_values, varlen_kwargs) -> torch.Tensor:
        """RoPE, cache update and the configured attention function; ``[B*T, (H+2K)*d] -> [B*T, H*d]``."""
        attn = self.self_attn
        head_dim = attn.head_dim
        n_q = self.config.num_attention_heads * head_dim
        n_kv = self.config.num_key_value_heads * head_dim
        q_MF, k_MF, v_MF = qkv_MF.split([n_q, n_kv, n_kv], dim=-1)
        shape = (batch, seq, -1, head_dim)
        query_BHTD = q_MF.reshape(shape).transpose(1, 2)  # [B*T, H*d] -> [B, H, T, d]
        key_BKTD = k_MF.reshape(shape).transpose(1, 2)
        value_BKTD = v_MF.reshape(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_BHTD, key_BKTD = apply_rotary_pos_emb(query_BHTD, key_BKTD, cos, sin)
        if past_key_values is not None:
            key_BKTD, value_BKTD = past_key_values.update(key_BKTD, value_BKTD, self.layer_idx)
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        out_BTHd, _ = interface(attn, query_BHTD, key_BKTD, value_BKTD, mask,
                                dropout=attn.attention_dropout if self.training else 0.0, scaling=attn.scaling,
                                **varlen_kwargs)
        return out_BTHd.reshape(batch * seq, n_q)  # [B, T, H, d] -> [B*T, H*d]


class SeparatedDecoderLayer(SharedDecoderLayer):
    """Uni-X two-end layer: a parallel stock vision layer of the backbone (own attention projections, norms, FFN of
    ``config.separated_vision_ffn_size``); attention visibility follows ``config.all_modal_visible``."""

    def __init__(self, config: UniXConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.vision = stock_decoder_layer(config, self.vision_ffn_width(config), layer_idx)
        self.same_modality_only = not config.all_modal_visible

    @staticmethod
    def vision_ffn_width(config: UniXConfig) -> int:
        """The vision layer's FFN width (MoT overrides: its vision FFN is always ``ffn_vision_size``)."""
        return config.separated_vision_ffn_size

    def attention_branches(self):
        return self, self.vision

    def ffn_branches(self):
        return ((lambda h: self.mlp(self.post_attention_layernorm(h))),
                (lambda h: self.vision.mlp(self.vision.post_attention_layernorm(h))))


__all__ = ["ffn_config", "stock_decoder_layer", "stock_mlp", "STOCK_DECODER_LAYERS", "LayerContext",
           "SharedDecoderLayer", "SeparatedDecoderLayer"]
