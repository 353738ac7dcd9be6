"""The model's input batch: region features, boxes and token ids, one device, one dataclass.

`model/data.py` builds these from a feature store; the model never sees Arrow or numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    """One training or evaluation batch; every tensor lives on the same device.

    Attributes:
        features: float32 ``[B, N, D]`` region features. No global image region: the model adds it.
            Rows past ``region_mask`` are padding and may hold anything finite or not.
        boxes_xyxy_px: float32 ``[B, N, 4]`` region boxes, ``(x1, y1, x2, y2)`` in original-image pixels.
        image_size_px: float32 ``[B, 2]`` image ``(width, height)`` in pixels.
        region_mask: bool ``[B, N]``, True = real region.
        input_ids: int64 ``[B, T]`` WordPiece ids ``[CLS] ... [SEP]`` padded with 0. For VQA batches this holds
            the question; for caption batches it may hold the caption (the decoder does not read it).
        token_mask: bool ``[B, T]``, True = real token (``[CLS]`` and ``[SEP]`` included).
        image_index: int64 ``[B]`` global row index of the image in the store; rows with equal values show the
            same image (used to sample image–text negatives and to score retrieval).
        cls_prob: optional float32 ``[B, N, 1601]`` detector class distribution per region (1600 Visual Genome
            classes + background), when the store has it; the target of masked region modelling.
        vqa_targets: optional float32 ``[B, A]`` VQA soft scores in ``[0, 1]`` over the answer vocabulary.
        caption_ids: optional int64 ``[B, T_c]`` caption targets ``[CLS] ... [SEP]`` padded with 0.
        caption_mask: optional bool ``[B, T_c]``, True = real caption token.
    """

    features: torch.Tensor
    boxes_xyxy_px: torch.Tensor
    image_size_px: torch.Tensor
    region_mask: torch.Tensor
    input_ids: torch.Tensor
    token_mask: torch.Tensor
    image_index: torch.Tensor
    cls_prob: torch.Tensor | None = None
    vqa_targets: torch.Tensor | None = None
    caption_ids: torch.Tensor | None = None
    caption_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Return a copy with every tensor moved to ``device`` (None fields stay None)."""
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return Batch(**moved)

    @property
    def batch_size(self) -> int:
        """Number of image–text pairs ``B``."""
        return int(self.features.shape[0])

    def replace(self, **changes: torch.Tensor | None) -> Batch:
        """Return a shallow copy with the given fields replaced (tensors are not copied)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = set(changes) - set(values)
        if unknown:
            raise ValueError(f"Batch has no field(s) {sorted(unknown)}")
        values.update(changes)
        return Batch(**values)

    def validate(self) -> None:
        """Check shapes, dtypes and masks; raise ``ValueError`` naming the first problem.

        Requires ``[CLS]`` to be real in every row (``token_mask[:, 0]``), so every token row has a key to attend.
        """
        b, n = self.region_mask.shape
        t = self.input_ids.shape[1]
        expected = {
            "features": (self.features, (b, n), torch.float32),
            "boxes_xyxy_px": (self.boxes_xyxy_px, (b, n, 4), torch.float32),
            "image_size_px": (self.image_size_px, (b, 2), torch.float32),
            "region_mask": (self.region_mask, (b, n), torch.bool),
            "input_ids": (self.input_ids, (b, t), torch.int64),
            "token_mask": (self.token_mask, (b, t), torch.bool),
            "image_index": (self.image_index, (b,), torch.int64),
        }
        for name, (tensor, shape, dtype) in expected.items():
            if tuple(tensor.shape[: len(shape)]) != shape or tensor.dtype != dtype:
                raise ValueError(
                    f"Batch.{name}: expected {dtype} with leading shape {shape}, "
                    f"got {tensor.dtype} {tuple(tensor.shape)}"
                )
        if self.features.dim() != 3:
            raise ValueError(f"Batch.features must be [B, N, D], got {tuple(self.features.shape)}")
        if t == 0 or not bool(self.token_mask[:, 0].all()):
            raise ValueError("Batch.token_mask[:, 0] must be True ([CLS] present in every row)")
        if self.cls_prob is not None and tuple(self.cls_prob.shape[:2]) != (b, n):
            raise ValueError(f"Batch.cls_prob must be [B, N, C], got {tuple(self.cls_prob.shape)}")
        if self.vqa_targets is not None and self.vqa_targets.shape[0] != b:
            raise ValueError(f"Batch.vqa_targets must be [B, A], got {tuple(self.vqa_targets.shape)}")
        if (self.caption_ids is None) != (self.caption_mask is None):
            raise ValueError("Batch.caption_ids and Batch.caption_mask must be given together")
        if self.caption_ids is not None and self.caption_mask is not None:
            if self.caption_ids.shape != self.caption_mask.shape or self.caption_ids.shape[0] != b:
                raise ValueError("Batch.caption_ids and Batch.caption_mask must both be [B, T_c]")
