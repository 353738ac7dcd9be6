"""Build tiny images and WebDataset tars in a test's ``tmp_path`` (shared by regionflow's tests).

Images are smooth random gradients (so JPEG data has real entropy-coded content), seeded, a few hundred
bytes to a few KiB. ``write_raw_tar`` writes anything a tar can hold — duplicate names, directories,
absolute or ``..`` names — which ``workers.corpus.tar_writer.write_tar`` rightly refuses.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

DIRECTORY = None  # a member value of None in write_raw_tar: a directory entry


def make_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A smooth uint8 RGB ``[H, W, 3]`` test picture (gradient + seeded colour offsets)."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(0, 255, size=3).astype(np.float32)
    slope = rng.uniform(-3, 3, size=(2, 3)).astype(np.float32)
    img = base + xs[..., None] * slope[0] + ys[..., None] * slope[1]
    return np.clip(np.mod(img, 256), 0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    """Pillow image -> bytes in ``fmt`` (``"JPEG"``, ``"PNG"``, ``"WEBP"``, ``"BMP"``)."""
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def make_jpeg(width: int, height: int, seed: int = 0, quality: int = 90, **params: object) -> bytes:
    """A baseline RGB JPEG of ``width`` x ``height`` (extra Pillow save params, e.g. ``exif=``)."""
    return encode(Image.fromarray(make_rgb(width, height, seed)), "JPEG", quality=quality, **params)


def make_png(width: int, height: int, seed: int = 0, mode: str = "RGB") -> bytes:
    """A PNG in Pillow ``mode``: ``RGB``, ``RGBA``, ``L``, ``P`` (palette) or ``I;16`` (16-bit gray)."""
    rgb = make_rgb(width, height, seed)
    if mode == "I;16":
        gray = rgb[..., 0].astype(np.uint16) * 257
        return encode(Image.fromarray(gray), "PNG")
    image = Image.fromarray(rgb)
    if mode == "RGBA":
        alpha = np.linspace(0, 255, width, dtype=np.uint8)[None, :].repeat(height, 0)
        image = Image.fromarray(np.dstack([rgb, alpha]))
    elif mode == "P":
        image = image.quantize(colors=16)
    elif mode != "RGB":
        image = image.convert(mode)
    return encode(image, "PNG")


def make_jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG (16x16) whose SOF0 header is rewritten to declare ``width`` x ``height`` pixels."""
    data = bytearray(make_jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def make_png_header_only(width: int, height: int) -> bytes:
    """A PNG signature + IHDR declaring ``width`` x ``height`` and a tiny IDAT: a 'decompression bomb'
    header of under 100 bytes (valid CRCs; the pixel data is not there)."""
    import struct
    import zlib

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def caption_json(captions: Sequence[str] | str | None = None, **fields: object) -> bytes:
    """A sample's JSON member: ``captions`` (list) or ``caption`` (str) plus any extra fields."""
    obj: dict[str, object] = dict(fields)
    if isinstance(captions, str):
        obj["caption"] = captions
    elif captions is not None:
        obj["captions"] = list(captions)
    return json.dumps(obj).encode()


def write_raw_tar(
    path: str | Path, members: Sequence[tuple[str, bytes | None]], gzip_compress: bool = False
) -> Path:
    """Write ``members`` (name, bytes) in order, exactly as given; ``None`` bytes -> a directory entry.

    Nothing is checked: duplicate names, ``..``, absolute names are written as they are. Fixed metadata
    (mtime 0, mode 0644/0755). ``gzip_compress`` wraps the tar in gzip (mtime 0). Returns ``path``.
    """
    path = Path(path)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    raw = buffer.getvalue()
    if gzip_compress:
        raw = gzip.compress(raw, mtime=0)
    path.write_bytes(raw)
    return path


def member_offsets(path: str | Path) -> dict[str, tuple[int, int]]:
    """``name -> (header offset, data offset)`` of each member of an uncompressed tar (last one wins)."""
    with tarfile.open(path, "r:") as tar:
        return {info.name: (info.offset, info.offset_data) for info in tar.getmembers()}


def simple_sample(key: str, seed: int = 0, caption: str = "a test caption", size: int = 16) -> list:
    """The two members of a plain good sample: ``KEY.jpg`` and ``KEY.txt``."""
    return [(f"{key}.jpg", make_jpeg(size, size, seed)), (f"{key}.txt", caption.encode())]


def read_all(path: str | Path, config=None):
    """Read a whole shard with ``workers.read.reader.ShardReader`` -> ``(samples, errors, counts)``, asserting
    the accounting identity: members == used + in error rows + ignored (docs/design.md §9)."""
    from workers.read.reader import DecodedSample, ReaderConfig, SampleError, ShardReader

    reader = ShardReader(str(path), config or ReaderConfig())
    items = list(reader)
    counts = reader.counts()
    samples = [i for i in items if isinstance(i, DecodedSample)]
    errors = [i for i in items if isinstance(i, SampleError)]
    assert len(samples) + len(errors) == len(items)
    used = sum(len(s.member_names) for s in samples)
    in_errors = sum(len(e.member_names) for e in errors)
    assert counts.members == used + in_errors + sum(counts.members_ignored.values()), (counts, items)
    return samples, errors, counts
