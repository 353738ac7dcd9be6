"""The Ray shells of ``regionflow extract`` (docs/design.md §5): the detector actor and its pool, the per-shard read
task, and how the run reserves Ray resources. Each shell wraps a Ray-free worker (``workers.rows``).
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from pipelines.extract_config import ExtractConfig, ExtractRefused
from pipelines.ray_runtime import start_ray
from workers.rows import ChunkRows, ChunkStats, RegionRowBuilder, ShardChunk, shard_chunks

logger = logging.getLogger("pipelines.extract")

DECODE_TASK_CPUS = 0.25  # a read/decode task's CPU share: it never waits behind the detector
ACTOR_QUEUE_DEPTH = 2  # chunks submitted to one detector actor and not yet finished
GENERATOR_BACKPRESSURE = 2  # chunks a read task may yield ahead of the driver
ACTOR_MAX_RESTARTS = 4
ACTOR_MAX_TASK_RETRIES = 4
DETECTOR_SEED = 0
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"
OBJECT_STORE_ENV_PREFIX = "AWS_"  # forwarded to read tasks of s3:// shards (read_task_runtime_env)


class DetectorsDisagree(RuntimeError):
    """The detector actors of one run report different weights (they must all build the same model)."""


@dataclass(frozen=True)
class DetectorSpec:
    """What a detector actor builds (sent to every actor)."""

    config_name: str
    selection: Any  # BoxSelectionConfig
    weights: str | None
    threads: int
    with_cls_prob: bool
    box_source: str
    build: Any = None  # Callable[[DetectorSpec], detector] replacing RegionDetector (bench/driver_load.py)


@dataclass(frozen=True)
class DetectorInfo:
    """What the built detector reports back: the provenance the config digest and manifest need."""

    config: dict[str, Any]
    feature_dim: int
    weights_digest: str
    random_init: bool
    device: str
    threads: int
    omp_wait_policy: str = ""
    node_id: str = ""  # the Ray node the actor runs on (its shards are read and written there)


@dataclass(frozen=True)
class FaultInjection:
    """Test hook: a process of the run kills itself (``os._exit``) unless ``once_file`` exists, which it
    creates first, so the retry succeeds.

    ``stage="detector"``: the detector actor that receives chunk ``chunk_index`` of ``shard``.
    ``stage="writer"``: the writer committing ``shard``, once its part and error table are written and
    before its done marker; with ``every_attempt`` it dies on every attempt (the shard then fails, leaving
    an uncommitted part).
    """

    shard: str
    chunk_index: int
    once_file: str
    stage: str = "detector"
    every_attempt: bool = False

    def fires(self, stage: str, shard: str, chunk_index: int = 0) -> bool:
        """True when the calling process must die now (creates ``once_file`` first)."""
        if (stage, shard, chunk_index) != (
            self.stage,
            self.shard,
            self.chunk_index if stage == "detector" else 0,
        ):
            return False
        if self.every_attempt:
            return True
        if os.path.exists(self.once_file):
            return False
        Path(self.once_file).touch()
        return True


class DetectorActor:
    """Thin Ray actor shell around ``RegionDetector`` + ``RegionRowBuilder`` (wrapped with ``ray.remote``)."""

    def __init__(self, spec: DetectorSpec, fault: FaultInjection | None = None) -> None:
        import torch

        from workers.detect.config import detector_config
        from workers.detect.detector import RegionDetector

        torch.set_num_threads(spec.threads)
        self.spec, self.fault = spec, fault
        self.detector = (
            spec.build(spec)
            if spec.build is not None
            else RegionDetector(
                detector_config(spec.config_name),
                spec.selection,
                weights=Path(spec.weights) if spec.weights else None,
                threads=spec.threads,
                seed=DETECTOR_SEED,
                with_cls_prob=spec.with_cls_prob,
            )
        )
        self.builder = RegionRowBuilder(
            self.detector, box_source=spec.box_source, with_cls_prob=spec.with_cls_prob
        )

    def describe(self) -> DetectorInfo:
        import torch

        from workers.detect.config import detector_config

        return DetectorInfo(
            config=detector_config(self.spec.config_name).to_dict(),
            feature_dim=int(self.detector.feature_dim),
            weights_digest=str(self.detector.weights_digest),
            random_init=bool(self.detector.random_init),
            device=str(self.detector.device),
            threads=torch.get_num_threads(),
            omp_wait_policy=os.environ.get(OMP_WAIT_POLICY, ""),
            node_id=ray.get_runtime_context().get_node_id(),
        )

    def process(self, chunk: ShardChunk) -> tuple[ChunkRows, ChunkStats]:
        """The chunk's rows (for the shard's writer, by reference) and their few numbers (for the driver);
        called with ``num_returns=2``."""
        if self.fault is not None and self.fault.fires("detector", chunk.shard, chunk.index):
            os._exit(1)
        rows = self.builder.process(chunk)
        return rows, ChunkStats.of(rows)


def _read_shard(
    url: str, reader_config: Any, tokenizer_dir: str | None, max_tokens: int, batch_size: int
) -> Iterator[ShardChunk]:
    """Body of the per-shard read task: ``workers.rows.shard_chunks`` with this worker's tokenizer."""
    yield from shard_chunks(url, reader_config, _tokenizer(tokenizer_dir, max_tokens), batch_size)


@functools.lru_cache(maxsize=4)
def _tokenizer(checkpoint_dir: str | None, max_tokens: int) -> Any:
    """One ``CaptionTokenizer`` per worker process and setting (built on first use)."""
    from workers.read.tokenizer import CaptionTokenizer

    return CaptionTokenizer(checkpoint_dir=checkpoint_dir, max_tokens=max_tokens)


def _warm_read_worker(tokenizer_dir: str | None, max_tokens: int) -> int:
    """Import the reader and build the tokenizer in a read worker during start-up (not timed as
    processing); Ray reuses the warmed worker processes for the read tasks."""
    import workers.read.reader  # noqa: F401

    _tokenizer(tokenizer_dir, max_tokens)
    return os.getpid()


warm_read_worker_task = ray.remote(num_cpus=DECODE_TASK_CPUS)(_warm_read_worker)

read_shard_task = ray.remote(  # type: ignore[call-overload]  # a private option ray's stubs omit
    num_returns="streaming",
    num_cpus=DECODE_TASK_CPUS,
    max_retries=0,
    _generator_backpressure_num_objects=GENERATOR_BACKPRESSURE,
)(_read_shard)


@dataclass(frozen=True)
class RayResources:
    """How the run uses Ray: whether it started Ray, and each detector actor's reservation."""

    started_ray: bool
    actor_cpus: float
    actor_gpus: int
    threads: int


def connect_ray(config: ExtractConfig) -> RayResources:
    """``ray.init`` (local, or ``--address``) unless Ray is already up; choose the actors' reservations.

    Each detector actor reserves ``num_cpus`` = its torch threads, capped so that ``shards_in_flight`` read
    tasks (``DECODE_TASK_CPUS`` each) always fit beside the actors; ``num_gpus=1`` when the cluster has GPUs.

    Raises:
        ExtractRefused: more detectors than GPUs on a GPU cluster.
    """
    started = start_ray(config.address, num_cpus=os.cpu_count() or 1)
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    if gpus and config.detectors > gpus:
        raise ExtractRefused(f"--detectors {config.detectors} but the cluster has {gpus} GPUs")
    threads = config.detector_threads or _default_threads(config.detectors, gpus)
    room = (total.get("CPU", 1) - config.shards_in_flight * DECODE_TASK_CPUS) / config.detectors
    actor_cpus = round(max(min(threads, room), 0.01), 2)
    if actor_cpus < threads:
        logger.info("detector actors reserve %.2f CPUs each (they run %d threads)", actor_cpus, threads)
    return RayResources(started, actor_cpus, 1 if gpus else 0, threads)


def _default_threads(detectors: int, gpus: int) -> int:
    """Torch threads per detector actor when ``--detector-threads`` is not given: a node's cores shared by
    the actors on it (on a GPU cluster one actor per GPU of a GPU node; otherwise all actors on the
    largest node, as in a local run)."""
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if gpus:
        node = max((r for r in nodes if r.get("GPU", 0) >= 1), key=lambda r: r["GPU"])
        return max(1, int(node.get("CPU", 1) // node["GPU"]))
    node_cpus = max((r.get("CPU", 1) for r in nodes), default=1)
    return max(1, int(node_cpus // detectors))


class DetectorPool:
    """``--detectors`` detector actors; each takes at most ``ACTOR_QUEUE_DEPTH`` chunks at a time.

    Each actor's node is known once ``describe`` returned: a shard is bound to one node (its read task, its
    chunks' detector calls and its writer all run there), so decoded pixels and feature rows stay in that
    node's object store. A restarted actor may come back on another node; its chunks still reach it (through
    the network) until the next run.
    """

    def __init__(self, spec: DetectorSpec, resources: RayResources, count: int, fault: FaultInjection | None):
        self.spec, self.resources, self.fault = spec, resources, fault
        self.actors = [self._new_actor() for _ in range(count)]
        self.nodes = [""] * count  # each actor's node id (from describe)
        self.load = [0] * count
        self.max_load = 0  # most unfinished calls one actor had (reported in the summary)
        self.calls: dict[ray.ObjectRef, int] = {}  # unfinished call (its stats ref) -> actor index

    def _new_actor(self) -> Any:
        actor_class = ray.remote(DetectorActor).options(
            num_cpus=self.resources.actor_cpus,
            num_gpus=self.resources.actor_gpus,
            max_restarts=ACTOR_MAX_RESTARTS,
            max_task_retries=ACTOR_MAX_TASK_RETRIES,
            runtime_env={"env_vars": detector_env_vars()},
            scheduling_strategy="SPREAD",  # across nodes: each node's shards then have actors to feed
        )
        return actor_class.remote(self.spec, self.fault)

    def describe(self) -> DetectorInfo:
        """Wait until every actor has built its model; the first one's provenance (all must agree).

        Raises:
            DetectorsDisagree: two actors built different weights.
        """
        infos = ray.get([actor.describe.remote() for actor in self.actors])
        digests = sorted({info.weights_digest for info in infos})
        if len(digests) != 1:
            raise DetectorsDisagree(f"detector actors disagree on their weights: {', '.join(digests)}")
        self.nodes = [info.node_id for info in infos]
        return infos[0]

    def node_ids(self) -> list[str]:
        """The nodes that run detector actors, in actor order, each once."""
        return list(dict.fromkeys(self.nodes))

    def actors_on(self, node: str) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n == node]

    def has_room(self, node: str) -> bool:
        """An actor on ``node`` has fewer than ``ACTOR_QUEUE_DEPTH`` unfinished calls."""
        return min(self.load[i] for i in self.actors_on(node)) < ACTOR_QUEUE_DEPTH

    @property
    def capacity(self) -> int:
        """Chunks the run may hold between its read streams and the store: ``ACTOR_QUEUE_DEPTH`` per actor."""
        return len(self.actors) * ACTOR_QUEUE_DEPTH

    def submit(self, chunk_ref: ray.ObjectRef, node: str) -> tuple[ray.ObjectRef, ray.ObjectRef, int]:
        """Run the chunk on the least loaded actor of ``node``; returns (rows ref, stats ref, actor index)."""
        index = min(self.actors_on(node), key=lambda i: self.load[i])
        rows, stats = self.actors[index].process.options(num_returns=2).remote(chunk_ref)
        self.load[index] += 1
        self.max_load = max(self.max_load, self.load[index])
        self.calls[stats] = index
        return rows, stats, index

    def reap(self) -> bool:
        """Free the slots of finished calls; True if any finished."""
        if not self.calls:
            return False
        done, _ = ray.wait(list(self.calls), num_returns=len(self.calls), timeout=0, fetch_local=False)
        for ref in done:
            self.load[self.calls.pop(ref)] -= 1
        return bool(done)

    def replace(self, index: int) -> None:
        """Replace a dead actor (its restarts used up) with a fresh one."""
        logger.warning(
            "detector actor %d is dead after %d restarts; starting a new one", index, ACTOR_MAX_RESTARTS
        )
        self.actors[index] = self._new_actor()

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)


def detector_env_vars() -> dict[str, str]:
    """Environment of the detector actors: OpenMP worker threads sleep, not spin, between parallel regions
    (``OMP_WAIT_POLICY=PASSIVE`` unless the driver's environment sets it). On a CPU shared with decode tasks
    spinning threads steal the cores they wait for (measured with the tiny detector on 2 busy cores: 6.5 s vs
    0.23 s for 5 images, ``bench/common.py``).
    """
    return {OMP_WAIT_POLICY: os.environ.get(OMP_WAIT_POLICY, "PASSIVE")}


def object_store_env(urls: list[str]) -> dict[str, Any] | None:
    """Ray ``runtime_env`` for the read tasks (``urls``: the shards) or the writers (``[out]``): the driver's
    ``AWS_*`` variables (endpoint, region, credentials) when one of ``urls`` is on object storage, so that
    workers started before they were set (a Ray that was already running, the nodes of a joined cluster)
    reach the same endpoint; None when none needs them."""
    if not any("://" in url and not url.startswith("file://") for url in urls):
        return None
    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(OBJECT_STORE_ENV_PREFIX)}
    return {"env_vars": env} if env else None
