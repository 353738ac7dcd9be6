"""Image bytes -> 8-bit RGB array: header check first, then OpenCV decode (docs/design.md §1).

Order of checks (each failure raises ``SampleRejected`` with the reason in brackets):

1. zero bytes [``image_empty``];
2. Pillow opens the header lazily (no pixel data is decoded) and must recognise one of
   ``ACCEPTED_FORMATS`` [``image_undecodable``];
3. ``width * height > max_pixels`` [``image_too_large``], before any pixel buffer is allocated: OpenCV's
   own limit is one process-wide variable (``OPENCV_IO_MAX_IMAGE_PIXELS``, 2**30) and would decode a
   30000x30000 bomb into gigabytes;
4. JPEG only: marker structure (``check_jpeg_structure``) [``image_undecodable``];
5. ``cv2.imdecode(IMREAD_UNCHANGED)`` must succeed and return the header's size [``image_undecodable``].

What counts as corrupt. JPEG carries no checksum, and libjpeg decodes much damaged data with only a
warning on stderr (OpenCV returns the garbled image). We therefore reject a JPEG whose *structure* is
broken: no SOI, a marker segment running past the end, an invalid marker or out-of-order restart marker
inside entropy-coded data, or no EOI marker after the last scan (a truncated file). Bytes after EOI are
allowed (camera trailers, motion photos). Damage that leaves a valid marker structure (e.g. flipped bits
inside entropy-coded data, a zeroed sector) cannot be told apart from a real picture by any decoder and
is accepted. PNG chunks carry CRCs, which libpng checks; WebP and BMP rely on their decoders' checks.

``max_pixels`` is the only pixel limit. Pillow's own bomb check (``Image.MAX_IMAGE_PIXELS``, a warning
above 89.5 MP and an error above 2x that, 179 MP) is a process-wide variable; it is neither read nor changed
here: ``open_header`` opens the header through Pillow's registered openers for ``ACCEPTED_FORMATS`` (the
loop of ``Image.open`` without its final ``_decompression_bomb_check``), which for JPEG, PNG and BMP parse
the header only. Two exceptions stay: Pillow's WebP opener allocates its decoder's canvas while opening and
checks Pillow's limit itself first (WebP is at most 16383x16383 = 268 MP, so only WebPs of 179-268 MP with
``--max-pixels`` above 179 MP are refused by Pillow: ``image_too_large``, the message says so); and OpenCV's
own limit, 2**30 pixels unless ``OPENCV_IO_MAX_IMAGE_PIXELS`` says otherwise, above which ``max_pixels``
is refused by ``ReaderConfig`` (``opencv_pixel_limit``).

The format is decided by content, not by the member's extension: a PNG stored as ``.jpg`` (or the
reverse) decodes as what it is.

Colour conversion (``to_rgb8``): grayscale -> RGB by replication; alpha is *dropped*, not composited (as
the bottom-up-attention extractor's ``cv2.imread`` does, so features match the reference preprocessing);
palette images are expanded by the decoder; 16-bit samples are scaled to 8 bits with rounding
(``round(v * 255 / 65535)``); CMYK JPEGs are converted to RGB by libjpeg inside OpenCV. The EXIF
orientation (tag 0x0112, read by Pillow) is applied last, so the returned array is the picture as
displayed; ``IMREAD_UNCHANGED`` makes OpenCV itself ignore EXIF, so it is never applied twice. An EXIF
block that cannot be parsed is logged and the orientation taken as 1 (the pixels are fine).
"""

from __future__ import annotations

import io
import logging
import os
import struct
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from schemas.reasons import ErrorReason, SampleRejected

log = logging.getLogger(__name__)

ACCEPTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP"})  # Pillow format names
OPENERS = ("JPEG", "PNG", "WEBP", "BMP")  # Pillow's registered openers tried, in order (JPEG yields MPO too)
OPENCV_MAX_PIXELS_ENV = "OPENCV_IO_MAX_IMAGE_PIXELS"
OPENCV_DEFAULT_MAX_PIXELS = 1 << 30
JPEG_FORMATS = frozenset({"JPEG", "MPO"})
EXIF_ORIENTATION_TAG = 0x0112
UINT16_MAX = 65535
UINT8_MAX = 255

# JPEG markers (ITU-T T.81 Table B.1)
_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_RST0, _RST7 = 0xD0, 0xD7
_TEM = 0x01
# markers that may legitimately follow a scan's entropy-coded data (progressive / multi-scan JPEGs)
_AFTER_SCAN_MARKERS = frozenset({_EOI, _SOS, 0xC4, 0xCC, 0xDB, 0xDC, 0xDD, 0xFE, *range(0xE0, 0xF0)})


@dataclass(frozen=True)
class ImageHeader:
    """What an image's header declares, read without decoding pixels.

    Attributes:
        format: Pillow's format name (``JPEG``, ``PNG``, ...), from the content, not the file name.
        width_px, height_px: stored size in pixels, before the EXIF orientation is applied.
        orientation: EXIF orientation 1..8 (1 when absent or out of range).
    """

    format: str
    width_px: int
    height_px: int
    orientation: int


def _reject(detail: str) -> SampleRejected:
    return SampleRejected(ErrorReason.IMAGE_UNDECODABLE, detail)


def read_header(data: bytes) -> ImageHeader:
    """Read format, size and EXIF orientation from the header with Pillow (lazy: no pixel decoding).

    Raises:
        SampleRejected: ``image_empty``, ``image_too_large`` (Pillow's bomb limit) or ``image_undecodable``.
    """
    if len(data) == 0:
        raise SampleRejected(ErrorReason.IMAGE_EMPTY, "image member has 0 bytes")
    try:
        with open_header(data) as image:
            fmt, (width, height) = str(image.format), image.size
            orientation = _exif_orientation(image.info.get("exif"))
    except Image.DecompressionBombError as exc:  # only Pillow's WebP opener checks while opening
        raise SampleRejected(
            ErrorReason.IMAGE_TOO_LARGE, f"Pillow's WebP opener refused the header (its own limit): {exc}"
        ) from None
    except UnidentifiedImageError as exc:
        raise _reject(str(exc)) from None
    except (OSError, ValueError, EOFError, SyntaxError) as exc:
        raise _reject(f"unreadable image header: {type(exc).__name__}: {exc}") from None
    if fmt not in ACCEPTED_FORMATS:
        raise _reject(f"image format {fmt} is not accepted (accepted: {sorted(ACCEPTED_FORMATS)})")
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1
    return ImageHeader(format=fmt, width_px=width, height_px=height, orientation=orientation)


def open_header(data: bytes) -> Image.Image:
    """Open ``data``'s header with Pillow's registered opener for its format (``OPENERS``), without
    ``Image.open``'s process-wide bomb check (module docstring); no pixel data is decoded.

    Raises:
        UnidentifiedImageError: no opener accepts the data.
        OSError, ValueError, EOFError, SyntaxError: a damaged header (as from ``Image.open``).
    """
    Image.preinit()  # registers the JPEG, PNG, BMP (and GIF, PPM) openers; WebP registers on import
    from PIL import WebPImagePlugin  # noqa: F401

    prefix = data[:16]
    for name in OPENERS:
        factory, accept = Image.OPEN[name]
        if accept is not None and accept(prefix) is not True:
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):
            continue  # as Image.open: try the next opener
    other = _other_format(data)
    if other is not None:
        raise UnidentifiedImageError(f"image format {other} is not accepted (accepted: {', '.join(OPENERS)})")
    raise UnidentifiedImageError(f"not a recognised image format (accepted: {', '.join(OPENERS)})")


def _other_format(data: bytes) -> str | None:
    """The name Pillow gives a format regionflow does not accept (``GIF``, ``TIFF``), for the message."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return str(image.format)
    except (Image.DecompressionBombError, UnidentifiedImageError, OSError, ValueError, EOFError, SyntaxError):
        return None


def opencv_pixel_limit() -> int:
    """OpenCV's decode limit in pixels: ``OPENCV_IO_MAX_IMAGE_PIXELS`` when set to an int, else 2**30."""
    value = os.environ.get(OPENCV_MAX_PIXELS_ENV, "")
    return int(value) if value.strip().isdigit() else OPENCV_DEFAULT_MAX_PIXELS


def _exif_orientation(raw_exif: bytes | None) -> object:
    """Orientation tag of the EXIF block the header carried. ``Image.getexif()`` is not used: for PNG it
    decodes the whole image to look for an eXIf chunk after the pixel data (such a late chunk is not
    seen here, nor by OpenCV)."""
    if not raw_exif:
        return 1
    exif = Image.Exif()
    try:
        exif.load(raw_exif)
    except (SyntaxError, ValueError, OSError, EOFError, struct.error) as exc:
        # the pixels are fine and OpenCV ignores EXIF too: keep the image, unrotated, and say so
        log.warning("unreadable EXIF block (%s: %s): orientation taken as 1", type(exc).__name__, exc)
        return 1
    return exif.get(EXIF_ORIENTATION_TAG, 1)


def check_pixel_limit(header: ImageHeader, max_pixels: int) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels (``image_too_large``)."""
    pixels = header.width_px * header.height_px
    if pixels > max_pixels:
        raise SampleRejected(
            ErrorReason.IMAGE_TOO_LARGE,
            f"header declares {header.width_px}x{header.height_px} = {pixels} pixels > max_pixels {max_pixels}",
        )


def check_jpeg_structure(data: bytes) -> None:
    """Walk the JPEG marker structure (ITU-T T.81 Annex B); raise ``SampleRejected`` if it is broken.

    Checks: SOI first; each marker segment's length stays inside the data; inside entropy-coded data
    every 0xFF is followed by 0x00 (stuffing), 0xFF (fill), the next restart marker in sequence, or a
    marker that may follow a scan; an EOI marker ends the last scan. Bytes after EOI are allowed.
    """
    if data[:2] != b"\xff\xd8":
        raise _reject("JPEG: no SOI marker at byte 0")
    pos, size = 2, len(data)
    while pos < size:
        if data[pos] != 0xFF:
            raise _reject(f"JPEG: expected a marker at byte {pos}")
        while pos < size and data[pos] == 0xFF:
            pos += 1
        if pos >= size:
            break
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            return
        if _RST0 <= marker <= _RST7 or marker == _TEM:
            continue
        if pos + 2 > size:
            break
        length = int.from_bytes(data[pos : pos + 2], "big")
        if length < 2 or pos + length > size:
            raise _reject(f"JPEG: marker 0xFF{marker:02X} segment at byte {pos - 2} runs past the data")
        pos += length
        if marker == _SOS:
            pos = _skip_entropy_coded_data(data, pos)
    raise _reject("JPEG: no EOI marker (truncated file)")


def _skip_entropy_coded_data(data: bytes, pos: int) -> int:
    """Return the position of the marker that ends a scan's entropy-coded data starting at ``pos``."""
    expected_rst = _RST0
    size = len(data)
    while True:
        ff = data.find(b"\xff", pos)
        if ff < 0 or ff + 1 >= size:
            raise _reject("JPEG: scan data ends without an EOI marker (truncated file)")
        follower = data[ff + 1]
        if follower in (0x00, 0xFF):
            pos = ff + 1 if follower == 0xFF else ff + 2
        elif _RST0 <= follower <= _RST7:
            if follower != expected_rst:
                raise _reject(f"JPEG: restart marker RST{follower - _RST0} out of order at byte {ff}")
            expected_rst = _RST0 + (follower - _RST0 + 1) % 8
            pos = ff + 2
        elif follower in _AFTER_SCAN_MARKERS:
            return ff
        else:
            raise _reject(f"JPEG: invalid marker 0xFF{follower:02X} inside scan data at byte {ff}")


def to_rgb8(decoded: np.ndarray) -> np.ndarray:
    """OpenCV ``IMREAD_UNCHANGED`` output (gray / BGR / BGRA, uint8 or uint16) -> uint8 RGB ``[H, W, 3]``.

    16-bit samples are scaled with rounding to 0..255; alpha is dropped.

    Raises:
        SampleRejected: ``image_undecodable`` for a sample type or channel count we do not convert.
    """
    if decoded.dtype == np.uint16:
        scaled = (decoded.astype(np.uint32) * UINT8_MAX + UINT16_MAX // 2) // UINT16_MAX
        decoded = scaled.astype(np.uint8)
    elif decoded.dtype != np.uint8:
        raise _reject(f"unsupported sample type {decoded.dtype}")
    channels = 1 if decoded.ndim == 2 else decoded.shape[2]
    conversions = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
    if channels not in conversions:
        raise _reject(f"unsupported channel count {channels}")
    return np.ascontiguousarray(cv2.cvtColor(decoded, conversions[channels]))


def apply_orientation(rgb: np.ndarray, orientation: int) -> np.ndarray:
    """Apply EXIF orientation 1..8 to ``[H, W, C]`` (the result is what a viewer displays).

    Same transforms as Pillow's ``ImageOps.exif_transpose``; a copy only when a transform is needed.
    """
    transforms = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
        8: lambda a: np.rot90(a, k=1),
    }
    out = transforms[orientation](rgb)
    return out if orientation == 1 else np.ascontiguousarray(out)


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Decode image bytes to uint8 RGB ``[H, W, 3]``, EXIF orientation applied (module docstring: checks).

    Args:
        data: the member's bytes (JPEG, PNG, WebP or BMP, detected from content).
        max_pixels: refuse, before decoding, an image whose header declares more pixels than this.

    Raises:
        SampleRejected: ``image_empty``, ``image_too_large`` or ``image_undecodable``.
    """
    header = read_header(data)
    check_pixel_limit(header, max_pixels)
    if header.format in JPEG_FORMATS:
        check_jpeg_structure(data)
    try:
        decoded = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise _reject(f"OpenCV could not decode the {header.format} data: {exc.err}") from None
    if decoded is None:
        raise _reject(f"OpenCV could not decode the {header.format} data (corrupt or truncated)")
    if decoded.shape[:2] != (header.height_px, header.width_px):
        raise _reject(
            f"decoded size {decoded.shape[1]}x{decoded.shape[0]} differs from the header's "
            f"{header.width_px}x{header.height_px}"
        )
    return apply_orientation(to_rgb8(decoded), header.orientation)
