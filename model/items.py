"""Items of each task, their collation into `model.batch.Batch`, and per-rank ordering (training and evaluation).

Rank sharding (`epoch_order`, `eval_ranges`):
    * training: each epoch is a permutation of the split drawn from ``numpy.random.default_rng([seed, epoch])``;
      rank ``r`` of ``W`` takes ``perm[r::W]`` cut to ``len // W`` items, so every rank has the same number of items
      and the same number of steps (up to ``W - 1`` items sit out an epoch; a different set every epoch). A data
      position is just ``(epoch, batch)``: resuming needs no iterator state.
    * evaluation: contiguous ranges covering every item exactly once (sizes differ by at most one).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from model.batch import Batch
from model.data import StoreImages, VisualRow

if TYPE_CHECKING:
    from model.config import ModelConfig
    from model.train_config import TrainConfig

PAD_TOKEN_ID = 0  # BERT [PAD]; Batch.input_ids is padded with it
TokenIds = Sequence[int] | np.ndarray  # [CLS] ... [SEP] WordPiece ids: a list, or an int32 view of the store


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
    input_ids: TokenIds
    image_index: int
    vqa_target: np.ndarray | None = None
    caption_ids: TokenIds | None = None


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


def _pad_tokens(sequences: Sequence[TokenIds]) -> tuple[torch.Tensor, torch.Tensor]:
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
        self._cached_epoch, self._cached_order = -1, np.zeros(0, dtype=np.int64)

    @property
    def position(self) -> dict[str, int]:
        """``{"epoch": e, "batch": b}``: the next batch to produce (a plain dict, for checkpoints)."""
        return {"epoch": self.epoch, "batch": self.batch}

    def restore(self, position: dict[str, int]) -> None:
        self.epoch, self.batch = int(position["epoch"]), int(position["batch"])

    def _order(self) -> np.ndarray:
        if self._cached_epoch != self.epoch:  # one permutation per epoch, not one per batch
            self._cached_order = epoch_order(
                len(self.source), self.seed, self.epoch, self.rank, self.world_size
            )
            self._cached_epoch = self.epoch
        return self._cached_order

    def next_batch(self) -> Batch:
        """Collate the next batch and advance the position."""
        order = self._order()
        items = order[self.batch * self.batch_size : (self.batch + 1) * self.batch_size]
        batch = collate([self.source.sample(int(i)) for i in items], self.with_cls_prob)
        self.batch += 1
        if self.batch >= self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0
        return batch


# ------------------------------------------------------------------------------------------ task sources
def training_sources(
    images: StoreImages,
    config: TrainConfig,
    model_config: ModelConfig,
    vocab: list[str],
    tokenize: Callable[[list[str]], list[list[int]]] | None = None,
) -> dict[str, ItemSource]:
    """The training items of every task of ``config.tasks`` (training split only).

    Args:
        images: the store.
        config: the run (split fraction, VQA files).
        model_config: caption length.
        vocab: VQA answer vocabulary (targets are soft scores over it).
        tokenize: questions -> ``[CLS] ... [SEP]`` ids (the caption tokenizer at ``config.max_question_tokens``);
            needed when ``config.tasks`` holds "vqa".
    """
    train_images = images.split_indices("train", config.holdout_fraction)
    sources: dict[str, ItemSource] = {}
    for task in config.tasks:
        if task == "vqa":
            if tokenize is None:
                raise ValueError("task vqa needs a question tokenizer")
            sources[task] = vqa_items(images, config, vocab, "train", tokenize)
        else:
            caption = task == "caption"
            sources[task] = CaptionPairs(
                images, train_images, caption, model_config.max_caption_tokens if caption else 0
            )
    return sources


def vqa_split(images: StoreImages, held: np.ndarray, questions: str, annotations: str) -> dict[str, Any]:
    """VQA questions of the store's images by split (``model.vqa.split_questions``)."""
    from model.vqa import load_vqa, split_questions

    return split_questions(load_vqa(questions, annotations), images.image_ids(), held)


def vqa_items(
    images: StoreImages,
    config: TrainConfig,
    vocab: list[str],
    split: str,
    tokenize: Callable[[list[str]], list[list[int]]],
) -> QuestionItems:
    """VQA items of ``split`` with soft-score targets over ``vocab`` (questions tokenised by ``tokenize``)."""
    from model.vqa import soft_targets

    held = images.split_mask(config.holdout_fraction)
    part = vqa_split(images, held, config.vqa_questions, config.vqa_annotations)[split]
    ids = tokenize([q.question for q in part.questions])
    index = {a: i for i, a in enumerate(vocab)}
    targets = np.stack([soft_targets(q, index) for q in part.questions]) if part.questions else None
    return QuestionItems(images, ids, part.image_index, targets)
