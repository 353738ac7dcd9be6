"""Fault tolerance of ``regionflow extract``: nothing lost, nothing duplicated (docs/design.md §5, §9).

Real faults on the real Ray runtime: a detector actor and a read worker SIGKILLed mid-shard, the driver
SIGKILLed mid-run and rerun, a node of a multi-node ``ray.cluster_utils.Cluster`` removed while shards are in
flight, a shard whose reader fails every attempt, a run killed while writing its first manifest. Each
faulty store must satisfy ``assert_store_invariants`` and be byte-identical (parts, error tables, markers;
manifest without ``runs``) to an uninterrupted run's. Also: refusals that write nothing, the store lock
(a concurrent run refused, a stale lock taken over, exclusive under contention), the bound on batches and
images in flight.

Runs that must be killed from outside run the CLI in a subprocess (``python -m pipelines.cli extract``) with
its own ``ray.init``; the others use the session's Ray runtime (``ray_session``). A process is only ever
killed by pid, and only processes this test started (descendants of this process or of its subprocess).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from invariants import (
    assert_store_invariants,
    assert_stores_identical,
    part_files,
    read_manifest_file,
    store_snapshot,
)
from tarfactory import make_jpeg, simple_sample

from pipelines import cli
from pipelines.extract import (
    ACTOR_QUEUE_DEPTH,
    ExtractConfig,
    FaultInjection,
    extract,
)
from pipelines.inflight import InFlightMeter
from schemas.store import LOCK_FILE, MANIFEST_FILE, MARKER_SUFFIX, PARTS_DIR, TMP_SUFFIX
from workers.corpus.tar_writer import write_tar

REPO = Path(__file__).resolve().parents[1]
SHARD_IDS = ("ft-000", "ft-001", "ft-002")
SAMPLES_PER_SHARD = 10  # 9 good images + 1 undecodable one per shard
NUM_BOXES = 6
CLI_FLAGS = ["--config", "tiny", "--num-boxes", str(NUM_BOXES), "--detector-threads", "1"]
REFERENCE = ExtractConfig(detector="tiny", num_boxes=NUM_BOXES, detector_threads=1, batch_size=3)
# Faulty runs go one shard at a time, one image per batch: the fault lands while later shards wait.
SLOW_FLAGS = [*CLI_FLAGS, "--batch-size", "1", "--shards-in-flight", "1"]
SLOW = ExtractConfig(
    detector="tiny", num_boxes=NUM_BOXES, detector_threads=1, batch_size=1, shards_in_flight=1
)
POLL_S = 0.01
HUGE_IMAGES = 200
RUN_TIMEOUT_S = 150  # a subprocess extract: Ray start-up + detector build on a busy 2-core machine
DETECTOR_TITLE = "ray::DetectorActor"  # Ray's process title of a detector actor worker
READER_TITLE = "ray::_read_shard"  # ... of a worker running a read task (idle workers: "ray::IDLE")


# ------------------------------------------------------------------------------------------------ helpers


def markers(store: Path) -> int:
    parts = store / PARTS_DIR
    return len(list(parts.glob(f"*{MARKER_SUFFIX}"))) if parts.is_dir() else 0


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(POLL_S)


def ray_processes(root_pid: int, title: str) -> list[psutil.Process]:
    """Live descendants of ``root_pid`` whose process title starts with ``title``."""
    found = []
    for proc in psutil.Process(root_pid).children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith(title):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
    return found


def kill_leftovers(processes: list[psutil.Process]) -> None:
    """SIGKILL those of ``processes`` (all started by this test) that outlived their parent."""
    for proc in processes:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(processes, timeout=10)


def extract_args(shards: list[str], out: Path, flags: list[str]) -> list[str]:
    return ["extract", *shards, "--out", str(out), *flags]


def start_extract(args: list[str], logs: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``regionflow extract`` in its own process (its own ``ray.init``), output into ``logs``.*."""
    with open(logs.with_suffix(".out"), "wb") as out, open(logs.with_suffix(".err"), "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "pipelines.cli", *args],
            cwd=REPO,
            stdout=out,
            stderr=err,
            env={**os.environ, **(env or {})},
        )


def summary_of(logs: Path) -> dict:
    """The JSON summary a subprocess run printed last (Ray may print task-retry notices before it)."""
    text = logs.with_suffix(".out").read_text()
    start = re.search(r"^\{$", text, re.MULTILINE)
    assert start is not None, text[-2000:]
    return json.loads(text[start.start() :])


def stderr_of(logs: Path) -> str:
    return logs.with_suffix(".err").read_text(errors="replace")[-4000:]


class Killer(threading.Thread):
    """Once ``ready()`` holds, SIGKILL the processes ``victims()`` returns; records what it killed and how
    many markers the store had at that moment."""

    def __init__(
        self, ready: Callable[[], bool], victims: Callable[[], list[psutil.Process]], store: Path
    ) -> None:
        super().__init__(daemon=True)
        self.ready, self.victims, self.store = ready, victims, store
        self.killed: list[int] = []
        self.markers_at_kill = -1
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.ready():
                targets = self.victims()
                if targets:
                    self.markers_at_kill = markers(self.store)
                    for proc in targets:
                        proc.send_signal(signal.SIGKILL)
                        self.killed.append(proc.pid)
                    return
            time.sleep(POLL_S)


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Three shards of 9 good samples (32-64 px JPEGs) + one undecodable image; ft-001 also holds a member
    of an unknown extension (ignored, counted)."""
    root = tmp_path_factory.mktemp("fault-shards")
    urls = []
    for s, shard in enumerate(SHARD_IDS):
        members = []
        for k in range(SAMPLES_PER_SHARD - 1):
            members += simple_sample(f"k{k:02d}", seed=100 * s + k, size=32 + 8 * (k % 5))
        broken = make_jpeg(40, 40, seed=s)
        members += [("k99.jpg", broken[: len(broken) // 3]), ("k99.txt", b"a cut picture")]
        if s == 1:
            members.append(("k99.cls", b"7"))
        write_tar(root / f"{shard}.tar", members)
        urls.append(str(root / f"{shard}.tar"))
    return urls


@pytest.fixture(scope="module")
def reference(shards: list[str], tmp_path_factory: pytest.TempPathFactory, ray_session: object) -> Path:
    """The uninterrupted run every faulty run must match byte for byte."""
    out = tmp_path_factory.mktemp("fault-reference") / "store"
    summary = extract(shards, str(out), REFERENCE)
    assert summary.exit_code == 0 and summary.rows == 3 * (SAMPLES_PER_SHARD - 1), summary
    assert summary.error_rows_by_reason == {"image_undecodable": 3}
    assert_store_invariants(out)
    return out


@pytest.fixture
def own_processes() -> Iterator[list[psutil.Process]]:
    """Processes a test starts outside the session runtime; whatever is still alive at the end is killed."""
    started: list[psutil.Process] = []
    yield started
    kill_leftovers(started)


# ------------------------------------------------------------------------------------- the invariant itself


def test_invariants_catch_damaged_stores(reference: Path, tmp_path: Path) -> None:
    """``assert_store_invariants`` / ``assert_stores_identical`` fail on each kind of damage."""

    def damaged(name: str, damage: Callable[[Path], None]) -> Path:
        copy = tmp_path / name
        shutil.copytree(reference, copy)
        damage(copy / PARTS_DIR)
        return copy

    def flip_byte(parts: Path) -> None:
        path = parts / "ft-001.arrow"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    cases = {
        "stray-tmp": lambda p: (p / "ft-003.arrow.tmp").write_bytes(b"half"),
        "flipped-byte": flip_byte,
        "no-marker": lambda p: (p / "ft-002.done.json").unlink(),
        "copied-shard": lambda p: (p / "ft-009.arrow").write_bytes((p / "ft-000.arrow").read_bytes()),
        "lock-left": lambda p: (p.parent / LOCK_FILE).write_text("{}"),
    }
    for name, damage in cases.items():
        copy = damaged(name, damage)
        with pytest.raises(AssertionError):
            assert_store_invariants(copy)
        with pytest.raises(AssertionError):
            assert_stores_identical(copy, reference) if name != "lock-left" else _raise()
    assert_stores_identical(reference, reference)


def _raise() -> None:
    raise AssertionError("the lock file is not part of a store's contents")


# ----------------------------------------------------------------------------------------------- faults


def test_sigkilled_detector_actor_and_read_worker(
    reference: Path, shards: list[str], tmp_path: Path, caplog, ray_session: object
) -> None:
    """Fault 1: the detector actor's process is SIGKILLed once shard 0 is committed and before the last
    (Ray restarts the actor and re-runs its batches); then, once shard 1 is committed, the worker process
    running a shard's read task is SIGKILLed (the shard restarts from its first sample, its temporary part
    deleted). The store is byte-identical to the reference."""
    out = tmp_path / "store"
    me = os.getpid()
    earlier = {p.pid for p in ray_processes(me, DETECTOR_TITLE)}  # actors of earlier tests, if still dying
    actor_killer = Killer(
        ready=lambda: markers(out) >= 1,
        victims=lambda: [p for p in ray_processes(me, DETECTOR_TITLE) if p.pid not in earlier],
        store=out,
    )
    read_killer = Killer(
        ready=lambda: markers(out) >= 2, victims=lambda: ray_processes(me, READER_TITLE), store=out
    )
    caplog.set_level(logging.WARNING, logger="pipelines.extract")
    for killer in (actor_killer, read_killer):
        killer.start()
    try:
        summary = extract(shards, str(out), SLOW)
    finally:
        for killer in (actor_killer, read_killer):
            killer.stop.set()
            killer.join()
    assert len(actor_killer.killed) == 1, "the detector actor was not found or the run ended first"
    assert 1 <= actor_killer.markers_at_kill < len(shards), actor_killer.markers_at_kill
    assert len(read_killer.killed) == 1, "no read task was running after shard 1 committed"
    assert read_killer.markers_at_kill < len(shards), read_killer.markers_at_kill
    restarts = [r.getMessage() for r in caplog.records if "attempt 1 failed" in r.getMessage()]
    assert len(restarts) == 1, restarts  # the killed read task's shard started over (read tasks block on
    # Ray's generator backpressure until the driver takes their chunks, so the kill lands mid-stream)
    assert summary.exit_code == 0 and summary.failed_shards == [], summary
    assert_store_invariants(out)
    assert_stores_identical(out, reference)


def test_sigkilled_driver_concurrent_run_and_rerun(
    reference: Path, shards: list[str], tmp_path: Path, capsys, ray_session: object, own_processes
) -> None:
    """Fault 2 and the lock: a run (its driver and its Ray processes) is frozen (SIGSTOP) after its first shard
    commits; a second run on the same store is refused and writes nothing; the first run is SIGKILLed; the same command run again
    treats the lock as stale, skips the committed shard, and ends byte-identical to the reference."""
    out = tmp_path / "store"
    args = extract_args(shards, out, SLOW_FLAGS)
    proc = start_extract(args, tmp_path / "killed")
    try:
        wait_for(lambda: markers(out) >= 1 or proc.poll() is not None, RUN_TIMEOUT_S, "shard 0's marker")
        os.kill(proc.pid, signal.SIGSTOP)
        assert proc.poll() is None, stderr_of(tmp_path / "killed")
        # the run's part writers are Ray actors (processes of its own Ray instance): freeze them too
        children = psutil.Process(proc.pid).children(recursive=True)
        own_processes.extend(children)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.send_signal(signal.SIGSTOP)
        committed = markers(out)
        assert 1 <= committed < len(shards), committed
        before = store_snapshot(out)
        assert cli.main(args) == 1  # the second, concurrent run
        assert f"being written by pid {proc.pid}" in capsys.readouterr().err
        assert store_snapshot(out) == before
    finally:
        proc.kill()  # SIGKILL, also ends a stopped process
        proc.wait()
    lock = json.loads((out / LOCK_FILE).read_text())
    assert lock["pid"] == proc.pid  # left behind by the killed run
    assert cli.main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["shards_skipped"], summary["shards_done"]) == (committed, len(shards) - committed)
    assert_store_invariants(out)
    assert_stores_identical(out, reference)


def test_shard_that_is_not_a_tar_fails_once_and_is_reported(
    reference: Path, shards: list[str], tmp_path: Path, capsys, caplog, ray_session: object
) -> None:
    """Fault 4: a shard that is not a tar can never be read: one attempt, no retry (it was retried
    SHARD_ATTEMPTS times, trial 2 item 7), then a failed shard (no part, no marker, in the summary and the
    manifest) in one error line; the other shards complete; exit code 2."""
    junk = tmp_path / "junk-001.tar"
    junk.write_bytes(os.urandom(3000))
    out = tmp_path / "store"
    caplog.set_level(logging.WARNING, logger="pipelines.extract")
    code = cli.main(extract_args([shards[0], str(junk), *shards[1:]], out, CLI_FLAGS))
    summary = json.loads(capsys.readouterr().out)
    assert code == 2 and summary["exit_code"] == 2
    assert [f["shard"] for f in summary["failed_shards"]] == ["junk-001"]
    assert "not a readable tar" in summary["failed_shards"][0]["error"]
    assert [f["shard"] for f in read_manifest_file(out)["failed_shards"]] == ["junk-001"]
    ours = [r for r in caplog.records if r.name.startswith("pipelines")]
    about_junk = [r.getMessage() for r in ours if "junk-001" in r.getMessage()]
    assert len(about_junk) == 1 and "not retried" in about_junk[0], about_junk
    assert (summary["shards_done"], summary["rows"]) == (len(shards), reference_rows(reference))
    assert_store_invariants(out)
    assert part_files(out) == part_files(reference)


def test_writer_killed_before_its_marker_then_rerun(
    reference: Path, shards: list[str], tmp_path: Path, ray_session: object
) -> None:
    """Issue 12 fault: the writer of ft-001 dies (``os._exit``) after the part and error table are written
    and before the done marker, on every attempt. ft-001 is a failed shard whose part is left uncommitted
    (readers ignore it); the same run again redoes exactly that shard, once, and the store is byte-identical
    to the clean reference run."""
    from workers.store import StoreReader

    out = tmp_path / "store"
    fault = FaultInjection("ft-001", 0, str(tmp_path / "unused"), stage="writer", every_attempt=True)
    first = extract(shards, str(out), SLOW, fault=fault)
    assert first.exit_code == 2 and [f["shard"] for f in first.failed_shards] == ["ft-001"], first
    assert first.shards_done == len(shards) - 1
    parts = out / PARTS_DIR
    assert (parts / "ft-001.arrow").is_file() and not (parts / f"ft-001{MARKER_SUFFIX}").exists()
    assert StoreReader(str(out)).shards() == ["ft-000", "ft-002"]
    assert StoreReader(str(out)).uncommitted_shards() == ["ft-001"]
    second = extract(shards, str(out), SLOW)
    assert second.exit_code == 0 and second.failed_shards == [], second
    assert (second.shards_skipped, second.shards_done) == (len(shards) - 1, 1)
    assert_store_invariants(out)
    assert_stores_identical(out, reference)


def reference_rows(reference: Path) -> int:
    from workers.store import StoreReader

    reader = StoreReader(str(reference))
    return sum(reader.marker(s).rows for s in reader.shards())


# ---------------------------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("case", ["random-file", "random-parts-file", "schema-version-2"])
def test_foreign_store_refused_and_untouched(
    case: str, reference: Path, shards: list[str], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    if case == "random-file":
        out.mkdir()
        (out / "data.bin").write_bytes(os.urandom(100))
    elif case == "random-parts-file":
        (out / PARTS_DIR).mkdir(parents=True)
        (out / PARTS_DIR / "x.arrow").write_bytes(os.urandom(100))
    else:
        shutil.copytree(reference, out)
        manifest = json.loads((out / MANIFEST_FILE).read_text())
        (out / MANIFEST_FILE).write_text(json.dumps({**manifest, "schema_version": 2}))
    before = store_snapshot(out)
    assert cli.main(extract_args(shards, out, CLI_FLAGS)) == 1
    err = capsys.readouterr().err
    expected = "schema version 2" if case == "schema-version-2" else "not a regionflow store"
    assert expected in err, err
    assert store_snapshot(out) == before


# ------------------------------------------------------------------------------------------ memory bound


def test_in_flight_meter_matches_a_brute_force_count() -> None:
    """``InFlightMeter`` against a count over every moment, on seeded random take/leave sequences."""
    rng = random.Random(5)
    for _ in range(200):
        meter = InFlightMeter()
        open_batches: list[int] = []
        timeline: list[tuple[str, int, int]] = []
        for _ in range(rng.randrange(1, 30)):
            if open_batches and rng.random() < 0.5:
                token = open_batches.pop(rng.randrange(len(open_batches)))
                images = rng.randrange(0, 5)
                meter.leave(token, images)
                timeline.append(("leave", token, images))
            else:
                open_batches.append(meter.take())
                timeline.append(("take", open_batches[-1], 0))
        for token in open_batches:
            meter.leave(token, 2)
            timeline.append(("leave", token, 2))
        meter.close()
        images_of = {token: n for kind, token, n in timeline if kind == "leave"}
        level = batches = max_images = max_batches = 0
        for kind, token, _ in timeline:
            sign = 1 if kind == "take" else -1
            level += sign * images_of[token]
            batches += sign
            max_images, max_batches = max(max_images, level), max(max_batches, batches)
        assert (meter.max_images, meter.max_batches) == (max_images, max_batches), timeline


def test_huge_shard_stays_within_the_in_flight_bounds(tmp_path: Path, ray_session: object) -> None:
    """A 200-image shard through 2 detector actors, one of which dies on its 4th batch (its queue stalls
    while the other actor goes on): batches and images in flight never exceed the documented bounds
    (``detectors x ACTOR_QUEUE_DEPTH`` batches of at most ``batch_size`` images; ``ACTOR_QUEUE_DEPTH``
    per actor)."""
    members = [m for k in range(HUGE_IMAGES) for m in simple_sample(f"h{k:03d}", seed=k, size=32)]
    write_tar(tmp_path / "huge-000.tar", members)
    config = ExtractConfig(
        detector="tiny", num_boxes=NUM_BOXES, detector_threads=1, batch_size=2, detectors=2
    )
    fault = FaultInjection(shard="huge-000", chunk_index=3, once_file=str(tmp_path / "died"))
    out = tmp_path / "store"
    summary = extract([str(tmp_path / "huge-000.tar")], str(out), config, fault=fault)
    assert (tmp_path / "died").exists()
    assert summary.exit_code == 0 and summary.rows == HUGE_IMAGES, summary
    batches_bound = config.detectors * ACTOR_QUEUE_DEPTH
    assert 1 <= summary.max_batches_in_flight <= batches_bound, summary
    assert 1 <= summary.max_images_in_flight <= batches_bound * config.batch_size, summary
    assert 1 <= summary.max_batches_per_actor <= ACTOR_QUEUE_DEPTH, summary
    assert_store_invariants(out)


# --------------------------------------------------------------------------------------------- lost node


def _raylet_pid(node: object) -> int:
    from ray._private import ray_constants

    return node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid  # type: ignore[attr-defined]


@pytest.mark.cluster
@pytest.mark.slow
def test_node_removed_while_shards_in_flight(
    reference: Path, shards: list[str], tmp_path: Path, ray_cluster: Callable[[int], Any]
) -> None:
    """Fault 3: a 3-node ``Cluster`` (a head without CPUs, two 2-CPU workers); the extract joins it with
    ``--address``; once shard 0 is committed, the node running the detector actor is removed. Ray restarts
    the actor on the other node, shards whose read task or chunks were lost restart, and the store is
    byte-identical to the reference. The session's local runtime is shut down for the test and restored."""
    cluster = ray_cluster(0)
    proc = None
    try:
        nodes = [cluster.add_node(num_cpus=2) for _ in range(2)]
        cluster.wait_for_nodes()
        out, logs = tmp_path / "store", tmp_path / "cluster-run"
        flags = [
            *SLOW_FLAGS,
            "--address",
            cluster.address,
            "--store-shared-fs",
        ]  # one machine: one filesystem
        proc = start_extract(extract_args(shards, out, flags), logs)
        wait_for(lambda: markers(out) >= 1 or proc.poll() is not None, RUN_TIMEOUT_S, "shard 0's marker")
        hosts = [n for n in nodes if ray_processes(_raylet_pid(n), DETECTOR_TITLE)]
        assert proc.poll() is None and len(hosts) == 1, stderr_of(logs)
        removed_at = markers(out)
        cluster.remove_node(hosts[0])
        assert removed_at < len(shards), "the run ended before the node was removed"
        assert proc.wait(timeout=RUN_TIMEOUT_S) == 0, stderr_of(logs)
        summary = summary_of(logs)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (summary["shards_done"], summary["failed_shards"]) == (len(shards), [])
    assert_store_invariants(out)
    assert_stores_identical(out, reference)


# ---------------------------------------------------------------------------------- lock and resume debris

LOCK_CONTENDERS = 3
LOCK_HAMMER_S = 3.0
LOCK_HAMMER = """
import json, os, sys, time
from workers.store import StoreLocation, StoreLock, StoreLockedError
root, start, seconds = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
location, flag = StoreLocation.parse(root), os.path.join(root, "holder.flag")
held = refused = violations = 0
time.sleep(max(0.0, start - time.time()))
while time.time() < start + seconds:
    lock = StoreLock(location)
    try:
        lock.acquire()
    except StoreLockedError:
        refused += 1
        continue
    held += 1
    try:
        os.close(os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY))  # nobody else may be inside
        os.unlink(flag)
    except FileExistsError:
        violations += 1
    try:
        lock.release()
    except FileNotFoundError:  # another process deleted the lock this one held
        violations += 1
print(json.dumps({"held": held, "refused": refused, "violations": violations}))
"""


def test_store_lock_is_exclusive_under_contention(tmp_path: Path) -> None:
    """Several processes take and release one store's lock as fast as they can: never two holders at once,
    never a held lock deleted by another process, and every process gets it sometimes."""
    start = time.time() + 2.0  # all contenders imported and waiting by then
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOCK_HAMMER, str(tmp_path), str(start), str(LOCK_HAMMER_S)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(LOCK_CONTENDERS)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]
        results.append(json.loads(out))
    assert all(r["violations"] == 0 for r in results), results
    assert all(r["held"] >= 1 for r in results), results
    assert not (tmp_path / LOCK_FILE).exists()


def test_rerun_after_a_kill_during_the_first_manifest_write(
    reference: Path, shards: list[str], tmp_path: Path, ray_session: object
) -> None:
    """A driver SIGKILLed while writing its first ``manifest.json`` leaves only ``manifest.json.tmp`` (and
    a stale lock, covered above). The rerun must treat the directory as its own (not refuse it as "not a
    regionflow store"), replace the temporary and end like the reference."""
    out = tmp_path / "store"
    out.mkdir()
    (out / (MANIFEST_FILE + TMP_SUFFIX)).write_bytes((reference / MANIFEST_FILE).read_bytes()[:100])
    summary = extract(shards, str(out), REFERENCE)
    assert summary.exit_code == 0, summary
    assert_store_invariants(out)
    assert_stores_identical(out, reference)


def test_ctrl_c_says_what_is_committed(shards: list[str], tmp_path: Path, own_processes) -> None:
    """Ctrl-C (SIGINT) once a shard is committed: one line says how many shards are committed and that the
    same command resumes; exit 130; no traceback (issue 14 item 8)."""
    out = tmp_path / "store"
    proc = start_extract(extract_args(shards, out, SLOW_FLAGS), tmp_path / "interrupted")
    try:
        wait_for(lambda: markers(out) >= 1 or proc.poll() is not None, RUN_TIMEOUT_S, "shard 0's marker")
        assert proc.poll() is None, stderr_of(tmp_path / "interrupted")
        own_processes.extend(psutil.Process(proc.pid).children(recursive=True))
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = stderr_of(tmp_path / "interrupted")
    assert code == 130, err
    committed = markers(out)
    assert (
        f"regionflow extract: stopped; {committed} shards committed; rerun the same command to resume" in err
    )
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
