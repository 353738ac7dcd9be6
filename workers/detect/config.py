"""Configuration of the region detector and of its box selection (docs/design.md §2).

Two frozen dataclasses, passed whole and recorded in every store manifest through ``to_dict()``:

* ``DetectorConfig``: the network (trunk widths and depths, RPN, RoI pooling, heads) and its input scale.
  ``detector_config(name)`` returns one of the named configurations:

  - ``butd-r101-c4``: bottom-up attention (Anderson et al. 2018, peteanderson80/bottom-up-attention
    ``models/vg/ResNet-101/faster_rcnn_end2end_final/test.prototxt``), as MILVLG bottom-up-attention.pytorch
    ``configs/caffe/test-caffe-r101.yaml`` re-implements it: Caffe ResNet-101 C4 trunk (stride in the 1×1 conv,
    max-pool with ``ceil_mode``), RPN with 12 anchors (scales 4, 8, 16, 32 × stride 16, ratios 0.5, 1, 2)
    scored by a two-way softmax, RPN NMS 0.7, 6000 → 300 proposals, RoIPool 14×14 at 1/16, res5 head with
    **stride 1 and dilation 2** (the Caffe prototxt's ``res5a_branch2b``: ``dilation: 2, pad: 2``; MILVLG
    ``RES5_DILATION: 2``, which turns the first stride into 1), average-pooled to 2048-d, 1601 classes,
    attribute head 401. Input: BGR, mean subtraction only, short side 600, long side ≤ 1000.
  - ``tiny``: the same code path with a narrow, shallow trunk and small inputs, for CPU tests.

* ``BoxSelectionConfig``: which proposals become stored regions (``fixed`` K, ``adaptive`` 10..100 above a
  confidence threshold, or ``given`` boxes), as ``tools/generate_tsv.py`` of bottom-up-attention does.

Box convention: ``legacy_plus_one=True`` / ``area_plus_one=True`` use the legacy py-faster-rcnn /
maskrcnn-benchmark convention in which a box ``[x1, y1, x2, y2]`` covers ``x2 - x1 + 1`` pixels (areas,
intersections, the RPN min-size filter, anchor and delta decoding, clipping to ``W - 1``). The public
extractors and their weights use it; it is the default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from schemas.store import NUM_ATTRIBUTE_OUTPUTS, NUM_OBJECT_OUTPUTS

# Caffe pixel means of bottom-up attention (BGR order, 0..255), lib/fast_rcnn/config.py PIXEL_MEANS.
CAFFE_PIXEL_MEANS_BGR = (102.9801, 115.9465, 122.7717)
FEATURE_STRIDE_PX = 16  # res4 output stride of a C4 ResNet; RoIPool spatial scale is 1 / 16
RES5_CHANNEL_FACTOR = 8  # res5 has 8× the channels of res2 (2048 = 8 × 256)

# Documented autocast tolerance (docs/design.md §2 Device): under ``torch.autocast`` with this dtype, an image's region
# features at the same boxes stay within this relative L2 error of float32, ||f - f32|| / ||f32||. Measured
# on the CPU (seeded random init, COCO images): tiny bf16 0.3-0.9%, fp16 0.04-0.08% (4 images, 36 boxes);
# butd-r101-c4 bf16 0.74%, fp16 0.12% (1 image, 36 boxes). The boxes themselves may differ: the RPN's scores
# move, and near-tied proposals change rank. bench/gpu.sh measures both on CUDA.
AUTOCAST_FEATURE_TOLERANCE = {"bfloat16": 0.05, "float16": 0.01}

BoxMode = Literal["fixed", "adaptive", "given"]
BOX_MODES: tuple[str, ...] = ("fixed", "adaptive", "given")


@dataclass(frozen=True)
class DetectorConfig:
    """Architecture and input scale of the region detector.

    Attributes:
        name: configuration name (``butd-r101-c4`` | ``tiny``).
        stem_channels: output channels of the 7×7 stride-2 stem conv (64).
        stage_blocks: bottleneck blocks in res2, res3, res4 ((3, 4, 23) for ResNet-101).
        res2_out_channels: output channels of res2 (256); doubled at each later stage.
        res2_bottleneck_channels: bottleneck width of res2 (64); doubled at each later stage.
        res5_blocks: bottleneck blocks of the res5 RoI head (3).
        res5_first_stride: stride of the first res5 block (1 in the Caffe model, see module docstring).
        res5_dilation: dilation of the res5 3×3 convs (2 in the Caffe model).
        stride_in_1x1: put a block's stride in its first 1×1 conv (Caffe / MSRA) instead of the 3×3.
        bn_eps: epsilon of the frozen batch norms.
        rpn_conv_channels: channels of the RPN's 3×3 conv (512).
        anchor_scales: anchor sizes in units of ``feature_stride_px`` (4, 8, 16, 32 → 64..512 px).
        anchor_ratios: anchor aspect ratios h/w (0.5, 1, 2); 12 anchors per location.
        feature_stride_px: stride of the res4 feature map (16).
        rpn_pre_nms_top_n: proposals kept by RPN score before NMS (6000).
        rpn_nms_iou: RPN NMS IoU threshold (0.7); suppressed when IoU ``>=`` this (legacy CPU NMS,
            ``workers.detect.nms``).
        rpn_min_size_px: a proposal is kept when each side (``x2 - x1 + 1`` network px) is ``>`` this × scale
            (16; MILVLG ``BUABoxes.nonempty``; the Caffe ``proposal_layer.py`` kept ``>=``).
        num_proposals: proposals kept after RPN NMS (300).
        roi_pool_size: RoIPool output size (14 → 14×14).
        min_size_px: resize so the short side is this many px (600) ...
        max_size_px: ... unless the long side would exceed this (1000).
        pixel_means_bgr: subtracted from the BGR 0..255 image (Caffe: no std division).
        num_object_outputs: class outputs incl. background index 0 (1601).
        num_attribute_outputs: attribute outputs incl. "none" index 0 (401).
        with_attributes: build and run the attribute head.
        attr_embed_dim: embedding of the predicted class fed to the attribute head (256).
        attr_hidden_dim: hidden width of the attribute head (512).
        legacy_plus_one: legacy ``+1`` pixel convention in the RPN (decode, clip, min size, NMS areas).
        max_delta_log_wh: clamp of the RPN's log width/height deltas before ``exp`` (log(1000/16)).
        init_calibration_size_px: side of the seeded synthetic image that calibrates frozen-BN statistics
            of a random init.
    """

    name: str
    stem_channels: int
    stage_blocks: tuple[int, ...]
    res2_out_channels: int
    res2_bottleneck_channels: int
    res5_blocks: int
    res5_first_stride: int
    res5_dilation: int
    rpn_conv_channels: int
    anchor_scales: tuple[float, ...]
    rpn_pre_nms_top_n: int
    num_proposals: int
    min_size_px: int
    max_size_px: int
    init_calibration_size_px: int
    stride_in_1x1: bool = True
    bn_eps: float = 1e-5
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    feature_stride_px: int = FEATURE_STRIDE_PX
    rpn_nms_iou: float = 0.7
    rpn_min_size_px: float = 16.0
    roi_pool_size: int = 14
    pixel_means_bgr: tuple[float, float, float] = CAFFE_PIXEL_MEANS_BGR
    num_object_outputs: int = NUM_OBJECT_OUTPUTS
    num_attribute_outputs: int = NUM_ATTRIBUTE_OUTPUTS
    with_attributes: bool = True
    attr_embed_dim: int = 256
    attr_hidden_dim: int = 512
    legacy_plus_one: bool = True
    max_delta_log_wh: float = 4.135166556742356  # log(1000 / 16), as detectron2's Box2BoxTransform

    def __post_init__(self) -> None:
        if len(self.stage_blocks) != 3 or min(self.stage_blocks) < 1:
            raise ValueError(
                f"stage_blocks must give res2, res3, res4 block counts >= 1, got {self.stage_blocks}"
            )
        if self.feature_stride_px != FEATURE_STRIDE_PX:
            raise ValueError(
                f"feature_stride_px must be {FEATURE_STRIDE_PX} (C4 trunk), got {self.feature_stride_px}"
            )
        if not 0 < self.min_size_px <= self.max_size_px:
            raise ValueError(
                f"need 0 < min_size_px <= max_size_px, got {self.min_size_px}, {self.max_size_px}"
            )
        if self.res5_first_stride not in (1, 2) or self.res5_dilation not in (1, 2):
            raise ValueError("res5_first_stride and res5_dilation must be 1 or 2")
        if self.num_proposals < 1 or self.rpn_pre_nms_top_n < self.num_proposals:
            raise ValueError("need 1 <= num_proposals <= rpn_pre_nms_top_n")
        if self.num_object_outputs < 2:
            raise ValueError("num_object_outputs must count background plus at least one class")

    @property
    def feature_dim(self) -> int:
        """Size D of a region feature (res5 output channels; 2048 for ResNet-101)."""
        return self.res2_out_channels * RES5_CHANNEL_FACTOR

    @property
    def num_anchors(self) -> int:
        """Anchors per feature-map location (12 = 4 scales × 3 ratios)."""
        return len(self.anchor_scales) * len(self.anchor_ratios)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field plus ``feature_dim`` (tuples become lists)."""
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        out["feature_dim"] = self.feature_dim
        return out


_CONFIGS: dict[str, DetectorConfig] = {
    "butd-r101-c4": DetectorConfig(
        name="butd-r101-c4",
        stem_channels=64,
        stage_blocks=(3, 4, 23),
        res2_out_channels=256,
        res2_bottleneck_channels=64,
        res5_blocks=3,
        res5_first_stride=1,
        res5_dilation=2,
        rpn_conv_channels=512,
        anchor_scales=(4.0, 8.0, 16.0, 32.0),
        rpn_pre_nms_top_n=6000,
        num_proposals=300,
        min_size_px=600,
        max_size_px=1000,
        init_calibration_size_px=224,
    ),
    "tiny": DetectorConfig(
        name="tiny",
        stem_channels=16,
        stage_blocks=(1, 1, 2),
        res2_out_channels=8,
        res2_bottleneck_channels=8,
        res5_blocks=1,
        res5_first_stride=1,
        res5_dilation=2,
        rpn_conv_channels=32,
        anchor_scales=(2.0, 4.0, 8.0, 16.0),  # 32..256 px anchors for ~256 px inputs
        rpn_pre_nms_top_n=600,
        num_proposals=50,
        min_size_px=256,  # at 96 px a 20-px object covered ~1 res4 cell: colour probe 0.83 vs 0.98 here
        max_size_px=400,
        init_calibration_size_px=256,
        attr_embed_dim=16,
        attr_hidden_dim=32,
    ),
}


def detector_config(name: str) -> DetectorConfig:
    """The named detector configuration.

    Raises:
        ValueError: ``name`` is not one of the known configurations (the message lists them).
    """
    try:
        return _CONFIGS[name]
    except KeyError:
        raise ValueError(
            f"unknown detector config {name!r}; valid names: {', '.join(sorted(_CONFIGS))}"
        ) from None


def detector_config_names() -> tuple[str, ...]:
    """Names accepted by ``detector_config`` (for CLI choices)."""
    return tuple(sorted(_CONFIGS))


@dataclass(frozen=True)
class BoxSelectionConfig:
    """Which detector proposals become stored regions (bottom-up-attention ``generate_tsv.py``).

    For each foreground class c, greedy NMS at ``nms_iou`` over the proposals scored by class c; a proposal's
    ``max_conf`` is its highest class score among the classes in which it survived (0 if none). ``adaptive``
    keeps proposals with ``max_conf >= conf_threshold`` (in proposal order), at least ``min_boxes`` and at most
    ``max_boxes`` (when clamped: the top ones by ``max_conf``, descending; ``workers.detect.selection``);
    ``fixed`` applies the same rule with min = max = ``num_boxes``;
    ``given`` pools features for boxes supplied with each image and selects nothing.

    Attributes:
        mode: ``fixed`` | ``adaptive`` | ``given``.
        num_boxes: K of ``fixed`` mode (36).
        min_boxes: floor of ``adaptive`` mode (10).
        max_boxes: cap of ``adaptive`` mode (100).
        conf_threshold: ``max_conf`` threshold of ``adaptive`` mode (0.2), kept when ``>=``.
        nms_iou: per-class NMS threshold (0.3); a proposal is suppressed when IoU ``>=`` this (legacy CPU NMS,
            ``workers.detect.nms``).
        area_plus_one: legacy ``+1`` pixel areas in the NMS IoU (maskrcnn-benchmark / py-faster-rcnn).
    """

    mode: BoxMode = "adaptive"
    num_boxes: int = 36
    min_boxes: int = 10
    max_boxes: int = 100
    conf_threshold: float = 0.2
    nms_iou: float = 0.3
    area_plus_one: bool = True

    def __post_init__(self) -> None:
        if self.mode not in BOX_MODES:
            raise ValueError(f"box mode must be one of {BOX_MODES}, got {self.mode!r}")
        if self.num_boxes < 1:
            raise ValueError(f"num_boxes must be >= 1, got {self.num_boxes}")
        if not 1 <= self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 1 <= min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")
        if not 0.0 <= self.nms_iou <= 1.0:
            raise ValueError(f"nms_iou must be in [0, 1], got {self.nms_iou}")

    @property
    def box_limits(self) -> tuple[int, int]:
        """(floor, cap) on the number of boxes kept per image: (K, K) for fixed, (min, max) for adaptive."""
        if self.mode == "fixed":
            return self.num_boxes, self.num_boxes
        return self.min_boxes, self.max_boxes

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of every field."""
        return dataclasses.asdict(self)
