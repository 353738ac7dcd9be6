"""The store manifest and the per-shard done marker (docs/design.md §4, §9 *Commit and resume*).

Both are JSON written with sorted keys and no timestamps, so that two runs with the same extraction
config produce byte-identical markers. ``manifest.json`` keeps a ``runs`` list (run history, with times)
that is excluded from comparisons (``comparable_manifest``).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

from schemas.reasons import IGNORED_REASONS
from schemas.store import SCHEMA_VERSION, StoreSchemaError, check_schema_version


def library_versions(names: Iterable[str]) -> dict[str, str | None]:
    """``{"python": "3.11.7", name: version, ...}`` for a store manifest's ``library_versions``: the installed
    distributions' versions, None for one that is not installed. Raises nothing."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no NaN, UTF-8, trailing newline."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()


def config_digest(extraction_config: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of what changes output bytes (§9): schema version, detector config,
    weights digest, box mode and its numbers, scale, tokenizer digest, max tokens, caption mode, pixel limit.
    Batch size, actor count and shards in flight must NOT be in ``extraction_config``."""
    return hashlib.sha256(canonical_json(extraction_config)).hexdigest()


@dataclass(frozen=True)
class ShardAccounting:
    """Every member and sample of one shard, counted (§9 *Accounting*).

    ``members == members_used + members_in_errors + sum(members_ignored.values())`` and
    ``samples == rows + error_rows``.
    """

    members: int
    members_used: int
    members_in_errors: int
    members_ignored: dict[str, int]
    samples: int
    rows: int
    error_rows: int

    def check(self, shard: str) -> None:
        """Raise ``StoreSchemaError`` if the two accounting identities do not hold."""
        unknown = set(self.members_ignored) - set(IGNORED_REASONS)
        if unknown:
            raise StoreSchemaError(f"shard {shard}: unknown ignored-member reasons {sorted(unknown)}")
        ignored = sum(self.members_ignored.values())
        if self.members != self.members_used + self.members_in_errors + ignored:
            raise StoreSchemaError(
                f"shard {shard}: members {self.members} != used {self.members_used} + in errors "
                f"{self.members_in_errors} + ignored {ignored}"
            )
        if self.samples != self.rows + self.error_rows:
            raise StoreSchemaError(
                f"shard {shard}: samples {self.samples} != rows {self.rows} + error rows {self.error_rows}"
            )


@dataclass(frozen=True)
class ShardSource:
    """Where a shard's rows came from, as recorded in its done marker (§9 *Commit and resume*).

    Attributes:
        url: the input shard as given, normalised: an absolute local path (``file://`` stripped), or the
            object-store URL (``s3://bucket/key``) unchanged.
        size_bytes: the input's byte size when the shard was read (a stat, no hash); None when the stat
            failed (unknown: never counts as a difference).
    """

    url: str
    size_bytes: int | None


@dataclass(frozen=True)
class DoneMarker:
    """The commit point of one shard: ``parts/<shard>.done.json``, written after the part and error files.

    ``source`` says which input the rows came from; it is None in markers written before it existed and in
    stores not made from shards (``regionflow import``): the source is then unknown and not checked.
    """

    shard: str
    config_digest: str
    rows: int
    error_rows: int
    part_bytes: int
    part_sha256: str
    errors_bytes: int
    errors_sha256: str
    accounting: ShardAccounting
    schema_version: int = field(default=SCHEMA_VERSION)
    source: ShardSource | None = None

    def source_differences(self, current: ShardSource) -> list[str]:
        """How ``current`` (this run's input for the shard) differs from the recorded source, as phrases
        (empty when it does not, or when the marker records no source). A size that either side does not
        know is not compared."""
        if self.source is None:
            return []
        differences = []
        if self.source.url != current.url:
            differences.append(f"source {self.source.url} -> {current.url}")
        known = self.source.size_bytes is not None and current.size_bytes is not None
        if known and self.source.size_bytes != current.size_bytes:
            differences.append(f"size {self.source.size_bytes} -> {current.size_bytes} bytes")
        return differences

    def to_json(self) -> bytes:
        return canonical_json(asdict(self))

    @classmethod
    def from_json(cls, data: bytes, *, where: str) -> DoneMarker:
        """Parse a marker; raise ``StoreSchemaError`` (naming ``where``) if it is malformed."""
        try:
            raw = json.loads(data)
            check_schema_version(raw.get("schema_version"), where=where)
            raw["accounting"] = ShardAccounting(**raw["accounting"])
            if raw.get("source") is not None:
                raw["source"] = ShardSource(**raw["source"])
            return cls(**raw)
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise StoreSchemaError(f"{where}: malformed done marker ({exc})") from exc


def new_manifest(
    *,
    feature_dim: int,
    extraction_config: dict[str, Any],
    provenance: dict[str, Any],
) -> dict[str, Any]:
    """A fresh manifest dict. ``provenance`` holds weights (digest, random_init), tokenizer digest,
    library versions and vocabularies (object/attribute names, or None)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "feature_dim": feature_dim,
        "extraction_config": extraction_config,
        "config_digest": config_digest(extraction_config),
        **provenance,
        "failed_shards": [],
        "runs": [],
    }


def parse_manifest(data: bytes, *, where: str) -> dict[str, Any]:
    """Parse ``manifest.json``; raise ``StoreSchemaError`` if it is not a schema-v1 regionflow manifest."""
    try:
        manifest = json.loads(data)
    except json.JSONDecodeError as exc:
        raise StoreSchemaError(f"{where}: manifest is not JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise StoreSchemaError(f"{where}: manifest is not a JSON object")
    check_schema_version(manifest.get("schema_version"), where=where)
    for name in ("feature_dim", "extraction_config", "config_digest"):
        if name not in manifest:
            raise StoreSchemaError(f"{where}: manifest lacks {name!r}")
    return manifest


def comparable_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without its ``runs`` history: what two equivalent stores must share."""
    return {k: v for k, v in manifest.items() if k != "runs"}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 hex of the manifest without its run history (`comparable_manifest`): which store a run trained on."""
    return hashlib.sha256(canonical_json(comparable_manifest(manifest))).hexdigest()
