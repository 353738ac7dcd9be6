"""A store is readable without regionflow (docs/design.md §4): pyarrow and polars open its Arrow IPC parts, and
DuckDB queries its Parquet export, in a fresh interpreter that never imports regionflow's packages."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from tiny_store import write_test_store

from workers.interop.feature_export import export_parquet

D = 8
REGIONFLOW_PACKAGES = ("schemas", "workers", "pipelines", "model")

# Runs in `python -I` (isolated: no cwd or PYTHONPATH on sys.path) with cwd = the store's parent.
READER_SCRIPT = r"""
import json, sys
import duckdb, polars as pl, pyarrow as pa, pyarrow.ipc as ipc

store, parquet = sys.argv[1], sys.argv[2]
out = {}
with pa.memory_map(f"{store}/parts/s0.arrow") as source:
    table = ipc.open_file(source).read_all()
    feats = table.column("features").combine_chunks().flatten().flatten()
    out["pyarrow_features"] = feats.to_numpy(zero_copy_only=True).astype("float32").tolist()
    out["pyarrow_type"] = str(table.schema.field("features").type)
    out["pyarrow_meta"] = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
frame = pl.read_ipc(f"{store}/parts/s0.arrow")
out["polars_keys"] = frame["key"].to_list()
out["polars_num_boxes"] = frame["num_boxes"].to_list()
out["polars_boxes"] = frame["boxes_xyxy_px"].to_list()
out["polars_features_dtype"] = str(frame.schema["features"])
errors = pl.read_ipc(f"{store}/parts/s0.errors.arrow")
out["polars_error_rows"] = errors.height
parts = f"read_parquet('{parquet}/rows/*.parquet')"
rows = duckdb.sql(
    f"SELECT key, num_boxes, features[1][1], boxes_xyxy_px[1] FROM {parts} ORDER BY key"
).fetchall()
out["duckdb_rows"] = [list(row) for row in rows]
out["duckdb_total_boxes"] = duckdb.sql(f"SELECT sum(num_boxes) FROM {parts}").fetchall()[0][0]
out["regionflow_modules"] = sorted(m for m in sys.modules if m.split(".")[0] in PACKAGES)
print(json.dumps(out))
"""


def _rows(rng: np.random.Generator, shard: str, n: int) -> list[dict[str, Any]]:
    rows = []
    for i in range(n):
        k = i + 1
        x1 = np.arange(k, dtype=np.float32)
        boxes = np.stack([x1, x1, x1 + 5, x1 + 7], 1)
        rows.append(
            {
                "key": f"{shard}/img{i}",
                "image_id": 10 * i,
                "image_width_px": 64,
                "image_height_px": 48,
                "num_boxes": k,
                "boxes_xyxy_px": boxes.tolist(),
                "features": rng.standard_normal((k, D)).astype(np.float16).tolist(),
                "object_ids": list(range(1, k + 1)),
                "object_conf": [0.25] * k,
                "captions": [f"caption {i}"],
                "input_ids": [[101, 7 + i, 102]],
                "captions_truncated": [False],
            }
        )
    return rows


@pytest.fixture(scope="module")
def opened(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, list]]:
    root = tmp_path_factory.mktemp("open")
    rng = np.random.default_rng(11)
    rows = {"s0": _rows(rng, "s0", 3), "s1": _rows(rng, "s1", 2)}
    write_test_store(str(root / "store"), rows, D)
    export_parquet(str(root / "store"), str(root / "parquet"))
    script = READER_SCRIPT.replace("PACKAGES", repr(REGIONFLOW_PACKAGES))
    done = subprocess.run(
        [sys.executable, "-I", "-c", script, "store", "parquet"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), rows


def test_no_regionflow_imported(opened: tuple[dict[str, Any], dict[str, list]]) -> None:
    out, _ = opened
    assert out["regionflow_modules"] == []


def test_pyarrow_reads_float16_zero_copy(opened: tuple[dict[str, Any], dict[str, list]]) -> None:
    out, rows = opened
    expected = np.concatenate([np.array(r["features"], np.float16).reshape(-1) for r in rows["s0"]])
    np.testing.assert_array_equal(np.array(out["pyarrow_features"], np.float32), expected.astype(np.float32))
    assert out["pyarrow_type"] == f"large_list<item: fixed_size_list<item: halffloat>[{D}]>"
    assert out["pyarrow_meta"]["regionflow.feature_dim"] == str(D)


def test_polars_reads_parts(opened: tuple[dict[str, Any], dict[str, list]]) -> None:
    out, rows = opened
    assert out["polars_keys"] == [r["key"] for r in rows["s0"]]
    assert out["polars_num_boxes"] == [1, 2, 3]
    assert out["polars_boxes"] == [r["boxes_xyxy_px"] for r in rows["s0"]]
    assert "Float16" in out["polars_features_dtype"] or "f16" in out["polars_features_dtype"]
    assert out["polars_error_rows"] == 0


def test_duckdb_reads_parquet_export(opened: tuple[dict[str, Any], dict[str, list]]) -> None:
    out, rows = opened
    all_rows = sorted(rows["s0"] + rows["s1"], key=lambda r: r["key"])
    assert [r[0] for r in out["duckdb_rows"]] == [r["key"] for r in all_rows]
    for got, row in zip(out["duckdb_rows"], all_rows, strict=True):
        assert got[1] == row["num_boxes"]
        assert got[2] == float(np.float16(row["features"][0][0]))  # float16 read back as FLOAT, exactly
        assert got[3] == row["boxes_xyxy_px"][0]
    assert out["duckdb_total_boxes"] == sum(r["num_boxes"] for r in all_rows)
