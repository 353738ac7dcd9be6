"""Evaluation metrics: retrieval recall@K and median rank, image–text matching accuracy, captioning BLEU-4 and
CIDEr, and efficiency numbers (samples/s, latency percentiles, peak memory).

Conventions:
    * Retrieval scores are a matrix ``[num_captions, num_images]`` (higher = better match) with the image of
      every caption given as an index. Ties are ranked *pessimistically*: every wrong candidate scoring at least
      as high as the best right one is ranked above it. A constant-score model therefore gets rank = number of
      wrong candidates + 1 (recall@K = 0 while that exceeds K), never a perfect score; the chance level of a
      random ranking is reported beside (``chance_recall``).
    * Matching accuracy thresholds the matching logit at 0 over an equal number of positive and negative pairs,
      so chance is 0.5 and a constant logit scores exactly 0.5 (a logit of exactly 0 counts as "no match").
    * BLEU-4 and CIDEr come from pycocoevalcap's ``Bleu(4)`` and ``Cider()`` scorers called directly (not
      ``COCOEvalCap.evaluate``, which also runs SPICE and METEOR). Captions are tokenised with pycocoevalcap's
      Stanford ``PTBTokenizer`` when ``java`` is on ``PATH``; otherwise with `simple_tokenize` (lowercase, split
      on whitespace and punctuation, drop the punctuation tokens PTBTokenizer drops). The result names which.
"""

from __future__ import annotations

import re
import resource
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from math import comb

import numpy as np
import torch

RECALL_KS = (1, 5, 10)
MATCHING_CHANCE = 0.5
TOKENIZER_PTB = "ptb"
TOKENIZER_SIMPLE = "simple"
# pycocoevalcap.tokenizer.ptbtokenizer.PUNCTUATIONS minus the PTB bracket tokens (-LRB- ...) our splitter
# never produces; punctuation tokens are dropped after splitting, as PTBTokenizer does.
_SIMPLE_PUNCT = "''", "'", "``", "`", ".", "?", "!", ",", ":", "-", "--", "...", ";"
_SIMPLE_SPLIT = re.compile(r"\.\.\.|--|''|``|[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9]")


# --------------------------------------------------------------------------------------------- retrieval
@dataclass(frozen=True)
class DirectionMetrics:
    """Recall@K and median rank for one retrieval direction.

    Attributes:
        recall: ``{K: fraction of queries whose best right answer has rank <= K}`` for K in `RECALL_KS`.
        chance_recall: expected recall@K of a uniformly random ranking.
        median_rank: median 1-based rank of the best right answer (pessimistic ties).
        mean_rank: mean of the same ranks.
        num_queries: number of queries; num_candidates: candidates per query.
    """

    recall: dict[int, float]
    chance_recall: dict[int, float]
    median_rank: float
    mean_rank: float
    num_queries: int
    num_candidates: int

    def to_dict(self) -> dict:
        return {
            "recall": {str(k): v for k, v in self.recall.items()},
            "chance_recall": {str(k): v for k, v in self.chance_recall.items()},
            "median_rank": self.median_rank,
            "mean_rank": self.mean_rank,
            "num_queries": self.num_queries,
            "num_candidates": self.num_candidates,
        }


@dataclass(frozen=True)
class RetrievalMetrics:
    """Both retrieval directions: ``text_to_image`` (a caption retrieves images) and ``image_to_text``."""

    text_to_image: DirectionMetrics
    image_to_text: DirectionMetrics

    def to_dict(self) -> dict:
        return {"text_to_image": self.text_to_image.to_dict(), "image_to_text": self.image_to_text.to_dict()}


def pessimistic_ranks(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """1-based rank of the best right candidate of every query, ties counted against it.

    Args:
        scores: float ``[Q, C]``, higher = better; NaN is refused.
        positive: bool ``[Q, C]``, True where the candidate is right; every row needs at least one.

    Returns:
        int64 ``[Q]``: ``1 + #{wrong candidates with score >= best right score}``.

    Raises:
        ValueError: shapes differ, NaN scores, or a query without a right candidate.
    """
    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 2:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} must be the same [Q, C] shape")
    if np.isnan(scores).any():
        raise ValueError("retrieval scores contain NaN")
    if not positive.any(axis=1).all():
        raise ValueError("every query needs at least one right candidate")
    best_right = np.where(positive, scores, -np.inf).max(axis=1, keepdims=True)
    wrong_above = (~positive) & (scores >= best_right)
    return 1 + wrong_above.sum(axis=1).astype(np.int64)


def _chance_recall(num_candidates: int, num_right: np.ndarray, k: int) -> float:
    """Mean over queries of P(at least one of ``num_right`` right candidates in a random top-k)."""
    values = [
        1.0 - (comb(num_candidates - int(r), k) / comb(num_candidates, k) if k <= num_candidates else 0.0)
        for r in num_right
    ]
    return float(np.mean(values))


def _direction(ranks: np.ndarray, num_candidates: int, num_right: np.ndarray) -> DirectionMetrics:
    return DirectionMetrics(
        recall={k: float((ranks <= k).mean()) for k in RECALL_KS},
        chance_recall={k: _chance_recall(num_candidates, num_right, k) for k in RECALL_KS},
        median_rank=float(np.median(ranks)),
        mean_rank=float(ranks.mean()),
        num_queries=int(ranks.shape[0]),
        num_candidates=num_candidates,
    )


def retrieval_metrics(scores: np.ndarray, caption_image: np.ndarray) -> RetrievalMetrics:
    """Recall@1/5/10 and median rank in both directions from a caption × image score matrix.

    Text→image: each caption ranks all images; its own image is the one right answer. Image→text: each image
    ranks all captions; any of its captions is right and the best-ranked one counts (the usual Flickr30k /
    COCO protocol, e.g. VSE++). Ties are pessimistic (see `pessimistic_ranks`).

    Args:
        scores: float ``[num_captions, num_images]`` matching scores (e.g. ITM logits).
        caption_image: int ``[num_captions]`` column index of each caption's image.

    Raises:
        ValueError: shape mismatch, an index out of range, or an image without any caption.
    """
    scores = np.asarray(scores, dtype=np.float64)
    caption_image = np.asarray(caption_image, dtype=np.int64)
    num_captions, num_images = scores.shape
    if caption_image.shape != (num_captions,):
        raise ValueError(f"caption_image must be [{num_captions}], got {caption_image.shape}")
    if num_captions == 0 or num_images == 0:
        raise ValueError("retrieval needs at least one caption and one image")
    if caption_image.min() < 0 or caption_image.max() >= num_images:
        raise ValueError("caption_image holds an index outside [0, num_images)")
    positive = np.zeros_like(scores, dtype=bool)
    positive[np.arange(num_captions), caption_image] = True
    captions_per_image = positive.sum(axis=0)
    if (captions_per_image == 0).any():
        raise ValueError(
            f"{int((captions_per_image == 0).sum())} image(s) have no caption in the score matrix"
        )
    t2i = _direction(pessimistic_ranks(scores, positive), num_images, np.ones(num_captions, dtype=np.int64))
    i2t = _direction(pessimistic_ranks(scores.T, positive.T), num_captions, captions_per_image)
    return RetrievalMetrics(text_to_image=t2i, image_to_text=i2t)


# ---------------------------------------------------------------------------------------------- matching
@dataclass(frozen=True)
class MatchingMetrics:
    """Image–text matching accuracy over positives and as many sampled negatives.

    Attributes:
        accuracy: fraction of pairs classified right (logit > 0 means "match").
        positive_accuracy / negative_accuracy: the same on positives / negatives alone.
        chance: 0.5 (balanced pairs).
        num_pairs: positives + negatives.
    """

    accuracy: float
    positive_accuracy: float
    negative_accuracy: float
    chance: float
    num_pairs: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def matching_metrics(positive_logits: np.ndarray, negative_logits: np.ndarray) -> MatchingMetrics:
    """Accuracy of the matching head at threshold 0 on ``[P]`` positive and ``[P]`` negative logits.

    Raises:
        ValueError: empty or differently sized inputs (unbalanced pairs would move chance away from 0.5).
    """
    pos = np.asarray(positive_logits, dtype=np.float64).ravel()
    neg = np.asarray(negative_logits, dtype=np.float64).ravel()
    if pos.size == 0 or pos.size != neg.size:
        raise ValueError(f"need as many negatives as positives (> 0), got {pos.size} and {neg.size}")
    pos_ok, neg_ok = pos > 0, neg <= 0
    return MatchingMetrics(
        accuracy=float((pos_ok.sum() + neg_ok.sum()) / (pos.size + neg.size)),
        positive_accuracy=float(pos_ok.mean()),
        negative_accuracy=float(neg_ok.mean()),
        chance=MATCHING_CHANCE,
        num_pairs=int(pos.size + neg.size),
    )


# -------------------------------------------------------------------------------------------- captioning
@dataclass(frozen=True)
class CaptionMetrics:
    """Corpus BLEU-4 and CIDEr (pycocoevalcap ``Bleu(4)``, ``Cider()``), with the tokenisation used."""

    bleu4: float
    cider: float
    tokenizer: str
    num_images: int

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def simple_tokenize(text: str) -> str:
    """Fallback caption tokenisation when Java (for PTBTokenizer) is absent.

    Lowercase; split into words (keeping an inner apostrophe, e.g. ``man's``), numbers and single punctuation
    marks; drop the punctuation tokens pycocoevalcap's PTBTokenizer drops; join with single spaces.
    Approximates PTB tokenisation; scores may differ slightly from the PTB ones.
    """
    tokens = _SIMPLE_SPLIT.findall(text.lower().replace("\n", " "))
    return " ".join(t for t in tokens if t not in _SIMPLE_PUNCT)


def java_available() -> bool:
    """True when a ``java`` executable is on ``PATH`` (pycocoevalcap's PTBTokenizer needs it)."""
    return shutil.which("java") is not None


def tokenize_captions(captions: Mapping[str, Sequence[str]], use_ptb: bool | None = None) -> tuple[dict, str]:
    """Tokenise ``{id: [caption, ...]}`` into ``{id: [tokenised caption, ...]}``.

    Args:
        use_ptb: True = Stanford PTBTokenizer (raises ``FileNotFoundError`` without java), False = simple,
            None = PTB when java is available.

    Returns:
        The tokenised dict and the tokenizer's name (`TOKENIZER_PTB` or `TOKENIZER_SIMPLE`).
    """
    if use_ptb is None:
        use_ptb = java_available()
    if not use_ptb:
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}, TOKENIZER_SIMPLE
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = list(captions)
    wrapped = {i: [{"caption": c} for c in captions[i]] for i in ids}
    return PTBTokenizer().tokenize(wrapped), TOKENIZER_PTB


def caption_metrics(
    references: Mapping[str, Sequence[str]], hypotheses: Mapping[str, str], use_ptb: bool | None = None
) -> CaptionMetrics:
    """BLEU-4 and CIDEr of one generated caption per image against that image's reference captions.

    Args:
        references: ``{image id: [reference caption, ...]}`` raw text, at least one per image.
        hypotheses: ``{image id: generated caption}`` raw text, the same ids.
        use_ptb: see `tokenize_captions`.

    Raises:
        ValueError: the id sets differ, no images, or an image without references.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(references) != set(hypotheses) or not references:
        raise ValueError("references and hypotheses must cover the same, non-empty set of image ids")
    if any(len(v) == 0 for v in references.values()):
        raise ValueError("every image needs at least one reference caption")
    refs, name = tokenize_captions(references, use_ptb)
    hyps, _ = tokenize_captions({k: [v] for k, v in hypotheses.items()}, use_ptb)
    bleu, _ = Bleu(4).compute_score(refs, hyps, verbose=0)
    cider, _ = Cider().compute_score(refs, hyps)
    return CaptionMetrics(bleu4=float(bleu[3]), cider=float(cider), tokenizer=name, num_images=len(refs))


# -------------------------------------------------------------------------------------------- efficiency
@dataclass
class EfficiencyMeter:
    """Times batches (wall clock, ``time.perf_counter``) and reports throughput and latency.

    Use ``with meter.batch(num_samples): ...`` around each forward pass; on CUDA the timer synchronises first.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    latencies_s: list[float] = field(default_factory=list)
    samples: int = 0

    def batch(self, num_samples: int) -> _BatchTimer:
        return _BatchTimer(self, num_samples)

    def report(self) -> EfficiencyMetrics:
        """Summary of every timed batch so far; raises ``ValueError`` when nothing was timed."""
        if not self.latencies_s:
            raise ValueError("no batch was timed")
        lat = np.asarray(self.latencies_s)
        peak, kind = peak_memory_bytes(self.device)
        return EfficiencyMetrics(
            samples_per_s=float(self.samples / lat.sum()) if lat.sum() > 0 else float("inf"),
            latency_p50_ms=float(np.percentile(lat, 50) * 1e3),
            latency_p95_ms=float(np.percentile(lat, 95) * 1e3),
            num_batches=int(lat.size),
            num_samples=self.samples,
            peak_memory_bytes=peak,
            peak_memory_kind=kind,
            device=str(self.device),
        )


class _BatchTimer:
    def __init__(self, meter: EfficiencyMeter, num_samples: int) -> None:
        self.meter, self.num_samples = meter, num_samples

    def _sync(self) -> None:
        if self.meter.device.type == "cuda":
            torch.cuda.synchronize(self.meter.device)

    def __enter__(self) -> _BatchTimer:
        self._sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self._sync()
        self.meter.latencies_s.append(time.perf_counter() - self.start)
        self.meter.samples += self.num_samples


@dataclass(frozen=True)
class EfficiencyMetrics:
    """Throughput and per-batch latency of evaluation forward passes.

    Attributes:
        samples_per_s: image–text pairs (or questions, images) per second of timed forward passes.
        latency_p50_ms / latency_p95_ms: per-batch wall-clock latency percentiles, milliseconds.
        peak_memory_bytes: ``torch.cuda.max_memory_allocated`` on CUDA, else the process's peak resident set
            size (``ru_maxrss``); ``peak_memory_kind`` says which.
    """

    samples_per_s: float
    latency_p50_ms: float
    latency_p95_ms: float
    num_batches: int
    num_samples: int
    peak_memory_bytes: int
    peak_memory_kind: str
    device: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: CUDA allocator peak on a CUDA device, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "process_peak_rss"
