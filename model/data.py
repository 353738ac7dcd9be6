"""Store access for training and evaluation: image rows by global index, read record batch by record batch with
memory that does not grow with the store, and the deterministic train / held-out split.

Split rule (`HASH_RULE`): an image is held out when the first 8 bytes of ``sha256(shard + "\\0" + key)``, read as
a big-endian unsigned integer and divided by ``2**64``, are below ``holdout_fraction``. It depends on the image's
identity only (not on the store's other rows, the worker count or a seed), so adding shards never moves an image
between splits, and every caption and VQA question of an image follows the image.

Memory (docs/design.md §5): a part file is never read whole nor concatenated. Opening a store reads, per record
batch, only the small columns that index it (``key``, the caption offsets, ``image_id``): the split mask and the
caption counts are numpy arrays of a few bytes per image. Features, boxes, ``cls_prob``, captions and token ids
are read when an item needs them, as numpy views of one record batch's Arrow buffers (offsets and values):
    * local store: the part is memory-mapped; views point into the page cache (no anonymous copy);
    * object storage: ranged reads of one record batch's needed columns (``IpcReadOptions.included_fields``:
      Arrow reads only those buffers), kept in an LRU bounded by ``remote_cache_bytes``.
Region features stay float16 until collation (float32 in the batch). No global image region is added here: the
model adds it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

HASH_RULE = "sha256(shard + '\\0' + key)[:8] as big-endian uint64 / 2**64 < holdout_fraction -> held-out"
DEFAULT_HOLDOUT_FRACTION = 0.2
SPLITS = ("train", "heldout")
INDEX_COLUMNS = ("key", "image_id", "captions")  # read for every row when a store is opened
VISUAL_COLUMNS = ("features", "boxes_xyxy_px", "cls_prob", "image_width_px", "image_height_px")
TEXT_COLUMNS = ("key", "captions", "input_ids")
DEFAULT_REMOTE_CACHE_BYTES = 256 * 2**20  # decoded record-batch columns kept per process on object storage
LOCAL_VIEWS_KEPT = 64  # record-batch views kept per process on a local store (views only: no data copied)
# local store: after this many visual rows, the mapped pages are released (StoreReader.release_mapped_pages): the
# kernel maps a large folio (~0.65 MB measured) per random 147 KB butd row, so a rank's RSS/PSS would otherwise
# grow with the rows it has read, up to the store's size
RELEASE_MAPPED_EVERY_ROWS = 16


class EmptyStoreError(ValueError):
    """A store with no committed rows (no shard, or only empty shards)."""


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

    def part_file(self, shard: str, columns: tuple[str, ...] | None = None) -> ipc.RecordBatchFileReader: ...

    def part_is_local(self) -> bool: ...

    def release_mapped_pages(self) -> None: ...


@dataclass(frozen=True)
class VisualRow:
    """The visual part of one image row (numpy views into the record batch's buffers).

    Attributes:
        features: float16 ``[n, D]`` region features.
        boxes_xyxy_px: float32 ``[n, 4]`` boxes, xyxy in original-image pixels.
        image_size_px: float32 ``[2]`` ``(width, height)`` in pixels.
        cls_prob: float16 ``[n, 1601]`` detector class distribution, or None when the row has none.
    """

    features: np.ndarray
    boxes_xyxy_px: np.ndarray
    image_size_px: np.ndarray
    cls_prob: np.ndarray | None


def _values(array: pa.Array, dtype: Any, buffer: int = 1, extra: int = 0) -> np.ndarray:
    """A numpy view of a fixed-width buffer of ``array`` (its slice: ``len + extra`` items from its offset).

    Built from the buffer itself: pyarrow's ``to_numpy`` imports pandas (about 35 MiB of anonymous memory).
    """
    data = array.buffers()[buffer]
    if data is None:
        return np.zeros(len(array) + extra, dtype=dtype)
    return np.frombuffer(data, dtype=dtype)[array.offset : array.offset + len(array) + extra]


def _list_offsets(array: pa.Array) -> np.ndarray:
    """int64 ``[len + 1]`` offsets of a (large_)list or string array, into its unsliced values."""
    large = pa.types.is_large_list(array.type) or pa.types.is_large_string(array.type)
    return _values(array, np.int64 if large else np.int32, extra=1).astype(np.int64)


class _Ragged:
    """Rows of one record batch's ``large_list<fixed_size_list<T, width>>`` column as zero-copy numpy slices."""

    def __init__(self, array: pa.Array, width: int) -> None:
        self.offsets = _list_offsets(array)
        self.valid = np.ones(len(array), dtype=bool) if array.null_count == 0 else ~_nulls(array)
        inner = array.values  # FixedSizeListArray, unsliced
        flat = np.frombuffer(inner.values.buffers()[1], dtype=inner.values.type.to_pandas_dtype())
        flat = flat[inner.values.offset :]
        self.values = flat[inner.offset * width :].reshape(-1, width)

    def row(self, i: int) -> np.ndarray:
        """Row ``i`` as ``[n, width]`` (a non-null entry: schema v1 makes features and boxes non-null)."""
        assert self.valid[i], "row() on a null entry"
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def row_or_none(self, i: int) -> np.ndarray | None:
        return self.row(i) if self.valid[i] else None


def _nulls(array: pa.Array) -> np.ndarray:
    bits = np.frombuffer(array.buffers()[0], dtype=np.uint8)
    valid = np.unpackbits(bits, bitorder="little")[array.offset : array.offset + len(array)]
    return valid == 0


class _VisualBatch:
    """The visual columns of one record batch (views)."""

    def __init__(self, batch: pa.RecordBatch, feature_dim: int) -> None:
        self.features = _Ragged(batch.column("features"), feature_dim)
        self.boxes = _Ragged(batch.column("boxes_xyxy_px"), 4)
        cls_prob = batch.column("cls_prob")
        width = cls_prob.type.value_type.list_size
        self.cls_prob = _Ragged(cls_prob, width) if cls_prob.null_count < len(cls_prob) else None
        widths = _values(batch.column("image_width_px"), np.int32)
        heights = _values(batch.column("image_height_px"), np.int32)
        self.sizes = np.stack([widths, heights], axis=1).astype(np.float32)


class _TextBatch:
    """Keys, captions and token ids of one record batch as offsets and values views (no Python lists)."""

    def __init__(self, batch: pa.RecordBatch) -> None:
        captions = batch.column("captions")  # list<string>
        offsets = _list_offsets(captions)
        self.caption_offsets = offsets - offsets[0]
        strings = captions.flatten()
        offsets_buffer = np.frombuffer(strings.buffers()[1], dtype=np.int32)
        self.string_offsets = offsets_buffer[
            strings.offset : strings.offset + len(strings) + 1
        ]  # into the data
        self.string_bytes = np.frombuffer(strings.buffers()[2] or b"", dtype=np.uint8)
        ids = batch.column("input_ids")  # list<list<int32>>
        offsets = _list_offsets(ids)
        self.id_offsets = offsets - offsets[0]
        inner = ids.flatten()
        offsets = _list_offsets(inner)
        self.token_offsets = offsets - offsets[0]
        self.token_values = _values(inner.flatten(), np.int32)

    def captions(self, row: int) -> list[str]:
        lo, hi = self.caption_offsets[row], self.caption_offsets[row + 1]
        data = self.string_bytes
        return [
            bytes(data[self.string_offsets[j] : self.string_offsets[j + 1]]).decode() for j in range(lo, hi)
        ]

    def caption_ids(self, row: int) -> list[np.ndarray]:
        lo, hi = self.id_offsets[row], self.id_offsets[row + 1]
        offsets = self.token_offsets
        return [self.token_values[offsets[j] : offsets[j + 1]] for j in range(lo, hi)]


class _Part:
    """One committed shard's part file: its record-batch boundaries, opened per column group on demand."""

    def __init__(self, store: StoreLike, shard: str, feature_dim: int, cache: _BatchCache) -> None:
        self.store, self.shard, self.feature_dim, self.cache = store, shard, feature_dim, cache
        self._files: dict[str, ipc.RecordBatchFileReader] = {}
        index = self._file("index")
        keys, image_ids, counts, lengths = [], [], [], []
        for b in range(index.num_record_batches):
            batch = index.get_batch(b)
            lengths.append(batch.num_rows)
            keys.append(batch.column("key"))
            image_ids.append(batch.column("image_id"))
            counts.append(np.diff(_list_offsets(batch.column("captions"))))
        self.batch_starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
        self.num_rows = int(self.batch_starts[-1])
        self.caption_counts = np.concatenate(counts).astype(np.int32) if counts else np.zeros(0, np.int32)
        self._index_columns = (keys, image_ids)  # views (local) or small column copies (object storage)

    def _file(self, group: str) -> ipc.RecordBatchFileReader:
        if group not in self._files:
            columns = {"index": INDEX_COLUMNS, "visual": VISUAL_COLUMNS, "text": TEXT_COLUMNS}[group]
            self._files[group] = self.store.part_file(self.shard, columns)
        return self._files[group]

    def locate(self, row: int) -> tuple[int, int]:
        b = int(np.searchsorted(self.batch_starts, row, side="right")) - 1
        return b, row - int(self.batch_starts[b])

    def keys(self) -> list[str]:
        return [k for column in self._index_columns[0] for k in column.to_pylist()]

    def image_ids(self) -> list[int | None]:
        return [i for column in self._index_columns[1] for i in column.to_pylist()]

    def key(self, row: int) -> str:
        b, r = self.locate(row)
        return str(self._index_columns[0][b][r].as_py())

    def visual(self, b: int) -> _VisualBatch:
        return self.cache.get((self.shard, "visual", b), lambda: self._load(b, "visual"))

    def text(self, b: int) -> _TextBatch:
        return self.cache.get((self.shard, "text", b), lambda: self._load(b, "text"))

    def _load(self, b: int, group: str) -> tuple[Any, int]:
        batch = self._file(group).get_batch(b)
        view = _VisualBatch(batch, self.feature_dim) if group == "visual" else _TextBatch(batch)
        return view, batch.nbytes


class _BatchCache:
    """LRU of record-batch views: bounded by bytes on object storage, by count on a local (mapped) store."""

    def __init__(self, local: bool, max_bytes: int) -> None:
        self.local, self.max_bytes = local, max_bytes
        self._views: OrderedDict[tuple[str, str, int], tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self.loads = 0
        self.bytes_loaded = 0

    def get(self, key: tuple[str, str, int], load: Any) -> Any:
        if key in self._views:
            self._views.move_to_end(key)
            return self._views[key][0]
        view, size = load()
        self.loads, self.bytes_loaded = self.loads + 1, self.bytes_loaded + size
        self._views[key] = (view, 0 if self.local else size)
        self._bytes += self._views[key][1]
        while len(self._views) > 1 and (
            len(self._views) > LOCAL_VIEWS_KEPT if self.local else self._bytes > self.max_bytes
        ):
            _, (_, dropped) = self._views.popitem(last=False)
            self._bytes -= dropped
        return view


class StoreImages:
    """Random access by global image index to the rows of every committed, non-empty shard of a store.

    The global index of row ``r`` of shard ``s`` is ``r`` plus the row counts of the shards before ``s``
    (shards sorted by id; empty shards hold no index).

    Args:
        store: a ``workers.store.StoreReader`` (see `StoreLike`).
        remote_cache_bytes: bound of the record-batch cache on object storage.

    Raises:
        EmptyStoreError: the store has no committed rows.
    """

    def __init__(self, store: StoreLike, remote_cache_bytes: int = DEFAULT_REMOTE_CACHE_BYTES) -> None:
        self.feature_dim = int(store.feature_dim)
        self.cache = _BatchCache(store.part_is_local(), remote_cache_bytes)
        self._release_mapped_pages = store.release_mapped_pages if store.part_is_local() else None
        self._rows_read = 0
        committed = list(store.shards())
        parts = [_Part(store, s, self.feature_dim, self.cache) for s in committed]
        self.empty_shard_ids = [s for s, p in zip(committed, parts, strict=True) if p.num_rows == 0]
        self._parts = [p for p in parts if p.num_rows > 0]
        self.shard_ids = [p.shard for p in self._parts]
        counts = np.array([p.num_rows for p in self._parts], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_images = int(self._starts[-1])
        if self.num_images == 0:
            raise EmptyStoreError(
                f"the store has no committed rows ({len(committed)} committed shard(s), "
                f"{len(self.empty_shard_ids)} of them empty)"
            )
        self._caption_counts = np.concatenate([p.caption_counts for p in self._parts]).astype(np.int64)
        self._visual_source: np.ndarray | None = None  # None = every image shows its own visual row
        self._features_only = False

    def _position(self, index: int) -> tuple[_Part, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"image index {index} outside [0, {self.num_images})")
        s = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._parts[s], index - int(self._starts[s])

    def identity(self, index: int) -> tuple[str, str]:
        """``(shard id, key)`` of an image."""
        part, row = self._position(index)
        return part.shard, part.key(row)

    def identities(self) -> list[tuple[str, str]]:
        """``(shard id, key)`` of every image, in global index order (a list as long as the store)."""
        return [(p.shard, k) for p in self._parts for k in p.keys()]

    def image_ids(self) -> list[int | None]:
        """The ``image_id`` column in global index order (None where null)."""
        return [i for p in self._parts for i in p.image_ids()]

    def captions(self, index: int) -> list[str]:
        """Raw caption texts of an image (decoded from the record batch's string buffers)."""
        part, row = self._position(index)
        b, r = part.locate(row)
        return part.text(b).captions(r)

    def caption_ids(self, index: int) -> list[np.ndarray]:
        """Tokenised captions of an image: int32 ``[T_i]`` views of ``[CLS] ... [SEP]`` WordPiece ids, unpadded."""
        part, row = self._position(index)
        b, r = part.locate(row)
        return part.text(b).caption_ids(r)

    def num_captions(self) -> np.ndarray:
        """int64 ``[num_images]`` caption count per image (computed once, from the caption offsets)."""
        return self._caption_counts

    def split_mask(self, holdout_fraction: float) -> np.ndarray:
        """bool ``[num_images]``, True = held out (see `HASH_RULE`); keys are hashed shard by shard."""
        check_holdout_fraction(holdout_fraction)
        mask = np.empty(self.num_images, dtype=bool)
        for part, start in zip(self._parts, self._starts, strict=False):
            keys = part.keys()
            mask[start : start + len(keys)] = [is_heldout(part.shard, k, holdout_fraction) for k in keys]
        return mask

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
        view._visual_source = perm if self._visual_source is None else self._visual_source[perm]
        view._features_only = features_only
        return view

    def _visual_batch(self, index: int) -> tuple[_VisualBatch, int]:
        part, row = self._position(index)
        b, r = part.locate(row)
        return part.visual(b), r

    def visual(self, index: int) -> VisualRow:
        """The visual row shown for image ``index`` (its own unless a permutation view is used)."""
        source = index if self._visual_source is None else int(self._visual_source[index])
        self._rows_read += 1
        if self._release_mapped_pages is not None and self._rows_read % RELEASE_MAPPED_EVERY_ROWS == 0:
            self._release_mapped_pages()  # before this row is read: views stay valid (pages fault back in)
        own, own_row = self._visual_batch(index)
        src, src_row = self._visual_batch(source) if source != index else (own, own_row)
        if not self._features_only:
            own, own_row = src, src_row
        boxes = own.boxes.row(own_row)
        features = src.features.row(src_row)
        if features.shape[0] != boxes.shape[0]:
            features = features[np.arange(boxes.shape[0]) % max(1, features.shape[0])]
        cls_prob = None if own.cls_prob is None else own.cls_prob.row_or_none(own_row)
        return VisualRow(features, boxes, own.sizes[own_row], cls_prob)
