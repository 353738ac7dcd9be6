"""Caption and metadata members of a sample: ``.txt`` / ``.json`` parsing, given boxes, ``image_id`` (§1, §9).

- ``.txt``: UTF-8 (a leading BOM is dropped); the whole member, whitespace-stripped, is one caption.
- ``.json``: a UTF-8 JSON object that may hold ``caption`` (str) or ``captions`` (list of str) — not both —,
  ``image_id`` (int), ``boxes`` (``[[x1, y1, x2, y2], ...]`` pixels) and ``box_format`` (``"xyxy"``, the
  default, or ``"xywh"`` as in COCO / RefCOCO, converted to xyxy).
- Captions are whitespace-stripped and empty ones are dropped; whether an empty list is an error is the
  reader's decision (``--captions required``).
- ``image_id``: from the JSON, else from a COCO-style key basename (``COCO_train2014_000000458752`` or
  ``000000458752`` -> 458752), else ``None``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

import numpy as np

from schemas.reasons import ErrorReason, SampleRejected
from schemas.store import boxes_not_inside

BOX_FORMATS = ("xyxy", "xywh")
BOX_TOLERANCE_PX = 1.0  # coordinates up to this far outside the image are clipped onto its border
INT64_MAX = 2**63 - 1
_COCO_NAME = re.compile(r"^(?:COCO_[A-Za-z]+\d*_)?(\d{1,18})$")


@dataclass(frozen=True)
class JsonMetadata:
    """What a sample's ``.json`` member holds.

    Attributes:
        captions: stripped non-empty captions, or ``None`` when the JSON has no caption field.
        image_id: int64 image id, or ``None``.
        boxes_xyxy_px: float32 ``[N, 4]`` xyxy pixels (converted from xywh when so declared, not yet
            checked against the image size), or ``None`` when the JSON has no ``boxes`` field.
    """

    captions: tuple[str, ...] | None
    image_id: int | None
    boxes_xyxy_px: np.ndarray | None


def _decode_utf8(data: bytes, member: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SampleRejected(
            ErrorReason.CAPTION_NOT_UTF8, f"{member}: invalid UTF-8 at byte {exc.start}"
        ) from None


def _invalid(member: str, what: str) -> SampleRejected:
    return SampleRejected(ErrorReason.CAPTION_INVALID, f"{member}: {what}")


def clean_captions(captions: list[str]) -> tuple[str, ...]:
    """Strip whitespace and drop empty captions."""
    stripped = (caption.strip() for caption in captions)
    return tuple(caption for caption in stripped if caption)


def parse_text_caption(data: bytes, member: str) -> tuple[str, ...]:
    """A ``.txt`` member -> one caption (empty tuple when blank).

    Raises:
        SampleRejected: ``caption_not_utf8``.
    """
    return clean_captions([_decode_utf8(data, member)])


def parse_json_metadata(data: bytes, member: str) -> JsonMetadata:
    """A ``.json`` member -> ``JsonMetadata``.

    Raises:
        SampleRejected: ``caption_not_utf8``, ``caption_json_invalid`` (not JSON), ``caption_invalid``
            (not an object, fields of the wrong type), ``boxes_invalid`` (malformed boxes).
    """
    text = _decode_utf8(data, member)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SampleRejected(
            ErrorReason.CAPTION_JSON_INVALID, f"{member}: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise SampleRejected(ErrorReason.CAPTION_JSON_INVALID, f"{member}: nested too deeply") from None
    if not isinstance(obj, dict):
        raise _invalid(member, f"JSON top level is {type(obj).__name__}, not an object")
    return JsonMetadata(
        captions=_json_captions(obj, member),
        image_id=_json_image_id(obj, member),
        boxes_xyxy_px=_json_boxes(obj, member),
    )


def _json_captions(obj: dict, member: str) -> tuple[str, ...] | None:
    if "caption" in obj and "captions" in obj:
        raise _invalid(member, "has both 'caption' and 'captions'")
    if "caption" in obj:
        if not isinstance(obj["caption"], str):
            raise _invalid(member, f"'caption' is {type(obj['caption']).__name__}, not a string")
        return clean_captions([obj["caption"]])
    if "captions" in obj:
        value = obj["captions"]
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise _invalid(member, "'captions' is not a list of strings")
        return clean_captions(value)
    return None


def _json_image_id(obj: dict, member: str) -> int | None:
    value = obj.get("image_id")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INT64_MAX:
        raise _invalid(member, f"'image_id' must be a non-negative int64, got {value!r:.40}")
    return value


def _json_boxes(obj: dict, member: str) -> np.ndarray | None:
    if "boxes" not in obj:
        return None
    box_format = obj.get("box_format", "xyxy")
    if box_format not in BOX_FORMATS:
        raise SampleRejected(
            ErrorReason.BOXES_INVALID, f"{member}: box_format {box_format!r:.40} not in {BOX_FORMATS}"
        )
    return parse_boxes(obj["boxes"], box_format, member)


def parse_boxes(value: object, box_format: str, member: str) -> np.ndarray:
    """``[[a, b, c, d], ...]`` (finite numbers) -> float32 ``[N, 4]`` xyxy; xywh is converted.

    Raises:
        SampleRejected: ``boxes_invalid``.
    """
    if not isinstance(value, list) or not all(_is_box(box) for box in value):
        raise SampleRejected(
            ErrorReason.BOXES_INVALID, f"{member}: 'boxes' must be a list of 4 finite numbers each"
        )
    boxes = np.asarray(value, dtype=np.float64).reshape(len(value), 4)
    if box_format == "xywh":
        boxes[:, 2:] += boxes[:, :2]
    return boxes.astype(np.float32)


def _is_box(box: object) -> bool:
    return (
        isinstance(box, list)
        and len(box) == 4
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    )


def validate_boxes(boxes_xyxy_px: np.ndarray, width_px: int, height_px: int) -> np.ndarray:
    """Check xyxy pixel boxes against the (EXIF-oriented) image size; return them clipped to it.

    Coordinates up to ``BOX_TOLERANCE_PX`` outside the image are clipped onto its border (COCO's float
    boxes sometimes end a fraction of a pixel past it); after clipping ``0 <= x1 < x2 <= W`` and
    ``0 <= y1 < y2 <= H`` must hold.

    Raises:
        SampleRejected: ``boxes_invalid`` naming the first bad box.
    """
    limits = np.array([width_px, height_px, width_px, height_px], dtype=np.float32)
    outside = (boxes_xyxy_px < -BOX_TOLERANCE_PX) | (boxes_xyxy_px > limits + BOX_TOLERANCE_PX)
    clipped = np.clip(boxes_xyxy_px, 0.0, limits)
    bad = np.flatnonzero(outside.any(axis=1) | boxes_not_inside(clipped, width_px, height_px))
    if bad.size:
        i = int(bad[0])
        raise SampleRejected(
            ErrorReason.BOXES_INVALID,
            f"box {i} {[round(float(v), 3) for v in boxes_xyxy_px[i]]} is empty or outside the "
            f"{width_px}x{height_px} image ({bad.size} bad boxes)",
        )
    return clipped.astype(np.float32)


def image_id_from_key(key: str) -> int | None:
    """COCO-style id from the key's basename: ``COCO_train2014_000000458752`` / ``000000458752`` -> 458752.

    Any other basename -> ``None``.
    """
    match = _COCO_NAME.match(key.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None
