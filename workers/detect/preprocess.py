"""Detector input: validation of images and given boxes, resize and mean subtraction as the Caffe extractors.

py-faster-rcnn ``lib/fast_rcnn/test.py`` ``_get_image_blob`` and MILVLG ``utils/extract_utils.py``
``get_image_blob``: BGR, subtract the Caffe pixel means, resize by one scale with OpenCV's bilinear filter.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from schemas.store import boxes_not_inside
from workers.detect.config import DetectorConfig


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


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the network.

    Attributes:
        tensor: float32 ``[3, h, w]`` BGR minus pixel means, resized (unpadded).
        scale: network-input pixels per original pixel.
        original_size: ``(H, W)`` of the original image, px.
        given_boxes: float32 ``[N, 4]`` ``xyxy`` original pixels, or None (use proposals).
    """

    tensor: torch.Tensor
    scale: float
    original_size: tuple[int, int]
    given_boxes: np.ndarray | None


def prepare_image(image_rgb: np.ndarray, config: DetectorConfig) -> tuple[torch.Tensor, float]:
    """uint8 RGB ``[H, W, 3]`` → float32 BGR − means ``[3, h, w]`` resized bilinearly, and its scale.

    As the Caffe and MILVLG extractors (py-faster-rcnn ``lib/fast_rcnn/test.py`` ``_get_image_blob``, MILVLG
    ``utils/extract_utils.py`` ``get_image_blob``): subtract the float64 means in place from the float32 image
    (numpy computes each difference in float64 and rounds it once to float32; subtracting float32 means
    rounds the means first, up to 4e-6 apart), then
    ``cv2.resize(im, None, None, fx=scale, fy=scale, interpolation=cv2.INTER_LINEAR)``. Passing the scale
    (not the output size) matters: OpenCV samples source pixel ``(x + 0.5) / fx - 0.5`` for output ``x``, and
    with an explicit size it uses ``w_out / w`` instead of ``fx``, a different grid for most images.

    An aspect ratio beyond ~2 · max_size_px : 1 rounds the short side to 0 px, which OpenCV refuses (the
    reference extractors fail there); such an image is resized to 1 px on that side through an explicit size.
    """
    height, width = image_rgb.shape[:2]
    out_h, out_w, scale = resized_size(height, width, config)
    bgr = image_rgb[:, :, ::-1].astype(np.float32)
    bgr -= np.asarray(
        config.pixel_means_bgr, dtype=np.float64
    )  # in float64, stored float32 (as the reference)
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
    bad = boxes_not_inside(arr, width, height)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"image {index}: given box {first} {arr[first].tolist()} is not inside the {width}x{height} image "
            "with x1 < x2 and y1 < y2"
        )
    return arr.astype(np.float32)
