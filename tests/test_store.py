"""``workers.store``: commit protocol, done markers, manifest, lock (live, stale, foreign host), stray
temporaries, validation on write and on open (docs/design.md §4, §9 *Commit and resume*)."""

from __future__ import annotations

import hashlib
import io
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import fsspec.implementations.local as fsspec_local
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pytest
from tiny_store import random_rows, write_test_store

from schemas.manifest import ShardAccounting, new_manifest
from schemas.store import (
    LOCK_FILE,
    MANIFEST_FILE,
    PARTS_DIR,
    StoreSchemaError,
    boxes_not_inside,
    row_schema,
)
from workers.store import (
    PartWriter,
    StoreLocation,
    StoreLock,
    StoreLockedError,
    StoreReader,
    read_marker,
    remove_stray_temporaries,
    write_manifest,
)

D = 8


def rows_table(n: int, shard: str = "s-000", seed: int = 0) -> pa.Table:
    defaults = {"attribute_ids": None, "attribute_conf": None, "cls_prob": None, "box_source": "detector"}
    rows = [{**defaults, **row, "shard": shard} for row in random_rows(n, D, seed=seed)]
    return pa.Table.from_pylist(rows, schema=row_schema(D))


def new_store(root: Path, digest_source: str = "a") -> tuple[StoreLocation, str]:
    location = StoreLocation.parse(str(root))
    manifest = new_manifest(feature_dim=D, extraction_config={"test": digest_source}, provenance={})
    write_manifest(location, manifest)
    return location, manifest["config_digest"]


def accounting(rows: int, errors: int = 0) -> ShardAccounting:
    return ShardAccounting(2 * rows + errors, 2 * rows, errors, {}, rows + errors, rows, errors)


def test_commit_protocol(tmp_path: Path) -> None:
    location, digest = new_store(tmp_path)
    parts = tmp_path / PARTS_DIR
    writer = PartWriter(location, "s-000", D, digest)
    writer.add_rows(rows_table(3))
    writer.add_error("bad", ["bad.jpg"], "image_undecodable", "not a JPEG")
    assert sorted(p.name for p in parts.iterdir()) == ["s-000.arrow.tmp"]  # nothing visible before commit
    assert read_marker(location, "s-000") is None
    marker = writer.commit(accounting(3, 1))
    assert sorted(p.name for p in parts.iterdir()) == ["s-000.arrow", "s-000.done.json", "s-000.errors.arrow"]
    part = (parts / "s-000.arrow").read_bytes()
    errors = (parts / "s-000.errors.arrow").read_bytes()
    assert (marker.part_bytes, marker.part_sha256) == (len(part), hashlib.sha256(part).hexdigest())
    assert (marker.errors_bytes, marker.errors_sha256) == (len(errors), hashlib.sha256(errors).hexdigest())
    assert read_marker(location, "s-000") == marker
    reader = StoreReader(str(tmp_path))
    assert reader.shards() == ["s-000"]
    assert reader.table("s-000").num_rows == 3
    assert reader.errors("s-000").to_pylist()[0]["reason"] == "image_undecodable"


def test_abort_leaves_nothing(tmp_path: Path) -> None:
    location, digest = new_store(tmp_path)
    writer = PartWriter(location, "s-000", D, digest)
    writer.add_rows(rows_table(2))
    writer.abort()
    assert list((tmp_path / PARTS_DIR).iterdir()) == []


def test_invalid_rows_and_accounting_are_refused(tmp_path: Path) -> None:
    location, digest = new_store(tmp_path)
    writer = PartWriter(location, "s-000", D, digest)
    table = rows_table(2).to_pylist()
    table[1]["boxes_xyxy_px"][0] = [0.0, 0.0, table[1]["image_width_px"] + 5.0, 4.0]
    with pytest.raises(StoreSchemaError, match="outside"):
        writer.add_rows(pa.Table.from_pylist(table, schema=row_schema(D)))
    writer.add_rows(rows_table(2))
    with pytest.raises(StoreSchemaError, match="members"):
        writer.commit(ShardAccounting(5, 4, 0, {}, 2, 2, 0))  # one member unaccounted for
    assert read_marker(location, "s-000") is None
    writer.abort()  # the refused commit left only the temporary part, which abort deletes
    assert list((tmp_path / PARTS_DIR).iterdir()) == []
    with pytest.raises(StoreSchemaError, match="unknown reason"):
        other = PartWriter(location, "s-001", D, digest)
        other.add_error("k", ["k.jpg"], "no_such_reason", "")
        other.commit(accounting(0, 1))


def test_markers_of_another_digest_and_unmarked_parts_are_not_shards(tmp_path: Path) -> None:
    location, digest = new_store(tmp_path)
    writer = PartWriter(location, "s-000", D, digest)
    writer.add_rows(rows_table(1))
    writer.commit(accounting(1))
    stale = PartWriter(location, "s-001", D, "0" * 64)
    stale.add_rows(rows_table(1, "s-001"))
    stale.commit(accounting(1))
    (tmp_path / PARTS_DIR / "s-002.arrow").write_bytes((tmp_path / PARTS_DIR / "s-000.arrow").read_bytes())
    assert StoreReader(str(tmp_path)).shards() == ["s-000"]


def test_malformed_marker_and_manifest(tmp_path: Path) -> None:
    location, _ = new_store(tmp_path)
    (tmp_path / PARTS_DIR).mkdir()
    (tmp_path / PARTS_DIR / "s-000.done.json").write_text('{"shard": "s-000", "schema_version": 1}')
    with pytest.raises(StoreSchemaError, match="malformed done marker"):
        read_marker(location, "s-000")
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({**manifest, "schema_version": 2}))
    with pytest.raises(StoreSchemaError, match="schema version 2"):
        StoreReader(str(tmp_path))


def test_a_directory_that_is_not_a_store_is_refused(tmp_path: Path) -> None:
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(StoreSchemaError, match="not a regionflow store"):
        StoreReader(str(tmp_path))
    (tmp_path / MANIFEST_FILE).write_text("[1, 2]")
    with pytest.raises(StoreSchemaError, match="not a JSON object"):
        StoreReader(str(tmp_path))


def test_part_schema_checked_on_open(tmp_path: Path) -> None:
    write_test_store(str(tmp_path), {"s-000": random_rows(2, D)}, D)
    path = tmp_path / PARTS_DIR / "s-000.arrow"
    table = ipc.open_file(str(path)).read_all()
    narrower = table.drop_columns(["cls_prob"])
    with ipc.new_file(str(path), narrower.schema) as writer:
        writer.write_table(narrower)
    with pytest.raises(StoreSchemaError):
        StoreReader(str(tmp_path)).table("s-000")


def test_stray_temporaries_removed(tmp_path: Path) -> None:
    location, _ = new_store(tmp_path)
    parts = tmp_path / PARTS_DIR
    parts.mkdir()
    for name in ("s-000.arrow.tmp", "s-000.done.json.tmp", "s-001.arrow", "notes.txt"):
        (parts / name).write_bytes(b"x")
    assert sorted(remove_stray_temporaries(location)) == ["s-000.arrow.tmp", "s-000.done.json.tmp"]
    assert sorted(p.name for p in parts.iterdir()) == ["notes.txt", "s-001.arrow"]


def test_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    location = StoreLocation.parse(str(tmp_path))
    with StoreLock(location):
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["host"] == socket.gethostname()
        with pytest.raises(StoreLockedError, match="being written by pid"):
            StoreLock(location).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    with StoreLock(location):  # released: can be taken again
        pass


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "started": 1.0}))
    lock = StoreLock(StoreLocation.parse(str(tmp_path)))
    lock.acquire()
    assert lock.held
    lock.release()


def test_half_written_lock_is_stale_and_foreign_host_lock_is_live(tmp_path: Path) -> None:
    location = StoreLocation.parse(str(tmp_path))
    (tmp_path / LOCK_FILE).write_text('{"host": ')
    with StoreLock(location):
        pass
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "elsewhere.invalid", "pid": 1, "started": 0.0}))
    with pytest.raises(StoreLockedError, match="elsewhere.invalid"):
        StoreLock(location).acquire()


class _HalfThenFail(io.RawIOBase):
    """A real file that takes the first half of each write, then fails (a full disk or a kill mid-write)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self._inner.write(view[: view.nbytes // 2])
        self._inner.flush()
        raise OSError("injected failure mid-write")

    def close(self) -> None:
        self._inner.close()
        super().close()


class _DiesMidWrite(fsspec_local.LocalFileSystem):
    """The local filesystem, except that every file opened for writing fails halfway (`_HalfThenFail`)."""

    cachable = False

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        inner = super()._open(path, mode, **kwargs)
        return _HalfThenFail(inner) if "w" in mode else inner


def test_write_bytes_is_atomic_locally(tmp_path: Path) -> None:
    """A write that dies halfway leaves the earlier file whole: only the temporary name saw the half."""
    location = StoreLocation.parse(str(tmp_path))
    target = location.path("f.json")
    location.write_bytes(target, b'{"run": 1}')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    dying = StoreLocation(pafs.PyFileSystem(pafs.FSSpecHandler(_DiesMidWrite())), location.root, True)
    with pytest.raises(OSError, match="injected failure mid-write"):
        dying.write_bytes(target, b'{"run": 2, "longer": "than the first"}')
    assert (tmp_path / "f.json").read_bytes() == b'{"run": 1}'


def test_box_rule_is_inside_with_area_and_per_box_sizes() -> None:
    """``boxes_not_inside``: borders allowed, zero width/height, outside or NaN refused; per-box sizes."""
    import numpy as np

    boxes = np.array(
        [[0, 0, 10, 8], [0, 0, 0, 8], [2, 3, 2.5, 3], [-0.5, 0, 4, 4], [0, 0, 10.5, 8], [np.nan, 0, 1, 1]],
        dtype=np.float32,
    )
    assert boxes_not_inside(boxes, 10, 8).tolist() == [False, True, True, True, True, True]
    widths = np.array([9, 10, 10, 10, 11, 10])
    assert boxes_not_inside(boxes, widths, 8).tolist() == [True, True, True, True, False, True]


def test_library_versions_one_recorder() -> None:
    """``schemas.manifest.library_versions``: Python first, installed versions, None when not installed."""
    import platform
    from importlib import metadata

    from schemas.manifest import library_versions

    versions = library_versions(["numpy", "no-such-distribution-x"])
    assert versions == {
        "python": platform.python_version(),
        "numpy": metadata.version("numpy"),
        "no-such-distribution-x": None,
    }
