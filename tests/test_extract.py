"""``regionflow extract`` end to end: real tars, the real Ray runtime, the ``tiny`` detector (docs/design.md §4, §5, §9)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from invariants import assert_store_invariants
from tarfactory import caption_json, make_jpeg, simple_sample

from pipelines import cli
from pipelines.extract import ExtractConfig, FaultInjection, extract
from schemas.manifest import comparable_manifest
from schemas.store import MANIFEST_FILE, PARTS_DIR, validate_rows
from workers.corpus.tar_writer import write_tar
from workers.store import StoreLocation, StoreLock, StoreReader

DATA = Path(__file__).parents[2] / "shared" / "data"
COCO_MINI = DATA / "coco-train-mini"
TINY = ExtractConfig(detector="tiny", detector_threads=1, batch_size=2, num_boxes=12)
GOOD_ROWS = 9  # 4 + 3 + 2 good samples below


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three shards: 4 good samples; 3 good + a corrupt JPEG + a caption-less image + an unknown member;
    2 good samples (given as JSON captions with an image id)."""
    root = tmp_path_factory.mktemp("shards")
    good = make_jpeg(48, 40, seed=7)
    a = [m for k in range(4) for m in simple_sample(f"a{k}", seed=k, size=40 + 16 * k)]
    b = simple_sample("b0", seed=10, size=64)
    b += [("b1.jpg", good[: len(good) // 2]), ("b1.txt", b"a truncated picture")]
    b += simple_sample("b2", seed=11, size=72) + [("b3.jpg", make_jpeg(50, 60, seed=12))]
    b += [("b4.cls", b"3")] + simple_sample("b4", seed=13, size=56)
    c = [
        ("c0.jpg", make_jpeg(90, 60, seed=20)),
        ("c0.json", caption_json(["two words", "a much longer caption " * 8], image_id=42)),
        ("dir/c1.png.jpg", make_jpeg(33, 77, seed=21)),
        ("dir/c1.png.txt", b"a key with a directory prefix"),
    ]
    urls = []
    for name, members in (("sa-000", a), ("sa-001", b), ("sa-002", c)):
        write_tar(root / f"{name}.tar", members)
        urls.append(str(root / f"{name}.tar"))
    return urls


@pytest.fixture(scope="module")
def store(shards: list[str], tmp_path_factory: pytest.TempPathFactory, ray_session: object) -> Path:
    out = tmp_path_factory.mktemp("stores") / "store"
    summary = extract(shards, str(out), TINY)
    assert summary.exit_code == 0, summary
    return out


def files_of(store: Path) -> dict[str, bytes]:
    """Every part, error table and marker of a store, by name."""
    return {p.name: p.read_bytes() for p in sorted((store / PARTS_DIR).iterdir())}


def manifest_of(store: Path) -> dict:
    return json.loads((store / MANIFEST_FILE).read_text())


def test_rows_errors_and_accounting(store: Path) -> None:
    reader = StoreReader(str(store))
    assert reader.shards() == ["sa-000", "sa-001", "sa-002"]
    tables = [reader.table(s) for s in reader.shards()]
    rows = pa.concat_tables(tables)
    assert rows.num_rows == GOOD_ROWS
    for table in tables:
        validate_rows(table, reader.feature_dim)
    ids = list(zip(rows.column("shard").to_pylist(), rows.column("key").to_pylist(), strict=True))
    assert len(set(ids)) == len(ids)
    assert ("sa-002", "dir/c1") in ids
    errors = {(r["key"], r["reason"]) for s in reader.shards() for r in reader.errors(s).to_pylist()}
    assert errors == {("b1", "image_undecodable"), ("b3", "missing_caption")}
    marker = reader.marker("sa-001")
    acc = marker.accounting
    assert (acc.rows, acc.error_rows, acc.samples) == (3, 2, 5)
    assert acc.members_ignored == {"unknown_extension": 1}
    assert acc.members == acc.members_used + acc.members_in_errors + sum(acc.members_ignored.values()) == 10
    c0 = rows.filter(pa.compute.equal(rows.column("key"), "c0")).to_pylist()[0]
    assert c0["image_id"] == 42 and (c0["image_width_px"], c0["image_height_px"]) == (90, 60)
    assert c0["captions_truncated"] == [False, True]
    assert len(c0["input_ids"][1]) == TINY.max_tokens
    assert c0["num_boxes"] == 12 and c0["box_source"] == "detector"
    features = np.asarray(c0["features"], dtype=np.float32)
    assert features.shape == (12, reader.feature_dim) and np.isfinite(features).all()
    assert (features.std(axis=0) > 0).all()  # non-degenerate: every dimension varies across the boxes


def test_manifest_provenance(store: Path) -> None:
    manifest = manifest_of(store)
    assert manifest["weights"]["random_init"] is True
    assert manifest["detector_config"]["name"] == "tiny"
    assert manifest["extraction_config"]["box_selection"]["num_boxes"] == 12
    assert manifest["tokenizer"]["tokenizer_digest"] == manifest["extraction_config"]["tokenizer_digest"]
    assert set(manifest["library_versions"]) >= {"python", "torch", "ray", "pyarrow", "tokenizers"}
    assert manifest["failed_shards"] == [] and len(manifest["runs"]) >= 1


def test_parts_readable_without_regionflow(store: Path) -> None:
    """pyarrow and polars read the parts in a fresh interpreter that never imports regionflow."""
    code = (
        "import sys, pyarrow.ipc as ipc, polars as pl\n"
        f"path = {str(store / PARTS_DIR / 'sa-000.arrow')!r}\n"
        "t = ipc.open_file(path).read_all()\n"
        "d = pl.read_ipc(path)\n"
        "f = t.column('features').combine_chunks().flatten().flatten().to_numpy()\n"
        "assert str(f.dtype) == 'float16', f.dtype\n"
        "assert d.height == t.num_rows == 4, (d.height, t.num_rows)\n"
        "assert d['num_boxes'].sum() == 48\n"
        "assert not {'schemas', 'workers', 'pipelines'} & set(sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, cwd=store)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_rerun_does_nothing_and_changes_no_byte(store: Path, shards: list[str], capsys) -> None:
    before, manifest = files_of(store), manifest_of(store)
    code = cli.main(["extract", *shards, "--out", str(store), "--config", "tiny", "--num-boxes", "12",
                     "--detector-threads", "1", "--batch-size", "2"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (summary["shards_skipped"], summary["shards_done"], summary["rows"]) == (3, 0, 0)
    # detector actors sleep rather than spin between OpenMP regions unless the driver's environment says otherwise
    assert summary["detector_omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert files_of(store) == before
    after = manifest_of(store)
    assert comparable_manifest(after) == comparable_manifest(manifest)
    assert len(after["runs"]) == len(manifest["runs"]) + 1


def test_output_independent_of_batch_size_and_detectors(
    store: Path, shards: list[str], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    config = ExtractConfig(detector="tiny", detector_threads=1, batch_size=3, detectors=2, num_boxes=12,
                           shards_in_flight=3)  # fmt: skip
    summary = extract(shards, str(other), config)
    assert summary.exit_code == 0 and summary.rows == GOOD_ROWS
    assert files_of(other) == files_of(store)
    assert comparable_manifest(manifest_of(other)) == comparable_manifest(manifest_of(store))


def test_killed_detector_actor_neither_drops_nor_duplicates(
    store: Path, shards: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "killed"
    fault = FaultInjection(shard="sa-000", chunk_index=1, once_file=str(tmp_path / "killed-once"))
    config = ExtractConfig(detector="tiny", detector_threads=1, batch_size=1, num_boxes=12)
    summary = extract(shards, str(out), config, fault=fault)
    assert (tmp_path / "killed-once").exists()  # the actor did die mid-shard
    assert summary.exit_code == 0 and summary.rows == GOOD_ROWS
    assert_store_invariants(out)
    assert files_of(out) == files_of(store)


def test_resume_after_crash(store: Path, shards: list[str], tmp_path: Path) -> None:
    """A run killed while writing sa-001: no marker, a stray temporary part. The rerun redoes that shard only."""
    out = tmp_path / "resumed"
    shutil.copytree(store, out)
    (out / PARTS_DIR / "sa-001.done.json").unlink()
    (out / PARTS_DIR / "sa-001.arrow").rename(out / PARTS_DIR / "sa-001.arrow.tmp")
    summary = extract(shards, str(out), TINY)
    assert (summary.shards_done, summary.shards_skipped, summary.stray_temporaries_removed) == (1, 2, 1)
    assert_store_invariants(out)
    assert files_of(out) == files_of(store)


def test_failed_shard_exits_2(shards: list[str], tmp_path: Path, capsys, ray_session: object) -> None:
    unreadable = tmp_path / "junk-000.tar"  # exists (a missing local file is refused before Ray starts)
    unreadable.write_bytes(b"this is not a tar file\n" * 40)
    out = tmp_path / "store"
    code = cli.main(["extract", shards[0], str(unreadable), "--out", str(out), "--config", "tiny",
                     "--detector-threads", "1", "--num-boxes", "12"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 2 and summary["exit_code"] == 2
    assert [f["shard"] for f in summary["failed_shards"]] == ["junk-000"]
    assert "junk-000" in summary["failed_shards"][0]["error"]
    assert summary["shards_done"] == 1 and summary["rows"] == 4
    assert [f["shard"] for f in manifest_of(out)["failed_shards"]] == ["junk-000"]
    assert sorted(files_of(out)) == ["sa-000.arrow", "sa-000.done.json", "sa-000.errors.arrow"]
    assert_store_invariants(out)


def test_other_digest_refused_then_overwritten(
    store: Path, shards: list[str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "store"
    shutil.copytree(store, out)
    before = files_of(out)
    args = [
        "extract",
        *shards,
        "--out",
        str(out),
        "--config",
        "tiny",
        "--detector-threads",
        "1",
        "--num-boxes",
        "8",
    ]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert "another extraction config" in err
    assert "box_selection.num_boxes: 12 → 8" in err  # the setting that changed, not only two digests
    assert files_of(out) == before
    assert cli.main([*args, "--overwrite"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["shards_done"] == 3
    reader = StoreReader(str(out))
    assert reader.shards() == ["sa-000", "sa-001", "sa-002"]
    assert set(
        pa.concat_tables([reader.table(s) for s in reader.shards()]).column("num_boxes").to_pylist()
    ) == {8}


def test_refusals_write_nothing(shards: list[str], tmp_path: Path, capsys) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    base = ["extract", shards[0], "--config", "tiny"]
    assert cli.main([*base, "--out", str(foreign)]) == 1
    assert "not a regionflow store" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    fresh = tmp_path / "fresh"
    assert cli.main([*base, "--out", str(fresh), "--boxes", "adaptive", "--num-boxes", "5"]) == 1
    assert cli.main([*base, "--out", str(fresh), "--weights", str(tmp_path / "none.safetensors")]) == 1
    assert (
        cli.main(["extract", shards[0], shards[0], "--out", str(fresh), "--config", "tiny"]) == 1
    )  # id twice
    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "--out", str(fresh), "--batch-size", "0"])
    assert exc.value.code == 1
    assert not fresh.exists()


def test_live_lock_refused(store: Path, shards: list[str], capsys) -> None:
    with StoreLock(StoreLocation.parse(str(store))):
        assert cli.main(["extract", shards[0], "--out", str(store), "--config", "tiny"]) == 1
    assert "being written by pid" in capsys.readouterr().err


def test_optional_captions_keep_captionless_images(shards: list[str], tmp_path: Path) -> None:
    vocab = DATA / "butd-vocab"
    config = ExtractConfig(detector="tiny", detector_threads=1, num_boxes=12, captions="optional",
                           vocab=str(vocab) if vocab.is_dir() else None)  # fmt: skip
    summary = extract([shards[1]], str(tmp_path / "store"), config)
    assert (summary.rows, summary.error_rows_by_reason) == (4, {"image_undecodable": 1})
    rows = StoreReader(str(tmp_path / "store")).table("sa-001").to_pylist()
    b3 = next(r for r in rows if r["key"] == "b3")
    assert b3["captions"] == [] and b3["input_ids"] == []
    if config.vocab:  # class index i + 1 is line i of objects_vocab.txt
        names = manifest_of(tmp_path / "store")["vocabularies"]
        lines = (vocab / "objects_vocab.txt").read_text().splitlines()
        assert (len(names["objects"]), len(names["attributes"]), names["first_index"]) == (1600, 400, 1)
        assert names["objects"][0] == lines[0].strip() and names["objects"][-1] == lines[-1].strip()


@pytest.mark.slow
def test_coco_train_mini(tmp_path: Path, capsys, ray_session: object) -> None:
    if not (COCO_MINI / "images").is_dir():
        pytest.skip(f"{COCO_MINI} is absent")
    shard_dir = tmp_path / "shards"
    assert cli.main(["shards", "--images", str(COCO_MINI / "images"), "--captions",
                     str(COCO_MINI / "captions_train2017.json"), "--out", str(shard_dir),
                     "--samples-per-shard", "20"]) == 0  # fmt: skip
    capsys.readouterr()
    urls = sorted(str(p) for p in shard_dir.glob("*.tar"))
    assert len(urls) == 4
    summary = extract(
        urls, str(tmp_path / "store"), ExtractConfig(detector="tiny", detector_threads=2, batch_size=4)
    )
    assert summary.exit_code == 0 and (summary.rows, summary.error_rows) == (80, 0)
    reader = StoreReader(str(tmp_path / "store"))
    rows = pa.concat_tables([reader.table(s) for s in reader.shards()])
    assert sum(len(c) for c in rows.column("captions").to_pylist()) == 400
    assert set(rows.column("num_boxes").to_pylist()) == {36}
    assert rows.column("image_id").null_count == 0
    widths = np.asarray(rows.column("image_width_px"))
    assert widths.min() >= 333 and widths.max() <= 640


def test_inspect_verifies_an_extracted_store(store: Path) -> None:
    from pipelines.inspect import inspect_store

    report = inspect_store(str(store), verify=True)
    assert report.verified is True, report.problems
    assert (report.rows, report.boxes) == (GOOD_ROWS, GOOD_ROWS * 12)
    assert report.error_rows_by_reason == {"image_undecodable": 1, "missing_caption": 1}
    assert report.members_ignored_by_reason == {"unknown_extension": 1}


class PlantedDetector:
    """Stands in for ``RegionDetector`` in row-building tests: returns planted outputs by image width."""

    feature_dim = 4

    def __init__(self, outputs: dict[int, object]) -> None:
        self.outputs = outputs

    def extract(self, images: list[np.ndarray], given_boxes: object = None) -> list[object]:
        return [self.outputs[image.shape[1]] for image in images]


def planted_output(features: np.ndarray, boxes: list[list[float]] | None = None) -> object:
    from workers.detect.detector import RegionOutput

    n = features.shape[0]
    boxes_array = np.asarray(boxes or [[0, 0, 4, 4]] * n, dtype=np.float32)
    return RegionOutput(boxes_array, features.astype(np.float32), np.arange(1, n + 1, dtype=np.int16),
                        np.full(n, 0.5, np.float32), None, None, None)  # fmt: skip


def read_sample(key: str, width: int) -> object:
    from workers.read.reader import DecodedSample
    from workers.read.tokenizer import TokenizedCaptions
    from workers.rows import ReadSample

    image = np.zeros((8, width, 3), np.uint8)
    sample = DecodedSample(key, "s", None, image, width, 8, ("a cap",), None, (f"{key}.jpg", f"{key}.txt"))
    return ReadSample(sample, TokenizedCaptions([[101, 1037, 102]], [False]))


@pytest.mark.parametrize(
    ("output", "detail"),
    [
        (planted_output(np.array([[1.0, np.nan, 0, 0]])), "non-finite value in features"),
        (planted_output(np.array([[7e4, 0, 0, 0]])), "exceeds the float16 range"),
        (planted_output(np.ones((1, 4)), [[0, 0, 9, 4]]), "outside the 8x8 image"),
        (planted_output(np.ones((1, 4)), [[3, 0, 3, 4]]), "empty or outside"),
        (planted_output(np.zeros((0, 4))), "no box"),
    ],
)
def test_unstorable_detector_output_becomes_an_error_row(output: object, detail: str) -> None:
    from workers.read.reader import MemberCounts
    from workers.rows import RegionRowBuilder, ShardChunk

    good = planted_output(
        np.array([[1.0, 2.0, -3.0, 65504.0], [0.5, 0.25, 0, 1]]), [[0, 0, 4, 4], [1, 1, 9, 7]]
    )
    detector = PlantedDetector({10: good, 8: output})
    chunk = ShardChunk("s", 0, (read_sample("ok", 10), read_sample("bad", 8)), MemberCounts(4, {}))
    result = RegionRowBuilder(detector, box_source="detector", with_cls_prob=False).process(chunk)  # type: ignore[arg-type]
    assert result.rows.column("key").to_pylist() == ["ok"]
    validate_rows(result.rows, 4)
    [error] = result.errors
    assert (error.key, error.reason) == ("bad", "detector_output_invalid") and detail in error.detail
    assert (result.members_used, result.members_in_errors) == (2, 2)
    stored = np.asarray(result.rows.column("features").to_pylist()[0], dtype=np.float32)
    assert stored.tolist() == [[1.0, 2.0, -3.0, 65504.0], [0.5, 0.25, 0.0, 1.0]]


def test_store_on_object_storage(store: Path, shards: list[str], s3, caplog) -> None:
    """Part, error table, then marker written directly (no rename, no lock, which is logged)."""
    uri = s3.url("stores/a")
    with caplog.at_level("WARNING", logger="pipelines.extract"):
        summary = extract(shards, uri, TINY)
    assert summary.exit_code == 0 and summary.rows == GOOD_ROWS
    assert "no store lock" in caplog.text
    reader = StoreReader(uri)
    assert reader.shards() == ["sa-000", "sa-001", "sa-002"]
    location = reader.location
    remote = {
        n: location.read_bytes(location.path(PARTS_DIR, n))
        for n in location.list_names(location.path(PARTS_DIR))
    }
    assert remote == files_of(store)
    assert extract(shards, uri, TINY).shards_skipped == 3


@pytest.mark.cluster
def test_local_store_refused_on_a_multi_node_cluster(shards: list[str], tmp_path: Path, capsys) -> None:
    """Parts are written on the detectors' nodes: a local ``--out`` on a 2-node ``Cluster`` is refused (exit 1,
    nothing written, no detector started) unless ``--store-shared-fs``. The session runtime is restored."""
    import ray
    from conftest import RAY_TEST_CPUS
    from ray.cluster_utils import Cluster

    was_up = ray.is_initialized()
    if was_up:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        out = tmp_path / "store"
        args = ["extract", shards[0], "--out", str(out), "--config", "tiny", "--address", cluster.address]
        assert cli.main(args) == 1
        err = capsys.readouterr().err
        assert f"store {out} is a local path but the Ray cluster has 2 alive nodes" in err
        assert "extract writes each part on the node" in err and "--store-shared-fs" in err
        assert not (out / PARTS_DIR).exists() and not (out / MANIFEST_FILE).exists()
    finally:
        ray.shutdown()
        cluster.shutdown()
        if was_up:
            ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, log_to_driver=False)


def test_progress_lines_without_a_terminal(
    shards: list[str], tmp_path: Path, caplog, monkeypatch, ray_session: object
) -> None:
    """stderr is not a terminal under pytest: no progress bar, so extract logs periodic progress lines
    (images, images/s, shards, errors); ``PROGRESS_LOG_S`` is shortened to see several in a short run."""
    import logging
    import re

    monkeypatch.setattr("pipelines.extract_scheduler.PROGRESS_LOG_S", 0.05)
    with caplog.at_level(logging.INFO, logger="pipelines.extract"):
        summary = extract(shards[:2], str(tmp_path / "store"), TINY)
    assert summary.exit_code == 0
    pattern = re.compile(
        r"extract: \d+ images \([\d.]+ images/s\), \d/2 shards done \(0 skipped, 0 failed\), \d+ error rows"
    )
    lines = [r.getMessage() for r in caplog.records if pattern.fullmatch(r.getMessage())]
    assert len(lines) >= 2, [r.getMessage() for r in caplog.records]


def test_rerun_on_a_complete_store_decides_before_ray(
    store: Path, shards: list[str], tmp_path: Path, capsys, monkeypatch
) -> None:
    """Every shard committed under this config: the rerun reads the markers and the manifest, records the
    run and ends without starting Ray or a detector (issue 14 item 11); parts untouched."""

    def no_ray(config: object) -> None:
        raise AssertionError("Ray must not start for a complete store")

    out = tmp_path / "store"
    shutil.copytree(store, out)
    before, manifest = files_of(out), manifest_of(out)
    monkeypatch.setattr("pipelines.extract_run.connect_ray", no_ray)
    code = cli.main(["extract", *shards, "--out", str(out), "--config", "tiny", "--num-boxes", "12",
                     "--detector-threads", "1"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and (summary["shards_skipped"], summary["shards_done"]) == (3, 0)
    assert files_of(out) == before
    assert comparable_manifest(manifest_of(out)) == comparable_manifest(manifest)
    assert len(manifest_of(out)["runs"]) == len(manifest["runs"]) + 1
