"""The embedded default corpus: procedural scenes of coloured shapes (docs/design.md §8).

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

Three modules: ``synth_scene`` (vocabulary, layout, rendering), ``synth_text`` (captions and VQA questions
from the scene), and this one (config, samples, shards, the VQA JSON files, the summary). Pure numpy +
OpenCV, no Ray. Deterministic: image ``i`` is drawn from ``SeedSequence([seed, i])`` alone, so a
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

from workers.corpus.synth_scene import Scene, make_scene, render_scene
from workers.corpus.synth_text import CAPTION_TEMPLATES, VqaQuestion, make_captions, make_questions
from workers.corpus.tar_writer import write_tar

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
