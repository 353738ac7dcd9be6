"""Smoke tests of the benchmark scripts: each runs with its smallest ``--quick`` settings and writes valid JSON.

Not timed tests (nothing here compares speeds): they check that the scripts run, that their last line states
the ratio, and that the result file holds the ratio, the machine, the versions and the raw timings. Every test
here runs a script in a subprocess: the module is marked ``bench`` (``make test-fast`` deselects it); the
scripts that start Ray instances in subprocesses (memory, train throughput) are also marked ``slow``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
COCO = DATA / "coco-train-mini"
pytestmark = pytest.mark.bench
needs_coco = pytest.mark.skipif(not COCO.is_dir(), reason=f"COCO-mini not found at {COCO}")


def run_script(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, (
        f"{args} exited {done.returncode}:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )
    return done


def last_line(done: subprocess.CompletedProcess) -> str:
    return done.stdout.strip().splitlines()[-1]


def load(path: Path) -> dict:
    result = json.loads(path.read_text())
    for key in ("machine", "versions", "parameters"):
        assert key in result, f"{path.name} lacks {key!r}"
    assert result["machine"]["load_average_1_5_15"], "the load average is recorded"
    return result


@needs_coco
def test_store_reads_quick(tmp_path: Path) -> None:
    out = tmp_path / "store_reads.json"
    done = run_script([str(BENCH / "store_reads.py"), "--quick", "--out", str(out)])
    result = load(out)
    assert result["ratio"] > 0 and "goal >= 3" in last_line(done)
    assert set(result["round_seconds"]) == {"ours", "ours_numpy_astype", "vilbert_lmdb", "uniter_lmdb"}
    assert all(len(t) == result["parameters"]["repeats"] for t in result["round_seconds"].values())
    assert result["max_abs_feature_diff_between_sides"] == 0.0  # every side returns the same features
    assert result["features"]["feature_dim"] == 64 and result["features"]["random_init"] is True


@needs_coco
def test_batching_quick(tmp_path: Path) -> None:
    out = tmp_path / "batching.json"
    done = run_script([str(BENCH / "batching.py"), "--quick", "--out", str(out)])
    result = load(out)
    assert result["max_abs_feature_diff_batch_n_vs_1"] == 0.0
    assert "goal >= 0.95" in last_line(done)
    split = result["stage_seconds_per_image_batch_1"]
    assert {"trunk", "rpn", "res5_head", "selection"} <= set(split) and split["res5_head"] > 0


def test_gpu_script_on_cpu(tmp_path: Path) -> None:
    """``bash bench/gpu.sh --cpu`` (tiny config, 2 images) with Ray and webdataset blocked inside."""
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(BENCH / "gpu.sh"), "--cpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert set(result["throughput"]) == {"fp32_batch_1", "fp32_batch_2", "bf16_batch_1", "bf16_batch_2"}
    assert result["pipeline"]["images"] == 4 and not result["skipped"]
    for dtype in ("bf16", "fp16"):
        acc = result["autocast_vs_fp32"][dtype]
        assert 0.0 <= acc["rpn_proposals"]["matched_at_iou_0.7"] <= 1.0
        assert 0.0 < acc["features_at_fixed_boxes"]["median"]  # autocast differs from fp32 ...
        assert acc["features_at_fixed_boxes"]["within_tolerance"]  # ... within the documented tolerance
    assert "images/s" in last_line(done)


def test_report_table_and_write(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "memory.json").write_text(
        json.dumps(
            {
                "benchmark": "memory",
                "ratio": 0.5,
                "goal": 0.9,
                "machine": {"cpu_count": 2, "load_average_1_5_15": [1.0, 1.0, 1.0]},
                "corpus_1x": {"rows": 40, "peak_driver_plus_workers_bytes": 2**29},
                "corpus_10x": {"rows": 400, "peak_driver_plus_workers_bytes": 2**30},
            }
        )
    )
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- perf-table:start -->\nold\n<!-- perf-table:end -->\nrest\n")
    run_script([str(BENCH / "report.py"), "--results", str(results), "--write", str(readme)])
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| memory | 0.50 | >= 0.9 | **no** |" in text and "512 MiB vs 400 rows 1024 MiB" in text
    readme.write_text("no markers\n")
    done = subprocess.run(
        [sys.executable, str(BENCH / "report.py"), "--results", str(results), "--write", str(readme)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "markers" in done.stderr


@pytest.mark.slow
@needs_coco
def test_memory_quick(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    done = run_script([str(BENCH / "memory.py"), "--quick", "--out", str(out)])
    result = load(out)
    small, large = result["corpus_1x"], result["corpus_3x"]
    assert large["rows"] == 3 * small["rows"]
    assert small["max_worker_processes"] >= 1 and small["peak_ray_daemons_bytes"] > 0
    assert "goal >= 0.9" in last_line(done)


@pytest.mark.slow
@needs_coco
def test_train_throughput_quick(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    run_script([str(BENCH / "train_throughput.py"), "--quick", "--out", str(out)], timeout=900)
    result = load(out)
    assert result["samples_per_s"]["1_workers"] > 0 and result["samples_per_s"]["2_workers"] > 0
    assert len(result["runs"]["2_workers"]) == 1


@pytest.mark.slow
def test_train_memory_quick(tmp_path: Path) -> None:
    out = tmp_path / "train_memory.json"
    done = run_script([str(BENCH / "train_memory.py"), "--quick", "--out", str(out)], timeout=900)
    result = load(out)
    small, large = result["stores"]["1x"], result["stores"]["8x"]
    assert large["rows"] == 8 * small["rows"] and small["rows_per_record_batch"] == 64
    assert small["train"]["peak_rank_pss_bytes"] > 0 and large["train"]["peak_driver_pss_bytes"] > 0
    assert 0 <= result["open_anonymous_fraction"] < 1
    assert "goal >= 0.9" in last_line(done)
