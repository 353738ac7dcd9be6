"""Export a regionflow store to Parquet (DuckDB, Spark, pandas) or to a bottom-up-attention TSV.

Parquet (``export_parquet``): one file per committed shard, ``DIR/rows/<shard>.parquet`` with the store's
columns unchanged, ``DIR/errors/<shard>.parquet`` with its error table, and a copy of ``manifest.json``.
Rows and error tables are in their own folders so that one plain glob reads one kind, whatever the shard
names (an imported store's shard is ``features``): every file under ``rows/`` has the same columns (the
store's schema), and every file under ``errors/`` the error-table columns. DuckDB::

    SELECT key, num_boxes FROM read_parquet('DIR/rows/*.parquet');
    SELECT reason, count(*) FROM read_parquet('DIR/errors/*.parquet') GROUP BY reason;

Region features and ``cls_prob`` stay float16 by default: pyarrow writes Parquet's FLOAT16 logical type,
which pyarrow, polars and DuckDB 2 read (DuckDB returns it as FLOAT); ``features_float32=True`` casts
them to float32 (exact, twice the size) for readers without FLOAT16 support (older DuckDB, Spark).
Parquet has no fixed-size lists: other readers see ``boxes_xyxy_px`` and ``features`` as lists of lists
(DuckDB: ``FLOAT[][]``); pyarrow restores the fixed sizes from the Arrow schema stored in the file.

TSV (``export_tsv``): the layout ``workers.interop.feature_import`` reads (peteanderson80/bottom-up-attention
``tools/generate_tsv.py``): ``image_id, image_w, image_h, num_boxes, boxes, features[, cls_prob]``, tab
separated, base64 of float32 arrays (float16 features widened exactly to float32, so re-importing gives
the same float16 bits). The ``image_id`` field is the row's ``image_id`` when it has one, else its key.
A ``cls_prob`` field is written for the rows that have one. Shards in sorted order, rows in store order.
Object ids, attributes and captions are not part of the TSV layout and are not exported to it.
"""

from __future__ import annotations

import base64
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas.manifest import canonical_json
from schemas.store import NUM_OBJECT_OUTPUTS
from workers.store import StoreLocation, StoreReader

PARQUET_SUFFIX = ".parquet"
ROWS_DIR = "rows"
ERRORS_DIR = "errors"
MANIFEST_COPY = "manifest.json"
EXPORT_BATCH_ROWS = 256
FLOAT_COLUMNS = ("features", "cls_prob")


@dataclass
class ExportSummary:
    """What an export wrote."""

    store: str
    target: str
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    files: list[str] = field(default_factory=list)


def _float32_schema(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the float16 leaves of ``features`` / ``cls_prob`` widened to float32."""
    fields = []
    for f in schema:
        if f.name in FLOAT_COLUMNS:
            width = f.type.value_type.list_size
            f = f.with_type(pa.large_list(pa.list_(pa.float32(), width)))
        fields.append(f)
    return pa.schema(fields, metadata=schema.metadata)


def parquet_names(shard: str) -> tuple[str, str]:
    """(rows file, error-table file) of ``shard``, relative to the export folder."""
    return f"{ROWS_DIR}/{shard}{PARQUET_SUFFIX}", f"{ERRORS_DIR}/{shard}{PARQUET_SUFFIX}"


def export_parquet(store: str, out_dir: str, *, features_float32: bool = False) -> ExportSummary:
    """Write each committed shard of ``store`` as ``out_dir/rows/<shard>.parquet`` and its error table as
    ``out_dir/errors/<shard>.parquet`` (local or ``s3://``; module docstring).

    Memory: one batch of ``EXPORT_BATCH_ROWS`` rows at a time (parts are memory-mapped).

    Raises:
        schemas.store.StoreSchemaError: ``store`` is not a schema-v1 regionflow store.
    """
    reader = StoreReader(store)
    target = StoreLocation.parse(out_dir)
    for folder in (ROWS_DIR, ERRORS_DIR):
        target.fs.create_dir(target.path(folder), recursive=True)
    summary = ExportSummary(store=store, target=out_dir)
    for shard in reader.shards():
        table = reader.table(shard)
        schema = _float32_schema(table.schema) if features_float32 else table.schema
        rows_name, errors_name = parquet_names(shard)
        path = target.path(rows_name)
        with target.fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, schema) as writer:
            for batch in table.to_batches(max_chunksize=EXPORT_BATCH_ROWS):
                writer.write_batch(batch.cast(schema) if features_float32 else batch)
        errors_path = target.path(errors_name)
        with target.fs.open_output_stream(errors_path) as sink:
            pq.write_table(reader.errors(shard), sink)
        summary.shards.append(shard)
        summary.rows += table.num_rows
        summary.files += [path, errors_path]
    target.write_bytes(target.path(MANIFEST_COPY), canonical_json(reader.manifest))
    return summary


def _per_row(column: pa.Array) -> Iterator[np.ndarray | None]:
    """Per-row 2-D numpy views of a ``large_list<fixed_size_list<float, W>>`` column (None for nulls)."""
    width = column.type.value_type.list_size
    offsets = column.offsets.to_numpy()
    flat = column.flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
    base = offsets[0]
    nulls = column.is_null().to_numpy(zero_copy_only=False)
    for i in range(len(column)):
        yield None if nulls[i] else flat[offsets[i] - base : offsets[i + 1] - base]


def _b64_float32(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=np.float32).tobytes()).decode("ascii")


def tsv_lines(table: pa.Table) -> Iterator[list[str]]:
    """TSV fields of each row of a store table (module docstring)."""
    for batch in table.to_batches(max_chunksize=EXPORT_BATCH_ROWS):
        keys = batch.column("key").to_pylist()
        ids = batch.column("image_id").to_pylist()
        widths = batch.column("image_width_px").to_pylist()
        heights = batch.column("image_height_px").to_pylist()
        counts = batch.column("num_boxes").to_pylist()
        rows = zip(
            keys,
            ids,
            widths,
            heights,
            counts,
            _per_row(batch.column("boxes_xyxy_px")),
            _per_row(batch.column("features")),
            _per_row(batch.column("cls_prob")),
            strict=True,
        )
        for key, image_id, w, h, n, boxes, feats, cls_prob in rows:
            fields = [str(image_id) if image_id is not None else key, str(w), str(h), str(n)]
            fields += [_b64_float32(boxes), _b64_float32(feats)]
            if cls_prob is not None:
                assert cls_prob.shape[1] == NUM_OBJECT_OUTPUTS
                fields.append(_b64_float32(cls_prob))
            yield fields


def export_tsv(store: str, out_file: str) -> ExportSummary:
    """Write every committed row of ``store`` to one bottom-up-attention TSV (local path or ``s3://``).

    Raises:
        schemas.store.StoreSchemaError: ``store`` is not a schema-v1 regionflow store.
    """
    reader = StoreReader(store)
    location = StoreLocation.parse(out_file)
    summary = ExportSummary(store=store, target=out_file, files=[out_file])
    parent = location.root.rsplit("/", 1)[0]
    if location.is_local and parent:
        location.fs.create_dir(parent, recursive=True)
    with location.fs.open_output_stream(location.root) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        writer = csv.writer(text, delimiter="\t", lineterminator="\r\n")
        for shard in reader.shards():
            table = reader.table(shard)
            for fields in tsv_lines(table):
                writer.writerow(fields)
            summary.shards.append(shard)
            summary.rows += table.num_rows
        text.flush()
        text.detach()
    return summary
