"""Benchmark: how close ``regionflow extract`` (Ray orchestration) comes to the bare detector.

    efficiency = images/s of ``extract`` ÷ images/s of the detector alone

* ``extract``: the real pipeline (``pipelines.extract.extract``: read tasks, one detector actor, in-order
  writes, markers) over ``--shards`` tar shards built from ``../shared/data/coco-train-mini`` with the
  project's own shards code (``workers.corpus.shards.write_shards``). Timed from the first submitted shard to the
  last marker (the summary's ``processing_s``); start-up (Ray init, actor and model build) is reported
  separately and not counted.
* detector alone: the same ``RegionDetector`` class, config and thread count, in this process, fed the same
  images decoded beforehand by ``ShardReader`` from the same shards (so decoding is not timed), in batches of
  the same size. Timed over the ``extract`` call only.

The baseline runs before and after each ``extract`` run (``--repeats``; the machine may be shared); the ratio
is median extract images/s ÷ median detector-alone images/s, and every raw timing is written. Goal: ≥ 0.95 for ``butd-r101-c4`` (40 images). Prints the ratio last and writes
``bench/results/extract_efficiency_<config>.json`` (machine, versions, parameters, raw timings).

    python bench/extract_efficiency.py --config tiny --images 80 --shards 4
    python bench/extract_efficiency.py --config butd-r101-c4 --images 40 --shards 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import numpy as np

from pipelines.extract import ExtractConfig, extract, library_versions

COCO_MINI = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco-train-mini"
RESULTS = Path(__file__).resolve().parent / "results"
GOAL = 0.95


def build_shards(images: int, shards: int, out: Path) -> list[str]:
    """The first ``images`` COCO-mini images (sorted by name) with their captions, as ``shards`` tars."""
    from workers.corpus.shards import ShardsConfig, write_shards

    names = sorted(p.name for p in (COCO_MINI / "images").iterdir())[:images]
    if len(names) < images:
        raise SystemExit(f"{COCO_MINI} holds only {len(names)} images")
    image_dir = out / "images"
    image_dir.mkdir(parents=True)
    for name in names:
        (image_dir / name).symlink_to(COCO_MINI / "images" / name)
    coco = json.loads((COCO_MINI / "captions_train2017.json").read_text())
    kept = {img["id"] for img in coco["images"] if img["file_name"] in set(names)}
    coco["images"] = [img for img in coco["images"] if img["id"] in kept]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    captions = out / "captions.json"
    captions.write_text(json.dumps(coco))
    config = ShardsConfig(
        images_dir=str(image_dir),
        out_dir=str(out / "shards"),
        samples_per_shard=math.ceil(images / shards),
        captions_json=str(captions),
    )
    summary = write_shards(config)
    return [str(out / "shards" / name) for name in summary.shards]


def decoded_images(urls: list[str], config: ExtractConfig) -> list[np.ndarray]:
    """Every good image of the shards, decoded by the project's reader (in memory)."""
    from workers.read.reader import DecodedSample, ShardReader

    images = []
    for url in urls:
        images += [
            s.image_rgb for s in ShardReader(url, config.reader_config()) if isinstance(s, DecodedSample)
        ]
    return images


def detector_alone(images: list[np.ndarray], config: ExtractConfig, threads: int) -> dict[str, float]:
    """Build the detector as the actor does, then time ``extract`` over the images in batches."""
    import torch

    from pipelines.extract import DETECTOR_SEED
    from workers.detect.config import detector_config
    from workers.detect.detector import RegionDetector

    t0 = time.perf_counter()
    torch.set_num_threads(threads)
    detector = RegionDetector(
        detector_config(config.detector), config.selection(), threads=threads, seed=DETECTOR_SEED
    )
    build_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    for start in range(0, len(images), config.batch_size):
        detector.extract(images[start : start + config.batch_size])
    seconds = time.perf_counter() - t1
    return {"build_s": build_s, "seconds": seconds, "images_per_s": len(images) / seconds}


def pipeline(urls: list[str], config: ExtractConfig, store: Path) -> dict[str, Any]:
    summary = extract(urls, str(store), config)
    if summary.exit_code != 0:
        raise SystemExit(f"extract failed: {summary.to_dict()}")
    return {
        "rows": summary.rows,
        "error_rows": summary.error_rows,
        "startup_s": summary.startup_s,
        "seconds": summary.processing_s,
        "detector_busy_s": summary.detector_busy_s,
        "detector_busy_fraction": summary.detector_busy_s / summary.processing_s,
        "images_per_s": summary.images_per_s,
        "random_init": summary.random_init,
    }


def machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        cpu = next(
            (ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if "model name" in ln),
            cpu,
        )
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def measure(
    urls: list[str], images: list[np.ndarray], config: ExtractConfig, args: argparse.Namespace, tmp: Path
):
    """``repeats`` rounds of (detector alone, extract, detector alone); returns the raw timings."""
    alone, runs = [], []
    for repeat in range(args.repeats):
        if repeat == 0:
            alone.append(detector_alone(images, config, args.threads))
            print(f"detector alone: {alone[-1]['images_per_s']:.3f} images/s", flush=True)
        runs.append(pipeline(urls, config, tmp / f"store-{repeat}"))
        run = runs[-1]
        print(
            f"extract: {run['images_per_s']:.3f} images/s (start-up {run['startup_s']:.1f} s, detector busy "
            f"{run['detector_busy_fraction']:.0%} of {run['seconds']:.1f} s)",
            flush=True,
        )
        alone.append(detector_alone(images, config, args.threads))
        print(f"detector alone: {alone[-1]['images_per_s']:.3f} images/s", flush=True)
    return alone, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="butd-r101-c4", choices=("butd-r101-c4", "tiny"))
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="detector torch threads")
    parser.add_argument("--repeats", type=int, default=1, help="extract runs, each between two baselines")
    parser.add_argument("--out", type=Path, default=None, help="results JSON path")
    args = parser.parse_args()
    config = ExtractConfig(detector=args.config, batch_size=args.batch_size, detector_threads=args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="rf-bench-") as tmp:
        urls = build_shards(args.images, args.shards, Path(tmp))
        images = decoded_images(urls, config)
        alone, runs = measure(urls, images, config, args, Path(tmp))
    alone_ips = statistics.median(a["images_per_s"] for a in alone)
    extract_ips = statistics.median(r["images_per_s"] for r in runs)
    ratio = extract_ips / alone_ips
    result = {
        "benchmark": "extract_efficiency",
        "goal": GOAL,
        "ratio": ratio,
        "extract_images_per_s_median": extract_ips,
        "detector_alone_images_per_s_median": alone_ips,
        "parameters": {**vars(args), "out": None, "decoded_images": len(images)},
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "versions": library_versions(),
        "extract_runs": runs,
        "detector_alone_runs": alone,
    }
    out = args.out or RESULTS / f"extract_efficiency_{args.config}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
    print(f"efficiency ratio ({args.config}, {len(images)} images, {args.threads} threads): {ratio:.3f}")


if __name__ == "__main__":
    main()
