"""The Uni-X model family on Qwen2 or Qwen3: one CausalLM class whose layers are chosen per ``config.layer_kinds``.

What differs from transformers' Qwen2 (everything else is inherited):
- Layers are built from the stock decoder layer of ``config.backbone`` (``Qwen2DecoderLayer`` or
  ``Qwen3DecoderLayer``, same parameter names, so a Qwen2/Qwen3 checkpoint loads into the text path; the final norm
  and RoPE tables are the same modules in both families).
  A ``separated`` (Uni-X) or ``mot`` layer additionally owns ``vision``: a second stock decoder layer whose
  submodules (norms, q/k/v/o, FFN of ``ffn_vision_size``) process the vision tokens (a reference-style MoT
  vision branch has no norms or o_proj: the layer's own serve every token). A ``moe`` layer owns only a
  ``vision_mlp``; a ``share_ffn`` layer (``add_share_ffn=1``) a ``vision_mlp`` and a ``share_mlp`` for every token. One forward serves every kind: gather -> branch -> scatter through `ModalityRouting`, whose index
  tensors are built once per batch in `UniXModel.forward`.
- Attention inside a layer (all kinds):
    1. each token is normed and projected to q/k/v by ITS modality's branch (gathered rows only);
    2. q/k/v are scattered back to row order, RoPE uses the global ``position_ids``, the KV cache stores row order;
    3. attention runs in row order over the document (``all_modal_visible=1``, MoT, shared layers) or, in a
       Uni-X separated layer with ``all_modal_visible=0``, only over same-modality keys of the document: on packed
       rows by reordering into (modality, document) segments ("concat order", see `modeling.modality`), otherwise
       with an explicit same-modality mask (the key modality of cached tokens lives in one extra cache slot);
    4. each token's attention output goes through ITS modality's o_proj, then its modality's norm + FFN (where the
       branch has one of its own).
  So with ``all_modal_visible=1`` a text query attends to vision keys projected by the vision k/v (and vice versa):
  each token is represented in attention the way its own branch sees it, and every branch's parameters are used
  only on its own tokens.
- Packed rows: ``cu_seq_lens_q/k`` + ``max_length_q/k`` + ``position_ids`` restarting per document, no mask.
  Masks are built here (not by transformers' ``create_causal_mask``) from the explicit boundaries, for the
  implementations that need them (eager, sdpa, decoding); varlen implementations get the boundaries instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2ForCausalLM,
    Qwen2Model,
    Qwen2PreTrainedModel,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from modeling.attention import VARLEN_IMPLEMENTATIONS
from modeling.configuration_uni_x import LegacyUniXConfig, UniXConfig
from modeling.layer_registry import layer_class
from modeling.layers import LayerContext, SharedDecoderLayer
from modeling.modality import ModalityRouting, build_attention_masks, vision_token_mask


class UniXPreTrainedModel(Qwen2PreTrainedModel):
    config_class = UniXConfig
    config: UniXConfig
    _no_split_modules = ["SharedDecoderLayer", "SeparatedDecoderLayer", "MoTDecoderLayer", "MoEDecoderLayer",
                         "ShareFFNDecoderLayer"]
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
            hidden_states = layer(hidden_states, layer_ctx=ctx, past_key_values=past_key_values, **kwargs)
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


@dataclass
class UniXCausalLMOutput(CausalLMOutputWithPast):
    """``CausalLMOutputWithPast`` plus the final (normed) hidden states, set only with ``skip_logits=True``."""

    last_hidden_state: torch.FloatTensor | None = None


class UniXForCausalLM(UniXPreTrainedModel, Qwen2ForCausalLM):
    """Qwen2ForCausalLM with a `UniXModel` inside; forward, loss, generate and tied embeddings are inherited."""

    def __init__(self, config: UniXConfig):
        UniXPreTrainedModel.__init__(self, config)
        self.model = UniXModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        skip_logits: bool = False,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Qwen2's forward; ``skip_logits=True`` returns ``last_hidden_state`` and no logits (nor loss), for a loss
        that applies ``lm_head`` chunk by chunk (``uni_arch/train/chunked_loss.py``): at a 160k vocabulary the
        logits of a training row are the largest tensor of the step. A flag of this forward rather than a call of
        ``self.model``, so that DDP/accelerate wrappers see the call. The signature is Qwen2's, spelled out:
        ``generate`` reads it (``logits_to_keep``)."""
        inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
        if not skip_logits:
            return super().forward(labels=labels, logits_to_keep=logits_to_keep, **inputs)
        if labels is not None:
            raise ValueError("skip_logits=True computes no loss (it returns the hidden states for the caller's "
                             "loss): pass labels=None")
        outputs = self.model(**inputs)
        return UniXCausalLMOutput(last_hidden_state=outputs.last_hidden_state, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states, attentions=outputs.attentions)


class LegacyUniXForCausalLM(UniXForCausalLM):
    """`UniXForCausalLM` for checkpoints saved with the pre-rename ``model_type="unix_qwen2"`` (Auto classes)."""

    config_class = LegacyUniXConfig


class LegacyUniXModel(UniXModel):
    config_class = LegacyUniXConfig


__all__ = ["UniXPreTrainedModel", "UniXModel", "UniXForCausalLM", "LegacyUniXForCausalLM", "LegacyUniXModel"]
