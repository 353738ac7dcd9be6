"""The region detector network: trunk, RPN, RoI heads, and one forward (docs/design.md §2).

Network (Anderson et al. 2018, "Bottom-Up and Top-Down Attention"; the Caffe model of
peteanderson80/bottom-up-attention ``models/vg/ResNet-101/faster_rcnn_end2end_final/test.prototxt``, as MILVLG
bottom-up-attention.pytorch re-implements it)::

    image (BGR − pixel means, short side 600, long ≤ 1000, unpadded: one image at a time)
      └─ backbone: stem (7×7/2 conv, 3×3/2 max-pool, ceil mode) → res2 → res3 → res4   [B, 1024, H/16, W/16]
           ├─ proposal_generator: 3×3 conv → 2·12 objectness logits (two-way softmax) + 4·12 deltas,
           │    Caffe anchors, clip, min-size, top 6000, NMS 0.7, top 300               [P, 4] per image
           └─ roi_heads: RoIPool 14×14 @ 1/16 → res5 (stride 1, dilation 2) → mean      [R, 2048]
                └─ box_predictor: cls_score → softmax [R, 1601]; attributes: embed(argmax class) ⊕ feature
                     → 512 → ReLU → 401 → softmax [R, 401]

Submodule names follow the public checkpoint's (detectron2 naming, ``shared/data/butd-checkpoint-keys``), so a
later key map is an identity on every tensor but ``num_batches_tracked`` and the anchors (a derived buffer
here). ``bbox_pred`` exists for checkpoint compatibility but is not run: the stored boxes are the proposals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import roi_pool

from workers.detect.anchors import AnchorGenerator, decode_deltas
from workers.detect.backbone import Backbone, ConvNorm, make_stage, valid_feature_size
from workers.detect.config import DetectorConfig
from workers.detect.nms import legacy_nms_ranked

_ROI_CHUNK = 100  # RoIs per res5 pass (per image, so chunks never mix images: batch-size independent)


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
        # MILVLG BUABoxes.filter_boxes (x2 > x1, y2 > y1), then BUABoxes.nonempty: keep a side + 1 > min
        # (the Caffe proposal_layer.py kept >= min)
        side_w = boxes[:, 2] - boxes[:, 0]
        side_h = boxes[:, 3] - boxes[:, 1]
        min_side = cfg.rpn_min_size_px * scale
        big = (side_w + offset > min_side) & (side_h + offset > min_side) & (side_w > 0) & (side_h > 0)
        boxes, scores = boxes[big], scores[big]
        order = torch.sort(scores, descending=True, stable=True).indices[: cfg.rpn_pre_nms_top_n]
        boxes = boxes[order]
        keep = legacy_nms_ranked(boxes, cfg.rpn_nms_iou, plus_one=cfg.legacy_plus_one)[: cfg.num_proposals]
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

    def forward(
        self, feature_maps: list[torch.Tensor], rois: list[torch.Tensor], *, across_images: bool = False
    ) -> list[RegionHeadOutput]:
        """Per image i, the head outputs of its RoIs ``rois[i]`` (float ``[N_i, 4]`` network-input ``xyxy``)
        pooled on its own res4 map ``feature_maps[i]`` (``[1, C, Hf_i, Wf_i]``).

        ``across_images=False``: each image's RoIs run in chunks of ``_ROI_CHUNK`` of their own, never mixed
        with another image's (the CPU path: one image per call). ``True``: the pooled crops of all images run
        through res5 and the box predictor together, in chunks of exactly ``num_proposals`` crops (the last one
        padded with zeros), so every kernel sees one shape whatever the images: a crop's outputs depend on that
        crop only (RoIPool already cut it from its own image), and batching them is exact.
        """
        if across_images:
            return self._across_images(feature_maps, rois)
        outputs = []
        for feature_map, boxes in zip(feature_maps, rois, strict=True):
            feature_map = feature_map.float().contiguous()  # once, not per chunk (RoIPool would copy it)
            chunks = [self._pooled(feature_map, part) for part in boxes.split(_ROI_CHUNK)]
            pooled = torch.cat(chunks) if chunks else feature_map.new_zeros(0, self.config.feature_dim)
            outputs.append(self.box_predictor(pooled))
        return outputs

    def _across_images(
        self, feature_maps: list[torch.Tensor], rois: list[torch.Tensor]
    ) -> list[RegionHeadOutput]:
        chunk = self.config.num_proposals  # 300: one image's proposals fill a chunk exactly, no padding
        heads: list[RegionHeadOutput] = []
        pending: list[torch.Tensor] = []
        for feature_map, boxes in zip(feature_maps, rois, strict=True):
            feature_map = feature_map.float().contiguous()
            for part in boxes.split(chunk):
                pending.append(self.roi_pool(feature_map, [part]))
                if sum(p.shape[0] for p in pending) >= chunk:
                    crops = torch.cat(pending)
                    heads.append(self._head(crops[:chunk]))
                    pending = [crops[chunk:]]
        rest = torch.cat(pending) if pending else None
        if rest is not None and rest.shape[0]:
            padded = rest.new_zeros(chunk, *rest.shape[1:])
            padded[: rest.shape[0]] = rest
            heads.append(self._head(padded))
        if not heads:  # no RoI in any image: the predictor's outputs of zero rows
            device = feature_maps[0].device if feature_maps else None
            empty = self.box_predictor(torch.zeros(0, self.config.feature_dim, device=device))
            return [empty for _ in rois]
        return _split_heads(heads, [int(b.shape[0]) for b in rois])

    def _head(self, crops: torch.Tensor) -> RegionHeadOutput:
        crops = crops.contiguous(memory_format=self.memory_format)
        return self.box_predictor(self.res5(crops).mean(dim=(2, 3)))

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


def _split_heads(chunks: list[RegionHeadOutput], counts: list[int]) -> list[RegionHeadOutput]:
    """Concatenate chunked head outputs (padding rows last) and cut them into ``counts`` rows per image."""
    features = torch.cat([c.features for c in chunks])
    cls_prob = torch.cat([c.cls_prob for c in chunks])
    attrs = [c.attr_prob for c in chunks if c.attr_prob is not None]
    attr_prob = torch.cat(attrs) if attrs else None
    out, start = [], 0
    for count in counts:
        stop = start + count
        attr = attr_prob[start:stop] if attr_prob is not None else None
        out.append(RegionHeadOutput(features[start:stop], cls_prob[start:stop], attr))
        start = stop
    return out


@dataclass(frozen=True)
class DetectorForward:
    """Output of ``RegionDetectorModel.forward`` for B images.

    Attributes:
        rois: per image, float32 ``[N_i, 4]`` ``xyxy`` network-input pixels: the RPN proposals (descending
            objectness) or the given RoIs.
        heads: per image, the RoI head outputs of its ``rois`` (same order).
    """

    rois: list[torch.Tensor]
    heads: list[RegionHeadOutput]


class RegionDetectorModel(nn.Module):
    """The network: ``backbone``, ``proposal_generator``, ``roi_heads`` (names as the public checkpoint's)."""

    def __init__(self, config: DetectorConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.proposal_generator = ProposalGenerator(config, config.res2_out_channels * 4)
        self.roi_heads = RoIHeads(config)
        self.memory_format = torch.contiguous_format

    def forward(
        self,
        images: list[torch.Tensor],
        scales: list[float],
        given_rois: list[torch.Tensor | None],
        *,
        rois_across_images: bool = False,
    ) -> DetectorForward:
        """Trunk and proposals image by image, each at its own size (no padding, no other image), then the RoI
        heads (``RoIHeads.forward``; ``rois_across_images`` batches the pooled crops of all images).

        As MILVLG bottom-up-attention.pytorch and the Caffe original run the trunk: one unpadded image. An
        image's outputs therefore do not depend on the other images of the call, nor on their number.

        Args:
            images: per image, float ``[3, h_i, w_i]`` network input (BGR minus means) on the model's device.
            scales: per image, network pixels per original pixel (the RPN min-size rule).
            given_rois: per image, float32 ``[N_i, 4]`` ``xyxy`` network pixels to pool, or None (proposals).

        Returns:
            ``DetectorForward``.
        """
        feature_maps, rois = [], []
        for image, scale, given in zip(images, scales, given_rois, strict=True):
            feature_map = self.backbone(image[None].contiguous(memory_format=self.memory_format))
            if given is None:
                size = (int(image.shape[1]), int(image.shape[2]))
                given = self.proposal_generator(feature_map, [size], [scale])[0]
            feature_maps.append(feature_map)
            rois.append(given)
        heads = self.roi_heads(feature_maps, rois, across_images=rois_across_images)
        return DetectorForward(rois, heads)

    @property
    def cell_anchors(self) -> torch.Tensor:
        """Float32 ``[A, 4]`` anchors of one cell, in the order of the RPN's output channels."""
        return self.proposal_generator.anchor_generator.cell_anchors

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
