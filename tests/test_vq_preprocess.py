"""Preprocessing: Chameleon's fixed crop against a hand computation, ILLUME-style anchors, grouping."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from modeling.vq.preprocess import (
    AnchorSet,
    Preprocessor,
    group_by_grid,
    pil_to_pixels,
    preprocess_image,
    resize_cover_crop,
    resize_to_anchor,
    whiten_transparency,
)


def _random_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = len(mode)
    return Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode)


def test_whiten_transparency_blends_onto_white_and_truncates():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = [100, 0, 201]
    rgba[..., 3] = [[255, 0], [128, 77]]
    out = np.asarray(whiten_transparency(Image.fromarray(rgba, "RGBA")))
    for (i, j), a in np.ndenumerate(rgba[..., 3]):
        expected = [int((1 - a / 255) * 255 + a / 255 * c) for c in (100, 0, 201)]  # int() truncates, like astype
        assert out[i, j].tolist() == expected
    assert out[0, 1].tolist() == [255, 255, 255]  # fully transparent -> white
    opaque = Image.fromarray(np.full((2, 2, 4), 255, dtype=np.uint8), "RGBA")
    assert whiten_transparency(opaque).mode == "RGB"


def test_fixed_mode_matches_hand_computation():
    image = _random_image(90, 60, "RGBA", seed=1)  # landscape 3:2 with alpha
    target = 32
    got = preprocess_image(image, "fixed", target=target, downsample=16)
    # By hand: whiten, shorter side 60 -> 32 (scale 32/60: width round(48.0) = 48), LANCZOS, centre crop x0 = 8.
    rgba = np.asarray(image).astype(np.float64)
    a = rgba[..., 3:] / 255.0
    white = Image.fromarray(((1 - a) * 255 + a * rgba[..., :3]).astype(np.uint8), "RGB")
    resized = white.resize((48, 32), Image.LANCZOS)
    crop = np.asarray(resized.crop((8, 0, 40, 32))).astype(np.float32)
    expected = torch.from_numpy(crop / 255.0 * 2 - 1).permute(2, 0, 1)
    assert got.shape == (3, target, target)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.min() >= -1 and got.max() <= 1


def test_pixels_range_and_extremes():
    black, white = Image.new("RGB", (4, 4), (0, 0, 0)), Image.new("RGB", (4, 4), (255, 255, 255))
    assert pil_to_pixels(black).eq(-1).all() and pil_to_pixels(white).eq(1).all()


def test_anchor_set_areas_multiples_and_aspects():
    anchors = AnchorSet(target=512, downsample=16, max_aspect=2.5)
    area = 32 * 32
    assert (32, 32) in anchors.anchors and (28, 36) in anchors.anchors and (36, 28) in anchors.anchors
    assert (24, 42) in anchors.anchors and (42, 24) in anchors.anchors
    for h, w in anchors.anchors:
        assert 0.9 * area <= h * w <= area
        assert max(h / w, w / h) <= 2.5
        ph, pw = anchors.pixel_size((h, w))
        assert ph % 16 == 0 and pw % 16 == 0
    # symmetric: every portrait anchor has its landscape twin
    assert {(w, h) for h, w in anchors.anchors} == set(anchors.anchors)


@pytest.mark.parametrize(
    "size, expected",
    [((512, 512), (32, 32)), ((640, 480), None), ((1000, 250), None), ((360, 280), None)],
)
def test_nearest_anchor(size, expected):
    anchors = AnchorSet(target=512, downsample=16, max_aspect=2.5)
    got = anchors.nearest(*size)
    if expected is None:  # brute force over the set
        r = math.log(size[0] / size[1])
        best = min(abs(math.log(w / h) - r) for h, w in anchors.anchors)
        assert abs(math.log(got[1] / got[0]) - r) == best
    else:
        assert got == expected


def test_nearest_anchor_exact_ratios():
    anchors = AnchorSet(target=512, downsample=16, max_aspect=2.5)
    assert anchors.nearest(36 * 16, 28 * 16) == (28, 36)  # 9:7 landscape -> the 28x36 grid
    assert anchors.nearest(28, 36) == (36, 28)  # portrait
    assert anchors.nearest(4000, 100) == min(anchors.anchors, key=lambda hw: hw[0] / hw[1])  # clamps to widest


def test_resize_to_anchor_and_preprocess_anchor_mode():
    image = _random_image(400, 300)
    anchors = AnchorSet(target=64, downsample=16, max_aspect=2.5)
    grid = anchors.nearest(400, 300)
    assert resize_to_anchor(image, grid, 16).size == (grid[1] * 16, grid[0] * 16)
    pixels = preprocess_image(image, "fixed_anchors", target=64, downsample=16)
    assert pixels.shape == (3, grid[0] * 16, grid[1] * 16)


def test_resize_cover_crop_keeps_aspect():
    img = Image.new("RGB", (200, 100))
    assert resize_cover_crop(img, 50, 50).size == (50, 50)
    assert resize_cover_crop(img, 40, 100).size == (100, 40)


def test_preprocessor_batch_refuses_mixed_grids_and_groups():
    pre = Preprocessor("fixed_anchors", target=64, downsample=16)
    wide, square = _random_image(160, 64), _random_image(64, 64)
    with pytest.raises(ValueError, match="different anchor grids"):
        pre.batch([wide, square])
    assert pre.batch([wide, square], grid=(2, 2)).shape == (2, 3, 32, 32)
    grids = [pre.grid_for(im) for im in (wide, square, wide)]
    groups = group_by_grid(grids)
    assert groups == {grids[0]: [0, 2], (4, 4): [1]}
    with pytest.raises(ValueError, match="unknown preprocess mode"):
        Preprocessor("stretch")
