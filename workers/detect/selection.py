"""Which proposals of one image become stored regions (docs/design.md §2 *Box selection*).

The rule of bottom-up attention (peteanderson80/bottom-up-attention ``tools/generate_tsv.py``, and MILVLG
bottom-up-attention.pytorch ``save_roi_features``), written here as our own vectorised code:

1. For each foreground class c (1..C-1), greedy NMS at ``nms_iou`` over the proposals ordered by class-c
   score; a proposal is suppressed by a kept, higher-ranked proposal whose IoU with it is ``>= nms_iou``
   (the legacy CPU NMS, ``workers.detect.nms``: MILVLG ``nms_cpu.cpp``, py-faster-rcnn ``cpu_nms.pyx``).
2. ``max_conf[p]`` = the highest class score of p among the classes in which p survived (0 if none).
3. Keep the proposals with ``max_conf >= conf_threshold``, in proposal order (``np.where``); fewer than the
   floor → the top ``floor`` by ``max_conf``, in descending ``max_conf`` order (``np.argsort(max_conf)[::-1]``);
   more than the cap → the top ``cap``, in descending order. Fixed K is floor = cap = K (``MIN_BOXES =
   MAX_BOXES = 36`` in ``generate_tsv.py``): sorted, except when exactly K pass the threshold, which keeps
   proposal order as ``generate_tsv.py`` does. With fewer proposals than the floor, all proposals are kept,
   sorted (the image stores fewer boxes; ``num_boxes`` says how many). Proposal order is the RPN's (descending
   objectness after NMS), as the Caffe ``rois`` blob.

One IoU matrix per image serves every class: the greedy NMS runs for all classes at once, stepping through
rank positions with a ``[C-1, P]`` boolean state (no Python loop over classes).

Conventions: IoU with legacy ``+1`` pixel areas when ``area_plus_one`` (a box covers ``x2 - x1 + 1``
pixels), computed in float32 in ``nms_cpu.cpp``'s order of operations (``workers.detect.nms.legacy_iou``).

Ties: every sort here is stable and descending, so among equal scores the lower proposal index (the higher
RPN objectness) ranks first, in the per-class NMS and in the clamped ``max_conf`` order. This is a rule of our
own, not the reference's: MILVLG sorts with torch's unstable ``sort`` / ``argsort`` and ``generate_tsv.py``
with numpy's default ``argsort``, whose order among equal values depends on the library version and the
array length (measured: reversed index order up to 16 elements, scrambled beyond). Ties are common with real
proposals: RoIPool maps distinct proposals onto the same 14×14 cells (25-42 of 300 on COCO images), and those
get identical features and class scores. Where tied proposals compete (in a class's NMS, or at the floor or
cap of the selection), the reference's choice among them is arbitrary, and ours may differ from it; the tied
proposals' features and scores are equal, but their boxes are not. Without ties the selection equals the
reference's. ``max_conf = 0`` (suppressed in every class) is the commonest tie; it matters only when fewer
than ``floor`` proposals survive anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.detect.config import BoxSelectionConfig
from workers.detect.nms import legacy_iou, suppression_threshold

_WORD_BITS = 64  # suppressed-proposal sets are packed into int64 words


@dataclass(frozen=True)
class BoxSelection:
    """Result of ``select_boxes`` for one image with P proposals and K kept boxes.

    Attributes:
        keep: int64 ``[K]``, indices into the proposals: ascending (proposal order) when the count above the
            threshold lies within [floor, cap], else descending ``max_conf`` (ties: lower index first).
        max_conf: float32 ``[P]``, every proposal's ``max_conf`` (0 where suppressed in every class).
        object_ids: int16 ``[K]``, argmax over the foreground classes (1..C-1) of the kept boxes.
        object_conf: float32 ``[K]``, the class probability at ``object_ids``.
    """

    keep: np.ndarray
    max_conf: np.ndarray
    object_ids: np.ndarray
    object_conf: np.ndarray


def per_class_nms_max_conf(
    boxes_xyxy: list[torch.Tensor], class_scores: list[torch.Tensor], *, nms_iou: float, plus_one: bool
) -> list[torch.Tensor]:
    """Greedy NMS for every class of every image at once; each proposal's best score where it survived.

    All images and classes step through rank positions together: image b, class c holds a ``[P]`` bit set of
    suppressed proposals (packed in 64-bit words), its rank-r candidate is kept when its bit is clear, and a
    kept candidate ORs its row of the image's overlap matrix (IoU ``>= nms_iou``) into the set.

    Args:
        boxes_xyxy: per image, float ``[P_i, 4]`` proposals, ``xyxy`` pixels.
        class_scores: per image, float ``[P_i, C]`` scores of the classes to run NMS for (foreground only:
            the caller drops the background column), values ``>= 0``.
        nms_iou: suppress when IoU ``>=`` this (float32 threshold, as ``nms_cpu``).
        plus_one: legacy ``+1`` pixel areas.

    Returns:
        per image, float32 ``[P_i]``: ``max_conf`` (0 for a proposal suppressed in every class).
    """
    counts = [int(b.shape[0]) for b in boxes_xyxy]
    num_images, num_props = len(counts), max(counts, default=0)
    if num_props == 0:
        return [torch.zeros(0, dtype=torch.float32, device=b.device) for b in boxes_xyxy]
    device, num_classes = boxes_xyxy[0].device, class_scores[0].shape[1]
    threshold = suppression_threshold(nms_iou).to(device)
    num_words = -(-num_props // _WORD_BITS)
    overlaps = torch.zeros(num_images, num_props, num_words * _WORD_BITS, dtype=torch.bool, device=device)
    scores = torch.full((num_images, num_classes, num_props), -1.0, device=device)  # padding ranks last
    for i, (boxes, cls_scores) in enumerate(zip(boxes_xyxy, class_scores, strict=True)):
        n = counts[i]
        overlaps[i, :n, :n] = legacy_iou(boxes, plus_one=plus_one) >= threshold
        scores[i, :, :n] = cls_scores.float().t()
    words = _pack_bits(overlaps.view(num_images * num_props, -1))  # (B*P, W) int64
    scores = scores.view(num_images * num_classes, num_props)  # (B*C, P)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices.t().contiguous()  # (P, B*C)
    row_base = torch.arange(num_images, device=device).repeat_interleave(num_classes) * num_props  # (B*C,)
    suppressed = torch.zeros(num_images * num_classes, num_words, dtype=torch.int64, device=device)
    kept = torch.zeros_like(scores, dtype=torch.bool)
    rows = torch.arange(scores.shape[0], device=device)
    for rank in range(num_props):
        cand = order[rank]  # (B*C,), the rank-th proposal of each image and class
        alive = ((suppressed[rows, cand // _WORD_BITS] >> (cand % _WORD_BITS)) & 1) == 0
        kept[rows, cand] = alive
        suppressed |= words[row_base + cand] * alive[:, None]
    best = torch.where(kept, scores, torch.zeros_like(scores)).view(num_images, num_classes, num_props)
    best = best.max(dim=1).values.clamp_min(0.0)  # (B, P)
    return [best[i, :n] for i, n in enumerate(counts)]


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a bool ``[R, W * 64]`` into int64 ``[R, W]`` (bit j of word w = column 64 w + j)."""
    rows = mask.shape[0]
    shifts = torch.arange(_WORD_BITS, dtype=torch.int64, device=mask.device)
    # distinct powers of two: the (wrapping) int64 sum is their bitwise OR
    return (mask.view(rows, -1, _WORD_BITS).to(torch.int64) << shifts).sum(dim=-1)


def choose_by_max_conf(
    max_conf: torch.Tensor, *, conf_threshold: float, floor: int, cap: int
) -> torch.Tensor:
    """Indices of the kept proposals, in ``generate_tsv.py``'s order (module docstring, step 3).

    ``max_conf >= conf_threshold`` (compared in ``max_conf``'s dtype) in proposal order when their count N
    satisfies ``floor <= N <= cap``; otherwise the top ``floor`` (N < floor) or ``cap`` (N > cap) by
    ``max_conf``, descending, lower index first on ties; never more than there are proposals.

    Args:
        max_conf: float ``[P]``.

    Returns:
        int64 ``[K]`` with ``K = min(P, clamp(N, floor, cap))``.
    """
    above = torch.nonzero(max_conf >= conf_threshold).flatten()  # np.where(max_conf >= conf_thresh)[0]
    if floor <= above.numel() <= cap:
        return above
    order = torch.sort(max_conf, descending=True, stable=True).indices
    return order[: floor if above.numel() < floor else cap]


def select_boxes(
    boxes_xyxy: torch.Tensor, cls_prob: torch.Tensor, config: BoxSelectionConfig
) -> BoxSelection:
    """Select the stored regions of one image from its proposals (rule in the module docstring).

    Args:
        boxes_xyxy: float ``[P, 4]`` proposals, ``xyxy`` original-image pixels (IoU is computed on these).
        cls_prob: float ``[P, C]`` class probabilities, column 0 = background (C = 1601 for bottom-up attention).
        config: selection mode and numbers; mode ``given`` is not a selection.

    Returns:
        ``BoxSelection`` (numpy arrays on the CPU).

    Raises:
        ValueError: mode ``given``; shapes disagree; fewer than 2 columns in ``cls_prob``.
    """
    return select_boxes_batch([boxes_xyxy], [cls_prob], config)[0]


def select_boxes_batch(
    boxes_xyxy: list[torch.Tensor], cls_prob: list[torch.Tensor], config: BoxSelectionConfig
) -> list[BoxSelection]:
    """``select_boxes`` for several images in one vectorised pass (same result as one call per image).

    Args:
        boxes_xyxy: per image, float ``[P_i, 4]``, ``xyxy`` original-image pixels.
        cls_prob: per image, float ``[P_i, C]``, column 0 = background; one C for all images.
        config: as ``select_boxes``.

    Raises:
        ValueError: as ``select_boxes``; list lengths or class counts differ.
    """
    if config.mode == "given":
        raise ValueError("box mode 'given' selects nothing: pool the given boxes instead")
    if len(boxes_xyxy) != len(cls_prob):
        raise ValueError(f"{len(boxes_xyxy)} box arrays but {len(cls_prob)} probability arrays")
    for boxes, prob in zip(boxes_xyxy, cls_prob, strict=True):
        _check_shapes(boxes, prob, cls_prob[0].shape[1])
    max_confs = per_class_nms_max_conf(
        boxes_xyxy, [p[:, 1:] for p in cls_prob], nms_iou=config.nms_iou, plus_one=config.area_plus_one
    )
    floor, cap = config.box_limits
    out = []
    for prob, max_conf in zip(cls_prob, max_confs, strict=True):
        keep = choose_by_max_conf(max_conf, conf_threshold=config.conf_threshold, floor=floor, cap=cap)
        object_ids, object_conf = best_foreground(prob[keep])
        out.append(
            BoxSelection(
                keep=keep.cpu().numpy().astype(np.int64),
                max_conf=max_conf.cpu().numpy().astype(np.float32),
                object_ids=object_ids,
                object_conf=object_conf,
            )
        )
    return out


def _check_shapes(boxes: torch.Tensor, prob: torch.Tensor, num_classes: int) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be [P, 4], got {tuple(boxes.shape)}")
    if prob.ndim != 2 or prob.shape[0] != boxes.shape[0] or prob.shape[1] != num_classes or num_classes < 2:
        raise ValueError(
            f"cls_prob must be [P, C] with P={boxes.shape[0]} and one C >= 2 for all images, "
            f"got {tuple(prob.shape)}"
        )


def best_foreground(prob: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Argmax over columns 1.. (column 0, background or "no attribute", is never chosen) and its value.

    Args:
        prob: float ``[N, C]`` probabilities, C >= 2.

    Returns:
        (int16 ``[N]`` ids in 1..C-1, float32 ``[N]`` probabilities); ties go to the lower id.
    """
    best = prob[:, 1:].float().max(dim=1)
    ids = (best.indices + 1).cpu().numpy().astype(np.int16)
    return ids, best.values.cpu().numpy().astype(np.float32)
