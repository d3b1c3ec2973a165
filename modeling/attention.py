"""Attention on packed rows that is fast on CPU and exact everywhere (DESIGN.md section 9).

Why a custom attention function: on CPU, ``F.scaled_dot_product_attention`` with an explicit mask takes a slow
path, and a block-diagonal mask over a packed row pays attention over the whole row (measured on a tiny Qwen2 with
a Uni-X-like length mix, fwd+bwd tokens/s on 2 cores: padded ~840, ``DataCollatorWithFlattening`` + sdpa ~730, one
causal sdpa per document ~1,600). So the packed path loops over the explicit segments (documents, or
(document, modality) segments in Uni-X separated layers with ``all_modal_visible=0``) and calls sdpa with
``is_causal=True`` and no mask. On CUDA with ``flash-attn`` installed it calls ``flash_attn_varlen_func`` with the
same ``cu_seq_lens`` instead. flash-attn only computes in fp16/bf16: fp32 q/k/v (an fp32 model under bf16 autocast,
where RoPE's fp32 tables upcast q/k) are cast to the half dtype transformers' flash integration would choose and the
output is cast back; an fp32 model without autocast keeps the exact sdpa loop (`flash_plan` decides, tested on CPU).

Registered names (``model.set_attn_implementation(name)`` or ``from_pretrained(..., attn_implementation=name)``):
    ``uni_x_packed``  varlen path on packed rows (flash-attn varlen on CUDA when installed, else the per-segment sdpa
                     loop); without ``cu_seq_lens`` (padded batches, decoding) it is sdpa with the explicit mask.
    ``uni_x_fa_varlen``   the same but REQUIRES flash-attn: a clear ImportError naming the package and the fallback.
The stock ``eager`` and ``sdpa`` implementations stay exact on packed rows through explicit block-diagonal masks built
by the model (`modeling.modality.build_attention_masks`); tests use them as the reference.
"""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F
from loguru import logger
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

PACKED_ATTENTION = "uni_x_packed"
# No "flash" in the name: transformers treats any implementation name containing "flash" as a hub kernel request
# (utils.generic.is_flash_attention_requested) and fails before our function is ever called.
FLASH_ATTENTION = "uni_x_fa_varlen"
# implementations that consume cu_seq_lens directly (no mask is built for them on packed rows)
VARLEN_IMPLEMENTATIONS = frozenset({PACKED_ATTENTION, FLASH_ATTENTION, "flash_attention_2", "flash_attention_3"})


@functools.cache
def flash_attn_installed() -> bool:
    """Looked up once per process: it is asked in every layer of every forward on CUDA."""
    return importlib.util.find_spec("flash_attn") is not None


@functools.cache
def _warn_once(message: str) -> None:
    """One warning per distinct message and process (the attention function runs in every layer of every forward)."""
    logger.warning(message)


HALF_DTYPES = (torch.float16, torch.bfloat16)


def flash_plan(
    device_type: str,
    dtype: torch.dtype,
    flash_available: bool,
    autocast_dtype: torch.dtype | None,
    weight_dtype: torch.dtype,
    required: bool = False,
) -> tuple[Literal["flash", "sdpa"], torch.dtype | None]:
    """Which kernel runs a packed row, and the dtype q/k/v must be cast to for it: ``("flash", cast_dtype or None)``
    or ``("sdpa", None)``. Pure, so that the GPU decision is tested on CPU.

    flash-attn computes only in fp16/bf16 and fails on fp32 inputs. The cast target for fp32 inputs follows
    transformers' flash integration (``integrations.flash_attention.get_target_dtype``): the autocast dtype when
    autocast is on, else the dtype of the layer's weights. Where neither is a half dtype (an fp32 model, no autocast)
    the caller asked for fp32 numerics, so we keep the exact sdpa loop rather than silently compute in bf16; with
    ``required`` (``uni_x_fa_varlen``) that is an error instead.

    >>> flash_plan("cuda", torch.float32, True, torch.bfloat16, torch.float32)
    ('flash', torch.bfloat16)
    >>> flash_plan("cuda", torch.float32, True, None, torch.float32)
    ('sdpa', None)
    """
    if device_type != "cuda" or not flash_available:
        return "sdpa", None
    if dtype in HALF_DTYPES:
        return "flash", None
    target = autocast_dtype if autocast_dtype is not None else weight_dtype
    if dtype == torch.float32 and target in HALF_DTYPES:
        return "flash", target
    if required:
        raise ValueError(
            f"attn_implementation={FLASH_ATTENTION!r}: flash-attn computes in float16/bfloat16 only, got {dtype} "
            f"inputs with {weight_dtype} weights and autocast dtype {autocast_dtype}. Load the model with "
            f"dtype=torch.bfloat16, train with bf16/fp16 autocast, or use attn_implementation={PACKED_ATTENTION!r} "
            "(exact fp32 sdpa loop)"
        )
    return "sdpa", None


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """The layer's compute dtype as transformers reads it: the quantisation dtype, else the first Linear's weights."""
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "_is_quantized"):
        return config.dtype
    return next(m for m in module.modules() if isinstance(m, torch.nn.Linear)).weight.dtype


def _flash_varlen(query_BHTD, key_BKTD, value_BKTD, scaling, dropout, cu_seq_lens, max_len) -> torch.Tensor:
    """flash-attn varlen over the packed row; imported here only (never at module top: CPU installs lack it)."""
    from flash_attn import flash_attn_varlen_func

    out_THD = flash_attn_varlen_func(
        query_BHTD[0].transpose(0, 1),  # [H, T, D] -> [T, H, D]
        key_BKTD[0].transpose(0, 1),
        value_BKTD[0].transpose(0, 1),
        cu_seq_lens, cu_seq_lens, max_len, max_len,
        dropout_p=dropout, softmax_scale=scaling, causal=True,
    )
    return out_THD[None]  # [1, T, H, D]


def _sdpa_segment_loop(query_BHTD, key_BKTD, value_BKTD, scaling, dropout, bounds) -> torch.Tensor:
    """One causal sdpa per segment, no mask: the fast CPU path. Returns ``[1, T, H, D]``."""
    gqa = query_BHTD.shape[1] != key_BKTD.shape[1]
    # torch.split, not q[:, :, start:end]: a slice's backward writes its gradient into a fresh full-length zero
    # tensor that is then summed into q's gradient, once per segment (O(segments x T) memory traffic, ~15% of a
    # packed training step on CPU); split's backward is one cat. Same values, bit for bit.
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    pieces = zip(*(t.split(lengths, dim=2) for t in (query_BHTD, key_BKTD, value_BKTD))) if lengths else ()
    outs = [
        F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
        for q, k, v in pieces
    ]
    if not outs:  # an empty slice (e.g. no tokens at all): keep shapes and the graph
        return query_BHTD.transpose(1, 2) * 0
    return torch.cat(outs, dim=2).transpose(1, 2)  # [1, H, T, D] -> [1, T, H, D]


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    seq_bounds: tuple[int, ...] | None = None,
    require_flash: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """`AttentionInterface` function: varlen on packed rows, masked sdpa otherwise. Shapes follow transformers:
    ``query [B, H, T, D]``, ``key/value [B, KV, S, D]``, returns ``([B, T, H, D], None)``."""
    if require_flash and not flash_attn_installed():
        raise ImportError(
            f"attn_implementation={FLASH_ATTENTION!r} needs the `flash-attn` package (CUDA only: "
            f"pip install -r requirements-gpu.txt). Use attn_implementation={PACKED_ATTENTION!r} instead: it falls back to a per-document "
            "sdpa loop when flash-attn is missing."
        )
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout)
    if query.shape[0] != 1 or key.shape[2] != query.shape[2]:
        raise ValueError(
            f"packed attention expects one packed row without cached keys, got {tuple(query.shape)=} "
            f"{tuple(key.shape)=}"
        )
    device_type = query.device.type
    path, cast = flash_plan(device_type, query.dtype, flash_attn_installed(), _autocast_dtype(device_type),
                            _weight_dtype(module), required=require_flash)
    if path == "flash":
        max_len = max_length_q if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        q, k, v = (query, key, value) if cast is None else (query.to(cast), key.to(cast), value.to(cast))
        return _flash_varlen(q, k, v, scaling, dropout, cu_seq_lens_q.int(), max_len).to(query.dtype), None
    if query.is_cuda and not flash_attn_installed():
        _warn_once("uni_x_packed on CUDA without flash-attn: using the per-document sdpa loop (slower)")
    elif query.is_cuda:
        _warn_once(f"uni_x_packed on CUDA with {query.dtype} inputs, {_weight_dtype(module)} weights and no autocast: "
                   "flash-attn needs fp16/bf16, using the exact per-document sdpa loop (slower)")
    bounds = seq_bounds if seq_bounds is not None else tuple(int(b) for b in cu_seq_lens_q.tolist())
    return _sdpa_segment_loop(query, key, value, scaling, dropout, bounds), None


def flash_required_attention_forward(*args, **kwargs):
    """`uni_x_fa_varlen`: like `packed_attention_forward` but refuses to run without flash-attn."""
    return packed_attention_forward(*args, require_flash=True, **kwargs)


def register_attention_functions() -> None:
    """Register our names with transformers (idempotent; called once by ``modeling/__init__.py``)."""
    AttentionInterface.register(PACKED_ATTENTION, packed_attention_forward)
    AttentionInterface.register(FLASH_ATTENTION, flash_required_attention_forward)


__all__ = [
    "PACKED_ATTENTION",
    "FLASH_ATTENTION",
    "VARLEN_IMPLEMENTATIONS",
    "packed_attention_forward",
    "register_attention_functions",
    "flash_attn_installed",
    "flash_plan",
]
