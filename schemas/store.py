"""Feature-store schema v1: one Arrow IPC file per input shard (docs/design.md §4, §9 *Store schema v1*).

Layout of a store directory::

    manifest.json                 schema version, feature size, extraction config + digest, provenance, runs
    parts/<shard>.arrow           one row per image (``row_schema``)
    parts/<shard>.errors.arrow    one row per sample that did not make it (``error_schema``)
    parts/<shard>.done.json       the commit marker, written last (``schemas.manifest.DoneMarker``)

Boxes are ``xyxy`` in original-image pixels (float32), ``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``.
Region features are float16 ``[num_boxes, D]``; ``D`` is recorded in the schema metadata and the manifest.
The schema is declared here once; writers and readers import it, and validate on write and on open.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

SCHEMA_VERSION = 1
NUM_OBJECT_OUTPUTS = 1601  # 1600 Visual Genome classes + background (index 0), bottom-up attention
NUM_ATTRIBUTE_OUTPUTS = 401  # 400 attributes + "none" (index 0)
BOX_SOURCES = ("detector", "given")

PARTS_DIR = "parts"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".regionflow.lock"
PART_SUFFIX = ".arrow"
ERRORS_SUFFIX = ".errors.arrow"
MARKER_SUFFIX = ".done.json"
TMP_SUFFIX = ".tmp"

META_SCHEMA_VERSION = b"regionflow.schema_version"
META_FEATURE_DIM = b"regionflow.feature_dim"
META_TABLE = b"regionflow.table"


class StoreSchemaError(ValueError):
    """A table, file or store does not follow store schema v1 (message says what and where)."""


def row_schema(feature_dim: int) -> pa.Schema:
    """Arrow schema of a part file for region features of size ``feature_dim`` (e.g. 2048).

    Raises:
        ValueError: ``feature_dim`` is not a positive int.
    """
    if not isinstance(feature_dim, int) or feature_dim <= 0:
        raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("image_id", pa.int64(), nullable=True),
        pa.field("image_width_px", pa.int32(), nullable=False),
        pa.field("image_height_px", pa.int32(), nullable=False),
        pa.field("num_boxes", pa.int32(), nullable=False),
        pa.field("boxes_xyxy_px", pa.large_list(pa.list_(pa.float32(), 4)), nullable=False),
        pa.field("features", pa.large_list(pa.list_(pa.float16(), feature_dim)), nullable=False),
        pa.field("object_ids", pa.list_(pa.int16()), nullable=False),
        pa.field("object_conf", pa.list_(pa.float32()), nullable=False),
        pa.field("attribute_ids", pa.list_(pa.int16()), nullable=True),
        pa.field("attribute_conf", pa.list_(pa.float32()), nullable=True),
        pa.field("cls_prob", pa.large_list(pa.list_(pa.float16(), NUM_OBJECT_OUTPUTS)), nullable=True),
        pa.field("box_source", pa.string(), nullable=False),
        pa.field("captions", pa.list_(pa.string()), nullable=False),
        pa.field("input_ids", pa.list_(pa.list_(pa.int32())), nullable=False),
        pa.field("captions_truncated", pa.list_(pa.bool_()), nullable=False),
    ]
    metadata = {
        META_SCHEMA_VERSION: str(SCHEMA_VERSION).encode(),
        META_FEATURE_DIM: str(feature_dim).encode(),
        META_TABLE: b"rows",
    }
    return pa.schema(fields, metadata=metadata)


def error_schema() -> pa.Schema:
    """Arrow schema of a per-shard error table (one row per sample that is not in the store)."""
    fields = [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("member_names", pa.list_(pa.string()), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string(), nullable=False),
    ]
    metadata = {META_SCHEMA_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: b"errors"}
    return pa.schema(fields, metadata=metadata)


def feature_dim_of(schema: pa.Schema) -> int:
    """Feature size ``D`` recorded in a part file's schema.

    Raises:
        StoreSchemaError: not a regionflow row schema, or another schema version.
    """
    meta = schema.metadata or {}
    check_schema_version(meta.get(META_SCHEMA_VERSION), where="part schema")
    if META_FEATURE_DIM not in meta:
        raise StoreSchemaError(
            "part schema has no regionflow.feature_dim metadata: not a regionflow part file"
        )
    return int(meta[META_FEATURE_DIM])


def check_schema_version(found: bytes | str | int | None, *, where: str) -> None:
    """Raise ``StoreSchemaError`` unless ``found`` names ``SCHEMA_VERSION``."""
    if found is None:
        raise StoreSchemaError(f"{where}: no regionflow schema version: not a regionflow store")
    value = found.decode() if isinstance(found, bytes) else str(found)
    if value != str(SCHEMA_VERSION):
        raise StoreSchemaError(
            f"{where}: schema version {value}, this regionflow reads version {SCHEMA_VERSION}"
        )


def validate_rows(table: pa.Table, feature_dim: int | None = None) -> None:
    """Check a part table against schema v1 and the row invariants; raise on the first violation.

    Invariants: exact schema; unique keys; ``num_boxes`` equals every per-box list length; boxes inside the
    image with ``x1 < x2``, ``y1 < y2``; finite features and boxes; one ``input_ids`` list and one truncation
    flag per caption; ``box_source`` in ``BOX_SOURCES``.

    Raises:
        StoreSchemaError: naming the column and the first offending key.
    """
    dim = feature_dim if feature_dim is not None else feature_dim_of(table.schema)
    expected = row_schema(dim)
    if not table.schema.equals(expected, check_metadata=False):
        raise StoreSchemaError(f"part schema differs from schema v1 (D={dim}):\n{table.schema}")
    if table.num_rows == 0:
        return
    keys = table.column("key")
    if pc.count_distinct(keys).as_py() != table.num_rows:
        raise StoreSchemaError("duplicate key in part table")
    _check_list_lengths(table)
    _check_boxes(table)
    _check_finite(table, "features")
    _check_captions(table)
    bad = pc.invert(pc.is_in(table.column("box_source"), pa.array(BOX_SOURCES)))
    if pc.any(bad).as_py():
        raise StoreSchemaError(f"box_source must be one of {BOX_SOURCES}")


def _first_key(table: pa.Table, mask: np.ndarray) -> str:
    return str(table.column("key")[int(np.flatnonzero(mask)[0])].as_py())


def _check_list_lengths(table: pa.Table) -> None:
    num_boxes = table.column("num_boxes").to_numpy()
    for name in ("boxes_xyxy_px", "features", "object_ids", "object_conf"):
        lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        if (lengths != num_boxes).any():
            raise StoreSchemaError(
                f"{name}: length != num_boxes for key {_first_key(table, lengths != num_boxes)}"
            )
    for name in ("attribute_ids", "attribute_conf", "cls_prob"):
        col = table.column(name)
        lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        present = ~pc.is_null(col).to_numpy(zero_copy_only=False)
        bad = present & (lengths != num_boxes)
        if bad.any():
            raise StoreSchemaError(f"{name}: length != num_boxes for key {_first_key(table, bad)}")


def boxes_not_inside(
    boxes_xyxy_px: np.ndarray, width_px: int | np.ndarray, height_px: int | np.ndarray
) -> np.ndarray:
    """The store's box rule, the one place it is written: bool ``[N]``, True for each box that is not
    ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H`` (empty, outside the image, or non-finite: a NaN
    fails every comparison).

    Args:
        boxes_xyxy_px: ``[N, 4]`` xyxy pixels (any float dtype; a torch tensor on CPU also works).
        width_px, height_px: the image size in pixels, a scalar or one value per box (``[N]``).
    """
    x1, y1, x2, y2 = (boxes_xyxy_px[:, i] for i in range(4))
    inside = (x1 >= 0) & (y1 >= 0) & (x1 < x2) & (y1 < y2) & (x2 <= width_px) & (y2 <= height_px)
    return ~inside


def _check_boxes(table: pa.Table) -> None:
    boxes = pc.list_flatten(pc.list_flatten(table.column("boxes_xyxy_px"))).to_numpy().reshape(-1, 4)
    if not np.isfinite(boxes).all():
        raise StoreSchemaError("boxes_xyxy_px: non-finite value")
    num_boxes = table.column("num_boxes").to_numpy()
    width = np.repeat(table.column("image_width_px").to_numpy(), num_boxes)
    height = np.repeat(table.column("image_height_px").to_numpy(), num_boxes)
    bad = boxes_not_inside(boxes, width, height)
    if bad.any():
        row = int(np.searchsorted(np.cumsum(num_boxes), int(np.flatnonzero(bad)[0]), side="right"))
        key = table.column("key")[row].as_py()
        raise StoreSchemaError(f"boxes_xyxy_px: box outside its image or empty, key {key}")


def _check_finite(table: pa.Table, name: str) -> None:
    values = pc.list_flatten(pc.list_flatten(table.column(name))).to_numpy()
    if not np.isfinite(values).all():
        raise StoreSchemaError(f"{name}: non-finite value")


def _check_captions(table: pa.Table) -> None:
    n_captions = pc.list_value_length(table.column("captions")).to_numpy(zero_copy_only=False)
    for name in ("input_ids", "captions_truncated"):
        lengths = pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False)
        if (lengths != n_captions).any():
            raise StoreSchemaError(
                f"{name}: one entry per caption expected, key {_first_key(table, lengths != n_captions)}"
            )


def validate_errors(table: pa.Table) -> None:
    """Check an error table against schema v1; reason codes must come from ``schemas.reasons``.

    Raises:
        StoreSchemaError: wrong schema or an unknown reason code.
    """
    from schemas.reasons import ERROR_REASONS

    if not table.schema.equals(error_schema(), check_metadata=False):
        raise StoreSchemaError(f"error table schema differs from schema v1:\n{table.schema}")
    unknown = set(table.column("reason").to_pylist()) - set(ERROR_REASONS)
    if unknown:
        raise StoreSchemaError(f"unknown reason codes in error table: {sorted(unknown)}")
