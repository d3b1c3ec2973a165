"""Modality routing shared by every variant: the one definition of a vision token, the routing indices built once
per batch, gather -> branch -> scatter, and the explicit attention masks of the reference (eager/sdpa) path.

Layout of a batch inside a layer: hidden states are flattened to ``x_MD`` with ``M = B * T`` (batch-major).
"Concat order" is a permutation of the flat rows: all text tokens in row order, then all vision tokens in row
order. A modality-separated layer permutes its input into concat order ONCE, runs each branch on its contiguous
slice (never both branches on every token and a mask), and permutes back once at the end; a layer that only routes
its FFN (MoE) does the same around the FFN. Permutations use a gather in both directions (`_Permute`): the backward
of ``index_select`` would be a scatter-add, much slower on CPU. Concat order is also the order in which a packed
row splits into contiguous (modality, document) segments, which is what attention needs when a separated layer
only sees its own modality (``all_modal_visible=0``).

Document boundaries come only from ``cu_seq_lens`` (DESIGN.md section 4): never from position jumps, because a
gathered modality has position jumps that are not document starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from modeling.vocab import CodeVocab


def vision_token_mask(input_ids_BT: torch.Tensor, vocab: CodeVocab) -> torch.Tensor:
    """Bool mask of vision tokens: ``<|vision_start|>``, size tags and image codes (``CodeVocab.is_vision_id``, the
    one definition, shared with the samples' ``modality``); ``<|vision_end|>`` and everything else is text."""
    return vocab.is_vision_id(input_ids_BT)


@dataclass(frozen=True)
class Segments:
    """Contiguous causal segments of a packed row: ``cu_seq_lens_S1`` (int32, device) and the same bounds as Python
    ints (``bounds``) so that per-segment loops do not synchronise with the device once per layer."""

    cu_seq_lens_S1: torch.Tensor
    bounds: tuple[int, ...]
    max_len: int

    @classmethod
    def from_lengths(cls, lengths: list[int], device: torch.device) -> "Segments":
        lengths = [n for n in lengths if n > 0]
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        return cls(cu, tuple(bounds), max(lengths, default=0))

    def kwargs(self) -> dict:
        """The varlen keyword arguments transformers' attention functions understand (plus our ``seq_bounds``)."""
        return {
            "cu_seq_lens_q": self.cu_seq_lens_S1,
            "cu_seq_lens_k": self.cu_seq_lens_S1,
            "max_length_q": self.max_len,
            "max_length_k": self.max_len,
            "seq_bounds": self.bounds,
        }


@dataclass(frozen=True)
class ModalityRouting:
    """Routing indices of one batch, built once in the model's forward and read by every layer.

    Attributes:
        batch, seq: ``B`` and ``T`` of the current forward (``M = B * T`` flat rows).
        vision_BT: bool, True for vision tokens.
        text_idx_N / vision_idx_V: flat row indices (into ``M``) of text / vision tokens, in row order.
        concat_idx_M: ``cat([text_idx_N, vision_idx_V])``: concat position -> flat row.
        flat_to_concat_M: inverse permutation: flat row -> concat position.
        docs: packed rows only: the documents (from ``cu_seq_lens``), in row order.
        modality_segments: packed rows only: (modality, document) segments in concat order, text first.
    """

    batch: int
    seq: int
    vision_BT: torch.Tensor
    text_idx_N: torch.Tensor
    vision_idx_V: torch.Tensor
    concat_idx_M: torch.Tensor
    flat_to_concat_M: torch.Tensor
    docs: Segments | None
    modality_segments: Segments | None

    @classmethod
    def build(cls, vision_BT: torch.Tensor, cu_seq_lens: torch.Tensor | None = None) -> "ModalityRouting":
        batch, seq = vision_BT.shape
        vision_M = vision_BT.reshape(-1)
        text_idx_N = torch.nonzero(~vision_M).squeeze(1)
        vision_idx_V = torch.nonzero(vision_M).squeeze(1)
        concat_idx_M = torch.cat([text_idx_N, vision_idx_V])
        flat_to_concat_M = torch.empty_like(concat_idx_M)
        flat_to_concat_M[concat_idx_M] = torch.arange(concat_idx_M.numel(), device=concat_idx_M.device)
        docs = modality_segments = None
        if cu_seq_lens is not None:
            bounds = [int(b) for b in cu_seq_lens.tolist()]  # one host sync per batch, not per layer
            device = vision_BT.device
            docs = Segments.from_lengths([e - s for s, e in zip(bounds[:-1], bounds[1:])], device)
            # (modality, document) segment lengths: text segments of every document, then vision segments.
            # Vision tokens per document from a prefix sum read at the boundaries (one small host copy).
            vision_before = F.pad(vision_M.long().cumsum(0), (1, 0))[cu_seq_lens.long()].tolist()
            vision_lens = [b - a for a, b in zip(vision_before[:-1], vision_before[1:])]
            text_lens = [e - s - v for s, e, v in zip(bounds[:-1], bounds[1:], vision_lens)]
            modality_segments = Segments.from_lengths(text_lens + vision_lens, device)
        return cls(batch, seq, vision_BT, text_idx_N, vision_idx_V, concat_idx_M, flat_to_concat_M, docs,
                   modality_segments)

    @property
    def is_packed(self) -> bool:
        return self.docs is not None

    @property
    def num_text(self) -> int:
        return self.text_idx_N.numel()

    @property
    def one_modality(self) -> bool:
        """Every token of the batch is text, or every one is vision: concat order is row order (a decoding step
        drawing an image, a text-only batch)."""
        return self.num_text in (0, self.batch * self.seq)

    def rows_to_concat(self, x_MF: torch.Tensor) -> torch.Tensor:
        """Row order -> concat order (a permutation of the flat rows)."""
        if self.one_modality:
            return x_MF
        return _Permute.apply(x_MF, self.concat_idx_M, self.flat_to_concat_M)

    def concat_to_rows(self, x_MF: torch.Tensor) -> torch.Tensor:
        """Concat order -> row order."""
        if self.one_modality:
            return x_MF
        return _Permute.apply(x_MF, self.flat_to_concat_M, self.concat_idx_M)

    def branch(
        self,
        x_MF: torch.Tensor,
        text_fn: Callable[[torch.Tensor], torch.Tensor],
        vision_fn: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Run each branch on its own rows of a concat-ordered tensor (text rows first); concat order out.

        While gradients are recorded, a branch with no tokens still runs on its empty slice, so its parameters stay
        in the autograd graph and receive a (zero) gradient: DDP/ZeRO all-reduce every parameter on every rank
        (DESIGN.md section 9). Without gradients (inference) it is skipped: a decoding step drawing an image has
        no text token, and the empty branch's dozen small ops were ~10% of a tiny model's step.
        """
        if self.one_modality and not torch.is_grad_enabled():
            return (text_fn if self.num_text else vision_fn)(x_MF)
        # split, not x[:n] / x[n:]: each slice's backward would build a full-size zero gradient (see attention.py)
        text_MF, vision_MF = x_MF.split([self.num_text, x_MF.shape[0] - self.num_text], dim=0)
        return torch.cat([text_fn(text_MF), vision_fn(vision_MF)], dim=0)

    def route(
        self,
        x_MF: torch.Tensor,
        text_fn: Callable[[torch.Tensor], torch.Tensor],
        vision_fn: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> torch.Tensor:
        """Gather -> branch -> scatter on row-ordered rows. ``vision_fn=None`` means one shared branch."""
        if vision_fn is None:
            return text_fn(x_MF)
        return self.concat_to_rows(self.branch(self.rows_to_concat(x_MF), text_fn, vision_fn))


class _Permute(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` whose backward is the inverse gather ``grad[inverse]``.

    Why not plain ``index_select``: its backward is a scatter-add (``index_add_``), several times slower on CPU
    than a gather; for a permutation the inverse gather is exact.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def build_attention_masks(
    routing: ModalityRouting,
    key_vision_BS: torch.Tensor,
    past_len: int,
    attention_mask_BS: torch.Tensor | None,
    dtype: torch.dtype,
    same_modality: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Explicit additive masks ``[B, 1, T, S]`` for eager/sdpa and for decoding (exact, slower than varlen).

    Returns ``(mask_document, mask_same_modality)``; the second is ``None`` unless ``same_modality``. Packed rows
    use the documents of ``routing``; ordinary batches are causal with ``past_len`` cached keys and an optional 2-D
    padding mask over all ``S = past_len + T`` keys. Masked entries use the dtype's minimum, not ``-inf``, so that a
    fully masked padding query yields finite values instead of NaN.
    """
    device = key_vision_BS.device
    q_pos_T = torch.arange(routing.seq, device=device) + past_len
    k_pos_S = torch.arange(key_vision_BS.shape[1], device=device)
    allowed_BTS = (k_pos_S[None, :] <= q_pos_T[:, None])[None]
    if routing.docs is not None:
        doc_T = torch.searchsorted(routing.docs.cu_seq_lens_S1[1:], torch.arange(routing.seq, device=device),
                                   right=True)
        allowed_BTS = allowed_BTS & (doc_T[:, None] == doc_T[None, :])[None]
    if attention_mask_BS is not None:
        allowed_BTS = allowed_BTS & attention_mask_BS[:, None, :].bool()
    min_value = torch.finfo(dtype).min

    def additive(a_BTS: torch.Tensor) -> torch.Tensor:
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(a_BTS, zero, torch.full((), min_value, dtype=dtype, device=device))[:, None]

    mask_same = None
    if same_modality:
        same_BTS = routing.vision_BT[:, :, None] == key_vision_BS[:, None, :].bool()
        mask_same = additive(allowed_BTS & same_BTS)
    return additive(allowed_BTS), mask_same


__all__ = ["vision_token_mask", "Segments", "ModalityRouting", "build_attention_masks"]
