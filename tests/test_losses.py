"""Loss functions against formulas written out by hand; empty selections give 0 with a grad path."""

from __future__ import annotations

import math

import pytest
import torch

from model import losses


def test_mrm_with_no_masked_region_is_zero_with_grad():
    logits = torch.randn(2, 3, 7, requires_grad=True)
    target = torch.zeros(2, 3, 7)  # padded rows may be all-zero distributions
    none = torch.zeros(2, 3, dtype=torch.bool)
    kl = losses.mrm_kl_loss(logits, target, none)
    predicted = torch.randn(2, 3, 5, requires_grad=True)
    reg = losses.mrm_regression_loss(predicted, torch.full((2, 3, 5), float("nan")), none)
    for value, leaf in ((kl, logits), (reg, predicted)):
        assert value.item() == 0.0 and value.requires_grad
        value.backward()
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() == 0


def test_mlm_with_nothing_masked_is_zero():
    logits = torch.randn(0, 11, requires_grad=True)
    value = losses.mlm_loss(logits, torch.zeros(0, dtype=torch.long))
    assert value.item() == 0.0 and value.requires_grad
    all_ignored = losses.mlm_loss(torch.randn(3, 11), torch.full((3,), losses.IGNORE_INDEX))
    assert all_ignored.item() == 0.0


def test_mlm_matches_cross_entropy_on_masked_tokens():
    logits = torch.randn(4, 11)
    labels = torch.tensor([3, losses.IGNORE_INDEX, 7, losses.IGNORE_INDEX])
    want = -(torch.log_softmax(logits[0], -1)[3] + torch.log_softmax(logits[2], -1)[7]) / 2
    torch.testing.assert_close(losses.mlm_loss(logits, labels), want)


def test_kl_matches_formula_and_is_zero_at_the_target():
    logits = torch.randn(1, 2, 5)
    p = torch.softmax(torch.randn(1, 2, 5), dim=-1)
    masked = torch.tensor([[True, False]])
    q = torch.softmax(logits, dim=-1)
    want = (p[0, 0] * (p[0, 0].log() - q[0, 0].log())).sum()
    torch.testing.assert_close(losses.mrm_kl_loss(logits, p, masked), want)
    at_target = losses.mrm_kl_loss(p.log(), p, torch.ones(1, 2, dtype=torch.bool))
    assert abs(at_target.item()) < 1e-6


def test_regression_averages_masked_regions_only():
    predicted, target = torch.zeros(1, 3, 2), torch.tensor([[[1.0, 3.0], [100.0, 100.0], [2.0, 2.0]]])
    masked = torch.tensor([[True, False, True]])
    # mse: region 0 -> (1 + 9) / 2 = 5, region 2 -> 4; mean 4.5
    assert losses.mrm_regression_loss(predicted, target, masked).item() == pytest.approx(4.5)
    # smooth L1 (beta 1): region 0 -> (0.5 + 2.5) / 2 = 1.5, region 2 -> 1.5
    assert losses.mrm_regression_loss(predicted, target, masked, "smooth_l1").item() == pytest.approx(1.5)
    with pytest.raises(ValueError):
        losses.mrm_regression_loss(predicted, target, masked, "l3")


def test_vqa_loss_is_per_question_sum_over_answers():
    logits, targets = torch.randn(3, 4), torch.tensor([[0.0, 0.3, 1.0, 0.0]] * 3)
    p = torch.sigmoid(logits)
    per_element = -(targets * p.log() + (1 - targets) * (1 - p).log())
    torch.testing.assert_close(losses.vqa_loss(logits, targets), per_element.sum(dim=1).mean())


def test_itm_and_caption_losses():
    logits = torch.tensor([2.0, -1.0])
    want = -(math.log(1 / (1 + math.exp(-2.0))) + math.log(1 - 1 / (1 + math.exp(1.0)))) / 2
    assert losses.itm_loss(logits, torch.tensor([True, False])).item() == pytest.approx(want, rel=1e-6)
    cap_logits = torch.randn(1, 3, 6)
    targets, mask = torch.tensor([[2, 4, 0]]), torch.tensor([[True, True, False]])
    log_p = torch.log_softmax(cap_logits[0], dim=-1)
    torch.testing.assert_close(
        losses.caption_loss(cap_logits, targets, mask), -(log_p[0, 2] + log_p[1, 4]) / 2
    )


def test_contrastive_loss_treats_repeated_images_as_positives():
    eye = torch.eye(3)
    perfect = losses.contrastive_loss(eye, eye, torch.tensor([0, 1, 2]), temperature=0.01)
    assert perfect.item() < 1e-6
    text, visual = torch.randn(4, 5), torch.randn(4, 5)
    image_index = torch.tensor([7, 7, 2, 9])  # rows 0 and 1 show the same image
    sim = torch.nn.functional.normalize(text, dim=-1) @ torch.nn.functional.normalize(visual, dim=-1).T / 0.1
    want = 0.0
    for scores in (sim, sim.T):
        for i in range(4):
            positives = [j for j in range(4) if image_index[j] == image_index[i]]
            log_p = torch.log_softmax(scores[i], dim=-1)
            want += -sum(log_p[j] for j in positives) / len(positives) / 4
    got = losses.contrastive_loss(text, visual, image_index, temperature=0.1)
    torch.testing.assert_close(got, want / 2)


def test_masked_mean_ignores_non_finite_outside_mask():
    values = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    assert losses.masked_mean(values, torch.tensor([True, False, True, False])).item() == 2.0
