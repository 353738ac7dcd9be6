"""model.data.StoreImages on the layout extract writes (many record batches per part): rows read batch by batch as
views, no column concatenated; empty committed shards skipped; an empty store refused in one line."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
from tiny_store import random_rows, write_store

from model.data import EmptyStoreError, StoreImages
from pipelines.cli import ExitCode, main
from workers.store import StoreReader

D = 8
BATCH_ROWS = 4


def _rebatch(part: str, rows: int) -> None:
    """Rewrite a part file in record batches of ``rows`` rows (what extract does with 64)."""
    with pa.memory_map(part, "r") as source:
        table = ipc.open_file(source).read_all()
    with ipc.new_file(part + ".tmp", table.schema) as writer:
        writer.write_table(table, max_chunksize=rows)
    os.replace(part + ".tmp", part)


@pytest.fixture()
def batched(tmp_path):
    rows = random_rows(num_images=22, feature_dim=D, seed=5, captions_per_image=3)
    store = write_store(tmp_path / "store", rows, D, num_shards=2)
    for part in sorted((store / "parts").glob("*[0-9].arrow")):
        _rebatch(str(part), BATCH_ROWS)
    return store, rows


def test_rows_match_across_record_batches(batched):
    store, rows = batched
    reader = StoreReader(str(store))
    assert ipc.open_file(pa.memory_map(str(store / "parts" / "shard-000.arrow"))).num_record_batches == 3
    images = StoreImages(reader)
    assert images.num_images == 22
    # write_store puts rows[s::2] in shard s
    by_index = [rows[0::2][i] for i in range(11)] + [rows[1::2][i] for i in range(11)]
    for index, expected in enumerate(by_index):
        assert images.identity(index)[1] == expected["key"]
        v = images.visual(index)
        np.testing.assert_array_equal(v.features, np.asarray(expected["features"], dtype=np.float16))
        np.testing.assert_allclose(v.boxes_xyxy_px, np.asarray(expected["boxes_xyxy_px"], dtype=np.float32))
        assert [ids.tolist() for ids in images.caption_ids(index)] == expected["input_ids"]
        assert images.captions(index) == expected["captions"]
    assert images.num_captions().tolist() == [3] * 22


def test_features_are_views_of_the_mapped_file(batched):
    store, _ = batched
    images = StoreImages(StoreReader(str(store)))
    features = images.visual(9).features
    assert not features.flags.owndata  # a view, not a copy
    assert features.base is not None


def test_empty_committed_shard_is_skipped(tmp_path):
    rows = random_rows(num_images=6, feature_dim=D, seed=1)
    store = write_store(tmp_path / "store", rows, D, num_shards=2)
    from tiny_store import write_test_store

    write_test_store(str(tmp_path / "empty_part"), {"shard-009": []}, D)
    (store / "parts" / "shard-009.arrow").write_bytes(
        (tmp_path / "empty_part/parts/shard-009.arrow").read_bytes()
    )
    marker = (tmp_path / "empty_part/parts/shard-009.done.json").read_text()
    manifest_digest = StoreReader(str(store)).manifest["config_digest"]
    empty_digest = StoreReader(str(tmp_path / "empty_part")).manifest["config_digest"]
    (store / "parts" / "shard-009.done.json").write_text(marker.replace(empty_digest, manifest_digest))
    (store / "parts" / "shard-009.errors.arrow").write_bytes(
        (tmp_path / "empty_part/parts/shard-009.errors.arrow").read_bytes()
    )
    images = StoreImages(StoreReader(str(store)))
    assert images.empty_shard_ids == ["shard-009"] and images.num_images == 6
    assert images.split_mask(0.5).shape == (6,)


def test_empty_store_is_one_line_error(tmp_path, capsys):
    from tiny_store import write_test_store

    write_test_store(str(tmp_path / "empty"), {"shard-000": []}, D)
    with pytest.raises(EmptyStoreError, match="no committed rows"):
        StoreImages(StoreReader(str(tmp_path / "empty")))
    out = tmp_path / "run"
    args = [
        "train",
        str(tmp_path / "empty"),
        "--task",
        "retrieval",
        "--out",
        str(out),
        "--model-config",
        "tiny",
    ]
    assert main(args) == ExitCode.BAD_INPUT
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith(
        "regionflow train: error: the store has no committed rows"
    )
    assert "(1 committed shard(s), 1 of them empty)" in errors[0]
    assert "Traceback" not in err and not out.exists()


def test_object_storage_reads_batches_with_a_bounded_cache(batched, s3):
    """The same store on the loopback S3 server: the same rows, read as ranged reads of one record batch's
    columns, kept in a cache bounded by bytes (here: about one batch)."""
    store, _ = batched
    for path in sorted(store.rglob("*")):
        if path.is_file():
            s3.upload(path, f"batched/{path.relative_to(store)}")
    local = StoreImages(StoreReader(str(store)))
    one_batch = local.visual(0).features.nbytes * BATCH_ROWS * 4  # generous bound for one batch's columns
    remote = StoreImages(StoreReader(s3.url("batched")), remote_cache_bytes=one_batch)
    assert remote.num_images == local.num_images and remote.identities() == local.identities()
    for index in (0, 21, 5, 12, 3):
        np.testing.assert_array_equal(remote.visual(index).features, local.visual(index).features)
        assert [a.tolist() for a in remote.caption_ids(index)] == [
            a.tolist() for a in local.caption_ids(index)
        ]
        assert remote.captions(index) == local.captions(index)
    assert remote.cache._bytes <= one_batch
    assert remote.cache.loads >= 5  # evictions: batches were read again, not kept


def test_part_sizes_are_checked_with_an_object_storage_stat(s3, tmp_path):
    """`StoreReader.check_part_sizes` (train and evaluate call it) on S3: the stat sizes of an intact store
    match its markers; a part re-uploaded one byte short is refused naming the shard (trial 2 item 6)."""
    from schemas.store import StoreSchemaError

    store = write_store(tmp_path / "store", random_rows(num_images=6, feature_dim=D, seed=7), D, num_shards=2)
    for path in sorted(store.rglob("*")):
        if path.is_file():
            s3.upload(path, f"sized/{path.relative_to(store)}")
    StoreReader(s3.url("sized")).check_part_sizes()
    part = sorted(p for p in (store / "parts").glob("*.arrow") if not p.name.endswith(".errors.arrow"))[0]
    short = tmp_path / part.name
    short.write_bytes(part.read_bytes()[:-1])
    s3.upload(short, f"sized/parts/{part.name}")
    with pytest.raises(StoreSchemaError, match=f"{part.name} is {part.stat().st_size - 1} bytes"):
        StoreReader(s3.url("sized")).check_part_sizes()
