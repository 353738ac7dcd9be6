"""Seeded random init of the detector and the frozen-BN calibration that keeps it usable (docs/design.md §2).

Without ``--weights`` the detector runs this init: it must still give finite, non-degenerate outputs, also
under float16 (a plain random ResNet-101 with frozen batch norm overflows float16).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import FrozenBatchNorm2d

from workers.detect.backbone import ConvNorm
from workers.detect.config import DetectorConfig
from workers.detect.network import RegionDetectorModel

_LAST_NORM_BIAS = 3.0  # random init: the region features' last ReLU input, see calibrate_frozen_bn_
_PREDICTOR_STD = 0.01  # Caffe gaussian filler of cls_score, attr layers, class embedding
_BBOX_PRED_STD = 0.001  # Caffe gaussian filler of bbox_pred


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
    assert conv.bias is not None, name  # the RPN convs have biases
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
    docs/design.md §2's "every feature dimension varies across an image's boxes".
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
