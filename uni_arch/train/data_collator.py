"""Rows -> model batches: one flattened packed row (modes 1 and 2) or a padded batch (mode 0).

A *row* (what the dataset yields) is a dict::

    {"input_ids": [...], "labels": [...], "doc_lens": [n_0, n_1, ...], "sample_ids": ["id", ...]}

``labels`` are aligned with ``input_ids`` (``-100`` = no loss), ``doc_lens`` are the lengths of the documents
(whole samples or pieces of a split one) in the row, in order.

Packed output (the contract of DESIGN.md section 4; every row of the batch is flattened into ONE row)::

    input_ids      [1, T]   the documents back to back
    position_ids   [1, T]   restarting at 0 at every document
    cu_seq_lens_q  [D+1]    int32 document boundaries (= cu_seq_lens_k)
    max_length_q   int      longest document (= max_length_k)
    labels         [1, T]   with -100 at every document START

Why -100 at every start: the model's loss shifts over the flattened row, so position ``s`` (a document's first
token) would be the target of position ``s - 1``, the last token of the *previous* document. A cross-document
prediction is noise, so its label is masked.

Why there is never an ``attention_mask`` on a packed row: transformers treats an all-ones mask as "no padding" and
builds a plain causal mask over the whole row, so documents silently attend to each other (DESIGN.md section 9).
The collator raises instead of emitting one.

Both outputs also carry ``num_real_tokens`` and ``num_capacity_tokens`` (0-dim tensors) for the token-utilisation
metric, and ``sample_ids`` (a list) for data-order checks; the trainer pops them before the forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from modeling.vocab import IGNORE_INDEX

META_KEYS = ("num_real_tokens", "num_capacity_tokens", "sample_ids")


def _doc_lens(row: dict[str, Any]) -> list[int]:
    lens = [int(n) for n in row.get("doc_lens") or [len(row["input_ids"])]]
    if sum(lens) != len(row["input_ids"]) or len(row["labels"]) != len(row["input_ids"]) or min(lens) <= 0:
        raise ValueError(
            f"collator: row with {len(row['input_ids'])} input_ids, {len(row['labels'])} labels and "
            f"doc_lens={lens} is inconsistent (doc_lens must be positive and sum to the row length)"
        )
    return lens


def packed_row_labels(row: dict[str, Any]) -> torch.Tensor:
    """A packed row's labels as trained: no target at any document start (no prediction across a boundary)."""
    labels = torch.as_tensor(row["labels"], dtype=torch.long).clone()
    lens = _doc_lens(row)
    labels[torch.cumsum(torch.as_tensor([0] + lens[:-1]), 0)] = IGNORE_INDEX
    return labels


@dataclass
class UniDataCollator:
    """Collate rows for ``use_data_packing`` 0 (padded batch) or 1/2 (one flattened packed row).

    Args:
        pad_token_id: input id of padding (mode 0 only).
        packing: the ``use_data_packing`` mode.
        row_capacity: ``model_max_length``; the denominator of token utilisation in packed modes.
    """

    pad_token_id: int
    packing: int
    row_capacity: int

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("collator: empty batch")
        for row in rows:
            if "attention_mask" in row:
                raise ValueError("collator: rows must not carry an attention_mask; padding is the collator's job")
        batch = self._packed(rows) if self.packing else self._padded(rows)
        batch["sample_ids"] = [sid for row in rows for sid in row.get("sample_ids", [])]
        return batch

    def _packed(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids, labels, positions, lens = [], [], [], []
        for row in rows:
            row_lens = _doc_lens(row)
            ids.append(torch.as_tensor(row["input_ids"], dtype=torch.long))
            labels.append(packed_row_labels(row))
            positions.extend(torch.arange(n, dtype=torch.long) for n in row_lens)
            lens.extend(row_lens)
        cu_seq_lens = torch.zeros(len(lens) + 1, dtype=torch.int32)
        cu_seq_lens[1:] = torch.cumsum(torch.as_tensor(lens, dtype=torch.int32), 0)
        input_ids_1T = torch.cat(ids)[None]  # [1, T]: every document of every row, back to back
        batch = {
            "input_ids": input_ids_1T,
            "labels": torch.cat(labels)[None],
            "position_ids": torch.cat(positions)[None],
            "cu_seq_lens_q": cu_seq_lens,
            "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lens),
            "max_length_k": max(lens),
            "num_real_tokens": torch.tensor(input_ids_1T.shape[1]),
            "num_capacity_tokens": torch.tensor(len(rows) * max(self.row_capacity, max(lens))),
        }
        assert_packed_batch(batch)
        return batch

    def _padded(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        for row in rows:
            if len(_doc_lens(row)) != 1:
                raise ValueError("collator: use_data_packing=0 expects one document per row")
        width = max(len(r["input_ids"]) for r in rows)
        input_ids_BT = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels_BT = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        mask_BT = torch.zeros((len(rows), width), dtype=torch.long)
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids_BT[b, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
            labels_BT[b, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
            mask_BT[b, :n] = 1
        labels_BT[:, 0] = IGNORE_INDEX  # never a target (nothing precedes it); same rule as packed rows
        return {
            "input_ids": input_ids_BT,
            "labels": labels_BT,
            "attention_mask": mask_BT,
            "num_real_tokens": mask_BT.sum(),
            "num_capacity_tokens": torch.tensor(mask_BT.numel()),
        }


def assert_packed_batch(batch: dict[str, Any]) -> None:
    """Raise if a packed batch breaks the contract (an attention_mask, or boundaries that do not add up)."""
    if "attention_mask" in batch:
        raise ValueError(
            "packed batch has an attention_mask: transformers would then build one causal mask over the whole row "
            "and documents would attend to each other; packed rows carry position_ids + cu_seq_lens only"
        )
    T = batch["input_ids"].shape[-1]
    if batch["input_ids"].shape[0] != 1 or int(batch["cu_seq_lens_q"][-1]) != T:
        raise ValueError(f"packed batch: input_ids {tuple(batch['input_ids'].shape)} vs cu_seq_lens ending at "
                         f"{int(batch['cu_seq_lens_q'][-1])}")
