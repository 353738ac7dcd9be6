"""Hostile input (issue 5): each case builds its tiny file here and states the expected outcome.

Every read goes through ``tarfactory.read_all``, which also asserts the accounting identity
``members == used + in error rows + ignored``.
"""

from __future__ import annotations

import gzip
import io
import pickle
import tracemalloc
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps
from tarfactory import (
    caption_json,
    encode,
    make_jpeg,
    make_jpeg_declaring,
    make_png,
    make_png_header_only,
    make_rgb,
    member_offsets,
    read_all,
    simple_sample,
    write_raw_tar,
)

from schemas.reasons import ErrorReason, IgnoredReason
from workers.read.reader import ReaderConfig
from workers.read.tokenizer import CaptionTokenizer


def one_sample_tar(tmp_path: Path, image_name: str, image: bytes, caption: bytes = b"a caption") -> Path:
    """A tar: a good sample, the sample under test (key ``k``), another good sample."""
    key = image_name.split(".")[0]
    members = simple_sample("before", 1) + [(image_name, image), (f"{key}.txt", caption)]
    return write_raw_tar(tmp_path / "s.tar", members + simple_sample("after", 2))


def read_one(tmp_path: Path, image_name: str, image: bytes, config: ReaderConfig | None = None):
    """The sample under test (DecodedSample or SampleError); its neighbours must be fine."""
    samples, errors, _ = read_all(one_sample_tar(tmp_path, image_name, image), config)
    items = sorted([*samples, *errors], key=lambda s: ["before", "k", "after"].index(s.key))
    assert [s.key for s in items] == ["before", "k", "after"]
    assert {s.key for s in samples} >= {"before", "after"}
    return items[1]


def error_reason(item) -> ErrorReason | None:
    return getattr(item, "reason", None)


# ---------------------------------------------------------------- images


def test_corrupt_jpeg_mid_stream_is_undecodable(tmp_path):
    """A run of 0xFF mid-scan (an erased flash block): OpenCV decodes it with only a stderr warning,
    our marker-structure check rejects it."""
    data = bytearray(make_jpeg(64, 64, seed=3))
    middle = len(data) // 2
    data[middle : middle + 64] = b"\xff" * 64
    assert cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_UNCHANGED) is not None
    item = read_one(tmp_path, "k.jpg", bytes(data))
    assert error_reason(item) == ErrorReason.IMAGE_UNDECODABLE
    assert item.member_names == ("k.jpg", "k.txt")


def test_zeroed_block_inside_jpeg_scan_is_a_known_limit(tmp_path):
    """Documented limit (workers/read/decode.py): damage that keeps a valid marker structure (here 32 zero
    bytes inside entropy-coded data) cannot be detected without a checksum; the image decodes."""
    data = bytearray(make_jpeg(64, 64, seed=3))
    middle = len(data) // 2
    data[middle : middle + 32] = bytes(32)
    item = read_one(tmp_path, "k.jpg", bytes(data))
    assert error_reason(item) is None and item.image_rgb.shape == (64, 64, 3)


def test_truncated_jpeg_is_undecodable(tmp_path):
    data = make_jpeg(64, 64, seed=4)
    item = read_one(tmp_path, "k.jpg", data[: len(data) * 2 // 3])
    assert error_reason(item) == ErrorReason.IMAGE_UNDECODABLE and "EOI" in item.detail


def test_zero_byte_image_is_image_empty(tmp_path):
    assert error_reason(read_one(tmp_path, "k.jpg", b"")) == ErrorReason.IMAGE_EMPTY


def test_png_named_jpg_and_jpeg_named_png_decode_by_content(tmp_path):
    rgb = make_rgb(9, 7, seed=5)
    png = encode(Image.fromarray(rgb), "PNG")
    item = read_one(tmp_path, "k.jpg", png)
    np.testing.assert_array_equal(item.image_rgb, rgb)  # lossless: it was decoded as PNG
    jpeg = make_jpeg(9, 7, seed=5)
    (tmp_path / "second").mkdir()
    item = read_one(tmp_path / "second", "k.png", jpeg)
    reference = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert np.abs(item.image_rgb.astype(int) - reference).max() <= 8


def test_grayscale_png_and_jpeg_become_rgb(tmp_path):
    gray = make_rgb(6, 5, seed=6)[..., 0]
    item = read_one(tmp_path, "k.png", encode(Image.fromarray(gray), "PNG"))
    np.testing.assert_array_equal(item.image_rgb, np.repeat(gray[..., None], 3, axis=2))
    item = read_one(tmp_path, "k.jpg", encode(Image.fromarray(gray), "JPEG", quality=95))
    assert item.image_rgb.shape == (5, 6, 3)
    assert (item.image_rgb[..., 0] == item.image_rgb[..., 2]).all()


def test_rgba_alpha_is_dropped(tmp_path):
    rgb = make_rgb(8, 6, seed=7)
    rgba = np.dstack([rgb, np.linspace(0, 255, 8, dtype=np.uint8)[None].repeat(6, 0)])
    item = read_one(tmp_path, "k.png", encode(Image.fromarray(rgba), "PNG"))
    np.testing.assert_array_equal(item.image_rgb, rgb)  # colour kept as stored, not composited


def test_palette_png_is_expanded(tmp_path):
    data = make_png(10, 8, seed=8, mode="P")
    item = read_one(tmp_path, "k.png", data)
    np.testing.assert_array_equal(item.image_rgb, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


def test_16_bit_png_is_scaled_to_8_bit(tmp_path):
    data = make_png(10, 8, seed=9, mode="I;16")  # gray value v stored as v * 257
    expected = make_rgb(10, 8, seed=9)[..., 0]
    item = read_one(tmp_path, "k.png", data)
    np.testing.assert_array_equal(item.image_rgb, np.repeat(expected[..., None], 3, axis=2))


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    rgb = make_rgb(16, 12, seed=10)
    data = encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    item = read_one(tmp_path, "k.jpg", data)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert item.image_rgb.shape == (12, 16, 3)
    assert np.abs(item.image_rgb.astype(int) - reference).mean() < 3


def test_exif_rotated_jpeg_is_shown_upright(tmp_path):
    """Orientation 6 (rotate 90° clockwise to display): a 12x8 stored picture is returned as 8 wide, 12
    high, with the stored top-left pixel at the top-right."""
    exif = Image.Exif()
    exif[0x0112] = 6
    data = make_jpeg(12, 8, seed=11, quality=100, exif=exif.tobytes())
    item = read_one(tmp_path, "k.jpg", data)
    assert (item.width_px, item.height_px) == (8, 12)
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert np.abs(item.image_rgb.astype(int) - np.rot90(stored, k=-1)).max() <= 8
    upright = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")).astype(int)
    assert np.abs(item.image_rgb.astype(int) - upright).max() <= 8


def test_one_pixel_image(tmp_path):
    item = read_one(tmp_path, "k.png", encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    assert item.image_rgb.tolist() == [[[10, 20, 30]]]
    item = read_one(tmp_path, "k.jpg", make_jpeg(1, 1))
    assert item.image_rgb.shape == (1, 1, 3)


@pytest.mark.parametrize(
    "bomb",
    [
        make_png_header_only(30000, 30000),  # above Pillow's own bomb limit too
        make_jpeg_declaring(30000, 30000),
        make_jpeg_declaring(8000, 8000),  # 64 Mpx: only our 50 Mpx default refuses it
        make_png_header_only(9000, 8000),
    ],
)
def test_decompression_bomb_refused_without_allocating(tmp_path, bomb):
    assert len(bomb) < 1000
    path = one_sample_tar(tmp_path, "k.jpg", bomb)
    tracemalloc.start()
    try:
        samples, errors, _ = read_all(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [(e.key, e.reason) for e in errors] == [("k", ErrorReason.IMAGE_TOO_LARGE)]
    assert peak < 4_000_000, peak  # a decode would allocate >= 192 MB (8000 x 8000 x 3)


def test_tracemalloc_sees_a_real_decode(tmp_path):
    """Control for the bomb test: decoding a 2000x1500 image does show up in tracemalloc's peak."""
    path = one_sample_tar(tmp_path, "k.png", encode(Image.new("RGB", (2000, 1500)), "PNG"))
    tracemalloc.start()
    try:
        read_all(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak > 2000 * 1500 * 3


# ---------------------------------------------------------------- tar structure


def _three_samples(tmp_path: Path) -> tuple[bytes, dict]:
    members = [m for seed, key in enumerate("abc") for m in simple_sample(key, seed, size=160)]
    path = write_raw_tar(tmp_path / "full.tar", members)
    return path.read_bytes(), member_offsets(path)


def test_tar_truncated_mid_member_keeps_earlier_samples(tmp_path):
    raw, offsets = _three_samples(tmp_path)
    path = tmp_path / "cut.tar"
    path.write_bytes(raw[: offsets["b.jpg"][1] + 100])  # inside b.jpg's data
    samples, errors, counts = read_all(path)
    assert [s.key for s in samples] == ["a"]
    assert [(e.key, e.reason, e.member_names) for e in errors] == [
        ("b", ErrorReason.TAR_TRUNCATED, ("b.jpg",))
    ]
    assert counts.members == 3


def test_tar_cut_at_a_header_or_garbled_header(tmp_path):
    raw, offsets = _three_samples(tmp_path)
    cut_between = tmp_path / "between.tar"
    cut_between.write_bytes(raw[: offsets["b.txt"][0]])  # b.jpg complete, no b.txt, no end-of-archive
    garbled = bytearray(raw)
    garbled[offsets["c.jpg"][0] : offsets["c.jpg"][0] + 100] = b"\x07" * 100
    (tmp_path / "garbled.tar").write_bytes(bytes(garbled))
    for name, good, cut in (("between.tar", ["a"], "b"), ("garbled.tar", ["a"], "b")):
        samples, errors, _ = read_all(tmp_path / name)
        assert [s.key for s in samples] == good, name
        assert [(e.key, e.reason) for e in errors] == [(cut, ErrorReason.TAR_TRUNCATED)], name


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8, 0.95])
def test_truncated_gzip_tar_keeps_earlier_samples(tmp_path, fraction):
    """Expected outcome from an independent decompression of the cut file: a sample is kept when the
    header of the next sample's first member decompresses whole; the sample being read is cut."""
    raw, offsets = _three_samples(tmp_path)
    compressed = gzip.compress(raw, mtime=0)
    cut = compressed[: int(len(compressed) * fraction)]
    available = len(zlib.decompressobj(wbits=31).decompress(cut))
    next_header = {"a": offsets["b.jpg"][0], "b": offsets["c.jpg"][0], "c": len(raw)}
    expected_kept = [key for key, end in next_header.items() if end + 512 <= available]
    path = tmp_path / "cut.tar.gz"
    path.write_bytes(cut)
    samples, errors, _ = read_all(path)
    assert [s.key for s in samples] == expected_kept
    assert [(e.key, e.reason) for e in errors] == [("abc"[len(expected_kept)], ErrorReason.TAR_TRUNCATED)]
    assert "gzip" in errors[0].detail


def test_gzip_compressed_tar(tmp_path):
    members = simple_sample("a") + simple_sample("b", 1)
    samples, errors, counts = read_all(write_raw_tar(tmp_path / "s.tar.gz", members, gzip_compress=True))
    assert [s.key for s in samples] == ["a", "b"] and errors == [] and counts.members == 4


def test_tar_of_only_directories(tmp_path):
    path = write_raw_tar(tmp_path / "dirs.tar", [("a", None), ("a/b", None), ("c.d", None)])
    samples, errors, counts = read_all(path)
    assert samples == [] and errors == []
    assert counts.members == 3 and counts.members_ignored == {IgnoredReason.NOT_A_FILE.value: 3}


def test_non_adjacent_members(tmp_path):
    members = [("a.jpg", make_jpeg(8, 8)), ("b.jpg", make_jpeg(8, 8, 1)), ("b.txt", b"b"), ("a.txt", b"late")]
    samples, errors, _ = read_all(
        write_raw_tar(tmp_path / "s.tar", members), ReaderConfig(captions="optional")
    )
    assert [(s.key, s.member_names) for s in samples] == [("a", ("a.jpg",)), ("b", ("b.jpg", "b.txt"))]
    assert [(e.key, e.reason, e.member_names) for e in errors] == [
        ("a", ErrorReason.NON_ADJACENT_MEMBERS, ("a.txt",))
    ]


def test_same_member_twice(tmp_path):
    members = [("a.jpg", make_jpeg(8, 8)), ("a.txt", b"one"), ("a.txt", b"two")] + simple_sample("b")
    samples, errors, _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert [s.key for s in samples] == ["b"]
    assert [(e.key, e.reason, e.member_names) for e in errors] == [
        ("a", ErrorReason.DUPLICATE_MEMBER, ("a.jpg", "a.txt", "a.txt"))
    ]


def test_key_with_several_dots(tmp_path):
    """The key ends at the first dot of the basename (webdataset); dots in directories are kept."""
    members = [("img.v1.2020.jpg", make_jpeg(8, 8)), ("img.v1.2020.txt", b"cap")]
    members += [("data.set.v2/photo.jpg", make_jpeg(8, 8, 1)), ("data.set.v2/photo.txt", b"cap2")]
    samples, errors, _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert errors == []
    assert [(s.key, s.member_names) for s in samples] == [
        ("img", ("img.v1.2020.jpg", "img.v1.2020.txt")),
        ("data.set.v2/photo", ("data.set.v2/photo.jpg", "data.set.v2/photo.txt")),
    ]


def test_keys_with_slash_dotdot_and_absolute_paths_are_just_strings(tmp_path, monkeypatch):
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    keys = ["dir/sub/x", "../escape", "/abs/olute", "a/../../b"]
    members = [m for i, key in enumerate(keys) for m in simple_sample(key, i)]
    samples, errors, _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert errors == [] and [s.key for s in samples] == keys
    assert list(work.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["s.tar", "work"]


# ---------------------------------------------------------------- captions


def test_empty_caption(tmp_path):
    members = [("k.jpg", make_jpeg(8, 8)), ("k.txt", b"")]
    path = write_raw_tar(tmp_path / "s.tar", members)
    _, (error,), _ = read_all(path)
    assert error.reason == ErrorReason.MISSING_CAPTION
    (sample,), errors, _ = read_all(path, ReaderConfig(captions="optional"))
    assert errors == [] and sample.captions == ()


def test_100k_character_caption_is_read_whole_and_truncated_by_the_tokenizer(tmp_path):
    caption = ("a very long caption " * 5000)[:100_000]
    members = [("k.jpg", make_jpeg(8, 8)), ("k.txt", caption.encode())]
    (sample,), _, _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert sample.captions == (caption.strip(),) and len(sample.captions[0]) >= 99_990
    try:
        tokenizer = CaptionTokenizer(max_tokens=36)
    except FileNotFoundError as exc:
        pytest.skip(f"packaged BERT checkpoint absent: {exc}")
    out = tokenizer.encode(sample.captions)
    assert len(out.input_ids[0]) == 36 and out.truncated == [True]


def test_non_utf8_caption(tmp_path):
    members = [("k.jpg", make_jpeg(8, 8)), ("k.txt", "café".encode("latin-1"))]
    members += [("j.jpg", make_jpeg(8, 8)), ("j.json", b'{"caption": "caf\xe9"}')]
    _, errors, _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert [(e.key, e.reason) for e in errors] == [
        ("k", ErrorReason.CAPTION_NOT_UTF8),
        ("j", ErrorReason.CAPTION_NOT_UTF8),
    ]


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"a string"', b"42", b"null"])
def test_json_caption_that_is_not_an_object(tmp_path, payload):
    members = [("k.jpg", make_jpeg(8, 8)), ("k.json", payload)]
    _, (error,), _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert error.reason == ErrorReason.CAPTION_INVALID and error.member_names == ("k.jpg", "k.json")


# ---------------------------------------------------------------- code-running members


class _TouchOnUnpickle:
    """Unpickling an instance calls ``open(marker, "w")``: it creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_like_members_are_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "payload-ran"
    payload = pickle.dumps(_TouchOnUnpickle(marker))
    pickle.loads(payload).close()  # noqa: S301  the payload does run when unpickled ...
    assert marker.exists()
    marker.unlink()
    torch = pytest.importorskip("torch")
    torch_payload = io.BytesIO()
    torch.save({"weights": _TouchOnUnpickle(marker)}, torch_payload)
    torch.load(io.BytesIO(torch_payload.getvalue()), weights_only=False)["weights"].close()
    assert marker.exists()  # ... and so does a .pth through torch.load(weights_only=False)
    marker.unlink()

    def refuse(*args, **kwargs):
        raise AssertionError("the reader unpickled tar content")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    members = simple_sample("k") + [
        ("k.pyd", payload),
        ("k.pickle", payload),
        ("k.pth", torch_payload.getvalue()),
    ]
    members += [("evil.pkl", payload)]
    samples, errors, counts = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert not marker.exists()  # ... but reading never ran it
    assert [(s.key, s.member_names) for s in samples] == [("k", ("k.jpg", "k.txt"))]
    assert [(e.key, e.reason, e.member_names) for e in errors] == [("evil", ErrorReason.MISSING_IMAGE, ())]
    assert counts.members_ignored == {IgnoredReason.UNSAFE_EXTENSION.value: 4}


def test_odd_json_contents(tmp_path):
    """Deep nesting, NaN boxes, both caption fields, wrong image_id type: error rows, no exception."""
    cases = {
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "nanbox": caption_json("c", boxes=[[0, 0, float("nan"), 4]]),
        "both": b'{"caption": "c", "captions": ["d"]}',
        "boolid": caption_json("c", image_id=True),
    }
    members = [m for key, js in cases.items() for m in ((f"{key}.jpg", make_jpeg(8, 8)), (f"{key}.json", js))]
    _, errors, _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert [(e.key, e.reason) for e in errors] == [
        ("deep", ErrorReason.CAPTION_JSON_INVALID),
        ("nanbox", ErrorReason.BOXES_INVALID),
        ("both", ErrorReason.CAPTION_INVALID),
        ("boolid", ErrorReason.CAPTION_INVALID),
    ]
