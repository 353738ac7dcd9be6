"""Prediction heads on top of the two-stream encoder: masked language modelling, masked region modelling,
image–text matching, VQA and the caption decoder (with greedy and beam decoding)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.coattention import LAYER_NORM_EPS


class _Transform(nn.Module):
    """BERT's prediction-head transform ``Linear -> GELU -> LayerNorm``: ``[..., dim] -> [..., dim]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(F.gelu(self.dense(x)))


class MLMHead(nn.Module):
    """Masked language modelling as BERT: transform, then a decoder whose weight *is* the word embedding matrix
    (tied) with its own bias. ``[..., text_hidden] -> [..., vocab]`` logits."""

    def __init__(self, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        vocab, dim = word_embeddings.weight.shape
        self.transform = _Transform(dim)
        self.decoder = nn.Linear(dim, vocab)
        self.decoder.weight = word_embeddings.weight  # tied, as BertForPreTraining

    def forward(self, text_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.transform(text_states))


class RegionHead(nn.Module):
    """Masked region modelling (ViLBERT): from visual states ``[B, N, visual_hidden]`` predict the detector's
    class distribution (logits ``[B, N, num_classes]``, for the KL target) and the region feature
    (``[B, N, feature_dim]``, for the regression target when the store has no class distribution).

    The transform is ``Linear -> GELU -> LayerNorm`` as vilbert-multi-task's ``BertImgPredictionHeadTransform``,
    whose activation is the *text* stream's ``hidden_act`` (GELU in every released config); ``class_logits`` is
    its ``cls.imagePredictions.decoder``; ``feature`` has no counterpart there."""

    def __init__(self, visual_hidden: int, num_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.transform = _Transform(visual_hidden)
        self.class_logits = nn.Linear(visual_hidden, num_classes)
        self.feature = nn.Linear(visual_hidden, feature_dim)

    def forward(self, visual_states: torch.Tensor, predict_classes: bool) -> torch.Tensor:
        """Class logits when ``predict_classes`` else regressed features."""
        hidden = self.transform(visual_states)
        return self.class_logits(hidden) if predict_classes else self.feature(hidden)


class MatchHead(nn.Module):
    """Image–text matching logit from the fused vector: ``[B, co_hidden] -> [B]`` (ViLBERT's alignment head).

    ``outputs=1``: one logit for a sigmoid. ``outputs=2``: vilbert-multi-task's ``cls.bi_seq_relationship``,
    two scores for a softmax (index 0 = the caption belongs to the image, as its Conceptual Captions loader's
    ``is_next`` label 0); the returned logit is ``s_0 - s_1``, whose sigmoid equals the softmax's match
    probability, so the same binary loss trains both.
    """

    def __init__(self, co_hidden: int, dropout: float, outputs: int = 1) -> None:
        super().__init__()
        if outputs not in (1, 2):
            raise ValueError(f"MatchHead outputs must be 1 or 2, got {outputs}")
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(co_hidden, outputs)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        scores = self.score(self.dropout(fused))  # (B, outputs)
        if scores.shape[-1] == 2:
            return scores[..., 0] - scores[..., 1]
        return scores.squeeze(-1)


class VQAHead(nn.Module):
    """ViLBERT's VQA classifier ``Linear(d, 2d) -> GELU (exact erf) -> LayerNorm (eps 1e-12) -> Dropout ->
    Linear(2d, A)``: fused ``[B, co_hidden]`` -> answer logits ``[B, num_answers]`` (vilbert-multi-task
    ``SimpleClassifier`` ``vil_prediction``; it has no dropout there, and ours is off in eval)."""

    def __init__(self, co_hidden: int, num_answers: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(co_hidden, 2 * co_hidden),
            nn.GELU(),
            nn.LayerNorm(2 * co_hidden, eps=LAYER_NORM_EPS),
            nn.Dropout(dropout),
            nn.Linear(2 * co_hidden, num_answers),
        )

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        return self.net(fused)


class CaptionDecoder(nn.Module):
    """Autoregressive transformer decoder over the visual stream's states (text-free conditioning).

    Token embeddings and the output projection are tied to BERT's word embeddings (vocabulary of the store's
    tokenizer); learned positions up to ``max_tokens``; post-norm ``nn.TransformerDecoder`` with causal
    self-attention and cross-attention to the projected visual states. Decoding starts at ``[CLS]`` and
    stops at ``[SEP]``.
    """

    def __init__(
        self,
        word_embeddings: nn.Embedding,
        visual_hidden: int,
        layers: int,
        heads: int,
        max_tokens: int,
        dropout: float,
    ) -> None:
        super().__init__()
        vocab, dim = word_embeddings.weight.shape
        if dim % heads != 0:
            raise ValueError(f"caption decoder: text hidden {dim} is not a multiple of heads {heads}")
        self.word_embeddings = word_embeddings  # shared module: its parameters are BERT's
        self.positions = nn.Embedding(max_tokens, dim)
        self.embed_norm = nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(dropout)
        self.memory_projection = nn.Sequential(
            nn.Linear(visual_hidden, dim), nn.LayerNorm(dim, eps=LAYER_NORM_EPS)
        )
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, activation="gelu", batch_first=True)
        self.decoder = nn.TransformerDecoder(layer, layers)
        self.transform = _Transform(dim)
        self.output_bias = nn.Parameter(torch.zeros(vocab))
        self.max_tokens = max_tokens

    def forward(
        self,
        tokens: torch.Tensor,
        token_mask: torch.Tensor,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Next-token logits.

        Args:
            tokens: int64 ``[B, L]`` inputs starting with ``[CLS]``, ``L <= max_tokens``.
            token_mask: bool ``[B, L]``, True = real token.
            memory: float ``[B, M, visual_hidden]`` visual states; memory_mask: bool ``[B, M]``, True = real.
        Returns:
            float ``[B, L, vocab]``: position i predicts token i + 1.
        """
        length = tokens.shape[1]
        if length > self.max_tokens:
            raise ValueError(f"caption of {length} tokens exceeds max_caption_tokens={self.max_tokens}")
        positions = torch.arange(length, device=tokens.device)
        x = self.dropout(self.embed_norm(self.word_embeddings(tokens) + self.positions(positions)))
        causal = torch.ones(length, length, dtype=torch.bool, device=tokens.device).triu(1)  # True = blocked
        y = self.decoder(
            x,
            self.memory_projection(memory),
            tgt_mask=causal,
            tgt_key_padding_mask=~token_mask,
            memory_key_padding_mask=~memory_mask,
        )
        return F.linear(self.transform(y), self.word_embeddings.weight, self.output_bias)

    @torch.no_grad()
    def greedy(
        self, memory: torch.Tensor, memory_mask: torch.Tensor, max_tokens: int, start_id: int, end_id: int
    ) -> list[list[int]]:
        """Greedy decoding of at most ``max_tokens`` tokens per image; returns ids without start/end."""
        b = memory.shape[0]
        seqs = torch.full((b, 1), start_id, dtype=torch.long, device=memory.device)
        done = torch.zeros(b, dtype=torch.bool, device=memory.device)
        for _ in range(max_tokens):
            logits = self(seqs, torch.ones_like(seqs, dtype=torch.bool), memory, memory_mask)[:, -1]
            next_token = torch.where(done, end_id, logits.argmax(dim=-1))
            seqs = torch.cat([seqs, next_token[:, None]], dim=1)
            done |= next_token == end_id
            if bool(done.all()):
                break
        return [_strip(row, end_id) for row in seqs[:, 1:].tolist()]

    @torch.no_grad()
    def beam_search(
        self,
        memory: torch.Tensor,
        memory_mask: torch.Tensor,
        max_tokens: int,
        beam_size: int,
        start_id: int,
        end_id: int,
    ) -> list[list[int]]:
        """Beam search scored by the summed log-probability (no length penalty); at most ``max_tokens`` tokens.

        A hypothesis ends at ``end_id``; hypotheses still open after ``max_tokens`` steps end there. Search for
        an image stops once its best ended hypothesis outscores every open one. ``beam_size=1`` equals `greedy`.
        """
        b, k = memory.shape[0], beam_size
        memory = memory.repeat_interleave(k, dim=0)  # (B * k, M, visual_hidden)
        memory_mask = memory_mask.repeat_interleave(k, dim=0)
        seqs = torch.full((b * k, 1), start_id, dtype=torch.long, device=memory.device)
        scores = torch.full((b, k), float("-inf"), device=memory.device)
        scores[:, 0] = 0.0  # one live beam at the start
        ended: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
        for _ in range(max_tokens):
            logits = self(seqs, torch.ones_like(seqs, dtype=torch.bool), memory, memory_mask)[:, -1]
            log_probs = F.log_softmax(logits.float(), dim=-1)  # (B * k, V)
            vocab = log_probs.shape[-1]
            candidates = (scores.view(-1, 1) + log_probs).view(b, k * vocab)
            top_scores, top_index = candidates.topk(min(2 * k, k * vocab), dim=-1)  # (B, 2k)
            sources, tokens, scores = self._select(top_scores, top_index, vocab, k, seqs, end_id, ended)
            seqs = torch.cat([seqs[sources], tokens[:, None]], dim=1)
            if all(_finished(ended[i], scores[i]) for i in range(b)):
                break
        for i in range(b):  # open hypotheses end at the length limit
            for j in range(k):
                if scores[i, j] > float("-inf"):
                    ended[i].append((float(scores[i, j]), seqs[i * k + j, 1:].tolist()))
        return [_strip(max(hyps, key=lambda h: h[0])[1], end_id) for hyps in ended]

    @staticmethod
    def _select(
        top_scores: torch.Tensor,
        top_index: torch.Tensor,
        vocab: int,
        k: int,
        seqs: torch.Tensor,
        end_id: int,
        ended: list[list[tuple[float, list[int]]]],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Move candidates ending in ``end_id`` to ``ended``; keep the best ``k`` open ones per image.

        Returns (source rows ``[B * k]``, new tokens ``[B * k]``, scores ``[B, k]``; -inf marks empty beams).
        """
        b = top_scores.shape[0]
        sources = torch.zeros(b * k, dtype=torch.long)
        tokens = torch.full((b * k,), end_id, dtype=torch.long)
        scores = torch.full((b, k), float("-inf"))
        for i, (row_scores, row_index) in enumerate(
            zip(top_scores.tolist(), top_index.tolist(), strict=True)
        ):
            kept = 0
            for score, index in zip(row_scores, row_index, strict=True):
                if kept == k or score == float("-inf"):
                    break
                source, token = i * k + index // vocab, index % vocab
                if token == end_id:
                    ended[i].append((score, seqs[source, 1:].tolist()))
                    continue
                sources[i * k + kept], tokens[i * k + kept], scores[i, kept] = source, token, score
                kept += 1
        device = seqs.device
        return sources.to(device), tokens.to(device), scores.to(device)


def _finished(ended: list[tuple[float, list[int]]], open_scores: torch.Tensor) -> bool:
    """True when an ended hypothesis scores at least as high as every open one (scores only fall)."""
    if not ended:
        return bool((open_scores == float("-inf")).all())
    return max(s for s, _ in ended) >= float(open_scores.max())


def _strip(ids: list[int], end_id: int) -> list[int]:
    """Token ids up to (not including) the first ``end_id``."""
    return ids[: ids.index(end_id)] if end_id in ids else ids
