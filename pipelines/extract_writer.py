"""The part writers of ``regionflow extract`` (docs/design.md §5: the driver schedules and commits; it never receives
feature rows). One writer actor per detector node writes the parts of the shards bound to that node: it gets
each chunk's ``ChunkRows`` by reference, straight from the detector actor's output in the node's object store,
in chunk order, and writes the part directly to the store (a local path, a filesystem shared by every node,
or object storage). The done marker, written last by ``commit`` once the part and its error table are
complete, stays the only commit point: a writer that dies before it leaves an uncommitted part that readers
ignore and that the shard's next attempt (or the next run) rewrites.

A writer is not restarted by Ray (``max_restarts=0``): its open parts die with it, so the scheduler sees the
death, replaces the writer and restarts the shards it held from their first sample.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines.extract_actors import FaultInjection
from schemas.manifest import DoneMarker, ShardAccounting, ShardSource
from workers.rows import ChunkRows
from workers.store import OrderedPartWriter, PartWriter, StoreLocation

logger = logging.getLogger("pipelines.extract")


class ShardWriterActor:
    """Thin Ray actor shell: one ``OrderedPartWriter`` per shard attempt it was asked to ``open``.

    Args:
        location: the store (its filesystem travels with it: local, or object storage with the driver's
            endpoint and credentials).
        feature_dim: D of the part schema.
        digest: the run's config digest (written in every marker).
        fault: test hook (``FaultInjection`` with ``stage="writer"``).
    """

    def __init__(
        self, location: StoreLocation, feature_dim: int, digest: str, fault: FaultInjection | None = None
    ) -> None:
        self.location, self.feature_dim, self.digest, self.fault = location, feature_dim, digest, fault
        self.parts: dict[str, OrderedPartWriter] = {}

    def open(self, key: str, shard: str, source: ShardSource | None) -> None:
        """Start shard attempt ``key``: a fresh part for ``shard`` (an earlier attempt's part, committed or
        not, is replaced when this one commits)."""
        self.parts[key] = OrderedPartWriter(
            PartWriter(self.location, shard, self.feature_dim, self.digest, source)
        )

    def add(self, key: str, chunk: ChunkRows) -> int:
        """Write chunk ``chunk.index`` of attempt ``key`` (chunks must come in order); returns its rows."""
        errors = [(e.key, e.member_names, e.reason, e.detail) for e in chunk.errors]
        self.parts[key].add(chunk.index, chunk.rows, errors)
        return chunk.rows.num_rows

    def commit(self, key: str, accounting: ShardAccounting) -> DoneMarker:
        """Finish attempt ``key``'s part, write its error table, then its done marker (the commit point)."""
        part = self.parts.pop(key)
        shard = part.writer.shard
        return part.commit(accounting, before_marker=lambda: self._fault_before_marker(shard))

    def abort(self, key: str) -> None:
        """Drop attempt ``key`` and delete its unfinished part (nothing if it is not open here)."""
        part = self.parts.pop(key, None)
        if part is not None:
            part.abort()

    def _fault_before_marker(self, shard: str) -> None:
        if self.fault is not None and self.fault.fires("writer", shard):
            os._exit(1)


class WriterPool:
    """One ``ShardWriterActor`` per detector node (``NodeAffinitySchedulingStrategy``, soft: a writer whose
    node is gone starts elsewhere). Writers reserve no CPU: their work (validate, hash, write) is small
    beside the detector's, and they must not be refused a place on a node whose CPUs the actors reserve."""

    def __init__(
        self,
        nodes: list[str],
        location: StoreLocation,
        feature_dim: int,
        digest: str,
        runtime_env: dict[str, Any] | None = None,
        fault: FaultInjection | None = None,
    ) -> None:
        self._args = (location, feature_dim, digest, fault)
        self._runtime_env = runtime_env
        self.writers = {node: self._new_writer(node) for node in nodes}

    def _new_writer(self, node: str) -> Any:
        actor_class = ray.remote(ShardWriterActor).options(
            num_cpus=0,
            max_restarts=0,
            max_task_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
            runtime_env=self._runtime_env,
        )
        return actor_class.remote(*self._args)

    def writer(self, node: str) -> Any:
        return self.writers[node]

    def replace(self, node: str, dead: Any) -> None:
        """Start a new writer for ``node`` if ``dead`` is still its writer (several shards may report one
        death)."""
        if self.writers.get(node) is dead:
            logger.warning("the part writer of node %s died; starting a new one", node[:12])
            self.writers[node] = self._new_writer(node)

    def shutdown(self) -> None:
        for writer in self.writers.values():
            ray.kill(writer)
