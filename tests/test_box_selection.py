"""Box selection (bottom-up-attention ``generate_tsv.py`` rule) with planted scores.

Every expected value below is derived by hand in the comments (IoUs, survivors per class, max_conf, order),
never by calling the code under test. Proposal boxes are ``xyxy`` pixels; with the default legacy ``+1``
convention a box ``[x1, y1, x2, y2]`` covers ``(x2 - x1 + 1) × (y2 - y1 + 1)`` pixels.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from workers.detect import nms as nms_module
from workers.detect.config import BoxSelectionConfig
from workers.detect.selection import choose_by_max_conf, select_boxes, select_boxes_batch

NUM_CLASSES = 4  # background + 3 foreground classes in the small planted tests


def planted(rows: list[dict[int, float]], num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Class probabilities ``[P, C]``: the given foreground scores, the rest of the mass on background."""
    prob = torch.zeros(len(rows), num_classes)
    for i, row in enumerate(rows):
        for cls, score in row.items():
            prob[i, cls] = score
        prob[i, 0] = 1.0 - sum(row.values())
    return prob


def boxes(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def disjoint_boxes(count: int) -> torch.Tensor:
    """``count`` boxes 51 px wide on a 60 px grid, 12 a row: no two overlap."""
    return torch.tensor(
        [
            [60.0 * (i % 12), 60.0 * (i // 12), 60.0 * (i % 12) + 50, 60.0 * (i // 12) + 50]
            for i in range(count)
        ]
    )


def one_score_each(scores: list[float]) -> torch.Tensor:
    """Proposal i scores ``scores[i]`` in class ``i % 3 + 1`` and 0 elsewhere (foreground)."""
    return planted([{i % 3 + 1: s} for i, s in enumerate(scores)])


# --- per-class NMS -------------------------------------------------------------------------------------------


def test_suppressed_in_one_class_keeps_its_score_in_another():
    # A=[0,0,10,10] and B=[1,1,11,11]: areas 11*11 = 121, intersection 10*10 = 100, IoU 100/142 = 0.70 > 0.3.
    # C is far away. Class 1: A 0.5 > B 0.4 -> B suppressed. Class 2: B 0.3 > A 0.05 -> A suppressed, B kept.
    # Class 3: C 0.25, then A and B tie at 0 (A first, stable) -> B suppressed by A.
    # max_conf: A = 0.5 (class 1), B = 0.3 (class 2 only; not 0.4), C = max(0.1, 0, 0.25) = 0.25.
    props = boxes([0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60])
    prob = planted([{1: 0.5, 2: 0.05}, {1: 0.4, 2: 0.3}, {1: 0.1, 3: 0.25}])
    sel = select_boxes(props, prob, BoxSelectionConfig())
    np.testing.assert_allclose(sel.max_conf, [0.5, 0.3, 0.25], rtol=0, atol=1e-7)
    # 3 above 0.2, fewer than the floor (10): the top 10 by max_conf = all 3, descending max_conf
    assert sel.keep.tolist() == [0, 1, 2]
    # object ids are the argmax over foreground, independent of NMS: A class 1, B class 1 (0.4), C class 3
    assert sel.object_ids.tolist() == [1, 1, 3]
    np.testing.assert_allclose(sel.object_conf, [0.5, 0.4, 0.25], atol=1e-7)


def test_suppressed_in_every_class_gets_zero():
    # B is the same box as A (IoU 1). Class 1: A 0.6 > B 0.5; class 2: A 0.3 > B 0.2; class 3: tie at 0, A first.
    # B never survives -> max_conf 0; A survives everywhere -> 0.6.
    props = boxes([0, 0, 20, 20], [0, 0, 20, 20])
    prob = planted([{1: 0.6, 2: 0.3}, {1: 0.5, 2: 0.2}])
    sel = select_boxes(props, prob, BoxSelectionConfig())
    np.testing.assert_allclose(sel.max_conf, [0.6, 0.0], atol=1e-7)
    assert sel.keep.tolist() == [0, 1]


def test_plus_one_area_convention():
    # A=[0,0,2,2], B=[1.5,0,3.5,2].
    # +1: areas 3*3 = 9 each; intersection (2-1.5+1)*(2-0+1) = 1.5*3 = 4.5; IoU 4.5/13.5 = 0.333 > 0.3:
    #     B suppressed in class 1 (A 0.6 > B 0.5) and in classes 2, 3 (ties at 0, A first) -> max_conf(B) = 0.
    # plain: areas 2*2 = 4; intersection 0.5*2 = 1; IoU 1/7 = 0.143 <= 0.3: B survives -> max_conf(B) = 0.5.
    props = boxes([0, 0, 2, 2], [1.5, 0, 3.5, 2])
    prob = planted([{1: 0.6}, {1: 0.5}])
    legacy = select_boxes(props, prob, BoxSelectionConfig(area_plus_one=True))
    plain = select_boxes(props, prob, BoxSelectionConfig(area_plus_one=False))
    np.testing.assert_allclose(legacy.max_conf, [0.6, 0.0], atol=1e-7)
    np.testing.assert_allclose(plain.max_conf, [0.6, 0.5], atol=1e-7)


def test_iou_at_threshold_is_suppressed():
    # Legacy CPU NMS (MILVLG nms_cpu.cpp, py-faster-rcnn cpu_nms.pyx): suppressed when IoU >= threshold.
    # +1: A=[0,0,9,9] area 10*10 = 100. B=[0,0,9,2] lies inside A, area 10*3 = 30: IoU 30/100 = 0.3 (the float32
    # 0.3 exactly) >= 0.3: suppressed in every class -> 0. B2=[0,0,9,1]: area 20, IoU 0.2 < 0.3 -> survives.
    props = boxes([0, 0, 9, 9], [0, 0, 9, 2])
    sel = select_boxes(props, planted([{1: 0.6}, {1: 0.5}]), BoxSelectionConfig())
    np.testing.assert_allclose(sel.max_conf, [0.6, 0.0], atol=1e-7)
    props = boxes([0, 0, 9, 9], [0, 0, 9, 1])
    sel = select_boxes(props, planted([{1: 0.6}, {1: 0.5}]), BoxSelectionConfig())
    np.testing.assert_allclose(sel.max_conf, [0.6, 0.5], atol=1e-7)


def test_nms_threshold_is_the_configured_one():
    # A, B of the first test overlap with IoU 0.70: at nms_iou 0.75 nothing is suppressed -> B = 0.4 (class 1).
    props = boxes([0, 0, 10, 10], [1, 1, 11, 11])
    prob = planted([{1: 0.5}, {1: 0.4}])
    np.testing.assert_allclose(
        select_boxes(props, prob, BoxSelectionConfig()).max_conf, [0.5, 0.0], atol=1e-7
    )
    loose = select_boxes(props, prob, BoxSelectionConfig(nms_iou=0.75))
    np.testing.assert_allclose(loose.max_conf, [0.5, 0.4], atol=1e-7)


def test_all_1601_classes_in_one_pass():
    # A, B overlap (IoU 0.70), C apart. A: class 1600 0.6. B: class 1600 0.5, class 7 0.4. C: class 3 0.25.
    # Class 1600 suppresses B; B survives in class 7 -> 0.4. object_ids: A 1600, B 1600 (0.5 > 0.4), C 3.
    props = boxes([0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60])
    prob = planted([{1600: 0.6}, {1600: 0.5, 7: 0.4}, {3: 0.25}], num_classes=1601)
    sel = select_boxes(props, prob, BoxSelectionConfig())
    np.testing.assert_allclose(sel.max_conf, [0.6, 0.4, 0.25], atol=1e-7)
    assert sel.object_ids.tolist() == [1600, 1600, 3]
    assert sel.object_ids.dtype == np.int16


def test_background_is_never_the_object():
    # background holds 0.9 of the mass; the best foreground class (2, 0.06) is the object.
    sel = select_boxes(boxes([0, 0, 10, 10]), planted([{1: 0.04, 2: 0.06}]), BoxSelectionConfig())
    assert sel.object_ids.tolist() == [2]
    np.testing.assert_allclose(sel.object_conf, [0.06], atol=1e-7)


# --- threshold, floor, cap, fixed K ------------------------------------------------------------------------

THRESHOLD_SCORES = [0.2, 0.9, 0.19, 0.3, 0.35, 0.1, 0.4, 0.45, 0.5, 0.05, 0.55, 0.6, 0.65, 0.7, 0.75]
# >= 0.2: indices 0 (exactly 0.2), 1, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14 -> 12 boxes, floor 10 <= 12 <= cap 100:
# kept in proposal order (generate_tsv.py: np.where(max_conf >= conf_thresh)[0])
THRESHOLD_EXPECTED = [0, 1, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14]
# the same 15 proposals by descending max_conf: 1 (0.9), 14 (0.75), 13, 12, 11, 10, 8, 7, 6, 4, 3, 0 (0.2),
# then 2 (0.19), 5 (0.1), 9 (0.05)
THRESHOLD_SORTED = [1, 14, 13, 12, 11, 10, 8, 7, 6, 4, 3, 0, 2, 5, 9]
FLOOR_SCORES = [0.05, 0.3, 0.01, 0.02, 0.25, 0.03, 0.04, 0.06, 0.07, 0.08, 0.09, 0.5, 0.11, 0.12, 0.13]
# >= 0.2: only 11 (0.5), 1 (0.3), 4 (0.25) -> 3 < 10 -> the top 10 by max_conf, descending
# (np.argsort(max_conf)[::-1][:MIN_BOXES]):
FLOOR_EXPECTED = [11, 1, 4, 14, 13, 12, 10, 9, 8, 7]


def test_threshold_keeps_max_conf_at_least_point_two_in_proposal_order():
    sel = select_boxes(disjoint_boxes(15), one_score_each(THRESHOLD_SCORES), BoxSelectionConfig())
    assert sel.keep.tolist() == THRESHOLD_EXPECTED
    assert sel.object_ids.tolist() == [i % 3 + 1 for i in THRESHOLD_EXPECTED]
    np.testing.assert_allclose(sel.object_conf, [THRESHOLD_SCORES[i] for i in THRESHOLD_EXPECTED], atol=1e-7)


def test_threshold_is_inclusive():
    kept = choose_by_max_conf(
        torch.tensor([0.2, 0.1], dtype=torch.float32), conf_threshold=0.2, floor=0, cap=5
    )
    assert kept.tolist() == [0]


def test_floor_of_ten():
    sel = select_boxes(disjoint_boxes(15), one_score_each(FLOOR_SCORES), BoxSelectionConfig())
    assert sel.keep.tolist() == FLOOR_EXPECTED


def test_cap_of_one_hundred():
    # 120 disjoint proposals, all above 0.2: proposal i scores 0.3 + 0.005 * r(i) with r(i) = 37 i mod 120, a
    # permutation of 0..119 (gcd(37, 120) = 1). Kept: the 100 with the largest r, in descending r.
    ranks = [(37 * i) % 120 for i in range(120)]
    sel = select_boxes(
        disjoint_boxes(120), one_score_each([0.3 + 0.005 * r for r in ranks]), BoxSelectionConfig()
    )
    expected = sorted(range(120), key=lambda i: -ranks[i])[:100]
    assert sel.keep.tolist() == expected
    assert min(ranks[i] for i in sel.keep) == 20


def test_fixed_k_is_floor_and_cap():
    fixed = BoxSelectionConfig(mode="fixed", num_boxes=5)
    above = select_boxes(disjoint_boxes(15), one_score_each(THRESHOLD_SCORES), fixed)  # 12 above -> cut to 5
    assert above.keep.tolist() == [1, 14, 13, 12, 11]  # the top 5 by max_conf, descending
    below = select_boxes(disjoint_boxes(15), one_score_each(FLOOR_SCORES), fixed)  # 3 above -> raised to 5
    assert below.keep.tolist() == [11, 1, 4, 14, 13]  # FLOOR_EXPECTED[:5]


def test_fixed_k_with_exactly_k_above_keeps_proposal_order():
    # generate_tsv.py with MIN_BOXES = MAX_BOXES = K: exactly K above the threshold is neither < MIN nor > MAX,
    # so np.where's proposal order stays. 12 proposals pass 0.2 in THRESHOLD_SCORES: K = 12 keeps them in index
    # order; K = 11 (12 > 11) and K = 13 (12 < 13) sort.
    props, prob = disjoint_boxes(15), one_score_each(THRESHOLD_SCORES)
    exact = select_boxes(props, prob, BoxSelectionConfig(mode="fixed", num_boxes=12))
    assert exact.keep.tolist() == THRESHOLD_EXPECTED
    cut = select_boxes(props, prob, BoxSelectionConfig(mode="fixed", num_boxes=11))
    assert cut.keep.tolist() == THRESHOLD_SORTED[:11]
    raised = select_boxes(props, prob, BoxSelectionConfig(mode="fixed", num_boxes=13))
    assert raised.keep.tolist() == THRESHOLD_SORTED[:13]  # ..., 0 (0.2), then 2 (0.19)


def test_counts_at_the_floor_and_the_cap_keep_proposal_order():
    # max_conf 0.3, 0.9, 0.1, 0.5 -> above 0.2: 0, 1, 3 (three)
    max_conf = torch.tensor([0.3, 0.9, 0.1, 0.5])
    assert choose_by_max_conf(max_conf, conf_threshold=0.2, floor=3, cap=5).tolist() == [
        0,
        1,
        3,
    ]  # 3 == floor
    assert choose_by_max_conf(max_conf, conf_threshold=0.2, floor=1, cap=3).tolist() == [0, 1, 3]  # 3 == cap
    assert choose_by_max_conf(max_conf, conf_threshold=0.2, floor=1, cap=2).tolist() == [1, 3]  # 0.9, 0.5
    assert choose_by_max_conf(max_conf, conf_threshold=0.2, floor=4, cap=9).tolist() == [1, 3, 0, 2]


def test_fixed_36_with_fewer_proposals_stores_them_all():
    # 15 proposals, 12 above 0.2 < K = 36: the top 36 by max_conf = every proposal, descending max_conf.
    sel = select_boxes(disjoint_boxes(15), one_score_each(THRESHOLD_SCORES), BoxSelectionConfig(mode="fixed"))
    assert sel.keep.tolist() == THRESHOLD_SORTED


def test_no_proposals():
    sel = select_boxes(torch.zeros(0, 4), torch.zeros(0, NUM_CLASSES), BoxSelectionConfig())
    assert sel.keep.shape == (0,) and sel.object_ids.shape == (0,) and sel.max_conf.shape == (0,)


def test_ties_break_by_lower_index():
    # six disjoint proposals, all 0.5 in class 1: 6 > K = 3 -> sorted, equal max_conf -> lower index first.
    sel = select_boxes(
        disjoint_boxes(6), planted([{1: 0.5}] * 6), BoxSelectionConfig(mode="fixed", num_boxes=3)
    )
    assert sel.keep.tolist() == [0, 1, 2]
    # raised to the floor through ties at 0: 1 and 4 (0.5), then 0, 2, 3 (0) by index -> floor 4 keeps 0 and 2
    max_conf = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.5])
    assert choose_by_max_conf(max_conf, conf_threshold=0.2, floor=4, cap=9).tolist() == [1, 4, 0, 2]


def generate_tsv_keep(max_conf: np.ndarray, conf_thresh: float, min_boxes: int, max_boxes: int) -> np.ndarray:
    """The selection lines of bottom-up-attention ``tools/generate_tsv.py`` (``get_detections_from_im``)."""
    keep_boxes = np.where(max_conf >= conf_thresh)[0]
    if len(keep_boxes) < min_boxes:
        keep_boxes = np.argsort(max_conf)[::-1][:min_boxes]
    elif len(keep_boxes) > max_boxes:
        keep_boxes = np.argsort(max_conf)[::-1][:max_boxes]
    return keep_boxes


@pytest.mark.parametrize("seed", range(6))
def test_choice_equals_generate_tsv_on_distinct_scores(seed):
    # distinct float32 max_conf values (a permutation of a grid), counts below, within and above the limits
    rng = np.random.default_rng(seed)
    count = int(rng.integers(1, 300))
    max_conf = (rng.permutation(count) / count).astype(np.float32)
    for thresh in (0.0, 0.2, 0.5, 0.9, 0.99):
        for low, high in ((10, 100), (36, 36), (1, count), (count, count + 5)):
            expected = generate_tsv_keep(max_conf, thresh, low, high)
            got = choose_by_max_conf(torch.from_numpy(max_conf), conf_threshold=thresh, floor=low, cap=high)
            np.testing.assert_array_equal(got.numpy(), expected)


# --- against an independent per-class loop, and batching ------------------------------------------------


def random_case(seed: int, count: int, num_classes: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    corner = torch.rand(count, 2, generator=gen) * 300
    size = 8 + torch.rand(count, 2, generator=gen) * 150
    prob = torch.softmax(torch.randn(count, num_classes, generator=gen) * 3, dim=1)
    return torch.cat([corner, corner + size], dim=1), prob


def nms_cpu_port(boxes_xyxy: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    """The legacy CPU NMS (maskrcnn-benchmark / MILVLG ``nms_cpu.cpp``, py-faster-rcnn ``cpu_nms.pyx``), written
    out as a plain loop in float32: ``+1`` areas, suppress when ``IoU >= thresh``. Their ``sort`` is unstable;
    this oracle ranks ties by lower index (a stable descending order), as regionflow documents."""
    b = boxes_xyxy.astype(np.float32)
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    one, zero, threshold = np.float32(1), np.float32(0), np.float32(thresh)
    areas = (x2 - x1 + one) * (y2 - y1 + one)
    order = np.argsort(-scores, kind="stable")
    suppressed = np.zeros(len(b), dtype=bool)
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        for j in order[pos + 1 :]:
            if suppressed[j]:
                continue
            w = max(zero, min(x2[i], x2[j]) - max(x1[i], x1[j]) + one)
            h = max(zero, min(y2[i], y2[j]) - max(y1[i], y1[j]) + one)
            inter = w * h
            if inter / (areas[i] + areas[j] - inter) >= threshold:
                suppressed[j] = True
    return np.flatnonzero(~suppressed)


def reference_max_conf(props: torch.Tensor, prob: torch.Tensor) -> torch.Tensor:
    """One legacy CPU NMS per class, as MILVLG ``save_roi_features`` / ``generate_tsv.py`` loop."""
    best = torch.zeros(props.shape[0])
    for cls in range(1, prob.shape[1]):
        keep = torch.from_numpy(nms_cpu_port(props.numpy(), prob[:, cls].numpy(), 0.3))
        best[keep] = torch.maximum(best[keep], prob[keep, cls])
    return best


def grid_case(seed: int, count: int, num_classes: int = 30) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes with small integer corners and sides: many pairs at an IoU of exactly 0.3 (e.g. 30/100)."""
    gen = torch.Generator().manual_seed(seed)
    corner = torch.randint(0, 6, (count, 2), generator=gen).float()
    size = torch.randint(1, 10, (count, 2), generator=gen).float()
    prob = torch.softmax(torch.randn(count, num_classes, generator=gen) * 3, dim=1)
    return torch.cat([corner, corner + size], dim=1), prob


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_a_per_class_loop(seed):
    props, prob = random_case(seed, count=130)
    sel = select_boxes(props, prob, BoxSelectionConfig())
    np.testing.assert_array_equal(sel.max_conf, reference_max_conf(props, prob).numpy())


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_the_legacy_cpu_nms_at_exact_threshold_ties(seed):
    props, prob = grid_case(seed, count=60)
    iou = nms_module.legacy_iou(props)
    assert int((iou == np.float32(0.3)).sum()) > 0, "the case must hold IoUs equal to the threshold"
    sel = select_boxes(props, prob, BoxSelectionConfig())
    np.testing.assert_array_equal(sel.max_conf, reference_max_conf(props, prob).numpy())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rpn_nms_is_the_legacy_cpu_nms(seed):
    """The RPN's NMS (boxes in rank order, threshold 0.7) keeps what the legacy CPU NMS keeps."""
    props, _ = grid_case(seed, count=200)
    keep = nms_module.legacy_nms_ranked(props, 0.7)
    ranked = -np.arange(props.shape[0], dtype=np.float32)  # boxes already in rank order
    np.testing.assert_array_equal(keep.numpy(), nms_cpu_port(props.numpy(), ranked, 0.7))
    iou = nms_module.legacy_iou(props)
    assert int((iou == np.float32(0.7)).triu(1).sum()) > 0, "the case must hold IoUs equal to 0.7"


def test_batch_equals_one_image_at_a_time():
    cases = [random_case(seed, count) for seed, count in ((3, 70), (4, 5), (5, 0), (6, 66))]
    batch = select_boxes_batch([b for b, _ in cases], [p for _, p in cases], BoxSelectionConfig())
    for (props, prob), got in zip(cases, batch, strict=True):
        alone = select_boxes(props, prob, BoxSelectionConfig())
        np.testing.assert_array_equal(got.keep, alone.keep)
        np.testing.assert_array_equal(got.max_conf, alone.max_conf)
        np.testing.assert_array_equal(got.object_ids, alone.object_ids)


# --- input checks and config ---------------------------------------------------------------------------------


def test_given_mode_is_not_a_selection():
    with pytest.raises(ValueError, match="given"):
        select_boxes(boxes([0, 0, 1, 1]), planted([{1: 0.5}]), BoxSelectionConfig(mode="given"))


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[P, 4\]"):
        select_boxes(torch.zeros(2, 5), torch.zeros(2, 4), BoxSelectionConfig())
    with pytest.raises(ValueError, match="cls_prob"):
        select_boxes(torch.zeros(2, 4), torch.zeros(3, 4), BoxSelectionConfig())


@pytest.mark.parametrize(
    "kwargs", [{"mode": "top"}, {"num_boxes": 0}, {"min_boxes": 20, "max_boxes": 10}, {"nms_iou": 1.5}]
)
def test_config_validation(kwargs):
    with pytest.raises(ValueError):
        BoxSelectionConfig(**kwargs)


def test_config_defaults_and_dict():
    cfg = BoxSelectionConfig()
    assert (cfg.mode, cfg.num_boxes, cfg.min_boxes, cfg.max_boxes) == ("adaptive", 36, 10, 100)
    assert (cfg.conf_threshold, cfg.nms_iou, cfg.area_plus_one) == (0.2, 0.3, True)
    assert cfg.box_limits == (10, 100)
    assert BoxSelectionConfig(mode="fixed").box_limits == (36, 36)
    assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()
