"""A rerun of ``regionflow extract`` whose input changed under a committed shard (docs/design.md §9 *Commit and
resume*): the done marker records the source (normalised URL, byte size); a rebuilt tar of the same name or a
same-named shard from another directory is refused before any work, and ``--overwrite`` re-extracts exactly
those shards even under the same config digest. Real tars, the real Ray runtime, the ``tiny`` detector.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
from pathlib import Path

import pytest
from invariants import assert_store_invariants
from tarfactory import simple_sample

from pipelines import cli
from schemas.manifest import DoneMarker, ShardAccounting, ShardSource
from schemas.store import MANIFEST_FILE, PARTS_DIR
from workers.corpus.tar_writer import write_tar
from workers.store import StoreReader

SHARDS = ("src-000", "src-001")
EXTRACT_FLAGS = ["--config", "tiny", "--num-boxes", "6", "--detector-threads", "1", "--batch-size", "2"]


def write_shard(path: Path, keys: list[str], size: int = 40) -> Path:
    """A tar of good samples (one image + caption each), the image seeded by the key's position."""
    write_tar(path, [m for i, key in enumerate(keys) for m in simple_sample(key, seed=i, size=size)])
    return path


@pytest.fixture()
def inputs(tmp_path: Path) -> Path:
    """``in/src-000.tar`` (keys a0, a1) and ``in/src-001.tar`` (key b0)."""
    root = tmp_path / "in"
    root.mkdir()
    write_shard(root / f"{SHARDS[0]}.tar", ["a0", "a1"])
    write_shard(root / f"{SHARDS[1]}.tar", ["b0"])
    return root


def run_cli(*argv: str) -> tuple[int, dict | None, str]:
    """``regionflow extract ARGV``: exit code, the JSON summary (None when refused), stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["extract", *argv, *EXTRACT_FLAGS])
    return code, json.loads(out.getvalue()) if out.getvalue() else None, err.getvalue()


def files_of(store: Path) -> dict[str, bytes]:
    files = {p.name: p.read_bytes() for p in sorted((store / PARTS_DIR).iterdir())}
    return {**files, MANIFEST_FILE: (store / MANIFEST_FILE).read_bytes()}


def keys_of(store: Path, shard: str) -> list[str]:
    return StoreReader(str(store)).table(shard).column("key").to_pylist()


@pytest.fixture()
def store(inputs: Path, tmp_path: Path, ray_session: object) -> Path:
    out = tmp_path / "store"
    code, summary, err = run_cli(str(inputs / "src-{000..001}.tar"), "--out", str(out))
    assert code == 0, err
    assert summary is not None and summary["shards_done"] == 2
    return out


def test_marker_records_the_source(store: Path, inputs: Path) -> None:
    for shard in SHARDS:
        tar = inputs / f"{shard}.tar"
        marker = StoreReader(str(store)).marker(shard)
        assert marker.source == ShardSource(str(tar), tar.stat().st_size)


def test_rebuilt_tar_refused_then_reextracted_with_overwrite(store: Path, inputs: Path) -> None:
    tar = inputs / f"{SHARDS[0]}.tar"
    old_size = tar.stat().st_size
    write_shard(tar, ["n0", "n1", "n2"], size=96)  # same name, other samples
    assert tar.stat().st_size != old_size
    before = files_of(store)
    code, summary, err = run_cli(str(inputs / "src-{000..001}.tar"), "--out", str(store))
    assert (code, summary) == (1, None)
    assert SHARDS[0] in err and SHARDS[1] not in err
    assert f"size {old_size} -> {tar.stat().st_size} bytes" in err and "--overwrite" in err
    assert files_of(store) == before  # refused before any work: not even the manifest's runs changed

    code, summary, err = run_cli(str(inputs / "src-{000..001}.tar"), "--out", str(store), "--overwrite")
    assert code == 0, err
    assert summary is not None
    assert (summary["shards_done"], summary["shards_skipped"]) == (1, 1)
    assert [r["shard"] for r in summary["shards_reextracted"]] == [SHARDS[0]]
    assert keys_of(store, SHARDS[0]) == ["n0", "n1", "n2"]
    assert keys_of(store, SHARDS[1]) == ["b0"]
    assert StoreReader(str(store)).marker(SHARDS[0]).source == ShardSource(str(tar), tar.stat().st_size)
    assert_store_invariants(store)

    again = files_of(store)  # now the rerun with the rebuilt tar is an ordinary resume
    code, summary, err = run_cli(str(inputs / "src-{000..001}.tar"), "--out", str(store))
    assert code == 0, err
    assert summary is not None and (summary["shards_skipped"], summary["shards_reextracted"]) == (2, [])
    assert {k: v for k, v in files_of(store).items() if k != MANIFEST_FILE} == {
        k: v for k, v in again.items() if k != MANIFEST_FILE
    }


def test_same_shard_id_from_another_directory_refused(store: Path, inputs: Path, tmp_path: Path) -> None:
    """Even a byte-identical copy elsewhere is refused: the marker says where its rows came from."""
    other = tmp_path / "other"
    other.mkdir()
    copy = other / f"{SHARDS[0]}.tar"
    shutil.copyfile(inputs / f"{SHARDS[0]}.tar", copy)
    write_shard(other / "src-002.tar", ["c0"])
    before = files_of(store)
    code, summary, err = run_cli(str(copy), str(other / "src-002.tar"), "--out", str(store))
    assert (code, summary) == (1, None)
    assert f"source {inputs / SHARDS[0]}.tar -> {copy}" in err
    assert "size" not in err.split("came from")[1]  # same size: only the path differs
    assert files_of(store) == before


def test_unchanged_rerun_skips_through_other_spellings(store: Path, inputs: Path, monkeypatch) -> None:
    """A relative path and a ``file://`` URL name the same input: skipped, no byte changes."""
    before = {k: v for k, v in files_of(store).items() if k != MANIFEST_FILE}
    monkeypatch.chdir(inputs)
    code, summary, err = run_cli(f"{SHARDS[0]}.tar", f"file://{inputs / SHARDS[1]}.tar", "--out", str(store))
    assert code == 0, err
    assert summary is not None and (summary["shards_skipped"], summary["shards_done"]) == (2, 0)
    assert {k: v for k, v in files_of(store).items() if k != MANIFEST_FILE} == before


def test_marker_without_source_is_trusted_and_logged_once(store: Path, inputs: Path, caplog) -> None:
    """Markers written before the source was recorded: skipped as before (the source is unknown)."""
    for shard in SHARDS:
        path = store / PARTS_DIR / f"{shard}.done.json"
        raw = json.loads(path.read_bytes())
        del raw["source"]
        path.write_text(json.dumps(raw))
        assert DoneMarker.from_json(path.read_bytes(), where="test").source is None
    write_shard(inputs / f"{SHARDS[0]}.tar", ["n0", "n1", "n2"], size=96)  # undetectable without a source
    with caplog.at_level(logging.WARNING, logger="pipelines.extract"):
        code, summary, err = run_cli(str(inputs / "src-{000..001}.tar"), "--out", str(store))
    assert code == 0, err
    assert summary is not None and summary["shards_skipped"] == 2
    assert [r.getMessage() for r in caplog.records].count(
        "2 committed shards (src-000...) have markers without their source (an older regionflow): "
        "trusted without checking that they come from this run's input"
    ) == 1


def test_marker_source_round_trip() -> None:
    accounting = ShardAccounting(2, 2, 0, {}, 1, 1, 0)
    marker = DoneMarker("s", "d" * 64, 1, 0, 10, "0" * 64, 8, "1" * 64, accounting)
    assert marker.source is None and marker.source_differences(ShardSource("/x.tar", 5)) == []
    recorded = DoneMarker(
        "s", "d" * 64, 1, 0, 10, "0" * 64, 8, "1" * 64, accounting, source=ShardSource("/x.tar", 5)
    )
    assert DoneMarker.from_json(recorded.to_json(), where="test") == recorded
    assert recorded.source_differences(ShardSource("/x.tar", 5)) == []
    assert recorded.source_differences(ShardSource("/x.tar", None)) == []  # unknown size: not compared
    assert recorded.source_differences(ShardSource("/y.tar", 6)) == [
        "source /x.tar -> /y.tar",
        "size 5 -> 6 bytes",
    ]


def test_rebuilt_object_on_s3_refused(s3, tmp_path: Path, ray_session: object) -> None:
    """The source size of an ``s3://`` shard comes from a HEAD through ``pyarrow.fs``."""
    local = write_shard(tmp_path / "s3-000.tar", ["a0"])
    url = s3.upload(local, "in/s3-000.tar")
    out = tmp_path / "store"
    code, _, err = run_cli(url, "--out", str(out))
    assert code == 0, err
    assert StoreReader(str(out)).marker("s3-000").source == ShardSource(url, local.stat().st_size)
    s3.upload(write_shard(tmp_path / "s3-000.tar", ["n0", "n1", "n2"], size=96), "in/s3-000.tar")
    code, summary, err = run_cli(url, "--out", str(out))
    assert (code, summary) == (1, None) and "s3-000 (size " in err
    code, summary, err = run_cli(url, "--out", str(out), "--overwrite")
    assert code == 0, err
    assert keys_of(out, "s3-000") == ["n0", "n1", "n2"]
