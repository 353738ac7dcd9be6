"""Loss functions of the pre-training and downstream tasks, as free functions (torchvision style).

Every loss that averages over a selection (masked tokens, masked regions, real caption tokens) returns a zero
that keeps a grad path when the selection is empty, never NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label of an unmasked token (PyTorch's cross-entropy default)
CONTRASTIVE_TEMPERATURE = 0.07  # CLIP's initial temperature


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` (same shape, bool) is True; 0 (with a grad path) when none is.

    Positions outside the mask never contribute, even when they hold inf or NaN.
    """
    return torch.where(mask, values, 0.0).sum() / mask.sum().clamp(min=1)


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Masked language modelling cross-entropy (BERT, Devlin et al. 2019).

    Args:
        logits: float ``[M, vocab]`` (or ``[B, T, vocab]``) predictions.
        labels: int64 ``[M]`` (or ``[B, T]``) original token ids, ``IGNORE_INDEX`` where not masked.
    Returns:
        scalar: mean over the masked tokens; 0 when none is masked.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    per_token = F.cross_entropy(logits, labels.clamp(min=0), reduction="none")  # (M,)
    return masked_mean(per_token, labels != IGNORE_INDEX)


def mrm_kl_loss(logits: torch.Tensor, target_prob: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Masked region modelling as ViLBERT: KL(detector distribution || predicted distribution).

    Args:
        logits: float ``[B, N, C]`` predicted class logits per region.
        target_prob: float ``[B, N, C]`` detector class distribution (rows sum to 1; zeros allowed).
        masked: bool ``[B, N]``, True = region was masked (only these count).
    Returns:
        scalar: mean KL over masked regions; 0 when none is masked.
    """
    log_q = F.log_softmax(logits.float(), dim=-1)
    p = target_prob.float()
    kl = (torch.special.xlogy(p, p) - p * log_q).sum(dim=-1)  # (B, N); xlogy(0, 0) = 0
    return masked_mean(kl, masked)


def mrm_regression_loss(
    predicted: torch.Tensor, target: torch.Tensor, masked: torch.Tensor, kind: str = "mse"
) -> torch.Tensor:
    """Masked region feature regression (UNITER's MRFR), for stores without class distributions.

    Args:
        predicted, target: float ``[B, N, D]`` predicted and original region features.
        masked: bool ``[B, N]``, True = region was masked.
        kind: "mse" or "smooth_l1" (element-wise, averaged over D).
    Returns:
        scalar: mean over masked regions; 0 when none is masked. Raises ``ValueError`` for an unknown kind.
    """
    target = torch.where(masked[..., None], target.float(), 0.0)  # padded targets may be anything
    if kind == "mse":
        per_element = F.mse_loss(predicted.float(), target, reduction="none")
    elif kind == "smooth_l1":
        per_element = F.smooth_l1_loss(predicted.float(), target, reduction="none")
    else:
        raise ValueError(f"unknown region regression loss {kind!r}")
    return masked_mean(per_element.mean(dim=-1), masked)


def itm_loss(logits: torch.Tensor, is_match: torch.Tensor) -> torch.Tensor:
    """Image–text matching: binary cross-entropy of ``logits [B]`` against ``is_match`` bool ``[B]``."""
    return F.binary_cross_entropy_with_logits(logits.float(), is_match.float())


def vqa_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """VQA soft-score binary cross-entropy, scaled as the bottom-up-attention VQA recipe
    (hengyuan-hu/bottom-up-attention-vqa ``instance_bce_with_logits``): mean over ``[B, A]`` times ``A``,
    i.e. the per-question sum over answers averaged over questions.

    Args:
        logits: float ``[B, A]``; targets: float ``[B, A]`` soft scores in [0, 1].
    """
    loss = F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    return loss * targets.shape[1]


def caption_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced caption cross-entropy.

    Args:
        logits: float ``[B, L, vocab]`` next-token predictions; targets: int64 ``[B, L]`` next tokens;
        mask: bool ``[B, L]``, True = real target token.
    Returns:
        scalar: mean over real target tokens; 0 when there is none.
    """
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none"
    )
    return masked_mean(per_token, mask.reshape(-1))


def contrastive_logits(
    text: torch.Tensor, visual: torch.Tensor, temperature: float = CONTRASTIVE_TEMPERATURE
) -> torch.Tensor:
    """Cosine similarity / temperature, float32 ``[B_text, B_visual]``, of ``text`` ``[B, d]`` and ``visual``."""
    return (F.normalize(text.float(), dim=-1) @ F.normalize(visual.float(), dim=-1).T) / temperature


def contrastive_loss(
    text: torch.Tensor,
    visual: torch.Tensor,
    image_index: torch.Tensor,
    temperature: float = CONTRASTIVE_TEMPERATURE,
) -> torch.Tensor:
    """Symmetric in-batch InfoNCE (CLIP, Radford et al. 2021) between L2-normalised unimodal vectors.

    Rows showing the same image (equal ``image_index``) are all positives of each other (the target spreads
    evenly over them). ``text``, ``visual``: float ``[B, d]``; ``image_index``: int64 ``[B]``.
    """
    logits = contrastive_logits(text, visual, temperature)
    same = (image_index[:, None] == image_index[None, :]).float()  # (B, B)
    target = same / same.sum(dim=1, keepdim=True)
    text_to_image = F.cross_entropy(logits, target)
    image_to_text = F.cross_entropy(logits.T, target)  # same is symmetric
    return 0.5 * (text_to_image + image_to_text)
