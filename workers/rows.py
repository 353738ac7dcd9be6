"""Samples → chunks → store rows: the per-shard work of ``regionflow extract`` without Ray (docs/design.md §4, §5).

Two stages, each a plain function or class that ``pipelines/extract.py`` wraps with ``ray.remote``:

1. ``shard_chunks`` (CPU): reads one shard in source order with ``workers.read.reader.ShardReader``, tokenizes
   every decoded sample's captions, and yields ``ShardChunk`` objects of at most ``batch_size`` decoded
   images each (error samples ride along in their source position). The last chunk carries the shard's
   member counts. Memory per shard is bounded by one chunk, however large the shard.
2. ``RegionRowBuilder.process`` (detector): runs the detector on a chunk's images (``RegionDetector``
   runs each image's trunk alone, unpadded, and batches only its RoI head in fixed-shape chunks, so an image's
   features never depend on which other images share its chunk), and turns every (sample, tokens, detector output) into one row of
   ``schemas.store.row_schema(D)``. A detector output that cannot be stored (non-finite values, a feature
   beyond the float16 range, a box outside its image or empty, no box at all) becomes an error row with
   reason ``detector_output_invalid`` instead of a row; the shard goes on.

Boxes are ``xyxy`` in original-image pixels (float32); features are stored as float16 ``[N, D]``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from schemas.reasons import ErrorReason
from schemas.store import NUM_OBJECT_OUTPUTS, boxes_not_inside, row_schema

if TYPE_CHECKING:
    from workers.detect.detector import RegionDetector, RegionOutput
    from workers.read.reader import DecodedSample, MemberCounts, ReaderConfig, SampleError
    from workers.read.tokenizer import CaptionTokenizer, TokenizedCaptions

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504: larger magnitudes become inf in the store
MAX_ERRORS_PER_CHUNK = 1024  # a chunk also closes after this many error samples (bounded memory)


@dataclass(frozen=True)
class ReadSample:
    """A decoded sample and its tokenized captions (``tokens.input_ids[i]`` belongs to ``captions[i]``)."""

    sample: DecodedSample
    tokens: TokenizedCaptions


@dataclass(frozen=True)
class ShardChunk:
    """A run of consecutive samples of one shard, in source order.

    Attributes:
        shard: shard id.
        index: position of this chunk in the shard's chunk stream (0, 1, ...).
        items: decoded samples (``ReadSample``) and samples that failed reading (``SampleError``), in the
            order the shard holds them; at most ``batch_size`` decoded samples.
        counts: the shard's member counts; set on the last chunk only (which may hold no items).
    """

    shard: str
    index: int
    items: tuple[ReadSample | SampleError, ...]
    counts: MemberCounts | None

    @property
    def is_last(self) -> bool:
        return self.counts is not None


@dataclass(frozen=True)
class ErrorRow:
    """One row of a shard's error table (``schemas.store.error_schema``)."""

    key: str
    member_names: tuple[str, ...]
    reason: str
    detail: str


@dataclass(frozen=True)
class ChunkRows:
    """What one chunk became.

    Attributes:
        shard, index, counts: as in ``ShardChunk``.
        rows: ``row_schema(D)`` table, one row per stored image, in source order.
        errors: error rows in source order (reading failures and invalid detector outputs).
        members_used: tar members of the samples in ``rows``.
        members_in_errors: tar members of the samples in ``errors``.
        busy_s: wall seconds ``process`` took (detector + row building), for efficiency reports.
    """

    shard: str
    index: int
    rows: pa.Table
    errors: tuple[ErrorRow, ...]
    members_used: int
    members_in_errors: int
    counts: MemberCounts | None
    busy_s: float = 0.0


@dataclass(frozen=True)
class ChunkStats:
    """The few numbers of a ``ChunkRows`` the scheduler needs (it never receives the rows themselves).

    Attributes:
        shard, index, counts: as in ``ShardChunk``.
        rows: rows built; error_reasons: error rows per reason (sorted).
        members_used, members_in_errors: as in ``ChunkRows``.
        images: decoded images the chunk held (rows and images whose detector output was refused).
        busy_s: as in ``ChunkRows``.
    """

    shard: str
    index: int
    rows: int
    error_reasons: tuple[tuple[str, int], ...]
    members_used: int
    members_in_errors: int
    images: int
    counts: MemberCounts | None
    busy_s: float

    @property
    def errors(self) -> int:
        return sum(n for _, n in self.error_reasons)

    @classmethod
    def of(cls, chunk: ChunkRows) -> ChunkStats:
        reasons = Counter(str(e.reason) for e in chunk.errors)
        rejected = reasons.get(str(ErrorReason.DETECTOR_OUTPUT_INVALID), 0)
        return cls(
            chunk.shard,
            chunk.index,
            chunk.rows.num_rows,
            tuple(sorted(reasons.items())),
            chunk.members_used,
            chunk.members_in_errors,
            chunk.rows.num_rows + rejected,
            chunk.counts,
            chunk.busy_s,
        )


def shard_chunks(
    url: str, reader_config: ReaderConfig, tokenizer: CaptionTokenizer, batch_size: int
) -> Iterator[ShardChunk]:
    """Read, decode and tokenize one shard, yielding ``ShardChunk`` s in source order.

    Args:
        url: shard URL (local path, ``s3://``...).
        reader_config: passed whole to ``ShardReader``.
        tokenizer: encodes each decoded sample's captions.
        batch_size: decoded images per chunk (>= 1).

    Raises:
        ShardReadError: the shard cannot be read (propagated from the reader, URL in the message).
        ValueError: ``batch_size < 1``.
    """
    from workers.read.reader import SampleError, ShardReader, shard_id_of

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    shard = shard_id_of(url)
    reader = ShardReader(url, reader_config)
    items: list[ReadSample | SampleError] = []
    decoded = errors = index = 0
    for item in reader:
        if isinstance(item, SampleError):
            items.append(item)
            errors += 1
        else:
            items.append(ReadSample(item, tokenizer.encode(list(item.captions))))
            decoded += 1
        if decoded >= batch_size or errors >= MAX_ERRORS_PER_CHUNK:
            yield ShardChunk(shard, index, tuple(items), None)
            items, decoded, errors, index = [], 0, 0, index + 1
    yield ShardChunk(shard, index, tuple(items), reader.counts())


class RegionRowBuilder:
    """Runs the detector on chunks and turns its outputs into store rows.

    Args:
        detector: a built ``RegionDetector`` (its box-selection mode decides ``box_source``).
        box_source: ``"detector"`` or ``"given"`` (written in every row).
        with_cls_prob: store the ``[N, 1601]`` class distribution (the detector must produce it).
    """

    def __init__(self, detector: RegionDetector, *, box_source: str, with_cls_prob: bool) -> None:
        self.detector = detector
        self.box_source = box_source
        self.with_cls_prob = with_cls_prob
        self.schema = row_schema(detector.feature_dim)

    def process(self, chunk: ShardChunk) -> ChunkRows:
        """Detect regions for every decoded sample of ``chunk`` and build its rows and error rows."""
        start = time.perf_counter()
        outputs = self._detect([i for i in chunk.items if isinstance(i, ReadSample)])
        kept: list[tuple[ReadSample, RegionOutput]] = []
        errors: list[ErrorRow] = []
        members_used = members_in_errors = 0
        for item in chunk.items:
            if not isinstance(item, ReadSample):
                errors.append(ErrorRow(item.key, tuple(item.member_names), str(item.reason), item.detail))
                members_in_errors += len(item.member_names)
                continue
            output = outputs[id(item)]
            problem = output_problem(output, item.sample.width_px, item.sample.height_px, self.with_cls_prob)
            if problem is None:
                kept.append((item, output))
                members_used += len(item.sample.member_names)
            else:
                reason = str(ErrorReason.DETECTOR_OUTPUT_INVALID)
                if output.no_box_reason is not None:  # the detector says why it has no box (image_too_small)
                    reason, problem = str(output.no_box_reason[0]), output.no_box_reason[1]
                errors.append(ErrorRow(item.sample.key, tuple(item.sample.member_names), reason, problem))
                members_in_errors += len(item.sample.member_names)
        rows = build_rows(kept, self.schema, self.box_source, self.with_cls_prob)
        return ChunkRows(
            chunk.shard,
            chunk.index,
            rows,
            tuple(errors),
            members_used,
            members_in_errors,
            chunk.counts,
            time.perf_counter() - start,
        )

    def _detect(self, samples: Sequence[ReadSample]) -> dict[int, RegionOutput]:
        """Detector outputs by ``id(sample)``. ``RegionDetector.extract`` never pads an image nor mixes it with
        another in the trunk, so an image's features do not depend on the other images of the chunk."""
        images = [item.sample.image_rgb for item in samples]
        given = [item.sample.given_boxes_xyxy_px for item in samples] if self.box_source == "given" else None
        outputs = self.detector.extract(images, given) if samples else []
        return {id(item): output for item, output in zip(samples, outputs, strict=True)}


def output_problem(output: RegionOutput, width_px: int, height_px: int, with_cls_prob: bool) -> str | None:
    """Why ``output`` cannot become a row (deterministic text), or None when it can.

    Checked: at least one box; every array finite; features within the float16 range (``|x| <= 65504``);
    boxes inside the image, ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``; class probabilities present
    when ``with_cls_prob``.
    """
    boxes = output.boxes_xyxy_px
    if boxes.shape[0] == 0:
        return "the detector returned no box"
    arrays = {
        "boxes_xyxy_px": boxes,
        "features": output.features,
        "object_conf": output.object_conf,
        "attribute_conf": output.attribute_conf,
        "cls_prob": output.cls_prob,
    }
    for name, values in arrays.items():
        if values is not None and not np.isfinite(values).all():
            return f"non-finite value in {name}"
    peak = float(np.abs(output.features).max())
    if peak > FLOAT16_MAX:
        return f"feature magnitude {peak:.6g} exceeds the float16 range ({FLOAT16_MAX:g})"
    outside = boxes_not_inside(boxes, width_px, height_px)
    if outside.any():
        box = int(np.flatnonzero(outside)[0])
        return f"box {box} {boxes[box].tolist()} is empty or outside the {width_px}x{height_px} image"
    if with_cls_prob and output.cls_prob is None:
        return "class probabilities requested but the detector returned none"
    return None


@dataclass(frozen=True)
class StoreRow:
    """One image's values before they become a ``row_schema(D)`` row: the one shape every row builder of the
    project goes through (extract's detector outputs, import's records).

    Attributes:
        key, shard: identity (docs/design.md §9).
        image_id: from the sample, or None.
        width_px, height_px: original image size in pixels.
        boxes_xyxy_px: float ``[N, 4]`` xyxy in original-image pixels (stored float32).
        features: float ``[N, D]`` (stored float16; callers check the range first).
        object_ids, object_conf: ``[N]`` class ids (int16, 0 = background) and confidences (float32).
        attribute_ids, attribute_conf: ``[N]`` or None without an attribute head (then for every row).
        cls_prob: float ``[N, 1601]`` or None (stored float16; a null cell when None).
        captions: the image's captions; input_ids, captions_truncated: one entry per caption.
    """

    key: str
    shard: str
    image_id: int | None
    width_px: int
    height_px: int
    boxes_xyxy_px: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray
    object_conf: np.ndarray
    attribute_ids: np.ndarray | None
    attribute_conf: np.ndarray | None
    cls_prob: np.ndarray | None
    captions: Sequence[str]
    input_ids: Sequence[Sequence[int]]
    captions_truncated: Sequence[bool]


def build_rows(
    kept: Sequence[tuple[ReadSample, RegionOutput]], schema: pa.Schema, box_source: str, with_cls_prob: bool
) -> pa.Table:
    """One ``schema`` row per (sample, detector output), in the given order (``arrow_rows``).

    Features and class probabilities are cast to float16 (callers check the range with
    ``output_problem`` first). Attribute columns are null when the detector has no attribute head.
    """
    rows = [
        StoreRow(
            key=item.sample.key,
            shard=item.sample.shard,
            image_id=item.sample.image_id,
            width_px=item.sample.width_px,
            height_px=item.sample.height_px,
            boxes_xyxy_px=output.boxes_xyxy_px,
            features=output.features,
            object_ids=output.object_ids,
            object_conf=output.object_conf,
            attribute_ids=output.attribute_ids,
            attribute_conf=output.attribute_conf,
            cls_prob=output.cls_prob if with_cls_prob else None,
            captions=item.sample.captions,
            input_ids=item.tokens.input_ids,
            captions_truncated=item.tokens.truncated,
        )
        for item, output in kept
    ]
    return arrow_rows(rows, schema, box_source)


def arrow_rows(rows: Sequence[StoreRow], schema: pa.Schema, box_source: str) -> pa.Table:
    """The ``schema`` (``row_schema(D)``) table of ``rows``, in order: the only row builder (extract and
    import both use it).

    Raises:
        ValueError: some rows have attributes and others not.
    """
    lengths = np.array([r.boxes_xyxy_px.shape[0] for r in rows], dtype=np.int64)
    feature_dim = schema.field("features").type.value_type.list_size
    n = len(rows)
    columns = {
        "key": pa.array([r.key for r in rows], pa.string()),
        "shard": pa.array([r.shard for r in rows], pa.string()),
        "image_id": pa.array([r.image_id for r in rows], pa.int64()),
        "image_width_px": pa.array([r.width_px for r in rows], pa.int32()),
        "image_height_px": pa.array([r.height_px for r in rows], pa.int32()),
        "num_boxes": pa.array(lengths.astype(np.int32), pa.int32()),
        "boxes_xyxy_px": _per_box_vectors([r.boxes_xyxy_px for r in rows], lengths, np.float32, 4),
        "features": _per_box_vectors([r.features for r in rows], lengths, np.float16, feature_dim),
        "object_ids": _per_box_scalars([r.object_ids for r in rows], lengths, np.int16),
        "object_conf": _per_box_scalars([r.object_conf for r in rows], lengths, np.float32),
        "attribute_ids": _optional_scalars([r.attribute_ids for r in rows], lengths, np.int16),
        "attribute_conf": _optional_scalars([r.attribute_conf for r in rows], lengths, np.float32),
        "cls_prob": _cls_prob_column([r.cls_prob for r in rows], lengths, schema.field("cls_prob").type),
        "box_source": pa.array([box_source] * n, pa.string()),
        "captions": pa.array([list(r.captions) for r in rows], pa.list_(pa.string())),
        "input_ids": pa.array([[list(i) for i in r.input_ids] for r in rows], pa.list_(pa.list_(pa.int32()))),
        "captions_truncated": pa.array([list(r.captions_truncated) for r in rows], pa.list_(pa.bool_())),
    }
    return pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)


def _cls_prob_column(arrays: Sequence[np.ndarray | None], lengths: np.ndarray, kind: pa.DataType) -> pa.Array:
    """``large_list<fixed_size_list<float16, 1601>>``: nulls when no row has class probabilities; a null
    cell for each row without them otherwise."""
    present = np.array([a is not None for a in arrays], dtype=bool)
    if not present.any():
        return pa.nulls(len(arrays), kind)
    kept = [a for a in arrays if a is not None]
    column = _per_box_vectors(kept, lengths * present, np.float16, NUM_OBJECT_OUTPUTS)
    if present.all():
        return column
    return pa.LargeListArray.from_arrays(column.offsets, column.values, mask=pa.array(~present))


def _offsets(lengths: np.ndarray, dtype: type) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(dtype)


def _flat(arrays: Sequence[np.ndarray], dtype: type, width: int | None) -> np.ndarray:
    shape = (0,) if width is None else (0, width)
    if not arrays:
        return np.zeros(shape, dtype)
    return np.concatenate(
        [np.asarray(a, dtype=dtype).reshape((-1,) if width is None else (-1, width)) for a in arrays]
    )


def _per_box_vectors(arrays: Sequence[np.ndarray], lengths: np.ndarray, dtype: type, width: int) -> pa.Array:
    """``large_list<fixed_size_list<dtype, width>>`` from per-row ``[N_i, width]`` arrays."""
    values = pa.array(_flat(arrays, dtype, width).reshape(-1))
    return pa.LargeListArray.from_arrays(
        pa.array(_offsets(lengths, np.int64)), pa.FixedSizeListArray.from_arrays(values, width)
    )


def _per_box_scalars(arrays: Sequence[np.ndarray], lengths: np.ndarray, dtype: type) -> pa.Array:
    """``list<dtype>`` from per-row ``[N_i]`` arrays."""
    return pa.ListArray.from_arrays(
        pa.array(_offsets(lengths, np.int32)), pa.array(_flat(arrays, dtype, None))
    )


def _optional_scalars(arrays: Sequence[np.ndarray | None], lengths: np.ndarray, dtype: type) -> pa.Array:
    """Like ``_per_box_scalars``, or all nulls when the detector has no attribute head."""
    present = [a is not None for a in arrays]
    if not any(present):
        return pa.nulls(len(arrays), pa.list_(pa.from_numpy_dtype(dtype)))
    if not all(present):
        raise ValueError("attributes given for some rows and not others (all or none)")
    return _per_box_scalars([a for a in arrays if a is not None], lengths, dtype)
