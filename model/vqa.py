"""VQA v2: loading questions + annotations, joining them to a store, the answer vocabulary, soft-score
targets, the official accuracy and the majority-answer baseline.

Sources reproduced (behaviour, quirks included; the code is our own):
    * Accuracy and answer normalisation: GT-Vision-Lab/VQA ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``
      at master (commit a013f00, "Fixed processing answers bug", 2021). Per question:
        - the prediction and every GT answer get ``\\n``/``\\t`` -> space and ``strip``;
        - only when the (stripped) GT answers disagree do the GT answers AND the prediction get
          `process_punctuation` then `process_digit_article`; when all GT answers agree nothing is normalised
          (a unanimous GT "2" does not match the prediction "two", nor GT "yes" the prediction "Yes");
        - for each GT answer dict, ``acc = min(1, #(other GT answer dicts whose answer == prediction) / 3)``,
          "other" meaning dicts that compare unequal to it (dicts with identical fields, e.g. without
          ``answer_id``, exclude each other); the question's accuracy is the mean over the ten.
      Normalisation (`process_punctuation`, `process_digit_article`, their quirks): ``model/vqa_normalize.py``.
    * Soft scores and answer preprocessing: hengyuan-hu/bottom-up-attention-vqa ``tools/compute_softscore.py``
      (``get_score``: 1 answer -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0; ``preprocess_answer`` = punctuation,
      digits/articles, then commas removed). The vocabulary keeps answers that are the (preprocessed)
      ``multiple_choice_answer`` of at least ``min_count`` training questions (their ``filter_answers``,
      default 9), ordered by decreasing count then text (theirs is dict order).

Reduced files (e.g. ``../shared/data/vqa2-sample``) may lack ``multiple_choice_answer``, ``question_type``,
``answer_type`` and ``image_id`` in the annotations: ``image_id`` then comes from the questions file (joined on
``question_id``); ``multiple_choice_answer`` becomes the most frequent raw answer (first seen wins a tie);
missing types become `UNKNOWN_TYPE`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.vqa_normalize import normalize_answer, preprocess_answer, strip_whitespace

UNKNOWN_TYPE = "unknown"
DEFAULT_MIN_ANSWER_COUNT = 9  # bottom-up-attention-vqa filter_answers(answers, 9)
DEFAULT_MAX_QUESTION_TOKENS = 23  # ViLBERT's VQA question length, [CLS] and [SEP] included
ABSENT_IDS_SHOWN = 20  # how many missing image ids an error message lists


class VqaDataError(ValueError):
    """VQA files that cannot be used: malformed, inconsistent, or naming images absent from the store."""


def question_accuracy(prediction: str, gt_answers: Sequence[Mapping[str, Any]]) -> float:
    """Official VQA accuracy of one predicted answer, in ``[0, 1]`` (vqaEval.py ``evaluate``).

    Args:
        prediction: the predicted answer text.
        gt_answers: the question's annotation ``answers`` (dicts with at least ``"answer"``; usually 10).

    Raises:
        VqaDataError: no GT answers.
    """
    if not gt_answers:
        raise VqaDataError("a question needs at least one GT answer")
    res = strip_whitespace(prediction)
    answers = [{**a, "answer": strip_whitespace(a["answer"])} for a in gt_answers]  # official edits in place
    if len({a["answer"] for a in answers}) > 1:
        for a in answers:
            a["answer"] = normalize_answer(a["answer"])
        res = normalize_answer(res)
    accs = []
    for gt in answers:
        matching = sum(1 for other in answers if other != gt and other["answer"] == res)
        accs.append(min(1.0, matching / 3.0))
    return float(sum(accs) / len(accs))


def soft_score(count: int) -> float:
    """bottom-up-attention-vqa ``get_score``: 0 -> 0, 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >= 4 -> 1.0."""
    if count < 0:
        raise ValueError(f"answer count must be >= 0, got {count}")
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


# ------------------------------------------------------------------------------------------------ loading
@dataclass(frozen=True)
class VqaQuestion:
    """One question with its annotation.

    Attributes:
        question_id, image_id: VQA ids (``image_id`` joins to the store's ``image_id`` column).
        question: raw question text.
        answers: the annotation's answer dicts (``answer``, ``answer_confidence``, ``answer_id`` when given).
        multiple_choice_answer: the official field, or the most frequent raw answer when absent.
        question_type, answer_type: the official fields, or `UNKNOWN_TYPE`.
    """

    question_id: int
    image_id: int
    question: str
    answers: tuple[dict[str, Any], ...]
    multiple_choice_answer: str
    question_type: str
    answer_type: str


def _read_json(path: str | Path, key: str) -> list[dict[str, Any]]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise VqaDataError(f"{path}: cannot read VQA JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise VqaDataError(f"{path}: expected a JSON object with a {key!r} list")
    return data[key]


def _most_frequent(answers: Sequence[Mapping[str, Any]]) -> str:
    counts = Counter(a["answer"] for a in answers)
    best = max(counts.values())
    return next(a["answer"] for a in answers if counts[a["answer"]] == best)


def load_vqa(questions_path: str | Path, annotations_path: str | Path) -> list[VqaQuestion]:
    """Read a VQA v2 questions file and its annotations file, joined on ``question_id``.

    Accepts the official files and reduced ones lacking ``multiple_choice_answer``, ``question_type``,
    ``answer_type`` and ``image_id`` in the annotations (see the module docstring). Returned in the questions
    file's order.

    Raises:
        VqaDataError: unreadable JSON, a duplicate question id, a question without annotation or the reverse,
            an annotation whose ``image_id`` contradicts its question's, or a question without answers.
    """
    questions = _read_json(questions_path, "questions")
    annotations = _read_json(annotations_path, "annotations")
    by_id: dict[int, dict[str, Any]] = {}
    for ann in annotations:
        qid = int(ann["question_id"])
        if qid in by_id:
            raise VqaDataError(f"{annotations_path}: duplicate question_id {qid}")
        by_id[qid] = ann
    qids = [int(q["question_id"]) for q in questions]
    if len(set(qids)) != len(qids):
        raise VqaDataError(f"{questions_path}: duplicate question_id")
    missing = sorted(set(qids) - set(by_id))
    extra = sorted(set(by_id) - set(qids))
    if missing or extra:
        raise VqaDataError(
            f"questions and annotations differ: {len(missing)} question(s) without annotation "
            f"{missing[:ABSENT_IDS_SHOWN]}, {len(extra)} annotation(s) without question {extra[:ABSENT_IDS_SHOWN]}"
        )
    return [_join_question(q, by_id[int(q["question_id"])]) for q in questions]


def _join_question(q: Mapping[str, Any], ann: Mapping[str, Any]) -> VqaQuestion:
    qid = int(q["question_id"])
    image_id = int(q["image_id"])
    if "image_id" in ann and int(ann["image_id"]) != image_id:
        raise VqaDataError(
            f"question {qid}: image_id {image_id} in questions, {ann['image_id']} in annotations"
        )
    answers = tuple(dict(a) for a in ann.get("answers", []))
    if not answers:
        raise VqaDataError(f"question {qid}: annotation has no answers")
    return VqaQuestion(
        question_id=qid,
        image_id=image_id,
        question=str(q["question"]),
        answers=answers,
        multiple_choice_answer=str(ann.get("multiple_choice_answer") or _most_frequent(answers)),
        question_type=str(ann.get("question_type", UNKNOWN_TYPE)),
        answer_type=str(ann.get("answer_type", UNKNOWN_TYPE)),
    )


def join_to_store(questions: Sequence[VqaQuestion], image_index_by_id: Mapping[int, int]) -> np.ndarray:
    """Store row index (global image index) of each question's image.

    Args:
        image_index_by_id: ``{image_id: global image index}`` of the store's rows with a non-null image_id.

    Returns:
        int64 ``[len(questions)]``.

    Raises:
        VqaDataError: naming how many and which image ids (the first `ABSENT_IDS_SHOWN`) are not in the store.
    """
    absent = sorted({q.image_id for q in questions if q.image_id not in image_index_by_id})
    if absent:
        shown = ", ".join(str(i) for i in absent[:ABSENT_IDS_SHOWN])
        more = f" and {len(absent) - ABSENT_IDS_SHOWN} more" if len(absent) > ABSENT_IDS_SHOWN else ""
        raise VqaDataError(
            f"{len(absent)} image id(s) named by the VQA questions are absent from the store: {shown}{more} "
            f"(the store has {len(image_index_by_id)} rows with an image_id)"
        )
    return np.asarray([image_index_by_id[q.image_id] for q in questions], dtype=np.int64)


# ------------------------------------------------------------------------------------ vocabulary, targets
def build_answer_vocab(
    train_questions: Iterable[VqaQuestion], min_count: int = DEFAULT_MIN_ANSWER_COUNT
) -> list[str]:
    """Answers that are the preprocessed ``multiple_choice_answer`` of >= ``min_count`` training questions.

    Ordered by decreasing count, then text. Raises ``VqaDataError`` when no answer qualifies.
    """
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    questions = list(train_questions)
    counts = Counter(preprocess_answer(q.multiple_choice_answer) for q in questions)
    vocab = sorted((a for a, c in counts.items() if c >= min_count), key=lambda a: (-counts[a], a))
    if not vocab:
        raise VqaDataError(
            f"no answer occurs as the answer of >= {min_count} of the {len(questions)} training questions; "
            "lower the minimum answer count"
        )
    return vocab


def soft_targets(question: VqaQuestion, answer_index: Mapping[str, int]) -> np.ndarray:
    """float32 ``[A]`` soft scores of the question's preprocessed answers (`soft_score` of their counts)."""
    target = np.zeros(len(answer_index), dtype=np.float32)
    for answer, count in Counter(preprocess_answer(a["answer"]) for a in question.answers).items():
        if answer in answer_index:
            target[answer_index[answer]] = soft_score(count)
    return target


# ------------------------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class VqaAccuracy:
    """Official accuracy in ``[0, 1]`` (the official tool prints ``100 x`` this, rounded to 2 decimals)."""

    overall: float
    per_question_type: dict[str, float]
    per_answer_type: dict[str, float]
    num_questions: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def vqa_accuracy(questions: Sequence[VqaQuestion], predictions: Sequence[str]) -> VqaAccuracy:
    """Official accuracy of ``predictions[i]`` for ``questions[i]``, overall and per question / answer type.

    Raises:
        VqaDataError: no questions, or a length mismatch.
    """
    if not questions or len(questions) != len(predictions):
        raise VqaDataError(f"need one prediction per question, got {len(predictions)} for {len(questions)}")
    accs = [question_accuracy(p, q.answers) for q, p in zip(questions, predictions, strict=True)]
    return VqaAccuracy(
        overall=float(np.mean(accs)),
        per_question_type=_group_mean(accs, [q.question_type for q in questions]),
        per_answer_type=_group_mean(accs, [q.answer_type for q in questions]),
        num_questions=len(accs),
    )


def _group_mean(values: Sequence[float], groups: Sequence[str]) -> dict[str, float]:
    out: dict[str, list[float]] = {}
    for v, g in zip(values, groups, strict=True):
        out.setdefault(g, []).append(v)
    return {g: float(np.mean(vs)) for g, vs in sorted(out.items())}


@dataclass(frozen=True)
class MajorityBaseline:
    """Predicts the most frequent training ``multiple_choice_answer`` of the question's type.

    Attributes:
        per_question_type: ``{question type: answer}`` from the training questions.
        overall: the most frequent answer over all training questions (for unseen types).
    """

    per_question_type: dict[str, str]
    overall: str

    @classmethod
    def fit(cls, train_questions: Sequence[VqaQuestion]) -> MajorityBaseline:
        """Count preprocessed answers; ties go to the alphabetically first. Raises on no questions."""
        if not train_questions:
            raise VqaDataError("the majority baseline needs at least one training question")
        by_type: dict[str, Counter[str]] = {}
        for q in train_questions:
            by_type.setdefault(q.question_type, Counter())[preprocess_answer(q.multiple_choice_answer)] += 1
        total: Counter[str] = sum(by_type.values(), Counter())
        return cls({t: _argmax(c) for t, c in sorted(by_type.items())}, _argmax(total))

    def predict(self, question: VqaQuestion) -> str:
        return self.per_question_type.get(question.question_type, self.overall)


def _argmax(counts: Counter[str]) -> str:
    return min(counts, key=lambda a: (-counts[a], a))


# ---------------------------------------------------------------------------------------- store splits
@dataclass(frozen=True)
class VqaSplit:
    """The questions of one split and the global store index of each question's image (int64 ``[Q]``)."""

    questions: list[VqaQuestion]
    image_index: np.ndarray


def image_index_by_id(image_ids: Sequence[int | None]) -> dict[int, int]:
    """``{image_id: global image index}`` from the store's ``image_id`` column (nulls skipped).

    Raises:
        VqaDataError: an image_id that appears on more than one row (the join would be ambiguous).
    """
    index: dict[int, int] = {}
    for i, image_id in enumerate(image_ids):
        if image_id is None:
            continue
        if image_id in index:
            raise VqaDataError(f"image_id {image_id} appears on store rows {index[image_id]} and {i}")
        index[image_id] = i
    return index


def split_questions(
    questions: Sequence[VqaQuestion], image_ids: Sequence[int | None], heldout_mask: np.ndarray
) -> dict[str, VqaSplit]:
    """Join questions to the store and split them by their image's split (``{"train": .., "heldout": ..}``).

    Args:
        image_ids: the store's ``image_id`` column in global index order.
        heldout_mask: bool ``[num_images]``, True = held-out image (``model.data.StoreImages.split_mask``).

    Raises:
        VqaDataError: images absent from the store (see `join_to_store`) or duplicate store image ids.
    """
    image_index = join_to_store(questions, image_index_by_id(image_ids))
    held = np.asarray(heldout_mask, dtype=bool)[image_index]
    out = {}
    for name, keep in (("train", ~held), ("heldout", held)):
        chosen = np.flatnonzero(keep)
        out[name] = VqaSplit([questions[int(i)] for i in chosen], image_index[chosen])
    return out
