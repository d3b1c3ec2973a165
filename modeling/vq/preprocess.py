"""Image preprocessing shared by every image tokenizer: fixed square crops and ILLUME-style aspect-ratio anchors.

Two modes, one code path (``resize_cover_crop``: scale so the image covers the target, LANCZOS, centre crop):

* ``fixed`` (Chameleon's ``_vqgan_input_from``): the shorter side is resized to ``target`` and the centre
  ``target x target`` square is kept. Every image gets the same code grid.
* ``fixed_anchors`` (ILLUME's dynamic resolution): an :class:`AnchorSet` lists code grids ``(H, W)`` whose area is
  close to ``(target / downsample) ** 2`` codes, for aspect ratios up to ``max_aspect``. Each image goes to the anchor
  whose aspect ratio is nearest in log space, then is resized to cover it and centre-cropped; because the anchor's
  aspect is the nearest one, the crop removes at most a thin sliver. The code grid then varies per image, so an
  encoder groups images by grid (:func:`group_by_grid`) and encodes each group as one batch.

Every image, whatever reads it (the encoder, ``eval_recon``, a tokenizer's ``preprocess`` called directly), first
goes through :func:`to_rgb`, the one place that turns a decoded file into the pixels a person sees: the EXIF
orientation applied (a phone photo is stored sideways with a rotation tag), 16-bit greyscale scaled to 8 bits (a
plain ``convert`` clips it: 99.6% of a 16-bit gradient became 255), transparency composited onto white
(Chameleon's ``_whiten_transparency``, including its truncation to uint8, so the same PNG gives the same codes as
the reference tokenizer; a plain ``convert("RGB")`` would encode the colours hidden under alpha 0), and every other
mode (greyscale, palette, CMYK) converted to RGB. :func:`decode_image` is the file-bytes entry. Pixels come out in
[-1, 1] as float32 CHW.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

PreprocessMode = Literal["fixed", "fixed_anchors"]
PREPROCESS_MODES: tuple[str, ...] = ("fixed", "fixed_anchors")


def whiten_transparency(image: Image.Image) -> Image.Image:
    """RGB image with any alpha composited onto white: ``rgb * a + 255 * (1 - a)``, truncated to uint8."""
    if image.mode == "RGB":
        return image
    rgba = np.asarray(image.convert("RGBA"))
    if not (rgba[:, :, 3] < 255).any():  # opaque (or no alpha at all): a plain conversion is exact
        return image.convert("RGB")
    alpha_HW1 = rgba[:, :, 3:4] / 255.0
    rgb = (1.0 - alpha_HW1) * 255.0 + alpha_HW1 * rgba[:, :, :3]
    # Truncation (astype), not rounding: it is what the reference does, and codes depend on it.
    return Image.fromarray(rgb.astype(np.uint8), "RGB")


# Modes whose alpha must be composited (palette images carry theirs in ``info["transparency"]``).
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Greyscale with more than 8 bits. ``I`` (32-bit int) is what some Pillow versions and TIFFs give a 16-bit file;
# its values are read as 16-bit (0..65535), the only depth such files have in practice.
_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


def _orientation(image: Image.Image) -> int:
    """EXIF orientation (1 = as stored; 5-8 swap width and height); Pillow also maps an XMP orientation here."""
    return int(image.getexif().get(ExifTags.Base.Orientation, 1))


def to_rgb(image: Image.Image) -> Image.Image:
    """The one normalisation of a decoded image: EXIF orientation, 16-bit -> 8-bit, alpha onto white, RGB out.

    Idempotent (the transposed copy has no orientation tag left), so a tokenizer may call it on images that a
    reader already normalised. An RGB image without an orientation tag is returned as is (no copy).
    """
    if _orientation(image) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode in _HIGH_DEPTH_MODES:
        # Scale, not clip: 65535 -> 255 (x / 257 is exactly the 16 -> 8 bit map that keeps 0 and full scale).
        values = np.clip(np.asarray(image, dtype=np.float64), 0, 65535)
        image = Image.fromarray(np.rint(values / 257.0).astype(np.uint8), "L")
    elif image.mode == "F":
        raise ValueError("32-bit float pixels (mode F) have no defined range; save the image as 8 or 16 bit")
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        return whiten_transparency(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """File bytes -> a fully decoded RGB image through :func:`to_rgb`.

    Decoding is forced now (``load``), so a truncated or corrupt file raises here (``OSError``, ``SyntaxError``,
    ``ValueError`` or ``Image.DecompressionBombError``, as Pillow reports it) and the caller names the file.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return to_rgb(image)


def resize_cover_crop(image: Image.Image, height: int, width: int, resample: int = Image.LANCZOS) -> Image.Image:
    """Resize (``resample``, LANCZOS by default; aspect kept) so the image covers ``height x width``, then take the
    centre crop.

    For a square target this is exactly Chameleon's "shorter side to target, centre crop" (same rounding).
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"target size must be positive, got {height=}, {width=}")
    scale = max(width / image.width, height / image.height)
    new_w, new_h = max(width, round(scale * image.width)), max(height, round(scale * image.height))
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), resample)
    x0, y0 = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((x0, y0, x0 + width, y0 + height))


def pil_to_pixels(image: Image.Image) -> torch.Tensor:
    """uint8 RGB PIL image -> float32 CHW tensor in [-1, 1] (``x / 255 * 2 - 1``)."""
    array_HWC = np.asarray(image, dtype=np.float32) / 255.0
    return torch.from_numpy(array_HWC * 2.0 - 1.0).permute(2, 0, 1).contiguous()  # HWC -> CHW


@dataclass(frozen=True)
class AnchorSet:
    """Code grids ``(H, W)`` of about ``(target / downsample) ** 2`` codes, aspect ratios up to ``max_aspect``.

    For each short side ``H`` the long side is ``floor(area / H)``, so no anchor costs more codes than the square one
    (the sequence-length budget) and all are within ``area_tolerance`` below it; each grid comes with its transpose.
    For ``target=512, downsample=16`` this gives 32x32, 28x36, 36x28, 24x42, 42x24, ... (23 grids from 21x48 to
    48x21). Pixel sizes are ``H * downsample`` by ``W * downsample``.
    """

    target: int = 512
    downsample: int = 16
    max_aspect: float = 2.5
    area_tolerance: float = 0.1
    anchors: tuple[tuple[int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.target % self.downsample:
            raise ValueError(f"target must be a multiple of downsample, got {self.target=}, {self.downsample=}")
        if self.max_aspect < 1.0:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect=}")
        side = self.target // self.downsample
        area = side * side
        anchors: set[tuple[int, int]] = set()
        for h in range(1, side + 1):  # the short side; the transpose gives the other orientation
            w = area // h
            if w / h > self.max_aspect or h * w < (1.0 - self.area_tolerance) * area:
                continue
            anchors.update({(h, w), (w, h)})
        object.__setattr__(self, "anchors", tuple(sorted(anchors)))

    def nearest(self, width: int, height: int) -> tuple[int, int]:
        """The anchor grid ``(H, W)`` whose aspect ratio is nearest to ``width / height`` in log space.

        Ties go to the anchor listed first (smaller ``H``), so the choice is deterministic.
        """
        if width <= 0 or height <= 0:
            raise ValueError(f"image size must be positive, got {width=}, {height=}")
        log_ratio = math.log(width / height)
        return min(self.anchors, key=lambda hw: abs(math.log(hw[1] / hw[0]) - log_ratio))

    def pixel_size(self, grid: tuple[int, int]) -> tuple[int, int]:
        """Pixel ``(height, width)`` of a code grid."""
        return grid[0] * self.downsample, grid[1] * self.downsample


def resize_to_anchor(image: Image.Image, anchor: tuple[int, int], downsample: int) -> Image.Image:
    """Resize-and-crop ``image`` to the pixel size of the code grid ``anchor = (H, W)``."""
    return resize_cover_crop(image, anchor[0] * downsample, anchor[1] * downsample)


def preprocess_image(
    image: Image.Image,
    mode: PreprocessMode = "fixed",
    target: int = 512,
    downsample: int = 16,
    max_aspect: float = 2.5,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """One image -> CHW pixels in [-1, 1]; ``grid`` (code units) overrides the mode's choice of size."""
    return Preprocessor(mode, target, downsample, max_aspect)(image, grid)


@dataclass(frozen=True)
class Preprocessor:
    """The preprocessing of one tokenizer, callable on one image; :meth:`batch` serves ``ImageTokenizer.preprocess``."""

    mode: PreprocessMode = "fixed"
    target: int = 512
    downsample: int = 16
    max_aspect: float = 2.5

    def __post_init__(self) -> None:
        if self.mode not in PREPROCESS_MODES:
            raise ValueError(f"unknown preprocess mode {self.mode!r}; choose one of {PREPROCESS_MODES}")
        if self.target % self.downsample:
            raise ValueError(f"target must be a multiple of downsample, got {self.target=}, {self.downsample=}")

    @property
    def anchor_set(self) -> AnchorSet:
        return AnchorSet(self.target, self.downsample, self.max_aspect)

    def grid_for(self, image: Image.Image) -> tuple[int, int]:
        """The code grid this image will get (from its size as displayed: EXIF rotations swap width and height)."""
        if self.mode == "fixed":
            side = self.target // self.downsample
            return side, side
        width, height = image.size if _orientation(image) < 5 else image.size[::-1]
        return self.anchor_set.nearest(width, height)

    def __call__(self, image: Image.Image, grid: tuple[int, int] | None = None) -> torch.Tensor:
        image = to_rgb(image)
        grid = tuple(grid) if grid is not None else self.grid_for(image)
        return pil_to_pixels(resize_to_anchor(image, grid, self.downsample))

    def batch(self, images: Sequence[Image.Image], grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Images that share one grid -> BCHW. In ``fixed_anchors`` mode without ``grid``, images whose anchors
        differ raise: group them first (:meth:`grid_for` + :func:`group_by_grid`) or pass ``grid``."""
        if len(images) == 0:
            raise ValueError("preprocess got no images")
        if grid is None and self.mode == "fixed_anchors":
            grids = {self.grid_for(im) for im in images}
            if len(grids) > 1:
                raise ValueError(
                    f"images map to different anchor grids {sorted(grids)}; group them by grid "
                    "(modeling.vq.preprocess.group_by_grid) and preprocess each group, or pass grid="
                )
        return torch.stack([self(im, grid) for im in images])


def group_by_grid(grids: Iterable[tuple[int, int]]) -> dict[tuple[int, int], list[int]]:
    """Indices of items that share a code grid, grids in first-seen order, indices ascending within a grid.

    >>> group_by_grid([(32, 32), (28, 36), (32, 32)])
    {(32, 32): [0, 2], (28, 36): [1]}

    The caller stacks each group into one batch and scatters results back by index.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for i, grid in enumerate(grids):
        groups.setdefault(tuple(grid), []).append(i)
    return groups
