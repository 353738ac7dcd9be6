"""``regionflow inspect STORE [--verify] [--json]``: what a feature store holds and where it came from.

Reports counts (shards, rows, boxes, captions, error rows by reason, ignored members by reason), schema
version, feature size, provenance (weights digest or random init, tokenizer, detector config, vocabularies)
and every shard's status:

- ``committed``: a done marker of the store's config digest (the only parts readers use);
- ``other_config``: a marker of another digest (a store mixed by hand; ``extract`` refuses it);
- ``uncommitted``: a part or temporary file without a marker (a killed run; the next ``extract`` redoes it);
- ``failed``: listed in ``manifest.json`` ``failed_shards`` and not committed since.

Without ``--verify`` the markers are trusted, as ``extract`` trusts them. ``--verify`` re-hashes every part
file and error table against its marker (byte size and sha256), validates every row batch against schema v1
(``schemas.store.validate_rows``: list lengths, boxes inside images, finite values, unique keys) and the
error tables, and checks each marker's accounting identities. Exit code (`pipelines.cli.ExitCode`): 0; 1 when
the store cannot be read; 2 when verification finds a damaged shard or one of another config.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from pipelines.cli import ExitCode, fail
from schemas.manifest import DoneMarker
from schemas.store import (
    ERRORS_SUFFIX,
    MARKER_SUFFIX,
    PART_SUFFIX,
    PARTS_DIR,
    TMP_SUFFIX,
    StoreSchemaError,
    validate_rows,
)
from workers.store import StoreReader, part_names, read_marker

HASH_BLOCK_BYTES = 1 << 22  # part files are hashed in 4 MiB blocks (memory stays flat)


@dataclass
class ShardStatus:
    """One shard as found in ``parts/`` (and in the manifest's failed list)."""

    shard: str
    status: str  # committed | other_config | uncommitted | failed
    rows: int = 0
    error_rows: int = 0
    detail: str = ""


@dataclass
class StoreReport:
    """Everything ``inspect`` prints; ``to_dict`` is the ``--json`` output."""

    store: str
    schema_version: int
    feature_dim: int
    config_digest: str
    provenance: dict[str, Any]
    shards: list[ShardStatus]
    rows: int = 0
    boxes: int = 0
    captions: int = 0
    error_rows_by_reason: dict[str, int] = field(default_factory=dict)
    members_ignored_by_reason: dict[str, int] = field(default_factory=dict)
    verified: bool | None = None
    problems: list[str] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for s in self.shards if s.status == status)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["error_rows"] = sum(self.error_rows_by_reason.values())
        out["shard_counts"] = {
            status: self.count(status) for status in ("committed", "other_config", "uncommitted", "failed")
        }
        out["failed_shards"] = [s.shard for s in self.shards if s.status == "failed"]
        return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", metavar="STORE", help="store directory or s3:// prefix")
    parser.add_argument("--verify", action="store_true", help="re-hash parts, validate every row")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    """Print the report; `ExitCode` OK when readable (and verified, with ``--verify``), BAD_INPUT when not a
    readable store, SHARDS_FAILED when shards failed or do not verify (named in the report)."""
    try:
        report = inspect_store(args.store, verify=args.verify)
    except (StoreSchemaError, OSError) as exc:
        return fail("inspect", exc)
    print(json.dumps(report.to_dict(), indent=1, sort_keys=True) if args.json else format_report(report))
    return ExitCode.SHARDS_FAILED if report.problems else ExitCode.OK


def inspect_store(root: str, *, verify: bool = False) -> StoreReport:
    """Count, describe and optionally verify the store at ``root``.

    Raises:
        StoreSchemaError: ``root`` is not a regionflow store (no or bad manifest, other schema version).
    """
    reader = StoreReader(root)
    manifest = reader.manifest
    report = StoreReport(
        store=root,
        schema_version=int(manifest["schema_version"]),
        feature_dim=reader.feature_dim,
        config_digest=manifest["config_digest"],
        provenance=_provenance(manifest),
        shards=_shard_statuses(reader),
    )
    errors: Counter[str] = Counter()
    ignored: Counter[str] = Counter()
    for status in report.shards:
        if status.status != "committed":
            continue
        marker = reader.marker(status.shard)
        ignored.update(marker.accounting.members_ignored)
        if verify:
            report.problems += verify_shard(reader, status.shard, marker)
        try:
            errors.update(reader.errors(status.shard).column("reason").to_pylist())
            _count_rows(report, reader.table(status.shard))
        except FileNotFoundError:
            if not verify:  # without --verify a missing part is an unreadable store (rc 1)
                raise
            # verify_shard named it; the shard's rows are not counted
    if verify:
        report.problems += [
            f"{s.shard}: {s.status} {s.detail}".strip() for s in report.shards if s.status == "other_config"
        ]
        report.verified = not report.problems
    report.error_rows_by_reason = dict(sorted(errors.items()))
    report.members_ignored_by_reason = dict(sorted(ignored.items()))
    return report


def _provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    """What made the store: an extract run (detector, weights, box selection, caption mode) or an import
    (``import``: format, source file, its sha256; no detector ran, boxes came with the file)."""
    weights = manifest.get("weights", {})
    vocab = manifest.get("vocabularies")
    extraction = manifest.get("extraction_config", {})
    imported = manifest.get("import") if extraction.get("mode") == "import" else None
    return {
        "import": imported,
        "detector_config": (manifest.get("detector_config") or {}).get("name"),
        "weights_digest": weights.get("digest"),
        "random_init": weights.get("random_init"),
        "tokenizer": manifest.get("tokenizer"),
        "box_selection": extraction.get("box_selection"),
        "box_source": extraction.get("box_source"),
        "captions": extraction.get("captions"),
        "vocabularies": None
        if not vocab
        else {"objects": len(vocab.get("objects", [])), "attributes": len(vocab.get("attributes", []))},
        "library_versions": manifest.get("library_versions"),
        "runs": len(manifest.get("runs", [])),
    }


def _shard_statuses(reader: StoreReader) -> list[ShardStatus]:
    names = reader.location.list_names(reader.location.path(PARTS_DIR))
    digest = reader.manifest["config_digest"]
    statuses: dict[str, ShardStatus] = {}
    for name in names:
        if name.endswith(MARKER_SUFFIX):
            shard = name[: -len(MARKER_SUFFIX)]
            marker = read_marker(reader.location, shard)
            assert marker is not None
            if marker.config_digest == digest:
                statuses[shard] = ShardStatus(shard, "committed", marker.rows, marker.error_rows)
            else:
                statuses[shard] = ShardStatus(shard, "other_config", detail=f"digest {marker.config_digest}")
    for name in names:
        of_file = _shard_of_file(name)
        if of_file is not None and of_file not in statuses:
            statuses[of_file] = ShardStatus(of_file, "uncommitted", detail=f"{name} without a done marker")
    for failed in reader.manifest.get("failed_shards", []):
        if failed["shard"] not in statuses or statuses[failed["shard"]].status == "uncommitted":
            statuses[failed["shard"]] = ShardStatus(failed["shard"], "failed", detail=failed.get("error", ""))
    return [statuses[s] for s in sorted(statuses)]


def _shard_of_file(name: str) -> str | None:
    base = name[: -len(TMP_SUFFIX)] if name.endswith(TMP_SUFFIX) else name
    for suffix in (ERRORS_SUFFIX, MARKER_SUFFIX, PART_SUFFIX):  # ERRORS_SUFFIX ends with PART_SUFFIX
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return None


def _count_rows(report: StoreReport, table: pa.Table) -> None:
    report.rows += table.num_rows
    report.boxes += int(pc.sum(table.column("num_boxes")).as_py() or 0)
    report.captions += int(pc.sum(pc.list_value_length(table.column("captions"))).as_py() or 0)


def verify_shard(reader: StoreReader, shard: str, marker: DoneMarker) -> list[str]:
    """Problems of one committed shard (empty when it verifies): file hashes and sizes against the marker,
    full row and error-table validation, row counts, shard ids, accounting identities."""
    part, errors_name, _ = part_names(shard)
    infos = reader.location.fs.get_file_info(
        [reader.location.path(PARTS_DIR, n) for n in (part, errors_name)]
    )
    missing = [n for n, i in zip((part, errors_name), infos, strict=True) if i.type == pafs.FileType.NotFound]
    if missing:  # nothing more to validate: the committed shard has lost a file
        return [f"{shard}: committed but {' and '.join(missing)} is missing"]
    problems = [
        *_check_hash(reader, part, marker.part_bytes, marker.part_sha256),
        *_check_hash(reader, errors_name, marker.errors_bytes, marker.errors_sha256),
    ]
    try:
        rows = _validate_part(reader, shard)
        errors = reader.errors(shard)
        if rows != marker.rows or rows != marker.accounting.rows:
            problems.append(f"{shard}: part has {rows} rows, marker says {marker.rows}")
        if errors.num_rows != marker.error_rows:
            problems.append(
                f"{shard}: error table has {errors.num_rows} rows, marker says {marker.error_rows}"
            )
        if set(errors.column("shard").to_pylist()) - {shard}:
            problems.append(f"{shard}: error rows of another shard")
        marker.accounting.check(shard)
    except (StoreSchemaError, OSError, pa.ArrowInvalid) as exc:
        problems.append(f"{shard}: {exc}")
    return problems


def _check_hash(reader: StoreReader, name: str, size: int, sha256: str) -> list[str]:
    path = reader.location.path(PARTS_DIR, name)
    digest, total = hashlib.sha256(), 0
    try:
        with reader.location.fs.open_input_stream(path) as stream:
            while block := stream.read(HASH_BLOCK_BYTES):
                digest.update(block)
                total += len(block)
    except OSError as exc:
        return [f"{name}: cannot read ({exc})"]
    if total != size or digest.hexdigest() != sha256:
        return [
            f"{name}: {total} bytes, sha256 {digest.hexdigest()[:16]}… ≠ marker ({size} bytes, {sha256[:16]}…)"
        ]
    return []


def _validate_part(reader: StoreReader, shard: str) -> int:
    """Validate every record batch of a part (and key uniqueness across batches); returns the row count."""
    table = reader.table(shard)  # memory-mapped locally; the schema is checked here
    keys: set[str] = set()
    for batch in table.to_batches():
        validate_rows(pa.Table.from_batches([batch]), reader.feature_dim)
        batch_keys = batch.column(batch.schema.get_field_index("key")).to_pylist()
        if keys.intersection(batch_keys):
            raise StoreSchemaError(f"{shard}: duplicate key across record batches")
        keys.update(batch_keys)
        if set(batch.column(batch.schema.get_field_index("shard")).to_pylist()) - {shard}:
            raise StoreSchemaError(f"{shard}: rows whose shard column names another shard")
    return table.num_rows


def format_report(report: StoreReport) -> str:
    """Human-readable report (the default output)."""
    p = report.provenance
    vocab = p["vocabularies"]
    vocab_text = "none" if not vocab else f"{vocab['objects']} objects, {vocab['attributes']} attributes"
    tokenizer = p["tokenizer"] or {}
    lines = [
        f"store            {report.store}",
        f"schema           v{report.schema_version}, feature size {report.feature_dim}",
        f"config digest    {report.config_digest}",
        *_origin_lines(p),
        "tokenizer        "
        + (
            f"{tokenizer.get('tokenizer_digest')} (max tokens {tokenizer.get('max_tokens')})"
            if tokenizer
            else "none"
        ),
        f"vocabularies     {vocab_text}",
        f"shards           {report.count('committed')} committed, {report.count('uncommitted')} uncommitted, "
        f"{report.count('failed')} failed, {report.count('other_config')} of another config",
        f"rows             {report.rows} (boxes {report.boxes}, captions {report.captions})",
        f"error rows       {_counts(report.error_rows_by_reason)}",
        f"ignored members  {_counts(report.members_ignored_by_reason)}",
        "per shard:",
    ]
    for s in report.shards:
        counts = f"rows {s.rows}, error rows {s.error_rows}" if s.status == "committed" else s.detail
        lines.append(f"  {s.shard:<24} {s.status:<12} {counts}")
    if report.verified is not None:
        lines.append(
            "verify           " + ("ok: every part re-hashed and validated" if report.verified else "FAILED")
        )
        lines += [f"  {problem}" for problem in report.problems]
    return "\n".join(lines)


def _origin_lines(p: dict[str, Any]) -> list[str]:
    """The detector, boxes and captions lines: what an extract run used, or where an import came from."""
    imported = p.get("import")
    if imported:
        captions = p["captions"]
        joined = (
            f"joined by image_id (captions file sha256 {str(captions.get('captions_sha256'))[:16]}…)"
            if isinstance(captions, dict)
            else "none (imported files carry no captions)"
        )
        return [
            f"imported         {imported.get('format')} from {imported.get('source')} "
            f"(sha256 {str(imported.get('sha256'))[:16]}…); no detector ran",
            "boxes            given (from the imported file)",
            f"captions         {joined}",
        ]
    weights = (
        "RANDOM INIT (no trained weights)" if p["random_init"] else f"trained, digest {p['weights_digest']}"
    )
    return [
        f"detector         {p['detector_config']}, weights {weights}",
        f"boxes            {_boxes_text(p['box_selection'] or {})}",
        f"captions         {p['captions']}",
    ]


def _boxes_text(selection: dict[str, Any]) -> str:
    mode = selection.get("mode")
    if mode == "given":
        return "given (from each sample's JSON)"
    if mode == "adaptive":
        return (
            f"adaptive ({selection.get('min_boxes')}-{selection.get('max_boxes')} per image, "
            f"confidence >= {selection.get('conf_threshold')})"
        )
    return f"{mode} (K={selection.get('num_boxes')})"


def _counts(counter: dict[str, int]) -> str:
    total = sum(counter.values())
    return f"{total}" + (
        "" if not counter else " (" + ", ".join(f"{k} {v}" for k, v in counter.items()) + ")"
    )
