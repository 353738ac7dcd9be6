"""The store -> batch data loader: memory-mapped random access to image rows, (image, caption) pairs, the
deterministic train / held-out split, per-rank ordering and collation into `model.batch.Batch`.

Split rule (`HASH_RULE`): an image is held out when the first 8 bytes of ``sha256(shard + "\\0" + key)``, read as
a big-endian unsigned integer and divided by ``2**64``, are below ``holdout_fraction``. It depends on the image's
identity only (not on the store's other rows, the worker count or a seed), so adding shards never moves an image
between splits, and every caption and VQA question of an image follows the image.

Rank sharding (`epoch_order`, `eval_ranges`):
    * training: each epoch is a permutation of the split drawn from ``numpy.random.default_rng([seed, epoch])``;
      rank ``r`` of ``W`` takes ``perm[r::W]`` cut to ``len // W`` items, so every rank has the same number of items
      and the same number of steps (up to ``W - 1`` items sit out an epoch; a different set every epoch). A data
      position is just ``(epoch, batch)``: resuming needs no iterator state.
    * evaluation: contiguous ranges covering every item exactly once (sizes differ by at most one).

Region features stay float16 in the memory-mapped Arrow file until collation (float32 in the batch). No global
image region is added here: the model adds it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import torch

from model.batch import Batch

HASH_RULE = "sha256(shard + '\\0' + key)[:8] as big-endian uint64 / 2**64 < holdout_fraction -> held-out"
DEFAULT_HOLDOUT_FRACTION = 0.2
SPLITS = ("train", "heldout")
PAD_TOKEN_ID = 0  # BERT [PAD]; Batch.input_ids is padded with it


# --------------------------------------------------------------------------------------------------- split
def holdout_score(shard: str, key: str) -> float:
    """Deterministic score in ``[0, 1)`` of an image identity (see `HASH_RULE`)."""
    digest = hashlib.sha256(f"{shard}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def check_holdout_fraction(fraction: float) -> None:
    """Raise ``ValueError`` unless ``0 <= fraction < 1``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {fraction}")


def is_heldout(shard: str, key: str, holdout_fraction: float) -> bool:
    """True when the image ``(shard, key)`` belongs to the held-out split."""
    return holdout_score(shard, key) < holdout_fraction


# ------------------------------------------------------------------------------------------- store access
class StoreLike(Protocol):
    """What `StoreImages` needs from ``workers.store.StoreReader``."""

    feature_dim: int

    def shards(self) -> list[str]: ...

    def table(self, shard: str) -> pa.Table: ...


@dataclass(frozen=True)
class VisualRow:
    """The visual part of one image row (numpy views into the memory-mapped store where possible).

    Attributes:
        features: float16 ``[n, D]`` region features.
        boxes_xyxy_px: float32 ``[n, 4]`` boxes, xyxy in original-image pixels.
        image_size_px: float32 ``[2]`` ``(width, height)`` in pixels.
        cls_prob: float16 ``[n, 1601]`` detector class distribution, or None when the store has none.
    """

    features: np.ndarray
    boxes_xyxy_px: np.ndarray
    image_size_px: np.ndarray
    cls_prob: np.ndarray | None


class _RaggedRows:
    """Rows of a ``large_list<fixed_size_list<T, width>>`` column as zero-copy numpy slices."""

    def __init__(self, column: pa.ChunkedArray, width: int) -> None:
        array = column.chunk(0) if column.num_chunks == 1 else pa.concat_arrays(column.chunks)
        self.offsets = array.offsets.to_numpy()
        self.valid = ~np.asarray(array.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        inner = array.values  # FixedSizeListArray, unsliced
        flat = inner.values.to_numpy(zero_copy_only=inner.values.null_count == 0)
        self.values = flat[inner.offset * width :].reshape(-1, width)
        self.width = width

    def row(self, i: int) -> np.ndarray:
        """Row ``i`` as ``[n, width]`` (a non-null column; schema v1 makes features and boxes non-null)."""
        assert self.valid[i], "row() on a null entry"
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def row_or_none(self, i: int) -> np.ndarray | None:
        return self.row(i) if self.valid[i] else None


class _ShardRows:
    """One shard's columns, prepared for random access."""

    def __init__(self, table: pa.Table, feature_dim: int) -> None:
        self.num_rows = table.num_rows
        self.features = _RaggedRows(table.column("features"), feature_dim)
        self.boxes = _RaggedRows(table.column("boxes_xyxy_px"), 4)
        cls_prob = table.column("cls_prob")
        self.cls_prob = (
            _RaggedRows(cls_prob, cls_prob.type.value_type.list_size)
            if cls_prob.null_count < len(cls_prob)
            else None
        )
        self.sizes = np.stack(
            [table.column("image_width_px").to_numpy(), table.column("image_height_px").to_numpy()], axis=1
        ).astype(np.float32)
        self.keys: list[str] = table.column("key").to_pylist()
        self.image_ids: list[int | None] = table.column("image_id").to_pylist()
        self.captions: list[list[str]] = table.column("captions").to_pylist()
        self.input_ids: list[list[list[int]]] = table.column("input_ids").to_pylist()


class StoreImages:
    """Random access by global image index to the rows of every committed shard of a store.

    The global index of row ``r`` of shard ``s`` is ``r`` plus the row counts of the shards before ``s``
    (shards sorted by id). Part files stay memory-mapped; features are sliced, not copied.

    Args:
        store: a ``workers.store.StoreReader`` (or anything with ``feature_dim``, ``shards()``, ``table()``).

    Raises:
        ValueError: the store has no committed rows.
    """

    def __init__(self, store: StoreLike) -> None:
        self.feature_dim = int(store.feature_dim)
        self.shard_ids = list(store.shards())
        self._shards = [_ShardRows(store.table(s), self.feature_dim) for s in self.shard_ids]
        counts = np.array([s.num_rows for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_images = int(self._starts[-1])
        if self.num_images == 0:
            raise ValueError("the store has no committed rows")
        self._visual_source = np.arange(self.num_images)
        self._features_only = False

    def _locate(self, index: int) -> tuple[_ShardRows, int]:
        s, row = self._position(index)
        return self._shards[s], row

    def _position(self, index: int) -> tuple[int, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} outside [0, {self.num_images})")
        s = int(np.searchsorted(self._starts, index, side="right")) - 1
        return s, index - int(self._starts[s])

    def identity(self, index: int) -> tuple[str, str]:
        """``(shard id, key)`` of an image."""
        s, row = self._position(index)
        return self.shard_ids[s], self._shards[s].keys[row]

    def identities(self) -> list[tuple[str, str]]:
        """``(shard id, key)`` of every image, in global index order."""
        return [(sid, k) for sid, s in zip(self.shard_ids, self._shards, strict=True) for k in s.keys]

    def image_ids(self) -> list[int | None]:
        """The ``image_id`` column in global index order (None where null)."""
        return [i for s in self._shards for i in s.image_ids]

    def captions(self, index: int) -> list[str]:
        """Raw caption texts of an image."""
        shard, row = self._locate(index)
        return shard.captions[row]

    def caption_ids(self, index: int) -> list[list[int]]:
        """Tokenised captions of an image (``[CLS] ... [SEP]`` WordPiece ids, unpadded)."""
        shard, row = self._locate(index)
        return shard.input_ids[row]

    def num_captions(self) -> np.ndarray:
        """int64 ``[num_images]`` caption count per image."""
        return np.array([len(c) for s in self._shards for c in s.input_ids], dtype=np.int64)

    def split_mask(self, holdout_fraction: float) -> np.ndarray:
        """bool ``[num_images]``, True = held out (see `HASH_RULE`)."""
        check_holdout_fraction(holdout_fraction)
        return np.array([is_heldout(s, k, holdout_fraction) for s, k in self.identities()], dtype=bool)

    def split_indices(self, split: str, holdout_fraction: float) -> np.ndarray:
        """Global indices of the images of ``split`` ("train" or "heldout"), ascending."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        held = self.split_mask(holdout_fraction)
        return np.flatnonzero(held if split == "heldout" else ~held)

    def with_visual_permutation(self, permutation: np.ndarray, features_only: bool) -> StoreImages:
        """A view whose image ``i`` shows the visual row of image ``permutation[i]`` (a control).

        Args:
            permutation: int ``[num_images]``, a permutation of the global indices.
            features_only: True = only the features move (boxes, sizes and region count stay the image's own;
                the other image's features are repeated cyclically or cut to that count); False = the whole
                visual row (features, boxes, sizes, cls_prob) moves.
        """
        perm = np.asarray(permutation, dtype=np.int64)
        if perm.shape != (self.num_images,) or not np.array_equal(np.sort(perm), np.arange(self.num_images)):
            raise ValueError("permutation must be a permutation of the image indices")
        view = object.__new__(StoreImages)
        view.__dict__.update(self.__dict__)
        view._visual_source = self._visual_source[perm]
        view._features_only = features_only
        return view

    def visual(self, index: int) -> VisualRow:
        """The visual row shown for image ``index`` (its own unless a permutation view is used)."""
        source = int(self._visual_source[index])
        own_shard, own_row = self._locate(index)
        src_shard, src_row = self._locate(source)
        if not self._features_only:
            own_shard, own_row = src_shard, src_row
        boxes = own_shard.boxes.row(own_row)
        features = src_shard.features.row(src_row)
        if features.shape[0] != boxes.shape[0]:
            features = features[np.arange(boxes.shape[0]) % max(1, features.shape[0])]
        cls_prob = None if own_shard.cls_prob is None else own_shard.cls_prob.row_or_none(own_row)
        return VisualRow(features, boxes, own_shard.sizes[own_row], cls_prob)


# -------------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One item before collation.

    Attributes:
        visual: the image's `VisualRow`.
        input_ids: ``[CLS] ... [SEP]`` ids of the caption or question (unpadded).
        image_index: global image index.
        vqa_target: float32 ``[A]`` soft scores, VQA items only.
        caption_ids: caption target ids, caption items only.
    """

    visual: VisualRow
    input_ids: Sequence[int]
    image_index: int
    vqa_target: np.ndarray | None = None
    caption_ids: Sequence[int] | None = None


class ItemSource(Protocol):
    """A map-style dataset of `Sample`s."""

    def __len__(self) -> int: ...

    def sample(self, item: int) -> Sample: ...


@dataclass
class CaptionPairs:
    """One item per (image, caption) pair of the given images; the caption is the text input.

    Args:
        images: the store.
        image_indices: global indices of the images to use (e.g. a split).
        caption_targets: also set ``Sample.caption_ids`` (captioning).
        max_caption_tokens: cut caption targets to this many ids, the final ``[SEP]`` kept (0 = no cut).
    """

    images: StoreImages
    image_indices: np.ndarray
    caption_targets: bool = False
    max_caption_tokens: int = 0
    pair_image: np.ndarray = field(init=False)
    pair_caption: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        counts = self.images.num_captions()[self.image_indices]
        self.pair_image = np.repeat(np.asarray(self.image_indices, dtype=np.int64), counts)
        starts = np.cumsum(counts) - counts
        self.pair_caption = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)

    def __len__(self) -> int:
        return int(self.pair_image.shape[0])

    def sample(self, item: int) -> Sample:
        image = int(self.pair_image[item])
        ids = self.images.caption_ids(image)[int(self.pair_caption[item])]
        target = None
        if self.caption_targets:
            m = self.max_caption_tokens
            target = ids if m == 0 or len(ids) <= m else [*ids[: m - 1], ids[-1]]
        return Sample(self.images.visual(image), ids, image, caption_ids=target)


@dataclass
class QuestionItems:
    """One item per VQA question: the question is the text input, soft scores the target.

    Args:
        images: the store.
        question_ids: tokenised questions, one list per question.
        image_index: int64 ``[Q]`` global image index of each question.
        targets: float32 ``[Q, A]`` soft scores (see `model.vqa.soft_targets`), or None for inference.
    """

    images: StoreImages
    question_ids: Sequence[Sequence[int]]
    image_index: np.ndarray
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.question_ids)

    def sample(self, item: int) -> Sample:
        image = int(self.image_index[item])
        target = None if self.targets is None else self.targets[item]
        return Sample(self.images.visual(image), self.question_ids[item], image, vqa_target=target)


# -------------------------------------------------------------------------------------------- collation
def collate(samples: Sequence[Sample], with_cls_prob: bool = False) -> Batch:
    """Pad a list of samples into a `Batch` (CPU tensors).

    Regions are padded to the batch's largest region count (features/boxes 0, ``region_mask`` False), tokens
    to the longest sequence with ``PAD_TOKEN_ID`` (``token_mask`` False). ``cls_prob`` is filled only when
    ``with_cls_prob`` and every sample has it. ``vqa_targets`` / ``caption_ids`` are set when the samples carry
    them (all or none).

    Raises:
        ValueError: empty list, mixed presence of targets, or a sample whose first token is missing.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    b = len(samples)
    n = max(s.visual.features.shape[0] for s in samples)
    d = samples[0].visual.features.shape[1]
    features = np.zeros((b, n, d), dtype=np.float32)
    boxes = np.zeros((b, n, 4), dtype=np.float32)
    region_mask = np.zeros((b, n), dtype=bool)
    for i, s in enumerate(samples):
        k = s.visual.features.shape[0]
        features[i, :k] = s.visual.features
        boxes[i, :k] = s.visual.boxes_xyxy_px
        region_mask[i, :k] = True
    input_ids, token_mask = _pad_tokens([s.input_ids for s in samples])
    batch = Batch(
        features=torch.from_numpy(features),
        boxes_xyxy_px=torch.from_numpy(boxes),
        image_size_px=torch.from_numpy(
            np.stack([s.visual.image_size_px for s in samples]).astype(np.float32)
        ),
        region_mask=torch.from_numpy(region_mask),
        input_ids=input_ids,
        token_mask=token_mask,
        image_index=torch.tensor([s.image_index for s in samples], dtype=torch.int64),
    )
    return _with_targets(batch, samples, n, with_cls_prob)


def _pad_tokens(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    if any(len(s) == 0 for s in sequences):
        raise ValueError("a token sequence is empty ([CLS] ... [SEP] expected)")
    t = max(len(s) for s in sequences)
    ids = np.full((len(sequences), t), PAD_TOKEN_ID, dtype=np.int64)
    mask = np.zeros((len(sequences), t), dtype=bool)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return torch.from_numpy(ids), torch.from_numpy(mask)


def _all_or_none(samples: Sequence[Sample], name: str) -> bool:
    present = [getattr(s, name) is not None for s in samples]
    if any(present) and not all(present):
        raise ValueError(f"some samples have {name} and some do not")
    return all(present)


def _with_targets(batch: Batch, samples: Sequence[Sample], n: int, with_cls_prob: bool) -> Batch:
    changes: dict[str, Any] = {}
    probs = [s.visual.cls_prob for s in samples]
    if with_cls_prob and all(p is not None for p in probs):
        present = [p for p in probs if p is not None]
        cls_prob = np.zeros((len(samples), n, present[0].shape[1]), dtype=np.float32)
        for i, p in enumerate(present):
            cls_prob[i, : p.shape[0]] = p
        changes["cls_prob"] = torch.from_numpy(cls_prob)
    if _all_or_none(samples, "vqa_target"):
        targets = [s.vqa_target for s in samples if s.vqa_target is not None]
        changes["vqa_targets"] = torch.from_numpy(np.stack(targets).astype(np.float32))
    if _all_or_none(samples, "caption_ids"):
        captions = [s.caption_ids for s in samples if s.caption_ids is not None]
        changes["caption_ids"], changes["caption_mask"] = _pad_tokens(captions)
    return batch.replace(**changes) if changes else batch


# ---------------------------------------------------------------------------------------------- ordering
def epoch_order(num_items: int, seed: int, epoch: int, rank: int, world_size: int) -> np.ndarray:
    """The items rank ``rank`` of ``world_size`` visits in ``epoch`` (training; equal length on every rank).

    Returns:
        int64 ``[num_items // world_size]`` item indices.

    Raises:
        ValueError: fewer items than ranks, or a bad rank.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    per_rank = num_items // world_size
    if per_rank == 0:
        raise ValueError(f"{num_items} training item(s) cannot feed {world_size} rank(s)")
    perm = np.random.default_rng([seed, epoch]).permutation(num_items)
    return perm[rank::world_size][:per_rank].astype(np.int64)


def steps_per_epoch(num_items: int, world_size: int, batch_size: int) -> int:
    """Batches per epoch on every rank: ``max(1, (num_items // world_size) // batch_size)``.

    A rank's items past the last full batch sit out the epoch (when it has at least one full batch).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return max(1, (num_items // world_size) // batch_size)


def eval_ranges(num_items: int, rank: int, world_size: int) -> range:
    """Contiguous item range of ``rank`` for evaluation: the ranges of all ranks cover every item once."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    base, extra = divmod(num_items, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


@dataclass
class TaskStream:
    """Batches of one task for one rank, reproducible from its position ``(epoch, batch)``.

    Args:
        source: the items.
        batch_size: items per batch on this rank.
        seed, rank, world_size: see `epoch_order`.
        with_cls_prob: passed to `collate`.
    """

    source: ItemSource
    batch_size: int
    seed: int
    rank: int
    world_size: int
    with_cls_prob: bool = False
    epoch: int = 0
    batch: int = 0

    def __post_init__(self) -> None:
        self.steps_per_epoch = steps_per_epoch(len(self.source), self.world_size, self.batch_size)
        epoch_order(len(self.source), self.seed, 0, self.rank, self.world_size)  # validates the sizes

    @property
    def position(self) -> dict[str, int]:
        """``{"epoch": e, "batch": b}``: the next batch to produce (a plain dict, for checkpoints)."""
        return {"epoch": self.epoch, "batch": self.batch}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.batch = int(position["epoch"]), int(position["batch"])

    def next_batch(self) -> Batch:
        """Collate the next batch and advance the position."""
        order = epoch_order(len(self.source), self.seed, self.epoch, self.rank, self.world_size)
        items = order[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        batch = collate([self.source.sample(int(i)) for i in items], self.with_cls_prob)
        self.batch += 1
        if self.batch >= self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return batch
