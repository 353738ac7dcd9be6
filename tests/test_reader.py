"""ShardReader: grouping, member accounting, captions/metadata, URLs (real tars written in tmp_path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tarfactory import caption_json, make_jpeg, make_png, read_all, simple_sample, write_raw_tar

from schemas.reasons import ErrorReason, IgnoredReason
from workers.read.reader import (
    ReaderConfig,
    ShardReader,
    ShardReadError,
    expand_shard_urls,
    shard_id_of,
    split_member_name,
)

DATA = Path(__file__).parents[2] / "shared" / "data"


def test_good_samples_in_source_order(tmp_path):
    members = simple_sample("b", 1, "second") + simple_sample("a", 2, "first")
    samples, errors, counts = read_all(write_raw_tar(tmp_path / "s-000.tar", members))
    assert errors == []
    assert [s.key for s in samples] == ["b", "a"]
    assert samples[0].captions == ("second",)
    assert samples[0].member_names == ("b.jpg", "b.txt")
    assert samples[0].shard == "s-000"
    assert samples[0].image_rgb.shape == (16, 16, 3) and samples[0].image_rgb.dtype == np.uint8
    assert (samples[0].width_px, samples[0].height_px) == (16, 16)
    assert counts.members == 4 and counts.members_ignored == {}


def test_json_captions_image_id_and_boxes(tmp_path):
    meta = caption_json([" one ", "", "two"], image_id=7, boxes=[[1, 2, 3, 4]], box_format="xywh")
    path = write_raw_tar(tmp_path / "s.tar", [("k.jpg", make_jpeg(20, 10)), ("k.json", meta)])
    (sample,), errors, _ = read_all(path)
    assert errors == []
    assert sample.captions == ("one", "two")
    assert sample.image_id == 7
    np.testing.assert_array_equal(sample.given_boxes_xyxy_px, np.array([[1, 2, 4, 6]], np.float32))
    assert sample.given_boxes_xyxy_px.dtype == np.float32


def test_image_id_from_coco_file_name(tmp_path):
    members = simple_sample("COCO_train2014_000000458752") + simple_sample("dir/000000000042", 1)
    members += simple_sample("photo", 2)
    samples, _, _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert [s.image_id for s in samples] == [458752, 42, None]


def test_json_caption_wins_and_txt_is_ignored_as_unused(tmp_path):
    members = [("k.jpg", make_jpeg(8, 8)), ("k.json", caption_json("from json")), ("k.txt", b"from txt")]
    (sample,), _, counts = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert sample.captions == ("from json",)
    assert sample.member_names == ("k.jpg", "k.json")
    assert counts.members_ignored == {IgnoredReason.CAPTION_UNUSED.value: 1}


def test_txt_caption_used_when_json_has_none(tmp_path):
    members = [("k.jpg", make_jpeg(8, 8)), ("k.json", caption_json(image_id=3)), ("k.txt", b"cap")]
    (sample,), _, counts = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert sample.captions == ("cap",) and sample.image_id == 3
    assert sample.member_names == ("k.jpg", "k.json", "k.txt")
    assert counts.members_ignored == {}


@pytest.mark.parametrize(
    ("members", "reason"),
    [
        ([("k.txt", b"cap")], ErrorReason.MISSING_IMAGE),
        ([("k.jpg", make_jpeg(8, 8))], ErrorReason.MISSING_CAPTION),
        ([("k.jpg", make_jpeg(8, 8)), ("k.txt", b"   \n")], ErrorReason.MISSING_CAPTION),
        ([("k.jpg", make_jpeg(8, 8)), ("k.json", caption_json([]))], ErrorReason.MISSING_CAPTION),
        (
            [("k.jpg", make_jpeg(8, 8)), ("k.png", make_png(8, 8)), ("k.txt", b"c")],
            ErrorReason.MULTIPLE_IMAGES,
        ),
        ([("k.jpg", make_jpeg(8, 8)), ("k.json", b"{not json")], ErrorReason.CAPTION_JSON_INVALID),
        ([("k.jpg", make_jpeg(8, 8)), ("k.json", b'["a list"]')], ErrorReason.CAPTION_INVALID),
        ([("k.jpg", make_jpeg(8, 8)), ("k.json", b'{"caption": 3}')], ErrorReason.CAPTION_INVALID),
        ([("k.jpg", make_jpeg(8, 8)), ("k.json", b'{"captions": ["a", 1]}')], ErrorReason.CAPTION_INVALID),
        ([("k.jpg", make_jpeg(8, 8)), ("k.txt", b"caf\xe9")], ErrorReason.CAPTION_NOT_UTF8),
        ([("k.jpg", b""), ("k.txt", b"c")], ErrorReason.IMAGE_EMPTY),
        ([("k.jpg", b"not an image"), ("k.txt", b"c")], ErrorReason.IMAGE_UNDECODABLE),
    ],
)
def test_error_rows(tmp_path, members, reason):
    samples, (error,), _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert samples == []
    assert error.reason == reason and error.key == "k" and error.shard == "s"
    assert error.member_names == tuple(name for name, _ in members)
    assert error.detail and "0x" not in error.detail  # deterministic: no object addresses


def test_captions_optional_gives_empty_tuple(tmp_path):
    path = write_raw_tar(tmp_path / "s.tar", [("k.jpg", make_jpeg(8, 8))])
    (sample,), errors, _ = read_all(path, ReaderConfig(captions="optional"))
    assert errors == [] and sample.captions == ()


def test_boxes(tmp_path):
    good = caption_json("c", boxes=[[0, 0, 8.5, 8]])  # 0.5 px past the border: clipped
    outside = caption_json("c", boxes=[[0, 0, 20, 8]])
    bad = caption_json("c", boxes=[[0, 0, 1]])
    members = [("a.jpg", make_jpeg(8, 8)), ("a.json", good), ("b.jpg", make_jpeg(8, 8))]
    members += [("b.json", outside), ("c.jpg", make_jpeg(8, 8)), ("c.json", bad)]
    members += [("d.jpg", make_jpeg(8, 8)), ("d.txt", b"no boxes")]
    samples, errors, _ = read_all(
        write_raw_tar(tmp_path / "s.tar", members), ReaderConfig(require_boxes=True)
    )
    assert [s.key for s in samples] == ["a"]
    np.testing.assert_array_equal(samples[0].given_boxes_xyxy_px, [[0, 0, 8, 8]])
    assert [(e.key, e.reason) for e in errors] == [
        ("b", ErrorReason.BOXES_INVALID),
        ("c", ErrorReason.BOXES_INVALID),
        ("d", ErrorReason.BOXES_MISSING),
    ]


def test_ignored_members_are_counted(tmp_path):
    members = [
        ("dir", None),
        ("k.jpg", make_jpeg(8, 8)),
        ("k.txt", b"c"),
        ("k.npy", b"\x93NUMPY"),
        ("k.cls", b"3"),
        ("README", b"no extension"),
        ("__meta__", b"x"),
    ]
    (sample,), errors, counts = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert errors == [] and sample.member_names == ("k.jpg", "k.txt")
    assert counts.members == 7
    assert counts.members_ignored == {
        IgnoredReason.NOT_A_FILE.value: 1,
        IgnoredReason.UNKNOWN_EXTENSION.value: 3,
        IgnoredReason.UNSAFE_EXTENSION.value: 1,
    }


def test_key_of_only_ignored_members_is_a_missing_image_error(tmp_path):
    members = simple_sample("a") + [("b.cls", b"1")]
    samples, (error,), counts = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert error.key == "b" and error.reason == ErrorReason.MISSING_IMAGE and error.member_names == ()
    assert counts.members_ignored == {IgnoredReason.UNKNOWN_EXTENSION.value: 1}


def test_gzip_tar_is_read_by_content(tmp_path):
    members = simple_sample("a") + simple_sample("b", 1)
    for name in ("s.tar.gz", "t.tgz", "u.tar"):  # u.tar: gzip under a plain name still works
        samples, errors, _ = read_all(write_raw_tar(tmp_path / name, members, gzip_compress=True))
        assert [s.key for s in samples] == ["a", "b"] and errors == []


def test_unreadable_shards_raise_with_url(tmp_path):
    for path in (tmp_path / "missing.tar", tmp_path / "text.tar", tmp_path / "empty.tar"):
        if path.name == "text.tar":
            path.write_bytes(b"hello, this is not a tar file at all\n" * 40)
        elif path.name == "empty.tar":
            path.write_bytes(b"")
        with pytest.raises(ShardReadError, match=path.name):
            list(ShardReader(str(path), ReaderConfig()))


def test_counts_before_iteration_raises(tmp_path):
    reader = ShardReader(str(write_raw_tar(tmp_path / "s.tar", simple_sample("a"))), ReaderConfig())
    with pytest.raises(RuntimeError):
        reader.counts()


def test_relative_path_url(tmp_path, monkeypatch):
    write_raw_tar(tmp_path / "s.tar", simple_sample("a"))
    monkeypatch.chdir(tmp_path)
    samples, _, _ = read_all(Path("s.tar"))
    assert samples[0].key == "a"


def test_shard_id_and_url_expansion():
    assert shard_id_of("a/b/coco-000.tar.gz") == "coco-000"
    assert shard_id_of("s3://bucket/x/y-1.tar") == "y-1"
    assert expand_shard_urls(["d/s-{000..002}.tar", "e.tar"]) == [
        "d/s-000.tar",
        "d/s-001.tar",
        "d/s-002.tar",
        "e.tar",
    ]
    with pytest.raises(ValueError, match="s-001"):
        expand_shard_urls(["a/s-{000..001}.tar", "b/s-001.tar.gz"])


def test_split_member_name_matches_webdataset():
    wds = pytest.importorskip("webdataset.tariterators")
    names = ["a.jpg", "d.x/k.b.c.JPG", "/abs/k.txt", "../up.json", "noext", ".hidden", "a.", "a.b/c"]
    for name in names:
        base, ext = wds.base_plus_ext(name)
        ours = split_member_name(name)
        assert ours == (None if base is None else (base, ext.lower())), name
    # deliberate difference: webdataset keys a dot-file "x/.h.txt" as "x/"; it has no key for us
    assert wds.base_plus_ext("x/.h.txt") == ("x/", "h.txt")
    assert split_member_name("x/.h.txt") is None


def test_reader_config_validation_and_dict():
    assert ReaderConfig().to_dict() == {
        "captions": "required",
        "max_pixels": 50_000_000,
        "require_boxes": False,
    }
    with pytest.raises(ValueError):
        ReaderConfig(captions="sometimes")
    with pytest.raises(ValueError):
        ReaderConfig(max_pixels=0)


def test_workers_import_without_webdataset():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['webdataset'] = None; sys.modules['ray'] = None\n"
        "import workers.read.reader, workers.read.decode, workers.read.captions, workers.read.tokenizer\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


@pytest.mark.skipif(not (DATA / "coco-train-mini").is_dir(), reason="needs /work/shared/data/coco-train-mini")
def test_real_coco_images(tmp_path):
    images = sorted((DATA / "coco-train-mini" / "images").glob("*.jpg"))[:5]
    members = []
    for image in images:
        members += [
            (image.name, image.read_bytes()),
            (image.stem + ".json", json.dumps({"caption": "c"}).encode()),
        ]
    samples, errors, _ = read_all(write_raw_tar(tmp_path / "s.tar", members))
    assert errors == [] and len(samples) == 5
    assert samples[0].image_id == int(images[0].stem)
    assert samples[0].image_rgb.shape[2] == 3


def test_s3_shard_through_a_local_s3_server(tmp_path, s3):
    """``s3://`` URLs honour AWS_ENDPOINT_URL (the loopback S3 server of conftest's ``s3`` here)."""
    local = write_raw_tar(
        tmp_path / "s-1.tar", simple_sample("a") + simple_sample("b", 1), gzip_compress=True
    )
    url = s3.upload(local, "reader/dir/s-1.tar.gz")
    samples, errors, _ = read_all(url)
    assert [s.key for s in samples] == ["a", "b"] and samples[0].shard == "s-1" and errors == []
    missing = s3.url("reader/dir/missing.tar")
    with pytest.raises(ShardReadError, match=missing):
        list(ShardReader(missing, ReaderConfig()))


def test_member_name_not_utf8_is_an_error_row_and_the_shard_goes_on(tmp_path: Path) -> None:
    """A GNU tar with the latin-1 name ``café.jpg`` (byte 0xE9): the samples beside it are read, the bad one
    is a ``member_name_not_utf8`` error row whose key and member names are text (``\\xe9`` escaped), so the
    error table can be written (before: a surrogate key failed the whole shard with UnicodeEncodeError)."""
    import io
    import tarfile

    import pyarrow as pa

    from schemas.store import error_schema

    path = tmp_path / "latin-000.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        members = simple_sample("a") + [("caf\xe9.jpg", make_jpeg(16, 16)), ("caf\xe9.txt", b"x")]
        for name, data in members + simple_sample("b", 1) + [("b.t\xe9xt", b"ignored")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert b"caf\xe9.jpg" in path.read_bytes()
    samples, errors, counts = read_all(path)
    assert [s.key for s in samples] == ["a", "b"]
    assert [(e.key, e.member_names, e.reason) for e in errors] == [
        ("caf\\xe9", ("caf\\xe9.jpg", "caf\\xe9.txt"), ErrorReason.MEMBER_NAME_NOT_UTF8)
    ]
    assert "not UTF-8" in errors[0].detail and counts.members_ignored == {"unknown_extension": 1}
    row = {"key": [errors[0].key], "shard": [errors[0].shard], "member_names": [list(errors[0].member_names)]}
    row |= {"reason": [errors[0].reason.value], "detail": [errors[0].detail]}
    assert pa.table(row, schema=error_schema()).num_rows == 1
