"""``regionflow shards``: folder + COCO captions -> deterministic tars, read back by the ShardReader."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image
from tarfactory import make_jpeg, make_png

from pipelines.cli import main as cli_main
from workers.read.reader import DecodedSample, ReaderConfig, ShardReader

DATA = Path(__file__).parents[2] / "shared" / "data"
COCO = DATA / "coco-train-mini"
VQA_IMAGES = DATA / "vqa2-sample" / "images"
needs_coco = pytest.mark.skipif(not COCO.is_dir(), reason="needs /work/shared/data/coco-train-mini")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def shards_cli(*args: str) -> int:
    return cli_main(["shards", *args])


@needs_coco
def test_coco_mini_shards_are_deterministic_and_complete(tmp_path, capsys):
    args = ["--images", str(COCO / "images"), "--captions", str(COCO / "captions_train2017.json")]
    assert (
        shards_cli(*args, "--out", str(tmp_path / "a"), "--samples-per-shard", "30", "--prefix", "coco") == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards"] == ["coco-000000.tar", "coco-000001.tar", "coco-000002.tar"]
    assert summary["samples"] == 80 and summary["samples_with_captions"] == 80
    assert (
        shards_cli(*args, "--out", str(tmp_path / "b"), "--samples-per-shard", "30", "--prefix", "coco") == 0
    )
    assert digests(tmp_path / "a") == digests(tmp_path / "b")

    coco = json.loads((COCO / "captions_train2017.json").read_text())
    expected = {}
    for image in coco["images"]:
        expected[Path(image["file_name"]).stem] = (image["id"], image["width"], image["height"])
    names = []
    for shard in summary["shards"]:
        with tarfile.open(tmp_path / "a" / shard) as tar:
            infos = tar.getmembers()
            names += [i.name for i in infos]
            assert {(i.mtime, i.uid, i.gid, i.uname, i.mode) for i in infos} == {(0, 0, 0, "", 0o644)}
            first = json.loads(tar.extractfile(infos[1]).read())
        key = infos[0].name.split(".")[0]
        assert (first["image_id"], first["width"], first["height"]) == expected[key]
        assert len(first["captions"]) == 5
    keys = [n.split(".")[0] for n in names[::2]]
    assert keys == sorted(expected) and names[1::2] == [k + ".json" for k in keys]
    image = sorted((COCO / "images").glob("*.jpg"))[0]
    with tarfile.open(tmp_path / "a" / "coco-000000.tar") as tar:
        assert tar.extractfile(image.name).read() == image.read_bytes()


@needs_coco
def test_coco_mini_shards_read_back(tmp_path):
    out = tmp_path / "s"
    args = ["--images", str(COCO / "images"), "--captions", str(COCO / "captions_train2017.json")]
    assert shards_cli(*args, "--out", str(out), "--samples-per-shard", "50") == 0
    coco = json.loads((COCO / "captions_train2017.json").read_text())
    captions = {}
    for ann in coco["annotations"]:
        captions.setdefault(ann["image_id"], []).append(ann["caption"].strip())
    samples = []
    for shard in sorted(out.glob("shard-*.tar")):
        samples += list(ShardReader(str(shard), ReaderConfig()))
    assert len(samples) == 80 and all(isinstance(s, DecodedSample) for s in samples)
    for sample in samples:
        assert sorted(sample.captions) == sorted(captions[sample.image_id])


@pytest.mark.skipif(not VQA_IMAGES.is_dir(), reason="needs /work/shared/data/vqa2-sample")
def test_vqa_images_without_captions(tmp_path, capsys):
    assert shards_cli("--images", str(VQA_IMAGES), "--out", str(tmp_path), "--samples-per-shard", "4") == 0
    assert json.loads(capsys.readouterr().out)["samples_with_captions"] == 0
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert tar.getnames() == ["COCO_train2014_000000458752.jpg", "COCO_train2014_000000458752.json"]
        meta = json.loads(tar.extractfile("COCO_train2014_000000458752.json").read())
    with Image.open(VQA_IMAGES / "COCO_train2014_000000458752.jpg") as image:
        assert (meta["width"], meta["height"]) == image.size
    assert meta["image_id"] == 458752 and meta["captions"] == []


def test_original_bytes_and_extension_kept(tmp_path):
    images = tmp_path / "img"
    images.mkdir()
    (images / "b.PNG").write_bytes(make_png(5, 4))
    (images / "a.jpeg").write_bytes(make_jpeg(6, 3))
    (images / "notes.txt").write_text("not an image")
    assert shards_cli("--images", str(images), "--out", str(tmp_path / "o"), "--samples-per-shard", "1") == 0
    with tarfile.open(tmp_path / "o" / "shard-000000.tar") as tar:
        assert tar.getnames() == ["a.jpeg", "a.json"]
        assert tar.extractfile("a.jpeg").read() == (images / "a.jpeg").read_bytes()
    with tarfile.open(tmp_path / "o" / "shard-000001.tar") as tar:
        assert tar.getnames() == ["b.png", "b.json"]
        assert json.loads(tar.extractfile("b.json").read()) == {
            "captions": [],
            "file_name": "b.PNG",
            "height": 4,
            "image_id": None,
            "width": 5,
        }


def test_bad_input_exits_1_and_writes_nothing(tmp_path, capsys):
    images = tmp_path / "img"
    images.mkdir()
    (images / "000000000001.jpg").write_bytes(make_jpeg(4, 4))
    coco_absent = tmp_path / "c.json"
    coco_absent.write_text(json.dumps({"images": [{"id": 2, "file_name": "x.jpg"}], "annotations": []}))
    out = tmp_path / "out"
    cases = [
        (["--images", str(tmp_path / "missing")], "not a directory"),
        (["--images", str(images), "--samples-per-shard", "0"], "samples-per-shard"),
        (["--images", str(images), "--captions", str(coco_absent)], "absent"),
        (["--images", str(images), "--captions", str(tmp_path / "nope.json")], "not a file"),
        (["--images", str(images), "--prefix", "a.b"], "prefix"),
    ]
    for args, message in cases:
        full = [*args, "--out", str(out)]
        if "--samples-per-shard" not in args:
            full += ["--samples-per-shard", "2"]
        assert shards_cli(*full) == 1, args
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_a_subset_of_a_coco_captions_file_is_sharded_and_the_absent_images_counted(tmp_path, capsys, caplog):
    """Trial 1 item 17: 12 of COCO's images with the full captions file were refused ("names 68 images absent").
    The images present are sharded with their captions; one present without captions keeps ``[]``."""
    images = tmp_path / "img"
    images.mkdir()
    for name in ("000000000001.jpg", "000000000003.jpg", "loose.jpg"):
        (images / name).write_bytes(make_jpeg(4, 4))
    coco = {
        "images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 4, "height": 4} for i in (1, 2, 3, 4)],
        "annotations": [{"id": 10 + i, "image_id": i, "caption": f"cap {i}"} for i in (1, 2, 3, 4)],
    }
    (tmp_path / "c.json").write_text(json.dumps(coco))
    args = ["--images", str(images), "--captions", str(tmp_path / "c.json"), "--samples-per-shard", "5"]
    with caplog.at_level("INFO"):
        assert shards_cli(*args, "--out", str(tmp_path / "o")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["samples"], summary["samples_with_captions"], summary["captioned_images_absent"]) == (
        3,
        2,
        2,
    )
    assert (
        "2 captioned images are absent from" in caplog.text and "sharding the 3 images present" in caplog.text
    )
    shard = str(tmp_path / "o" / "shard-000000.tar")
    read = {r.key: r for r in ShardReader(shard, ReaderConfig(captions="optional"))}
    assert {k: list(r.captions) for k, r in read.items()} == {
        "000000000001": ["cap 1"],
        "000000000003": ["cap 3"],
        "loose": [],
    }


def test_existing_shards_need_overwrite(tmp_path, capsys):
    images = tmp_path / "img"
    images.mkdir()
    for i in range(3):
        (images / f"k{i}.jpg").write_bytes(make_jpeg(4, 4, seed=i))
    args = ["--images", str(images), "--out", str(tmp_path / "o")]
    assert shards_cli(*args, "--samples-per-shard", "1") == 0
    assert shards_cli(*args, "--samples-per-shard", "2") == 1
    assert shards_cli(*args, "--samples-per-shard", "2", "--overwrite") == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]


def test_names_with_dots_get_keys_that_read_back(tmp_path, capsys):
    """``a.b.jpg``, ``a.c.jpg``, ``photo.v2.jpg``: keys ``a_b``, ``a_c``, ``photo_v2`` (before: members
    ``a.b.jpg`` / ``a.c.jpg`` read back as one key ``a``, both lost as ``multiple_images``); the JSON keeps the
    file name. ``a_b.png`` beside ``a.b.jpg`` would share a key: refused, naming both."""
    images = tmp_path / "img"
    images.mkdir()
    for seed, name in enumerate(("a.b.jpg", "a.c.jpg", "photo.v2.jpg")):
        (images / name).write_bytes(make_jpeg(8, 6, seed=seed))
    out = tmp_path / "o"
    assert shards_cli("--images", str(images), "--out", str(out), "--samples-per-shard", "5") == 0
    read = list(ShardReader(str(out / "shard-000000.tar"), ReaderConfig(captions="optional")))
    assert all(isinstance(r, DecodedSample) for r in read), read
    assert [r.key for r in read] == ["a_b", "a_c", "photo_v2"]
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("photo_v2.json").read())["file_name"] == "photo.v2.jpg"
    (images / "a_b.png").write_bytes(make_png(4, 4))
    capsys.readouterr()
    assert shards_cli("--images", str(images), "--out", str(tmp_path / "o2"), "--samples-per-shard", "5") == 1
    assert "two images with key 'a_b': a.b.jpg, a_b.png" in capsys.readouterr().err
