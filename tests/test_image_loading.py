"""One image-loading path for every tokenizer and reader: EXIF orientation applied, alpha composited onto white,
16-bit greyscale scaled (not clipped) to 8 bits, any other mode to RGB. Every file is generated here."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_process.converters import ImageSource
from data_process.eval_recon import _source
from modeling.vq.preprocess import Preprocessor, decode_image, to_rgb
from modeling.vq.shapes_vq import ShapesVQ, ShapesVQConfig

RED, BLUE, GREEN = (255, 0, 0), (0, 0, 255), (0, 255, 0)
ORIENTATION = 0x0112  # the EXIF tag


def upright() -> Image.Image:
    """64 wide x 32 high, red left half, blue right half, a green block in the top-left corner: every rotation and
    flip of it is a different picture."""
    image = Image.new("RGB", (64, 32), BLUE)
    image.paste(Image.new("RGB", (32, 32), RED), (0, 0))
    image.paste(Image.new("RGB", (8, 8), GREEN), (0, 0))
    return image


def stored_with_orientation(orientation: int, fmt: str) -> bytes:
    """What a camera writes: the pixels as the sensor saw them plus the tag that turns them upright.

    Orientation 6 means "rotate 90 degrees clockwise to display", so the sensor image is the upright one rotated
    90 degrees counter-clockwise; orientation 8 is the reverse.
    """
    stored = upright().transpose(Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270)
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif.tobytes(), **({"quality": 100, "subsampling": 0} if fmt == "JPEG" else {}))
    return buf.getvalue()


def rgb_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_orientation_is_applied(orientation, fmt):
    data = stored_with_orientation(orientation, fmt)
    assert Image.open(io.BytesIO(data)).size == (32, 64)  # stored sideways
    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (64, 32)
    tolerance = 8 if fmt == "JPEG" else 0  # JPEG at quality 100 is nearly, not exactly, lossless
    assert np.abs(rgb_array(image) - rgb_array(upright())).max() <= tolerance
    assert to_rgb(image) is image  # idempotent: the tag is gone from the upright copy


def _sideways_photo(orientation: int = 6) -> Image.Image:
    return Image.open(io.BytesIO(stored_with_orientation(orientation, "PNG")))


def test_every_tokenizer_preprocess_sees_the_photo_upright():
    """Tokenizers called directly on an opened file (not through a reader) must not encode it sideways."""
    pre = Preprocessor("fixed_anchors", target=64, downsample=16, max_aspect=2.5)  # Chameleon's / HQ-VAE's path
    assert pre.grid_for(_sideways_photo()) == pre.grid_for(upright()) == (3, 5)  # landscape grid, not portrait
    torch.testing.assert_close(pre(_sideways_photo()), pre(upright()), rtol=0, atol=0)
    torch.testing.assert_close(pre.batch([_sideways_photo()]), pre.batch([upright()]), rtol=0, atol=0)
    shapes = ShapesVQ(ShapesVQConfig(channels=(8, 16, 32), codebook_size=64))
    torch.testing.assert_close(shapes.preprocess([_sideways_photo(8)]), shapes.preprocess([upright()]), rtol=0, atol=0)


def test_every_reader_applies_orientation(tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(stored_with_orientation(6, "JPEG"))
    for loaded in (ImageSource(str(path)).open(), _source(ImageSource(str(path))).load()):
        assert loaded.size == (64, 32) and np.abs(rgb_array(loaded) - rgb_array(upright())).max() <= 8


def rgba_with_hidden_colour() -> Image.Image:
    """Left half opaque blue; right half fully transparent but with red RGB values underneath."""
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:, :32] = [0, 0, 255, 255]
    rgba[:, 32:] = [255, 0, 0, 0]
    return Image.fromarray(rgba, "RGBA")


def test_alpha_is_composited_onto_white_for_every_tokenizer():
    image = rgba_with_hidden_colour()
    got = np.asarray(to_rgb(image))
    assert (got[:, :32] == [0, 0, 255]).all() and (got[:, 32:] == 255).all()
    # the shapes VQ's preprocessing (64 px, no resize here): hidden red must come out white, i.e. +1 in [-1, 1]
    shapes = ShapesVQ(ShapesVQConfig(channels=(8, 16, 32), codebook_size=64))
    pixels = shapes.preprocess([image])[0]
    assert pixels[:, :, 40:].eq(1.0).all(), "pixels under alpha 0 were encoded instead of white"
    assert pixels[2, :, :24].eq(1.0).all() and pixels[0, :, :24].eq(-1.0).all()  # opaque blue stays blue
    torch.testing.assert_close(Preprocessor("fixed", 64, 16)(image), shapes.preprocess([image])[0], rtol=0, atol=0)


def test_palette_with_transparency_la_cmyk_and_grey_become_rgb():
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)  # index 1 = red
    palette.info["transparency"] = 1  # ... and transparent
    assert (np.asarray(to_rgb(palette)) == 255).all()
    la = Image.fromarray(np.stack([np.full((4, 4), 10, np.uint8), np.zeros((4, 4), np.uint8)], -1), "LA")
    assert (np.asarray(to_rgb(la)) == 255).all()
    assert np.asarray(to_rgb(Image.new("CMYK", (4, 4), (0, 0, 0, 0)))).tolist() == [[[255] * 3] * 4] * 4
    grey = to_rgb(Image.new("L", (4, 4), 77))
    assert grey.mode == "RGB" and (np.asarray(grey) == 77).all()


def png16(values_HW: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values_HW.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_png_is_scaled_not_clipped():
    gradient = np.linspace(0, 65535, 64 * 64).round().reshape(64, 64)
    data = png16(gradient)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # really a 16-bit file
    got = np.asarray(decode_image(data))
    assert got.shape == (64, 64, 3) and (got[..., 0] == got[..., 2]).all()
    np.testing.assert_array_equal(got[..., 0], np.rint(gradient / 257.0).astype(np.uint8))
    assert (got == 255).mean() < 0.01  # a plain convert("RGB") made 99.6% of these pixels 255
    for mode in ("I;16B", "I"):  # big-endian 16-bit and the 32-bit int mode some decoders give 16-bit files
        image = Image.open(io.BytesIO(data)).convert("I") if mode == "I" else \
            Image.frombytes("I;16B", (64, 64), gradient.astype(">u2").tobytes())
        np.testing.assert_array_equal(np.asarray(to_rgb(image))[..., 1], np.rint(gradient / 257.0).astype(np.uint8))


def test_corrupt_and_truncated_files_raise_and_float_pixels_are_refused():
    good = png16(np.zeros((8, 8)))
    with pytest.raises(OSError):
        decode_image(good[: len(good) // 2])
    with pytest.raises(OSError):
        decode_image(b"not an image at all")
    with pytest.raises(ValueError, match="mode F"):
        to_rgb(Image.new("F", (4, 4), 0.5))
