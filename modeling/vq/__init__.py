"""Image tokenizers, registered by name and imported lazily (a VQGAN import costs seconds and weights).

``load_image_tokenizer(kind, path)`` is the one way the encoder, training and inference obtain a tokenizer;
unknown kinds raise an error listing the known ones.
"""

from __future__ import annotations

import importlib

from modeling.vq.base import EncodedImages, ImageTokenizer

# kind -> "module:Class"; each class provides ``from_checkpoint(path)``.
IMAGE_TOKENIZERS: dict[str, str] = {
    "shapes": "modeling.vq.shapes_vq:ShapesVQ",
    "chameleon": "modeling.vq.chameleon:ChameleonVQGAN",
    "hqvae": "modeling.vq.hqvae:HQVAE",
    "rqvae": "modeling.vq.rqvae:RQVAE",
}


def image_tokenizer_class(kind: str) -> type[ImageTokenizer]:
    if kind not in IMAGE_TOKENIZERS:
        raise ValueError(f"unknown image tokenizer {kind!r}; known: {', '.join(sorted(IMAGE_TOKENIZERS))}")
    module, cls = IMAGE_TOKENIZERS[kind].split(":")
    return getattr(importlib.import_module(module), cls)


def load_image_tokenizer(kind: str, path: str) -> ImageTokenizer:
    """Load a tokenizer of ``kind`` from a local checkpoint path (file or directory, per kind)."""
    return image_tokenizer_class(kind).from_checkpoint(path)


__all__ = ["EncodedImages", "ImageTokenizer", "IMAGE_TOKENIZERS", "image_tokenizer_class", "load_image_tokenizer"]
