"""The legacy greedy NMS of the public bottom-up-attention extractors, and its IoU (docs/design.md §2).

Both NMS steps of the detector follow the legacy **CPU** NMS, which MILVLG bottom-up-attention.pytorch runs
when it extracts on the CPU (``bua/caffe/modeling/layers/csrc/nms/nms_cpu.cpp``, from maskrcnn-benchmark) and
which the Caffe original ships as py-faster-rcnn ``lib/nms/cpu_nms.pyx``:

* a box ``[x1, y1, x2, y2]`` covers ``x2 - x1 + 1`` pixels (areas and intersections);
* ``IoU = inter / (area_i + area_j - inter)`` in float32;
* a lower-ranked box is suppressed when ``IoU >= threshold`` (the threshold a float32, as ``nms_cpu``'s
  ``const float threshold``).

The GPU kernels of the same projects (``nms.cu`` of maskrcnn-benchmark / MILVLG, py-faster-rcnn
``nms_kernel.cu``, which the Caffe ``generate_tsv.py`` uses by default) and py-faster-rcnn's
``py_cpu_nms.py`` suppress at ``IoU > threshold`` instead: the references disagree with themselves when an IoU
equals the threshold exactly, and we follow the CPU one, which the parity check runs.

Ranking: the caller passes boxes already in rank order; ties in the score are therefore broken by the
caller's (stable) order. ``nms_cpu`` sorts with an unstable ``sort``, so among equal scores its order is
arbitrary (it depends on the torch version and the array length).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import nms as _torchvision_nms


def suppression_threshold(iou_threshold: float) -> torch.Tensor:
    """The float32 threshold the legacy CPU NMS compares with (``IoU >= this`` suppresses), as a 0-d tensor."""
    return torch.tensor(iou_threshold, dtype=torch.float32)


def legacy_iou(boxes_xyxy: torch.Tensor, *, plus_one: bool = True) -> torch.Tensor:
    """Pairwise IoU with ``+1`` pixel sides, float32, in ``nms_cpu.cpp``'s order of operations.

    Args:
        boxes_xyxy: float ``[P, 4]``, ``xyxy`` pixels.
        plus_one: the legacy convention (a box covers ``x2 - x1 + 1`` pixels); False: ``x2 - x1``.

    Returns:
        float32 ``[P, P]``.
    """
    one = 1.0 if plus_one else 0.0
    x1, y1, x2, y2 = boxes_xyxy.float().unbind(dim=1)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    w = (torch.minimum(x2[:, None], x2[None]) - torch.maximum(x1[:, None], x1[None]) + one).clamp_min(0.0)
    h = (torch.minimum(y2[:, None], y2[None]) - torch.maximum(y1[:, None], y1[None]) + one).clamp_min(0.0)
    inter = w * h
    return inter / (areas[:, None] + areas[None] - inter)


def legacy_nms_ranked(
    boxes_xyxy: torch.Tensor, iou_threshold: float, *, plus_one: bool = True
) -> torch.Tensor:
    """Greedy NMS over boxes given in rank order (best first); indices of the kept boxes, ascending.

    Runs torchvision's compiled ``nms`` on ``[x1, y1, x2 + 1, y2 + 1]`` with the threshold lowered to the
    float32 just below ``float32(iou_threshold)``: torchvision suppresses at ``IoU > t``, and for float32 IoUs
    ``> nextafter(f, -inf)`` is ``>= f``, the legacy CPU rule. The ``+1`` shift gives the legacy IoU up to the
    float32 rounding of the shift (``(x2 + 1) - x1`` against ``x2 - x1 + 1``).

    Args:
        boxes_xyxy: float32 ``[N, 4]``, ``xyxy`` pixels, best first.
        iou_threshold: suppress a lower-ranked box when its IoU with a kept one is ``>=`` this.
        plus_one: the legacy ``+1`` convention (else plain IoU).

    Returns:
        int64 ``[K]`` ascending indices (rank order).
    """
    threshold = float(np.nextafter(np.float32(iou_threshold), np.float32(-np.inf)))
    rank_scores = torch.arange(boxes_xyxy.shape[0], 0, -1, device=boxes_xyxy.device, dtype=torch.float32)
    one = 1.0 if plus_one else 0.0
    shifted = boxes_xyxy.float() + boxes_xyxy.new_tensor([0.0, 0.0, one, one], dtype=torch.float32)
    return _torchvision_nms(shifted, rank_scores, threshold)
