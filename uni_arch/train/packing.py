"""Packing samples into fixed-capacity rows: a pure function over lengths and image spans.

No torch, no tokenizer: the packer sees only how long each sample is and where its image blocks are
(``[start, end)`` token spans, ``<|vision_start|>`` .. ``<|vision_end|>`` inclusive), and returns which slice of
which sample goes into which row. The dataset then cuts the real ids with these slices. Keeping it pure makes the
packing exactly testable (``tests/test_packing.py`` pins the bins of tiny inputs).

Modes (``use_data_packing``, the reference knob):

* ``0`` -- no packing: one sample per row; the collator pads rows into batches.
* ``1`` -- pretraining packing: samples are concatenated in order and a row is filled to the brim; a *text-only*
  sample that does not fit the rest of a row is split and continues in the next row. A sample with an image is
  never split: it moves whole to the next row (the rest of the row is padding). Cutting one would train the image
  with no caption in view (an unconditional image) or a caption without its image.
* ``2`` -- SFT packing: whole samples, best-fit decreasing (each sample, longest first, goes into the fullest row
  that still has room). A conversation is never split across rows.

Overlong samples (longer than a row): a text-only one is split into row-sized pieces when ``overlong="split"``
(each piece becomes its own document) or dropped when ``overlong="drop"``; a sample with an image can only be
dropped, whatever the policy. The result counts both (``dropped``, ``dropped_multimodal``, ``split``), so the
caller logs one warning with the numbers. Nothing is ever truncated silently.

Measured token utilisation (``python tools/bench.py train``; real tokens / capacity; mode 0 pads batches of
17 (shapes) and 10 (mixed) samples, which hold about as many real tokens as one 4096-token packed row):

==============================================  ======  ======  ======
data (rows of 4096 tokens)                      mode 0  mode 1  mode 2
==============================================  ======  ======  ======
shapes world (10,000 samples, mean 241 tokens)  0.730   0.9999  0.9865
mixed: log-normal text + 1,024-code images      0.374   0.9981  0.9981
==============================================  ======  ======  ======

With rows of 2048 the shapes world reaches only ~0.97 in mode 2: its samples are ~280-335 tokens with little short
text to fill the gaps, hence the 4096-token default rows of ``train.sh`` (attention is per document, so a longer row
costs no attention compute).

>>> r = pack([5, 3, 4], seq_len=8, mode=2)
>>> [[(p.sample, p.start, p.end) for p in row] for row in r.rows]
[[(0, 0, 5), (1, 0, 3)], [(2, 0, 4)]]
>>> r = pack([5, 6, 4], seq_len=8, mode=1, image_spans=[[], [(2, 5)], []])  # the image sample moves whole
>>> [[(p.sample, p.start, p.end) for p in row] for row in r.rows]
[[(0, 0, 5)], [(1, 0, 6), (2, 0, 2)], [(2, 2, 4)]]
>>> round(utilisation(r.rows, 8), 3)
0.625
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Literal, Sequence

Span = tuple[int, int]  # [start, end) token positions; the one definition, imported by templates and dataset
OverlongPolicy = Literal["drop", "split"]
PACKING_MODES = (0, 1, 2)


@dataclass(frozen=True)
class Piece:
    """Tokens ``[start, end)`` of sample ``sample``; each piece is one document of its row."""

    sample: int
    start: int
    end: int

    @property
    def length(self) -> int:
        return self.end - self.start


@dataclass
class PackResult:
    """Rows of pieces, plus what happened to the overlong samples (for one counted warning)."""

    rows: list[list[Piece]]
    dropped: list[int] = field(default_factory=list)  # every dropped sample, in sample order
    dropped_multimodal: list[int] = field(default_factory=list)  # the dropped ones that hold an image
    split: list[int] = field(default_factory=list)  # text-only samples cut into several documents


def split_sample(length: int, seq_len: int) -> list[Span]:
    """Cut a text-only sample into consecutive pieces of at most ``seq_len`` tokens.

    >>> split_sample(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    """
    return [(a, min(a + seq_len, length)) for a in range(0, length, seq_len)]


def _check(lengths: Sequence[int], seq_len: int, mode: int, image_spans, overlong: str) -> list[list[Span]]:
    if mode not in PACKING_MODES:
        raise ValueError(f"pack: mode={mode!r} must be one of {PACKING_MODES} (use_data_packing)")
    if seq_len <= 0:
        raise ValueError(f"pack: seq_len={seq_len} must be positive (model_max_length)")
    if overlong not in ("drop", "split"):
        raise ValueError(f"pack: overlong={overlong!r} must be 'drop' or 'split'")
    spans = [list(s) for s in image_spans] if image_spans is not None else [[] for _ in lengths]
    if len(spans) != len(lengths):
        raise ValueError(f"pack: {len(lengths)} lengths but {len(spans)} image span lists")
    for i, (n, ss) in enumerate(zip(lengths, spans)):
        if n <= 0:
            raise ValueError(f"pack: sample {i} has length {n}; empty samples must be filtered before packing")
        for a, b in ss:
            if not 0 <= a < b <= n:
                raise ValueError(f"pack: sample {i} image span {(a, b)} is outside [0, {n}]")
    return spans


def _keep(lengths, seq_len, spans, overlong, result: PackResult) -> list[int]:
    """Samples that go into rows (in order); the overlong ones that cannot be split are recorded as dropped."""
    kept = []
    for i, n in enumerate(lengths):
        if n > seq_len and (spans[i] or overlong == "drop"):
            result.dropped.append(i)
            if spans[i]:
                result.dropped_multimodal.append(i)
        else:
            kept.append(i)
    return kept


def _pack_pretrain(samples: Sequence[int], lengths, seq_len, spans) -> list[list[Piece]]:
    """Mode 1: fill rows in order; a text-only sample is split where the row ends, a sample with an image moves
    whole to the next row (``samples`` holds no multimodal sample longer than a row)."""
    rows: list[list[Piece]] = []
    row: list[Piece] = []
    used = 0
    for i in samples:
        n = lengths[i]
        if spans[i] and n > seq_len - used:  # does not fit what is left: the row closes, the sample moves whole
            rows.append(row)
            row, used = [], 0
        pos = 0
        while pos < n:
            end = min(n, pos + seq_len - used)
            row.append(Piece(i, pos, end))
            used += end - pos
            pos = end
            if used == seq_len:
                rows.append(row)
                row, used = [], 0
    if row:
        rows.append(row)
    return rows


def _pack_bfd(items: list[Piece], seq_len: int) -> list[list[Piece]]:
    """Mode 2: best-fit decreasing; ties keep sample order, so the result is deterministic."""
    order = sorted(range(len(items)), key=lambda k: (-items[k].length, k))
    rows: list[list[Piece]] = []
    free: list[tuple[int, int]] = []  # sorted (remaining capacity, row index)
    for k in order:
        piece = items[k]
        pos = bisect.bisect_left(free, (piece.length, -1))
        if pos < len(free):
            remaining, r = free.pop(pos)
        else:
            remaining, r = seq_len, len(rows)
            rows.append([])
        rows[r].append(piece)
        if remaining - piece.length > 0:
            bisect.insort(free, (remaining - piece.length, r))
    return rows


def pack(
    lengths: Sequence[int],
    seq_len: int,
    mode: int,
    image_spans: Sequence[Sequence[Span]] | None = None,
    overlong: OverlongPolicy = "split",
) -> PackResult:
    """Pack samples of ``lengths`` into rows of at most ``seq_len`` tokens (see the module docstring).

    ``image_spans[i]`` non-empty marks sample ``i`` as multimodal: it is never split.
    """
    spans = _check(lengths, seq_len, mode, image_spans, overlong)
    result = PackResult(rows=[])
    kept = _keep(lengths, seq_len, spans, overlong, result)
    if mode == 1:
        result.rows = _pack_pretrain(kept, lengths, seq_len, spans)
        result.split = sorted({p.sample for row in result.rows for p in row if p.length != lengths[p.sample]})
        return result
    items: list[Piece] = []
    for i in kept:  # modes 0 and 2 place whole documents: only an overlong text sample becomes pieces
        pieces = split_sample(lengths[i], seq_len)
        if len(pieces) > 1:
            result.split.append(i)
        items.extend(Piece(i, a, b) for a, b in pieces)
    result.rows = [[p] for p in items] if mode == 0 else _pack_bfd(items, seq_len)
    return result


def row_length(row: Sequence[Piece]) -> int:
    return sum(p.length for p in row)


def utilisation(rows: Sequence[Sequence[Piece]], seq_len: int) -> float:
    """Real tokens / row capacity (``len(rows) * seq_len``): the fraction of compute that is not padding."""
    if not rows:
        return 0.0
    return sum(row_length(r) for r in rows) / (len(rows) * seq_len)


def padded_utilisation(lengths: Sequence[int], batch_size: int) -> float:
    """Real tokens / padded tokens when consecutive samples are batched by ``batch_size`` and padded (mode 0).

    >>> padded_utilisation([4, 2, 3, 3], batch_size=2)
    0.8571428571428571
    """
    if not lengths:
        return 0.0
    padded = sum(max(lengths[i : i + batch_size]) * len(lengths[i : i + batch_size]) for i in range(0, len(lengths), batch_size))
    return sum(lengths) / padded
