"""Where a feature store lives and its small files: the root on a ``pyarrow.fs`` filesystem (local or object
storage), part names, done markers and ``manifest.json`` (docs/design.md §4, docs/design.md §9 *Commit and resume*).

Part files are Arrow IPC *files* (uncompressed, memory-mappable, zero-copy to numpy). On a local filesystem
small files are written under a temporary name and renamed; on object storage (no atomic rename) they are
written directly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from schemas.manifest import DoneMarker, canonical_json, parse_manifest
from schemas.store import ERRORS_SUFFIX, MANIFEST_FILE, MARKER_SUFFIX, PART_SUFFIX, PARTS_DIR, TMP_SUFFIX

LOCAL_FILE_SCHEME = "file://"


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


def read_marker(location: StoreLocation, shard: str) -> DoneMarker | None:
    """The shard's done marker, or None when it has none. Raises ``StoreSchemaError`` if malformed."""
    path = location.path(PARTS_DIR, part_names(shard)[2])
    if not location.exists(path):
        return None
    return DoneMarker.from_json(location.read_bytes(path), where=path)


def read_manifest(location: StoreLocation) -> dict[str, Any] | None:
    """The parsed ``manifest.json``, or None when the store root has none."""
    path = location.path(MANIFEST_FILE)
    if not location.exists(path):
        return None
    return parse_manifest(location.read_bytes(path), where=path)


def write_manifest(location: StoreLocation, manifest: dict[str, Any]) -> None:
    location.fs.create_dir(location.root, recursive=True)
    location.write_bytes(location.path(MANIFEST_FILE), canonical_json(manifest))


def local_path(url: str) -> str | None:
    """The absolute file path of a local shard or store (a plain path or a ``file://`` URL); None for object
    storage."""
    if url.startswith(LOCAL_FILE_SCHEME) or "://" not in url:
        return os.path.abspath(url.removeprefix(LOCAL_FILE_SCHEME))
    return None
