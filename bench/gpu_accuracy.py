"""Precision contexts and the accuracy / FLOP measurements of ``bench/gpu_bench.py`` (run by ``bench/gpu.sh``).

bf16 and fp16 autocast against fp32 (TF32 off): RPN proposals (share of the fp32 proposals matched at IoU >= 0.5
/ 0.7 / 0.9, mean best IoU) and region features at the fp32 run's boxes (relative L2 error per image, checked
against ``workers.detect.config.AUTOCAST_FEATURE_TOLERANCE``); FLOPs of trunk, RPN and RoI head on one image.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import torch

IOU_LEVELS = (0.5, 0.7, 0.9)


@contextlib.contextmanager
def precision(detector: Any, dtype: str) -> Any:
    """Run the detector in ``fp32`` (TF32 off: true float32), ``bf16`` or ``fp16`` autocast."""
    saved = detector.autocast_dtype, torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    detector.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        detector.autocast_dtype = saved[0]
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[1], saved[2]


def network_input(prepared: Any, device: torch.device) -> torch.Tensor:
    """``[1, 3, h, w]``: the prepared image at its own resized size (unpadded), as ``RegionDetector`` runs it."""
    return prepared.tensor[None].to(device)


@torch.inference_mode()
def proposals(detector: Any, images: list[np.ndarray]) -> list[torch.Tensor]:
    """RPN proposals (network pixels, float32) of each image, run one at a time."""
    out = []
    for prepared in detector._prepare_all(images, None):
        batch = network_input(prepared, detector.device)
        with detector._autocast():
            features = detector.model.backbone(batch)
            props = detector.model.proposal_generator(
                features, [tuple(prepared.tensor.shape[1:])], [prepared.scale]
            )[0]
        out.append(props.float().cpu())
    return out


def proposal_agreement(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict[str, Any]:
    from torchvision.ops import box_iou

    best = torch.cat([box_iou(r, o).max(dim=1).values for r, o in zip(reference, other, strict=True)])
    return {
        "proposals_fp32": [int(r.shape[0]) for r in reference],
        "proposals_bf16": [int(o.shape[0]) for o in other],
        "mean_best_iou": float(best.mean()),
        **{f"matched_at_iou_{t}": float((best >= t).float().mean()) for t in IOU_LEVELS},
    }


def accuracy(detector: Any, images: list[np.ndarray]) -> dict[str, Any]:
    """bf16 and fp16 autocast against fp32: RPN proposals, and region features at the fp32 run's boxes, checked
    against ``AUTOCAST_FEATURE_TOLERANCE`` (relative L2 error per image)."""
    from workers.detect.config import AUTOCAST_FEATURE_TOLERANCE

    with precision(detector, "fp32"):
        ref_props = proposals(detector, images)
        boxes = [r.boxes_xyxy_px for r in detector.extract(images)]
        fixed_fp32 = detector.extract(images, boxes)
    out: dict[str, Any] = {"images": len(images)}
    for dtype, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        with precision(detector, dtype):
            props = proposals(detector, images)
            fixed = detector.extract(images, boxes)
        rel = [
            float(np.linalg.norm(b.features - f.features) / max(np.linalg.norm(f.features), 1e-30))
            for b, f in zip(fixed, fixed_fp32, strict=True)
        ]
        ids = [np.mean(b.object_ids == f.object_ids) for b, f in zip(fixed, fixed_fp32, strict=True)]
        out[dtype] = {
            "rpn_proposals": proposal_agreement(ref_props, props),
            "features_at_fixed_boxes": {
                "relative_error_per_image": rel,
                "median": float(np.median(rel)),
                "max": float(np.max(rel)),
                "tolerance": AUTOCAST_FEATURE_TOLERANCE[name],
                "within_tolerance": bool(np.max(rel) <= AUTOCAST_FEATURE_TOLERANCE[name]),
                "object_id_agreement": float(np.mean(ids)),
            },
        }
    return out


def flops_per_image(detector: Any, image: np.ndarray) -> dict[str, float] | None:
    """GFLOPs of trunk, RPN and RoI head on one image (``torch.utils.flop_counter``), or None if unavailable."""
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    model, out = detector.model, {}
    prepared = detector._prepare_all([image], None)[0]
    batch = network_input(prepared, detector.device)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            features = model.backbone(batch)
        out["trunk_gflops"] = counter.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as counter:
            props = model.proposal_generator(features, [tuple(prepared.tensor.shape[1:])], [prepared.scale])
        out["rpn_gflops"] = counter.get_total_flops() / 1e9
        with FlopCounterMode(display=False) as counter:
            model.roi_heads([features], props)
        out["roi_head_gflops"] = counter.get_total_flops() / 1e9
    out["rois"] = int(props[0].shape[0])
    return out
