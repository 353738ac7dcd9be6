"""VQA: normalisation and accuracy cases from the official vqaEval.py behaviour, soft scores, loading both file
shapes (official fields and the reduced ../shared/data/vqa2-sample), joining to a store, vocabulary, baseline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.vqa import (
    UNKNOWN_TYPE,
    MajorityBaseline,
    VqaDataError,
    VqaQuestion,
    build_answer_vocab,
    join_to_store,
    load_vqa,
    question_accuracy,
    soft_score,
    soft_targets,
    vqa_accuracy,
)
from model.vqa_normalize import process_digit_article, process_punctuation

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "vqa2-sample"


def _answers(*texts: str) -> list[dict]:
    return [{"answer": t, "answer_confidence": "yes", "answer_id": i + 1} for i, t in enumerate(texts)]


# --- normalisation (vqaEval.py processPunctuation / processDigitArticle) ---------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("left-side", "left side"),  # no space next to '-': replaced by a space
        ("x / y", "x  y"),  # '/' next to a space: deleted
        ("1,000", "1000"),  # a digit,digit comma anywhere: every mark deleted
        ("red, 1,5 blue!", "red 15 blue"),  # same rule deletes '!' and ', ' too
        ("dog.", "dog"),  # period not followed by a digit: removed
        ("1.5", "1.5"),  # period followed by a digit: kept
        ("no!", "no "),
        ("it's", "it's"),  # apostrophe is not in the punctuation list
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


def test_period_strip_removes_at_most_32_periods():
    text = "a." * 40
    assert process_punctuation(text) == "a" * 32 + "a." * 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two dogs", "2 dogs"),
        ("the dog", "dog"),
        ("A Dog", "dog"),
        ("dont know", "don't know"),
        ("none", "0"),
        ("isnt  it", "isn't it"),
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


# --- accuracy (vqaEval.py evaluate, master) ---------------------------------------------------------------
def test_unanimous_answers_are_not_normalised():
    gt = _answers(*["2"] * 10)
    assert question_accuracy("2", gt) == 1.0
    assert question_accuracy("two", gt) == 0.0  # no normalisation when the GT answers agree
    assert question_accuracy(" 2\n", gt) == 1.0  # whitespace is stripped always


def test_disagreeing_answers_normalise_both_sides():
    gt = _answers("two", "two", "2", *["three"] * 7)
    # normalised GT: "2" x3, "3" x7. For a "2" GT, 2 others match -> 2/3; for a "3" GT, 3 match -> 1.
    assert question_accuracy("Two", gt) == pytest.approx((3 * 2 / 3 + 7) / 10)


def test_leave_one_out_average():
    gt = _answers(*["yes"] * 3, *["no"] * 7)
    # "yes" GT: 2 other yes -> 2/3; "no" GT: 3 yes -> 1
    assert question_accuracy("yes", gt) == pytest.approx(0.9)
    assert question_accuracy("no", gt) == pytest.approx(1.0)
    assert question_accuracy("maybe", gt) == 0.0
    gt1 = _answers("yes", *["no"] * 9)
    # "yes" GT: 0 others; "no" GT: 1 other -> 1/3
    assert question_accuracy("yes", gt1) == pytest.approx(9 * (1 / 3) / 10)


def test_identical_answer_dicts_exclude_each_other():
    # without answer_id the ten dicts compare equal, so "other answers" is always empty (official quirk)
    gt = [{"answer": "yes", "answer_confidence": "yes"}] * 10
    assert question_accuracy("yes", gt) == 0.0


def test_vqa_accuracy_groups_by_type():
    qs = [
        _question(1, "what color", "other", _answers(*["red"] * 10)),
        _question(2, "is the", "yes/no", _answers(*["yes"] * 10)),
        _question(3, "is the", "yes/no", _answers(*["no"] * 10)),
    ]
    acc = vqa_accuracy(qs, ["red", "yes", "yes"])
    assert acc.overall == pytest.approx(2 / 3)
    assert acc.per_question_type == {"is the": 0.5, "what color": 1.0}
    assert acc.per_answer_type == {"other": 1.0, "yes/no": 0.5}


# --- soft scores, vocabulary, baseline ----------------------------------------------------------------------
def test_soft_score_follows_bottom_up_attention_vqa():
    assert [soft_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]


def test_soft_targets_and_vocab():
    qs = [
        _question(
            1, "what", "other", _answers(*["net"] * 6, "netting", "mesh", "pitcher", "orange"), mc="net"
        ),
        _question(2, "what", "other", _answers(*["net"] * 2, *["Pitcher"] * 8), mc="pitcher"),
        _question(3, "what", "other", _answers(*["pitcher"] * 10), mc="pitcher"),
    ]
    vocab = build_answer_vocab(qs, min_count=1)
    assert vocab == ["pitcher", "net"]  # by count, then text
    index = {a: i for i, a in enumerate(vocab)}
    np.testing.assert_allclose(soft_targets(qs[0], index), [0.3, 1.0])
    np.testing.assert_allclose(soft_targets(qs[1], index), [1.0, 0.6])  # "Pitcher" preprocessed to "pitcher"
    assert build_answer_vocab(qs, min_count=2) == ["pitcher"]
    with pytest.raises(VqaDataError, match="lower the minimum"):
        build_answer_vocab(qs, min_count=5)


def test_majority_baseline_per_question_type():
    train = [
        _question(1, "how many", "number", _answers("2"), mc="2"),
        _question(2, "how many", "number", _answers("2"), mc="2"),
        _question(3, "how many", "number", _answers("3"), mc="3"),
        _question(4, "is the", "yes/no", _answers("no"), mc="no"),
    ]
    base = MajorityBaseline.fit(train)
    assert base.per_question_type == {"how many": "2", "is the": "no"}
    assert base.overall == "2"
    assert base.predict(_question(9, "what color", "other", _answers("red"))) == "2"


# --- loading ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not SAMPLE.is_dir(), reason=f"{SAMPLE} absent (shared test data)")
def test_load_reduced_sample_file():
    qs = load_vqa(SAMPLE / "questions.json", SAMPLE / "annotations.json")
    assert [q.question_id for q in qs] == [458752000, 458752001, 458752002]
    assert all(q.image_id == 458752 for q in qs)  # joined from the questions file
    assert qs[0].multiple_choice_answer == "net"  # most frequent of the ten
    assert qs[0].question_type == UNKNOWN_TYPE and qs[0].answer_type == UNKNOWN_TYPE
    assert question_accuracy("net", qs[0].answers) == 1.0
    assert question_accuracy("pitcher", qs[0].answers) == pytest.approx(0.3)  # 1 other of 9 / 3, for 9 GTs


def test_load_official_shape_and_errors(tmp_path):
    qfile, afile = tmp_path / "q.json", tmp_path / "a.json"
    qfile.write_text(json.dumps({"questions": [{"image_id": 7, "question": "Is it?", "question_id": 70}]}))
    ann = {
        "question_id": 70,
        "image_id": 7,
        "question_type": "is it",
        "answer_type": "yes/no",
        "multiple_choice_answer": "yes",
        "answers": _answers("yes", "no"),
    }
    afile.write_text(json.dumps({"annotations": [ann]}))
    (q,) = load_vqa(qfile, afile)
    assert (q.question_type, q.answer_type, q.multiple_choice_answer) == ("is it", "yes/no", "yes")
    afile.write_text(json.dumps({"annotations": [{**ann, "image_id": 8}]}))
    with pytest.raises(VqaDataError, match="image_id"):
        load_vqa(qfile, afile)
    afile.write_text(json.dumps({"annotations": [{**ann, "question_id": 71}]}))
    with pytest.raises(VqaDataError, match="without annotation"):
        load_vqa(qfile, afile)


def test_join_to_store_names_absent_images():
    qs = [_question(i, "t", "a", _answers("x"), image_id=img) for i, img in enumerate([1, 2, 3, 3, 99, 42])]
    with pytest.raises(VqaDataError, match=r"3 image id\(s\).*: 3, 42, 99"):
        join_to_store(qs, {1: 0, 2: 5})
    assert join_to_store(qs[:2], {1: 0, 2: 5}).tolist() == [0, 5]


def _question(
    qid: int, qtype: str, atype: str, answers: list[dict], mc: str = "", image_id: int = 1
) -> VqaQuestion:
    return VqaQuestion(
        question_id=qid,
        image_id=image_id,
        question="q?",
        answers=tuple(answers),
        multiple_choice_answer=mc or answers[0]["answer"],
        question_type=qtype,
        answer_type=atype,
    )
