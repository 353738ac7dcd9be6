"""Importing bottom-up-attention TSVs and ViLBERT LMDBs, exporting stores to Parquet and TSV.

Source files are written here the way their original tools write them (``generate_tsv.py``: a
``csv.DictWriter`` with tab delimiter and base64 float32 arrays; ViLBERT ``convert_to_lmdb.py``: pickled
dicts under image-id keys plus a ``keys`` index), independently of regionflow's exporter.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tiny_store import write_test_store

from pipelines.cli import main as cli_main
from schemas.store import NUM_OBJECT_OUTPUTS, validate_rows
from workers.interop.feature_export import export_parquet
from workers.interop.feature_import import ImportConfig, StoreExistsError, import_features
from workers.interop.safe_unpickle import UnsafePickleError, safe_loads
from workers.store import StoreReader

D = 16
FIELDS = ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"]


def _image(rng: np.random.Generator, image_id: int, n: int, with_cls: bool = True) -> dict[str, Any]:
    w, h = int(rng.integers(50, 400)), int(rng.integers(50, 400))
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, n), y1 + rng.uniform(1, h / 2, n)], 1)
    image = {
        "image_id": image_id,
        "image_w": w,
        "image_h": h,
        "num_boxes": n,
        "boxes": boxes.astype(np.float32),
        "features": rng.standard_normal((n, D)).astype(np.float32) * 3,
    }
    if with_cls:
        logits = rng.standard_normal((n, NUM_OBJECT_OUTPUTS)).astype(np.float32)
        image["cls_prob"] = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    return image


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(a.tobytes()).decode()


def write_butd_tsv(path: Path, images: list[dict[str, Any]], extra_lines: list[str] = ()) -> None:
    """As generate_tsv.py: csv.DictWriter, tab-separated, base64 float32 boxes/features[/cls_prob]."""
    names = FIELDS + (["cls_prob"] if "cls_prob" in images[0] else [])
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, delimiter="\t", fieldnames=names)
        for im in images:
            writer.writerow({k: _b64(v) if isinstance(v, np.ndarray) else v for k, v in im.items()})
        for line in extra_lines:
            f.write(line + "\r\n")


def write_vilbert_lmdb(path: Path, images: list[dict[str, Any]], *, base64_arrays: bool) -> None:
    """As ViLBERT's convert_to_lmdb.py: pickled dicts under str(image_id) keys, plus a ``keys`` index."""
    env = lmdb.open(str(path), map_size=1 << 28)
    ids = []
    with env.begin(write=True) as txn:
        for im in images:
            item = dict(im)
            if base64_arrays:
                item = {k: _b64(v) if isinstance(v, np.ndarray) else v for k, v in item.items()}
            else:
                item["num_boxes"] = np.int64(im["num_boxes"])  # as np.load(...).item() gives it
            key = str(im["image_id"]).encode()
            ids.append(key)
            txn.put(key, pickle.dumps(item))
        txn.put(b"keys", pickle.dumps(ids))
    env.close()


@pytest.fixture
def images() -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    return [_image(rng, 1000 + i, n) for i, n in enumerate([3, 1, 5, 2])]


def _only_shard(store: Path) -> tuple[StoreReader, pa.Table, pa.Table]:
    reader = StoreReader(str(store))
    (shard,) = reader.shards()
    return reader, reader.table(shard), reader.errors(shard)


def _check_rows_match(table: pa.Table, images: list[dict[str, Any]]) -> None:
    assert table.column("key").to_pylist() == [str(im["image_id"]) for im in images]
    assert table.column("image_id").to_pylist() == [im["image_id"] for im in images]
    assert table.column("box_source").to_pylist() == ["given"] * len(images)
    for row, im in zip(table.to_pylist(), images, strict=True):
        assert (row["image_width_px"], row["image_height_px"]) == (im["image_w"], im["image_h"])
        np.testing.assert_array_equal(np.array(row["boxes_xyxy_px"], np.float32), im["boxes"])
        feats = np.array(row["features"], dtype=np.float32)
        np.testing.assert_array_equal(feats, im["features"].astype(np.float16).astype(np.float32))
        fg = im["cls_prob"][:, 1:]
        assert row["object_ids"] == (fg.argmax(1) + 1).tolist()
        np.testing.assert_array_equal(np.array(row["object_conf"], np.float32), fg.max(1))
        assert row["captions"] == [] and row["input_ids"] == [] and row["attribute_ids"] is None


def test_butd_tsv_import(tmp_path: Path, images: list[dict[str, Any]]) -> None:
    src = tmp_path / "trainval_36.tsv"
    write_butd_tsv(src, images)
    summary = import_features(str(src), str(tmp_path / "store"), ImportConfig("butd-tsv", "trainval_36"))
    reader, table, errors = _only_shard(tmp_path / "store")
    validate_rows(table)
    _check_rows_match(table, images)
    assert errors.num_rows == 0 and summary.rows == 4 and summary.feature_dim == D
    assert table.column("cls_prob").null_count == 4  # not kept by default
    imported = reader.manifest["import"]
    assert imported["format"] == "butd-tsv" and imported["source"] == str(src)
    assert imported["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert reader.manifest["feature_dim"] == D


def test_tsv_without_cls_prob_gives_unknown_objects(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    src = tmp_path / "plain.tsv"
    write_butd_tsv(src, [_image(rng, 5, 4, with_cls=False)])
    import_features(str(src), str(tmp_path / "s"), ImportConfig("butd-tsv", "plain"))
    _, table, _ = _only_shard(tmp_path / "s")
    assert table.column("object_ids").to_pylist() == [[0, 0, 0, 0]]
    assert table.column("object_conf").to_pylist() == [[0.0, 0.0, 0.0, 0.0]]


def test_bad_records_become_error_rows(tmp_path: Path, images: list[dict[str, Any]]) -> None:
    right = images[1]["boxes"] + np.float32([images[1]["image_w"], 0, images[1]["image_w"], 0])
    outside = dict(images[1], image_id=7, boxes=right)  # only x2 > W is wrong
    above = images[3]["boxes"].copy()
    above[-1, 1] = -0.5  # only y1 < 0 is wrong
    short = dict(images[2], image_id=8, features=images[2]["features"][:, :-1])
    src = tmp_path / "bad.tsv"
    write_butd_tsv(
        src,
        [images[0], outside, short, images[0], dict(images[3], image_id=6, boxes=above)],
        extra_lines=["9\t640\t48"],
    )
    summary = import_features(str(src), str(tmp_path / "s"), ImportConfig("butd-tsv", "bad", feature_dim=D))
    _, table, errors = _only_shard(tmp_path / "s")
    assert table.column("key").to_pylist() == ["1000"]
    got = {(e["key"], e["reason"]) for e in errors.to_pylist()}
    assert got == {
        ("7", "boxes_invalid"),
        ("6", "boxes_invalid"),
        ("8", "detector_output_invalid"),
        ("1000", "duplicate_member"),
        ("9", "detector_output_invalid"),
    }
    assert summary.rows + summary.error_rows == 6
    marker = StoreReader(str(tmp_path / "s")).marker("bad")
    assert marker.accounting.samples == 6 and marker.accounting.members_in_errors == 5


def test_vilbert_lmdb_import_both_array_layouts(tmp_path: Path, images: list[dict[str, Any]]) -> None:
    for base64_arrays in (True, False):
        src = tmp_path / f"feat_{base64_arrays}.lmdb"
        write_vilbert_lmdb(src, images, base64_arrays=base64_arrays)
        out = tmp_path / f"store_{base64_arrays}"
        summary = import_features(str(src), str(out), ImportConfig("vilbert-lmdb", "coco"))
        _, table, errors = _only_shard(out)
        _check_rows_match(table, images)  # LMDB key order == ids here (same digit count)
        assert errors.num_rows == 0 and summary.rows == len(images)  # the "keys" index is not a row


class _OpensMarker:
    """A pickle payload that creates a file when unpickled by plain ``pickle``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_restricted_unpickler_refuses_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"image_id": 1, "features": _OpensMarker(marker)})
    pickle.loads(payload)["features"].close()  # noqa: S301 - positive control: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(UnsafePickleError, match=r"io\.open"):
        safe_loads(payload, where="test")
    assert not marker.exists()


def test_lmdb_with_code_payload_is_refused(tmp_path: Path, images: list[dict[str, Any]]) -> None:
    marker = tmp_path / "pwned"
    src = tmp_path / "evil.lmdb"
    write_vilbert_lmdb(src, images[:1], base64_arrays=True)
    env = lmdb.open(str(src), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"2000", pickle.dumps({"image_id": 2000, "boxes": _OpensMarker(marker)}))
    env.close()
    with pytest.raises(UnsafePickleError, match=r"evil\.lmdb\[2000\]"):
        import_features(str(src), str(tmp_path / "s"), ImportConfig("vilbert-lmdb", "evil"))
    assert not marker.exists()
    rc = cli_main(["import", "--from", "vilbert-lmdb", str(src), "--out", str(tmp_path / "t")])
    assert rc == 1 and not marker.exists()


def _random_store(root: Path, rng: np.random.Generator, with_cls: bool) -> None:
    special = np.array([65504, -65504, 6e-8, -0.0, 0.0, 1.0 / 3], dtype=np.float16)
    rows_by_shard = {}
    for s_index, (shard, n_rows) in enumerate((("s0", 3), ("s1", 2))):
        rows = []
        for i in range(n_rows):
            im = _image(rng, 0, int(rng.integers(1, 6)))
            n = im["num_boxes"]
            feats = rng.standard_normal((n, D)).astype(np.float16)
            feats.reshape(-1)[: len(special)] = special[: feats.size]
            row = {
                "key": f"dir/{shard}_{i}",
                "image_id": None if i == 0 else 1000 * s_index + i,
                "image_width_px": im["image_w"],
                "image_height_px": im["image_h"],
                "num_boxes": n,
                "boxes_xyxy_px": im["boxes"].tolist(),
                "features": feats.tolist(),
                "object_ids": [1] * n,
                "object_conf": [0.5] * n,
                "captions": [],
                "input_ids": [],
                "captions_truncated": [],
            }
            if with_cls:
                row["cls_prob"] = im["cls_prob"].astype(np.float16).tolist()
            rows.append(row)
        rows_by_shard[shard] = rows
    write_test_store(str(root), rows_by_shard, D)


def _f16_bits(column: pa.ChunkedArray) -> np.ndarray:
    return column.combine_chunks().flatten().flatten().to_numpy().view(np.uint16)


@pytest.mark.parametrize("with_cls", [False, True])
def test_tsv_round_trip_is_bit_exact(tmp_path: Path, with_cls: bool) -> None:
    _random_store(tmp_path / "store", np.random.default_rng(3), with_cls)
    tsv = tmp_path / "out" / "all.tsv"
    assert cli_main(["export", str(tmp_path / "store"), "--tsv", str(tsv)]) == 0
    args = ["import", "--from", "butd-tsv", str(tsv), "--out", str(tmp_path / "back")]
    assert cli_main(args + (["--keep-cls-prob"] if with_cls else [])) == 0
    original = StoreReader(str(tmp_path / "store"))
    merged = pa.concat_tables(original.table(s) for s in original.shards())
    _, back, errors = _only_shard(tmp_path / "back")
    assert errors.num_rows == 0 and back.num_rows == merged.num_rows == 5
    for name in ("num_boxes", "image_width_px", "image_height_px", "boxes_xyxy_px"):
        assert back.column(name).equals(merged.column(name)), name
    np.testing.assert_array_equal(_f16_bits(back.column("features")), _f16_bits(merged.column("features")))
    if with_cls:
        np.testing.assert_array_equal(
            _f16_bits(back.column("cls_prob")), _f16_bits(merged.column("cls_prob"))
        )
    # the TSV id field: image_id when the row has one, else its key
    ids = merged.column("image_id").to_pylist()
    expected_keys = [
        k if i is None else str(i) for k, i in zip(merged.column("key").to_pylist(), ids, strict=True)
    ]
    assert back.column("key").to_pylist() == expected_keys


def test_parquet_export_keeps_columns(tmp_path: Path) -> None:
    _random_store(tmp_path / "store", np.random.default_rng(4), with_cls=True)
    summary = export_parquet(str(tmp_path / "store"), str(tmp_path / "pq"))
    assert summary.shards == ["s0", "s1"] and summary.rows == 5
    reader = StoreReader(str(tmp_path / "store"))
    for shard in reader.shards():
        back = pq.read_table(tmp_path / "pq" / "rows" / f"{shard}.parquet")
        assert back.equals(reader.table(shard))  # float16 and fixed-size lists restored by pyarrow
        assert pq.read_table(tmp_path / "pq" / "errors" / f"{shard}.parquet").num_rows == 0
    assert (tmp_path / "pq" / "manifest.json").read_bytes() == (
        tmp_path / "store" / "manifest.json"
    ).read_bytes()


def test_parquet_float32_export_is_exact(tmp_path: Path) -> None:
    _random_store(tmp_path / "store", np.random.default_rng(5), with_cls=False)
    assert cli_main(["export", str(tmp_path / "store"), "--parquet", str(tmp_path / "pq"), "--float32"]) == 0
    original = StoreReader(str(tmp_path / "store")).table("s0")
    back = pq.read_table(tmp_path / "pq" / "rows" / "s0.parquet")
    assert back.schema.field("features").type.value_type.value_type == pa.float32()
    wide = back.column("features").combine_chunks().flatten().flatten().to_numpy()
    narrow = original.column("features").combine_chunks().flatten().flatten().to_numpy()
    np.testing.assert_array_equal(wide.astype(np.float16).view(np.uint16), narrow.view(np.uint16))


def test_records_per_shard_and_rerun_is_identical(tmp_path: Path, images: list[dict[str, Any]]) -> None:
    src = tmp_path / "x.tsv"
    write_butd_tsv(src, images + [images[0]])  # 5 records, the last a duplicate
    config = ImportConfig("butd-tsv", "x", records_per_shard=2)
    import_features(str(src), str(tmp_path / "a"), config)
    import_features(str(src), str(tmp_path / "b"), config)
    import_features(str(src), str(tmp_path / "b"), config)  # same source and config: allowed, rewritten
    reader = StoreReader(str(tmp_path / "a"))
    assert reader.shards() == ["x-00000", "x-00001", "x-00002"]
    assert [reader.table(s).num_rows for s in reader.shards()] == [2, 2, 0]
    assert reader.errors("x-00002").column("reason").to_pylist() == ["duplicate_member"]
    for name in sorted(os.listdir(tmp_path / "a" / "parts")):
        assert (tmp_path / "a" / "parts" / name).read_bytes() == (
            tmp_path / "b" / "parts" / name
        ).read_bytes()
    assert len(StoreReader(str(tmp_path / "b")).manifest["runs"]) == 2
    with pytest.raises(StoreExistsError):
        import_features(str(src), str(tmp_path / "a"), ImportConfig("butd-tsv", "other"))


COCO_CAPTIONS = (
    Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-train-mini" / "captions_train2017.json"
)


def test_captions_joined_by_image_id(tmp_path: Path) -> None:
    if not COCO_CAPTIONS.is_file():
        pytest.skip(f"real COCO captions not found at {COCO_CAPTIONS}")
    import json

    coco = json.loads(COCO_CAPTIONS.read_text())
    first, second = sorted({a["image_id"] for a in coco["annotations"]})[:2]
    rng = np.random.default_rng(9)
    src = tmp_path / "coco.tsv"
    write_butd_tsv(src, [_image(rng, first, 2), _image(rng, 5, 1), _image(rng, second, 3)])
    args = [
        "import",
        "--from",
        "butd-tsv",
        str(src),
        "--out",
        str(tmp_path / "s"),
        "--captions",
        str(COCO_CAPTIONS),
    ]
    assert cli_main(args + ["--max-tokens", "8"]) == 0
    reader, table, _ = _only_shard(tmp_path / "s")
    rows = table.to_pylist()
    for row, image_id in zip(rows, (first, 5, second), strict=True):
        annotations = sorted(
            (a for a in coco["annotations"] if a["image_id"] == image_id), key=lambda a: a["id"]
        )
        assert row["captions"] == [a["caption"].strip() for a in annotations]
        assert len(row["input_ids"]) == len(row["captions"]) == len(row["captions_truncated"])
        for ids, cut in zip(row["input_ids"], row["captions_truncated"], strict=True):
            assert 3 <= len(ids) <= 8 and ids[0] != ids[-1]  # [CLS] ... [SEP]
            assert cut  # every COCO caption is longer than 6 word pieces
    assert rows[1]["captions"] == []  # id 5 has no captions: empty, not an error
    assert reader.manifest["extraction_config"]["captions"]["max_tokens"] == 8
    assert reader.manifest["tokenizer"]["max_tokens"] == 8


def test_overwrite_replaces_the_earlier_import(tmp_path: Path, images: list[dict[str, Any]]) -> None:
    first, second = tmp_path / "first.tsv", tmp_path / "second.tsv"
    write_butd_tsv(first, images)
    write_butd_tsv(second, images[:2])
    store = tmp_path / "store"
    base = ["import", "--from", "butd-tsv"]
    assert cli_main([*base, str(first), "--out", str(store)]) == 0
    (store / "notes.txt").write_text("kept")
    assert cli_main([*base, str(second), "--out", str(store)]) != 0  # another source
    assert cli_main([*base, str(second), "--out", str(store), "--overwrite"]) == 0
    assert sorted(os.listdir(store / "parts")) == [
        "second.arrow",
        "second.done.json",
        "second.errors.arrow",
    ]
    assert (store / "notes.txt").read_text() == "kept"
    assert cli_main(["inspect", str(store), "--verify"]) == 0
    reader, table, _ = _only_shard(store)
    _check_rows_match(table, images[:2])
    assert reader.manifest["import"]["source"] == str(second) and len(reader.manifest["runs"]) == 1


def test_duckdb_reads_rows_and_errors_with_one_plain_glob_each(
    tmp_path: Path, images: list[dict[str, Any]]
) -> None:
    """An imported store (shard 'features', one error row) beside an extract-style store (shards s0, s1):
    'rows/*.parquet' reads only rows and 'errors/*.parquet' only error rows, whichever file comes first (the
    old '*.parquet' mixed both kinds, and '*[0-9].parquet' missed the imported shard)."""
    duckdb = pytest.importorskip("duckdb")
    src = tmp_path / "trainval.tsv"
    write_butd_tsv(src, images, extra_lines=["not\tan\timage"])
    import_features(str(src), str(tmp_path / "imported"), ImportConfig("butd-tsv", "features"))
    assert cli_main(["export", str(tmp_path / "imported"), "--parquet", str(tmp_path / "pq")]) == 0
    rows = duckdb.sql(f"SELECT key, num_boxes FROM read_parquet('{tmp_path}/pq/rows/*.parquet') ORDER BY key")
    assert rows.fetchall() == sorted((str(im["image_id"]), im["num_boxes"]) for im in images)
    errors = duckdb.sql(
        f"SELECT shard, reason FROM read_parquet('{tmp_path}/pq/errors/*.parquet')"
    ).fetchall()
    assert len(errors) == 1 and errors[0][0] == "features"
    _random_store(tmp_path / "store", np.random.default_rng(6), with_cls=False)
    assert cli_main(["export", str(tmp_path / "store"), "--parquet", str(tmp_path / "pq2")]) == 0
    for folder in ("rows", "errors"):
        columns = {
            tuple(pq.read_schema(path).names)
            for path in sorted((tmp_path / "pq2" / folder).glob("*.parquet"))
        }
        assert len(columns) == 1, columns  # one column set per folder
    names = [
        c[0]
        for c in duckdb.sql(
            f"DESCRIBE SELECT * FROM read_parquet('{tmp_path}/pq2/rows/*.parquet')"
        ).fetchall()
    ]
    assert names == StoreReader(str(tmp_path / "store")).table("s0").column_names
