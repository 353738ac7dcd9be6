"""The embedded default corpus: procedural scenes of coloured shapes (DESIGN §8).

Each square image holds 1-4 flat shapes (circle, triangle, diamond, bar, pillar) in one of six colours and
three sizes, on a mid-grey solid, gradient or noise background with a warm, cool or neutral tint; some shapes
overlap (every shape keeps at least ``SynthConfig.min_visible_fraction`` of its pixels visible). From the
scene, not from the pixels, come:

* several captions per image, each naming every object (attributes, counts, spatial relations, background),
  e.g. "a red circle left of a blue bar", "two green triangles and a yellow pillar";
* VQA v2 questions of five types (colour, shape, count, yes/no existence, yes/no relation) with ten
  annotator answers each, of which a few (seeded) disagree with the true answer as real annotators do;
* the true boxes, ``xyxy`` in pixels, tight around each shape's full (unoccluded) mask:
  ``0 <= x1 < x2 <= W``; ``x2``/``y2`` are exclusive (one past the last pixel column/row).

Designed to be learnable through a detector *without weights* (none can be downloaded; ``extract --config
tiny --boxes given`` pools random-init features for the true boxes). Measured with an MLP probe on such
features of single boxes: outline shape is not recoverable from average-pooled random features (0.29 on
six outlines, chance 0.18, also with a random 2048-d ResNet-101), colour partly is (0.44 with eight hues on
varied backgrounds, 0.84 with the six colours here on mid-grey backgrounds). So every shape has its own box
aspect ratio (``SHAPE_ASPECTS``, log-spaced 1.6x apart), which the model reads exactly from the box
location input, images are square so that the normalised box keeps that aspect, colours differ in
luminance as well as hue, and backgrounds stay mid-grey. Sizes, counts and spatial relations are carried by
the boxes too.

Pure numpy + OpenCV, no Ray. Deterministic: image ``i`` is drawn from ``SeedSequence([seed, i])`` alone, so a
seed gives byte-identical shards and JSON files whatever the shard size.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from workers.corpus.tar_writer import write_tar

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
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}

# Neighbours an annotator may confuse an answer with (plausible disagreement, as in real VQA annotations).
SIMILAR_COLOURS = {
    "red": ("yellow", "black"),
    "yellow": ("white", "green"),
    "green": ("yellow", "blue"),
    "blue": ("black", "green"),
    "white": ("yellow",),
    "black": ("blue",),
}
SIMILAR_SHAPES = {
    "pillar": ("bar", "diamond"),
    "diamond": ("triangle", "circle"),
    "circle": ("diamond",),
    "triangle": ("diamond",),
    "bar": ("pillar",),
}

VQA_ANSWERS_PER_QUESTION = 10
QUESTION_ID_STRIDE = 100  # question_id = image_id * 100 + j, as COCO-based VQA derives ids from image ids
SHARD_PREFIX = "synth-"
QUESTIONS_FILE = "questions.json"
ANNOTATIONS_FILE = "annotations.json"
SUMMARY_FILE = "synth-summary.json"
SHARD_ID_DIGITS = 6


@dataclass(frozen=True)
class SynthConfig:
    """Configuration of the scene generator.

    Attributes:
        min_side_px (int, 128), max_side_px (int, 192): the side of the square image is drawn uniformly in this range.
        object_count_weights (tuple[float, ...], (0.08, 0.37, 0.33, 0.22)): probability of 1, 2, 3, 4 objects.
        overlap_probability (float, 0.25): chance that a shape is placed overlapping an earlier one.
        min_visible_fraction (float, 0.6): every shape keeps at least this share of its pixels unoccluded.
        relation_margin (float, 0.12): two centres must differ by this fraction of min(W, H), along the
            dominant axis, for a spatial relation to be stated.
        colour_jitter (int, 14): per-channel uniform jitter (0-255 units) of an object's colour.
        captions_per_image (int, 5): captions written per image (one per caption template, in seeded order).
        jpeg_quality (int, 95): OpenCV JPEG quality.
        placement_tries (int, 60): random placements tried per object before the object is dropped.
    """

    min_side_px: int = 128
    max_side_px: int = 192
    object_count_weights: tuple[float, ...] = (0.08, 0.37, 0.33, 0.22)
    overlap_probability: float = 0.25
    min_visible_fraction: float = 0.6
    relation_margin: float = 0.12
    colour_jitter: int = 14
    captions_per_image: int = 5
    jpeg_quality: int = 95
    placement_tries: int = 60

    def __post_init__(self) -> None:
        if not 16 <= self.min_side_px <= self.max_side_px:
            raise ValueError(
                f"need 16 <= min_side_px <= max_side_px, got {self.min_side_px}, {self.max_side_px}"
            )
        if not self.object_count_weights or abs(sum(self.object_count_weights) - 1.0) > 1e-6:
            raise ValueError("object_count_weights must be non-empty and sum to 1")
        if not 1 <= self.captions_per_image <= len(CAPTION_TEMPLATES):
            raise ValueError(f"captions_per_image must be in [1, {len(CAPTION_TEMPLATES)}]")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError("jpeg_quality must be in [1, 100]")


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


@dataclass(frozen=True)
class VqaQuestion:
    """One VQA v2 question with its ten annotator answers (``answers[0]`` is annotator 1's)."""

    question_id: int
    image_id: int
    question: str
    question_type: str
    answer_type: str
    answer: str
    answers: tuple[str, ...]
    confidences: tuple[str, ...]


@dataclass(frozen=True)
class SynthSample:
    """One generated sample. ``image_rgb``: uint8 ``[H, W, 3]`` RGB."""

    key: str
    scene: Scene
    image_rgb: np.ndarray
    captions: tuple[str, ...]
    questions: tuple[VqaQuestion, ...]


@dataclass(frozen=True)
class SynthSummary:
    """What ``write_corpus`` wrote."""

    shards: tuple[str, ...]
    images: int
    captions: int
    questions: int
    objects: int
    duplicate_caption_share: float
    questions_file: str
    annotations_file: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": list(self.shards),
            "images": self.images,
            "captions": self.captions,
            "questions": self.questions,
            "objects": self.objects,
            "duplicate_caption_share": self.duplicate_caption_share,
            "questions_file": self.questions_file,
            "annotations_file": self.annotations_file,
        }


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


# --- language ---------------------------------------------------------------------------------------------
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(count: int, words: Sequence[str]) -> str:
    """'a red circle' / 'two red circles' for the adjective+noun ``words``."""
    if count == 1:
        return f"{_article(words[0])} {' '.join(words)}"
    plural = words[-1] + ("es" if words[-1].endswith("s") else "s")
    return " ".join([NUMBER_WORDS[count], *words[:-1], plural])


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def describe_objects(objects: Sequence[SceneObject], with_size: bool) -> list[str]:
    """Noun phrases grouping identical objects in first-appearance order: ['two green triangles', ...]."""
    groups: Counter[tuple[str, ...]] = Counter()
    for o in objects:
        groups[(o.size, o.colour, o.shape) if with_size else (o.colour, o.shape)] += 1
    return [_noun_phrase(count, words) for words, count in groups.items()]


def relation(a: SceneObject, b: SceneObject, scene: Scene, margin: float) -> str | None:
    """Where ``a`` is relative to ``b`` along the dominant axis of their centres ('left of', 'above', ...),
    or None when the centres are closer than ``margin * min(W, H)`` along it (image y grows downwards)."""
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay
    threshold = margin * min(scene.width_px, scene.height_px)
    if abs(dx) >= abs(dy):
        return None if abs(dx) < threshold else ("left of" if dx > 0 else "right of")
    return None if abs(dy) < threshold else ("above" if dy > 0 else "below")


def _unique(scene: Scene) -> list[SceneObject]:
    """Objects whose colour + shape no other object of the scene shares (they can be named 'the red circle')."""
    counts = Counter(o.label for o in scene.objects)
    return [o for o in scene.objects if counts[o.label] == 1]


def related_pairs(scene: Scene, margin: float) -> list[tuple[SceneObject, str, SceneObject]]:
    """(a, relation, b) for every ordered pair of uniquely named objects with a clear relation."""
    unique = _unique(scene)
    out = []
    for a in unique:
        for b in unique:
            rel = relation(a, b, scene, margin) if a is not b else None
            if rel is not None:
                out.append((a, rel, b))
    return out


def _background_phrase(scene: Scene) -> str:
    return f"{scene.background_tone} {BACKGROUND_KINDS[scene.background_kind]} background"


def _position_phrase(obj: SceneObject, scene: Scene) -> str:
    cx, cy = obj.centre
    col = ("left", "center", "right")[min(2, int(3 * cx / scene.width_px))]
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / scene.height_px))]
    if (row, col) == ("middle", "center"):
        return "in the center"
    return f"in the {row} {col}" if row != "middle" else f"on the {col}"


def _has_repeats(scene: Scene) -> bool:
    """True when two objects share colour and shape: captions then add sizes to tell them apart."""
    return len({o.label for o in scene.objects}) < len(scene.objects)


def _words(obj: SceneObject, with_size: bool) -> list[str]:
    return [obj.size, obj.colour, obj.shape] if with_size else [obj.colour, obj.shape]


def _caption_listing(rng: np.random.Generator, scene: Scene, margin: float) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    listing = _join(describe_objects(objs, with_size=len(objs) == 1))
    if len(objs) == 1:  # a lone object: the background tells more images apart
        return f"{listing} on a {_background_phrase(scene)}"
    frame = ("{}", "a picture of {}", "an image showing {}", "{} on a " + _background_phrase(scene))
    return str(rng.choice(frame)).format(listing)


def _caption_relation(rng: np.random.Generator, scene: Scene, margin: float) -> str:
    pairs = related_pairs(scene, margin)
    if not pairs:  # no clear relation between uniquely named objects: say where each object is instead
        sized = len(scene.objects) == 1 or _has_repeats(scene)
        return _join(
            [f"{_noun_phrase(1, _words(o, sized))} {_position_phrase(o, scene)}" for o in scene.objects]
        )
    a, rel, b = pairs[int(rng.integers(len(pairs)))]
    head = f"{_noun_phrase(1, [a.colour, a.shape])} {rel} {_noun_phrase(1, [b.colour, b.shape])}"
    rest = [o for o in scene.objects if o is not a and o is not b]
    return head if not rest else f"{head} and {_join(describe_objects(rest, with_size=False))}"


def _caption_count(rng: np.random.Generator, scene: Scene, margin: float) -> str:
    n = len(scene.objects)
    if n == 1:
        obj = scene.objects[0]
        return f"a single {obj.colour} {obj.shape} {_position_phrase(obj, scene)}"
    listing = _join(describe_objects(scene.objects, with_size=_has_repeats(scene)))
    return f"{NUMBER_WORDS[n]} shapes on a {_background_phrase(scene)}: {listing}"


def _caption_left_to_right(rng: np.random.Generator, scene: Scene, margin: float) -> str:
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        return f"{_noun_phrase(1, _words(obj, True))} {_position_phrase(obj, scene)}"
    objs = sorted(scene.objects, key=lambda o: o.centre[0])
    sized = _has_repeats(scene)
    return "from left to right: " + _join([_noun_phrase(1, _words(o, sized)) for o in objs])


def _caption_sizes(rng: np.random.Generator, scene: Scene, margin: float) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)
    listing = _join(describe_objects(objs, with_size=True))
    return listing if len(objs) > 1 else f"just {listing}, {_position_phrase(objs[0], scene)}"


CAPTION_TEMPLATES = (
    _caption_listing,
    _caption_relation,
    _caption_count,
    _caption_left_to_right,
    _caption_sizes,
)


def make_captions(rng: np.random.Generator, scene: Scene, config: SynthConfig) -> tuple[str, ...]:
    """``config.captions_per_image`` captions, one per template (seeded order); each names every object.

    Raises:
        ValueError: the scene has no objects.
    """
    if not scene.objects:
        raise ValueError(f"scene {scene.image_id} has no objects to caption")
    order = rng.permutation(len(CAPTION_TEMPLATES))[: config.captions_per_image]
    return tuple(CAPTION_TEMPLATES[i](rng, scene, config.relation_margin) for i in order)


# --- VQA --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Qa:
    question: str
    question_type: str
    answer_type: str
    answer: str
    confusions: tuple[str, ...]


def _q_colour(rng: np.random.Generator, scene: Scene, margin: float) -> _Qa | None:
    shape_counts = Counter(o.shape for o in scene.objects)
    candidates = [o for o in scene.objects if shape_counts[o.shape] == 1]
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    text = str(rng.choice(("what color is the {}?", "what is the color of the {}?"))).format(obj.shape)
    qtype = "what color is the" if text.startswith("what color") else "what is the color of the"
    return _Qa(text, qtype, "other", obj.colour, SIMILAR_COLOURS[obj.colour])


def _q_shape(rng: np.random.Generator, scene: Scene, margin: float) -> _Qa | None:
    colour_counts = Counter(o.colour for o in scene.objects)
    candidates = [o for o in scene.objects if colour_counts[o.colour] == 1]
    if not candidates:
        return None
    obj = candidates[int(rng.integers(len(candidates)))]
    return _Qa(
        f"what shape is the {obj.colour} object?",
        "what shape is the",
        "other",
        obj.shape,
        SIMILAR_SHAPES[obj.shape],
    )


def _q_count(rng: np.random.Generator, scene: Scene, margin: float) -> _Qa:
    variant = int(rng.integers(3))
    obj = scene.objects[int(rng.integers(len(scene.objects)))]
    if variant == 0:
        text, n = "how many shapes are there?", len(scene.objects)
    elif variant == 1:
        text, n = (
            f"how many {obj.colour} shapes are there?",
            sum(o.colour == obj.colour for o in scene.objects),
        )
    else:
        plural = obj.shape + ("es" if obj.shape.endswith("s") else "s")
        text, n = f"how many {plural} are there?", sum(o.shape == obj.shape for o in scene.objects)
    confusions = tuple(str(k) for k in (n - 1, n + 1) if k >= 0)
    return _Qa(text, "how many", "number", str(n), confusions)


def _q_exists(rng: np.random.Generator, scene: Scene, margin: float) -> _Qa:
    present = {(o.colour, o.shape) for o in scene.objects}
    if rng.random() < 0.5:
        colour, shape = sorted(present)[int(rng.integers(len(present)))]
        answer = "yes"
    else:  # a hard negative: an absent combination sharing the colour or the shape of a present object
        ref_colour, ref_shape = sorted(present)[int(rng.integers(len(present)))]
        absent = [
            (c, s)
            for c in COLOURS
            for s in SHAPES
            if (c, s) not in present and (c == ref_colour or s == ref_shape)
        ]
        colour, shape = absent[int(rng.integers(len(absent)))]
        answer = "no"
    text = f"is there {_article(colour)} {colour} {shape}?"
    return _Qa(text, "is there a", "yes/no", answer, ("no" if answer == "yes" else "yes",))


def _q_relation(rng: np.random.Generator, scene: Scene, margin: float) -> _Qa | None:
    pairs = related_pairs(scene, margin)
    if not pairs:
        return None
    a, rel, b = pairs[int(rng.integers(len(pairs)))]
    answer = "yes" if rng.random() < 0.5 else "no"
    asked = rel if answer == "yes" else OPPOSITE_RELATION[rel]
    text = f"is the {a.colour} {a.shape} {asked} the {b.colour} {b.shape}?"
    return _Qa(text, "is the", "yes/no", answer, ("no" if answer == "yes" else "yes",))


QUESTION_MAKERS = (_q_colour, _q_shape, _q_count, _q_exists, _q_relation)
DISAGREEING_ANNOTATORS_P = (0.45, 0.3, 0.17, 0.08)  # probability that 0, 1, 2, 3 of the ten disagree


def _annotate(rng: np.random.Generator, qa: _Qa) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Ten answers: the truth, except 0-3 seeded annotators who give a confusable answer ('maybe' sure)."""
    answers = [qa.answer] * VQA_ANSWERS_PER_QUESTION
    confidences = ["yes"] * VQA_ANSWERS_PER_QUESTION
    n_wrong = int(rng.choice(len(DISAGREEING_ANNOTATORS_P), p=DISAGREEING_ANNOTATORS_P))
    for i in rng.choice(VQA_ANSWERS_PER_QUESTION, size=n_wrong, replace=False):
        answers[int(i)] = str(rng.choice(qa.confusions))
        confidences[int(i)] = str(rng.choice(("maybe", "no")))
    for i in range(VQA_ANSWERS_PER_QUESTION):
        if answers[i] == qa.answer and rng.random() < 0.1:
            confidences[i] = "maybe"
    return tuple(answers), tuple(confidences)


def make_questions(rng: np.random.Generator, scene: Scene, config: SynthConfig) -> tuple[VqaQuestion, ...]:
    """Up to one question per type (colour, shape, count, existence, relation) that the scene can answer."""
    out: list[VqaQuestion] = []
    for maker in QUESTION_MAKERS:
        qa = maker(rng, scene, config.relation_margin)
        if qa is None:
            continue
        answers, confidences = _annotate(rng, qa)
        qid = scene.image_id * QUESTION_ID_STRIDE + len(out)
        out.append(
            VqaQuestion(
                qid,
                scene.image_id,
                qa.question,
                qa.question_type,
                qa.answer_type,
                qa.answer,
                answers,
                confidences,
            )
        )
    return tuple(out)


# --- samples, shards and the corpus -----------------------------------------------------------------------
def sample_key(image_id: int) -> str:
    """WebDataset key of an image: its zero-padded id (unique across the corpus's shards)."""
    return f"{image_id:06d}"


def generate_sample(seed: int, index: int, config: SynthConfig) -> SynthSample:
    """Image ``index`` (0-based; ``image_id = index + 1``) of the corpus of ``seed``; depends on nothing else."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
    image_id = index + 1
    scene, masks = make_scene(rng, image_id, config)
    if not scene.objects:
        raise RuntimeError(f"image {image_id}: no object could be placed (config {config})")
    image = render_scene(rng, scene, masks)
    captions = make_captions(rng, scene, config)
    questions = make_questions(rng, scene, config)
    return SynthSample(sample_key(image_id), scene, image, captions, questions)


def sample_json(sample: SynthSample) -> dict[str, Any]:
    """The ``KEY.json`` member: image_id, width, height, captions, boxes (xyxy px), labels and objects."""
    scene = sample.scene
    return {
        "image_id": scene.image_id,
        "width": scene.width_px,
        "height": scene.height_px,
        "captions": list(sample.captions),
        "boxes": [list(o.box_xyxy_px) for o in scene.objects],
        "labels": [o.label for o in scene.objects],
        "objects": [
            {"shape": o.shape, "color": o.colour, "size": o.size, "rgb": list(o.rgb)} for o in scene.objects
        ],
        "background": {"kind": scene.background_kind, "tone": scene.background_tone},
    }


def encode_jpeg(image_rgb: np.ndarray, quality: int) -> bytes:
    """JPEG bytes of a uint8 ``[H, W, 3]`` RGB image (OpenCV, baseline, 4:4:4 chroma: no colour bleeding
    across the shapes' one-pixel tips, no metadata)."""
    params = [
        cv2.IMWRITE_JPEG_QUALITY,
        quality,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
        cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    ]
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), params)
    if not ok:
        raise RuntimeError("OpenCV failed to encode a JPEG")
    return buf.tobytes()


def sample_members(sample: SynthSample, config: SynthConfig) -> list[tuple[str, bytes]]:
    """The sample's tar members, adjacent: ``KEY.jpg`` then ``KEY.json``."""
    meta = json.dumps(sample_json(sample), sort_keys=True, separators=(",", ":")).encode()
    return [
        (f"{sample.key}.jpg", encode_jpeg(sample.image_rgb, config.jpeg_quality)),
        (f"{sample.key}.json", meta),
    ]


def vqa_question_record(q: VqaQuestion) -> dict[str, Any]:
    return {"image_id": q.image_id, "question": q.question, "question_id": q.question_id}


def vqa_annotation_record(q: VqaQuestion) -> dict[str, Any]:
    return {
        "image_id": q.image_id,
        "question_id": q.question_id,
        "question_type": q.question_type,
        "answer_type": q.answer_type,
        "multiple_choice_answer": Counter(q.answers).most_common(1)[0][0],
        "answers": [
            {"answer": a, "answer_confidence": c, "answer_id": i + 1}
            for i, (a, c) in enumerate(zip(q.answers, q.confidences, strict=True))
        ],
    }


def duplicate_caption_share(captions_by_image: Iterable[Sequence[str]]) -> float:
    """Share of all captions whose exact text also captions another image (0.0 when there are none).

    A caption repeated within one image only does not count; a text shared by k images counts all its
    occurrences in those k images.
    """
    per_image = [list(c) for c in captions_by_image]
    images_of: dict[str, set[int]] = {}
    for i, captions in enumerate(per_image):
        for text in captions:
            images_of.setdefault(text, set()).add(i)
    total = sum(len(c) for c in per_image)
    shared = sum(1 for captions in per_image for text in captions if len(images_of[text]) > 1)
    return shared / total if total else 0.0


def _canonical_json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, separators=(",", ":")) + "\n").encode()


def write_corpus(
    out_dir: str | Path, num_images: int, samples_per_shard: int, seed: int, config: SynthConfig | None = None
) -> SynthSummary:
    """Write ``synth-000000.tar``, ... (``samples_per_shard`` samples each), ``questions.json``,
    ``annotations.json`` (VQA v2 shapes) and ``synth-summary.json`` into ``out_dir``.

    Raises:
        ValueError: ``num_images`` or ``samples_per_shard`` < 1.
    """
    if num_images < 1 or samples_per_shard < 1:
        raise ValueError(
            f"need num_images >= 1 and samples_per_shard >= 1, got {num_images}, {samples_per_shard}"
        )
    config = config or SynthConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[str] = []
    questions: list[VqaQuestion] = []
    captions: list[tuple[str, ...]] = []
    objects = 0
    for start in range(0, num_images, samples_per_shard):
        members: list[tuple[str, bytes]] = []
        for index in range(start, min(start + samples_per_shard, num_images)):
            sample = generate_sample(seed, index, config)
            members += sample_members(sample, config)
            questions += sample.questions
            captions.append(sample.captions)
            objects += len(sample.scene.objects)
        name = f"{SHARD_PREFIX}{start // samples_per_shard:0{SHARD_ID_DIGITS}d}.tar"
        write_tar(out / name, members)
        shards.append(name)
    info = {"description": f"regionflow synthetic shapes corpus, seed {seed}", "version": "1.0"}
    common = {
        "info": info,
        "license": {"name": "CC0-1.0"},
        "data_type": "regionflow-synth",
        "data_subtype": "all",
    }
    q_doc = {**common, "task_type": "Open-Ended", "questions": [vqa_question_record(q) for q in questions]}
    a_doc = {**common, "annotations": [vqa_annotation_record(q) for q in questions]}
    (out / QUESTIONS_FILE).write_bytes(_canonical_json_bytes(q_doc))
    (out / ANNOTATIONS_FILE).write_bytes(_canonical_json_bytes(a_doc))
    summary = SynthSummary(
        tuple(shards),
        num_images,
        sum(len(c) for c in captions),
        len(questions),
        objects,
        duplicate_caption_share(captions),
        QUESTIONS_FILE,
        ANNOTATIONS_FILE,
    )
    (out / SUMMARY_FILE).write_bytes(_canonical_json_bytes({"seed": seed, **summary.to_dict()}))
    return summary
