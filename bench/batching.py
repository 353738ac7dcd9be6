"""Benchmark: region-detector throughput at batch N vs batch 1 on the CPU, with identical features.

    ratio = images/s calling ``RegionDetector.extract`` with N images ÷ images/s calling it with 1 image
    (goal on the CPU: no loss, >= 0.95; features must be identical: max |diff| reported and asserted 0)

``--images`` real COCO-mini images are resized to one size (``--size``, H×W), the case in which batching
could change anything. The sides alternate (batch 1, batch N, ...), ``--repeats``
rounds after ``--warmup``; images/s uses the median round.

On the CPU ``RegionDetector`` runs the images of a call one by one (oneDNN picks kernels by batch size, and
batching brings no speed there): both sides then run the same code and the ratio measures the call overhead
only. ``--true-batch`` adds a third side that forces the CUDA grouping (one RoI head over all images) on the CPU, to
show what real batching would give and how far its features move (reported, not asserted).

The time of every network stage is summed with forward hooks over the batch-1 rounds and reported per image:
prepare (colour, mean, resize), trunk (stem..res4), RPN (head, decode, NMS), RoI head (RoIPool, res5 head over
all proposals, box predictor), box selection (per-class NMS), and the rest (outputs to numpy).

    python bench/batching.py --config tiny --images 8 --repeats 5
    python bench/batching.py --config butd-r101-c4 --images 8 --repeats 1 --warmup 0    # ~1 min/image here
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import add_repo_to_path, set_passive_omp

set_passive_omp()
add_repo_to_path()

import common  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

GOAL = 0.95
DEFAULT_SIZE_HW = (480, 640)  # COCO's most common size; butd input 600×800, tiny 96×128


class StageTimer:
    """Wall-clock seconds per detector stage, summed while ``active`` (forward hooks + wrapped methods)."""

    def __init__(self, detector: Any) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.active = False
        model = detector.model
        for name, module in (
            ("trunk", model.backbone),
            ("rpn", model.proposal_generator),
            ("roi_head", model.roi_heads),
            ("res5", model.roi_heads.res5),
            ("box_predictor", model.roi_heads.box_predictor),
        ):
            self._hook(name, module)
        detector._prepare_all = self._wrap("prepare", detector._prepare_all)
        detector._select = self._wrap("selection", detector._select)
        detector.extract = self._wrap("total", detector.extract)

    def _hook(self, name: str, module: torch.nn.Module) -> None:
        starts: list[float] = []
        module.register_forward_pre_hook(lambda *_: starts.append(time.perf_counter()))

        def post(*_: object) -> None:
            elapsed = time.perf_counter() - starts.pop()
            if self.active:
                self.seconds[name] += elapsed

        module.register_forward_hook(post)

    def _wrap(self, name: str, fn: Callable) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.active:
                    self.seconds[name] += time.perf_counter() - start

        return timed

    def split_per_image(self, images: int) -> dict[str, float]:
        """Seconds per image: prepare, trunk, rpn, roi_pool, res5, box_predictor, selection, other."""
        s = self.seconds
        split = {
            "prepare": s["prepare"],
            "trunk": s["trunk"],
            "rpn": s["rpn"],
            "roi_pool": s["roi_head"] - s["res5"] - s["box_predictor"],
            "res5_head": s["res5"],
            "box_predictor": s["box_predictor"],
            "selection": s["selection"],
        }
        split["other"] = s["total"] - sum(split.values())
        return {k: v / max(1, images) for k, v in split.items()}


def force_batches(detector: Any) -> None:
    """Make the detector run the RoI heads of all images of a call together on the CPU too (the CUDA path)."""
    detector.rois_across_images = True


def features_of(outputs: list[Any]) -> list[np.ndarray]:
    return [o.features for o in outputs]


def max_abs_diff(a: list[Any], b: list[Any]) -> float:
    """Max |feature difference| over the images; ``inf`` when an image's boxes differ (see `compare`)."""
    return compare(a, b)["max_abs_feature_diff"]


def compare(a: list[Any], b: list[Any]) -> dict[str, Any]:
    """Images whose selected boxes differ, and the max |feature difference| over the images whose boxes agree
    (``inf`` when any image's boxes differ: different regions, features not comparable)."""
    differ = [
        i
        for i, (x, y) in enumerate(zip(a, b, strict=True))
        if x.features.shape != y.features.shape or not np.array_equal(x.boxes_xyxy_px, y.boxes_xyxy_px)
    ]
    same = [
        float(np.abs(x.features - y.features).max())
        for i, (x, y) in enumerate(zip(a, b, strict=True))
        if i not in differ
    ]
    return {
        "images_with_other_boxes": len(differ),
        "max_abs_feature_diff_where_boxes_agree": max(same, default=0.0),
        "max_abs_feature_diff": float("inf") if differ else max(same, default=0.0),
    }


def build(config: str, threads: int) -> Any:
    from workers.detect.config import BoxSelectionConfig, detector_config
    from workers.detect.detector import RegionDetector

    torch.set_num_threads(threads)
    return RegionDetector(
        detector_config(config), BoxSelectionConfig(mode="fixed", num_boxes=36), device="cpu", threads=threads
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="tiny", choices=("tiny", "butd-r101-c4"))
    parser.add_argument("--images", type=int, default=8, help="batch size N (= images per round)")
    parser.add_argument("--size", default=f"{DEFAULT_SIZE_HW[0]}x{DEFAULT_SIZE_HW[1]}", help="H x W")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--true-batch", action="store_true", help="also time forced one-forward batches")
    parser.add_argument("--quick", action="store_true", help="tiny, 2 images, 1 repeat, no warmup")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.config, args.images, args.repeats, args.warmup = "tiny", 2, 1, 0
    height, width = (int(v) for v in args.size.lower().split("x"))
    images = [im for _, im in common.coco_images(args.images, (height, width))]
    detector = build(args.config, args.threads)
    timer = StageTimer(detector)
    batched = build(args.config, args.threads) if args.true_batch else None
    if batched is not None:
        force_batches(batched)

    last: dict[str, list[Any]] = {}

    def batch_1() -> None:
        timer.active = True
        last["batch_1"] = [out for im in images for out in detector.extract([im])]
        timer.active = False

    def batch_n() -> None:
        last["batch_n"] = detector.extract(images)

    sides: dict[str, Callable[[], None]] = {"batch_1": batch_1, "batch_n": batch_n}
    if batched is not None:
        sides["true_batch_n"] = lambda: last.__setitem__("true_batch_n", batched.extract(images))
    started = time.perf_counter()
    times = common.alternate(sides, args.repeats, args.warmup)
    rounds = args.repeats + args.warmup
    diff = max_abs_diff(last["batch_1"], last["batch_n"])
    rates = {name: len(images) / common.median(t) for name, t in times.items()}
    ratio = rates["batch_n"] / rates["batch_1"]
    result: dict[str, Any] = {
        "goal": GOAL,
        "ratio": ratio,
        "ratio_definition": f"images/s extract({args.images} images) / images/s extract(1 image), CPU",
        "images_per_s": rates,
        "round_seconds": times,
        "max_abs_feature_diff_batch_n_vs_1": diff,
        "stage_seconds_per_image_batch_1": timer.split_per_image(len(images) * rounds),
        "wall_seconds": time.perf_counter() - started,
        "parameters": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "images_source": "COCO-mini, first N by file name, resized to --size",
            "weights": detector.weights_digest,
            "box_mode": "fixed 36",
        },
    }
    if batched is not None:
        result["true_batch_ratio"] = rates["true_batch_n"] / rates["batch_1"]
        result["true_batch_vs_1"] = compare(last["batch_1"], last["true_batch_n"])
        result["max_feature_magnitude"] = max(float(np.abs(o.features).max()) for o in last["batch_1"])
    path = common.write_result(f"batching_{args.config}", result, args.out)
    split = result["stage_seconds_per_image_batch_1"]
    total = sum(split.values())
    print(f"{args.config}: batch 1 {rates['batch_1']:.3f} images/s, batch {args.images} "
          f"{rates['batch_n']:.3f} images/s, max |diff| {diff:g}")  # fmt: skip
    print(
        "time per image (batch 1): "
        + ", ".join(f"{k} {v * 1e3:.1f} ms ({v / total:.0%})" for k, v in split.items())
    )
    if batched is not None:
        print(f"forced one-forward batches: {rates['true_batch_n']:.3f} images/s "
              f"(ratio {result['true_batch_ratio']:.3f}); vs batch 1: {result['true_batch_vs_1']}")  # fmt: skip
    print(f"results: {path}")
    if diff != 0.0:
        raise SystemExit(f"features differ between batch 1 and batch {args.images}: max |diff| {diff}")
    common.print_ratio(f"batching {args.config}: batch {args.images} / batch 1 images/s (CPU)", ratio, GOAL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
