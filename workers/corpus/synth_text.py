"""Language of the synthetic corpus, from the scene (not the pixels): captions naming every object
(attributes, counts, spatial relations, background) and VQA v2 questions of five types with ten annotator
answers, a seeded few of which disagree as real annotators do (``workers.corpus.synth``'s docstring).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from workers.corpus.synth_scene import BACKGROUND_KINDS, COLOURS, SHAPES, Scene, SceneObject

if TYPE_CHECKING:
    from workers.corpus.synth import SynthConfig

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
