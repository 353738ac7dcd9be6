"""The feature-store invariant, written once (docs/design.md §4, §9): every test that leaves a store at rest asserts it.

``assert_store_invariants(store_root)`` checks a store that no run is writing:

- ``manifest.json`` parses as a schema-v1 manifest; no lock file is left; no ``*.tmp`` anywhere;
  ``parts/`` holds only parts, error tables and done markers;
- every done marker is valid, names its own shard and the manifest's config digest, and its part and error
  table exist with the byte size and sha256 the marker records; every part and error table has a marker;
- per shard (§9 *Accounting*, from the marker): ``members = used + in error rows + ignored`` and
  ``samples = rows + error rows``, and the marker's counts equal the rows in the files;
- rows follow schema v1 (``validate_rows``), each row's ``shard`` column is its shard; ``(shard, key)`` is
  unique over every row of the store;
- error tables follow schema v1 with reasons from the fixed list (``validate_errors``); an error row shares
  its ``(shard, key)`` with another row or error row only when it is a later ``non_adjacent_members``
  occurrence of that key (the reader streams, so the first occurrence was already emitted, §1);
- a shard listed in the manifest's ``failed_shards`` has no part, error table or marker.

``assert_stores_identical(a, b)`` compares parts, error tables and markers byte for byte and the manifests
without their ``runs`` history (§9 *Determinism*).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc

from schemas.manifest import DoneMarker, comparable_manifest, parse_manifest
from schemas.reasons import ErrorReason
from schemas.store import (
    ERRORS_SUFFIX,
    LOCK_FILE,
    MANIFEST_FILE,
    MARKER_SUFFIX,
    PART_SUFFIX,
    PARTS_DIR,
    TMP_SUFFIX,
    validate_errors,
    validate_rows,
)


def part_files(store_root: str | Path) -> dict[str, bytes]:
    """Every file in ``parts/`` (parts, error tables, markers), by name."""
    parts = Path(store_root) / PARTS_DIR
    return {p.name: p.read_bytes() for p in sorted(parts.iterdir())} if parts.is_dir() else {}


def store_snapshot(root: str | Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes): to show that a refused run wrote nothing."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def read_manifest_file(store_root: str | Path) -> dict:
    path = Path(store_root) / MANIFEST_FILE
    return parse_manifest(path.read_bytes(), where=str(path))


def assert_store_invariants(store_root: str | Path) -> None:
    """Assert every invariant of a store at rest (module docstring); the message names shard and file."""
    root = Path(store_root)
    manifest = read_manifest_file(root)
    assert not (root / LOCK_FILE).exists(), f"{root}: lock file left behind by a finished run"
    strays = sorted(str(p.relative_to(root)) for p in root.rglob(f"*{TMP_SUFFIX}"))
    assert not strays, f"{root}: stray temporary files {strays}"
    files = part_files(root)
    shards = _shards_by_marker(files)
    for name in files:
        assert name.endswith((PART_SUFFIX, ERRORS_SUFFIX, MARKER_SUFFIX)), f"parts/{name}: unexpected file"
        shard = _shard_of(name)
        assert shard in shards, f"parts/{name}: no done marker for shard {shard}"
    rows_seen: set[tuple[str, str]] = set()
    for shard in shards:
        marker = DoneMarker.from_json(files[shard + MARKER_SUFFIX], where=f"parts/{shard}{MARKER_SUFFIX}")
        _check_shard(files, shard, marker, manifest, rows_seen)
    failed = {f["shard"] for f in manifest.get("failed_shards", [])}
    assert not failed & set(shards), f"failed shards with a marker: {sorted(failed & set(shards))}"


def assert_stores_identical(a: str | Path, b: str | Path) -> None:
    """Assert that two stores hold byte-identical parts, error tables and markers, and equal manifests
    (without ``runs``)."""
    files_a, files_b = part_files(a), part_files(b)
    assert sorted(files_a) == sorted(files_b), f"parts/ differ: {sorted(files_a)} vs {sorted(files_b)}"
    differing = [name for name in files_a if files_a[name] != files_b[name]]
    assert not differing, f"files differ in bytes: {differing}"
    manifest_a, manifest_b = read_manifest_file(a), read_manifest_file(b)
    assert comparable_manifest(manifest_a) == comparable_manifest(manifest_b), "manifests differ"


def _shard_of(name: str) -> str:
    for suffix in (ERRORS_SUFFIX, MARKER_SUFFIX, PART_SUFFIX):  # ERRORS_SUFFIX before PART_SUFFIX
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _shards_by_marker(files: dict[str, bytes]) -> list[str]:
    return sorted(name[: -len(MARKER_SUFFIX)] for name in files if name.endswith(MARKER_SUFFIX))


def _check_shard(
    files: dict[str, bytes],
    shard: str,
    marker: DoneMarker,
    manifest: dict,
    rows_seen: set[tuple[str, str]],
) -> None:
    where = f"shard {shard}"
    assert marker.shard == shard, f"{where}: marker names shard {marker.shard}"
    assert marker.config_digest == manifest["config_digest"], f"{where}: marker of another config digest"
    part, errors = files.get(shard + PART_SUFFIX), files.get(shard + ERRORS_SUFFIX)
    assert part is not None and errors is not None, f"{where}: marker without its part or error table"
    assert (len(part), hashlib.sha256(part).hexdigest()) == (marker.part_bytes, marker.part_sha256), (
        f"{where}: part bytes/sha256 differ from its marker"
    )
    assert (len(errors), hashlib.sha256(errors).hexdigest()) == (
        marker.errors_bytes,
        marker.errors_sha256,
    ), f"{where}: error table bytes/sha256 differ from its marker"
    marker.accounting.check(shard)  # members = used + in errors + ignored; samples = rows + error rows
    table, error_table = _read_ipc(part), _read_ipc(errors)
    validate_rows(table, int(manifest["feature_dim"]))
    validate_errors(error_table)
    assert (table.num_rows, error_table.num_rows) == (marker.rows, marker.error_rows), (
        f"{where}: files hold {table.num_rows} rows / {error_table.num_rows} error rows, marker says "
        f"{marker.rows} / {marker.error_rows}"
    )
    assert (marker.accounting.rows, marker.accounting.error_rows) == (marker.rows, marker.error_rows), where
    for name, t in (("rows", table), ("error rows", error_table)):
        assert set(t.column("shard").to_pylist()) <= {shard}, f"{where}: {name} of another shard"
    keys = [(shard, k) for k in table.column("key").to_pylist()]
    duplicates = [k for k, n in Counter(keys).items() if n > 1] + sorted(set(keys) & rows_seen)
    assert not duplicates, f"{where}: duplicated (shard, key) rows {duplicates[:5]}"
    rows_seen.update(keys)
    _check_error_keys(where, set(keys), error_table)


def _check_error_keys(where: str, row_keys: set[tuple[str, str]], errors: pa.Table) -> None:
    seen = set(row_keys)
    for error in errors.select(["shard", "key", "reason"]).to_pylist():
        identity = (error["shard"], error["key"])
        if identity in seen:
            assert error["reason"] == ErrorReason.NON_ADJACENT_MEMBERS, (
                f"{where}: (shard, key) {identity} repeated by an error row of reason {error['reason']}"
            )
        seen.add(identity)


def _read_ipc(data: bytes) -> pa.Table:
    return ipc.open_file(pa.py_buffer(data)).read_all()
