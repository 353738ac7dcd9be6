"""``regionflow visualize``: a real tiny store + real tar shards -> a PNG read back with OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
from tiny_store import write_test_store

from pipelines.cli import main as cli_main
from workers.corpus.drawing import (
    RANDOM_INIT_BAND_RGB,
    DrawingConfig,
    RegionLabel,
    class_colour,
    class_name,
    draw_regions,
    mark_random_init,
)
from workers.corpus.tar_writer import write_tar
from workers.store import StoreLocation, read_manifest, write_manifest

FEATURE_DIM = 4
WIDTH, HEIGHT = 100, 80
BOX = [10.0, 12.0, 60.0, 50.0]
CLASS_ID = 5


def _row(key: str, boxes: list[list[float]], ids: list[int]) -> dict:
    n = len(boxes)
    return {
        "key": key,
        "image_width_px": WIDTH,
        "image_height_px": HEIGHT,
        "num_boxes": n,
        "boxes_xyxy_px": boxes,
        "features": [[0.5] * FEATURE_DIM] * n,
        "object_ids": ids,
        "object_conf": [0.9 - 0.1 * i for i in range(n)],
        "captions": ["a caption"],
        "input_ids": [[101, 1037, 102]],
        "captions_truncated": [False],
    }


def _png(grey: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> bytes:
    image = np.full((size[1], size[0], 3), grey, np.uint8)
    ok, buf = cv2.imencode(".png", image)
    assert ok
    return buf.tobytes()


def _shard(path: Path, key: str, grey: int, size: tuple[int, int] = (WIDTH, HEIGHT)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tar(
        path,
        [
            ("other.png", _png(0, size)),
            (f"{key}.png", _png(grey, size)),
            (f"{key}.json", b'{"caption": "x"}'),
        ],
    )
    return path


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    write_test_store(str(root), {"s-000": [_row("k1", [BOX, [70, 5, 95, 30]], [CLASS_ID, 9])]}, FEATURE_DIM)
    return root


def _visualize(*argv: str) -> int:
    return cli_main(["visualize", *argv])


def _image_part(picture: np.ndarray, height: int) -> np.ndarray:
    """The drawn image of a picture from a random-init store (every store here but one): the rows under it
    are the dark red band that says so (trial 1 item 14)."""
    assert picture.shape[0] > height, picture.shape
    band = picture[height:]
    assert (band == RANDOM_INIT_BAND_RGB[::-1]).all(
        axis=2
    ).mean() > 0.6  # BGR read back; text covers the rest
    assert (band > 200).all(axis=2).any()  # white text
    return picture[:height]


def test_png_has_the_image_size_and_box_coloured_outline(store: Path, tmp_path: Path) -> None:
    shard = _shard(tmp_path / "s-000.tar", "k1", 120)
    out = tmp_path / "k1.png"
    assert _visualize(str(store), "k1", "--out", str(out), "--images", str(shard)) == 0
    picture = _image_part(cv2.imread(str(out)), HEIGHT)
    assert picture.shape == (HEIGHT, WIDTH, 3)
    expected_bgr = list(class_colour(CLASS_ID))[::-1]
    x1, y1, x2, y2 = (int(v) for v in BOX)
    assert (picture[y2 - 1, x1 + 5 : x2 - 5] == expected_bgr).all()  # bottom edge of the box
    assert (picture[y1 + 5 : y2 - 5, x2 - 1] == expected_bgr).all()  # right edge
    assert (picture[y2 - 10 : y2 - 3, x1 + 3 : x1 + 15] == 120).all()  # the image itself, inside the box


def test_only_a_random_init_store_gets_the_band(store: Path, tmp_path: Path) -> None:
    """Trial 1 item 14: labels such as "keypad 1.6e-03" from an untrained detector looked like results."""
    shard = _shard(tmp_path / "s-000.tar", "k1", 120)
    location = StoreLocation.parse(str(store))
    manifest = read_manifest(location)
    assert manifest["weights"]["random_init"] is True
    marked, trained = tmp_path / "marked.png", tmp_path / "trained.png"
    assert _visualize(str(store), "k1", "--out", str(marked), "--images", str(shard)) == 0
    manifest["weights"] = {"digest": "sha256:trained", "random_init": False}
    write_manifest(location, manifest)
    assert _visualize(str(store), "k1", "--out", str(trained), "--images", str(shard)) == 0
    picture = cv2.imread(str(trained))
    assert picture.shape == (HEIGHT, WIDTH, 3)
    assert (_image_part(cv2.imread(str(marked)), HEIGHT) == picture).all()


@pytest.mark.parametrize("width", [12, 100, 1000])
def test_random_init_band_fits_any_width(width: int) -> None:
    picture = np.full((30, width, 3), 7, np.uint8)
    marked = mark_random_init(picture)
    assert marked.shape[1] == width and (marked[:30] == 7).all()
    band = marked[30:]
    assert 8 <= band.shape[0] <= 20
    assert (band == RANDOM_INIT_BAND_RGB).all(axis=2).any() and (band > 200).all(axis=2).any()


def test_scale_resizes_and_boxes_follow(store: Path, tmp_path: Path) -> None:
    shard = _shard(tmp_path / "s-000.tar", "k1", 120)
    out = tmp_path / "k1x2.png"
    assert _visualize(str(store), "k1", "--out", str(out), "--images", str(shard), "--scale", "2") == 0
    picture = _image_part(cv2.imread(str(out)), 2 * HEIGHT)
    assert picture.shape == (2 * HEIGHT, 2 * WIDTH, 3)
    assert (picture[2 * int(BOX[3]) - 1, 30:100] == list(class_colour(CLASS_ID))[::-1]).all()


def test_missing_key_exits_1_with_a_clear_message(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shard = _shard(tmp_path / "s-000.tar", "k1", 120)
    assert _visualize(str(store), "nope", "--out", str(tmp_path / "x.png"), "--images", str(shard)) == 1
    assert "'nope'" in capsys.readouterr().err and not (tmp_path / "x.png").exists()


def test_repeated_key_needs_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "store"
    write_test_store(str(root), {"a": [_row("k1", [BOX], [1])], "b": [_row("k1", [BOX], [2])]}, FEATURE_DIM)
    urls = [str(_shard(tmp_path / "a.tar", "k1", 40)), str(_shard(tmp_path / "b.tar", "k1", 200))]
    out = tmp_path / "k1.png"
    assert _visualize(str(root), "k1", "--out", str(out), "--images", *urls) == 1
    assert "--shard" in capsys.readouterr().err
    assert _visualize(str(root), "k1", "--shard", "b", "--out", str(out), "--images", *urls) == 0
    picture = cv2.imread(str(out))
    assert picture[HEIGHT - 5, WIDTH - 5, 0] == 200  # shard b's image, outside the box
    assert (picture[int(BOX[3]) - 1, 20:50] == list(class_colour(2))[::-1]).all()
    assert _visualize(str(root), "k1", "--shard", "zzz", "--out", str(out), "--images", *urls) == 1


def test_image_urls_come_from_the_manifest_or_a_clear_error(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k1.png"
    assert _visualize(str(store), "k1", "--out", str(out)) == 1
    assert "--images" in capsys.readouterr().err
    shard = _shard(tmp_path / "s-000.tar", "k1", 120)
    location = StoreLocation.parse(str(store))
    manifest = read_manifest(location)
    manifest["runs"].append({"command": "extract", "args": {"shard_urls": [str(shard)]}})
    write_manifest(location, manifest)
    assert _visualize(str(store), "k1", "--out", str(out)) == 0
    assert _image_part(cv2.imread(str(out)), HEIGHT).shape == (HEIGHT, WIDTH, 3)


def test_wrong_images_are_refused(store: Path, tmp_path: Path) -> None:
    other_size = _shard(tmp_path / "s-000.tar", "k1", 120, size=(64, 64))
    assert _visualize(str(store), "k1", "--out", str(tmp_path / "x.png"), "--images", str(other_size)) == 1
    no_image = tmp_path / "elsewhere" / "s-000.tar"
    no_image.parent.mkdir()
    write_tar(no_image, [("k2.png", _png(3))])
    assert _visualize(str(store), "k1", "--out", str(tmp_path / "x.png"), "--images", str(no_image)) == 1
    unrelated = _shard(tmp_path / "t-000.tar", "k1", 120)
    assert _visualize(str(store), "k1", "--out", str(tmp_path / "x.png"), "--images", str(unrelated)) == 1


def test_class_names_follow_the_butd_vocabulary_convention() -> None:
    vocab = ["cat,kitty", "dog"]
    assert class_name(1, vocab) == "cat" and class_name(2, vocab) == "dog"
    assert class_name(0, vocab) is None and class_name(3, vocab) is None and class_name(1, None) is None
    assert RegionLabel(2, 0.876, "dog").text == "dog 0.88"
    assert RegionLabel(7, 0.5).text == "#7 0.50"
    assert RegionLabel(7, 0.00075664).text == "#7 7.6e-04"
    assert class_colour(3) == class_colour(3) and class_colour(3) != class_colour(4)


def test_draw_regions_validates_and_keeps_the_most_confident() -> None:
    image = np.zeros((40, 50, 3), np.uint8)
    boxes = np.array([[2, 2, 20, 20], [25, 5, 45, 35]], np.float32)
    labels = [RegionLabel(1, 0.2), RegionLabel(2, 0.9)]
    drawn = draw_regions(image, boxes, labels, DrawingConfig(max_boxes=1))
    assert (drawn[34, 30:40] == class_colour(2)).all()  # bottom edge of the kept box (RGB)
    assert not (drawn[19, 5:15] == class_colour(1)).all(axis=-1).any()  # the dropped box is not drawn
    with pytest.raises(ValueError):
        draw_regions(image, boxes, labels[:1])
    with pytest.raises(ValueError):
        draw_regions(image.astype(np.float32), boxes, labels)
    with pytest.raises(ValueError):
        DrawingConfig(scale=0)


@pytest.mark.slow
def test_store_of_two_extract_runs_finds_each_shard_from_its_marker(
    tmp_path: Path, ray_session: object, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two extract runs into one store (shard a, then shard b): visualize finds a's image from a's done
    marker, without --images (before: only the last run's URLs were searched, 'none of the given shard
    URLs has shard id ...'). A shard moved away afterwards is a one-line error that names --images."""
    store = tmp_path / "store"
    shards = {
        "a": _shard(tmp_path / "in1" / "a.tar", "ka", 40),
        "b": _shard(tmp_path / "in2" / "b.tar", "kb", 200),
    }
    for shard in shards.values():
        argv = ["extract", str(shard), "--out", str(store), "--config", "tiny", "--num-boxes", "2"]
        assert cli_main([*argv, "--detector-threads", "1"]) == 0
    capsys.readouterr()
    for key, grey in (("ka", 40), ("kb", 200)):
        out = tmp_path / f"{key}.png"
        assert _visualize(str(store), key, "--out", str(out)) == 0, capsys.readouterr().err
        picture = _image_part(cv2.imread(str(out)), HEIGHT)
        assert picture.shape == (HEIGHT, WIDTH, 3) and int(np.median(picture)) == grey
    shards["a"].rename(tmp_path / "moved.tar")
    assert _visualize(str(store), "ka", "--out", str(tmp_path / "x.png")) == 1
    assert "pass --images SHARD_URL" in capsys.readouterr().err
