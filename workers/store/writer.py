"""Writing one shard's part: rows streamed batch by batch into ``parts/<shard>.arrow``, its error table, and
the done marker last (the commit point, docs/design.md §9 *Commit and resume*).

On a local filesystem the part and its error table are written under a temporary name and renamed, then the
marker (also tmp + rename). On object storage there is no atomic rename: part, error table, then marker are
written directly; readers ignore parts without a valid marker in both cases.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
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

ROWS_PER_RECORD_BATCH = 64  # rows per Arrow record batch of an extracted part (independent of --batch-size)


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

    def commit(
        self, accounting: ShardAccounting, before_marker: Callable[[], None] | None = None
    ) -> DoneMarker:
        """Check the error rows and the accounting, close the part, write the error table, then the marker
        (the commit point). On a check failure nothing is renamed: the temporary part stays for ``abort``.
        ``before_marker`` runs once the part and error table are complete, just before the marker is
        written (a fault-injection hook for tests: a writer that dies there leaves an uncommitted part)."""
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
        if before_marker is not None:
            before_marker()
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


class OrderedPartWriter:
    """One shard's ``PartWriter`` fed its chunks' rows in chunk order (0, 1, ...), re-batched into record
    batches of exactly ``rows_per_batch`` rows (the last one of a shard may be shorter), so the part's bytes
    depend neither on how samples were chunked nor on which process built the rows.

    Args:
        writer: the shard's open ``PartWriter``.
        rows_per_batch: rows per Arrow record batch (``ROWS_PER_RECORD_BATCH`` for extract).

    Raises:
        ValueError (from ``add``): a chunk out of order (its index is not the next one).
    """

    def __init__(self, writer: PartWriter, rows_per_batch: int = ROWS_PER_RECORD_BATCH) -> None:
        self.writer, self.rows_per_batch = writer, rows_per_batch
        self.next_index = 0
        self._buffered: list[pa.Table] = []
        self._buffered_rows = 0

    def add(self, index: int, rows: pa.Table, errors: Sequence[tuple[str, Sequence[str], str, str]]) -> None:
        """Append chunk ``index``: its rows (``row_schema`` table, source order) and its error rows
        ``(key, member_names, reason, detail)``."""
        if index != self.next_index:
            raise ValueError(
                f"shard {self.writer.shard}: got chunk {index}, expected chunk {self.next_index}"
            )
        self.next_index += 1
        for key, member_names, reason, detail in errors:
            self.writer.add_error(key, member_names, reason, detail)
        if rows.num_rows:
            self._buffered.append(rows)
            self._buffered_rows += rows.num_rows
            self._flush(final=False)

    def commit(
        self, accounting: ShardAccounting, before_marker: Callable[[], None] | None = None
    ) -> DoneMarker:
        """Write the last rows, then commit the part (``PartWriter.commit``)."""
        self._flush(final=True)
        return self.writer.commit(accounting, before_marker)

    def abort(self) -> None:
        self.writer.abort()

    def _flush(self, *, final: bool) -> None:
        size = self.rows_per_batch
        if self._buffered_rows < size and not (final and self._buffered_rows):
            return
        table = pa.concat_tables(self._buffered)
        start = 0
        while table.num_rows - start >= size or (final and start < table.num_rows):
            self.writer.add_rows(table.slice(start, size).combine_chunks())
            start += size
        rest = table.slice(min(start, table.num_rows))
        self._buffered = [rest] if rest.num_rows else []
        self._buffered_rows = rest.num_rows
