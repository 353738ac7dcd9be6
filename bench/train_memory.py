"""Benchmark: training memory does not grow with the store (docs/design.md §5, issue 12).

    ratio = peak PSS of one training rank on the 1x store ÷ the same on the 8x store     (goal >= 0.9)
    also:   the same ratio for the driver; anonymous memory added by opening a store ÷ its feature bytes
            (goal <= 5%)

Stores: butd-size rows (36 regions of float16 ``[2048]``, boxes, two captions with token ids) written by
``workers.store.PartWriter`` in extract's layout: record batches of ``ROWS_PER_RECORD_BATCH`` (64) rows. The 1x
store has ``--rows`` rows in 4 shards, the 8x store ``8 * --rows`` rows in 4 shards. Features are random
(their values do not change memory), the same seed for both.

Opening: a fresh interpreter reads ``/proc/self/smaps_rollup`` (``Anonymous``) before and after
``StoreImages(StoreReader(store))``, and again after reading every row once (``visual`` + ``caption_ids``).

Training: ``regionflow train STORE --task retrieval --workers 1 --model-config small --max-steps N`` in a
subprocess (its own local Ray); a sampler reads the PSS (``psutil ... memory_full_info().pss``) of the driver
and of each Ray Train worker process (``RayTrainWorker`` in its command line) every ``--interval`` s; the
figures are the peaks. Both stores train the same steps on the same batch size, so a rank touches as many
feature pages of the mapped parts in both; what could grow with the store (copies of columns, Python lists of
captions) is what the ratio catches.

    python bench/train_memory.py [--rows 500 --factor 8 --steps 20]
    python bench/train_memory.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import add_repo_to_path, set_passive_omp

set_passive_omp()
add_repo_to_path()

import common  # noqa: E402
import numpy as np  # noqa: E402

GOAL_RATIO = 0.9
GOAL_OPEN_FRACTION = 0.05
FEATURE_DIM = 2048
NUM_BOXES = 36
SHARDS = 4
MIB = 2**20

OPEN_SCRIPT = r"""
import json, sys
from model.data import StoreImages
from workers.store import StoreReader

def anonymous():
    for line in open("/proc/self/smaps_rollup"):
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) * 1024
before = anonymous()
images = StoreImages(StoreReader(sys.argv[1]))
opened = anonymous()
for i in range(images.num_images):
    images.visual(i).features.sum()
    images.caption_ids(i)
read = anonymous()
print(json.dumps({"before": before, "opened": opened, "after_reading_every_row": read,
                  "num_images": images.num_images}))
"""


def _rows_table(start: int, count: int, shard: str, rng: np.random.Generator) -> Any:
    """``count`` butd-size rows as an Arrow table of ``row_schema(2048)`` (numpy-built, no Python floats)."""
    import pyarrow as pa

    from schemas.store import row_schema

    n = count * NUM_BOXES
    features = rng.standard_normal((n, FEATURE_DIM), dtype=np.float32).astype(np.float16)
    offsets = pa.array(np.arange(count + 1, dtype=np.int64) * NUM_BOXES)
    x1 = rng.uniform(0, 300, n).astype(np.float32)
    boxes = np.stack([x1, x1, x1 + 50, x1 + 60], axis=1)
    ids = pa.array(
        [[101, *rng.integers(1000, 5000, 10).tolist(), 102] for _ in range(2 * count)], pa.list_(pa.int32())
    )
    columns = {
        "key": pa.array([f"img-{start + i:07d}" for i in range(count)]),
        "shard": pa.array([shard] * count),
        "image_id": pa.array(np.arange(start, start + count, dtype=np.int64)),
        "image_width_px": pa.array(np.full(count, 640, np.int32)),
        "image_height_px": pa.array(np.full(count, 480, np.int32)),
        "num_boxes": pa.array(np.full(count, NUM_BOXES, np.int32)),
        "boxes_xyxy_px": pa.LargeListArray.from_arrays(
            offsets, pa.FixedSizeListArray.from_arrays(pa.array(boxes.ravel()), 4)
        ),
        "features": pa.LargeListArray.from_arrays(
            offsets, pa.FixedSizeListArray.from_arrays(pa.array(features.ravel()), FEATURE_DIM)
        ),
        "object_ids": pa.ListArray.from_arrays(
            pa.array(np.arange(count + 1, dtype=np.int32) * NUM_BOXES), pa.array(np.ones(n, np.int16))
        ),
        "object_conf": pa.ListArray.from_arrays(
            pa.array(np.arange(count + 1, dtype=np.int32) * NUM_BOXES), pa.array(np.full(n, 0.5, np.float32))
        ),
        "attribute_ids": pa.nulls(count, pa.list_(pa.int16())),
        "attribute_conf": pa.nulls(count, pa.list_(pa.float32())),
        "cls_prob": pa.nulls(count, pa.large_list(pa.list_(pa.float16(), 1601))),
        "box_source": pa.array(["detector"] * count),
        "captions": pa.ListArray.from_arrays(
            pa.array(np.arange(count + 1, dtype=np.int32) * 2),
            pa.array([f"caption {i}" for i in range(2 * count)]),
        ),
        "input_ids": pa.ListArray.from_arrays(pa.array(np.arange(count + 1, dtype=np.int32) * 2), ids),
        "captions_truncated": pa.ListArray.from_arrays(
            pa.array(np.arange(count + 1, dtype=np.int32) * 2), pa.array([False] * (2 * count))
        ),
    }
    return pa.table(columns, schema=row_schema(FEATURE_DIM))


def build_store(root: Path, rows: int) -> dict[str, Any]:
    """A committed store of ``rows`` butd-size rows in `SHARDS` shards, 64-row record batches."""
    from schemas.manifest import ShardAccounting, new_manifest
    from workers.store import ROWS_PER_RECORD_BATCH, PartWriter, StoreLocation, write_manifest

    location = StoreLocation.parse(str(root))
    manifest = new_manifest(
        feature_dim=FEATURE_DIM,
        extraction_config={"bench": "train_memory", "feature_dim": FEATURE_DIM},
        provenance={"weights": {"digest": "bench", "random_init": True}},
    )
    write_manifest(location, manifest)
    rng = np.random.default_rng(0)
    per_shard = rows // SHARDS
    for s in range(SHARDS):
        writer = PartWriter(location, f"bench-{s:03d}", FEATURE_DIM, manifest["config_digest"])
        for start in range(0, per_shard, ROWS_PER_RECORD_BATCH):
            count = min(ROWS_PER_RECORD_BATCH, per_shard - start)
            writer.add_rows(_rows_table(s * per_shard + start, count, f"bench-{s:03d}", rng))
        writer.commit(ShardAccounting(2 * per_shard, 2 * per_shard, 0, {}, per_shard, per_shard, 0))
    return {
        "rows": per_shard * SHARDS,
        "feature_bytes": per_shard * SHARDS * NUM_BOXES * FEATURE_DIM * 2,
        "rows_per_record_batch": ROWS_PER_RECORD_BATCH,
    }


def measure_open(store: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(common.REPO)}
    done = subprocess.run(
        [sys.executable, "-c", OPEN_SCRIPT, str(store)], env=env, capture_output=True, text=True, check=True
    )
    figures = json.loads(done.stdout)
    figures["added_by_open"] = figures["opened"] - figures["before"]
    figures["added_by_reading_every_row"] = figures["after_reading_every_row"] - figures["before"]
    return figures


def _anonymous(pid: int) -> int:
    """``Anonymous`` of ``/proc/PID/smaps_rollup`` in bytes (0 when the process is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("Anonymous:")), 0)
    except OSError:
        return 0


class RankSampler:
    """Peak PSS of the root process (the driver) and of each Ray Train worker under it, sampled in a thread."""

    def __init__(self, root_pid: int, interval_s: float) -> None:
        self.root_pid, self.interval_s = root_pid, interval_s
        self.driver = 0
        self.rank = 0
        self.driver_uss = 0
        self.rank_uss = 0
        self.driver_anon = 0
        self.rank_anon = 0
        self.samples = 0
        self.rank_seen = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RankSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                root = psutil.Process(self.root_pid)
                procs = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            for proc in procs:
                try:
                    info = proc.memory_full_info()
                    pss, uss = info.pss, info.uss
                    cmdline = " ".join(proc.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if proc.pid == self.root_pid:
                    self.driver, self.driver_uss = max(self.driver, pss), max(self.driver_uss, uss)
                    self.driver_anon = max(self.driver_anon, _anonymous(proc.pid))
                elif "TrainWorker" in cmdline:
                    self.rank, self.rank_seen = max(self.rank, pss), True
                    self.rank_uss = max(self.rank_uss, uss)
                    self.rank_anon = max(self.rank_anon, _anonymous(proc.pid))
            self.samples += 1
            self._stop.wait(self.interval_s)


def measure_training(store: Path, run: Path, args: argparse.Namespace) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "pipelines.cli", "train", str(store), "--task", "retrieval", "--workers", "1",
        "--out", str(run), "--model-config", "small", "--max-steps", str(args.steps), "--batch-size",
        str(args.batch_size), "--threads", "1", "--checkpoint-every", str(args.steps),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(common.REPO), "RAY_ADDRESS": ""}
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=common.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with RankSampler(proc.pid, args.interval) as sampler:
        _, stderr = proc.communicate()
    if proc.returncode != 0 or not sampler.rank_seen:
        raise RuntimeError(
            f"train exited {proc.returncode} (rank seen: {sampler.rank_seen}): {stderr.decode()[-3000:]}"
        )
    return {
        "peak_rank_pss_bytes": sampler.rank,
        "peak_driver_pss_bytes": sampler.driver,
        "peak_rank_uss_bytes": sampler.rank_uss,
        "peak_rank_anonymous_bytes": sampler.rank_anon,
        "peak_driver_anonymous_bytes": sampler.driver_anon,
        "peak_driver_uss_bytes": sampler.driver_uss,
        "samples": sampler.samples,
        "wall_seconds": time.perf_counter() - started,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=512, help="rows of the 1x store (4 shards)")
    parser.add_argument("--factor", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--quick", action="store_true", help="64 rows x 8, 4 steps")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.rows, args.steps = 64, 4
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rf-bench-train-memory-") as tmp:
        for name, rows in (("1x", args.rows), (f"{args.factor}x", args.rows * args.factor)):
            store = Path(tmp) / f"store-{name}"
            info = build_store(store, rows)
            opened = measure_open(store)
            trained = measure_training(store, Path(tmp) / f"run-{name}", args)
            results[name] = {**info, "open": opened, "train": trained}
            print(
                f"{name}: {info['rows']} rows, features {info['feature_bytes'] / MIB:.0f} MiB; anonymous added "
                f"by opening {opened['added_by_open'] / MIB:.1f} MiB (after reading every row "
                f"{opened['added_by_reading_every_row'] / MIB:.1f} MiB); peak PSS rank "
                f"{trained['peak_rank_pss_bytes'] / MIB:.0f} MiB, driver {trained['peak_driver_pss_bytes'] / MIB:.0f} MiB "
                f"(USS: rank {trained['peak_rank_uss_bytes'] / MIB:.0f}, driver "
                f"{trained['peak_driver_uss_bytes'] / MIB:.0f} MiB; anonymous: rank "
                f"{trained['peak_rank_anonymous_bytes'] / MIB:.0f}, driver "
                f"{trained['peak_driver_anonymous_bytes'] / MIB:.0f} MiB)",
                flush=True,
            )
    small, large = results["1x"], results[f"{args.factor}x"]
    ratio = small["train"]["peak_rank_pss_bytes"] / large["train"]["peak_rank_pss_bytes"]
    driver_ratio = small["train"]["peak_driver_pss_bytes"] / large["train"]["peak_driver_pss_bytes"]
    anon_ratio = small["train"]["peak_rank_anonymous_bytes"] / large["train"]["peak_rank_anonymous_bytes"]
    open_fraction = max(r["open"]["added_by_open"] / r["feature_bytes"] for r in (small, large))
    result = {
        "goal": GOAL_RATIO,
        "ratio": ratio,
        "ratio_definition": f"peak PSS of one training rank, {args.rows}-row store / {args.factor}x store",
        "driver_ratio": driver_ratio,
        "rank_anonymous_ratio": anon_ratio,
        "open_anonymous_fraction": open_fraction,
        "open_goal": GOAL_OPEN_FRACTION,
        "stores": results,
        "parameters": {k: v for k, v in vars(args).items() if k != "out"},
    }
    path = common.write_result("train_memory", result, args.out)
    print(f"results: {path}")
    print(
        f"rank peak anonymous memory 1x / {args.factor}x: {anon_ratio:.3f}; "
        f"driver peak PSS 1x / {args.factor}x: {driver_ratio:.3f} (goal >= {GOAL_RATIO}); anonymous memory added "
        f"by opening a store: {100 * open_fraction:.2f}% of its feature bytes (goal <= {100 * GOAL_OPEN_FRACTION:.0f}%: "
        f"{'met' if open_fraction <= GOAL_OPEN_FRACTION else 'NOT met'})"
    )
    common.print_ratio(f"training rank peak PSS 1x / {args.factor}x store", ratio, GOAL_RATIO)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
