"""Import region features written by other tools into a regionflow store (DESIGN §4, §9 *Given boxes*).

Two source formats:

``butd-tsv``
    The bottom-up-attention TSV of peteanderson80/bottom-up-attention ``tools/generate_tsv.py`` (read back
    by its ``tools/read_tsv.py``): one image per line, tab-separated, no header, fields
    ``image_id, image_w, image_h, num_boxes, boxes, features`` and, in some re-implementations (ViLBERT's
    and VL-BERT's TSVs), a seventh ``cls_prob``. ``boxes`` is base64 of float32 ``[num_boxes, 4]`` xyxy
    pixels of the original image (float64 ``[num_boxes, 4]`` is recognised by its length and cast);
    ``features`` base64 of float32 ``[num_boxes, D]``; ``cls_prob`` base64 of float32 ``[num_boxes, C]``
    (column 0 = background). Lines are read with ``csv`` (quoted fields allowed); the csv field-size limit
    is raised to 2**31 - 1 while reading (a 36 × 2048 feature field is ~390 KB of base64) and restored
    after.

``vilbert-lmdb``
    ViLBERT's feature LMDB (facebookresearch/vilbert-multi-task ``script/convert_to_lmdb.py``, read by
    ``vilbert/datasets/_image_features_reader.py``): keys are image ids (UTF-8), values pickled dicts with
    ``image_id``, ``image_h``, ``image_w``, ``num_boxes``, ``boxes``, ``features`` and optionally
    ``cls_prob``; the arrays are base64 float32 (as in the TSV) or numpy arrays. The extra key ``keys``
    (the pickled list of ids) is the index, not an image, and is not counted. Values are unpickled with
    ``workers.interop.safe_unpickle`` (builtins and numpy arrays only); a value naming any other global aborts
    the import with ``UnsafePickleError``.

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
import contextlib
import csv
import dataclasses
import hashlib
import logging
import os
import pickle
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from schemas.manifest import ShardAccounting, library_versions
from schemas.reasons import ErrorReason
from schemas.store import NUM_OBJECT_OUTPUTS, boxes_not_inside, row_schema
from workers.interop.safe_unpickle import UnsafePickleError, safe_loads
from workers.rows import StoreRow, arrow_rows
from workers.store import PartWriter, StoreConfigMismatch, StoreLocation

logger = logging.getLogger(__name__)

SourceFormat = Literal["butd-tsv", "vilbert-lmdb"]
SOURCE_FORMATS: tuple[str, ...] = ("butd-tsv", "vilbert-lmdb")
TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
TSV_CLS_PROB_FIELD = "cls_prob"  # optional seventh field
LMDB_INDEX_KEY = b"keys"
LMDB_DATA_FILE = "data.mdb"
CSV_FIELD_LIMIT = 2**31 - 1
BOX_COORDS = 4
FLOAT32_BYTES = 4
FLOAT64_BYTES = 8
FLOAT16_MAX = float(np.finfo(np.float16).max)
HASH_CHUNK_BYTES = 1 << 20
SHARD_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass(frozen=True)
class ImportConfig:
    """How a feature file becomes store rows.

    Attributes:
        source_format: ``butd-tsv`` | ``vilbert-lmdb``.
        shard: shard id of the rows; with ``records_per_shard > 0`` the prefix of ``<shard>-00000``, ...
        feature_dim: region feature size ``D``; None infers it from the first record with boxes.
        records_per_shard: split the source into shards of this many records (0: one shard).
        keep_cls_prob: store the source's ``cls_prob`` (float16, C must be 1601); off by default (it
            doubles the store, DESIGN §4).
        batch_rows: rows per Arrow record batch written (memory bound, not in the config digest).
    """

    source_format: SourceFormat
    shard: str
    feature_dim: int | None = None
    records_per_shard: int = 0
    keep_cls_prob: bool = False
    batch_rows: int = 64

    def __post_init__(self) -> None:
        if self.source_format not in SOURCE_FORMATS:
            raise ValueError(f"source_format must be one of {SOURCE_FORMATS}, got {self.source_format!r}")
        if not SHARD_ID_PATTERN.match(self.shard):
            raise ValueError(f"shard id {self.shard!r}: letters, digits, '_', '.', '-' only")
        if self.feature_dim is not None and self.feature_dim <= 0:
            raise ValueError(f"feature_dim must be positive, got {self.feature_dim}")
        if self.records_per_shard < 0 or self.batch_rows <= 0:
            raise ValueError("records_per_shard must be >= 0 and batch_rows > 0")

    def shard_id(self, index: int) -> str:
        return f"{self.shard}-{index:05d}" if self.records_per_shard else self.shard


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


@dataclass
class ImportSummary:
    """What an import wrote: shard ids, rows and error rows per reason."""

    source: str
    source_sha256: str
    feature_dim: int
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    error_rows: int = 0
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    rows_with_captions: int = 0


# ---------------------------------------------------------------- source readers


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def iter_butd_tsv(path: str) -> Iterator[RawRecord | RecordError]:
    """Records of a bottom-up-attention TSV in file order (module docstring). Blank lines are skipped."""
    name = os.path.basename(path)
    with _csv_field_limit(CSV_FIELD_LIMIT), open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        for values in reader:
            if not values:
                continue
            where = f"{name}:{reader.line_num}"
            key = values[0]
            if len(values) not in (len(TSV_FIELDS), len(TSV_FIELDS) + 1):
                yield RecordError(
                    key or where,
                    where,
                    ErrorReason.DETECTOR_OUTPUT_INVALID,
                    f"{len(values)} tab-separated fields, expected {len(TSV_FIELDS)} or "
                    f"{len(TSV_FIELDS) + 1} (a truncated line?)",
                )
                continue
            yield RawRecord(key, where, dict(zip((*TSV_FIELDS, TSV_CLS_PROB_FIELD), values, strict=False)))


def iter_vilbert_lmdb(path: str) -> Iterator[RawRecord | RecordError]:
    """Records of a ViLBERT feature LMDB in key order (module docstring).

    Raises:
        UnsafePickleError: a value's pickle names a global outside the allow-list (import stops).
        lmdb.Error: ``path`` is not an LMDB environment.
    """
    import lmdb

    env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=os.path.isdir(path))
    try:
        with env.begin(write=False) as txn:
            for raw_key, value in txn.cursor():
                if raw_key == LMDB_INDEX_KEY:
                    continue
                yield _lmdb_record(os.path.basename(path.rstrip("/")), bytes(raw_key), bytes(value))
    finally:
        env.close()


def _lmdb_record(name: str, raw_key: bytes, value: bytes) -> RawRecord | RecordError:
    key = raw_key.decode("utf-8", errors="backslashreplace")
    where = f"{name}[{key}]"
    try:
        item = safe_loads(value, where=where)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        return RecordError(
            key, where, ErrorReason.DETECTOR_OUTPUT_INVALID, f"value is not a readable pickle: {exc}"
        )
    if not isinstance(item, dict):
        return RecordError(
            key, where, ErrorReason.DETECTOR_OUTPUT_INVALID, f"value is a {type(item).__name__}, not a dict"
        )
    return RawRecord(key, where, item)


def iter_source(path: str, source_format: SourceFormat) -> Iterator[RawRecord | RecordError]:
    """Records of ``path`` in ``source_format``."""
    if source_format == "butd-tsv":
        return iter_butd_tsv(path)
    return iter_vilbert_lmdb(path)


def source_sha256(path: str) -> str:
    """sha256 of a TSV file, or of an LMDB's ``data.mdb`` (directory or single-file LMDB)."""
    target = os.path.join(path, LMDB_DATA_FILE) if os.path.isdir(path) else path
    digest = hashlib.sha256()
    with open(target, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- record decoding


class _RecordInvalid(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def _int_field(fields: dict[str, Any], name: str) -> int:
    value = fields.get(name)
    if value is None:
        raise _RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, f"missing field {name!r}")
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise _RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, f"{name}={value!r} is not an int") from exc
    if isinstance(value, float) and value != number:
        raise _RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, f"{name}={value!r} is not an int")
    return number


def _flat_floats(value: Any, name: str, reason: str, rows: int, allow_float64: bool) -> np.ndarray:
    """Flat float values of a base64 string/bytes (float32; float64 too when ``allow_float64`` and the
    size is ``rows * 4 * 8`` bytes) or of a numpy float array."""
    if value is None:
        raise _RecordInvalid(reason, f"missing field {name!r}")
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f":
            raise _RecordInvalid(reason, f"{name}: dtype {value.dtype}, expected floats")
        return value.reshape(-1)
    if not isinstance(value, str | bytes):
        raise _RecordInvalid(reason, f"{name}: a {type(value).__name__}, expected base64 or an array")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _RecordInvalid(reason, f"{name}: invalid base64 ({exc})") from exc
    if allow_float64 and rows > 0 and len(data) == rows * BOX_COORDS * FLOAT64_BYTES:
        return np.frombuffer(data, dtype=np.float64)
    if len(data) % FLOAT32_BYTES:
        raise _RecordInvalid(reason, f"{name}: {len(data)} bytes is not a whole number of float32")
    return np.frombuffer(data, dtype=np.float32)


def _decode_array(value: Any, name: str, reason: str, rows: int, cols: int | None) -> np.ndarray:
    """Decode ``value`` to float32 ``[rows, cols]`` (``cols`` None: inferred from the size)."""
    flat = _flat_floats(value, name, reason, rows, allow_float64=cols == BOX_COORDS)
    if rows == 0:
        if flat.size:
            raise _RecordInvalid(reason, f"{name}: {flat.size} values for num_boxes=0")
        return np.zeros((0, cols or 0), dtype=np.float32)
    width = cols if cols is not None else flat.size // rows
    if width == 0 or flat.size != rows * width:
        raise _RecordInvalid(reason, f"{name}: {flat.size} values, expected num_boxes={rows} x {width}")
    return flat.astype(np.float32, copy=False).reshape(rows, width)


def _check_boxes(boxes: np.ndarray, width: int, height: int) -> None:
    if not np.isfinite(boxes).all():
        raise _RecordInvalid(ErrorReason.BOXES_INVALID, "non-finite box coordinate")
    bad = boxes_not_inside(boxes, width, height)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _RecordInvalid(
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
        _RecordInvalid: (internal) carries the error-row reason and detail.
    """
    f = record.fields
    width, height = _int_field(f, "image_w"), _int_field(f, "image_h")
    num_boxes = _int_field(f, "num_boxes")
    if width <= 0 or height <= 0 or num_boxes < 0:
        raise _RecordInvalid(
            ErrorReason.DETECTOR_OUTPUT_INVALID, f"image {width}x{height} with {num_boxes} boxes"
        )
    boxes = _decode_array(f.get("boxes"), "boxes", ErrorReason.BOXES_INVALID, num_boxes, BOX_COORDS)
    _check_boxes(boxes, width, height)
    features = _decode_array(
        f.get("features"), "features", ErrorReason.DETECTOR_OUTPUT_INVALID, num_boxes, feature_dim
    )
    if not np.isfinite(features).all() or (np.abs(features) > FLOAT16_MAX).any():
        raise _RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, "features non-finite or beyond float16")
    cls_prob = None
    if f.get(TSV_CLS_PROB_FIELD) is not None:
        cls_prob = _decode_array(
            f[TSV_CLS_PROB_FIELD], "cls_prob", ErrorReason.DETECTOR_OUTPUT_INVALID, num_boxes, None
        )
        if (num_boxes and cls_prob.shape[1] < 2) or not np.isfinite(cls_prob).all():
            raise _RecordInvalid(ErrorReason.DETECTOR_OUTPUT_INVALID, "cls_prob non-finite or < 2 classes")
    image_id = f.get("image_id")
    if isinstance(image_id, int | np.integer):
        image_id = int(image_id)
    else:
        image_id = parse_image_id(str(image_id if image_id is not None else record.key))
    return ImportedRow(record.key, image_id, width, height, boxes, features.astype(np.float16), cls_prob)


def infer_feature_dim(path: str, source_format: SourceFormat) -> int:
    """``D`` of the first record that has boxes and decodable features.

    Raises:
        ValueError: no such record (pass ``feature_dim`` explicitly).
    """
    for record in iter_source(path, source_format):
        if not isinstance(record, RawRecord):
            continue
        try:
            return decode_record(record, None).features.shape[1]
        except _RecordInvalid:
            continue
    raise ValueError(f"{path}: no record with boxes and valid features to infer the feature size from")


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


# ---------------------------------------------------------------- captions


class CaptionJoin:
    """COCO captions joined to imported rows by ``image_id`` and tokenized.

    Args:
        coco_json: a COCO captions file (``annotations`` with ``image_id`` and ``caption``); an image's
            captions are kept in annotation-id order, stripped, empty ones dropped.
        tokenizer: a ``workers.read.tokenizer.CaptionTokenizer``.

    Attributes:
        sha256: of the file's bytes (goes into the config digest with the tokenizer's digest).

    Raises:
        ValueError: the file is not a COCO captions JSON.
    """

    def __init__(self, coco_json: str, tokenizer: Any) -> None:
        import json

        from workers.read.captions import clean_captions

        with open(coco_json, "rb") as f:
            data = f.read()
        self.sha256 = hashlib.sha256(data).hexdigest()
        self.tokenizer = tokenizer
        try:
            annotations = sorted(json.loads(data)["annotations"], key=lambda a: int(a["id"]))
            pairs = [(int(a["image_id"]), str(a["caption"])) for a in annotations]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{coco_json}: not a COCO captions file ({exc})") from exc
        grouped: dict[int, list[str]] = {}
        for image_id, caption in pairs:
            grouped.setdefault(image_id, []).append(caption)
        self._captions = {i: clean_captions(c) for i, c in grouped.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"captions_sha256": self.sha256, **self.tokenizer.to_dict()}

    def attach(self, row: ImportedRow) -> ImportedRow:
        """``row`` with its image's captions and token ids (unchanged when it has none)."""
        captions = self._captions.get(row.image_id, ()) if row.image_id is not None else ()
        if not captions:
            return row
        tokens = self.tokenizer.encode(list(captions))
        return dataclasses.replace(
            row,
            captions=tuple(captions),
            input_ids=tuple(tuple(ids) for ids in tokens.input_ids),
            captions_truncated=tuple(tokens.truncated),
        )


# ---------------------------------------------------------------- the import


class _ShardSink:
    """Writes one shard: buffered rows in batches, error rows, and the commit with accounting."""

    def __init__(self, location: StoreLocation, shard: str, config: ImportConfig, dim: int, digest: str):
        self.shard, self.config, self.dim = shard, config, dim
        self.writer = PartWriter(location, shard, dim, digest)
        self.pending: list[ImportedRow] = []
        self.records = 0

    def add(self, item: ImportedRow | RecordError) -> None:
        self.records += 1
        if isinstance(item, RecordError):
            self.writer.add_error(item.key, [item.where], item.reason, item.detail)
            return
        self.pending.append(item)
        if len(self.pending) >= self.config.batch_rows:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.writer.add_rows(rows_table(self.pending, self.shard, self.dim, self.config.keep_cls_prob))
            self.pending = []

    def commit(self) -> tuple[int, int]:
        self.flush()
        rows, errors = self.writer.rows, self.records - self.writer.rows
        self.writer.commit(ShardAccounting(self.records, rows, errors, {}, self.records, rows, errors))
        return rows, errors


def _validated(record: RawRecord | RecordError, dim: int, keep_cls_prob: bool) -> ImportedRow | RecordError:
    if isinstance(record, RecordError):
        return record
    try:
        row = decode_record(record, dim)
    except _RecordInvalid as exc:
        return RecordError(record.key, record.where, exc.reason, str(exc))
    if keep_cls_prob and row.cls_prob is not None and row.cls_prob.shape[1] != NUM_OBJECT_OUTPUTS:
        return RecordError(
            record.key,
            record.where,
            ErrorReason.DETECTOR_OUTPUT_INVALID,
            f"cls_prob has {row.cls_prob.shape[1]} classes; the store keeps only {NUM_OBJECT_OUTPUTS}",
        )
    return row


def write_records(
    source: str,
    location: StoreLocation,
    config: ImportConfig,
    dim: int,
    digest: str,
    captions: CaptionJoin | None = None,
) -> ImportSummary:
    """Stream ``source`` into committed shards of the store at ``location`` (manifest written by the
    caller), joining ``captions`` when given. Memory: one batch of rows (``config.batch_rows``) at a time.

    Raises:
        UnsafePickleError: an LMDB value names a disallowed global.
    """
    summary = ImportSummary(source=source, source_sha256="", feature_dim=dim)
    sink: _ShardSink | None = None
    seen: dict[str, str] = {}
    for raw in iter_source(source, config.source_format):
        item = _validated(raw, dim, config.keep_cls_prob)
        if isinstance(item, ImportedRow):
            if item.key in seen:
                item = RecordError(
                    item.key,
                    raw.where,
                    ErrorReason.DUPLICATE_MEMBER,
                    f"id {item.key!r} was already imported from {seen[item.key]}",
                )
            else:
                seen[item.key] = raw.where
                item = captions.attach(item) if captions is not None else item
                summary.rows_with_captions += bool(item.captions)
        if sink is None:
            sink = _ShardSink(location, config.shard_id(len(summary.shards)), config, dim, digest)
            summary.shards.append(sink.shard)
        sink.add(item)
        if isinstance(item, RecordError):
            reason = str(item.reason)
            summary.errors_by_reason[reason] = summary.errors_by_reason.get(reason, 0) + 1
        if config.records_per_shard and sink.records >= config.records_per_shard:
            _count(summary, sink.commit())
            sink = None
    if sink is not None:
        _count(summary, sink.commit())
    return summary


def _count(summary: ImportSummary, rows_errors: tuple[int, int]) -> None:
    summary.rows += rows_errors[0]
    summary.error_rows += rows_errors[1]


StoreExistsError = (
    StoreConfigMismatch  # ``out`` holds a store of another source or config (pass ``overwrite``)
)


def import_extraction_config(
    config: ImportConfig, sha256: str, feature_dim: int, captions: CaptionJoin | None = None
) -> dict[str, Any]:
    """What changes the imported bytes (hashed into the store's config digest, §9): the source's digest,
    its format, ``D``, the shard naming, ``keep_cls_prob`` and the joined captions with the tokenizer
    (digest, max tokens). Batch size is excluded."""
    from schemas.store import SCHEMA_VERSION

    return {
        "schema_version": SCHEMA_VERSION,
        "mode": "import",
        "import_format": config.source_format,
        "source_sha256": sha256,
        "feature_dim": feature_dim,
        "box_source": "given",
        "shard": config.shard,
        "records_per_shard": config.records_per_shard,
        "keep_cls_prob": config.keep_cls_prob,
        "captions": captions.to_dict() if captions is not None else None,
    }


def _library_versions(source_format: SourceFormat) -> dict[str, str | None]:
    names = ["regionflow", "numpy", "pyarrow"] + (["lmdb"] if source_format == "vilbert-lmdb" else [])
    return library_versions(names)


def import_features(
    source: str,
    out: str,
    config: ImportConfig,
    *,
    captions: CaptionJoin | None = None,
    overwrite: bool = False,
) -> ImportSummary:
    """Import a feature file into a new store at ``out`` (local path or ``s3://``), joining ``captions``
    by ``image_id`` when given (rows without an id or without captions keep empty lists).

    Writes ``manifest.json`` (with ``"import": {"format", "source", "sha256"}`` and a ``runs`` entry),
    then one committed shard per ``config.records_per_shard`` records (or one shard). Re-running on the
    same source and config rewrites the same bytes.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: ``D`` cannot be inferred (no valid record) and ``config.feature_dim`` is None.
        StoreExistsError: ``out`` holds a store with another config digest and ``overwrite`` is False.
            With ``overwrite``, the earlier store's parts, markers and manifest are deleted first.
        UnsafePickleError: an LMDB value names a disallowed global (the store is left without the shard
            being written; committed shards of this run stay, the manifest has no run entry).
        workers.store.StoreLockedError: another live process writes ``out``.
    """
    from schemas.manifest import new_manifest
    from workers.store import StoreLock, check_config, finish_manifest, start_manifest

    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such feature file or LMDB")
    sha256 = source_sha256(source)
    dim = config.feature_dim or infer_feature_dim(source, config.source_format)
    location = StoreLocation.parse(out)
    manifest = new_manifest(
        feature_dim=dim,
        extraction_config=import_extraction_config(config, sha256, dim, captions),
        provenance={
            "import": {"format": config.source_format, "source": os.path.abspath(source), "sha256": sha256},
            "weights": {"digest": None, "random_init": False, "note": "features imported, no detector run"},
            "tokenizer": captions.tokenizer.to_dict() if captions is not None else None,
            "library_versions": _library_versions(config.source_format),
            "vocabularies": None,
        },
    )
    # another config is refused, or replaced with overwrite (workers.store.lifecycle)
    with StoreLock(location):
        check = check_config(location, manifest["config_digest"], overwrite=overwrite)
        start_manifest(location, manifest, check)
        summary = write_records(source, location, config, dim, manifest["config_digest"], captions)
        summary.source_sha256 = sha256
        run = {
            "command": "import",
            "shards": summary.shards,
            "rows": summary.rows,
            "errors": summary.error_rows,
        }
        finish_manifest(location, manifest, run)
    return summary
