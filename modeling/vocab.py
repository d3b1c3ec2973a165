"""The one place that maps VQ code ids to token ids and back (DESIGN.md section 2).

Layout of the joint vocabulary::

    [0, image_offset)                       text tokens (the tokenizer's own ids, incl. special tokens)
    [image_offset + level_offset[l], ... )  codes of codebook level ``l`` (``level_sizes[l]`` rows each)

``image_offset`` is ``len(tokenizer)`` at the time the vocabulary was expanded (151,665 for Qwen2.5). Both
directions are range-checked: an out-of-range code or a text id handed to ``ids_to_codes`` is an error that
names the position and the value, never a silent clamp.

This module imports numpy only, so that data tools, training and the model config all share it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
UNCONDITIONAL = "<unconditional>"


def size_tag(height: int, width: int) -> str:
    """The any-resolution grid tag (in code-grid units) placed between ``<|vision_start|>`` and the codes."""
    return f"<height_{height}><width_{width}>"


def size_tag_tokens(max_grid: int) -> list[str]:
    """Every size-tag token a tokenizer needs for grids up to ``max_grid`` on each side."""
    return [f"<height_{i}>" for i in range(1, max_grid + 1)] + [f"<width_{i}>" for i in range(1, max_grid + 1)]


@dataclass(frozen=True)
class CodeVocab:
    """Code-id <-> token-id mapping with range checks in both directions.

    Args:
        image_offset: first token id of image codes (``len(tokenizer)`` when the vocabulary was expanded).
        level_sizes: codebook size of each level; single-level tokenizers have one entry.
        vision_start_id / vision_end_id: the tokenizer's ``<|vision_start|>`` / ``<|vision_end|>`` ids.

    >>> v = CodeVocab(image_offset=100, level_sizes=(8, 4), vision_start_id=5, vision_end_id=6)
    >>> v.codes_to_ids([0, 7]).tolist(), v.codes_to_ids([3], levels=1).tolist()
    ([100, 107], [111])
    >>> v.ids_to_codes([107, 111])
    (array([7, 3]), array([0, 1]))
    """

    image_offset: int
    level_sizes: tuple[int, ...]
    vision_start_id: int
    vision_end_id: int
    level_offsets: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.image_offset <= 0:
            raise ValueError(f"CodeVocab: image_offset must be positive, got {self.image_offset=}")
        if not self.level_sizes or any(int(s) <= 0 for s in self.level_sizes):
            raise ValueError(f"CodeVocab: level_sizes must be a non-empty list of positive sizes, got {self.level_sizes=}")
        for name in ("vision_start_id", "vision_end_id"):
            value = getattr(self, name)
            if not 0 <= value < self.image_offset:
                raise ValueError(f"CodeVocab: {name}={value} must be a text id in [0, {self.image_offset})")
        object.__setattr__(self, "level_sizes", tuple(int(s) for s in self.level_sizes))
        object.__setattr__(self, "level_offsets", tuple(int(x) for x in np.cumsum((0,) + self.level_sizes[:-1])))

    # ------------------------------------------------------------------ ranges
    @property
    def num_image_tokens(self) -> int:
        return int(sum(self.level_sizes))

    @property
    def image_token_range(self) -> tuple[int, int]:
        """``[start, end)`` of all image-code token ids."""
        return self.image_offset, self.image_offset + self.num_image_tokens

    @property
    def total_vocab_size(self) -> int:
        return self.image_offset + self.num_image_tokens

    def level_range(self, level: int) -> tuple[int, int]:
        """``[start, end)`` token ids of one codebook level."""
        self._check_level(level)
        start = self.image_offset + self.level_offsets[level]
        return start, start + self.level_sizes[level]

    def is_image_id(self, ids: np.ndarray | Sequence[int]) -> np.ndarray:
        ids = np.asarray(ids)
        start, end = self.image_token_range
        return (ids >= start) & (ids < end)

    # ------------------------------------------------------------- conversions
    def codes_to_ids(self, codes: Iterable[int] | np.ndarray, levels: int | Sequence[int] | np.ndarray = 0) -> np.ndarray:
        """Map codes (of one level, or per-position ``levels``) to token ids; raise on any out-of-range code."""
        codes_N = np.asarray(list(codes) if not isinstance(codes, np.ndarray) else codes, dtype=np.int64).reshape(-1)
        levels_N = np.broadcast_to(np.asarray(levels, dtype=np.int64), codes_N.shape)
        if levels_N.size and (levels_N.min() < 0 or levels_N.max() >= len(self.level_sizes)):
            bad = int(np.argmax((levels_N < 0) | (levels_N >= len(self.level_sizes))))
            raise ValueError(f"level {int(levels_N[bad])} at position {bad} is outside [0, {len(self.level_sizes)})")
        sizes_N = np.asarray(self.level_sizes, dtype=np.int64)[levels_N]
        bad_mask = (codes_N < 0) | (codes_N >= sizes_N)
        if bad_mask.any():
            bad = int(np.argmax(bad_mask))
            raise ValueError(
                f"code {int(codes_N[bad])} at position {bad} is outside codebook level {int(levels_N[bad])} "
                f"of size {int(sizes_N[bad])}"
            )
        offsets_N = np.asarray(self.level_offsets, dtype=np.int64)[levels_N]
        return codes_N + offsets_N + self.image_offset

    def ids_to_codes(self, ids: Iterable[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map image token ids back to ``(codes, levels)``; raise naming the first id that is not an image code."""
        ids_N = np.asarray(list(ids) if not isinstance(ids, np.ndarray) else ids, dtype=np.int64).reshape(-1)
        ok = self.is_image_id(ids_N)
        if not ok.all():
            bad = int(np.argmin(ok))
            start, end = self.image_token_range
            raise ValueError(f"token id {int(ids_N[bad])} at position {bad} is not an image code (range [{start}, {end}))")
        rel_N = ids_N - self.image_offset
        ends = np.cumsum(self.level_sizes)
        levels_N = np.searchsorted(ends, rel_N, side="right")
        codes_N = rel_N - np.asarray(self.level_offsets, dtype=np.int64)[levels_N]
        return codes_N, levels_N

    def _check_level(self, level: int) -> None:
        if not 0 <= level < len(self.level_sizes):
            raise ValueError(f"level {level} is outside [0, {len(self.level_sizes)})")

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {
            "image_offset": self.image_offset,
            "level_sizes": list(self.level_sizes),
            "vision_start_id": self.vision_start_id,
            "vision_end_id": self.vision_end_id,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CodeVocab":
        unknown = set(d) - {"image_offset", "level_sizes", "vision_start_id", "vision_end_id"}
        if unknown:
            raise ValueError(f"CodeVocab: unknown keys {sorted(unknown)}")
        return cls(d["image_offset"], tuple(d["level_sizes"]), d["vision_start_id"], d["vision_end_id"])

    @classmethod
    def from_tokenizer(cls, tokenizer, level_sizes: Sequence[int]) -> "CodeVocab":
        """Build the mapping for a (transformers) tokenizer that already holds the vision special tokens."""
        ids = {}
        for tok in (VISION_START, VISION_END):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {tok!r} token: add it before building the code vocabulary")
            ids[tok] = tid
        return cls(len(tokenizer), tuple(level_sizes), ids[VISION_START], ids[VISION_END])
