"""Import region features written by other tools into a regionflow store (docs/design.md §4, §9 *Given boxes*).

Two source formats:

``butd-tsv``
    The bottom-up-attention TSV of peteanderson80/bottom-up-attention ``tools/generate_tsv.py``, read by
    ``workers.interop.butd_tsv``.

``vilbert-lmdb``
    ViLBERT's feature LMDB (facebookresearch/vilbert-multi-task ``script/convert_to_lmdb.py``), read by
    ``workers.interop.vilbert_lmdb``.

Records are decoded, checked and turned into store rows by ``workers.interop.import_records`` (which says
what a row holds and which records become error rows); this module joins captions, names the shards and
writes the store (its manifest and lifecycle through ``workers.store``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from schemas.manifest import ShardAccounting, library_versions
from schemas.reasons import ErrorReason
from schemas.store import NUM_OBJECT_OUTPUTS
from workers.interop.butd_tsv import iter_butd_tsv
from workers.interop.import_records import (
    ImportedRow,
    RawRecord,
    RecordError,
    RecordInvalid,
    decode_record,
    rows_table,
)
from workers.interop.vilbert_lmdb import LMDB_DATA_FILE, iter_vilbert_lmdb
from workers.store import PartWriter, StoreConfigMismatch, StoreLocation

logger = logging.getLogger(__name__)

SourceFormat = Literal["butd-tsv", "vilbert-lmdb"]
SOURCE_FORMATS: tuple[str, ...] = ("butd-tsv", "vilbert-lmdb")
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
            doubles the store, docs/design.md §4).
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
        except RecordInvalid:
            continue
    raise ValueError(f"{path}: no record with boxes and valid features to infer the feature size from")


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
    except RecordInvalid as exc:
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
