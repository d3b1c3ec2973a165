"""The Uni-X model family on Qwen2: one CausalLM class whose layers are chosen per ``config.layer_kinds``.

What differs from transformers' Qwen2 (everything else is inherited):
- Layers are stock ``Qwen2DecoderLayer``s (same parameter names, so a Qwen2 checkpoint loads into the text path).
  A ``separated`` (Uni-X) or ``mot`` layer additionally owns ``vision``: a second stock ``Qwen2DecoderLayer`` whose
  submodules (norms, q/k/v/o, FFN of ``ffn_vision_size``) process the vision tokens. A ``moe`` layer owns only a
  ``vision_mlp``. One forward serves every kind: gather -> branch -> scatter through `ModalityRouting`, whose index
  tensors are built once per batch in `UniXModel.forward`.
- Attention inside a layer (all kinds):
    1. each token is normed and projected to q/k/v by ITS modality's branch (gathered rows only);
    2. q/k/v are scattered back to row order, RoPE uses the global ``position_ids``, the KV cache stores row order;
    3. attention runs in row order over the document (``all_modal_visible=1``, MoT, shared layers) or, in a
       Uni-X separated layer with ``all_modal_visible=0``, only over same-modality keys of the document: on packed
       rows by reordering into (modality, document) segments ("concat order", see `modeling.modality`), otherwise
       with an explicit same-modality mask (the key modality of cached tokens lives in one extra cache slot);
    4. each token's attention output goes through ITS modality's o_proj, then its modality's norm + FFN.
  So with ``all_modal_visible=1`` a text query attends to vision keys projected by the vision k/v (and vice versa):
  each token is represented in attention the way its own branch sees it, and every branch's parameters are used
  only on its own tokens.
- Packed rows: ``cu_seq_lens_q/k`` + ``max_length_q/k`` + ``position_ids`` restarting per document, no mask.
  Masks are built here (not by transformers' ``create_causal_mask``) from the explicit boundaries, for the
  implementations that need them (eager, sdpa, decoding); varlen implementations get the boundaries instead.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn
from transformers import Qwen2Config
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2ForCausalLM,
    Qwen2MLP,
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from modeling.attention import VARLEN_IMPLEMENTATIONS
from modeling.configuration_unix import UniXConfig
from modeling.modality import ModalityRouting, build_attention_masks, vision_token_mask


def ffn_config(config: Qwen2Config, intermediate_size: int) -> Qwen2Config:
    """A shallow copy of ``config`` with another FFN width, for building a stock layer/MLP of that width."""
    cfg = copy.copy(config)
    cfg.__dict__["intermediate_size"] = intermediate_size
    return cfg


@dataclass
class LayerContext:
    """Everything a layer needs about the current batch, computed once in `UniXModel.forward`."""

    routing: ModalityRouting
    position_embeddings: tuple[torch.Tensor, torch.Tensor]  # cos, sin: [B, T, head_dim], row order
    position_embeddings_concat: tuple[torch.Tensor, torch.Tensor] | None  # packed rows, concat order
    mask_document: torch.Tensor | None  # [B, 1, T, S] additive, None on the varlen path
    mask_same_modality: torch.Tensor | None
    use_varlen: bool  # packed row + an implementation that consumes cu_seq_lens


class SharedDecoderLayer(Qwen2DecoderLayer):
    """A stock Qwen2 layer for every token; the base of the other kinds, which override the branch hooks."""

    same_modality_only = False

    def __init__(self, config: UniXConfig, layer_idx: int):
        super().__init__(ffn_config(config, config.share_ffn_size), layer_idx)
        self.config = config  # the model's own config object: follows set_attn_implementation
        self.layer_idx = layer_idx

    # -- branch hooks: the vision side returns None for "shared with text"
    def attention_branches(self) -> tuple[Qwen2DecoderLayer, Qwen2DecoderLayer | None]:
        """Modules owning ``input_layernorm`` and ``self_attn`` for text and vision tokens."""
        return self, None

    def ffn_branches(self):
        """Callables ``h -> FFN(post_attention_layernorm(h))`` for text and vision tokens."""
        return (lambda h: self.mlp(self.post_attention_layernorm(h))), None

    def forward(
        self,
        hidden_states: torch.Tensor,
        unix_ctx: LayerContext | None = None,
        past_key_values: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if unix_ctx is None:
            raise ValueError(f"{type(self).__name__} is driven by UniXModel.forward (it needs the routing context)")
        routing = unix_ctx.routing
        batch, seq, hidden = hidden_states.shape
        x_MD = hidden_states.reshape(batch * seq, hidden)  # [B, T, D] -> [B*T, D], row order
        text_ffn, vision_ffn = self.ffn_branches()
        if self.attention_branches()[1] is None:  # shared attention; the FFN may still be routed (MoE)
            x_MD = x_MD + self._shared_attention(x_MD, unix_ctx, past_key_values)
            x_MD = x_MD + routing.route(x_MD, text_ffn, vision_ffn)
            return x_MD.view(batch, seq, hidden)
        # modality-separated layer: one gather in, one scatter out; concat order (text rows, then vision) inside
        xc_MD = routing.rows_to_concat(x_MD)
        xc_MD = xc_MD + self._separated_attention(xc_MD, unix_ctx, past_key_values)
        xc_MD = xc_MD + routing.branch(xc_MD, text_ffn, vision_ffn)
        return routing.concat_to_rows(xc_MD).view(batch, seq, hidden)

    @staticmethod
    def _qkv(branch: Qwen2DecoderLayer):
        """``x -> [q | k | v]`` of one branch (its input norm and projections)."""
        def project(x_MD: torch.Tensor) -> torch.Tensor:
            h_MD = branch.input_layernorm(x_MD)
            attn = branch.self_attn
            return torch.cat([attn.q_proj(h_MD), attn.k_proj(h_MD), attn.v_proj(h_MD)], dim=-1)
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
        return routing.branch(out_c, text.self_attn.o_proj, vision.self_attn.o_proj)

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
    """Uni-X two-end layer: a parallel stock vision layer (own attention projections, norms, FFN of
    ``ffn_vision_size``); attention visibility follows ``config.all_modal_visible``."""

    def __init__(self, config: UniXConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.vision = Qwen2DecoderLayer(ffn_config(config, config.vision_ffn_size), layer_idx)
        self.same_modality_only = not config.all_modal_visible

    def attention_branches(self):
        return self, self.vision

    def ffn_branches(self):
        return ((lambda h: self.mlp(self.post_attention_layernorm(h))),
                (lambda h: self.vision.mlp(self.vision.post_attention_layernorm(h))))


def layer_class(kind: str) -> type[SharedDecoderLayer]:
    """Map a ``layer_kinds`` entry to its layer class (MoT/MoE imported here to keep imports one-way)."""
    from modeling.modeling_moe import MoEDecoderLayer
    from modeling.modeling_mot import MoTDecoderLayer

    classes = {"shared": SharedDecoderLayer, "separated": SeparatedDecoderLayer, "mot": MoTDecoderLayer,
               "moe": MoEDecoderLayer}
    if kind not in classes:
        raise ValueError(f"unknown layer kind {kind!r}; known: {sorted(classes)}")
    return classes[kind]


class UniXPreTrainedModel(Qwen2PreTrainedModel):
    config_class = UniXConfig
    config: UniXConfig
    _no_split_modules = ["SharedDecoderLayer", "SeparatedDecoderLayer", "MoTDecoderLayer", "MoEDecoderLayer"]
    _supports_flex_attn = False  # flex_attention has no CPU backward, and our masks are built here
    _can_compile_fullgraph = False  # routing builds index tensors with data-dependent shapes
    _can_record_outputs = {"hidden_states": SharedDecoderLayer}


class UniXModel(UniXPreTrainedModel, Qwen2Model):
    def __init__(self, config: UniXConfig):
        UniXPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [layer_class(kind)(config, i) for i, kind in enumerate(config.layer_kinds)]
        )
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.has_sliding_layers = False
        self.post_init()

    @property
    def modality_cache_slot(self) -> int:
        """Cache slot after the last layer holding the modality (1.0 = vision) of every cached token."""
        return self.config.num_hidden_layers

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        cu_seq_lens_k: torch.Tensor | None = None,
        max_length_q: int | None = None,
        max_length_k: int | None = None,
        vision_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """Qwen2's forward plus packed rows and modality routing.

        ``vision_mask`` ([B, T] bool) is only needed with ``inputs_embeds`` (no ids to classify).
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        packed = cu_seq_lens_q is not None or cu_seq_lens_k is not None
        if packed and attention_mask is not None:
            # An attention_mask next to explicit boundaries is a bug upstream: transformers treats an all-ones mask
            # as "no packing" and lets documents attend to each other. Packed rows carry cu_seq_lens only.
            raise ValueError(
                "got both attention_mask and cu_seq_lens_q/k: packed rows must not carry an attention_mask (an "
                "all-ones mask silently disables packing); drop the mask, the boundaries come from cu_seq_lens"
            )
        if packed and use_cache:
            # A cache over a packed row would mix documents; Qwen2's default use_cache=True is the usual cause.
            raise ValueError("packed rows (cu_seq_lens) need use_cache=False: a KV cache over several documents is "
                             "meaningless (the Trainer sets it; direct model(**batch) calls must pass it)")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        if vision_mask is None:
            if input_ids is None:
                raise ValueError("inputs_embeds without input_ids needs vision_mask=[B, T] bool (the token modality)")
            vision_mask = vision_token_mask(input_ids, self.config.code_vocab)
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        cu_seq_lens = self._check_packed(cu_seq_lens_q, cu_seq_lens_k, batch, seq, past_len) if packed else None
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be a 2-D padding mask [B, past+T], got {tuple(attention_mask.shape)}")
        position_ids = self._position_ids(position_ids, attention_mask, packed, seq, past_len, inputs_embeds.device)
        ctx = self._layer_context(inputs_embeds, vision_mask, cu_seq_lens, position_ids, attention_mask,
                                  past_key_values, past_len)

        hidden_states = inputs_embeds
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(hidden_states, unix_ctx=ctx, past_key_values=past_key_values, **kwargs)
        hidden_states = self.norm(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, past_key_values=past_key_values if use_cache else None
        )

    @staticmethod
    def _position_ids(position_ids, attention_mask, packed: bool, seq: int, past_len: int, device) -> torch.Tensor:
        if position_ids is None:
            if attention_mask is not None:  # left padding: positions count real tokens only
                return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -seq:]
            return torch.arange(seq, device=device)[None] + past_len
        if not packed and seq > 1 and bool((position_ids[:, 1:] < position_ids[:, :-1]).any()):
            # Restarting positions without boundaries = a flattened batch (e.g. DataCollatorWithFlattening without
            # return_flash_attn_kwargs). Boundaries are never inferred from position jumps, so refuse it here
            # instead of letting its documents attend to each other.
            raise ValueError("position_ids restart inside a row but no cu_seq_lens_q/k were given: pass the document "
                             "boundaries explicitly (e.g. DataCollatorWithFlattening(return_flash_attn_kwargs=True))")
        return position_ids

    def _layer_context(self, inputs_embeds, vision_BT, cu_seq_lens, position_ids, attention_mask, cache,
                       past_len: int) -> LayerContext:
        """Routing indices, RoPE tables and (only where needed) explicit masks: once per forward, for all layers."""
        routing = ModalityRouting.build(vision_BT, cu_seq_lens)
        key_vision_BS = self._key_modality(vision_BT, cache)
        use_varlen = cu_seq_lens is not None and self.config._attn_implementation in VARLEN_IMPLEMENTATIONS
        mask_document = mask_same = None
        if not use_varlen:
            mask_document, mask_same = build_attention_masks(
                routing, key_vision_BS, past_len, attention_mask, inputs_embeds.dtype,
                self.config.has_same_modality_layers,
            )
        cos, sin = self.rotary_emb(inputs_embeds, position_ids)
        concat = None
        if use_varlen and self.config.has_same_modality_layers:  # B == 1: flat index == token index
            concat = (cos.index_select(1, routing.concat_idx_M), sin.index_select(1, routing.concat_idx_M))
        return LayerContext(routing, (cos, sin), concat, mask_document, mask_same, use_varlen)

    @staticmethod
    def _check_packed(cu_q, cu_k, batch: int, seq: int, past_len: int) -> torch.Tensor:
        """Validate the explicit document boundaries of a packed row and return them."""
        if cu_q is None or cu_k is None or not torch.equal(cu_q, cu_k):
            raise ValueError("packed rows need cu_seq_lens_q == cu_seq_lens_k (self-attention over documents)")
        if batch != 1 or past_len:
            raise ValueError(f"packed rows are one row without a KV cache; got batch={batch}, cached={past_len}")
        if cu_q.dim() != 1 or int(cu_q[0]) != 0 or int(cu_q[-1]) != seq or bool((cu_q[1:] < cu_q[:-1]).any()):
            raise ValueError(f"cu_seq_lens must rise from 0 to the row length {seq}, got {cu_q.tolist()}")
        return cu_q

    def _key_modality(self, vision_BT: torch.Tensor, cache: Cache | None) -> torch.Tensor:
        """Modality of every key (cached + current). Only Uni-X layers with ``all_modal_visible=0`` need the cached
        part; it is kept in one extra cache slot so that cache reordering/cropping in ``generate`` applies to it."""
        if cache is None or not self.config.has_same_modality_layers:
            return vision_BT if cache is None else torch.cat(
                [vision_BT.new_zeros(vision_BT.shape[0], cache.get_seq_length()), vision_BT], dim=1)
        slot = self.modality_cache_slot
        while len(cache.layers) <= slot:
            cache.layers.append(DynamicLayer())
        flag_B1T1 = vision_BT[:, None, :, None].float()
        keys, _ = cache.update(flag_B1T1, flag_B1T1, slot)
        return keys[:, 0, :, 0].bool()


class UniXForCausalLM(UniXPreTrainedModel, Qwen2ForCausalLM):
    """Qwen2ForCausalLM with a `UniXModel` inside; forward, loss, generate and tied embeddings are inherited."""

    def __init__(self, config: UniXConfig):
        UniXPreTrainedModel.__init__(self, config)
        self.model = UniXModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = [
    "UniXPreTrainedModel",
    "UniXModel",
    "UniXForCausalLM",
    "SharedDecoderLayer",
    "SeparatedDecoderLayer",
    "LayerContext",
    "layer_class",
]
