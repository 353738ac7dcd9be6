"""Shared helpers of the benchmark scripts: machine and library facts, result files, alternating timing, and
proportional-set-size (PSS) sampling of a process tree.

Every benchmark writes ``bench/results/NAME.json`` through `write_result`, which adds the machine (CPU model,
cores, load average at the end of the run), library versions and the wall-clock time of the run, so a figure can
always be read next to the conditions it was measured in. Ratios are stated so that bigger is better.

The machine these run on may be shared: a ratio is taken inside one run with the two sides alternating
(`alternate`: A B A B ..., the median of each side), so a change of load hits both sides alike.

Thread note (measured on the 2-core development machine at load average ~15): torch's OpenMP threads spin
while waiting for each other; when the machine is oversubscribed a spinning thread waits for a descheduled
one and two threads ran the tiny detector ~10x slower than one. The benchmarks therefore default to
``OMP_WAIT_POLICY=PASSIVE`` (set in `set_passive_omp` before torch is imported, recorded in every result).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "bench" / "results"
SHARED_DATA = REPO.parent / "shared" / "data"
COCO_MINI = SHARED_DATA / "coco-train-mini"

LIBRARIES = (
    "torch",
    "torchvision",
    "numpy",
    "pyarrow",
    "ray",
    "lmdb",
    "opencv-python-headless",
    "pillow",
    "psutil",
    "tokenizers",
    "webdataset",
)
OMP_ENV = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")

# Ray's own processes (not workers), matched against a process's name or the start of its command line.
RAY_DAEMON_MARKERS = (
    "gcs_server",
    "raylet",
    "dashboard.py",
    "log_monitor.py",
    "monitor.py",
    "ray::DashboardAgent",
    "ray::RuntimeEnvAgent",
    "agent_manager",
    "runtime_env/agent",
    "dashboard/agent.py",
    "ray_client_server",
)


def set_passive_omp() -> None:
    """Ask OpenMP threads to sleep instead of spinning when idle (see the module docstring).

    Must run before torch is first imported; a value already in the environment is kept.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def add_repo_to_path() -> None:
    """Make the checkout importable (the scripts run as ``python bench/x.py`` without installing)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Platform, CPU, cores, memory, GPU (when torch is loaded and sees one), load average now."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()),
        "omp_env": {k: os.environ.get(k) for k in OMP_ENV},
    }
    try:
        import psutil

        info["memory_total_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the libraries the benchmarks touch (None: not installed)."""
    from schemas.manifest import library_versions

    return library_versions(LIBRARIES)


def write_result(name: str, result: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``result`` plus ``machine``, ``versions`` and ``written_at`` to ``out`` (default
    ``bench/results/NAME.json``); returns the path. Keys already in ``result`` win."""
    path = out if out is not None else RESULTS_DIR / f"{name}.json"
    full = {
        "benchmark": name,
        "machine": machine_info(),
        "versions": versions(),
        "written_at_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **result,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(full, indent=1, sort_keys=True, default=_json_default) + "\n")
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def alternate(
    sides: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Wall-clock seconds of each side, run in turn ``A B A B ...`` (``repeats`` rounds after ``warmup``).

    Returns:
        ``{side name: [seconds per round]}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(repeats):
        for name, fn in sides.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def print_ratio(label: str, ratio: float, goal: float | None, extra: str = "") -> None:
    """The last line of every benchmark: ``label: 1.23x (goal >= 1.00: met)``."""
    verdict = "" if goal is None else f" (goal >= {goal:g}: {'met' if ratio >= goal else 'NOT met'})"
    print(f"{label}: {ratio:.3f}{verdict}{extra}", flush=True)


# ---------------------------------------------------------------------------------------------- PSS sampling
def classify(proc: Any, root_pid: int) -> str:
    """``driver`` (the root), ``ray_daemon`` (gcs_server, raylet, dashboard, agents, monitors), ``ray_worker``
    (``ray::`` processes, default workers) or ``other`` (anything else in the tree)."""
    import psutil

    if proc.pid == root_pid:
        return "driver"
    try:
        name = proc.name()
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:  # the process exited between listing and reading
        return "gone"
    text = f"{name} {cmdline}"
    if any(marker in text for marker in RAY_DAEMON_MARKERS):
        return "ray_daemon"
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        return "ray_worker"
    return "other"


@dataclass
class PssPeak:
    """Peak PSS (bytes) of a process tree, sampled every ``interval_s``.

    Attributes:
        peak_driver_plus_workers: max over samples of (driver + every Ray worker) PSS.
        peak_daemons: max over samples of the Ray daemons' summed PSS.
        peak_by_group: per group, the max over samples of that group's sum.
        samples: number of samples taken; max_workers: most worker processes seen at once.
    """

    peak_driver_plus_workers: int = 0
    peak_daemons: int = 0
    peak_by_group: dict[str, int] = field(default_factory=dict)
    samples: int = 0
    max_workers: int = 0
    timeline: list[tuple[float, int, int]] = field(default_factory=list)


class PssSampler:
    """Samples the PSS (``psutil.Process.memory_full_info().pss``) of ``root_pid`` and all its descendants in a
    background thread until `stop`. Use as a context manager."""

    def __init__(self, root_pid: int, interval_s: float = 0.25) -> None:
        self.root_pid, self.interval_s = root_pid, interval_s
        self.peak = PssPeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.perf_counter()

    def __enter__(self) -> PssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> PssPeak:
        self._stop.set()
        self._thread.join()
        return self.peak

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.root_pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        groups: dict[str, int] = {}
        workers = 0
        for proc in procs:
            group = classify(proc, self.root_pid)
            try:
                pss = proc.memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            groups[group] = groups.get(group, 0) + pss
            workers += group == "ray_worker"
        peak = self.peak
        main = groups.get("driver", 0) + groups.get("ray_worker", 0)
        peak.peak_driver_plus_workers = max(peak.peak_driver_plus_workers, main)
        peak.peak_daemons = max(peak.peak_daemons, groups.get("ray_daemon", 0))
        for group, value in groups.items():
            peak.peak_by_group[group] = max(peak.peak_by_group.get(group, 0), value)
        peak.samples += 1
        peak.max_workers = max(peak.max_workers, workers)
        peak.timeline.append((round(time.perf_counter() - self._start, 2), main, groups.get("ray_daemon", 0)))


# ------------------------------------------------------------------------------------------------ images
def coco_images(count: int, size_hw: tuple[int, int] | None = None) -> list[tuple[str, Any]]:
    """The first ``count`` COCO-mini images (sorted by file name) as ``(file name, uint8 RGB [H, W, 3])``,
    optionally resized (bilinear) to ``size_hw`` so that they share one network-input size.

    Raises:
        FileNotFoundError: ``../shared/data/coco-train-mini`` is absent or holds fewer images.
    """
    import cv2
    import numpy as np

    names = sorted(p.name for p in (COCO_MINI / "images").glob("*.jpg"))[:count]
    if len(names) < count:
        raise FileNotFoundError(f"{COCO_MINI}/images holds {len(names)} images, {count} asked")
    out = []
    for name in names:
        bgr = cv2.imread(str(COCO_MINI / "images" / name), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(f"cannot decode {COCO_MINI / 'images' / name}")
        if size_hw is not None:
            bgr = cv2.resize(bgr, (size_hw[1], size_hw[0]), interpolation=cv2.INTER_LINEAR)
        out.append((name, np.ascontiguousarray(bgr[:, :, ::-1])))
    return out


def coco_captions() -> dict[str, list[str]]:
    """COCO-mini captions by image file name."""
    coco = json.loads((COCO_MINI / "captions_train2017.json").read_text())
    by_id: dict[int, list[str]] = {}
    for ann in coco["annotations"]:
        by_id.setdefault(ann["image_id"], []).append(ann["caption"])
    return {img["file_name"]: by_id.get(img["id"], []) for img in coco["images"]}
