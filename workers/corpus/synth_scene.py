"""Scenes of the synthetic corpus: the shape/colour/size vocabulary, the layout of 1-4 shapes on a tinted
mid-grey background, and the rendering to RGB pixels (``workers.corpus.synth``'s module docstring: what the
corpus is and why it looks like this). Pure numpy + OpenCV; every draw comes from the caller's generator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from workers.corpus.synth import SynthConfig

# --- scene vocabulary -------------------------------------------------------------------------------------
COLOURS: dict[str, tuple[int, int, int]] = {  # name -> RGB; far from the mid-grey backgrounds and each other
    "red": (220, 30, 35),
    "yellow": (240, 220, 40),
    "green": (30, 170, 60),
    "blue": (40, 110, 255),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPE_ASPECTS: dict[str, float] = {  # name -> box width / height
    "pillar": 0.4,
    "diamond": 0.63,
    "circle": 1.0,
    "triangle": 1.6,
    "bar": 2.5,
}
SHAPES: tuple[str, ...] = tuple(SHAPE_ASPECTS)
ASPECT_JITTER = 0.06  # an object's aspect is its shape's times a factor uniform in [1 - j, 1 + j]
SIZES: dict[str, tuple[float, float]] = {  # name -> range of sqrt(half-width * half-height) / image side
    "small": (0.12, 0.15),
    "medium": (0.17, 0.2),
    "large": (0.22, 0.26),
}
BACKGROUND_KINDS: dict[str, str] = {"solid": "plain", "gradient": "gradient", "noise": "noisy"}
BACKGROUND_GREY = (110, 150)  # range of the background's base grey level, 0-255
BACKGROUND_TONES: dict[str, tuple[int, int, int]] = {
    "gray": (0, 0, 0),
    "warm": (12, 3, -12),
    "cool": (-12, 0, 12),
}
BACKGROUND_JITTER = 4  # per-channel uniform jitter of a background colour, 0-255 units
NOISE_STD = (9.0, 4.0)  # std of the smooth (1/8-resolution, shared by the channels) and per-pixel noise
REPEAT_PROBABILITY = 0.1  # chance that an object copies the previous object's colour and shape


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape. ``box_xyxy_px``: tight box of its full mask, ints, ``x2``/``y2`` exclusive."""

    shape: str
    colour: str
    size: str
    rgb: tuple[int, int, int]
    box_xyxy_px: tuple[int, int, int, int]

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        x1, y1, x2, y2 = self.box_xyxy_px
        return (x1 + x2) / 2.0, (y1 + y2) / 2.0


@dataclass(frozen=True)
class Scene:
    """A scene's content; ``objects`` in drawing order (later ones on top)."""

    image_id: int
    width_px: int
    height_px: int
    background_kind: str
    background_tone: str
    objects: tuple[SceneObject, ...]


# --- drawing ----------------------------------------------------------------------------------------------
def shape_polygon(shape: str, cx: float, cy: float, half_w: float, half_h: float) -> np.ndarray | None:
    """Vertices (float ``[K, 2]``, x/y pixels) of ``shape`` filling the box ``cx +- half_w, cy +- half_h``;
    None for the circle (an ellipse in that box).

    Raises:
        ValueError: unknown shape.
    """
    if shape == "circle":
        return None
    if shape in ("bar", "pillar"):
        pts = [(-half_w, -half_h), (half_w, -half_h), (half_w, half_h), (-half_w, half_h)]
    elif shape == "triangle":
        pts = [(0.0, -half_h), (half_w, half_h), (-half_w, half_h)]
    elif shape == "diamond":
        pts = [(0.0, -half_h), (half_w, 0.0), (0.0, half_h), (-half_w, 0.0)]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    return np.asarray(pts, dtype=np.float64) + np.array([cx, cy])


def shape_mask(
    shape: str, cx: float, cy: float, half_w: float, half_h: float, height_px: int, width_px: int
) -> np.ndarray:
    """bool ``[H, W]`` mask of ``shape`` centred at (cx, cy) pixels, half extents ``half_w``/``half_h`` px."""
    mask = np.zeros((height_px, width_px), dtype=np.uint8)
    poly = shape_polygon(shape, cx, cy, half_w, half_h)
    if poly is None:
        centre, axes = (round(cx), round(cy)), (round(half_w), round(half_h))
        cv2.ellipse(mask, centre, axes, 0.0, 0.0, 360.0, 1, thickness=-1, lineType=cv2.LINE_8)
    else:
        cv2.fillPoly(mask, [np.round(poly).astype(np.int32)], 1, lineType=cv2.LINE_8)
    return mask.astype(bool)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight ``xyxy`` box of a non-empty bool mask; x2/y2 exclusive. Raises ValueError if empty."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        raise ValueError("empty mask has no box")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _background_rgb(rng: np.random.Generator, tone: str) -> np.ndarray:
    grey = rng.uniform(*BACKGROUND_GREY)
    jitter = rng.uniform(-BACKGROUND_JITTER, BACKGROUND_JITTER, size=3)
    return np.clip(grey + np.array(BACKGROUND_TONES[tone]) + jitter, 0, 255)


def render_background(
    rng: np.random.Generator, kind: str, tone: str, height_px: int, width_px: int
) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB background: a tinted mid-grey solid colour, a linear gradient, or smooth noise.

    Raises:
        ValueError: unknown kind.
    """
    base = _background_rgb(rng, tone)
    if kind == "solid":
        image = np.broadcast_to(base, (height_px, width_px, 3)).astype(np.float64)
    elif kind == "gradient":
        other = _background_rgb(rng, tone)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:height_px, 0:width_px]
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        image = base * (1 - t[..., None]) + other * t[..., None]
    elif kind == "noise":
        coarse = rng.normal(0, NOISE_STD[0], size=(height_px // 8 + 1, width_px // 8 + 1))
        smooth = cv2.resize(coarse, (width_px, height_px), interpolation=cv2.INTER_CUBIC)  # [H, W]
        fine = rng.normal(0, NOISE_STD[1], size=(height_px, width_px, 3))
        image = base + smooth[..., None] + fine
    else:
        raise ValueError(f"unknown background kind {kind!r}; known: {tuple(BACKGROUND_KINDS)}")
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


# --- scene layout -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Placed:
    obj: SceneObject
    mask: np.ndarray


def _visible_enough(masks: Sequence[np.ndarray], min_fraction: float) -> bool:
    """True if every mask keeps ``min_fraction`` of its pixels once later masks are drawn over it."""
    covered = np.zeros_like(masks[0])
    for mask in reversed(masks):
        area = int(mask.sum())
        if area == 0 or (mask & ~covered).sum() < min_fraction * area:
            return False
        covered |= mask
    return True


def _try_place(
    rng: np.random.Generator,
    placed: list[_Placed],
    size: str,
    shape: str,
    side: int,
    config: SynthConfig,
) -> np.ndarray | None:
    r = rng.uniform(*SIZES[size]) * side
    aspect = SHAPE_ASPECTS[shape] * rng.uniform(1 - ASPECT_JITTER, 1 + ASPECT_JITTER)
    half_w, half_h = r * np.sqrt(aspect), r / np.sqrt(aspect)
    overlap = bool(placed) and rng.random() < config.overlap_probability
    for _ in range(config.placement_tries):
        if overlap:
            anchor = placed[int(rng.integers(len(placed)))].obj
            ax, ay = anchor.centre
            x1, y1, x2, y2 = anchor.box_xyxy_px
            reach = max(x2 - x1, y2 - y1) / 2 + max(half_w, half_h)
            angle = rng.uniform(0, 2 * np.pi)
            dist = rng.uniform(0.6, 0.9) * reach
            cx, cy = ax + dist * np.cos(angle), ay + dist * np.sin(angle)
        else:
            cx, cy = rng.uniform(half_w + 1, side - half_w - 1), rng.uniform(half_h + 1, side - half_h - 1)
        if not (half_w + 1 <= cx <= side - half_w - 1 and half_h + 1 <= cy <= side - half_h - 1):
            continue
        mask = shape_mask(shape, cx, cy, half_w, half_h, side, side)
        others = [p.mask for p in placed]
        if not overlap and any((mask & m).any() for m in others):
            continue
        if _visible_enough([*others, mask], config.min_visible_fraction):
            return mask
    return None


def make_scene(
    rng: np.random.Generator, image_id: int, config: SynthConfig
) -> tuple[Scene, list[np.ndarray]]:
    """Draw a scene's content and its object masks (bool ``[H, W]`` each, drawing order)."""
    side = int(rng.integers(config.min_side_px, config.max_side_px + 1))
    n = 1 + int(rng.choice(len(config.object_count_weights), p=config.object_count_weights))
    kind = str(rng.choice(list(BACKGROUND_KINDS)))
    tone = str(rng.choice(list(BACKGROUND_TONES)))
    placed: list[_Placed] = []
    for _ in range(n):
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        if placed and rng.random() < REPEAT_PROBABILITY:  # repeat an earlier object's type: counts > 1
            shape, colour = placed[-1].obj.shape, placed[-1].obj.colour
        size = str(rng.choice(list(SIZES)))
        mask = _try_place(rng, placed, size, shape, side, config)
        if mask is None:
            continue
        jitter = rng.integers(-config.colour_jitter, config.colour_jitter + 1, size=3)
        rgb = tuple(int(c) for c in np.clip(np.array(COLOURS[colour]) + jitter, 0, 255))
        obj = SceneObject(shape, colour, size, rgb, mask_box(mask))  # type: ignore[arg-type]
        placed.append(_Placed(obj, mask))
    scene = Scene(image_id, side, side, kind, tone, tuple(p.obj for p in placed))
    return scene, [p.mask for p in placed]


def render_scene(rng: np.random.Generator, scene: Scene, masks: Sequence[np.ndarray]) -> np.ndarray:
    """uint8 ``[H, W, 3]`` RGB image: background, then each object's mask filled with its colour in order."""
    image = render_background(
        rng, scene.background_kind, scene.background_tone, scene.height_px, scene.width_px
    )
    for obj, mask in zip(scene.objects, masks, strict=True):
        image[mask] = obj.rgb
    return image
