"""Image loading and preprocessing robustness: every Pillow mode to RGB against an independent expectation,
EXIF orientation, the decompression-bomb limit, damaged data, degenerate sizes and LLaVA's "pad" aspect mode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.image_transforms import convert_to_rgb

from kopru.data.formats import open_image
from kopru.image_processing import (
    MAX_IMAGE_PIXELS,
    ImagePreprocessor,
    expand_to_square,
    load_image,
    scrub_object_reprs,
    to_rgb,
)

try:
    from transformers import CLIPImageProcessorPil as PilCLIPImageProcessor
except ImportError:  # older transformers: the slow processor is the PIL/NumPy one
    from transformers import CLIPImageProcessor as PilCLIPImageProcessor

RNG = np.random.default_rng(0)


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def random_pixels(height: int, width: int, channels: int) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, channels), dtype=np.uint8)


def composite_on_white(colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """out = c * a + 255 * (1 - a), a in [0, 1]: the "over" operator onto an opaque white background."""
    a = alpha.astype(np.float64)[..., None] / 255
    return colour.astype(np.float64) * a + 255 * (1 - a)


# ---------------------------------------------------------------------------------------------- modes

def test_rgba_is_composited_onto_white_as_hf_does() -> None:
    pixels = random_pixels(9, 7, 4)
    pixels[0, 0, 3], pixels[0, 1, 3] = 0, 255  # fully transparent and fully opaque pixels included
    image = Image.fromarray(pixels, "RGBA")
    found = np.asarray(load_image(encode(image)))
    np.testing.assert_array_equal(found, convert_to_rgb(image, return_numpy=True))
    np.testing.assert_allclose(found, composite_on_white(pixels[..., :3], pixels[..., 3]), atol=1)
    assert tuple(found[0, 0]) == (255, 255, 255)  # transparent: white, whatever colour hid under it
    assert tuple(found[0, 1]) == tuple(pixels[0, 1, :3])
    # A bare convert("RGB") would have kept the hidden colour.
    assert not np.array_equal(np.asarray(image.convert("RGB")), found)


def test_la_is_composited_and_replicated_to_three_channels() -> None:
    grey, alpha = random_pixels(6, 5, 1)[..., 0], random_pixels(6, 5, 1)[..., 0]
    image = Image.fromarray(np.stack([grey, alpha], -1), "LA")
    found = np.asarray(to_rgb(image))
    expected = composite_on_white(np.repeat(grey[..., None], 3, -1), alpha)
    np.testing.assert_allclose(found, expected, atol=1)
    assert (found[..., 0] == found[..., 1]).all() and (found[..., 1] == found[..., 2]).all()


def test_palette_with_a_transparent_index() -> None:
    palette = [10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6)
    indices = np.array([[0, 1, 1], [1, 0, 1]], dtype=np.uint8)
    image = Image.fromarray(indices, "P")
    image.putpalette(palette)
    image.info["transparency"] = 0
    found = np.asarray(load_image(encode(image)))  # the transparent index survives a PNG round trip
    expected = np.where(indices[..., None] == 0, 255, np.array([200, 100, 50]))
    np.testing.assert_array_equal(found, expected)
    # Without transparency the palette colours come through unchanged.
    del image.info["transparency"]
    np.testing.assert_array_equal(np.asarray(to_rgb(image)),
                                  np.where(indices[..., None] == 0, np.array([10, 20, 30]), np.array([200, 100, 50])))


def test_greyscale_and_bilevel() -> None:
    grey = random_pixels(4, 6, 1)[..., 0]
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(grey, "L"))), np.repeat(grey[..., None], 3, -1))
    bits = Image.fromarray(np.array([[0, 255, 0]], dtype=np.uint8), "L").convert("1")
    np.testing.assert_array_equal(np.asarray(to_rgb(bits))[0, :, 0], [0, 255, 0])


def test_cmyk_by_the_standard_formula() -> None:
    cmyk = random_pixels(5, 4, 4)
    found = np.asarray(to_rgb(Image.fromarray(cmyk, "CMYK"))).astype(int)
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    np.testing.assert_allclose(found, (255 - c) * (255 - k) / 255, atol=1)


SIXTEEN_BIT = np.array([[0, 1, 128, 129, 257, 32767, 32768, 65278, 65534, 65535]], dtype=np.uint16)
# round(v * 255 / 65535): 257 k -> k exactly; 32767.5 is the midpoint between 127 and 128.
SIXTEEN_BIT_AS_8 = [0, 0, 0, 1, 1, 127, 128, 254, 255, 255]


@pytest.mark.parametrize("byte_order", ["<u2", ">u2"])  # Pillow: I;16 (little endian), I;16B (big endian)
def test_sixteen_bit_greyscale_is_scaled_not_clipped(byte_order) -> None:
    image = Image.fromarray(SIXTEEN_BIT.astype(byte_order))
    assert image.mode == ("I;16" if byte_order == "<u2" else "I;16B")
    found = np.asarray(to_rgb(image))
    assert found.shape == (1, SIXTEEN_BIT.shape[1], 3)
    assert found[0, :, 0].tolist() == SIXTEEN_BIT_AS_8
    # Pillow's own conversion clips everything above 255 to white: what this replaces.
    assert np.asarray(image.convert("RGB"))[0, 5, 0] == 255


def test_sixteen_bit_png_from_disk(tmp_path) -> None:
    path = tmp_path / "depth.png"
    Image.fromarray(SIXTEEN_BIT).save(path)
    assert load_image(path).getpixel((6, 0)) == (128, 128, 128)
    # 32-bit "I", as older Pillow opened 16-bit PNGs: read as 16-bit.
    assert np.asarray(to_rgb(Image.fromarray(SIXTEEN_BIT.astype(np.int32), "I")))[0, :, 0].tolist() == SIXTEEN_BIT_AS_8


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 65535), min_size=1, max_size=40))
def test_sixteen_bit_scaling_property(values) -> None:
    """8-bit output = round(v * 255 / 65535): monotonic, 0 and 65535 to 0 and 255, within 0.5 of exact."""
    image = Image.fromarray(np.array([values], dtype=np.uint16))
    found = np.asarray(to_rgb(image))[0, :, 0].astype(np.float64)
    exact = np.array(values, dtype=np.float64) * 255 / 65535
    assert np.abs(found - exact).max() <= 0.5
    order = np.argsort(values, kind="stable")
    assert (np.diff(found[order]) >= 0).all()


def test_float_images_are_refused() -> None:
    with pytest.raises(ValueError, match=r"mode 'F'.*32-bit float"):
        to_rgb(Image.fromarray(np.zeros((2, 2), dtype=np.float32)))


def test_opaque_rgba_equals_its_rgb() -> None:
    rgb = random_pixels(3, 3, 3)
    rgba = np.concatenate([rgb, np.full((3, 3, 1), 255, np.uint8)], -1)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(rgba, "RGBA"))), rgb)


# ------------------------------------------------------------------------------------------------ EXIF

# EXIF orientation -> the array operation that shows the stored pixels upright (EXIF 2.3, tag 0x0112).
ORIENTATIONS = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
    6: lambda a: np.rot90(a, -1),  # 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),  # mirrored along the anti-diagonal
    8: lambda a: np.rot90(a, 1),  # 90 degrees counter-clockwise
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(orientation) -> None:
    pixels = random_pixels(2, 3, 3)  # 3 wide, 2 high: rotations swap the sides
    exif = Image.Exif()
    exif[0x0112] = orientation
    found = load_image(encode(Image.fromarray(pixels), exif=exif))
    expected = ORIENTATIONS[orientation](pixels)
    assert found.size == (expected.shape[1], expected.shape[0])
    np.testing.assert_array_equal(np.asarray(found), expected)
    # The data loaders take the same path.
    np.testing.assert_array_equal(np.asarray(open_image(encode(Image.fromarray(pixels), exif=exif))), expected)


# ----------------------------------------------------------------------------------------- bad input

def png_header_only(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height 8-bit greyscale, and no pixel data at all: only a
    check made from the header, before decoding, can report its size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_pixel_limit_is_checked_from_the_header() -> None:
    assert MAX_IMAGE_PIXELS == 89_478_485
    with pytest.raises(ValueError, match=r"10000x10000 = 100,000,000 pixels is over the limit of 89,478,485"):
        load_image(png_header_only(10_000, 10_000))
    # Beyond twice Pillow's own threshold Pillow refuses at open; the message still names our limit.
    with pytest.raises(ValueError, match=r"over the pixel limit of 89,478,485"):
        load_image(png_header_only(40_000, 40_000))
    with pytest.raises(ValueError, match=r"64x64 = 4,096 pixels is over the limit of 4,095"):
        load_image(encode(Image.new("RGB", (64, 64))), max_pixels=4095)
    assert load_image(encode(Image.new("RGB", (64, 64))), max_pixels=4096).size == (64, 64)
    with pytest.raises(ValueError, match=r"over the limit of 100"):
        load_image(Image.new("RGB", (11, 10)), max_pixels=100)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.97])
def test_truncated_files_fail_with_their_name(tmp_path, fmt, keep) -> None:
    data = encode(Image.fromarray(random_pixels(64, 64, 3)), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match=rf"image file {path}: .*(truncated or corrupt|not recognise)"):
        load_image(path)


def test_errors_name_the_source_never_a_python_object() -> None:
    """Bytes are read through an in-memory stream that Pillow's own messages show as '<_io.BytesIO object at
    0x...>': every message names the source instead, as given by `name`, or the bytes' length."""
    png = encode(Image.fromarray(random_pixels(64, 64, 3)), "PNG")
    cases = {
        "not an image": (b"just some text, no image", "expected an image Pillow can read"),
        "header cut": (png[:20], "expected a complete image header, found it truncated or corrupt"),
        "data cut": (png[: len(png) // 2], "expected complete image data, found it truncated or corrupt"),
    }
    for case, (data, expected) in cases.items():
        for name, prefix in (("upload.png", "upload.png: "), (None, f"image bytes ({len(data):,} bytes): ")):
            with pytest.raises(ValueError) as caught:
                load_image(data, name=name)
            message = str(caught.value)
            assert message.startswith(prefix + expected), (case, message)
            assert "0x" not in message, (case, message)


def test_object_reprs_are_scrubbed() -> None:
    stream = io.BytesIO()
    pillow_style = f"cannot identify image file {stream!r}"
    assert " object at 0x" in pillow_style  # what Pillow would have us show
    assert scrub_object_reprs(pillow_style, "image 2 of the request") == (
        "cannot identify image file image 2 of the request")


def test_bytes_that_are_not_an_image(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"image bytes \(11 bytes\): expected an image Pillow can read"):
        load_image(b"hello world")
    with pytest.raises(ValueError, match=r"found 0 bytes"):
        load_image(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match=rf"image file {text}: expected an image Pillow can read"):
        load_image(text)
    with pytest.raises(FileNotFoundError, match="nothing there"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(TypeError, match="found int"):
        load_image(3)


def test_zero_size_images() -> None:
    for size in ((0, 5), (5, 0)):
        with pytest.raises(ValueError, match=r"at least 1x1 pixels, found \d+x\d+"):
            load_image(Image.new("RGB", size))
        with pytest.raises(ValueError, match=r"at least 1x1 pixels"):
            ImagePreprocessor(size=8)([Image.new("RGB", size)])


def test_one_pixel_wide_images() -> None:
    thin = Image.new("RGB", (1, 20_000), (10, 20, 30))
    # Resize squashes it, which is fine.
    assert ImagePreprocessor(size=8, mode="resize")([thin]).shape == (1, 3, 8, 8)
    # Pad would build a 20000 x 20000 square, a 2000000 x 1 one crop a 16000000 x 8 strip: refused with the numbers.
    with pytest.raises(ValueError, match=r"1x20000 image would be padded to a square at 20000x20000 = "
                                         r"400,000,000 pixels, over the limit"):
        ImagePreprocessor(size=8, mode="pad")([thin])
    wide = Image.new("RGB", (2_000_000, 1))
    with pytest.raises(ValueError, match=r"resized before the centre crop at 16000000x8 = 128,000,000"):
        ImagePreprocessor(size=8, mode="crop")([wide])
    # A moderate 1 x N still works in every mode.
    for mode in ("resize", "crop", "pad"):
        assert ImagePreprocessor(size=8, mode=mode)([Image.new("RGB", (1, 50))]).shape == (1, 3, 8, 8)


# --------------------------------------------------------------------------------------------- pad mode

def test_pad_colour_is_llavas_truncated_mean() -> None:
    clip_mean = (0.48145466, 0.4578275, 0.40821073)
    # LLaVA: tuple(int(x * 255) for x in image_processor.image_mean) = (122.77, 116.75, 104.09) truncated.
    assert ImagePreprocessor(image_mean=clip_mean).pad_colour == (122, 116, 104)


@pytest.mark.parametrize(("width", "height"), [(3, 2), (5, 2), (2, 5), (4, 4)])
def test_pad_mode_by_hand(width, height) -> None:
    """Square of the longer side, the image at offset (long - short) // 2, the rest the mean colour; here the
    output size equals the square, so no resampling happens and every value is known exactly."""
    pixels = random_pixels(height, width, 3)
    mean, std = (0.2, 0.4, 0.6), (0.5, 0.25, 0.125)
    side = max(width, height)
    expected = np.empty((side, side, 3), dtype=np.float64)
    expected[:] = (51, 102, 153)  # int(0.2 * 255), int(0.4 * 255), int(0.6 * 255)
    top, left = (side - height) // 2, (side - width) // 2
    expected[top:top + height, left:left + width] = pixels
    expected = (expected / 255 - np.array(mean)) / np.array(std)
    found = ImagePreprocessor(size=side, mode="pad", image_mean=mean, image_std=std)([Image.fromarray(pixels)])
    torch.testing.assert_close(found[0], torch.from_numpy(expected).permute(2, 0, 1).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(("width", "height"), [(40, 24), (24, 41), (33, 33), (50, 7)])
def test_pad_mode_then_clip_resize_matches_hf(width, height) -> None:
    """LLaVA-1.5: expand2square, then CLIPImageProcessor (shortest side to 36, centre crop 32). The square is
    built by hand here; HF's PIL CLIP processor does the rest."""
    pixels = random_pixels(height, width, 3)
    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    side = max(width, height)
    square = np.empty((side, side, 3), dtype=np.uint8)
    square[:] = (122, 116, 104)
    top, left = (side - height) // 2, (side - width) // 2
    square[top:top + height, left:left + width] = pixels
    hf = PilCLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                               image_mean=list(mean), image_std=list(std))
    expected = hf(Image.fromarray(square), return_tensors="pt").pixel_values
    ours = ImagePreprocessor(size=32, mode="pad", shortest_edge=36, image_mean=mean, image_std=std)
    torch.testing.assert_close(ours([Image.fromarray(pixels)]), expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(expand_to_square(Image.fromarray(pixels), (122, 116, 104))), square)


def test_crop_mode_on_rgba_matches_hf() -> None:
    """With transparency, HF composites onto white before its resize and crop; so does the preprocessor."""
    image = Image.fromarray(random_pixels(40, 52, 4), "RGBA")
    hf = PilCLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ours = ImagePreprocessor(size=32, mode="crop", image_mean=tuple(hf.image_mean), image_std=tuple(hf.image_std))
    torch.testing.assert_close(ours([image]), hf(image, return_tensors="pt").pixel_values, atol=1e-5, rtol=0)


def test_pad_mode_from_config_and_round_trip(tmp_path) -> None:
    settings = ('{"do_center_crop": true, "crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}, '
                '"image_aspect_ratio": "pad"')
    # No class named and no model_type to pick one (HF would take config.json's): refused, not guessed.
    (tmp_path / "preprocessor_config.json").write_text(settings + "}")
    with pytest.raises(ValueError, match=r"setting 'image_processor_type': expected one of .*found null"):
        ImagePreprocessor.from_pretrained(tmp_path)
    assert ImagePreprocessor.from_pretrained(tmp_path, model_type="llava").processor_type == "CLIPImageProcessor"
    (tmp_path / "preprocessor_config.json").write_text(settings + ', "image_processor_type": "CLIPImageProcessor"}')
    loaded = ImagePreprocessor.from_pretrained(tmp_path)
    assert (loaded.mode, loaded.size, loaded.shortest_edge) == ("pad", 336, 336)
    saved = tmp_path / "saved"
    loaded.save_pretrained(saved)
    assert ImagePreprocessor.from_pretrained(saved) == loaded
    with pytest.raises(ValueError, match=r"expected mode 'resize', 'crop' or 'pad', found 'squash'"):
        ImagePreprocessor(size=4, mode="squash")([Image.new("RGB", (4, 4))])


def test_preprocessor_reads_files_and_bytes_through_load_image(tmp_path) -> None:
    pixels = random_pixels(12, 10, 3)
    exif = Image.Exif()
    exif[0x0112] = 8
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    preprocessor = ImagePreprocessor(size=12, mode="pad")
    upright = Image.fromarray(np.rot90(pixels, 1).copy())  # 12 wide, 10 high once the tag is applied
    expected = preprocessor([upright])
    torch.testing.assert_close(preprocessor([str(path)]), expected, atol=0, rtol=0)
    torch.testing.assert_close(preprocessor([path.read_bytes()]), expected, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"image bytes \(4 bytes\): expected an image Pillow can read"):
        preprocessor([b"oops"])
    with pytest.raises(TypeError, match="found ndarray"):
        preprocessor([pixels])
