"""Attention layers of the two-stream model: one multi-head attention class for self- and cross-attention
(as LXMERT's), the visual TRM layer and the Co-TRM block of ViLBERT (Lu et al. 2019, Fig. 2b).

Co-attention, per head h with d_h = co_hidden / heads:
    regions query tokens:  V_hat = softmax((V W_q)(T W_k)^T / sqrt(d_h)) (T W_v)
    tokens query regions:  T_hat = softmax((T U_q)(V U_k)^T / sqrt(d_h)) (V U_v)
heads concatenated and projected back to each stream's own hidden size; then, per stream, residual + LayerNorm
and a feed-forward sublayer with residual + LayerNorm (post-norm, as BERT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

LAYER_NORM_EPS = 1e-12  # BERT's
# Additive score of a padded key, as BERT and vilbert-multi-task (``(1 - mask) * -10000``): exp(-10000) is 0 in
# float32, and a row without any real key attends uniformly instead of giving NaN.
MASK_VALUE = -10000.0


def additive_key_mask(key_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """bool ``[B, T_k]`` (True = real key) -> additive ``[B, 1, 1, T_k]`` of ``dtype``: 0 real, `MASK_VALUE` padded."""
    return torch.where(key_mask, 0.0, MASK_VALUE).to(dtype)[:, None, None, :]


def attention_core(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """Scaled dot-product attention with a key-padding mask, via ``F.scaled_dot_product_attention``.

    Args:
        q: float ``[B, heads, T_q, d_h]`` queries.
        k, v: float ``[B, heads, T_k, d_h]`` keys and values.
        key_mask: bool ``[B, T_k]``, True = real key; padded keys get the additive `MASK_VALUE` (-10000).
        dropout_p: attention-probability dropout (pass 0.0 in eval).
    Returns:
        float ``[B, heads, T_q, d_h]``: softmax(q k^T / sqrt(d_h) + mask) v, i.e. over the real keys.
    """
    attn_mask = additive_key_mask(key_mask, q.dtype)  # (B, 1, 1, T_k), broadcast over heads and queries
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class MultiHeadAttention(nn.Module):
    """Multi-head attention of a query sequence over a context sequence (self-attention: context = query).

    Query and context may have different sizes; both are projected into ``hidden`` (``heads`` heads of
    ``hidden / heads``), and the result is projected to ``out_dim`` (default: ``query_dim``).
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int,
        hidden: int,
        heads: int,
        dropout: float,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if hidden % heads != 0:
            raise ValueError(f"hidden {hidden} is not a multiple of heads {heads}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(query_dim, hidden)
        self.key = nn.Linear(context_dim, hidden)
        self.value = nn.Linear(context_dim, hidden)
        self.out = nn.Linear(hidden, out_dim or query_dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, hidden]`` -> ``[B, heads, T, d_h]``."""
        b, t, hidden = x.shape
        return x.view(b, t, self.heads, hidden // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """Attend from ``x [B, T_q, query_dim]`` over ``context [B, T_k, context_dim]``.

        ``context_mask`` is bool ``[B, T_k]`` (True = real). Returns ``[B, T_q, out_dim]`` (before residual).
        """
        q = self.split_heads(self.query(x))  # (B, heads, T_q, d_h)
        k = self.split_heads(self.key(context))  # (B, heads, T_k, d_h)
        v = self.split_heads(self.value(context))  # (B, heads, T_k, d_h)
        y = attention_core(q, k, v, context_mask, self.dropout if self.training else 0.0)
        b, _, t_q, _ = y.shape
        y = y.transpose(1, 2).reshape(b, t_q, -1)  # (B, T_q, hidden): heads concatenated
        return self.out(y)


class ResidualNorm(nn.Module):
    """``LayerNorm(x + dropout(sublayer_output))`` (BERT's post-norm residual)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.dropout(update))


class FeedForward(nn.Module):
    """Position-wise ``Linear -> GELU -> Linear`` with post-norm residual: ``[B, T, dim] -> [B, T, dim]``."""

    def __init__(self, dim: int, intermediate: int, dropout: float) -> None:
        super().__init__()
        self.up = nn.Linear(dim, intermediate)
        self.down = nn.Linear(intermediate, dim)
        self.residual = ResidualNorm(dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x, self.down(F.gelu(self.up(x))))


class TransformerLayer(nn.Module):
    """A BERT-style self-attention layer (the visual stream's TRM): ``[B, T, dim] -> [B, T, dim]``."""

    def __init__(self, dim: int, heads: int, intermediate: int, dropout: float) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(dim, dim, dim, heads, dropout)
        self.residual = ResidualNorm(dim, dropout)
        self.feed_forward = FeedForward(dim, intermediate, dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``mask`` bool ``[B, T]``, True = real position (padded positions are keys nowhere)."""
        return self.feed_forward(self.residual(x, self.attention(x, x, mask)))


@dataclass
class StreamStates:
    """Hidden states of both streams.

    Attributes:
        visual: float ``[B, N_v, visual_dim]`` region states (index 0: the global image region).
        text: float ``[B, N_t, text_dim]`` token states (index 0: ``[CLS]``).
    """

    visual: torch.Tensor
    text: torch.Tensor


class CoTransformerBlock(nn.Module):
    """ViLBERT's Co-TRM: co-attention (each stream queries the other), then per stream residual + LayerNorm
    and feed-forward + residual + LayerNorm. The streams keep their own sizes; attention runs in ``co_hidden``.
    """

    def __init__(
        self,
        visual_dim: int,
        text_dim: int,
        co_hidden: int,
        co_heads: int,
        visual_intermediate: int,
        text_intermediate: int,
        dropout: float,
    ) -> None:
        super().__init__()
        self.visual_attention = MultiHeadAttention(visual_dim, text_dim, co_hidden, co_heads, dropout)
        self.text_attention = MultiHeadAttention(text_dim, visual_dim, co_hidden, co_heads, dropout)
        self.visual_residual = ResidualNorm(visual_dim, dropout)
        self.text_residual = ResidualNorm(text_dim, dropout)
        self.visual_feed_forward = FeedForward(visual_dim, visual_intermediate, dropout)
        self.text_feed_forward = FeedForward(text_dim, text_intermediate, dropout)

    def forward(
        self,
        visual: torch.Tensor,
        visual_mask: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor,
    ) -> StreamStates:
        """Exchange information between ``visual [B, N_v, visual_dim]`` and ``text [B, N_t, text_dim]``.

        Masks are bool ``[B, N_v]`` / ``[B, N_t]``, True = real. Both directions read the *input* states.
        """
        visual_update = self.visual_attention(visual, text, text_mask)  # regions query tokens
        text_update = self.text_attention(text, visual, visual_mask)  # tokens query regions
        visual = self.visual_feed_forward(self.visual_residual(visual, visual_update))
        text = self.text_feed_forward(self.text_residual(text, text_update))
        return StreamStates(visual=visual, text=text)
