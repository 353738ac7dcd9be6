"""Runtime region detector: images in, selected regions out (docs/design.md §2). The worker ``pipelines/extract`` wraps.

``RegionDetector`` prepares images (``workers.detect.preprocess``), builds the network
(``workers.detect.network``) with loaded weights (``workers.detect.weights``) or a seeded random init
(``workers.detect.random_init``), runs it, and selects boxes (``workers.detect.selection``).

Batch-size independence, and the reference's features: the trunk and the RPN see each image alone at its own
resized size, never padded (as MILVLG bottom-up-attention.pytorch and the Caffe original run it; padding an
image to a size bucket changed res4 by 29-60% of its peak against MILVLG's model). Only the RoI head is
batched, on CUDA, over the pooled crops of all the images of a call in fixed-shape chunks
(``RoIHeads.forward``); on the CPU each image runs alone. So an image's outputs do not depend on which other
images share its call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from schemas.reasons import ErrorReason
from workers.detect.backbone import min_trunk_input_px
from workers.detect.config import BoxSelectionConfig, DetectorConfig
from workers.detect.network import RegionDetectorModel, RegionHeadOutput
from workers.detect.preprocess import (
    PreparedImage,
    check_given_boxes,
    check_image,
    prepare_image,
)
from workers.detect.random_init import random_init_
from workers.detect.selection import best_foreground, select_boxes, select_boxes_batch
from workers.detect.weights import load_weights, weights_digest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionOutput:
    """Regions of one image.

    Attributes:
        boxes_xyxy_px: float32 ``[N, 4]`` original-image pixels, ``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``
            (proposals in the Caffe convention, clipped to ``W - 1`` in network pixels; or the given boxes).
        features: float32 ``[N, D]`` pooled res5 features.
        object_ids: int16 ``[N]`` argmax over classes 1..1600 (background 0 never chosen).
        object_conf: float32 ``[N]`` that class's probability.
        attribute_ids: int16 ``[N]`` argmax over attributes 1..400, None without an attribute head.
        attribute_conf: float32 ``[N]``, None without an attribute head.
        cls_prob: float32 ``[N, 1601]`` class softmax, only when the detector was built with ``with_cls_prob``.
        no_box_reason: when the detector cannot give this image any box (N = 0, nothing run): the
            ``schemas.reasons.ErrorReason`` value and a deterministic detail, else None.
    """

    boxes_xyxy_px: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray
    object_conf: np.ndarray
    attribute_ids: np.ndarray | None
    attribute_conf: np.ndarray | None
    cls_prob: np.ndarray | None
    no_box_reason: tuple[ErrorReason, str] | None = None


def state_digest(model: nn.Module) -> str:
    """``"sha256:<hex>"`` over the names, dtypes, shapes and bytes of ``model.state_dict()`` (key order)."""
    sha = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        value = tensor.detach().cpu().contiguous()
        sha.update(f"{name}:{value.dtype}:{tuple(value.shape)};".encode())
        sha.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return "sha256:" + sha.hexdigest()


class RegionDetector:
    """Images in, region features out: the worker that ``pipelines/extract`` wraps in a Ray actor.

    Args:
        config: network and input scale (``detector_config(name)``).
        selection: box selection (fixed / adaptive / given).
        weights: regionflow ``.safetensors`` weights; None → seeded random init (logged as a warning).
        device: ``"cuda"``, ``"cpu"``, ...; None → CUDA when available, else CPU.
        threads: if given, ``torch.set_num_threads(threads)``.
        seed: seed of the random init.
        with_cls_prob: also return the ``[N, 1601]`` class probabilities.
        autocast_dtype: run the network under ``torch.autocast`` with this dtype (bf16 / fp16); None → float32.

    Inference layout: in float32 (no autocast) every frozen batch norm is folded into its conv
    (``RegionDetectorModel.fold_norms_``), and on the CPU the network runs ``channels_last``
    (``set_memory_format_``), so oneDNN uses its NHWC kernels. Both change results by float rounding only
    (measured on ``butd-r101-c4``: max |Δ feature| / feature std ≈ 1e-5) and, with the in-place ReLUs, take
    1.6–1.8× less CPU time per ``butd-r101-c4`` image (``bench/detector_cpu.py``); the state dict is
    unchanged. CUDA keeps the default memory format (not measured there).

    Attributes:
        random_init: True when no weights were loaded.
        weights_digest: ``"sha256:<hex>"`` of the weights file, or ``"random-init:seed=<seed>:sha256:<hex>"``
            (the hash of the initialised state dict, so a change to the init code changes the store's digest).
        feature_dim: D of the region features.

    Raises:
        ValueError / FileNotFoundError: from ``load_weights`` (unsupported format, missing file, key mismatch).
    """

    def __init__(
        self,
        config: DetectorConfig,
        selection: BoxSelectionConfig,
        *,
        weights: Path | None = None,
        device: str | None = None,
        threads: int | None = None,
        seed: int = 0,
        with_cls_prob: bool = False,
        autocast_dtype: torch.dtype | None = None,
    ):
        if threads is not None:
            torch.set_num_threads(threads)
        self.config = config
        self.selection = selection
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.with_cls_prob = with_cls_prob
        self.autocast_dtype = autocast_dtype
        self.feature_dim = config.feature_dim
        self.model = RegionDetectorModel(config)
        if weights is None:
            random_init_(self.model, seed)
            self.random_init = True
            self.weights_digest = f"random-init:seed={seed}:{state_digest(self.model)}"
            logger.warning(
                "REGION DETECTOR HAS NO WEIGHTS: %s runs a seeded random init (seed=%d); its features carry no "
                "visual meaning. Pass weights to extract real features.",
                config.name,
                seed,
            )
        else:
            load_weights(self.model, Path(weights))
            self.random_init = False
            self.weights_digest = weights_digest(Path(weights))
        self.model.eval().to(self.device)
        if autocast_dtype is None:  # float16 autocast keeps conv + norm (folded weights could lose range)
            self.model.fold_norms_()
        if self.device.type == "cpu":
            self.model.set_memory_format_(torch.channels_last)
        self.rois_across_images = self.device.type == "cuda"  # one RoI head over many images; see _batches

    def extract(
        self, images_rgb: list[np.ndarray], given_boxes: list[np.ndarray | None] | None = None
    ) -> list[RegionOutput]:
        """Regions of each image, in input order.

        Args:
            images_rgb: uint8 ``[H, W, 3]`` RGB images, any sizes.
            given_boxes: optional per image float ``[N, 4]`` ``xyxy`` original pixels, or None. An image with
                boxes gets features for exactly those boxes (in their order, no selection); an image without
                gets the detector's proposals and the configured selection.

        Returns:
            one ``RegionOutput`` per image.

        Raises:
            ValueError: a non-uint8 or non-``[H, W, 3]`` image; ``given_boxes`` of another length; empty,
                malformed or out-of-image given boxes; selection mode ``given`` and an image without boxes.
        """
        prepared = self._prepare_all(images_rgb, given_boxes)
        results: list[RegionOutput | None] = [None] * len(prepared)
        runnable = []
        for index, item in enumerate(prepared):
            too_small = self._too_small(item)
            if too_small is None:
                runnable.append(index)
            else:
                results[index] = self._no_box(ErrorReason.IMAGE_TOO_SMALL, too_small)
        for indices in self._batches(runnable):
            for index, output in zip(indices, self._run_group([prepared[i] for i in indices]), strict=True):
                results[index] = output
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _too_small(self, item: PreparedImage) -> str | None:
        """Why this image cannot be run, or None.

        Two rules, in this order:

        - the trunk: a resized side below ``min_trunk_input_px(config)`` (3 px for every config: the stem's
          conv and ceil-mode max-pool leave no feature cell) cannot be run at all, given boxes or not. An
          extreme aspect ratio gets there (``tiny``: 4000×16 resizes to 400×2); PyTorch would raise "Output
          size is too small" and fail every image of the call.
        - the RPN, for images without given boxes: a proposal is clipped to the resized image, so its sides
          (``x2 - x1 + 1``) are at most the image's resized sides, and it is kept only when both exceed
          ``rpn_min_size_px × scale`` (MILVLG ``BUABoxes.nonempty``). When a resized side is not above that,
          the reference extractor finds no proposal either (for ``butd-r101-c4``: any image with a side of
          16 px or less, e.g. 1×1, 8×8, 4000×16).
        """
        net_h, net_w = int(item.tensor.shape[1]), int(item.tensor.shape[2])
        height, width = item.original_size
        resized = f"image {width}x{height} px resized to {net_w}x{net_h} (scale {item.scale:.6g})"
        trunk_min = min_trunk_input_px(self.config)
        if min(net_h, net_w) < trunk_min:
            return f"{resized}: the {self.config.name} trunk needs both sides >= {trunk_min} px"
        limit = self.config.rpn_min_size_px * item.scale
        if item.given_boxes is not None or min(net_h, net_w) > limit:
            return None
        return (
            f"{resized}: an RPN proposal needs both sides > {self.config.rpn_min_size_px:g} px x scale = "
            f"{limit:.6g} px, so none can exist"
        )

    def _no_box(self, reason: ErrorReason, detail: str) -> RegionOutput:
        dim, attrs = self.feature_dim, self.config.with_attributes
        return RegionOutput(
            boxes_xyxy_px=np.zeros((0, 4), np.float32),
            features=np.zeros((0, dim), np.float32),
            object_ids=np.zeros(0, np.int16),
            object_conf=np.zeros(0, np.float32),
            attribute_ids=np.zeros(0, np.int16) if attrs else None,
            attribute_conf=np.zeros(0, np.float32) if attrs else None,
            cls_prob=np.zeros((0, self.config.num_object_outputs), np.float32)
            if self.with_cls_prob
            else None,
            no_box_reason=(reason, detail),
        )

    def _batches(self, indices: list[int]) -> Iterator[list[int]]:
        """Indices of the images run together: all of them on CUDA (``rois_across_images``); one at a time on the
        CPU.

        On the CPU, oneDNN picks convolution kernels by batch size (measured: 1e-6 relative differences between
        batch 1 and 3), and batching brings no speed there, so every image runs alone. On CUDA the images of a
        call share the RoI head's fixed-shape chunks (``RegionDetectorModel.forward``); the trunk still runs per
        image.
        """
        if self.rois_across_images:
            yield indices
        else:
            yield from ([i] for i in indices)

    def _prepare_all(
        self, images_rgb: list[np.ndarray], given_boxes: list[np.ndarray | None] | None
    ) -> list[PreparedImage]:
        if given_boxes is not None and len(given_boxes) != len(images_rgb):
            raise ValueError(f"{len(images_rgb)} images but {len(given_boxes)} given-box entries")
        prepared = []
        for index, image in enumerate(images_rgb):
            image = check_image(image, index)
            height, width = image.shape[:2]
            boxes = given_boxes[index] if given_boxes is not None else None
            if boxes is None and self.selection.mode == "given":
                raise ValueError(f"image {index}: box mode 'given' but no boxes were given")
            checked = check_given_boxes(boxes, height, width, index) if boxes is not None else None
            tensor, scale = prepare_image(image, self.config)
            prepared.append(PreparedImage(tensor, scale, (height, width), checked))
        return prepared

    @torch.inference_mode()
    def _run_group(self, group: list[PreparedImage]) -> list[RegionOutput]:
        given = [
            torch.from_numpy(item.given_boxes * np.float32(item.scale)).to(self.device)
            if item.given_boxes is not None
            else None
            for item in group
        ]
        with self._autocast():
            out = self.model(
                [item.tensor.to(self.device) for item in group],
                [item.scale for item in group],
                given,
                rois_across_images=self.rois_across_images,
            )
        boxes_px = [
            torch.from_numpy(item.given_boxes).to(self.device)
            if item.given_boxes is not None
            else _to_original(r, item.scale, item.original_size)
            for r, item in zip(out.rois, group, strict=True)
        ]
        selections = self._select(group, boxes_px, out.heads)
        return [
            self._output(boxes, head, keep)
            for boxes, head, keep in zip(boxes_px, out.heads, selections, strict=True)
        ]

    def _select(
        self, group: list[PreparedImage], boxes_px: list[torch.Tensor], heads: list[RegionHeadOutput]
    ) -> list[torch.Tensor | None]:
        """Per image, indices of the kept proposals in ``generate_tsv.py``'s order (None: given boxes)."""
        need = [i for i, item in enumerate(group) if item.given_boxes is None]
        keeps: list[torch.Tensor | None] = [None] * len(group)
        if not need:
            return keeps
        if self.device.type == "cuda":  # one vectorised pass for the whole group amortises kernel launches
            chosen = select_boxes_batch(
                [boxes_px[i] for i in need], [heads[i].cls_prob for i in need], self.selection
            )
        else:
            chosen = [select_boxes(boxes_px[i], heads[i].cls_prob, self.selection) for i in need]
        for i, sel in zip(need, chosen, strict=True):
            keeps[i] = torch.from_numpy(sel.keep)
        return keeps

    def _output(self, boxes: torch.Tensor, head: RegionHeadOutput, keep: torch.Tensor | None) -> RegionOutput:
        index = (
            keep.to(boxes.device) if keep is not None else torch.arange(boxes.shape[0], device=boxes.device)
        )
        cls_prob = head.cls_prob[index]
        object_ids, object_conf = best_foreground(cls_prob)
        attribute_ids = attribute_conf = None
        if head.attr_prob is not None:
            attribute_ids, attribute_conf = best_foreground(head.attr_prob[index])
        return RegionOutput(
            boxes_xyxy_px=boxes[index].cpu().numpy().astype(np.float32),
            features=head.features[index].cpu().numpy().astype(np.float32),
            object_ids=object_ids,
            object_conf=object_conf,
            attribute_ids=attribute_ids,
            attribute_conf=attribute_conf,
            cls_prob=cls_prob.cpu().numpy().astype(np.float32) if self.with_cls_prob else None,
        )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)


def _to_original(rois: torch.Tensor, scale: float, original_size: tuple[int, int]) -> torch.Tensor:
    """Network-input ``xyxy`` → original-image pixels, clipped to ``[0, W] × [0, H]``, float32."""
    height, width = original_size
    boxes = rois.float() / scale
    return torch.minimum(boxes.clamp_min(0.0), boxes.new_tensor([width, height, width, height]))
