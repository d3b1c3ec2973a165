"""The Uni-X model family (dense, Uni-X, MoT, MoE) on transformers' Qwen2, registered with the Auto classes.

Importing ``modeling`` registers ``UniXConfig`` (``model_type="uni_x_qwen2"``) with ``AutoConfig``,
``UniXForCausalLM`` with ``AutoModelForCausalLM``/``AutoModel``, and our attention functions with transformers'
``AttentionInterface``; nothing else happens at import.

Which ``attn_implementation`` to select (the trainer reads this):
    * Packed rows on CPU (training, ``use_data_packing`` 1/2): ``"uni_x_packed"``. It loops over the documents given
      by ``cu_seq_lens`` (and over (document, modality) segments in Uni-X layers with ``all_modal_visible=0``) with
      a causal sdpa and no mask: exact and about 2x faster than a masked sdpa over the packed row on CPU.
    * Packed rows on GPU: ``"uni_x_packed"`` too: it uses ``flash_attn_varlen_func`` when ``flash-attn`` is installed
      (``"uni_x_fa_varlen"`` insists on it and raises if missing), else the same per-document loop.
    * Padded batches, generation, evaluation: any of them; without ``cu_seq_lens`` ``uni_x_packed`` is sdpa with the
      explicit mask. ``"eager"`` / ``"sdpa"`` are exact on packed rows as well (block-diagonal masks, slow: tests use
      them as the reference).
  Set it with ``model.set_attn_implementation("uni_x_packed")`` or ``from_pretrained(..., attn_implementation=...)``.
    * Direct ``model(**packed_batch)`` calls must pass ``use_cache=False`` (a cache makes no sense on packed rows and
      the model raises); the Trainer disables the cache itself.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from modeling.attention import FLASH_ATTENTION, PACKED_ATTENTION, register_attention_functions
from modeling.configuration_uni_x import LegacyUniXConfig, UniXConfig
from modeling.modeling_uni_x import (
    LegacyUniXForCausalLM,
    LegacyUniXModel,
    UniXForCausalLM,
    UniXModel,
    UniXPreTrainedModel,
)

TRAINING_ATTN_IMPLEMENTATION = PACKED_ATTENTION

register_attention_functions()
AutoConfig.register(UniXConfig.model_type, UniXConfig, exist_ok=True)
AutoModel.register(UniXConfig, UniXModel, exist_ok=True)
AutoModelForCausalLM.register(UniXConfig, UniXForCausalLM, exist_ok=True)
# checkpoints saved before the unix -> uni_x rename (model_type "unix_qwen2") still load, with a FutureWarning
AutoConfig.register(LegacyUniXConfig.model_type, LegacyUniXConfig, exist_ok=True)
AutoModel.register(LegacyUniXConfig, LegacyUniXModel, exist_ok=True)
AutoModelForCausalLM.register(LegacyUniXConfig, LegacyUniXForCausalLM, exist_ok=True)


def build_model(config: UniXConfig, attn_implementation: str | None = None) -> UniXForCausalLM:
    """Randomly initialised model for ``config`` (tiny presets, tests); use ``from_pretrained`` for checkpoints."""
    if not isinstance(config, UniXConfig):
        raise TypeError(f"build_model expects a UniXConfig, got {type(config).__name__}")
    model = UniXForCausalLM(config)
    if attn_implementation is not None:
        model.set_attn_implementation(attn_implementation)
    return model


__all__ = [
    "UniXConfig",
    "UniXModel",
    "UniXForCausalLM",
    "UniXPreTrainedModel",
    "build_model",
    "PACKED_ATTENTION",
    "FLASH_ATTENTION",
    "TRAINING_ATTN_IMPLEMENTATION",
]
