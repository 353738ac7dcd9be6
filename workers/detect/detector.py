"""Region detector: bottom-up-attention Faster R-CNN (C4) that turns images into region features (DESIGN §2).

Network (Anderson et al. 2018, "Bottom-Up and Top-Down Attention"; the Caffe model of
peteanderson80/bottom-up-attention ``models/vg/ResNet-101/faster_rcnn_end2end_final/test.prototxt``, as MILVLG
bottom-up-attention.pytorch re-implements it)::

    image (BGR − pixel means, short side 600, long ≤ 1000, padded to its size bucket)
      └─ backbone: stem (7×7/2 conv, 3×3/2 max-pool, ceil mode) → res2 → res3 → res4   [B, 1024, H/16, W/16]
           ├─ proposal_generator: 3×3 conv → 2·12 objectness logits (two-way softmax) + 4·12 deltas,
           │    Caffe anchors, clip, min-size, top 6000, NMS 0.7, top 300               [P, 4] per image
           └─ roi_heads: RoIPool 14×14 @ 1/16 → res5 (stride 1, dilation 2) → mean      [R, 2048]
                └─ box_predictor: cls_score → softmax [R, 1601]; attributes: embed(argmax class) ⊕ feature
                     → 512 → ReLU → 401 → softmax [R, 401]

Submodule names follow the public checkpoint's (detectron2 naming, ``shared/data/butd-checkpoint-keys``), so a
later key map is an identity on every tensor but ``num_batches_tracked`` and the anchors (a derived buffer
here). ``bbox_pred`` exists for checkpoint compatibility but is not run: the stored boxes are the proposals.

Batch-size independence: each image is padded to a canvas chosen from its own size (``bucket_of``), images
are batched only with images of the same canvas, proposals are drawn from the image's own (unpadded)
feature-map extent, and the RoI head runs image by image in fixed chunks. So an image's outputs do not depend
on which other images share its call.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import FrozenBatchNorm2d, nms, roi_pool

from workers.detect.config import BoxSelectionConfig, DetectorConfig
from workers.detect.selection import best_foreground, select_boxes, select_boxes_batch
from workers.detect.weights import load_weights, weights_digest

logger = logging.getLogger(__name__)

_ROI_CHUNK = 100  # RoIs per res5 pass (per image, so chunks never mix images: batch-size independent)
_LAST_NORM_BIAS = 3.0  # random init: the region features' last ReLU input, see calibrate_frozen_bn_
_PREDICTOR_STD = 0.01  # Caffe gaussian filler of cls_score, attr layers, class embedding
_BBOX_PRED_STD = 0.001  # Caffe gaussian filler of bbox_pred


# ----------------------------------------------------------------------------------------------- network


class ConvNorm(nn.Conv2d):
    """Bias-free conv followed by a frozen batch norm stored as ``.norm`` (detectron2's ``Conv2d(norm=...)``).

    Input ``[B, C_in, H, W]``, output ``[B, C_out, H', W']``; no activation.

    ``fold_norm_()`` folds the frozen norm into the conv for inference: ``conv(x, W · s) + (β − μ · s)`` with
    ``s = γ / sqrt(σ² + eps)`` per output channel, the same affine map, exact up to float rounding, without
    the norm's two elementwise passes. The folded weight and bias are non-persistent buffers
    (``folded_weight``, ``folded_bias``): the state dict keeps the checkpoint's names and values, a
    ``load_state_dict`` re-folds, and ``unfold_norm_()`` returns to conv + norm (e.g. for hooks on ``.norm``).
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, dilation: int = 1, eps: float
    ):
        pad = dilation * (kernel - 1) // 2
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=pad, dilation=dilation, bias=False)
        self.norm = FrozenBatchNorm2d(out_ch, eps=eps)
        self.folded_weight: torch.Tensor | None
        self.folded_bias: torch.Tensor | None
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)
        self.register_load_state_dict_post_hook(_refold_after_load)

    @property
    def is_folded(self) -> bool:
        """True when ``forward`` runs the folded conv."""
        return self.folded_weight is not None

    @torch.no_grad()
    def fold_norm_(self) -> None:
        """(Re)compute the folded weight (with the conv weight's strides) and bias from the current values."""
        norm = self.norm
        scale = norm.weight * (norm.running_var + norm.eps).rsqrt()  # as FrozenBatchNorm2d.forward
        folded = torch.empty_like(self.weight)  # preserve_format: same strides (channels_last stays)
        torch.mul(self.weight, scale.view(-1, 1, 1, 1), out=folded)
        self.folded_weight = folded
        self.folded_bias = norm.bias - norm.running_mean * scale

    def unfold_norm_(self) -> None:
        """Drop the folded weights: ``forward`` runs conv, then ``.norm``."""
        self.folded_weight = self.folded_bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.folded_weight is not None:
            return F.conv2d(x, self.folded_weight, self.folded_bias, self.stride, self.padding, self.dilation)
        return self.norm(super().forward(x))


def _refold_after_load(module: nn.Module, incompatible_keys: object) -> None:
    """``load_state_dict`` post-hook of ``ConvNorm`` (runs after its ``.norm`` loaded): keep folds current."""
    assert isinstance(module, ConvNorm)
    if module.is_folded:
        module.fold_norm_()


class Bottleneck(nn.Module):
    """ResNet v1 bottleneck: 1×1 → 3×3 (dilated) → 1×1, projection shortcut when shapes change.

    ``stride_in_1x1``: the stride sits in the first 1×1 conv (MSRA / Caffe ResNet) rather than the 3×3.
    """

    def __init__(
        self,
        in_ch: int,
        bottleneck: int,
        out_ch: int,
        *,
        stride: int,
        dilation: int,
        stride_in_1x1: bool,
        eps: float,
    ):
        super().__init__()
        self.shortcut = (
            ConvNorm(in_ch, out_ch, 1, stride=stride, eps=eps) if (in_ch != out_ch or stride != 1) else None
        )
        s1, s3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = ConvNorm(in_ch, bottleneck, 1, stride=s1, eps=eps)
        self.conv2 = ConvNorm(bottleneck, bottleneck, 3, stride=s3, dilation=dilation, eps=eps)
        self.conv3 = ConvNorm(bottleneck, out_ch, 1, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in place on fresh conv outputs: same values, no new [N, C, H, W] tensors (measured: res5 −15% CPU time)
        out = F.relu_(self.conv1(x))
        out = F.relu_(self.conv2(out))
        out = self.conv3(out)
        out += self.shortcut(x) if self.shortcut is not None else x
        return F.relu_(out)


def make_stage(
    num_blocks: int,
    in_ch: int,
    bottleneck: int,
    out_ch: int,
    *,
    first_stride: int,
    dilation: int,
    config: DetectorConfig,
) -> nn.Sequential:
    """A ResNet stage: ``num_blocks`` bottlenecks, the first one strided and projecting."""
    blocks = [
        Bottleneck(
            in_ch if i == 0 else out_ch,
            bottleneck,
            out_ch,
            stride=first_stride if i == 0 else 1,
            dilation=dilation,
            stride_in_1x1=config.stride_in_1x1,
            eps=config.bn_eps,
        )
        for i in range(num_blocks)
    ]
    return nn.Sequential(*blocks)


class Stem(nn.Module):
    """7×7 stride-2 conv + frozen BN + ReLU, then 3×3 stride-2 max-pool in Caffe's ceil mode. Stride 4."""

    def __init__(self, out_ch: int, eps: float):
        super().__init__()
        self.conv1 = ConvNorm(3, out_ch, 7, stride=2, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu_(self.conv1(x)), kernel_size=3, stride=2, padding=0, ceil_mode=True)


class Backbone(nn.Module):
    """C4 trunk: stem, res2, res3, res4. ``[B, 3, H, W]`` → ``[B, 4·res2_out, H/16, W/16]`` (H, W multiples of 16)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.stem = Stem(config.stem_channels, config.bn_eps)
        in_ch, out_ch, mid = config.stem_channels, config.res2_out_channels, config.res2_bottleneck_channels
        for index, blocks in enumerate(config.stage_blocks):
            stage = make_stage(
                blocks, in_ch, mid, out_ch, first_stride=1 if index == 0 else 2, dilation=1, config=config
            )
            self.add_module(f"res{index + 2}", stage)
            in_ch, out_ch, mid = out_ch, out_ch * 2, mid * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res4(self.res3(self.res2(self.stem(x))))


def valid_feature_size(size_px: int, config: DetectorConfig) -> int:
    """Feature-map cells (along one axis) that the trunk computes from ``size_px`` input pixels.

    Follows the layer arithmetic (stem conv k7/s2/p3, max-pool k3/s2 ceil mode, two stride-2 stages), so a
    padded canvas's proposals come only from the cells the unpadded image would have had.
    """
    n = (size_px - 1) // 2 + 1  # 7×7 stride-2 conv, padding 3
    n = math.ceil((n - 3) / 2) + 1  # 3×3 stride-2 max-pool, ceil mode
    for _ in config.stage_blocks[1:]:
        n = (n - 1) // 2 + 1  # stride-2 1×1 (or 3×3 padded) conv
    return n


def caffe_cell_anchors(base_size: int, ratios: tuple[float, ...], scales: tuple[float, ...]) -> np.ndarray:
    """The anchors of one feature-map cell, py-faster-rcnn ``generate_anchors`` convention.

    Ratio-major order (for each ratio h/w, every scale); centred on the ``[0, 0, base-1, base-1]`` window; widths
    rounded as Caffe does (half to even). Returns float32 ``[len(ratios)·len(scales), 4]``, ``xyxy`` with the
    legacy ``+1`` width convention (``x2 - x1 + 1`` = width).
    """
    size = float(base_size * base_size)
    centre = 0.5 * (base_size - 1)
    rows = []
    for ratio in ratios:
        w_r = np.round(np.sqrt(size / ratio))
        h_r = np.round(w_r * ratio)
        for scale in scales:
            w, h = w_r * scale, h_r * scale
            rows.append(
                [
                    centre - 0.5 * (w - 1),
                    centre - 0.5 * (h - 1),
                    centre + 0.5 * (w - 1),
                    centre + 0.5 * (h - 1),
                ]
            )
    return np.asarray(rows, dtype=np.float32)


class AnchorGenerator(nn.Module):
    """Caffe anchors over a feature map. ``cell_anchors`` is a derived, non-persistent buffer ``[A, 4]``."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        cells = caffe_cell_anchors(config.feature_stride_px, config.anchor_ratios, config.anchor_scales)
        self.register_buffer("cell_anchors", torch.from_numpy(cells), persistent=False)
        self.stride = config.feature_stride_px

    def forward(self, height: int, width: int) -> torch.Tensor:
        """Anchors of an ``height × width`` feature map, float32 ``[height·width·A, 4]``, (y, x, anchor) order."""
        ys = torch.arange(height, device=self.cell_anchors.device, dtype=torch.float32) * self.stride
        xs = torch.arange(width, device=self.cell_anchors.device, dtype=torch.float32) * self.stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
        return (shifts + self.cell_anchors[None]).reshape(-1, 4)


class RPNHead(nn.Module):
    """3×3 conv + ReLU, then 1×1 convs to ``2A`` objectness logits (Caffe layout: A background logits, then A
    foreground logits) and ``4A`` deltas (anchor-major). ``[B, C, H, W]`` → ``([B, 2A, H, W], [B, 4A, H, W])``."""

    def __init__(self, in_ch: int, mid_ch: int, num_anchors: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, mid_ch, 3, padding=1)
        self.objectness_logits = nn.Conv2d(mid_ch, 2 * num_anchors, 1)
        self.anchor_deltas = nn.Conv2d(mid_ch, 4 * num_anchors, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.conv(x))
        return self.objectness_logits(hidden), self.anchor_deltas(hidden)


def decode_deltas(
    anchors: torch.Tensor, deltas: torch.Tensor, *, offset: float, max_log_wh: float
) -> torch.Tensor:
    """Apply R-CNN deltas ``(dx, dy, dw, dh)`` to boxes (py-faster-rcnn ``bbox_transform_inv``).

    Widths are ``x2 - x1 + offset`` (offset 1: legacy convention); ``dw, dh`` clamped at ``max_log_wh``.
    Float32 ``[N, 4]`` in, float32 ``[N, 4]`` ``xyxy`` out.
    """
    widths = anchors[:, 2] - anchors[:, 0] + offset
    heights = anchors[:, 3] - anchors[:, 1] + offset
    ctr_x = anchors[:, 0] + 0.5 * widths
    ctr_y = anchors[:, 1] + 0.5 * heights
    dx, dy, dw, dh = deltas.unbind(dim=1)
    pred_x = dx * widths + ctr_x
    pred_y = dy * heights + ctr_y
    pred_w = torch.exp(dw.clamp(max=max_log_wh)) * widths
    pred_h = torch.exp(dh.clamp(max=max_log_wh)) * heights
    return torch.stack(
        [pred_x - 0.5 * pred_w, pred_y - 0.5 * pred_h, pred_x + 0.5 * pred_w, pred_y + 0.5 * pred_h], 1
    )


class ProposalGenerator(nn.Module):
    """Caffe-style RPN (``rpn/proposal_layer.py`` of bottom-up-attention), test mode only."""

    def __init__(self, config: DetectorConfig, in_ch: int):
        super().__init__()
        self.config = config
        self.anchor_generator = AnchorGenerator(config)
        self.rpn_head = RPNHead(in_ch, config.rpn_conv_channels, config.num_anchors)

    def forward(
        self, features: torch.Tensor, image_sizes: list[tuple[int, int]], scales: list[float]
    ) -> list[torch.Tensor]:
        """Proposals per image.

        Args:
            features: ``[B, C, Hf, Wf]`` res4 features of the padded canvases.
            image_sizes: per image, ``(h, w)`` of the resized, unpadded image in network-input pixels.
            scales: per image, network-input pixels per original-image pixel (for the min-size filter).

        Returns:
            per image, float32 ``[P_i, 4]`` ``xyxy`` network-input pixels, ``P_i <= num_proposals``, in
            descending objectness order.
        """
        logits, deltas = self.rpn_head(features)
        num_anchors = self.config.num_anchors
        batch, _, feat_h, feat_w = logits.shape
        fg_prob = F.softmax(logits.float().view(batch, 2, num_anchors, feat_h, feat_w), dim=1)[:, 1]
        deltas = deltas.float().view(batch, num_anchors, 4, feat_h, feat_w)
        return [
            self._proposals_of(fg_prob[i], deltas[i], size, scale)
            for i, (size, scale) in enumerate(zip(image_sizes, scales, strict=True))
        ]

    def _proposals_of(
        self, fg_prob: torch.Tensor, deltas: torch.Tensor, size: tuple[int, int], scale: float
    ) -> torch.Tensor:
        cfg = self.config
        height, width = size
        valid_h, valid_w = valid_feature_size(height, cfg), valid_feature_size(width, cfg)
        scores = fg_prob[:, :valid_h, :valid_w].permute(1, 2, 0).reshape(-1)  # (y, x, anchor)
        box_deltas = deltas[:, :, :valid_h, :valid_w].permute(2, 3, 0, 1).reshape(-1, 4)
        offset = 1.0 if cfg.legacy_plus_one else 0.0
        anchors = self.anchor_generator(valid_h, valid_w)
        boxes = decode_deltas(anchors, box_deltas, offset=offset, max_log_wh=cfg.max_delta_log_wh)
        boxes = _clip(boxes, height - offset, width - offset)
        side_w = boxes[:, 2] - boxes[:, 0]
        side_h = boxes[:, 3] - boxes[:, 1]
        min_side = cfg.rpn_min_size_px * scale
        big = (side_w + offset >= min_side) & (side_h + offset >= min_side) & (side_w > 0) & (side_h > 0)
        boxes, scores = boxes[big], scores[big]
        order = torch.sort(scores, descending=True, stable=True).indices[: cfg.rpn_pre_nms_top_n]
        boxes = boxes[order]
        # boxes are in score order: strictly decreasing stand-in scores make nms keep that (stable) order
        rank_scores = torch.arange(boxes.shape[0], 0, -1, device=boxes.device, dtype=torch.float32)
        nms_boxes = boxes + boxes.new_tensor([0.0, 0.0, offset, offset])  # legacy IoU = plain IoU of x2+1
        keep = nms(nms_boxes, rank_scores, cfg.rpn_nms_iou)[: cfg.num_proposals]
        return boxes[keep]


def _clip(boxes: torch.Tensor, max_y: float, max_x: float) -> torch.Tensor:
    limits = boxes.new_tensor([max_x, max_y, max_x, max_y])
    return torch.minimum(boxes.clamp_min(0.0), limits)


@dataclass(frozen=True)
class RegionHeadOutput:
    """Outputs of the RoI head for R regions.

    Attributes:
        features: float32 ``[R, D]`` average-pooled res5 features (D = 2048 for ResNet-101).
        cls_prob: float32 ``[R, 1601]`` class softmax, column 0 = background.
        attr_prob: float32 ``[R, 401]`` attribute softmax, column 0 = no attribute; None without the head.
    """

    features: torch.Tensor
    cls_prob: torch.Tensor
    attr_prob: torch.Tensor | None


class BoxPredictor(nn.Module):
    """Class scores, (unused) per-class box deltas, and the bottom-up-attention attribute head.

    Attribute head (``test.prototxt``: ``predicted_cls`` = argmax over all 1601 class scores, ``cls_embedding``,
    ``concat_pool5``, ``fc_attr``, ``attr_score``): embed the predicted class (1601 → 256), concatenate with the
    region feature (2048 + 256 = 2304), Linear 2304 → 512, ReLU, Linear 512 → 401.
    """

    def __init__(self, config: DetectorConfig):
        super().__init__()
        dim, num_classes = config.feature_dim, config.num_object_outputs
        self.with_attributes = config.with_attributes
        self.cls_score = nn.Linear(dim, num_classes)
        self.bbox_pred = nn.Linear(dim, 4 * num_classes)
        if config.with_attributes:
            self.cls_embed = nn.Embedding(num_classes, config.attr_embed_dim)
            self.attr_linear1 = nn.Linear(dim + config.attr_embed_dim, config.attr_hidden_dim)
            self.attr_linear2 = nn.Linear(config.attr_hidden_dim, config.num_attribute_outputs)

    def forward(self, features: torch.Tensor) -> RegionHeadOutput:
        """``[R, D]`` pooled features → ``RegionHeadOutput`` (probabilities in float32)."""
        logits = self.cls_score(features)
        attr_prob = None
        if self.with_attributes:
            embedded = self.cls_embed(logits.argmax(dim=1))
            hidden = F.relu(self.attr_linear1(torch.cat([features, embedded.to(features.dtype)], dim=1)))
            attr_prob = F.softmax(self.attr_linear2(hidden).float(), dim=1)
        return RegionHeadOutput(features.float(), F.softmax(logits.float(), dim=1), attr_prob)


class RoIHeads(nn.Module):
    """RoIPool 14×14 at 1/16 → res5 → spatial mean → ``BoxPredictor``."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        in_ch = config.res2_out_channels * 4
        self.res5 = make_stage(
            config.res5_blocks,
            in_ch,
            config.res2_bottleneck_channels * 8,
            config.feature_dim,
            first_stride=config.res5_first_stride,
            dilation=config.res5_dilation,
            config=config,
        )
        self.box_predictor = BoxPredictor(config)
        self.memory_format = torch.contiguous_format  # of the pooled crops fed to res5 (set_memory_format_)

    def forward(self, features: torch.Tensor, rois: list[torch.Tensor]) -> list[RegionHeadOutput]:
        """Per image i, the head outputs of its RoIs ``rois[i]`` (float ``[N_i, 4]`` network-input ``xyxy``).

        Each image's RoIs run in fixed chunks of their own, never mixed with another image's. The image's
        feature map is made float32 and contiguous once, not per chunk (RoIPool's CPU kernel would copy it).
        """
        outputs = []
        for index, boxes in enumerate(rois):
            feature_map = features[index : index + 1].float().contiguous()
            chunks = [self._pooled(feature_map, part) for part in boxes.split(_ROI_CHUNK)]
            pooled = torch.cat(chunks) if chunks else features.new_zeros(0, self.config.feature_dim)
            outputs.append(self.box_predictor(pooled))
        return outputs

    def roi_pool(self, features: torch.Tensor, rois: list[torch.Tensor]) -> torch.Tensor:
        """RoIPool (Caffe ``ROIPooling``: rounded bins, max) of ``rois[i]`` on ``features[i]``.

        ``[B, C, Hf, Wf]`` and per image ``[N_i, 4]`` network ``xyxy`` → ``[sum N_i, C, 14, 14]``.
        """
        indexed = torch.cat(
            [torch.cat([b.new_full((b.shape[0], 1), float(i)), b], dim=1) for i, b in enumerate(rois)]
        ).float()  # coordinates stay float32 under autocast (bf16 would round 600 px to multiples of 4)
        size = self.config.roi_pool_size
        return roi_pool(features.float(), indexed, (size, size), 1.0 / self.config.feature_stride_px)

    def _pooled(self, feature_map: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        crops = self.roi_pool(feature_map, [boxes]).contiguous(memory_format=self.memory_format)
        return self.res5(crops).mean(dim=(2, 3))


class RegionDetectorModel(nn.Module):
    """The network: ``backbone``, ``proposal_generator``, ``roi_heads`` (names as the public checkpoint's)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.proposal_generator = ProposalGenerator(config, config.res2_out_channels * 4)
        self.roi_heads = RoIHeads(config)
        self.memory_format = torch.contiguous_format

    def set_memory_format_(self, memory_format: torch.memory_format) -> None:
        """Store conv weights (and run res5 on RoI crops) in ``memory_format``; callers feed images in it too.

        ``torch.channels_last`` lets oneDNN run its NHWC kernels on the CPU without reordering every
        activation (measured on 2 AMD EPYC cores: 1.2–1.6× less CPU time on res5's convs). Values are unchanged; results may
        differ from ``torch.contiguous_format`` by float rounding (other kernels).
        """
        self.to(memory_format=memory_format)
        self.memory_format = self.roi_heads.memory_format = memory_format

    def fold_norms_(self) -> None:
        """Fold every frozen batch norm into its conv (``ConvNorm.fold_norm_``); exact up to float rounding."""
        for module in self.modules():
            if isinstance(module, ConvNorm):
                module.fold_norm_()

    def unfold_norms_(self) -> None:
        """Undo ``fold_norms_``: convs run followed by their ``.norm`` again."""
        for module in self.modules():
            if isinstance(module, ConvNorm):
                module.unfold_norm_()


# -------------------------------------------------------------------------------------------- random init


def random_init_(model: RegionDetectorModel, seed: int) -> None:
    """Seeded random init that keeps activations O(1) (usable in float16 / bfloat16).

    Convs: MSRA (Kaiming normal, fan-out) as Caffe's ``msra`` filler; RPN conv: Kaiming fan-in; predictor
    layers: Gaussian (Caffe fillers, std 0.01 / 0.001 for box deltas; objectness std 1/sqrt(fan-in) so RPN
    scores differ). Then every frozen batch norm gets the per-channel mean and variance of its input on a
    seeded synthetic image (a calibration pass), so each normalised activation has zero mean and unit variance
    instead of growing through 100 layers (a plain random ResNet-101 with identity batch norm overflows
    float16). The last norm of each residual branch scales by ``1/sqrt(blocks in the stage)`` so that the
    23 blocks of res4 add up to O(1) rather than to a standard deviation of ~10.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, module in model.named_modules():
        if isinstance(module, ConvNorm):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=gen)
        elif isinstance(module, nn.Conv2d):
            _init_rpn_conv(name, module, gen)
        elif isinstance(module, nn.Linear):
            std = _BBOX_PRED_STD if name.endswith("bbox_pred") else _PREDICTOR_STD
            nn.init.normal_(module.weight, std=std, generator=gen)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=_PREDICTOR_STD, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the calibrated statistics must not depend on the caller's thread count
    try:
        image = _calibration_image(model.config, gen)
        calibrate_frozen_bn_(model, image, _calibration_rois(model.config, gen))
    finally:
        torch.set_num_threads(threads)


def _init_rpn_conv(name: str, conv: nn.Conv2d, gen: torch.Generator) -> None:
    if name.endswith("objectness_logits"):
        nn.init.normal_(conv.weight, std=1.0 / math.sqrt(conv.in_channels), generator=gen)
    elif name.endswith("anchor_deltas"):
        nn.init.normal_(conv.weight, std=_PREDICTOR_STD, generator=gen)
    else:
        nn.init.kaiming_normal_(conv.weight, mode="fan_in", nonlinearity="relu", generator=gen)
    nn.init.zeros_(conv.bias)


def _calibration_image(config: DetectorConfig, gen: torch.Generator) -> torch.Tensor:
    """Seeded synthetic network input ``[1, 3, S, S]``: smooth colour fields plus pixel noise, 0..255, BGR
    minus the pixel means."""
    side = config.init_calibration_size_px
    coarse = torch.rand(1, 3, side // 8, side // 8, generator=gen) * 255.0
    image = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    image = (image + torch.randn(1, 3, side, side, generator=gen) * 20.0).clamp(0.0, 255.0)
    return image - torch.tensor(config.pixel_means_bgr).view(1, 3, 1, 1)


def _calibration_rois(config: DetectorConfig, gen: torch.Generator, count: int = 8) -> torch.Tensor:
    """Seeded boxes float32 ``[count, 4]`` ``xyxy`` inside the calibration image, 16 px to full size."""
    side = float(config.init_calibration_size_px)
    corner = torch.rand(count, 2, generator=gen) * (side - config.feature_stride_px)
    size = config.feature_stride_px + torch.rand(count, 2, generator=gen) * (
        side - corner - config.feature_stride_px
    )
    return torch.cat([corner, corner + size], dim=1)


@torch.no_grad()
def calibrate_frozen_bn_(model: RegionDetectorModel, image: torch.Tensor, rois: torch.Tensor) -> None:
    """Set every frozen BN of the trunk and the res5 head to normalise its input on ``image`` (layer by layer).

    The res5 head is calibrated on RoI-pooled crops ``rois`` (``xyxy`` network pixels) of the image's res4
    features, what it sees at test time (RoIPool max-pools, which shifts the statistics). The last norm of a
    residual branch gets gain ``1/sqrt(blocks in its stage)``; the others gain 1, bias 0, except the last norm
    of the res5 head, whose bias is ``_LAST_NORM_BIAS`` (3): with zero bias, half of a channel's pre-ReLU values
    are negative on the calibration image, and on a flat real image a region feature channel could be 0 for
    every box (measured on ``tiny`` at 256 px: 1 of 64 channels dead on 1 of 12 COCO images), which breaks
    DESIGN §2's "every feature dimension varies across an image's boxes".
    """
    gains = {
        id(block.conv3.norm): 1.0 / math.sqrt(len(stage))
        for stage in (model.backbone.res2, model.backbone.res3, model.backbone.res4, model.roi_heads.res5)
        for block in stage
    }

    last_norm = model.roi_heads.res5[-1].conv3.norm

    def set_stats(module: FrozenBatchNorm2d, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))
        module.weight.fill_(gains.get(id(module), 1.0))
        module.bias.fill_(_LAST_NORM_BIAS if module is last_norm else 0.0)

    assert not any(m.is_folded for m in model.modules() if isinstance(m, ConvNorm)), "calibrate unfolded"
    hooks = [
        m.register_forward_pre_hook(set_stats) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)
    ]
    try:
        model.roi_heads.res5(model.roi_heads.roi_pool(model.backbone(image), [rois]))
    finally:
        for hook in hooks:
            hook.remove()


# ------------------------------------------------------------------------------------------ preprocessing


def resized_size(height_px: int, width_px: int, config: DetectorConfig) -> tuple[int, int, float]:
    """Network-input size and scale of an image (py-faster-rcnn ``_get_image_blob``).

    Scale so the short side is ``min_size_px``, unless the long side would then exceed ``max_size_px`` (rounded
    as Caffe did), then scale the long side to ``max_size_px``. Returns ``(h, w, scale)`` with
    ``h = round(height_px · scale)``, half to even: the size ``cv2.resize(im, None, fx=scale, fy=scale)``
    produces (OpenCV rounds ``size · scale`` with ``cvRound``), floored at 1 px (see ``prepare_image``).
    """
    short, long = min(height_px, width_px), max(height_px, width_px)
    scale = config.min_size_px / short
    if round(scale * long) > config.max_size_px:
        scale = config.max_size_px / long
    return max(1, round(height_px * scale)), max(1, round(width_px * scale)), scale


def bucket_for(height_px: int, width_px: int, config: DetectorConfig) -> tuple[int, int]:
    """Padded canvas ``(H, W)`` of an original ``height_px × width_px`` image: its network-input size rounded up
    to a multiple of ``bucket_step_px``. Depends on the image alone."""
    height, width, _ = resized_size(height_px, width_px, config)
    step = config.bucket_step_px
    return -(-height // step) * step, -(-width // step) * step


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the network.

    Attributes:
        tensor: float32 ``[3, h, w]`` BGR minus pixel means, resized (unpadded).
        scale: network-input pixels per original pixel.
        original_size: ``(H, W)`` of the original image, px.
        bucket: padded canvas ``(H_c, W_c)``.
        given_boxes: float32 ``[N, 4]`` ``xyxy`` original pixels, or None (use proposals).
    """

    tensor: torch.Tensor
    scale: float
    original_size: tuple[int, int]
    bucket: tuple[int, int]
    given_boxes: np.ndarray | None


def prepare_image(image_rgb: np.ndarray, config: DetectorConfig) -> tuple[torch.Tensor, float]:
    """uint8 RGB ``[H, W, 3]`` → float32 BGR − means ``[3, h, w]`` resized bilinearly, and its scale.

    As the Caffe and MILVLG extractors (py-faster-rcnn ``lib/fast_rcnn/test.py`` ``_get_image_blob``, MILVLG
    ``utils/extract_utils.py`` ``get_image_blob``): subtract the means, then
    ``cv2.resize(im, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)``. Passing the scale
    (not the output size) matters: OpenCV samples source pixel ``(x + 0.5) / fx - 0.5`` for output ``x``, and
    with an explicit size it uses ``w_out / w`` instead of ``fx``, a different grid for most images.

    An aspect ratio beyond ~2 · max_size_px : 1 rounds the short side to 0 px, which OpenCV refuses (the
    reference extractors fail there); such an image is resized to 1 px on that side through an explicit size.
    """
    height, width = image_rgb.shape[:2]
    out_h, out_w, scale = resized_size(height, width, config)
    bgr = image_rgb[:, :, ::-1].astype(np.float32) - np.asarray(config.pixel_means_bgr, dtype=np.float32)
    if round(height * scale) >= 1 and round(width * scale) >= 1:
        resized = cv2.resize(bgr, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)
    else:
        resized = cv2.resize(bgr, (out_w, out_h), interpolation=cv2.INTER_LINEAR)
    assert resized.shape[:2] == (out_h, out_w), f"OpenCV gave {resized.shape[:2]}, expected {(out_h, out_w)}"
    return torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))), scale


def check_image(image: object, index: int) -> np.ndarray:
    """Raise ValueError unless ``image`` is a uint8 ``[H, W, 3]`` array with H, W >= 1."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        kind = image.dtype if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"image {index}: expected a uint8 numpy array, got {kind}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image {index}: expected shape [H, W, 3], got {image.shape}")
    return image


def check_given_boxes(boxes: object, height: int, width: int, index: int) -> np.ndarray:
    """Validated float32 ``[N, 4]`` ``xyxy`` boxes with N >= 1 and ``0 <= x1 < x2 <= W``, ``0 <= y1 < y2 <= H``.

    Raises:
        ValueError: wrong shape, empty, non-finite, or a box outside the image or with no area.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"image {index}: given boxes must be [N, 4] xyxy px, got shape {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"image {index}: given boxes are empty")
    if not np.isfinite(arr).all():
        raise ValueError(f"image {index}: given boxes hold non-finite values")
    x1, y1, x2, y2 = arr.T
    bad = (x1 < 0) | (y1 < 0) | (x2 > width) | (y2 > height) | (x1 >= x2) | (y1 >= y2)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"image {index}: given box {first} {arr[first].tolist()} is not inside the {width}x{height} image "
            "with x1 < x2 and y1 < y2"
        )
    return arr.astype(np.float32)


# --------------------------------------------------------------------------------------------- detector


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
    """

    boxes_xyxy_px: np.ndarray
    features: np.ndarray
    object_ids: np.ndarray
    object_conf: np.ndarray
    attribute_ids: np.ndarray | None
    attribute_conf: np.ndarray | None
    cls_prob: np.ndarray | None


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

    def bucket_of(self, height_px: int, width_px: int) -> tuple[int, int]:
        """Padded canvas ``(H, W)`` of an original image; batch only images of one bucket."""
        return bucket_for(height_px, width_px, self.config)

    def extract(
        self, images_rgb: list[np.ndarray], given_boxes: list[np.ndarray | None] | None = None
    ) -> list[RegionOutput]:
        """Regions of each image, in input order.

        Args:
            images_rgb: uint8 ``[H, W, 3]`` RGB images, any sizes (grouped by bucket internally).
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
        for indices in self._batches(prepared):
            for index, output in zip(indices, self._run_group([prepared[i] for i in indices]), strict=True):
                results[index] = output
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _batches(self, prepared: list[PreparedImage]) -> Iterator[list[int]]:
        """Indices of the images run together: one bucket per batch on CUDA; one image per batch on the CPU.

        On the CPU, oneDNN picks convolution kernels by batch size (measured: 1e-6 relative differences between
        batch 1 and 3), and batching brings no speed there, so every image runs alone and its bytes never
        depend on its neighbours. On CUDA images of one bucket run as one batch.
        """
        for indices in _group_by_bucket(prepared):
            if self.device.type == "cuda":
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
            prepared.append(
                PreparedImage(tensor, scale, (height, width), self.bucket_of(height, width), checked)
            )
        return prepared

    @torch.inference_mode()
    def _run_group(self, group: list[PreparedImage]) -> list[RegionOutput]:
        canvas_h, canvas_w = group[0].bucket
        batch = torch.zeros(len(group), 3, canvas_h, canvas_w)
        for i, item in enumerate(group):
            batch[i, :, : item.tensor.shape[1], : item.tensor.shape[2]] = item.tensor
        with self._autocast():
            features = self.model.backbone(batch.to(self.device, memory_format=self.model.memory_format))
            rois = self._rois(features, group)
            heads = self.model.roi_heads(features, rois)
        boxes_px = [
            torch.from_numpy(item.given_boxes).to(self.device)
            if item.given_boxes is not None
            else _to_original(r, item.scale, item.original_size)
            for r, item in zip(rois, group, strict=True)
        ]
        selections = self._select(group, boxes_px, heads)
        return [
            self._output(boxes, head, keep)
            for boxes, head, keep in zip(boxes_px, heads, selections, strict=True)
        ]

    def _rois(self, features: torch.Tensor, group: list[PreparedImage]) -> list[torch.Tensor]:
        """Per image, network-input ``xyxy`` float32 RoIs: scaled given boxes, or RPN proposals."""
        need = [i for i, item in enumerate(group) if item.given_boxes is None]
        proposals = iter(
            self.model.proposal_generator(
                features[need],
                [(group[i].tensor.shape[1], group[i].tensor.shape[2]) for i in need],
                [group[i].scale for i in need],
            )
            if need
            else []
        )
        return [
            torch.from_numpy(item.given_boxes * np.float32(item.scale)).to(self.device)
            if item.given_boxes is not None
            else next(proposals)
            for item in group
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


def _group_by_bucket(prepared: list[PreparedImage]) -> Iterator[list[int]]:
    """Indices of images sharing a canvas, groups in order of first appearance."""
    groups: dict[tuple[int, int], list[int]] = {}
    for index, item in enumerate(prepared):
        groups.setdefault(item.bucket, []).append(index)
    yield from groups.values()
