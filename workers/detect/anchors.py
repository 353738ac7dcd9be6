"""Caffe anchors and R-CNN box decoding of the RPN (py-faster-rcnn ``generate_anchors.py``,
``bbox_transform_inv``), legacy ``+1`` convention."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from workers.detect.config import DetectorConfig


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
        self.cell_anchors: torch.Tensor
        self.register_buffer("cell_anchors", torch.from_numpy(cells), persistent=False)
        self.stride = config.feature_stride_px

    def forward(self, height: int, width: int) -> torch.Tensor:
        """Anchors of an ``height × width`` feature map, float32 ``[height·width·A, 4]``, (y, x, anchor) order."""
        ys = torch.arange(height, device=self.cell_anchors.device, dtype=torch.float32) * self.stride
        xs = torch.arange(width, device=self.cell_anchors.device, dtype=torch.float32) * self.stride
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        shifts = torch.stack([xx, yy, xx, yy], dim=-1).reshape(-1, 1, 4)
        return (shifts + self.cell_anchors[None]).reshape(-1, 4)


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
