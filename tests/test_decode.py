"""Image header check and OpenCV decode to 8-bit RGB (workers/read/decode.py), on tiny images made here."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps
from tarfactory import encode, make_jpeg, make_jpeg_declaring, make_png, make_png_header_only, make_rgb

from schemas.reasons import ErrorReason, SampleRejected
from workers.read.decode import (
    apply_orientation,
    check_jpeg_structure,
    decode_image,
    read_header,
)

LIMIT = 50_000_000


def pillow_rgb(data: bytes) -> np.ndarray:
    """Reference decode: Pillow, EXIF transposed, converted to RGB."""
    return np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))


def rejected(data: bytes, max_pixels: int = LIMIT) -> SampleRejected:
    with pytest.raises(SampleRejected) as info:
        decode_image(data, max_pixels)
    return info.value


def test_rgb_png_is_lossless():
    rgb = make_rgb(7, 5, seed=3)
    out = decode_image(encode(Image.fromarray(rgb), "PNG"), LIMIT)
    assert out.dtype == np.uint8 and out.shape == (5, 7, 3)
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "BMP"])
def test_formats_match_pillow(fmt):
    rgb = make_rgb(24, 16, seed=1)
    data = encode(Image.fromarray(rgb), fmt)
    out = decode_image(data, LIMIT)
    assert out.shape == (16, 24, 3)
    # JPEG/WebP decoders may differ by rounding (IDCT / upsampling implementations)
    assert np.abs(out.astype(int) - pillow_rgb(data)).max() <= (0 if fmt == "BMP" else 8)


def test_header_read_without_decoding():
    header = read_header(make_png_header_only(9000, 8000))  # 72 Mpx: data is 79 bytes
    assert (header.format, header.width_px, header.height_px) == ("PNG", 9000, 8000)
    error = rejected(make_png_header_only(9000, 8000))
    assert error.reason == ErrorReason.IMAGE_TOO_LARGE and "9000x8000" in error.detail
    # above Pillow's own bomb limit (2 x 89.5 Mpx): refused by max_pixels, not by Pillow (issue 14 item 4)
    error = rejected(make_png_header_only(30000, 30000))
    assert error.reason == ErrorReason.IMAGE_TOO_LARGE and "> max_pixels" in error.detail


def test_pixel_limit_is_checked_before_decoding():
    data = make_png(40, 30)
    assert decode_image(data, max_pixels=1200).shape == (30, 40, 3)
    error = rejected(data, max_pixels=1199)
    assert error.reason == ErrorReason.IMAGE_TOO_LARGE and "40x30" in error.detail


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = make_jpeg(12, 8, seed=2, exif=exif.tobytes())
    out = decode_image(data, LIMIT)
    expected = pillow_rgb(data)
    assert out.shape == expected.shape
    assert np.abs(out.astype(int) - expected).max() <= 8


def test_apply_orientation_on_a_labelled_array():
    a = np.arange(6).reshape(2, 3, 1)
    np.testing.assert_array_equal(apply_orientation(a, 6)[..., 0], [[3, 0], [4, 1], [5, 2]])  # 90° clockwise
    np.testing.assert_array_equal(apply_orientation(a, 8)[..., 0], [[2, 5], [1, 4], [0, 3]])  # 90° counter


def test_jpeg_structure_accepts_progressive_restart_and_trailer():
    image = Image.fromarray(make_rgb(64, 48, seed=4))
    for params in ({"progressive": True}, {"restart_marker_blocks": 1}, {"optimize": True}):
        data = encode(image, "JPEG", **params)
        check_jpeg_structure(data)
        check_jpeg_structure(data + b"trailing bytes after EOI")


def test_jpeg_without_eoi_is_rejected():
    data = make_jpeg(32, 32)
    with pytest.raises(SampleRejected, match="EOI"):
        check_jpeg_structure(data[:-2])


def test_jpeg_restart_markers_out_of_order_are_rejected():
    data = bytearray(encode(Image.fromarray(make_rgb(64, 64, seed=5)), "JPEG", restart_marker_blocks=1))
    first = data.index(b"\xff\xd0")
    second = data.index(b"\xff\xd1", first)
    data[second + 1] = 0xD3  # RST1 -> RST3
    error = rejected(bytes(data))
    assert error.reason == ErrorReason.IMAGE_UNDECODABLE and "restart" in error.detail


def test_non_image_format_is_rejected():
    gif = encode(Image.fromarray(make_rgb(4, 4)).convert("P"), "GIF")
    error = rejected(gif)
    assert error.reason == ErrorReason.IMAGE_UNDECODABLE and "GIF" in error.detail


@pytest.mark.parametrize(
    "data",
    [make_jpeg_declaring(19000, 19000), make_png_header_only(30000, 30000)],
    ids=["jpeg-361MP", "png-900MP"],
)
def test_max_pixels_is_the_only_limit_above_pillows(data: bytes) -> None:
    """Headers above Pillow's bomb limit (2 x 89.5 MP) pass when ``max_pixels`` allows them (before: Pillow
    refused them whatever --max-pixels said); Pillow's process-wide limit is neither changed nor warned."""
    import warnings

    from workers.read.decode import check_pixel_limit, read_header

    before = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a DecompressionBombWarning would fail the test
        header = read_header(data)
    assert Image.MAX_IMAGE_PIXELS == before and header.width_px * header.height_px > 2 * before
    check_pixel_limit(header, 1_000_000_000)
    with pytest.raises(SampleRejected, match="> max_pixels 50000000") as refused:
        check_pixel_limit(header, 50_000_000)
    assert refused.value.reason == ErrorReason.IMAGE_TOO_LARGE


def test_max_pixels_above_opencvs_limit_is_refused_by_the_config() -> None:
    from workers.read.reader import ReaderConfig

    assert ReaderConfig(max_pixels=1 << 30).max_pixels == 1 << 30
    with pytest.raises(ValueError, match="above OpenCV's decode limit 1073741824"):
        ReaderConfig(max_pixels=(1 << 30) + 1)


def test_data_no_opener_accepts_is_undecodable() -> None:
    with pytest.raises(
        SampleRejected, match="not a recognised image format .accepted: JPEG, PNG, WEBP, BMP."
    ):
        decode_image(b"not an image at all", 1000)
