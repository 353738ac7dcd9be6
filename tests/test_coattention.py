"""Co-attention layers against the formulas written out by hand (ViLBERT, Lu et al. 2019)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from model.coattention import CoTransformerBlock, MultiHeadAttention, attention_core


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    return x @ layer.weight.T + layer.bias


def _reference_attention(
    x: torch.Tensor, context: torch.Tensor, module: MultiHeadAttention, heads: int
) -> torch.Tensor:
    """softmax((x W_q)(c W_k)^T / sqrt(d_h)) (c W_v) per head, heads concatenated, output projection; one sample."""
    q, k, v = _linear(x, module.query), _linear(context, module.key), _linear(context, module.value)
    d_h = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d_h, (h + 1) * d_h)
        weights = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d_h), dim=-1)
        outs.append(weights @ v[:, sl])
    return _linear(torch.cat(outs, dim=-1), module.out)


def test_single_head_coattention_matches_formulas():
    # Streams of different sizes: visual 6, text 10, co-attention in 4, one head.
    block = CoTransformerBlock(6, 10, 4, 1, 12, 20, dropout=0.0).eval()
    visual, text = torch.randn(1, 5, 6), torch.randn(1, 3, 10)
    v_mask, t_mask = torch.ones(1, 5, dtype=torch.bool), torch.ones(1, 3, dtype=torch.bool)
    V, T = visual[0], text[0]
    va, ta = block.visual_attention, block.text_attention
    # regions query tokens: softmax((V W_q)(T W_k)^T / sqrt(d)) (T W_v)
    v_hat = torch.softmax(_linear(V, va.query) @ _linear(T, va.key).T / 2.0, dim=-1) @ _linear(T, va.value)
    # tokens query regions: softmax((T U_q)(V U_k)^T / sqrt(d)) (V U_v)
    t_hat = torch.softmax(_linear(T, ta.query) @ _linear(V, ta.key).T / 2.0, dim=-1) @ _linear(V, ta.value)
    torch.testing.assert_close(va(visual, text, t_mask)[0], _linear(v_hat, va.out), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ta(text, visual, v_mask)[0], _linear(t_hat, ta.out), atol=1e-5, rtol=1e-5)

    # The block: residual + LayerNorm, then feed-forward + residual + LayerNorm, in each stream.
    def post(x, update, residual, ff):
        y = residual.norm(x + update)
        return ff.residual.norm(y + _linear(F.gelu(_linear(y, ff.up)), ff.down))

    out = block(visual, v_mask, text, t_mask)
    want_v = post(V, _linear(v_hat, va.out), block.visual_residual, block.visual_feed_forward)
    want_t = post(T, _linear(t_hat, ta.out), block.text_residual, block.text_feed_forward)
    torch.testing.assert_close(out.visual[0], want_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.text[0], want_t, atol=1e-5, rtol=1e-5)


def test_multi_head_attention_matches_per_head_loop_with_padding():
    module = MultiHeadAttention(8, 12, 16, 4, dropout=0.0).eval()
    x, context = torch.randn(2, 5, 8), torch.randn(2, 7, 12)
    context_mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    got = module(x, context, context_mask)
    for b in range(2):
        real = context[b][context_mask[b]]
        torch.testing.assert_close(got[b], _reference_attention(x[b], real, module, 4), atol=1e-5, rtol=1e-5)


def test_attention_core_masks_keys():
    q, k, v = torch.randn(2, 3, 4, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    mask = torch.tensor([[True] * 6, [True, False, True, False, True, False]])
    got = attention_core(q, k, v, mask)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    torch.testing.assert_close(got, torch.softmax(scores, dim=-1) @ v, atol=1e-5, rtol=1e-5)


def test_padding_does_not_change_real_outputs():
    block = CoTransformerBlock(6, 10, 8, 2, 12, 20, dropout=0.0).eval()
    visual, text = torch.randn(2, 4, 6), torch.randn(2, 3, 10)
    v_mask, t_mask = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    base = block(visual, v_mask, text, t_mask)
    # Append junk padded regions and tokens (large values, so a leak would show).
    visual_padded = torch.cat([visual, 100 * torch.randn(2, 3, 6)], dim=1)
    text_padded = torch.cat([text, 100 * torch.randn(2, 2, 10)], dim=1)
    v_mask_padded = torch.cat([v_mask, torch.zeros(2, 3, dtype=torch.bool)], dim=1)
    t_mask_padded = torch.cat([t_mask, torch.zeros(2, 2, dtype=torch.bool)], dim=1)
    padded = block(visual_padded, v_mask_padded, text_padded, t_mask_padded)
    torch.testing.assert_close(padded.visual[:, :4], base.visual, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded.text[:, :3], base.text, atol=1e-5, rtol=1e-5)


def test_block_gradients_reach_both_streams():
    block = CoTransformerBlock(6, 10, 8, 2, 12, 20, dropout=0.1)
    visual = torch.randn(2, 4, 6, requires_grad=True)
    text = torch.randn(2, 3, 10, requires_grad=True)
    ones_v, ones_t = torch.ones(2, 4, dtype=torch.bool), torch.ones(2, 3, dtype=torch.bool)
    out = block(visual, ones_v, text, ones_t)
    out.text.sum().backward()  # text output depends on the visual input through co-attention
    assert visual.grad is not None and visual.grad.abs().sum() > 0
    assert text.grad is not None and text.grad.abs().sum() > 0


def test_hidden_must_divide_heads():
    with pytest.raises(ValueError, match="multiple of heads"):
        MultiHeadAttention(8, 8, 10, 3, dropout=0.0)


def test_masked_keys_get_minus_10000_like_vilbert():
    """Padded keys are masked additively with -10000 (BERT / vilbert-multi-task): a row whose keys are all
    padded attends uniformly over them instead of giving NaN (a boolean mask gives NaN there)."""
    q, k = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 3, 4)
    v = torch.randn(1, 1, 3, 4)
    nothing_real = torch.zeros(1, 3, dtype=torch.bool)
    scores = q @ k.transpose(-1, -2) / 2.0 - 10000.0
    assert torch.allclose(attention_core(q, k, v, nothing_real), scores.softmax(-1) @ v, atol=1e-6)
    one_real = torch.tensor([[True, False, False]])
    assert torch.allclose(attention_core(q, k, v, one_real), v[:, :, :1].expand(1, 1, 2, 4), atol=1e-6)
