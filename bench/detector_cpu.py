"""CPU seconds per image of the region detector: the code before the CPU work vs now.

``before``: conv + frozen norm, contiguous (NCHW) layout, and the out-of-place ReLU / residual add of the
bottleneck as it was (re-created here by swapping ``Bottleneck.forward``); ``now``: folded norms,
``channels_last``, in-place ReLU / add (what ``RegionDetector`` runs on the CPU). Both variants run in one
process on one model, alternately (A, B, B, A, ...), so load from other processes on a shared machine hits both
alike; the report gives medians of wall and process (CPU) time, the load average,
and how far the variants' outputs differ (boxes, features relative to the feature std, on proposals and on a
fixed set of given boxes).

    python bench/detector_cpu.py --config butd-r101-c4 --threads 2 --repeats 3

Writes ``bench/results/detector_cpu_<config>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.nn import functional as F

from workers.detect import backbone as detector_module
from workers.detect.config import BoxSelectionConfig, detector_config
from workers.detect.detector import RegionDetector

IMAGES = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-train-mini" / "images"
BOX_MATCH_PX = 0.01
RESULTS = Path(__file__).resolve().parent / "results"


INPLACE_FORWARD = detector_module.Bottleneck.forward


def out_of_place_forward(self: detector_module.Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """The bottleneck's forward before the CPU work (new tensors for every ReLU and the residual add)."""
    out = F.relu(self.conv1(x))
    out = F.relu(self.conv2(out))
    out = self.conv3(out)
    identity = self.shortcut(x) if self.shortcut is not None else x
    return F.relu(out + identity)


def set_layout(detector: RegionDetector, optimized: bool) -> None:
    """Switch the detector between ``before`` (False) and ``now`` (True)."""
    if optimized:
        detector.model.fold_norms_()
        detector.model.set_memory_format_(torch.channels_last)
        detector_module.Bottleneck.forward = INPLACE_FORWARD
    else:
        detector.model.unfold_norms_()
        detector.model.set_memory_format_(torch.contiguous_format)
        detector_module.Bottleneck.forward = out_of_place_forward


def timed(
    detector: RegionDetector, image: np.ndarray, boxes: np.ndarray | None
) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    output = detector.extract([image], None if boxes is None else [boxes])[0]
    return time.perf_counter() - wall, time.process_time() - cpu, output


def compare(a: object, b: object) -> dict[str, float | bool | int]:
    """Boxes equal? Boxes matched within ``BOX_MATCH_PX`` (rounding moves proposals by ~1e-4 px): how many, and
    the features of matched boxes: max |Δ| / feature std."""
    gap = np.abs(a.boxes_xyxy_px[:, None, :] - b.boxes_xyxy_px[None, :, :]).max(axis=2)  # (N_a, N_b)
    ia, ib = np.nonzero(gap < BOX_MATCH_PX)
    out: dict[str, float | bool | int] = {
        "same_boxes": a.boxes_xyxy_px.shape == b.boxes_xyxy_px.shape
        and bool(np.array_equal(a.boxes_xyxy_px, b.boxes_xyxy_px)),
        "boxes": [len(a.boxes_xyxy_px), len(b.boxes_xyxy_px)],
        "matched_boxes": len(ia),
        "matched_in_same_position": int((ia == ib).sum()),
        "max_matched_box_gap_px": float(gap[ia, ib].max()) if len(ia) else None,
    }
    if len(ia):
        diff = np.abs(a.features[ia] - b.features[ib]).max()
        out["max_abs_feature_diff_over_std"] = float(diff / a.features.std())
        out["same_object_ids_on_matched"] = bool(np.array_equal(a.object_ids[ia], b.object_ids[ib]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="butd-r101-c4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image", type=int, default=0, help="index into the sorted coco-train-mini images")
    args = parser.parse_args()
    import cv2

    torch.set_num_threads(args.threads)
    path = sorted(IMAGES.glob("*.jpg"))[args.image]
    image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    height, width = image.shape[:2]
    given = np.array(
        [[0, 0, width, height], [10, 10, width / 2, height / 2], [width / 3, height / 4, width, height]],
        dtype=np.float32,
    )
    detector = RegionDetector(detector_config(args.config), BoxSelectionConfig(), device="cpu", seed=0)
    times: dict[str, dict[str, list[float]]] = {k: {"wall_s": [], "cpu_s": []} for k in ("before", "now")}
    outputs: dict[str, object] = {}
    for repeat in range(args.repeats):
        for name in ("before", "now") if repeat % 2 == 0 else ("now", "before"):
            set_layout(detector, name == "now")
            wall, cpu, outputs[name] = timed(detector, image, None)
            times[name]["wall_s"].append(wall)
            times[name]["cpu_s"].append(cpu)
            print(
                f"{name:9s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  load {os.getloadavg()[0]:.1f}", flush=True
            )
    given_outputs = {}
    for name in ("before", "now"):
        set_layout(detector, name == "now")
        given_outputs[name] = timed(detector, image, given)[2]
    result = {
        "config": args.config,
        "threads": args.threads,
        "image": path.name,
        "image_size_hw": [height, width],
        "torch": torch.__version__,
        "load_average_1min_end": os.getloadavg()[0],
        "median_wall_s": {k: statistics.median(v["wall_s"]) for k, v in times.items()},
        "median_cpu_s": {k: statistics.median(v["cpu_s"]) for k, v in times.items()},
        "runs": times,
        "proposals": compare(outputs["before"], outputs["now"]),
        "given_boxes": compare(given_outputs["before"], given_outputs["now"]),
    }
    result["speedup_wall"] = result["median_wall_s"]["before"] / result["median_wall_s"]["now"]
    result["speedup_cpu"] = result["median_cpu_s"]["before"] / result["median_cpu_s"]["now"]
    print(json.dumps(result, indent=1))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"detector_cpu_{args.config}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
