"""``regionflow inspect``: counts, provenance, shard statuses, ``--verify`` (hashes and full validation)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from tiny_store import random_rows, write_test_store

from pipelines import cli
from pipelines.inspect import inspect_store
from schemas.manifest import DoneMarker
from schemas.store import MANIFEST_FILE, PARTS_DIR

D = 8


@pytest.fixture()
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    write_test_store(str(root), {"s-000": random_rows(3, D, seed=1), "s-001": random_rows(2, D, seed=2)}, D)
    return root


def expected_counts(root: Path) -> tuple[int, int, int]:
    """(rows, boxes, captions) counted here with pyarrow alone."""
    tables = [ipc.open_file(str(p)).read_all() for p in sorted((root / PARTS_DIR).glob("s-00?.arrow"))]
    rows = pa.concat_tables(tables).to_pylist()
    return len(rows), sum(r["num_boxes"] for r in rows), sum(len(r["captions"]) for r in rows)


def test_counts_and_json(store: Path, capsys) -> None:
    assert cli.main(["inspect", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["rows"], report["boxes"], report["captions"]) == expected_counts(store)
    assert report["shard_counts"] == {"committed": 2, "other_config": 0, "uncommitted": 0, "failed": 0}
    assert report["schema_version"] == 1 and report["feature_dim"] == D
    assert report["provenance"]["random_init"] is True
    assert report["verified"] is None


def test_text_report_and_verify_ok(store: Path, capsys) -> None:
    assert cli.main(["inspect", str(store), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "RANDOM INIT" in text and "verify           ok" in text
    assert "s-001                    committed" in text


def test_flipped_byte_found_only_by_verify(store: Path, capsys) -> None:
    path = store / PARTS_DIR / "s-001.arrow"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli.main(["inspect", str(store)]) == 0  # markers are trusted without --verify
    capsys.readouterr()
    assert cli.main(["inspect", str(store), "--verify"]) == 2  # a damaged shard: ExitCode.SHARDS_FAILED
    assert "s-001.arrow" in capsys.readouterr().out


def test_missing_part_is_damaged_not_an_error(store: Path, capsys) -> None:
    (store / PARTS_DIR / "s-001.arrow").unlink()  # its done marker stays
    assert cli.main(["inspect", str(store), "--verify"]) == 2  # damaged (ExitCode.SHARDS_FAILED), was rc 1
    out = capsys.readouterr().out
    assert "s-001: committed but s-001.arrow is missing" in out and "FAILED" in out
    report = inspect_store(str(store), verify=True)
    assert report.rows == 3  # the intact shard is still counted


def test_invalid_rows_with_matching_hash_fail_verify(store: Path) -> None:
    """A part rewritten with a box outside its image and a marker re-hashed to match it."""
    path = store / PARTS_DIR / "s-000.arrow"
    rows = ipc.open_file(str(path)).read_all()
    pylist = rows.to_pylist()
    pylist[0]["boxes_xyxy_px"][0][2] = pylist[0]["image_width_px"] + 10.0
    bad = pa.Table.from_pylist(pylist, schema=rows.schema)
    with ipc.new_file(str(path), bad.schema) as writer:
        writer.write_table(bad)
    marker_path = store / PARTS_DIR / "s-000.done.json"
    marker = json.loads(marker_path.read_text())
    data = path.read_bytes()
    marker.update(part_bytes=len(data), part_sha256=hashlib.sha256(data).hexdigest())
    marker_path.write_text(json.dumps(marker))
    DoneMarker.from_json(marker_path.read_bytes(), where="test")  # still a well-formed marker
    report = inspect_store(str(store), verify=True)
    assert report.verified is False
    assert any("outside" in p for p in report.problems), report.problems


def test_uncommitted_and_failed_shards(store: Path) -> None:
    (store / PARTS_DIR / "s-001.done.json").unlink()
    (store / PARTS_DIR / "s-002.arrow.tmp").write_bytes(b"partial")
    manifest = json.loads((store / MANIFEST_FILE).read_text())
    manifest["failed_shards"] = [{"shard": "s-003", "url": "/x/s-003.tar", "error": "ShardReadError: gone"}]
    (store / MANIFEST_FILE).write_text(json.dumps(manifest))
    report = inspect_store(str(store), verify=True)
    status = {s.shard: s.status for s in report.shards}
    assert status == {"s-000": "committed", "s-001": "uncommitted", "s-002": "uncommitted", "s-003": "failed"}
    assert report.rows == 3 and report.verified is True
    assert report.to_dict()["failed_shards"] == ["s-003"]


def test_not_a_store(tmp_path: Path, capsys) -> None:
    (tmp_path / "x.txt").write_text("hello")
    assert cli.main(["inspect", str(tmp_path)]) == 1
    assert "not a regionflow store" in capsys.readouterr().err


def test_imported_store_says_where_it_came_from(tmp_path: Path, capsys) -> None:
    """On an imported store: no 'weights trained', no 'digest None', no raw captions dict, no K=36."""
    import numpy as np
    from test_import_export import _image, write_butd_tsv

    from workers.interop.feature_import import ImportConfig, import_features

    src = tmp_path / "trainval_36.tsv"
    rng = np.random.default_rng(3)
    write_butd_tsv(src, [_image(rng, 7, 2), _image(rng, 8, 3)])
    import_features(str(src), str(tmp_path / "imported"), ImportConfig("butd-tsv", "features"))
    assert cli.main(["inspect", str(tmp_path / "imported")]) == 0
    text = capsys.readouterr().out
    assert f"imported         butd-tsv from {src}" in text and "no detector ran" in text
    assert "boxes            given (from the imported file)" in text
    assert "captions         none (imported files carry no captions)" in text
    for wrong in ("trained", "digest None", "K=", "{", "weights"):
        assert wrong not in text, wrong


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ({"mode": "given", "num_boxes": 36}, "boxes            given (from each sample's JSON)\n"),
        ({"mode": "fixed", "num_boxes": 36}, "boxes            fixed (K=36)\n"),
        (
            {"mode": "adaptive", "num_boxes": 36, "min_boxes": 10, "max_boxes": 100, "conf_threshold": 0.2},
            "boxes            adaptive (10-100 per image, confidence >= 0.2)\n",
        ),
    ],
)
def test_box_line_names_the_mode_numbers_that_apply(store: Path, selection: dict, expected: str) -> None:
    from pipelines.inspect import format_report

    report = inspect_store(str(store))
    report.provenance["box_selection"] = selection
    assert expected in format_report(report)
