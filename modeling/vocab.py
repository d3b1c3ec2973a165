"""The one place that owns the joint id layout: text ids, image codes, size tags, and the rule for a vision token.

Layout (Qwen2.5 text tokenizer + a single-level 8,192-code image tokenizer + size tags up to 64x64; the column
"branch" is how the Uni-X model routes the token, :meth:`CodeVocab.is_vision_id`)::

    ids                     what                                                      branch   in the tokenizer?
    ----------------------  --------------------------------------------------------  -------  -----------------
    [0, 151643)             text: Qwen2.5's byte-level BPE tokens                     text     yes
    [151643, 151665)        Qwen2.5's 22 special tokens (<|endoftext|> 151643,        text     yes
                            <|im_start|> 151644, <|im_end|> 151645, ...), except:
      151652                <|vision_start|>  opens an image block                    vision   yes
      151653                <|vision_end|>    closes it                               text     yes
    [151665, 159857)        image codes: code c of level l -> image_offset +          vision   no (CodeVocab)
                            level_offset[l] + c; image_offset = len(tokenizer) =
                            151665, so code 0 is 151665 as in the reference Uni-X
                            checkpoints; each level has its own range (HQ-VAE
                            top 8x8 + bottom 16x16: [o, o+K_top), [o+K_top, ...))
    [159857, 159921)        size tags <height_1> .. <height_64> (max_grid = 64)       vision   no (CodeVocab)
    [159921, 159985)        size tags <width_1> .. <width_64>                         vision   no (CodeVocab)
    [159985, vocab_size)    padding rows of the embedding / head: never an input,    --       no
                            never a target (conversion rounds vocab_size up)
    -100 (labels only)      IGNORE_INDEX: a label with no loss, never an input id     --       --

The shapes BPE has the same layout with other numbers: its six special tokens are ids 0..5 (``<|endoftext|>``,
``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>`` 3, ``<|vision_end|>`` 4, ``<unconditional>``), then bytes
and merges up to ``len(tokenizer)`` = ``image_offset``; a third-party tokenizer gets ``<|vision_start|>`` /
``<|vision_end|>`` appended (``data_process.text_tokenizer.add_vision_tokens``) before the CodeVocab is built.

Why size tags live here and not in the tokenizer: a tokenizer can only append tokens at ``len(tokenizer)``, which
is where the image codes must start (151,665 for Qwen2.5, or every released checkpoint's codes move); so the tags
follow the codes, and, like the codes, only :class:`CodeVocab` maps them. ``max_grid=0`` (the default) reserves
none. They sit inside the image block (``<|vision_start|> <height_h><width_w> codes <|vision_end|>``) and are
vision tokens, so with ``all_modal_visible=0`` the first tag is predicted from ``<|vision_start|>`` and the first
code from the last tag, all in the vision branch and all seeing each other.

Which branch predicts which target follows from the routing of the *previous* token: ``<|vision_start|>`` is
predicted by the text branch (from text); tags, codes and ``<|vision_end|>`` by the vision branch
(:meth:`CodeVocab.is_image_target`, the trainer's image loss). Every check of an id range goes through the methods
below (for numpy arrays and torch tensors alike); no other module compares ids with the range bounds. Both
directions of the code mapping are range-checked: an out-of-range code or a text id handed to ``ids_to_codes`` is
an error that names the position and the value, never a silent clamp.

This module imports numpy only, so that data tools, training and the model config all share it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
UNCONDITIONAL = "<unconditional>"
IGNORE_INDEX = -100  # label of a position with no loss (transformers' and torch's cross-entropy default)
DEFAULT_MAX_GRID = 64  # size tags reserved when any-resolution tags are asked for: grids up to 64x64 codes


def _as_ids(ids: Any) -> Any:
    """Torch tensors and numpy arrays pass through (the comparisons below work on both); sequences become numpy."""
    return ids if hasattr(ids, "shape") else np.asarray(ids, dtype=np.int64)


def _between(ids: Any, bounds: tuple[int, int]) -> Any:
    return (ids >= bounds[0]) & (ids < bounds[1])


@dataclass(frozen=True)
class CodeVocab:
    """Code-id <-> token-id mapping with range checks in both directions, the size tags and the vision-token rule.

    Args:
        image_offset: first token id of image codes (``len(tokenizer)`` when the vocabulary was expanded).
        level_sizes: codebook size of each level; single-level tokenizers have one entry.
        vision_start_id / vision_end_id: the tokenizer's ``<|vision_start|>`` / ``<|vision_end|>`` ids.
        max_grid: size tags ``<height_1..max_grid>`` and ``<width_1..max_grid>`` right after the codes (0: none).

    >>> v = CodeVocab(image_offset=100, level_sizes=(8, 4), vision_start_id=5, vision_end_id=6, max_grid=2)
    >>> v.codes_to_ids([0, 7]).tolist(), v.codes_to_ids([3], levels=1).tolist()
    ([100, 107], [111])
    >>> v.ids_to_codes([107, 111])
    (array([7, 3]), array([0, 1]))
    >>> v.size_tag_ids((2, 1)), v.total_vocab_size
    ([113, 114], 116)
    >>> v.is_vision_id([5, 6, 100, 113, 99]).tolist()
    [True, False, True, True, False]
    """

    image_offset: int
    level_sizes: tuple[int, ...]
    vision_start_id: int
    vision_end_id: int
    max_grid: int = 0
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
        if self.max_grid < 0:
            raise ValueError(f"CodeVocab: max_grid={self.max_grid} must be >= 0 (0: no size tags)")
        object.__setattr__(self, "level_sizes", tuple(int(s) for s in self.level_sizes))
        object.__setattr__(self, "max_grid", int(self.max_grid))
        object.__setattr__(self, "level_offsets", tuple(int(x) for x in np.cumsum((0,) + self.level_sizes[:-1])))

    # ------------------------------------------------------------------ ranges
    @property
    def num_image_tokens(self) -> int:
        return int(sum(self.level_sizes))

    @property
    def image_token_range(self) -> tuple[int, int]:
        """``[start, end)`` of all image-code token ids (size tags excluded)."""
        return self.image_offset, self.image_offset + self.num_image_tokens

    @property
    def size_tag_range(self) -> tuple[int, int]:
        """``[start, end)`` of the size tags: ``max_grid`` height tags, then ``max_grid`` width tags."""
        end = self.image_token_range[1]
        return end, end + 2 * self.max_grid

    @property
    def total_vocab_size(self) -> int:
        """Rows the embedding needs: text, codes and size tags (the model may round up with padding rows)."""
        return self.size_tag_range[1]

    def level_range(self, level: int) -> tuple[int, int]:
        """``[start, end)`` token ids of one codebook level."""
        self._check_level(level)
        start = self.image_offset + self.level_offsets[level]
        return start, start + self.level_sizes[level]

    def image_block_ids(self) -> np.ndarray:
        """Every id that only image blocks use: ``<|vision_start|>``, ``<|vision_end|>``, codes and size tags."""
        return np.concatenate([[self.vision_start_id, self.vision_end_id],
                               np.arange(self.image_token_range[0], self.total_vocab_size)]).astype(np.int64)

    # ------------------------------------------------------------ id classes (numpy arrays or torch tensors)
    def is_image_id(self, ids: Any) -> Any:
        """Image codes (any level); size tags and the vision special tokens are not codes."""
        return _between(_as_ids(ids), self.image_token_range)

    def is_size_tag_id(self, ids: Any) -> Any:
        return _between(_as_ids(ids), self.size_tag_range)

    def is_vision_id(self, ids: Any) -> Any:
        """The one definition of a vision token (model routing and the samples' ``modality``): ``<|vision_start|>``,
        size tags and codes, i.e. the image block up to, not including, ``<|vision_end|>``.

        ``<|vision_start|>`` is vision because the vision branch predicts the first tag or code from it;
        ``<|vision_end|>`` is text because the text branch predicts what follows an image.
        """
        ids = _as_ids(ids)
        return _between(ids, (self.image_offset, self.total_vocab_size)) | (ids == self.vision_start_id)

    def is_image_target(self, ids: Any) -> Any:
        """Targets the vision branch predicts (the previous token is vision): size tags, codes, ``<|vision_end|>``.
        The trainer's image loss; ``<|vision_start|>`` is predicted from text and counts as text."""
        ids = _as_ids(ids)
        return _between(ids, (self.image_offset, self.total_vocab_size)) | (ids == self.vision_end_id)

    # ------------------------------------------------------------- conversions
    def size_tag_ids(self, grid: Sequence[int]) -> list[int]:
        """Ids of ``<height_h><width_w>`` for a code grid ``(h, w)``; an error naming the grid and the limit."""
        h, w = (int(x) for x in grid)
        if not (1 <= h <= self.max_grid and 1 <= w <= self.max_grid):
            raise ValueError(
                f"grid {h}x{w} has no size tag: this code vocabulary has size tags up to {self.max_grid}x"
                f"{self.max_grid} (max_grid={self.max_grid}; size tags are reserved with size_tags=True)"
            )
        start = self.size_tag_range[0]
        return [start + h - 1, start + self.max_grid + w - 1]

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
    _KEYS = ("image_offset", "level_sizes", "vision_start_id", "vision_end_id", "max_grid")

    def to_dict(self) -> dict:
        return {k: (list(self.level_sizes) if k == "level_sizes" else getattr(self, k)) for k in self._KEYS}

    @classmethod
    def from_dict(cls, d: dict) -> "CodeVocab":
        """Inverse of :meth:`to_dict`; ``max_grid`` may be absent (dicts written before size tags: none)."""
        unknown = set(d) - set(cls._KEYS)
        if unknown:
            raise ValueError(f"CodeVocab: unknown keys {sorted(unknown)}")
        return cls(d["image_offset"], tuple(d["level_sizes"]), d["vision_start_id"], d["vision_end_id"],
                   d.get("max_grid", 0))

    @classmethod
    def from_tokenizer(cls, tokenizer, level_sizes: Sequence[int], max_grid: int = 0) -> "CodeVocab":
        """Build the mapping for a (transformers) tokenizer that already holds the vision special tokens: image codes
        start at ``len(tokenizer)``, size tags (``max_grid`` > 0) right after them."""
        ids = {}
        for tok in (VISION_START, VISION_END):
            tid = tokenizer.convert_tokens_to_ids(tok)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer has no {tok!r} token: add it before building the code vocabulary")
            ids[tok] = tid
        return cls(len(tokenizer), tuple(level_sizes), ids[VISION_START], ids[VISION_END], max_grid)
