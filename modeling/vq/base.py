"""The interface every image tokenizer implements, so the encoder, training and inference never care which one.

An image tokenizer is an ``nn.Module`` that turns a batch of preprocessed images into discrete codes and back:

* ``preprocess(images, grid=None) -> pixels_BCHW`` in [-1, 1] (PIL in, tensor out); ``grid`` picks the target
  size for any-resolution tokenizers.
* ``encode(pixels_BCHW) -> EncodedImages`` (serialised ``codes_BN``, per-position ``levels_N``, ``grid``).
* ``decode(codes_BN, grid) -> pixels_BCHW`` in [-1, 1].
* ``name`` and ``checkpoint_hash`` identify it in records and manifests (``f"{name}@{checkpoint_hash}"``).
* ``level_sizes``: codebook size per level (one entry for single-level VQs); feeds ``modeling.vocab.CodeVocab``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn


@dataclass
class EncodedImages:
    """Codes of a batch of images that share one grid.

    ``codes_BN`` is in serialisation order; ``levels_N`` gives each position's codebook level (all zeros for a
    single-level tokenizer); ``grid`` is [h, w] of the (top-level) code grid.
    """

    codes_BN: torch.Tensor
    levels_N: torch.Tensor
    grid: tuple[int, int]


class ImageTokenizer(nn.Module):
    name: str = "image-tokenizer"
    level_sizes: tuple[int, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.checkpoint_hash = "random-init"

    @property
    def tokenizer_id(self) -> str:
        """The string stored in every record's ``images[i].tokenizer``."""
        return f"{self.name}@{self.checkpoint_hash}"

    def preprocess(self, images, grid: tuple[int, int] | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, pixels_BCHW: torch.Tensor) -> EncodedImages:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, codes_BN: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def file_hash(path: str | Path, length: int = 12) -> str:
    """Short sha256 of a checkpoint file, streamed (checkpoints are GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:length]


def config_from_dict(cls: type, d: dict, source: str = "<dict>"):
    """Build a config dataclass from a saved dict; unknown keys are an error naming the file and the known fields."""
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown}; known: {sorted(known)}")
    return cls(**d)
