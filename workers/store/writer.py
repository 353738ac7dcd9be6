"""Writing one shard's part: rows streamed batch by batch into ``parts/<shard>.arrow``, its error table, and
the done marker last (the commit point, docs/design.md §9 *Commit and resume*).

On a local filesystem the part and its error table are written under a temporary name and renamed, then the
marker (also tmp + rename). On object storage there is no atomic rename: part, error table, then marker are
written directly; readers ignore parts without a valid marker in both cases.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from schemas.manifest import DoneMarker, ShardAccounting, ShardSource
from schemas.store import (
    PARTS_DIR,
    TMP_SUFFIX,
    StoreSchemaError,
    error_schema,
    row_schema,
    validate_errors,
    validate_rows,
)
from workers.store.location import StoreLocation, part_names


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
