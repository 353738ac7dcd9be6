"""Benchmark: ``regionflow extract`` memory stays flat when the corpus grows 10×.

    ratio = peak PSS (driver + Ray workers) on the 1× corpus ÷ the same on the 10× corpus    (goal >= 0.9)

The 1× corpus is ``--shards`` tar shards of ``--per-shard`` COCO-mini images (with their captions) made by the
project's ``workers.corpus.shards.write_shards``; the 10× corpus is the same tars copied under ten times as many shard
names (same images, 10× the shards and rows). Each ``regionflow extract --config tiny`` runs in a subprocess
(its own local Ray instance). While it runs, a sampler thread reads the proportional set size (PSS,
``psutil.Process.memory_full_info().pss``: shared pages split between the processes that map them, so the sum
over processes counts shared memory once) of the subprocess and of every descendant, every ``--interval``
seconds. The driver and the Ray workers (``ray::`` processes: read tasks, detector actor, idle workers) are
summed per sample; Ray's own daemons (gcs_server, raylet, dashboard agent, runtime-env agent, log monitor)
are reported separately and not in the ratio. The figure is the peak of the per-sample sum.

    python bench/memory.py [--shards 2 --per-shard 20 --factor 10]
    python bench/memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import add_repo_to_path, set_passive_omp

set_passive_omp()
add_repo_to_path()

import common  # noqa: E402

GOAL = 0.9
MIB = 2**20


def build_corpus(tmp: Path, shards: int, per_shard: int) -> list[Path]:
    """``shards`` tars of the first ``shards · per_shard`` COCO-mini images and their captions."""
    from workers.corpus.shards import ShardsConfig, write_shards

    count = shards * per_shard
    images = tmp / "images"
    images.mkdir()
    names = _first_names(count)
    for name in names:
        (images / name).symlink_to(common.COCO_MINI / "images" / name)
    coco = json.loads((common.COCO_MINI / "captions_train2017.json").read_text())
    kept = {img["id"] for img in coco["images"] if img["file_name"] in set(names)}
    coco["images"] = [img for img in coco["images"] if img["id"] in kept]
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] in kept]
    (tmp / "captions.json").write_text(json.dumps(coco))
    summary = write_shards(
        ShardsConfig(str(images), str(tmp / "base"), per_shard, str(tmp / "captions.json"), prefix="base")
    )
    return [tmp / "base" / name for name in summary.shards]


def _first_names(count: int) -> list[str]:
    names = sorted(p.name for p in (common.COCO_MINI / "images").glob("*.jpg"))[:count]
    if len(names) < count:
        raise FileNotFoundError(f"COCO-mini holds {len(names)} images, {count} asked")
    return names


def replicate(base: list[Path], factor: int, out: Path) -> list[Path]:
    """``factor`` copies of every base shard under new shard ids (``copy00-base-000000.tar`` ...)."""
    out.mkdir()
    copies = []
    for i in range(factor):
        for tar in base:
            target = out / f"copy{i:02d}-{tar.name}"
            shutil.copyfile(tar, target)
            copies.append(target)
    return copies


def run_extract(shards: list[Path], store: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``regionflow extract --config tiny`` in a subprocess while sampling PSS; returns figures."""
    command = [
        sys.executable, "-m", "pipelines.cli", "extract", *map(str, shards), "--out", str(store),
        "--config", "tiny", "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    if args.detector_threads:
        command += ["--detector-threads", str(args.detector_threads)]
    env = {**os.environ, "PYTHONPATH": str(common.REPO), "RAY_ADDRESS": ""}
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with common.PssSampler(proc.pid, args.interval) as sampler:
        stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"extract exited {proc.returncode}: {stderr.decode()[-3000:]}")
    summary = json.loads(stdout)
    peak = sampler.peak
    if peak.max_workers == 0:
        raise RuntimeError(
            "no Ray worker process was seen under the extract subprocess (joined a foreign cluster?)"
        )
    return {
        "shards": len(shards),
        "rows": summary["rows"],
        "wall_seconds": seconds,
        "processing_s": summary.get("processing_s"),
        "peak_driver_plus_workers_bytes": peak.peak_driver_plus_workers,
        "peak_ray_daemons_bytes": peak.peak_daemons,
        "peak_by_group_bytes": peak.peak_by_group,
        "max_worker_processes": peak.max_workers,
        "samples": peak.samples,
        "timeline_s_main_daemons_bytes": peak.timeline[:: max(1, len(peak.timeline) // 200)],
        "summary": {
            k: summary.get(k) for k in ("max_batches_in_flight", "max_images_in_flight", "images_per_s")
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shards", type=int, default=2, help="shards of the 1x corpus")
    parser.add_argument("--per-shard", type=int, default=20, help="images per shard")
    parser.add_argument("--factor", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--detector-threads", type=int, default=0, help="0: extract's default")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between PSS samples")
    parser.add_argument("--quick", action="store_true", help="1 shard of 2 images, factor 3")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.shards, args.per_shard, args.factor = 1, 2, 3
    with tempfile.TemporaryDirectory(prefix="rf-bench-mem-") as tmp_name:
        tmp = Path(tmp_name)
        base = build_corpus(tmp, args.shards, args.per_shard)
        big = replicate(base, args.factor, tmp / "big")
        small = run_extract(base, tmp / "store-1x", args)
        print(
            f"1x: {small['rows']} rows, peak {small['peak_driver_plus_workers_bytes'] / MIB:.0f} MiB",
            flush=True,
        )
        large = run_extract(big, tmp / f"store-{args.factor}x", args)
        print(
            f"{args.factor}x: {large['rows']} rows, peak {large['peak_driver_plus_workers_bytes'] / MIB:.0f} MiB"
        )
    ratio = small["peak_driver_plus_workers_bytes"] / large["peak_driver_plus_workers_bytes"]
    result = {
        "goal": GOAL,
        "ratio": ratio,
        "ratio_definition": f"peak PSS (driver + Ray workers) 1x corpus / {args.factor}x corpus",
        "corpus_1x": small,
        f"corpus_{args.factor}x": large,
        "parameters": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "detector": "tiny",
            "images": "COCO-mini, first shards*per_shard by file name; the large corpus copies the same tars",
        },
    }
    path = common.write_result("memory", result, args.out)
    print(f"Ray daemons (not in the ratio): 1x {small['peak_ray_daemons_bytes'] / MIB:.0f} MiB, "
          f"{args.factor}x {large['peak_ray_daemons_bytes'] / MIB:.0f} MiB")  # fmt: skip
    print(f"results: {path}")
    common.print_ratio(f"memory peak PSS 1x / {args.factor}x corpus (extract tiny)", ratio, GOAL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
