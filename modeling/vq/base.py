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

    @property
    def native_grid(self) -> tuple[int, int]:  # pragma: no cover - abstract
        """The code grid of an image at the tokenizer's own resolution (what text-to-image draws by default)."""
        raise NotImplementedError

    def code_levels(self, grid: tuple[int, int]) -> torch.Tensor:
        """The codebook level of each serialised position of an image of ``grid``: what ``encode`` returns as
        ``levels_N``; a sampler allows at position ``p`` only the codes of level ``code_levels(grid)[p]``.
        Single-level tokenizers: ``h * w`` zeros."""
        h, w = (int(x) for x in grid)
        return torch.zeros(h * w, dtype=torch.long)

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


CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_safetensors_dir(model: ImageTokenizer, out_dir: str | Path, config_dict: dict,
                         metadata: dict[str, str] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (each to a temp name, then renamed); set ``checkpoint_hash``."""
    import json
    import os

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights, config = out / WEIGHTS_NAME, out / CONFIG_NAME
    tmp_w = weights.with_name(f"{WEIGHTS_NAME}.tmp-{os.getpid()}")
    tmp_c = config.with_name(f"{CONFIG_NAME}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp_w), metadata=metadata)
    tmp_c.write_text(json.dumps(config_dict, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_w, weights)
    os.replace(tmp_c, config)
    model.checkpoint_hash = file_hash(weights)
    return out


def load_safetensors_dir(cls: type, config_cls: type, path: str | Path, hint: str = "") -> ImageTokenizer:
    """Strictly load a :func:`save_safetensors_dir` directory into ``cls(config_cls.from_dict(...))``, in eval mode.

    Every problem is reported before any weight is used: missing files (named, plus ``hint``), an invalid or unknown
    config field, and missing / unexpected keys and shape mismatches between the weights and the architecture.
    """
    import json

    from safetensors.torch import load_file

    ckpt = Path(path)
    config_path, weights_path = ckpt / CONFIG_NAME, ckpt / WEIGHTS_NAME
    for p in (ckpt, config_path, weights_path):
        if not p.exists():
            raise FileNotFoundError(f"{p}: not found; a {cls.name} checkpoint is a directory with {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}{hint}")
    try:
        config = config_cls.from_dict(json.loads(config_path.read_text()), source=str(config_path))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{config_path}: not a valid {config_cls.__name__}: {e}") from e
    model = cls(config)
    state = load_file(str(weights_path))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                        for k, v in expected.items() if k in state and state[k].shape != v.shape)
    if missing or unexpected or mismatched:
        raise ValueError(f"{weights_path}: does not match the architecture in {config_path}: missing keys {missing}, "
                         f"unexpected keys {unexpected}, shape mismatches {mismatched}")
    model.load_state_dict(state, strict=True)
    model.checkpoint_hash = file_hash(weights_path)
    return model.eval()
