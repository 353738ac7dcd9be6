"""Run every CPU benchmark (what ``make bench`` runs), one after the other, within ~30 minutes on the 2-core
development machine; then print the README performance table (``bench/report.py``).

Default sizes (each script's own flags give bigger runs):

| script | here | time here (load ~15) |
|---|---|---|
| ``coattention.py`` | ``--repeats 10`` | ~3 min |
| ``extract_efficiency.py`` | ``--config tiny --images 80 --shards 4`` | ~3 min |
| ``batching.py`` | ``--config tiny --images 8 --repeats 9 --true-batch`` | ~1 min |
| ``driver_load.py`` | 640 images, 40 ms stand-in detector, batch 8, 1/2/4 actors on a 3-node Cluster | ~2 min |
| ``store_reads.py`` | butd-r101-c4 outputs of 2 images, 1000 rows, 5 repeats | ~5 min |
| ``memory.py`` | 2 shards × 20 images vs 10× | ~5 min |
| ``train_memory.py`` | 512 vs 4096 butd-size rows (64-row batches), 20 steps | ~6 min |
| ``train_throughput.py`` | 40 images, 30 steps, batch 16, 2 repeats | ~7 min |

Opt-in, too slow for the budget on 2 CPU cores (bottom-up attention runs its res5 head on 300 proposals
per image, ~1.8 TFLOP, ~1 min per image here): ``--with-butd`` adds ``extract_efficiency.py --config
butd-r101-c4 --images 40`` and ``batching.py --config butd-r101-c4 --images 8 --repeats 1 --warmup 0``
(together ~1 hour here). The GPU benchmark is ``bench/gpu.sh`` (not run here).

    python bench/run_all.py [--with-butd] [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PLAN: list[tuple[str, list[str]]] = [
    ("coattention", ["coattention.py", "--repeats", "10"]),
    (
        "extract_efficiency_tiny",
        ["extract_efficiency.py", "--config", "tiny", "--images", "80", "--shards", "4"],
    ),
    ("batching_tiny", ["batching.py", "--config", "tiny", "--images", "8", "--repeats", "9", "--true-batch"]),
    ("driver_load", ["driver_load.py"]),
    ("store_reads", ["store_reads.py"]),
    ("memory", ["memory.py"]),
    ("train_memory", ["train_memory.py"]),
    ("train_throughput", ["train_throughput.py"]),
]
BUTD_PLAN: list[tuple[str, list[str]]] = [
    (
        "batching_butd",
        ["batching.py", "--config", "butd-r101-c4", "--images", "8", "--repeats", "1", "--warmup", "0"],
    ),
    ("extract_efficiency_butd", ["extract_efficiency.py", "--config", "butd-r101-c4", "--images", "40"]),
]
QUICK_ARGS = {
    "driver_load": ["driver_load.py", "--images", "32", "--shards", "4", "--delay-ms", "10"],
    "coattention": ["coattention.py", "--repeats", "2"],
    "extract_efficiency_tiny": [
        "extract_efficiency.py",
        "--config",
        "tiny",
        "--images",
        "8",
        "--shards",
        "2",
    ],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--with-butd", action="store_true", help="also the butd-r101-c4 CPU runs (~1 hour)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these names")
    parser.add_argument("--quick", action="store_true", help="each script's smallest settings")
    args = parser.parse_args(argv)
    plan = PLAN + (BUTD_PLAN if args.with_butd else [])
    if args.only:
        plan = [step for step in plan if step[0] in args.only]
    # every script, including the ones that do not set it themselves: sleeping OpenMP threads (bench/common.py)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    failed = []
    for name, command in plan:
        if args.quick:
            command = QUICK_ARGS.get(name, [command[0], "--quick"])
        print(f"=== {name}: {' '.join(command)}", flush=True)
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(BENCH / command[0]), *command[1:]], cwd=BENCH.parent, env=env
        )
        print(f"=== {name}: exit {done.returncode} in {time.perf_counter() - started:.0f} s", flush=True)
        if done.returncode != 0:
            failed.append(name)
    subprocess.run([sys.executable, str(BENCH / "report.py")], cwd=BENCH.parent, check=False)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
