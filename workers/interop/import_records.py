"""Imported records: what a source record holds, how it is decoded and checked, and its Arrow rows.

A source reader (``workers.interop.butd_tsv``, ``workers.interop.vilbert_lmdb``) yields ``RawRecord`` (arrays
still base64 or numpy) or ``RecordError``; ``decode_record`` validates one into an ``ImportedRow`` or raises
``RecordInvalid`` with the error-row reason; ``rows_table`` builds the store rows with ``workers.rows``.

Rows: ``box_source="given"``; features cast to float16 (a value outside float16's range makes the record
an error row, never ``inf``); ``object_ids`` / ``object_conf`` = argmax / max over the foreground columns
1..C-1 of ``cls_prob`` (ids index the detector's C outputs, 0 = background, as ``workers.detect.selection``),
or, without ``cls_prob``, zeros with confidence 0 ("unknown class"); ``cls_prob`` is stored (float16)
only with ``keep_cls_prob`` and C = 1601; no attributes; no captions unless a COCO captions file is joined
by ``image_id`` (``CaptionJoin``, tokenized with ``workers.read.tokenizer.CaptionTokenizer``). ``image_id`` is
the source id when it is an integer, else null; the store key is the source id as text.

Bad records become error rows, never silently fixed: boxes outside the image, empty (``x1 >= x2``) or
non-finite → ``boxes_invalid`` (legacy ``+1``-convention one-pixel boxes with ``x1 == x2`` included);
a malformed line or value, a wrong array size, non-finite features → ``detector_output_invalid``; an id
seen before in the same import → ``duplicate_member``. Each record is one member and one sample in the
shard's accounting.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from schemas.reasons import ErrorReason
from schemas.store import boxes_not_inside, row_schema
from workers.rows import StoreRow, arrow_rows

TSV_CLS_PROB_FIELD = "cls_prob"  # optional seventh field
BOX_COORDS = 4
FLOAT32_BYTES = 4
FLOAT64_BYTES = 8
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class RawRecord:
    """One image as the source holds it: sizes parsed later, arrays still base64 text/bytes or numpy."""

    key: str
    where: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class RecordError:
    """A source record that cannot become a row (``reason`` from ``ErrorReason``)."""

    key: str
    where: str
    reason: str
    detail: str


@dataclass(frozen=True)
class ImportedRow:
    """A validated image: boxes float32 ``[N, 4]`` xyxy px, features float16 ``[N, D]``,
    cls_prob float32 ``[N, C]`` or None; captions with their token ids (empty unless joined)."""

    key: str
    image_id: int | None
    image_width_px: int
    image_height_px: int
    boxes_xyxy_px: np.ndarray
    features: np.ndarray
    cls_prob: np.ndarray | None
    captions: tuple[str, ...] = ()
    input_ids: tuple[tuple[int, ...], ...] = ()
    captions_truncated: tuple[bool, ...] = ()


# ---------------------------------------------------------------- record decoding


class RecordInvalid(ValueError):
    """A record that cannot become a row: ``reason`` (from ``ErrorReason``), the detail as the message."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _int_field(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name)
    if value is None:
        raise RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, f"missing field {name!r}")
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, f"{name}={value!r} is not an int") from exc
    if isinstance(value, float) and value != number:
        raise RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, f"{name}={value!r} is not an int")
    return number


def _flat_floats(value: Any, name: str, reason: str, rows: int, allow_float64: bool) -> np.ndarray:
    """Flat float values of a base64 string/bytes (float32; float64 too when ``allow_float64`` and the
    size is ``rows * 4 * 8`` bytes) or of a numpy float array."""
    if value is None:
        raise RecordInvalid(reason, f"missing field {name!r}")
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise RecordInvalid(reason, f"{name}: dtype {value.dtype}, expected floats")
        return value.reshape(-1)
    if not isinstance(value, str | bytes):
        raise RecordInvalid(reason, f"{name}: a {type(value).__name__}, expected base64 or an array")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RecordInvalid(reason, f"{name}: invalid base64 ({exc})") from exc
    if allow_float64 and rows > 0 and len(data) == rows * BOX_COORDS * FLOAT64_BYTES:
        return np.frombuffer(data, dtype=np.float64)
    if len(data) % FLOAT32_BYTES:
        raise RecordInvalid(reason, f"{name}: {len(data)} bytes is not a whole number of float32")
    return np.frombuffer(data, dtype=np.float32)


def _decode_array(value: Any, name: str, reason: str, rows: int, cols: int | None) -> np.ndarray:
    """Decode ``value`` to float32 ``[rows, cols]`` (``cols`` None: inferred from the size)."""
    flat = _flat_floats(value, name, reason, rows, allow_float64=cols == BOX_COORDS)
    if rows == 0:
        if flat.size:
            raise RecordInvalid(reason, f"{name}: {flat.size} values for num_boxes=0")
        return np.zeros((0, cols or 0), dtype=np.float32)
    width = cols if cols is not None else flat.size // rows
    if width == 0 or flat.size != rows * width:
        raise RecordInvalid(reason, f"{name}: {flat.size} values, expected num_boxes={rows} x {width}")
    return flat.astype(np.float32, copy=False).reshape(rows, width)


def _check_boxes(boxes: np.ndarray, width: int, height: int) -> None:
    if not np.isfinite(boxes).all():
        raise RecordInvalid(ErrorReason.BOXES_INVALID, "non-finite box coordinate")
    bad = boxes_not_inside(boxes, width, height)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RecordInvalid(
            ErrorReason.BOXES_INVALID,
            f"{int(bad.sum())} box(es) empty or outside the {width}x{height} image, first #{i}: "
            f"{boxes[i].tolist()} (boxes are not clipped on import)",
        )


def parse_image_id(text: str) -> int | None:
    """The integer image id of a source id (``"458752"`` -> 458752), None when it is not an int64."""
    if not re.fullmatch(r"-?[0-9]+", text.strip()):
        return None
    value = int(text)
    return value if -(2**63) <= value < 2**63 else None


def decode_record(record: RawRecord, feature_dim: int | None) -> ImportedRow:
    """Validate and decode one source record.

    Args:
        record: as ``iter_source`` yields it.
        feature_dim: required feature size ``D``, None to accept any.

    Raises:
        RecordInvalid: carries the error-row reason and detail.
    """
    f = record.fields
    width, height = _int_field(f, "image_w"), _int_field(f, "image_h")
    num_boxes = _int_field(f, "num_boxes")
    if width <= 0 or height <= 0 or num_boxes < 0:
        raise RecordInvalid(
            ErrorReason.DETECTOR_OUTPUT_INVALID, f"image {width}x{height} with {num_boxes} boxes"
        )
    boxes = _decode_array(f.get("boxes"), "boxes", ErrorReason.BOXES_INVALID, num_boxes, BOX_COORDS)
    _check_boxes(boxes, width, height)
    features = _decode_array(
        f.get("features"), "features", ErrorReason.DETECTOR_OUTPUT_INVALID, num_boxes, feature_dim
    )
    if not np.isfinite(features).all() or (np.abs(features) > FLOAT16_MAX).any():
        raise RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, "features non-finite or beyond float16")
    cls_prob = None
    if f.get(TSV_CLS_PROB_FIELD) is not None:
        cls_prob = _decode_array(
            f[TSV_CLS_PROB_FIELD], "cls_prob", ErrorReason.DETECTOR_OUTPUT_INVALID, num_boxes, None
        )
        if (num_boxes and cls_prob.shape[1] < 2) or not np.isfinite(cls_prob).all():
            raise RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, "cls_prob non-finite or < 2 classes")
    image_id = f.get("image_id")
    if isinstance(image_id, int | np.integer):
        image_id = int(image_id)
    else:
        image_id = parse_image_id(str(image_id if image_id is not None else record.key))
    return ImportedRow(record.key, image_id, width, height, boxes, features.astype(np.float16), cls_prob)


# ---------------------------------------------------------------- rows → Arrow


def object_labels(cls_prob: np.ndarray | None, num_boxes: int) -> tuple[np.ndarray, np.ndarray]:
    """int16 ids in 1..C-1 and float32 confidences ``[N]`` from float ``[N, C]`` class probabilities
    (column 0 = background, never chosen; ties to the lower id); zeros and 0.0 without ``cls_prob``."""
    if cls_prob is None:
        return np.zeros(num_boxes, np.int16), np.zeros(num_boxes, np.float32)
    foreground = cls_prob[:, 1:]
    ids = foreground.argmax(axis=1) + 1
    return ids.astype(np.int16), foreground.max(axis=1).astype(np.float32)


def rows_table(rows: Sequence[ImportedRow], shard: str, feature_dim: int, keep_cls_prob: bool) -> pa.Table:
    """Store-schema-v1 table of ``rows`` (``box_source="given"``, no attributes), built by
    ``workers.rows.arrow_rows`` (the one row builder).

    Raises:
        ValueError: ``rows`` is empty.
    """
    if not rows:
        raise ValueError("rows_table needs at least one row")
    values = []
    for r in rows:
        ids, conf = object_labels(r.cls_prob, r.boxes_xyxy_px.shape[0])
        values.append(
            StoreRow(
                key=r.key,
                shard=shard,
                image_id=r.image_id,
                width_px=r.image_width_px,
                height_px=r.image_height_px,
                boxes_xyxy_px=r.boxes_xyxy_px,
                features=r.features.reshape(-1, feature_dim),
                object_ids=ids,
                object_conf=conf,
                attribute_ids=None,
                attribute_conf=None,
                cls_prob=r.cls_prob if keep_cls_prob else None,
                captions=r.captions,
                input_ids=r.input_ids,
                captions_truncated=r.captions_truncated,
            )
        )
    return arrow_rows(values, row_schema(feature_dim), "given")
