"""Drawing region boxes and their labels on an image with OpenCV (used by ``regionflow visualize``).

Boxes are ``xyxy`` in original-image pixels (the store's ``boxes_xyxy_px``); the picture may be drawn
scaled up (``DrawingConfig.scale``) so that labels stay legible on small images. A box's colour depends on
its class id only (same class, same colour), from ``class_colour``.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

GOLDEN_RATIO_CONJUGATE = 0.618033988749895  # hue step that keeps consecutive class colours far apart
PALETTE_SATURATION = 0.85
PALETTE_VALUE = 0.95
FONT = cv2.FONT_HERSHEY_SIMPLEX
LABEL_PADDING_PX = 2
LOW_CONFIDENCE = 0.01  # below this a confidence is written in scientific notation


@dataclass(frozen=True)
class DrawingConfig:
    """How boxes are drawn.

    Attributes:
        scale (float, 1.0): the output is the image resized by this factor (> 0); boxes are scaled with it.
        line_thickness_px (int, 2): box outline thickness in output pixels.
        font_scale (float, 0.4): OpenCV Hershey font scale of the labels.
        max_boxes (int, 0): draw only the ``max_boxes`` most confident boxes; 0 = all.
    """

    scale: float = 1.0
    line_thickness_px: int = 2
    font_scale: float = 0.4
    max_boxes: int = 0

    def __post_init__(self) -> None:
        if not self.scale > 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if self.line_thickness_px < 1 or self.font_scale <= 0 or self.max_boxes < 0:
            raise ValueError("need line_thickness_px >= 1, font_scale > 0 and max_boxes >= 0")


@dataclass(frozen=True)
class RegionLabel:
    """What is written beside one box: class id (1..1600 for the bottom-up-attention vocabulary; 0 is
    background), its confidence in ``[0, 1]``, and the class name when a vocabulary is known."""

    class_id: int
    confidence: float
    name: str | None = None

    @property
    def text(self) -> str:
        """``"name 0.88"``, or ``"#id 7.6e-04"`` (confidences below 0.01, e.g. a random-init detector's)."""
        conf = f"{self.confidence:.2f}" if self.confidence >= LOW_CONFIDENCE else f"{self.confidence:.1e}"
        return f"{self.name or f'#{self.class_id}'} {conf}"


def class_colour(class_id: int) -> tuple[int, int, int]:
    """RGB (0-255) colour of a class: hue stepped by the golden ratio, fixed saturation and value."""
    hue = (class_id * GOLDEN_RATIO_CONJUGATE) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, PALETTE_SATURATION, PALETTE_VALUE)
    return round(r * 255), round(g * 255), round(b * 255)


def class_name(class_id: int, object_vocabulary: Sequence[str] | None) -> str | None:
    """Name of detector class ``class_id`` in the bottom-up-attention convention: class ``i + 1`` is
    vocabulary entry ``i`` (index 0 is background); first synonym of a comma-separated entry. None when
    there is no vocabulary or the id is outside it."""
    if object_vocabulary is None or not 1 <= class_id <= len(object_vocabulary):
        return None
    return object_vocabulary[class_id - 1].split(",")[0].strip()


def draw_regions(
    image_rgb: np.ndarray,
    boxes_xyxy_px: np.ndarray,
    labels: Sequence[RegionLabel],
    config: DrawingConfig | None = None,
) -> np.ndarray:
    """Draw each box and its label on a copy of the image.

    Args:
        image_rgb: uint8 ``[H, W, 3]`` RGB.
        boxes_xyxy_px: float ``[N, 4]`` boxes ``(x1, y1, x2, y2)`` in the image's pixels.
        labels: ``N`` labels, one per box.
        config: drawing options (default ``DrawingConfig()``).

    Returns:
        uint8 ``[round(H * scale), round(W * scale), 3]`` RGB.

    Raises:
        ValueError: the image is not uint8 ``[H, W, 3]``, the boxes not ``[N, 4]``, or ``len(labels) != N``.
    """
    config = config or DrawingConfig()
    if image_rgb.dtype != np.uint8 or image_rgb.ndim != 3 or image_rgb.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {image_rgb.dtype} {image_rgb.shape}")
    boxes = np.asarray(boxes_xyxy_px, dtype=np.float64).reshape(-1, 4)
    if len(labels) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    h, w = image_rgb.shape[:2]
    out_size = (max(1, round(w * config.scale)), max(1, round(h * config.scale)))
    canvas = cv2.resize(image_rgb, out_size, interpolation=cv2.INTER_NEAREST)
    order = sorted(range(len(labels)), key=lambda i: -labels[i].confidence)
    if config.max_boxes:
        order = order[: config.max_boxes]
    for i in reversed(order):  # the most confident box is drawn last, on top
        _draw_one(canvas, boxes[i] * config.scale, labels[i], config)
    return canvas


def _draw_one(canvas: np.ndarray, box: np.ndarray, label: RegionLabel, config: DrawingConfig) -> None:
    colour = class_colour(label.class_id)
    h, w = canvas.shape[:2]
    x1, y1 = int(np.clip(np.floor(box[0]), 0, w - 1)), int(np.clip(np.floor(box[1]), 0, h - 1))
    x2, y2 = int(np.clip(np.ceil(box[2]) - 1, 0, w - 1)), int(np.clip(np.ceil(box[3]) - 1, 0, h - 1))
    cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, config.line_thickness_px, lineType=cv2.LINE_8)
    (tw, th), baseline = cv2.getTextSize(label.text, FONT, config.font_scale, 1)
    box_h = th + baseline + 2 * LABEL_PADDING_PX
    top = y1 - box_h if y1 - box_h >= 0 else min(y1, h - box_h)  # above the box, else inside it
    left = min(x1, max(0, w - tw - 2 * LABEL_PADDING_PX))
    cv2.rectangle(canvas, (left, top), (left + tw + 2 * LABEL_PADDING_PX, top + box_h), colour, -1)
    text_colour = (0, 0, 0) if sum(colour) > 3 * 128 else (255, 255, 255)
    origin = (left + LABEL_PADDING_PX, top + LABEL_PADDING_PX + th)
    cv2.putText(canvas, label.text, origin, FONT, config.font_scale, text_colour, 1, lineType=cv2.LINE_AA)


RANDOM_INIT_TEXTS = (  # the longest that fits the picture's width is written
    "RANDOM-INIT DETECTOR: boxes and labels carry no meaning",
    "RANDOM-INIT DETECTOR: no meaning",
    "RANDOM-INIT DETECTOR",
    "RANDOM INIT",
)
RANDOM_INIT_BAND_BGR = (0, 0, 200)  # dark red in OpenCV's BGR order; the picture is RGB, see mark_random_init
RANDOM_INIT_BAND_RGB = RANDOM_INIT_BAND_BGR[::-1]
MIN_BAND_FONT_SCALE = 0.25


def mark_random_init(picture_rgb: np.ndarray, font_scale: float = 0.4) -> np.ndarray:
    """``picture_rgb`` with a dark red band added under it saying the detector was a random init.

    The band is added below the picture (no pixel of the picture is covered), as tall as one line of text
    plus padding; the text is the longest of ``RANDOM_INIT_TEXTS`` that fits the width at ``font_scale``, the
    shortest one shrunk to fit otherwise (down to ``MIN_BAND_FONT_SCALE``: a picture a few pixels wide still
    gets a band of about 10 px, its text cut).

    Args:
        picture_rgb: uint8 ``[H, W, 3]`` RGB (``draw_regions``' output).
        font_scale: OpenCV Hershey font scale (``DrawingConfig.font_scale``).

    Returns:
        uint8 ``[H + band, W, 3]`` RGB.
    """
    width = picture_rgb.shape[1]
    usable = max(1, width - 2 * LABEL_PADDING_PX)
    text = next(
        (t for t in RANDOM_INIT_TEXTS if cv2.getTextSize(t, FONT, font_scale, 1)[0][0] <= usable),
        RANDOM_INIT_TEXTS[-1],
    )
    text_w = cv2.getTextSize(text, FONT, font_scale, 1)[0][0]
    if text_w > usable:  # shrunk to fit, but never below MIN_BAND_FONT_SCALE (then clipped at the right)
        font_scale = max(MIN_BAND_FONT_SCALE, font_scale * usable / text_w)
    (_, text_h), baseline = cv2.getTextSize(text, FONT, font_scale, 1)
    band = np.empty((text_h + baseline + 2 * LABEL_PADDING_PX, width, 3), np.uint8)
    band[:] = RANDOM_INIT_BAND_RGB
    origin = (LABEL_PADDING_PX, LABEL_PADDING_PX + text_h)
    cv2.putText(band, text, origin, FONT, font_scale, (255, 255, 255), 1, lineType=cv2.LINE_AA)
    return np.concatenate([picture_rgb, band], axis=0)
