"""Reading and writing a feature store directory (DESIGN §4, §9 *Commit and resume*).

A store lives on a local filesystem or on object storage (``s3://bucket/prefix``), both through
``pyarrow.fs``. Part files are Arrow IPC *files* (uncompressed, memory-mappable, zero-copy to numpy).

Commit protocol per shard: on a local filesystem the part and its error table are written under a
temporary name and renamed, then the done marker is written (also tmp + rename). On object storage there
is no atomic rename: part, error table, then marker are written directly; the marker is the commit point
in both cases, and readers ignore parts without a valid marker.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from schemas.manifest import (
    DoneMarker,
    ShardAccounting,
    ShardSource,
    canonical_json,
    new_manifest,
    parse_manifest,
)
from schemas.store import (
    ERRORS_SUFFIX,
    LOCK_FILE,
    MANIFEST_FILE,
    MARKER_SUFFIX,
    PART_SUFFIX,
    PARTS_DIR,
    TMP_SUFFIX,
    StoreSchemaError,
    error_schema,
    feature_dim_of,
    row_schema,
    validate_errors,
    validate_rows,
)


class StoreLockedError(RuntimeError):
    """Another live process holds the store's lock."""


@dataclass(frozen=True)
class StoreLocation:
    """A store root resolved to a ``pyarrow.fs`` filesystem and a path inside it."""

    fs: pafs.FileSystem
    root: str
    is_local: bool

    @classmethod
    def parse(cls, uri: str) -> StoreLocation:
        """``/local/path``, ``relative/path`` or ``s3://bucket/prefix`` (credentials/endpoint from the usual
        AWS environment variables, e.g. ``AWS_ENDPOINT_URL`` for a local S3-compatible server)."""
        if "://" in uri:
            fs, path = pafs.FileSystem.from_uri(uri)
            return cls(fs, path.rstrip("/"), isinstance(fs, pafs.LocalFileSystem))
        return cls(pafs.LocalFileSystem(), os.path.abspath(uri), True)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write ``data`` at ``path``: tmp + rename locally, a direct PUT on object storage."""
        target = path + TMP_SUFFIX if self.is_local else path
        with self.fs.open_output_stream(target) as out:
            out.write(data)
        if self.is_local:
            self.fs.move(target, path)

    def list_names(self, directory: str) -> list[str]:
        """Base names of the files directly in ``directory`` (empty if it does not exist)."""
        selector = pafs.FileSelector(directory, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector) if info.is_file)


def part_names(shard: str) -> tuple[str, str, str]:
    """(part file, error table, done marker) names of ``shard`` inside ``parts/``."""
    return shard + PART_SUFFIX, shard + ERRORS_SUFFIX, shard + MARKER_SUFFIX


class _HashingWriter:
    """File-like wrapper that sha256-hashes and counts what is written to a pyarrow output stream."""

    def __init__(self, out: Any) -> None:
        self._out, self.sha256, self.size, self.closed = out, hashlib.sha256(), 0, False

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        self._out.write(view)
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._out.flush()

    def close(self) -> None:
        self.closed = True


class PartWriter:
    """Streams one shard's rows into ``parts/<shard>.arrow`` batch by batch (memory stays flat), collects
    its error rows, and commits with ``commit`` (error table, then the done marker).

    ``source`` (the input shard's normalised URL and byte size) is recorded in the marker, so that a rerun
    can tell a rebuilt or different input from the one these rows came from; None when the rows do not come
    from a shard file.

    Raises ``StoreSchemaError`` from ``add_rows`` / ``commit`` when a batch or the accounting violates
    schema v1 (nothing is committed then).
    """

    def __init__(
        self,
        location: StoreLocation,
        shard: str,
        feature_dim: int,
        config_digest: str,
        source: ShardSource | None = None,
    ) -> None:
        self.location, self.shard, self.config_digest = location, shard, config_digest
        self.source = source
        self.schema = row_schema(feature_dim)
        part, _, _ = part_names(shard)
        self._final = location.path(PARTS_DIR, part)
        self._target = self._final + TMP_SUFFIX if location.is_local else self._final
        location.fs.create_dir(location.path(PARTS_DIR), recursive=True)
        self._stream = location.fs.open_output_stream(self._target)
        self._hashing = _HashingWriter(self._stream)
        self._writer = ipc.new_file(pa.PythonFile(self._hashing, mode="w"), self.schema)
        self._errors: list[dict[str, Any]] = []
        self.rows = 0

    def add_rows(self, table: pa.Table) -> None:
        """Append validated rows (``row_schema`` columns) in source order."""
        table = table.replace_schema_metadata(self.schema.metadata)
        validate_rows(table)
        self._writer.write_table(table)
        self.rows += table.num_rows

    def add_error(self, key: str, member_names: Iterable[str], reason: str, detail: str) -> None:
        """Record one error row (``reason`` from ``schemas.reasons.ErrorReason``)."""
        self._errors.append(
            {
                "key": key,
                "shard": self.shard,
                "member_names": list(member_names),
                "reason": str(reason),
                "detail": detail,
            }
        )

    def commit(self, accounting: ShardAccounting) -> DoneMarker:
        """Check the error rows and the accounting, close the part, write the error table, then the marker
        (the commit point). On a check failure nothing is renamed: the temporary part stays for ``abort``."""
        errors = pa.Table.from_pylist(self._errors, schema=error_schema())
        validate_errors(errors)
        if accounting.rows != self.rows or accounting.error_rows != errors.num_rows:
            raise StoreSchemaError(
                f"shard {self.shard}: accounting rows/error rows do not match what was written"
            )
        accounting.check(self.shard)
        errors_bytes = _ipc_file_bytes(errors)
        self._writer.close()
        self._stream.close()
        if self.location.is_local:
            self.location.fs.move(self._target, self._final)
        _, errors_name, marker_name = part_names(self.shard)
        self.location.write_bytes(self.location.path(PARTS_DIR, errors_name), errors_bytes)
        marker = DoneMarker(
            shard=self.shard,
            config_digest=self.config_digest,
            rows=self.rows,
            error_rows=errors.num_rows,
            part_bytes=self._hashing.size,
            part_sha256=self._hashing.sha256.hexdigest(),
            errors_bytes=len(errors_bytes),
            errors_sha256=hashlib.sha256(errors_bytes).hexdigest(),
            accounting=accounting,
            source=self.source,
        )
        self.location.write_bytes(self.location.path(PARTS_DIR, marker_name), marker.to_json())
        return marker

    def abort(self) -> None:
        """Close and delete the unfinished part (no marker is written)."""
        self._writer.close()
        self._stream.close()
        self.location.fs.delete_file(self._target)


def _ipc_file_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def read_marker(location: StoreLocation, shard: str) -> DoneMarker | None:
    """The shard's done marker, or None when it has none. Raises ``StoreSchemaError`` if malformed."""
    path = location.path(PARTS_DIR, part_names(shard)[2])
    if not location.exists(path):
        return None
    return DoneMarker.from_json(location.read_bytes(path), where=path)


def discard_shard(location: StoreLocation, shard: str) -> None:
    """Delete a committed shard: its marker first (the commit point, so a crash in between leaves an
    uncommitted part that readers ignore and a resume redoes), then its part and error table."""
    part, errors, marker = part_names(shard)
    for name in (marker, part, errors):
        path = location.path(PARTS_DIR, name)
        if location.exists(path):
            location.fs.delete_file(path)


def read_manifest(location: StoreLocation) -> dict[str, Any] | None:
    """The parsed ``manifest.json``, or None when the store root has none."""
    path = location.path(MANIFEST_FILE)
    if not location.exists(path):
        return None
    return parse_manifest(location.read_bytes(path), where=path)


def write_manifest(location: StoreLocation, manifest: dict[str, Any]) -> None:
    location.fs.create_dir(location.root, recursive=True)
    location.write_bytes(location.path(MANIFEST_FILE), canonical_json(manifest))


def clear_store(location: StoreLocation) -> list[str]:
    """Delete every done marker, then every part, error table and temporary file in ``parts/``, then
    ``manifest.json`` (replacing a whole store, e.g. ``import --overwrite``); other files and the lock stay.

    Markers go first (the commit point), so a crash part-way leaves only uncommitted files. Returns the
    names deleted (``parts/NAME`` and ``manifest.json``), in deletion order.
    """
    names = location.list_names(location.path(PARTS_DIR))
    markers = [n for n in names if n.endswith(MARKER_SUFFIX)]
    others = [n for n in names if n.endswith((PART_SUFFIX, ERRORS_SUFFIX, TMP_SUFFIX)) and n not in markers]
    removed = []
    for name in markers + others:
        location.fs.delete_file(location.path(PARTS_DIR, name))
        removed.append(f"{PARTS_DIR}/{name}")
    if location.exists(location.path(MANIFEST_FILE)):
        location.fs.delete_file(location.path(MANIFEST_FILE))
        removed.append(MANIFEST_FILE)
    return removed


def remove_stray_temporaries(location: StoreLocation) -> list[str]:
    """Delete ``parts/*.tmp`` left by a killed run; returns the names removed."""
    removed = [n for n in location.list_names(location.path(PARTS_DIR)) if n.endswith(TMP_SUFFIX)]
    for name in removed:
        location.fs.delete_file(location.path(PARTS_DIR, name))
    return removed


class StoreReader:
    """Read-only view of a committed store.

    Attributes:
        manifest: the parsed ``manifest.json``.
        feature_dim: region feature size ``D``.

    Raises:
        StoreSchemaError: ``root`` is not a regionflow store, or has another schema version.
    """

    def __init__(self, root: str) -> None:
        self.location = StoreLocation.parse(root)
        manifest = read_manifest(self.location)
        if manifest is None:
            raise StoreSchemaError(f"{root}: not a regionflow store (no {MANIFEST_FILE})")
        self.manifest = manifest
        self.feature_dim = int(manifest["feature_dim"])

    def shards(self) -> list[str]:
        """Committed shard ids (a marker of this store's config digest), sorted."""
        names = self.location.list_names(self.location.path(PARTS_DIR))
        shards = [n[: -len(MARKER_SUFFIX)] for n in names if n.endswith(MARKER_SUFFIX)]
        return sorted(s for s in shards if self.marker(s).config_digest == self.manifest["config_digest"])

    def uncommitted_shards(self) -> list[str]:
        """Shard ids with a part file or error table in ``parts/`` but no done marker, sorted.

        Readers ignore them (DESIGN §9: the marker is the commit point); callers report them.
        """
        names = set(self.location.list_names(self.location.path(PARTS_DIR)))
        shards = {n[: -len(ERRORS_SUFFIX)] for n in names if n.endswith(ERRORS_SUFFIX)}
        shards |= {
            n[: -len(PART_SUFFIX)] for n in names if n.endswith(PART_SUFFIX) and not n.endswith(ERRORS_SUFFIX)
        }
        return sorted(s for s in shards if s + MARKER_SUFFIX not in names)

    def marker(self, shard: str) -> DoneMarker:
        marker = read_marker(self.location, shard)
        if marker is None:
            raise KeyError(f"shard {shard!r} is not committed in {self.location.root}")
        return marker

    def table(self, shard: str) -> pa.Table:
        """The shard's rows (memory-mapped on a local filesystem); schema checked against v1."""
        table = self._read(part_names(shard)[0])
        if feature_dim_of(table.schema) != self.feature_dim or not table.schema.equals(
            row_schema(self.feature_dim), check_metadata=False
        ):
            raise StoreSchemaError(f"shard {shard}: part schema differs from the store's schema v1")
        return table

    def errors(self, shard: str) -> pa.Table:
        table = self._read(part_names(shard)[1])
        validate_errors(table)
        return table

    def _read(self, name: str) -> pa.Table:
        path = self.location.path(PARTS_DIR, name)
        if self.location.is_local:
            return ipc.open_file(pa.memory_map(path, "r")).read_all()
        return ipc.open_file(pa.py_buffer(self.location.read_bytes(path))).read_all()


LOCK_ATTEMPTS = 3  # tries when the lock file is replaced between opening and locking it


class StoreLock:
    """An exclusive lock on a local store (§9): the file ``.regionflow.lock``, holding the holder's host, pid
    and process start time, with an ``flock`` on it kept for the whole run.

    The kernel drops an ``flock`` when its process ends, however it ends (SIGKILL included), so a lock file
    whose ``flock`` can be taken is stale and is taken over, unless it names another host: a store on a
    shared filesystem may be written from a host whose processes this one cannot see, so such a lock is
    treated as live. Checking and rewriting the lock file happen under the ``flock``, so two runs starting
    together never both win (with a create-then-write file, a starting run could read a live holder's
    still-empty lock file, take it for stale and delete it). The lock file descriptor is not inherited by
    child processes (PEP 446), so a leftover child of a killed run does not keep the lock.
    Object-storage stores have no lock: ``acquire`` is then a no-op (the caller must say so).

    Raises:
        StoreLockedError: a live process holds the lock (message names host and pid).
    """

    def __init__(self, location: StoreLocation) -> None:
        self.location = location
        self.path = location.path(LOCK_FILE)
        self.held = False
        self._fd = -1

    def acquire(self) -> None:
        if not self.location.is_local:
            return
        os.makedirs(self.location.root, exist_ok=True)
        me = json.dumps(_process_identity(os.getpid())).encode()
        for _ in range(LOCK_ATTEMPTS):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            taken = False
            try:
                taken = self._take(fd, me)
            finally:
                if not taken:  # refused (raised), or the file was released and replaced meanwhile
                    os.close(fd)
            if taken:
                self._fd, self.held = fd, True
                return
        raise StoreLockedError(f"{self.location.root}: could not take the store lock {self.path}")

    def _take(self, fd: int, me: bytes) -> bool:
        """``flock`` the open lock file and write ``me`` into it; False if ``fd`` is no longer the file at
        ``self.path``. Raises ``StoreLockedError`` when a live holder has it."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._locked(_read_holder(fd)) from None
        if not _is_same_file(fd, self.path):
            return False
        holder = _read_holder(fd)
        if holder is not None and holder.get("host") != socket.gethostname():
            raise self._locked(holder)  # another host's run: cannot tell whether it is alive
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        return True

    def _locked(self, holder: dict[str, Any] | None) -> StoreLockedError:
        holder = holder or {}
        return StoreLockedError(
            f"{self.location.root} is being written by pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} (lock {self.path}); wait for it or stop it"
        )

    def release(self) -> None:
        if self.held:
            os.unlink(self.path)  # while still holding the flock: a waiter then sees a replaced file
            os.close(self._fd)
            self.held, self._fd = False, -1

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _process_identity(pid: int) -> dict[str, Any]:
    import psutil

    return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder recorded in an open lock file; None when empty or half-written."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def write_test_store(root: str, rows_by_shard: dict[str, list[dict[str, Any]]], feature_dim: int) -> None:
    """Write a small committed store from Python rows (tests and examples; columns as ``row_schema``).

    Missing optional columns default to null, ``shard`` to the dict key, ``box_source`` to "detector".
    Each row counts as a sample of two members (image + caption) in the markers' accounting.
    """
    location = StoreLocation.parse(root)
    extraction_config = {"test_store": True, "feature_dim": feature_dim}
    manifest = new_manifest(
        feature_dim=feature_dim,
        extraction_config=extraction_config,
        provenance={"weights": {"digest": "test", "random_init": True}},
    )
    write_manifest(location, manifest)
    defaults = {
        "image_id": None,
        "attribute_ids": None,
        "attribute_conf": None,
        "cls_prob": None,
        "box_source": "detector",
    }
    for shard, rows in rows_by_shard.items():
        full = [{**defaults, "shard": shard, **row} for row in rows]
        writer = PartWriter(location, shard, feature_dim, manifest["config_digest"])
        writer.add_rows(pa.Table.from_pylist(full, schema=row_schema(feature_dim)))
        n = len(full)
        writer.commit(ShardAccounting(2 * n, 2 * n, 0, {}, n, n, 0))
