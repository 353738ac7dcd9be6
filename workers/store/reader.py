"""Reading a committed store (docs/design.md §9: readers see only shards with a done marker of the store's
config digest)."""

from __future__ import annotations

import mmap

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from schemas.manifest import DoneMarker
from schemas.store import (
    ERRORS_SUFFIX,
    MANIFEST_FILE,
    MARKER_SUFFIX,
    PART_SUFFIX,
    PARTS_DIR,
    StoreSchemaError,
    feature_dim_of,
    row_schema,
    validate_errors,
)
from workers.store.location import StoreLocation, part_names, read_manifest, read_marker


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
        self.uri = root  # as given (an object-storage URI keeps its scheme)
        manifest = read_manifest(self.location)
        if manifest is None:
            raise StoreSchemaError(f"{root}: not a regionflow store (no {MANIFEST_FILE})")
        self.manifest = manifest
        self.feature_dim = int(manifest["feature_dim"])
        self._maps: list[mmap.mmap] = []  # parts mapped by part_file (release_mapped_pages)

    def shards(self) -> list[str]:
        """Committed shard ids (a marker of this store's config digest), sorted."""
        names = self.location.list_names(self.location.path(PARTS_DIR))
        shards = [n[: -len(MARKER_SUFFIX)] for n in names if n.endswith(MARKER_SUFFIX)]
        return sorted(s for s in shards if self.marker(s).config_digest == self.manifest["config_digest"])

    def uncommitted_shards(self) -> list[str]:
        """Shard ids with a part file or error table in ``parts/`` but no done marker, sorted.

        Readers ignore them (docs/design.md §9: the marker is the commit point); callers report them.
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
        self._check_part_schema(shard, table.schema)
        return table

    def part_file(self, shard: str, columns: tuple[str, ...] | None = None) -> ipc.RecordBatchFileReader:
        """The shard's part as an IPC file reader whose record batches are read on demand (``get_batch``).

        Local filesystem: memory-mapped with ``MADV_RANDOM`` (`_random_access_map`), every column zero-copy;
        ``columns`` is ignored (measured with pyarrow 26: ``included_fields`` on a memory-mapped file copies the
        selected buffers into anonymous memory).
        Object storage: ranged reads; with ``columns``, batches hold only those columns and only their buffers
        are read. Schema checked against v1."""
        path = self.location.path(PARTS_DIR, part_names(shard)[0])
        if self.location.is_local:
            source, mapped = _random_access_map(path)
            self._maps.append(mapped)
        else:
            source = self.location.fs.open_input_file(path)
        schema = ipc.open_file(source).schema
        self._check_part_schema(shard, schema)
        if columns is None or self.location.is_local:
            return ipc.open_file(source)
        fields = [schema.get_field_index(c) for c in columns]
        return ipc.open_file(source, options=ipc.IpcReadOptions(included_fields=fields))

    def release_mapped_pages(self) -> None:
        """Drop the page-table entries of every part this reader mapped (``MADV_DONTNEED``): the data stays in the
        page cache and views into it stay valid (read-only file mappings fault back in on the next touch), but
        the pages stop counting in this process's RSS / PSS. Readers of random rows call it now and then."""
        for mapped in self._maps:
            mapped.madvise(mmap.MADV_DONTNEED)

    def part_is_local(self) -> bool:
        """True when parts are memory-mapped files (a local or shared filesystem), False on object storage."""
        return self.location.is_local

    def check_part_sizes(self) -> None:
        """Cheap damage check before a run reads the store: every committed shard's part and error files exist
        with the byte sizes its done marker records (one stat each; local or object-storage sizes). Hashes are
        not recomputed: a rerun trusts the marker (docs/design.md §9); ``regionflow inspect --verify`` re-hashes.

        Raises:
            StoreSchemaError: naming the first shard whose file is missing or has another size.
        """
        shards = self.shards()
        expected = []
        for shard in shards:
            marker = self.marker(shard)
            part, errors, _ = part_names(shard)
            expected += [(shard, part, marker.part_bytes), (shard, errors, marker.errors_bytes)]
        infos = self.location.fs.get_file_info([self.location.path(PARTS_DIR, e[1]) for e in expected])
        for (shard, name, size), info in zip(expected, infos, strict=True):
            found = "missing" if info.type == pafs.FileType.NotFound else f"{info.size} bytes"
            if info.type == pafs.FileType.NotFound or info.size != size:
                raise StoreSchemaError(
                    f"shard {shard} is damaged: {name} is {found}, its done marker says {size} bytes; "
                    f"run `regionflow inspect {self.uri} --verify`"
                )

    def _check_part_schema(self, shard: str, schema: pa.Schema) -> None:
        if feature_dim_of(schema) != self.feature_dim or not schema.equals(
            row_schema(self.feature_dim), check_metadata=False
        ):
            raise StoreSchemaError(f"shard {shard}: part schema differs from the store's schema v1")

    def errors(self, shard: str) -> pa.Table:
        table = self._read(part_names(shard)[1])
        validate_errors(table)
        return table

    def _read(self, name: str) -> pa.Table:
        path = self.location.path(PARTS_DIR, name)
        if self.location.is_local:
            return ipc.open_file(pa.memory_map(path, "r")).read_all()
        return ipc.open_file(pa.py_buffer(self.location.read_bytes(path))).read_all()


def _random_access_map(path: str) -> tuple[pa.BufferReader, mmap.mmap]:
    """The file memory-mapped read-only with ``madvise(MADV_RANDOM)``, as an Arrow buffer reader (zero-copy).

    A training loader touches rows in random order: no readahead of the neighbouring rows from disk (the
    kernel's window is 8 MiB on the development machine). Pages already cached are still mapped a large folio at a
    time (about 0.65 MB per random 147 KB butd row, measured): `StoreReader.release_mapped_pages` drops them.
    ``pa.memory_map`` offers no madvise.
    """
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return pa.BufferReader(pa.py_buffer(mapped)), mapped
