"""The scheduler of ``regionflow extract`` (docs/design.md §5): the driver schedules and commits; it never receives
feature rows.

Each shard attempt is bound to one detector node: its read task (soft node affinity), its chunks' detector
calls (actors of that node) and its writer (``pipelines.extract_writer``, one per node) all run there, so
the tar's encoded bytes travel from the store of inputs to that node, and decoded pixels and feature rows
stay in the node's object store. The driver takes chunk references from the read streams, hands them to the
node's detector actors (``num_returns=2``: rows and ``ChunkStats``), fetches only the stats, passes the rows
reference on to the writer in chunk order, and, once the writer has every chunk, sends it the shard's
accounting to commit (part, error table, then done marker).

Bounds (memory stays flat): at most ``pool.capacity`` chunks taken from the streams and not yet written,
``ACTOR_QUEUE_DEPTH`` unfinished calls per actor, ``shards_in_flight`` shard attempts (at least one per
detector node). A failed attempt (a read error, a detector call that fails after Ray's retries, a writer
that died) is aborted and restarted from the shard's first sample, up to ``SHARD_ATTEMPTS`` times; a shard
whose bytes are not a tar (``ShardNotATar``: random bytes, an empty file) fails at once, one error line.
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.extract_actors import DetectorPool, read_shard_task
from pipelines.extract_config import ExtractConfig, ExtractSummary
from pipelines.extract_writer import WriterPool
from pipelines.inflight import InFlightMeter
from schemas.manifest import ShardAccounting
from workers.read.urls import ShardNotATar
from workers.rows import ChunkStats
from workers.store import StoreLocation, shard_source

logger = logging.getLogger("pipelines.extract")

SHARD_ATTEMPTS = 3
WAIT_TIMEOUT_S = 1.0
# A shard's read task reserves no logical CPU: it is pinned (soft affinity) to its detectors' node, and Ray
# waits for room on a live node rather than falling back, so a node whose CPUs the detector actors reserve
# would never start it (measured: 3 actors on a 3-CPU node hung the run). The number of read tasks is
# bounded by the shards in flight; the OS shares the cores.
READ_TASK_CPUS = 0
PROGRESS_LOG_S = 30.0  # a progress log line this often when stderr is not a terminal (no progress bar)


@dataclass
class DetectorCall:
    """A chunk at a detector actor: its rows (left where they are) and stats references."""

    rows: ray.ObjectRef
    stats: ray.ObjectRef
    actor: int
    token: int  # InFlightMeter token


@dataclass
class ShardRun:
    """One attempt at one shard, bound to one node: its chunk stream, its detector calls and writer calls
    (each in chunk order), and the accounting gathered from the chunks' stats."""

    url: str
    shard: str
    attempt: int
    node: str
    stream: Any  # ray.ObjectRefGenerator
    writer: Any  # the node's ShardWriterActor handle
    calls: deque[DetectorCall] = field(default_factory=deque)
    writes: deque[tuple[ray.ObjectRef, int | None, ChunkStats | None]] = field(default_factory=deque)
    commit: ray.ObjectRef | None = None
    exhausted: bool = False
    rows: int = 0
    error_reasons: Counter[str] = field(default_factory=Counter)
    members_used: int = 0
    members_in_errors: int = 0
    counts: Any = None  # MemberCounts from the last chunk
    next_index: int = 0  # the chunk whose stats come next

    @property
    def key(self) -> str:
        return f"{self.shard}#{self.attempt}"

    @property
    def errors(self) -> int:
        return sum(self.error_reasons.values())


class ShardScheduler:
    """Runs shards through the read tasks, the detector pool and the writers (module docstring).

    Args:
        location: the store.
        digest: this run's config digest (written in every marker).
        feature_dim: D of the part schema.
        config: the run's ``ExtractConfig``.
        pool: the detector actors (``describe`` called: their nodes are known).
        summary: updated as shards commit or fail.
        read_env: Ray ``runtime_env`` of the read tasks (``read_task_runtime_env``), or None.
        writers: the part writers, one per detector node.
    """

    def __init__(
        self,
        location: StoreLocation,
        digest: str,
        feature_dim: int,
        config: ExtractConfig,
        pool: DetectorPool,
        summary: ExtractSummary,
        read_env: dict[str, Any] | None,
        writers: WriterPool,
    ) -> None:
        self.location, self.digest, self.feature_dim = location, digest, feature_dim
        self.config, self.pool, self.summary, self.writers = config, pool, summary, writers
        self.read_env = read_env
        self.reader_config = config.reader_config()
        self.shards_in_flight = max(config.shards_in_flight, len(pool.node_ids()))
        if self.shards_in_flight > config.shards_in_flight:
            logger.info("%d shards in flight: one per detector node at least", self.shards_in_flight)
        self.active: list[ShardRun] = []
        self.meter = InFlightMeter()
        self.progress = _progress_bar()
        self.log_lines = not sys.stderr.isatty()  # a log file gets periodic lines instead of the bar
        self.images_done = 0
        self.started = self.last_log = time.monotonic()

    def run(self, urls: list[str]) -> None:
        queue = deque(urls)
        while queue or self.active:
            while queue and len(self.active) < self.shards_in_flight:
                self.active.append(self._start(queue.popleft(), attempt=1))
            progressed = self.pool.reap()
            progressed |= self._dispatch()
            progressed |= self._drain()
            if not progressed:
                self._wait()
            self._log_progress()
        self.progress.close()
        self.meter.close()
        self.summary.max_batches_in_flight = self.meter.max_batches
        self.summary.max_images_in_flight = self.meter.max_images
        self.summary.max_batches_per_actor = self.pool.max_load

    def _start(self, url: str, attempt: int) -> ShardRun:
        from workers.read.reader import shard_id_of

        shard, node = shard_id_of(url), self._pick_node()
        stream = read_shard_task.options(  # no logical CPU: see READ_TASK_CPUS
            num_cpus=READ_TASK_CPUS,
            runtime_env=self.read_env,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
        ).remote(
            url, self.reader_config, self.config.tokenizer, self.config.max_tokens, self.config.batch_size
        )
        run = ShardRun(url, shard, attempt, node, stream, self.writers.writer(node))
        run.writes.append((run.writer.open.remote(run.key, shard, shard_source(url)), None, None))
        return run

    def _pick_node(self) -> str:
        """The detector node with the fewest shard attempts per actor (the first such node on a tie)."""
        nodes = self.pool.node_ids()
        active = Counter(run.node for run in self.active)
        return min(nodes, key=lambda n: active[n] / len(self.pool.actors_on(n)))

    def _dispatch(self) -> bool:
        """Hand ready chunks to free detector slots of their shard's node, oldest shard first."""
        progressed = False
        for run in self.active:
            while not run.exhausted and self._has_room(run.node):
                ready, _ = ray.wait([run.stream], timeout=0, fetch_local=False)
                if not ready:
                    break
                try:
                    chunk_ref = next(run.stream)
                except StopIteration:
                    run.exhausted = True
                    break
                rows, stats, actor = self.pool.submit(chunk_ref, run.node)
                run.calls.append(DetectorCall(rows, stats, actor, self.meter.take()))
                progressed = True
        return progressed

    def _has_room(self, node: str) -> bool:
        """A detector slot on ``node`` is free and fewer than ``pool.capacity`` chunks are taken and not yet
        written."""
        return self.pool.has_room(node) and self.meter.in_flight < self.pool.capacity

    def _drain(self) -> bool:
        """Pass finished chunks to the writers in chunk order, account written ones, commit finished shards;
        retry or fail broken attempts."""
        progressed = False
        for run in list(self.active):
            try:
                progressed |= self._forward(run)
                progressed |= self._written(run)
                progressed |= self._committed(run)
            except (ray.exceptions.RayError, OSError, ValueError) as exc:
                self._attempt_failed(run, exc)
                progressed = True
        return progressed

    def _forward(self, run: ShardRun) -> bool:
        """Chunks whose detector call finished, in order: account their stats, hand their rows (by
        reference) to the shard's writer."""
        progressed = False
        while run.calls and _ready(run.calls[0].stats):
            call = run.calls[0]
            stats = self._stats(call)
            if stats.shard != run.shard or stats.index != run.next_index:
                raise ValueError(
                    f"shard {run.shard}: got chunk {stats.index} of shard {stats.shard}, "
                    f"expected chunk {run.next_index}"
                )
            run.next_index += 1
            run.calls.popleft()
            run.writes.append((run.writer.add.remote(run.key, call.rows), call.token, stats))
            run.rows += stats.rows
            run.error_reasons.update(dict(stats.error_reasons))
            run.members_used += stats.members_used
            run.members_in_errors += stats.members_in_errors
            run.counts = stats.counts if stats.counts is not None else run.counts
            self.summary.detector_busy_s += stats.busy_s
            progressed = True
        return progressed

    def _written(self, run: ShardRun) -> bool:
        """Writer calls that finished, in order: their chunks leave flight; then the commit is sent."""
        progressed = False
        while run.writes and _ready(run.writes[0][0]):
            ref, token, stats = run.writes[0]
            self._get(ref, run)
            run.writes.popleft()
            if token is not None and stats is not None:
                self.meter.leave(token, stats.images)
                self.progress.update(stats.rows + stats.errors)
                self.images_done += stats.rows + stats.errors
            progressed = True
        if run.exhausted and not run.calls and not run.writes and run.commit is None:
            run.commit = run.writer.commit.remote(run.key, self._accounting(run))
            progressed = True
        return progressed

    def _accounting(self, run: ShardRun) -> ShardAccounting:
        if run.counts is None:
            raise ValueError(f"shard {run.shard}: its stream ended without member counts")
        return ShardAccounting(
            members=run.counts.members,
            members_used=run.members_used,
            members_in_errors=run.members_in_errors,
            members_ignored=dict(sorted(run.counts.members_ignored.items())),
            samples=run.rows + run.errors,
            rows=run.rows,
            error_rows=run.errors,
        )

    def _committed(self, run: ShardRun) -> bool:
        if run.commit is None or not _ready(run.commit):
            return False
        self._get(run.commit, run)
        self.active.remove(run)
        self.summary.shards_done += 1
        self.summary.rows += run.rows
        self.summary.error_rows += run.errors
        reasons = Counter(self.summary.error_rows_by_reason) + run.error_reasons
        self.summary.error_rows_by_reason = dict(sorted(reasons.items()))
        self._show_progress()
        return True

    def _stats(self, call: DetectorCall) -> ChunkStats:
        try:
            stats: ChunkStats = self._fetch(call.stats)
        except ray.exceptions.ActorDiedError:
            self.pool.replace(call.actor)
            raise
        return stats

    def _get(self, ref: ray.ObjectRef, run: ShardRun) -> Any:
        """A writer call's result; a dead writer is replaced (its open parts are lost) and the error raised."""
        try:
            return self._fetch(ref)
        except ray.exceptions.ActorDiedError:
            self.writers.replace(run.node, run.writer)
            raise

    def _fetch(self, ref: ray.ObjectRef) -> Any:
        """``ray.get`` of a small result, counting the bytes that reach the driver (pickled size)."""
        value = ray.get(ref)
        self.summary.driver_received_bytes += len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
        return value

    def _attempt_failed(self, run: ShardRun, exc: BaseException) -> None:
        message = _error_text(exc)
        logger.debug("shard %s attempt %d failed", run.shard, run.attempt, exc_info=exc)
        for call in run.calls:  # results never fetched: count them as full batches
            self.meter.leave(call.token, self.config.batch_size)
        for _, token, stats in run.writes:
            if token is not None and stats is not None:
                self.meter.leave(token, stats.images)
        run.writer.abort.remote(run.key)  # deletes the unfinished part (nothing if the writer is dead)
        ray.cancel(run.stream, force=False)
        index = self.active.index(run)
        permanent = isinstance(_root_cause(exc), ShardNotATar)
        if run.attempt < SHARD_ATTEMPTS and not permanent:
            logger.warning("shard %s attempt %d failed (%s); retrying", run.shard, run.attempt, message)
            self.active[index] = self._start(run.url, attempt=run.attempt + 1)
            return
        if permanent:
            logger.error(
                "shard %s failed, skipped (not retried: reading it again cannot help): %s", run.shard, message
            )
        else:
            logger.error("shard %s failed %d times, skipped: %s", run.shard, run.attempt, message)
        self.active.pop(index)
        self.summary.failed_shards.append({"shard": run.shard, "url": run.url, "error": message})
        self._show_progress()

    def _wait(self) -> None:
        """Block until a detector, writer or commit call finishes or, when a detector slot of its node is
        free, a stream has a chunk (or ``WAIT_TIMEOUT_S``). A stream with a chunk ready while every slot of
        its node is busy must not wake the loop: that would spin the driver."""
        waitables: list[Any] = list(self.pool.calls)
        for run in self.active:
            waitables += [ref for ref, _, _ in list(run.writes)[:1]]
            waitables += [run.commit] if run.commit is not None else []
            if not run.exhausted and self._has_room(run.node):
                waitables.append(run.stream)
        if waitables:
            ray.wait(waitables, num_returns=1, timeout=WAIT_TIMEOUT_S, fetch_local=False)

    def _log_progress(self) -> None:
        """Every ``PROGRESS_LOG_S`` without a terminal: images (rows + error rows), images/s, shards, errors."""
        now = time.monotonic()
        if not self.log_lines or now - self.last_log < PROGRESS_LOG_S:
            return
        self.last_log = now
        s = self.summary
        logger.info(
            "extract: %d images (%.1f images/s), %d/%d shards done (%d skipped, %d failed), %d error rows",
            self.images_done,
            self.images_done / max(now - self.started, 1e-9),
            s.shards_done + s.shards_skipped,
            s.shards_total,
            s.shards_skipped,
            len(s.failed_shards),
            s.error_rows,
        )

    def _show_progress(self) -> None:
        s = self.summary
        self.progress.set_postfix(
            shards=f"{s.shards_done + s.shards_skipped}/{s.shards_total}",
            failed=len(s.failed_shards),
            errors=s.error_rows,
        )


def _ready(ref: ray.ObjectRef) -> bool:
    return bool(ray.wait([ref], timeout=0, fetch_local=False)[0])


def _progress_bar() -> Any:
    """A tqdm bar (images/s) on a terminal; a silent stand-in otherwise."""
    from tqdm import tqdm

    return tqdm(unit="img", desc="extract", disable=not sys.stderr.isatty(), dynamic_ncols=True)


def _error_text(exc: BaseException) -> str:
    """``Type: message`` of the root cause of a (possibly Ray-wrapped) exception, the whole message (every
    line; the traceback is logged at debug level)."""
    cause = _root_cause(exc)
    return f"{type(cause).__name__}: {str(cause).strip()}"


def _root_cause(exc: BaseException) -> BaseException:
    """The exception a (possibly Ray-wrapped) task error was raised with."""
    cause = exc
    while isinstance(cause, ray.exceptions.RayTaskError) and cause.cause is not None:
        cause = cause.cause
    return cause
