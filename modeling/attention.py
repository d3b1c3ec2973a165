"""Attention on packed rows that is fast on CPU and exact everywhere (DESIGN.md section 9).

Why a custom attention function: on CPU, ``F.scaled_dot_product_attention`` with an explicit mask takes a slow
path, and a block-diagonal mask over a packed row pays attention over the whole row (measured on a tiny Qwen2 with
a Uni-X-like length mix, fwd+bwd tokens/s on 2 cores: padded ~840, ``DataCollatorWithFlattening`` + sdpa ~730, one
causal sdpa per document ~1,600). So the packed path loops over the explicit segments (documents, or
(document, modality) segments in Uni-X separated layers with ``all_modal_visible=0``) and calls sdpa with
``is_causal=True`` and no mask. On CUDA with ``flash-attn`` installed it calls ``flash_attn_varlen_func`` with the
same ``cu_seq_lens`` instead.

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
def _warn_no_flash_once() -> None:
    logger.warning("uni_x_packed on CUDA without flash-attn: using the per-document sdpa loop (slower)")


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
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        outs.append(F.scaled_dot_product_attention(
            query_BHTD[:, :, start:end], key_BKTD[:, :, start:end], value_BKTD[:, :, start:end],
            dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa,
        ))
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
    if query.is_cuda and flash_attn_installed():
        max_len = max_length_q if max_length_q is not None else int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
        return _flash_varlen(query, key, value, scaling, dropout, cu_seq_lens_q.int(), max_len), None
    if query.is_cuda:
        _warn_no_flash_once()
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
]
