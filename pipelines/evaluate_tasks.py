"""The three task evaluators of ``regionflow evaluate`` (``pipelines.evaluate``), each on the held-out images of
one store as the model sees them (a control may have permuted their visual rows):

- ``evaluate_retrieval``: recall@1/5/10 and median rank both ways, matching accuracy against a seeded
  other image (chance 0.5);
- ``evaluate_vqa``: official VQA accuracy of the held-out questions beside the majority-answer baseline of
  the training-split questions;
- ``evaluate_captions``: BLEU-4 and CIDEr of one generated caption per held-out image.

They run in the driver process (no Ray). ``EvalInputError`` is the refusal shared with the driver.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from model.data import StoreImages
from model.items import CaptionPairs
from model.scoring import Scorer, retrieval_matrices


class EvalInputError(ValueError):
    """A run, store or argument that cannot be evaluated (the message says why)."""


def evaluate_retrieval(
    scorer: Scorer, images: StoreImages, heldout: np.ndarray, rerank_top: int, seed: int
) -> dict[str, Any]:
    """Retrieval metrics and matching accuracy on the held-out images that have captions."""
    from model.metrics import matching_metrics, retrieval_metrics

    counts = images.num_captions()[heldout]
    columns = heldout[counts > 0]
    if len(columns) == 0:
        raise EvalInputError("no held-out image has a caption: nothing to retrieve")
    pairs = CaptionPairs(images, columns)
    captions = [
        (images.caption_ids(int(img))[int(k)], int(img))
        for img, k in zip(pairs.pair_image, pairs.pair_caption, strict=True)
    ]
    col_of = {int(img): j for j, img in enumerate(columns)}
    caption_col = np.array([col_of[img] for _, img in captions])
    t2i, i2t, note = retrieval_matrices(scorer, captions, columns, rerank_top)
    result: dict[str, Any] = {
        "retrieval": {
            "scoring": note,
            "text_to_image": retrieval_metrics(t2i, caption_col).text_to_image.to_dict(),
            "image_to_text": retrieval_metrics(i2t, caption_col).image_to_text.to_dict(),
            "images_without_captions": int((counts == 0).sum()),
        }
    }
    if len(columns) >= 2:
        rng = np.random.default_rng(seed)
        other = (caption_col + rng.integers(1, len(columns), size=len(captions))) % len(columns)
        pos = scorer.match_logits(captions, "matching")
        neg = scorer.match_logits(
            [(ids, int(columns[o])) for (ids, _), o in zip(captions, other, strict=True)], "matching"
        )
        result["matching"] = matching_metrics(pos, neg).to_dict()
    return result


def evaluate_vqa(
    scorer: Scorer,
    run_info: dict[str, Any],
    images: StoreImages,
    held_mask: np.ndarray,
    args: argparse.Namespace,
    config: Any,
) -> dict[str, Any]:
    """Official VQA accuracy on held-out questions and the majority baseline fitted on training questions."""
    from model.vqa import (
        DEFAULT_MAX_QUESTION_TOKENS,
        MajorityBaseline,
        load_vqa,
        split_questions,
        vqa_accuracy,
    )
    from schemas.text_checkpoint import resolve_text_checkpoint
    from workers.read.tokenizer import CaptionTokenizer

    if not (args.vqa_questions and args.vqa_annotations):
        raise EvalInputError("--task vqa needs --vqa-questions and --vqa-annotations")
    vocab = (run_info.get("vqa") or {}).get("answer_vocab") or []
    if not vocab or config.num_answers != len(vocab):
        raise EvalInputError("this run was not trained for VQA (no answer vocabulary in run.json)")
    parts = split_questions(load_vqa(args.vqa_questions, args.vqa_annotations), images.image_ids(), held_mask)
    held = parts["heldout"]
    if not held.questions:
        raise EvalInputError("no VQA question names a held-out image: the held-out VQA split is empty")
    max_tokens = run_info["train"].get("max_question_tokens", DEFAULT_MAX_QUESTION_TOKENS)
    tokenizer = CaptionTokenizer(str(resolve_text_checkpoint(config.text_checkpoint)), max_tokens=max_tokens)
    ids = tokenizer.encode([q.question for q in held.questions]).input_ids
    logits = scorer.run_batches(
        "vqa",
        list(zip(ids, held.image_index.tolist(), strict=True)),
        lambda b: scorer.model.vqa_logits(b).float().cpu(),
    )
    predictions = [vocab[j] for j in torch.cat(logits).argmax(dim=1).tolist()]
    result: dict[str, Any] = {
        "model": vqa_accuracy(held.questions, predictions).to_dict(),
        "answer_vocab_size": len(vocab),
    }
    if parts["train"].questions:
        baseline = MajorityBaseline.fit(parts["train"].questions)
        result["baseline"] = vqa_accuracy(
            held.questions, [baseline.predict(q) for q in held.questions]
        ).to_dict()
        result["baseline"]["kind"] = "most frequent training answer of the question type"
    else:
        result["baseline"] = {"overall": None, "per_question_type": {}, "kind": "no training-split questions"}
    return result


def evaluate_captions(
    scorer: Scorer, images: StoreImages, heldout: np.ndarray, config: Any, beam_size: int
) -> dict[str, Any]:
    """BLEU-4 / CIDEr of one generated caption per held-out image with reference captions."""
    from model.metrics import caption_metrics
    from schemas.text_checkpoint import resolve_text_checkpoint
    from workers.read.tokenizer import CaptionTokenizer

    counts = images.num_captions()
    columns = [int(i) for i in heldout if counts[i] > 0]
    if not columns:
        raise EvalInputError("no held-out image has a reference caption")
    max_tokens = config.max_caption_tokens - 2
    generated = scorer.run_batches(
        "caption_generation",
        [((config.cls_token_id, config.sep_token_id), i) for i in columns],  # "[CLS] [SEP]": text-free
        lambda b: scorer.model.generate_captions(b, max_tokens, beam_size),
    )
    tokenizer = CaptionTokenizer(str(resolve_text_checkpoint(config.text_checkpoint)))
    texts = [tokenizer.decode(ids) for chunk in generated for ids in chunk]
    refs = {str(i): images.captions(i) for i in columns}
    metrics = caption_metrics(refs, dict(zip(refs, texts, strict=True))).to_dict()
    metrics["decoding"] = "greedy" if beam_size == 1 else f"beam search, beam {beam_size}"
    metrics["examples"] = [
        {"image": images.identity(i), "generated": t, "reference": refs[str(i)][0]}
        for i, t in list(zip(columns, texts, strict=True))[:5]
    ]
    return metrics
