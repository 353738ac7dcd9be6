"""Store -> batch loading: split determinism, random access, pairs, collation masks, rank sharding, positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_store import random_rows, write_store

from model.data import StoreImages, VisualRow, holdout_score, is_heldout
from model.items import CaptionPairs, Sample, TaskStream, collate, epoch_order, eval_ranges, steps_per_epoch
from workers.store import StoreReader

D = 8


@pytest.fixture()
def store(tmp_path):
    rows = random_rows(num_images=30, feature_dim=D, seed=3, captions_per_image=2)
    write_store(tmp_path / "store", rows, D, num_shards=3)
    return StoreImages(StoreReader(str(tmp_path / "store"))), rows


def test_split_is_a_pure_function_of_identity():
    keys = [f"k{i}" for i in range(4000)]
    held = [is_heldout("shard-a", k, 0.2) for k in keys]
    assert held == [is_heldout("shard-a", k, 0.2) for k in reversed(keys)][::-1]
    assert 0.17 < np.mean(held) < 0.23
    assert not any(is_heldout("shard-a", k, 0.0) for k in keys)
    # a larger fraction only adds images
    assert all(is_heldout("shard-a", k, 0.3) for k, h in zip(keys, held, strict=True) if h)
    assert holdout_score("a", "bc") != holdout_score("ab", "c")  # the separator matters


def test_store_images_random_access_matches_rows(store):
    images, rows = store
    assert images.num_images == 30
    assert images.shard_ids == ["shard-000", "shard-001", "shard-002"]
    # write_store puts rows[s::3] in shard s: global index 10 is the first row of shard-001 = rows[1]
    expected = rows[1]
    assert images.identity(10) == ("shard-001", expected["key"])
    v = images.visual(10)
    assert v.features.dtype == np.float16 and v.features.shape == (expected["num_boxes"], D)
    np.testing.assert_array_equal(v.features, np.asarray(expected["features"], dtype=np.float16))
    np.testing.assert_allclose(v.boxes_xyxy_px, np.asarray(expected["boxes_xyxy_px"], dtype=np.float32))
    assert v.image_size_px.tolist() == [expected["image_width_px"], expected["image_height_px"]]
    assert [ids.tolist() for ids in images.caption_ids(10)] == expected["input_ids"]
    with pytest.raises(IndexError):
        images.visual(30)


def test_split_indices_partition_the_store(store):
    images, _ = store
    train = images.split_indices("train", 0.2)
    held = images.split_indices("heldout", 0.2)
    assert sorted([*train, *held]) == list(range(30))
    for i in held:
        assert is_heldout(*images.identity(int(i)), 0.2)


def test_caption_pairs_one_item_per_caption(store):
    images, rows = store
    pairs = CaptionPairs(images, np.array([0, 10, 29]))
    assert len(pairs) == 6
    s = pairs.sample(3)  # second caption of image 10
    assert s.image_index == 10 and list(s.input_ids) == rows[1]["input_ids"][1]
    assert s.caption_ids is None
    assert CaptionPairs(images, np.array([0]), caption_targets=True).sample(0).caption_ids is not None


def _sample(n: int, ids: list[int], image: int, target: np.ndarray | None = None) -> Sample:
    visual = VisualRow(
        features=np.full((n, D), image, dtype=np.float16),
        boxes_xyxy_px=np.tile(np.array([1, 2, 3, 4], dtype=np.float32), (n, 1)),
        image_size_px=np.array([10, 20], dtype=np.float32),
        cls_prob=None,
    )
    return Sample(visual, ids, image, vqa_target=target)


def test_collate_pads_and_masks():
    batch = collate([_sample(2, [101, 5, 102], 1), _sample(4, [101, 7, 8, 9, 102], 2)])
    batch.validate()
    assert batch.features.shape == (2, 4, D) and batch.features.dtype == torch.float32
    assert batch.region_mask.tolist() == [[True, True, False, False], [True] * 4]
    assert batch.features[0, 2:].abs().sum() == 0 and batch.features[0, :2].eq(1).all()
    assert batch.input_ids.tolist() == [[101, 5, 102, 0, 0], [101, 7, 8, 9, 102]]
    assert batch.token_mask.tolist() == [[True, True, True, False, False], [True] * 5]
    assert batch.image_index.tolist() == [1, 2]
    assert batch.vqa_targets is None and batch.caption_ids is None


def test_collate_targets_all_or_none():
    t = np.array([0.3, 1.0], dtype=np.float32)
    batch = collate([_sample(1, [101, 102], 0, t), _sample(1, [101, 102], 1, t)])
    assert batch.vqa_targets.tolist() == [pytest.approx([0.3, 1.0])] * 2
    with pytest.raises(ValueError, match="some samples"):
        collate([_sample(1, [101, 102], 0, t), _sample(1, [101, 102], 1)])
    with pytest.raises(ValueError):
        collate([])


def test_epoch_order_equal_lengths_disjoint_and_deterministic():
    orders = [epoch_order(23, seed=5, epoch=2, rank=r, world_size=3) for r in range(3)]
    assert [len(o) for o in orders] == [7, 7, 7]
    assert len(set(np.concatenate(orders).tolist())) == 21
    np.testing.assert_array_equal(orders[1], epoch_order(23, 5, 2, 1, 3))
    assert not np.array_equal(orders[0], epoch_order(23, 5, 3, 0, 3))  # a new permutation each epoch
    with pytest.raises(ValueError, match="cannot feed"):
        epoch_order(1, 0, 0, 0, 2)
    assert steps_per_epoch(23, 3, 2) == 3 and steps_per_epoch(23, 3, 100) == 1


@pytest.mark.parametrize(("n", "w"), [(10, 3), (2, 4), (7, 1), (0, 2)])
def test_eval_ranges_cover_every_item_once(n, w):
    covered = [i for r in range(w) for i in eval_ranges(n, r, w)]
    assert covered == list(range(n))


def test_task_stream_restores_its_position(store):
    images, _ = store
    pairs = CaptionPairs(images, np.arange(30))
    a = TaskStream(pairs, batch_size=4, seed=1, rank=1, world_size=2)
    assert len(pairs) == 60 and a.steps_per_epoch == 7  # 60 // 2 // 4
    for _ in range(9):  # crosses an epoch boundary
        a.next_batch()
    assert a.position == {"epoch": 1, "batch": 2}
    b = TaskStream(pairs, batch_size=4, seed=1, rank=1, world_size=2)
    b.restore({"epoch": 1, "batch": 1})
    a2 = TaskStream(pairs, batch_size=4, seed=1, rank=1, world_size=2)
    for _ in range(8):
        a2.next_batch()
    assert torch.equal(a2.next_batch().input_ids, b.next_batch().input_ids)


def test_visual_permutation_views(store):
    images, _ = store
    perm = np.roll(np.arange(30), 1)  # image i shows image i-1
    whole = images.with_visual_permutation(perm, features_only=False)
    feats = images.with_visual_permutation(perm, features_only=True)
    own, other = images.visual(5), images.visual(4)
    np.testing.assert_array_equal(whole.visual(5).boxes_xyxy_px, other.boxes_xyxy_px)
    np.testing.assert_array_equal(whole.visual(5).image_size_px, other.image_size_px)
    np.testing.assert_array_equal(feats.visual(5).boxes_xyxy_px, own.boxes_xyxy_px)
    shown = feats.visual(5).features
    assert shown.shape[0] == own.features.shape[0]
    np.testing.assert_array_equal(shown[0], other.features[0])
    assert images.visual(5).features is not None  # the original is untouched
    np.testing.assert_array_equal(images.visual(5).boxes_xyxy_px, own.boxes_xyxy_px)
    with pytest.raises(ValueError):
        images.with_visual_permutation(np.zeros(30, dtype=int), features_only=True)
