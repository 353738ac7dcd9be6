"""The scheduler of ``regionflow extract`` (DESIGN §5): shards through the read tasks and the detector pool,
a bounded number in flight, rows written in source order, each shard committed once or retried from its
first sample, up to ``SHARD_ATTEMPTS`` times.
"""

from __future__ import annotations

import logging
import sys
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray

from pipelines.extract_actors import DetectorPool, read_shard_task
from pipelines.extract_config import ExtractConfig, ExtractSummary
from pipelines.inflight import InFlightMeter
from schemas.manifest import ShardAccounting
from schemas.reasons import ErrorReason
from workers.rows import ChunkRows
from workers.store import PartWriter, StoreLocation, shard_source

logger = logging.getLogger("pipelines.extract")

ROWS_PER_RECORD_BATCH = 64  # rows per Arrow record batch in a part file (independent of --batch-size)
SHARD_ATTEMPTS = 3
WAIT_TIMEOUT_S = 1.0


@dataclass
class ShardRun:
    """One attempt at one shard: its stream of chunks, the detector calls in flight (in chunk order), and
    the part being written."""

    url: str
    shard: str
    attempt: int
    stream: Any  # ray.ObjectRefGenerator
    writer: PartWriter
    pending: deque[tuple[ray.ObjectRef, int, int]] = field(default_factory=deque)  # call, actor, meter token
    exhausted: bool = False
    buffered: list[pa.Table] = field(default_factory=list)
    buffered_rows: int = 0
    errors: int = 0
    error_reasons: Counter[str] = field(default_factory=Counter)
    members_used: int = 0
    members_in_errors: int = 0
    counts: Any = None  # MemberCounts from the last chunk
    next_index: int = 0  # the chunk whose rows come next (rows are written in chunk order)


class ShardScheduler:
    """Runs shards through the read tasks and the detector pool, writing rows in source order.

    Args:
        location: the store.
        digest: this run's config digest (written in every marker).
        feature_dim: D of the part schema.
        config: the run's ``ExtractConfig``.
        pool: the detector actors.
        summary: updated as shards commit or fail.
        read_env: Ray ``runtime_env`` of the read tasks (``read_task_runtime_env``), or None.
    """

    def __init__(
        self,
        location: StoreLocation,
        digest: str,
        feature_dim: int,
        config: ExtractConfig,
        pool: DetectorPool,
        summary: ExtractSummary,
        read_env: dict[str, Any] | None = None,
    ) -> None:
        self.location, self.digest, self.feature_dim = location, digest, feature_dim
        self.config, self.pool, self.summary = config, pool, summary
        self.read_task = read_shard_task.options(runtime_env=read_env)
        self.reader_config = config.reader_config()
        self.active: list[ShardRun] = []
        self.meter = InFlightMeter()
        self.progress = _progress_bar()

    def run(self, urls: list[str]) -> None:
        queue = deque(urls)
        while queue or self.active:
            while queue and len(self.active) < self.config.shards_in_flight:
                self.active.append(self._start(queue.popleft(), attempt=1))
            progressed = self.pool.reap()
            progressed |= self._dispatch()
            progressed |= self._drain()
            if not progressed:
                self._wait()
        self.progress.close()
        self.meter.close()
        self.summary.max_batches_in_flight = self.meter.max_batches
        self.summary.max_images_in_flight = self.meter.max_images
        self.summary.max_batches_per_actor = self.pool.max_load

    def _start(self, url: str, attempt: int) -> ShardRun:
        from workers.read.reader import shard_id_of

        shard = shard_id_of(url)
        stream = self.read_task.remote(
            url, self.reader_config, self.config.tokenizer, self.config.max_tokens, self.config.batch_size
        )
        writer = PartWriter(self.location, shard, self.feature_dim, self.digest, shard_source(url))
        return ShardRun(url, shard, attempt, stream, writer)

    def _dispatch(self) -> bool:
        """Hand ready chunks to free detector slots, oldest shard first."""
        progressed = False
        for run in self.active:
            while not run.exhausted and self._has_room():
                ready, _ = ray.wait([run.stream], timeout=0)
                if not ready:
                    break
                try:
                    chunk_ref = next(run.stream)
                except StopIteration:
                    run.exhausted = True
                    break
                run.pending.append((*self.pool.submit(chunk_ref), self.meter.take()))
                progressed = True
        return progressed

    def _has_room(self) -> bool:
        """A detector slot is free and fewer than ``pool.capacity`` chunks are taken and not yet written."""
        return self.pool.has_room() and self.meter.in_flight < self.pool.capacity

    def _drain(self) -> bool:
        """Write finished chunk results in chunk order; commit finished shards; retry or fail broken ones."""
        progressed = False
        for run in list(self.active):
            try:
                while run.pending and ray.wait([run.pending[0][0]], timeout=0)[0]:
                    ref, actor_index, token = run.pending[0]
                    result = self._get(ref, actor_index)
                    run.pending.popleft()
                    self.meter.leave(token, _images_in(result))
                    self._apply(run, result)
                    progressed = True
                if run.exhausted and not run.pending:
                    self._commit(run)
                    progressed = True
            except (ray.exceptions.RayError, OSError, ValueError) as exc:
                self._attempt_failed(run, exc)
                progressed = True
        return progressed

    def _get(self, ref: ray.ObjectRef, actor_index: int) -> ChunkRows:
        try:
            return ray.get(ref)
        except ray.exceptions.ActorDiedError:
            self.pool.replace(actor_index)
            raise

    def _apply(self, run: ShardRun, result: ChunkRows) -> None:
        if result.shard != run.shard or result.index != run.next_index:
            raise ValueError(
                f"shard {run.shard}: got chunk {result.index} of shard {result.shard}, "
                f"expected chunk {run.next_index}"
            )
        run.next_index += 1
        for error in result.errors:
            run.writer.add_error(error.key, error.member_names, error.reason, error.detail)
            run.error_reasons[error.reason] += 1
        run.errors += len(result.errors)
        run.members_used += result.members_used
        run.members_in_errors += result.members_in_errors
        self.summary.detector_busy_s += result.busy_s
        if result.rows.num_rows:
            run.buffered.append(result.rows)
            run.buffered_rows += result.rows.num_rows
            self._flush(run, final=False)
        if result.counts is not None:
            run.counts = result.counts
        self.progress.update(result.rows.num_rows + len(result.errors))

    def _flush(self, run: ShardRun, *, final: bool) -> None:
        """Write the buffered rows as record batches of exactly ``ROWS_PER_RECORD_BATCH`` (the last one of a
        shard may be shorter), so part bytes do not depend on how samples were chunked."""
        if run.buffered_rows < ROWS_PER_RECORD_BATCH and not (final and run.buffered_rows):
            return
        table = pa.concat_tables(run.buffered)
        start = 0
        while table.num_rows - start >= ROWS_PER_RECORD_BATCH or (final and start < table.num_rows):
            run.writer.add_rows(table.slice(start, ROWS_PER_RECORD_BATCH).combine_chunks())
            start += ROWS_PER_RECORD_BATCH
        rest = table.slice(min(start, table.num_rows))
        run.buffered = [rest] if rest.num_rows else []
        run.buffered_rows = rest.num_rows

    def _commit(self, run: ShardRun) -> None:
        if run.counts is None:
            raise ValueError(f"shard {run.shard}: its stream ended without member counts")
        self._flush(run, final=True)
        rows = run.writer.rows
        accounting = ShardAccounting(
            members=run.counts.members,
            members_used=run.members_used,
            members_in_errors=run.members_in_errors,
            members_ignored=dict(sorted(run.counts.members_ignored.items())),
            samples=rows + run.errors,
            rows=rows,
            error_rows=run.errors,
        )
        run.writer.commit(accounting)
        self.active.remove(run)
        self.summary.shards_done += 1
        self.summary.rows += rows
        self.summary.error_rows += run.errors
        reasons = Counter(self.summary.error_rows_by_reason) + run.error_reasons
        self.summary.error_rows_by_reason = dict(sorted(reasons.items()))
        self._show_progress()

    def _attempt_failed(self, run: ShardRun, exc: BaseException) -> None:
        message = _error_text(exc)
        logger.debug("shard %s attempt %d failed", run.shard, run.attempt, exc_info=exc)
        for _, _, token in run.pending:  # results never fetched: count them as full batches
            self.meter.leave(token, self.config.batch_size)
        run.writer.abort()
        ray.cancel(run.stream, force=False)
        index = self.active.index(run)
        if run.attempt < SHARD_ATTEMPTS:
            logger.warning("shard %s attempt %d failed (%s); retrying", run.shard, run.attempt, message)
            self.active[index] = self._start(run.url, attempt=run.attempt + 1)
            return
        logger.error("shard %s failed %d times, skipped: %s", run.shard, run.attempt, message)
        self.active.pop(index)
        self.summary.failed_shards.append({"shard": run.shard, "url": run.url, "error": message})
        self._show_progress()

    def _wait(self) -> None:
        """Block until a detector call finishes or, when a detector slot is free, a stream has a chunk (or
        ``WAIT_TIMEOUT_S``). A stream with a chunk ready while every slot is busy must not wake the loop:
        that would spin the driver."""
        waitables: list[Any] = list(self.pool.calls)
        if self._has_room():
            waitables += [run.stream for run in self.active if not run.exhausted]
        if waitables:
            ray.wait(waitables, num_returns=1, timeout=WAIT_TIMEOUT_S)

    def _show_progress(self) -> None:
        s = self.summary
        self.progress.set_postfix(
            shards=f"{s.shards_done + s.shards_skipped}/{s.shards_total}",
            failed=len(s.failed_shards),
            errors=s.error_rows,
        )


def _images_in(result: ChunkRows) -> int:
    """Decoded images a chunk held: its rows and the images the detector's output check rejected."""
    rejected = sum(error.reason == ErrorReason.DETECTOR_OUTPUT_INVALID for error in result.errors)
    return result.rows.num_rows + rejected


def _progress_bar() -> Any:
    """A tqdm bar (images/s) on a terminal; a silent stand-in otherwise."""
    from tqdm import tqdm

    return tqdm(unit="img", desc="extract", disable=not sys.stderr.isatty(), dynamic_ncols=True)


def _error_text(exc: BaseException) -> str:
    """``Type: message`` of the root cause of a (possibly Ray-wrapped) exception, the whole message (every
    line; the traceback is logged at debug level)."""
    cause = exc
    while isinstance(cause, ray.exceptions.RayTaskError) and cause.cause is not None:
        cause = cause.cause
    return f"{type(cause).__name__}: {str(cause).strip()}"
