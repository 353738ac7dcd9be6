"""Shards and stores on object storage (``s3://``), against a real S3-compatible server on loopback (docs/design.md §1,
§4, §9 *Commit and resume*): ``regionflow extract`` from brace-ranged ``s3://`` shard URLs into an ``s3://`` store
on the real Ray runtime, the store read back, the lock-less log line, resume after a lost marker, and a part
without a marker ignored by readers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
from pathlib import Path

import pyarrow as pa
import pytest
from s3server import S3Server
from tarfactory import make_jpeg, simple_sample

from pipelines import cli
from schemas.store import LOCK_FILE, MANIFEST_FILE
from workers.corpus.tar_writer import write_tar
from workers.read.reader import expand_shard_urls
from workers.store import StoreReader
from workers.store.lifecycle import StoreRefused, refuse_foreign_directory
from workers.store.location import StoreLocation

SHARDS = ("shard-000", "shard-001")
STORE = "store"
NUM_BOXES = "8"


@pytest.fixture(scope="module")
def shard_urls(s3: S3Server, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Two tiny tars on S3: 3 good samples; 2 good + a caption-less image (an error row)."""
    root = tmp_path_factory.mktemp("s3-shards")
    members = {
        SHARDS[0]: [m for k in range(3) for m in simple_sample(f"a{k}", seed=k, size=40 + 8 * k)],
        SHARDS[1]: simple_sample("b0", seed=5, size=48)
        + [("b1.jpg", make_jpeg(44, 36, seed=6))]
        + simple_sample("b2", seed=7, size=56),
    }
    urls = []
    for shard, shard_members in members.items():
        write_tar(root / f"{shard}.tar", shard_members)
        urls.append(s3.upload(root / f"{shard}.tar", f"in/{shard}.tar"))
    return urls


class _Records(logging.Handler):
    """Keeps every log record it sees."""

    def __init__(self) -> None:
        super().__init__(level=logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def extract_cli(s3: S3Server) -> tuple[int, dict, list[logging.LogRecord]]:
    """``regionflow extract s3://…/in/shard-{000..001}.tar --out s3://…/store --config tiny`` through the CLI's
    main function: exit code, the JSON summary it prints, the log records."""
    argv = ["extract", s3.url("in/shard-{000..001}.tar"), "--out", s3.url(STORE), "--config", "tiny"]
    argv += ["--num-boxes", NUM_BOXES, "--batch-size", "2", "--detector-threads", "1"]
    out, handler, root = io.StringIO(), _Records(), logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(out):
            code = cli.main(argv)
    finally:
        root.removeHandler(handler)
    return code, json.loads(out.getvalue()), handler.records


def part_objects(s3: S3Server) -> dict[str, bytes]:
    """Every object under the store's ``parts/``, by key."""
    return {key: s3.get(key) for key in s3.keys(f"{STORE}/parts/")}


@pytest.fixture(scope="module")
def first_run(s3: S3Server, shard_urls: list[str], ray_session: object) -> dict:
    """One extract run into ``s3://<bucket>/store``: its summary, log records and the part objects it wrote."""
    code, summary, records = extract_cli(s3)
    assert code == 0, summary
    return {"summary": summary, "logs": records, "parts": part_objects(s3)}


def test_brace_ranges_expand_on_s3_urls() -> None:
    urls = expand_shard_urls(["s3://b/in/shard-{000..002}.tar"])
    assert urls == ["s3://b/in/shard-000.tar", "s3://b/in/shard-001.tar", "s3://b/in/shard-002.tar"]


def test_rows_and_errors_read_back_from_s3(first_run: dict, s3: S3Server) -> None:
    summary = first_run["summary"]
    assert (summary["shards_done"], summary["rows"], summary["error_rows"]) == (2, 5, 1)
    reader = StoreReader(s3.url(STORE))
    assert reader.shards() == list(SHARDS)
    rows = pa.concat_tables([reader.table(s) for s in reader.shards()])
    assert rows.column("key").to_pylist() == ["a0", "a1", "a2", "b0", "b2"]
    assert set(rows.column("num_boxes").to_pylist()) == {int(NUM_BOXES)}
    errors = reader.errors(SHARDS[1]).to_pylist()
    assert [(e["key"], e["reason"]) for e in errors] == [("b1", "missing_caption")]
    assert reader.errors(SHARDS[0]).num_rows == 0
    assert reader.marker(SHARDS[1]).accounting.rows == 2


def test_markers_and_no_lock_on_object_storage(first_run: dict, s3: S3Server) -> None:
    keys = s3.keys(f"{STORE}/")
    for shard in SHARDS:
        for suffix in (".arrow", ".errors.arrow", ".done.json"):
            assert f"{STORE}/parts/{shard}{suffix}" in keys
    assert f"{STORE}/{MANIFEST_FILE}" in keys
    assert f"{STORE}/{LOCK_FILE}" not in keys and not [k for k in keys if k.endswith(".tmp")]
    messages = [r.getMessage() for r in first_run["logs"] if r.levelno >= logging.WARNING]
    assert any("object storage" in m and "no store lock" in m for m in messages), messages


def test_part_without_marker_is_ignored_then_resumed(first_run: dict, s3: S3Server) -> None:
    """Lose shard-001's marker (the commit point): readers ignore its part; a rerun redoes exactly that
    shard, skips the other, and the store ends byte-identical to the first run's."""
    s3.delete(f"{STORE}/parts/{SHARDS[1]}.done.json")
    assert f"{STORE}/parts/{SHARDS[1]}.arrow" in s3.keys(f"{STORE}/parts/")
    assert StoreReader(s3.url(STORE)).shards() == [SHARDS[0]]
    code, summary, _ = extract_cli(s3)
    assert code == 0, summary
    assert (summary["shards_done"], summary["shards_skipped"]) == (1, 1)
    assert (summary["rows"], summary["error_rows"]) == (2, 1)
    after = part_objects(s3)
    assert sorted(after) == sorted(first_run["parts"])
    assert [k for k in after if after[k] != first_run["parts"][k]] == []
    assert StoreReader(s3.url(STORE)).shards() == list(SHARDS)


def test_export_from_an_s3_store(first_run: dict, s3: S3Server, tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    code = cli.main(["export", s3.url(STORE), "--parquet", str(tmp_path / "pq")])
    assert code == 0
    table = pq.read_table(tmp_path / "pq" / "rows" / f"{SHARDS[0]}.parquet")
    assert table.column("key").to_pylist() == ["a0", "a1", "a2"]


def test_inspect_verify_on_s3(first_run: dict, s3: S3Server) -> None:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["inspect", s3.url(STORE), "--verify", "--json"])
    assert code == 0, out.getvalue()
    assert SHARDS[1] in out.getvalue()


def test_tsv_export_then_import_into_an_s3_store(first_run: dict, s3: S3Server, tmp_path: Path) -> None:
    tsv = tmp_path / "features.tsv"
    assert cli.main(["export", s3.url(STORE), "--tsv", str(tsv)]) == 0
    with contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(["import", "--from", "butd-tsv", str(tsv), "--out", s3.url("imported")])
    assert code == 0
    source, imported = StoreReader(s3.url(STORE)), StoreReader(s3.url("imported"))
    rows = pa.concat_tables([imported.table(s) for s in imported.shards()])
    original = pa.concat_tables([source.table(s) for s in source.shards()])
    assert rows.num_rows == original.num_rows == 5
    assert rows.column("features").to_pylist() == original.column("features").to_pylist()


def test_store_in_a_missing_bucket_is_refused_before_ray(
    s3: S3Server, shard_urls: list[str], capsys: pytest.CaptureFixture
) -> None:
    """``--out s3://missing/...`` ended in a traceback from start_manifest after Ray started (trial 2 item 3);
    now one line, rc 1, before Ray."""
    import ray

    was_up = ray.is_initialized()
    out = "s3://no-such-bucket-here/stores/st"
    with pytest.raises(StoreRefused, match="bucket 'no-such-bucket-here' of the store does not exist"):
        refuse_foreign_directory(StoreLocation.parse(out))
    code = cli.main(["extract", *shard_urls, "--out", out, "--config", "tiny"])
    err = capsys.readouterr().err
    assert code == 1 and "regionflow extract: error: the bucket 'no-such-bucket-here'" in err
    assert "Traceback" not in err and ray.is_initialized() == was_up
