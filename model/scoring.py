"""Batched scoring of a trained model over (text ids, image) pairs, and the retrieval score matrices
(full, or re-ranked from a pooled-vector first stage), for ``regionflow evaluate`` (docs/design.md §7).

No Ray and no files: `Scorer` collates store rows (`model.items.collate`) and runs the model without gradients
(bf16 autocast on CUDA), timing each phase (`model.metrics.EfficiencyMeter`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from model.data import StoreImages
from model.items import Sample, TokenIds, collate
from model.metrics import EfficiencyMeter

RERANK_MARGIN = 2.0  # non-re-ranked candidates sit this far below the lowest re-ranked logit


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)`` without fixed points (n >= 2): a shuffled cycle."""
    order = rng.permutation(n)
    perm = np.empty(n, dtype=np.int64)
    perm[order] = order[np.roll(np.arange(n), -1)]
    return perm


@dataclass
class Scorer:
    """Batched forward passes of a trained model over (text ids, image index) pairs, timed per phase."""

    model: Any
    images: StoreImages
    device: torch.device
    batch_size: int

    def __post_init__(self) -> None:
        self.meters: dict[str, EfficiencyMeter] = {}

    def _batches(self, pairs: Sequence[tuple[TokenIds, int]]):
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start : start + self.batch_size]
            yield collate([Sample(self.images.visual(i), ids, i) for ids, i in chunk]).to(self.device)

    def run_batches(self, phase: str, pairs: Sequence[tuple[TokenIds, int]], fn: Any) -> list[Any]:
        """``fn(batch)`` for each collated batch of ``pairs`` (no grad, bf16 autocast on CUDA), timed as ``phase``."""
        meter = self.meters.setdefault(phase, EfficiencyMeter(device=self.device))
        outputs = []
        with (
            torch.no_grad(),
            torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"),
        ):
            for batch in self._batches(pairs):
                with meter.batch(batch.batch_size):
                    outputs.append(fn(batch))
        return outputs

    def match_logits(self, pairs: Sequence[tuple[TokenIds, int]], phase: str) -> np.ndarray:
        """float64 ``[len(pairs)]`` matching logits."""
        out = self.run_batches(phase, pairs, lambda b: self.model.match_logits(b).float().cpu())
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def pooled(self, pairs: Sequence[tuple[TokenIds, int]], phase: str) -> tuple[np.ndarray, np.ndarray]:
        """Pooled text and visual vectors ``[len(pairs), d]`` (unimodal: each ignores the other side)."""
        out = self.run_batches(phase, pairs, lambda b: self.model.pooled(b))
        text = torch.cat([o.pooled_text.float().cpu() for o in out]).double().numpy()
        visual = torch.cat([o.pooled_visual.float().cpu() for o in out]).double().numpy()
        return text, visual

    def efficiency(self) -> dict[str, Any]:
        return {phase: m.report().to_dict() for phase, m in self.meters.items() if m.latencies_s}


def retrieval_matrices(
    scorer: Scorer, captions: Sequence[tuple[TokenIds, int]], columns: np.ndarray, rerank_top: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """Score matrices ``[C, I]`` for text->image and image->text ranking, and a sentence on how they were made.

    Args:
        captions: (ids, global image index) of every held-out caption.
        columns: global image index of each matrix column.
        rerank_top: 0 = every pair gets a matching logit; K > 0 = only each query's top K under the pooled dot
            product (per caption for text->image, per image for image->text).
    """
    c, i = len(captions), len(columns)
    if rerank_top <= 0:
        pairs = [(ids, int(img)) for ids, _ in captions for img in columns]
        full = scorer.match_logits(pairs, "retrieval_itm").reshape(c, i)
        return full, full, f"matching logit of all {c} x {i} caption-image pairs"
    first_caption = {img: ids for ids, img in reversed(captions)}
    text, _ = scorer.pooled(captions, "retrieval_first_stage")
    _, visual = scorer.pooled(
        [(first_caption[int(img)], int(img)) for img in columns], "retrieval_first_stage"
    )
    stage1 = text @ visual.T
    k_img, k_cap = min(rerank_top, i), min(rerank_top, c)
    t2i_top = np.argsort(-stage1, axis=1, kind="stable")[:, :k_img]
    i2t_top = np.argsort(-stage1.T, axis=1, kind="stable")[:, :k_cap]
    cells = sorted(
        {(r, int(col)) for r in range(c) for col in t2i_top[r]}
        | {(int(r), col) for col in range(i) for r in i2t_top[col]}
    )
    logits = scorer.match_logits([(captions[r][0], int(columns[col])) for r, col in cells], "retrieval_itm")
    value = dict(zip(cells, logits, strict=True))
    base = stage1 + (min(logits) - RERANK_MARGIN - stage1.max())
    t2i, i2t = base.copy(), base.copy()
    for r in range(c):
        t2i[r, t2i_top[r]] = [value[(r, int(col))] for col in t2i_top[r]]
    for col in range(i):
        i2t[i2t_top[col], col] = [value[(int(r), col)] for r in i2t_top[col]]
    note = (
        f"re-ranked: matching logits for the top {k_img} images per caption and top {k_cap} captions per image "
        f"under the pooled-vector dot product ({len(cells)} of {c * i} pairs scored); the rest keep the first-stage "
        "order below them"
    )
    return t2i, i2t, note
