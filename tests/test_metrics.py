"""Metrics on hand-computed cases: retrieval ranks with ties, constant scores, matching accuracy, BLEU/CIDEr."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.metrics import (
    TOKENIZER_SIMPLE,
    EfficiencyMeter,
    caption_metrics,
    java_available,
    matching_metrics,
    pessimistic_ranks,
    retrieval_metrics,
    simple_tokenize,
)


def test_pessimistic_ranks_count_ties_against_the_right_answer():
    scores = np.array([[3.0, 1.0, 3.0, 0.0], [0.5, 2.0, 1.0, 2.0]])
    positive = np.array([[True, False, False, False], [False, True, False, False]])
    # row 0: one wrong candidate (col 2) ties the right one -> rank 2; row 1: col 3 ties -> rank 2
    assert pessimistic_ranks(scores, positive).tolist() == [2, 2]


def test_perfect_scores_give_recall_one_and_median_rank_one():
    caption_image = np.array([0, 0, 1, 1, 2, 2])
    scores = np.full((6, 3), -1.0)
    scores[np.arange(6), caption_image] = 5.0
    m = retrieval_metrics(scores, caption_image)
    assert m.text_to_image.recall == {1: 1.0, 5: 1.0, 10: 1.0}
    assert m.image_to_text.recall[1] == 1.0
    assert m.text_to_image.median_rank == 1.0 and m.image_to_text.median_rank == 1.0


def test_constant_scores_are_not_rewarded():
    num_images, per_image = 20, 2
    caption_image = np.repeat(np.arange(num_images), per_image)
    m = retrieval_metrics(np.zeros((num_images * per_image, num_images)), caption_image)
    # every wrong image ties the right one and is ranked above it: rank = 20 for every caption
    assert m.text_to_image.recall == {1: 0.0, 5: 0.0, 10: 0.0}
    assert m.text_to_image.median_rank == 20.0
    # image -> text: 38 wrong captions tie -> rank 39
    assert m.image_to_text.median_rank == 39.0
    assert m.text_to_image.chance_recall[1] == pytest.approx(1 / 20)
    assert m.text_to_image.chance_recall[5] == pytest.approx(5 / 20)
    # i2t chance of recall@1 with 2 right captions among 40: 2 / 40
    assert m.image_to_text.chance_recall[1] == pytest.approx(2 / 40)


def test_hand_computed_recall_and_median_rank():
    # 3 images, one caption each; ranks text->image: caption0 -> 1, caption1 -> 3, caption2 -> 2
    scores = np.array(
        [
            [0.9, 0.1, 0.2],
            [0.8, 0.1, 0.7],
            [0.3, 0.6, 0.5],
        ]
    )
    m = retrieval_metrics(scores, np.array([0, 1, 2]))
    assert m.text_to_image.recall[1] == pytest.approx(1 / 3)
    assert m.text_to_image.median_rank == 2.0
    assert m.text_to_image.mean_rank == pytest.approx(2.0)
    # image->text: image0 column [0.9, 0.8, 0.3] -> rank 1; image1 [0.1, 0.1, 0.6]: caption0 ties -> rank 3;
    # image2 [0.2, 0.7, 0.5]: caption1 above -> rank 2
    assert m.image_to_text.recall[1] == pytest.approx(1 / 3)
    assert m.image_to_text.median_rank == 2.0


def test_retrieval_rejects_bad_input():
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(np.zeros((2, 3)), np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        retrieval_metrics(np.array([[np.nan]]), np.array([0]))


def test_matching_accuracy_and_constant_logit_is_chance():
    m = matching_metrics(np.array([2.0, 1.0, -1.0, 0.5]), np.array([-3.0, 0.2, -0.1, -2.0]))
    assert m.positive_accuracy == 0.75 and m.negative_accuracy == 0.75 and m.accuracy == 0.75
    const = matching_metrics(np.full(10, 0.3), np.full(10, 0.3))
    assert const.accuracy == 0.5 == const.chance
    with pytest.raises(ValueError):
        matching_metrics(np.ones(3), np.ones(2))


def test_simple_tokenize_drops_punctuation_and_lowercases():
    assert simple_tokenize("A man's dog, running... Fast!") == "a man's dog running fast"


def test_caption_metrics_identical_captions_score_high_and_wrong_low():
    refs = {
        "1": ["a man riding a horse on a beach", "a person rides a horse near the sea"],
        "2": ["two dogs playing with a red ball", "dogs play with a ball in the grass"],
        "3": ["a plate of food with broccoli and rice", "a dinner plate with rice and vegetables"],
    }
    good = {k: v[0] for k, v in refs.items()}
    bad = {"1": "a plate of food", "2": "a man riding a horse", "3": "two dogs playing"}
    good_m = caption_metrics(refs, good, use_ptb=False)
    bad_m = caption_metrics(refs, bad, use_ptb=False)
    assert good_m.tokenizer == TOKENIZER_SIMPLE
    assert good_m.bleu4 > 0.9
    assert bad_m.bleu4 < 0.1 and bad_m.cider < good_m.cider / 5


@pytest.mark.skipif(not java_available(), reason="java not on PATH: pycocoevalcap's PTBTokenizer needs it")
def test_caption_metrics_with_ptb_tokenizer_agree_with_simple_on_plain_text():
    refs = {
        "a": ["a cat on a mat", "the cat sits on the mat"],
        "b": ["a dog in the park", "dog running in a park"],
    }
    hyps = {"a": "a cat on the mat", "b": "a dog in a park"}
    ptb = caption_metrics(refs, hyps, use_ptb=True)
    simple = caption_metrics(refs, hyps, use_ptb=False)
    assert ptb.tokenizer == "ptb"
    assert ptb.bleu4 == pytest.approx(simple.bleu4) and ptb.cider == pytest.approx(simple.cider)


def test_efficiency_meter_reports_percentiles():
    meter = EfficiencyMeter(device=torch.device("cpu"))
    meter.latencies_s.extend([0.01] * 19 + [0.1])
    meter.samples = 200
    r = meter.report()
    assert r.latency_p50_ms == pytest.approx(10.0)
    assert r.latency_p95_ms > 10.0
    assert r.samples_per_s == pytest.approx(200 / 0.29)
    assert r.peak_memory_bytes > 0 and r.peak_memory_kind == "process_peak_rss"
    with meter.batch(4):
        pass
    assert meter.samples == 204
