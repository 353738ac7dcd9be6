"""``regionflow extract`` once its flags are a validated ``ExtractConfig``: the run (docs/design.md §5). Checks the
inputs and the store (``workers.store.lifecycle``) before Ray starts where it can, starts the detectors
(``pipelines.extract_actors``), hands the shards to the scheduler (``pipelines.extract_scheduler``) and
records the run in the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import ray

from pipelines.extract_actors import (
    DETECTOR_SEED,
    OMP_WAIT_POLICY,
    DetectorInfo,
    DetectorPool,
    DetectorSpec,
    FaultInjection,
    RayResources,
    connect_ray,
    detector_env_vars,
    object_store_env,
    warm_read_worker_task,
)
from pipelines.extract_config import (
    ExtractConfig,
    ExtractSummary,
    ShardsNotFound,
    absolute,
    load_vocabularies,
    missing_local_shards,
)
from pipelines.extract_scheduler import ShardScheduler
from pipelines.extract_writer import WriterPool
from pipelines.store_access import check_store_reachable
from schemas.manifest import config_digest, new_manifest
from schemas.manifest import library_versions as manifest_library_versions
from schemas.store import SCHEMA_VERSION
from workers.store import (
    CommittedShards,
    StoreLocation,
    StoreLock,
    check_config,
    committed_sources,
    finish_manifest,
    read_manifest,
    read_marker,
    refuse_foreign_directory,
    shard_source,
    start_manifest,
)

logger = logging.getLogger("pipelines.extract")

STORE_WRITERS = "extract writes each part on the node of its shard's detector actors"

VERSIONED_LIBRARIES = (
    "torch",
    "torchvision",
    "ray",
    "pyarrow",
    "opencv-python-headless",
    "webdataset",
    "tokenizers",
    "numpy",
)


@dataclass(frozen=True)
class RunInputs:
    """What a run knows before Ray starts: the expanded shard URLs (absolute for local files) and their shard
    ids, the store, the tokenizer and vocabularies, and when the run started (UTC, ISO 8601)."""

    urls: list[str]
    shard_ids: dict[str, str]
    out: str
    location: StoreLocation
    tokenizer: Any
    vocabularies: dict[str, Any] | None
    started_utc: str


def extract(
    shard_urls: list[str],
    out: str,
    config: ExtractConfig,
    *,
    fault: FaultInjection | None = None,
    build_detector: Callable[[DetectorSpec], Any] | None = None,
) -> ExtractSummary:
    """Extract region features of ``shard_urls`` into the store ``out``.

    ``fault`` is a test hook; ``build_detector`` replaces ``RegionDetector`` in the detector actors (a
    stand-in with its interface: ``feature_dim``, ``weights_digest``, ``random_init``, ``device``,
    ``extract``), for benchmarks of the data path (``bench/driver_load.py``).

    Returns the run summary (``exit_code`` 0 when every shard completed, 2 when any failed).

    Raises:
        ExtractRefused: more detectors than GPUs.
        workers.store.StoreRefused: the store is not a regionflow store, holds another config (without
            ``overwrite``), or committed shards whose input changed (without ``overwrite``).
        StoreLockedError: another live run holds the store's lock.
        ShardsNotFound: local shard files that do not exist (checked before anything else starts).
        ValueError: bad shard URLs (``workers.read.urls.check_shard_urls``: pipe:, unsupported schemes,
            directories, patterns matching nothing, duplicate shard ids) or a bad vocabulary folder.
    """
    inputs = check_inputs(shard_urls, out, config)
    t0 = time.perf_counter()
    resources = pool = None
    with StoreLock(inputs.location):
        sources = {inputs.shard_ids[url]: shard_source(url) for url in inputs.urls}
        committed = committed_sources(inputs.location, sources, overwrite=config.overwrite)
        summary_or_none = complete_without_ray(inputs, committed, config)
        try:
            if summary_or_none is not None:  # every shard committed under this config: no Ray, no detector
                _log_summary(summary_or_none)
                return summary_or_none
            resources = connect_ray(config)
            check_store_reachable(inputs.out, config.store_shared_fs, STORE_WRITERS)
            pool, info = _start_detectors(config, resources, inputs.urls, fault, build_detector)
            summary = _run(inputs, committed, config, pool, info, time.perf_counter() - t0, fault)
        finally:
            if pool is not None:
                pool.shutdown()
            if resources is not None and resources.started_ray:
                ray.shutdown()
    _log_summary(summary)
    return summary


def complete_without_ray(
    inputs: RunInputs, committed: CommittedShards, config: ExtractConfig
) -> ExtractSummary | None:
    """A rerun on a complete store, decided from the markers before Ray starts (issue 14 item 11): when the
    store's manifest holds this run's extraction config and every shard of the run has a marker of its digest
    from the same input, record the run in the manifest and return its summary (every shard skipped).
    None when anything would be done, or when the config cannot be told without building the detector
    (then the run goes the normal way, which decides with the detector's own digest).

    The config is this run's ``extraction_config`` with the weights digest computed without Ray: a weights
    file is hashed; a random init (seeded, ``DETECTOR_SEED``) is taken from the manifest only when every
    library version it records is the one installed now.
    """
    manifest = read_manifest(inputs.location)
    if manifest is None:
        return None
    digest = manifest["config_digest"]
    if not all(committed.is_done(shard, digest) for shard in inputs.shard_ids.values()):
        return None
    info = _info_without_ray(config, manifest)
    if info is None or config_digest(extraction_config(config, info, inputs.tokenizer)) != digest:
        return None
    summary = _new_summary(inputs.out, digest, len(inputs.urls), info, 0.0)
    summary.shards_skipped = len(inputs.urls)
    summary.detector_omp_wait_policy = detector_env_vars()[OMP_WAIT_POLICY]  # what the actors would run with
    run_entry = _run_entry(summary, config, inputs.urls, inputs.started_utc)
    finish_manifest(
        inputs.location, manifest, run_entry, run_shards=set(inputs.shard_ids.values()), failed_shards=[]
    )
    logger.info("every shard is committed under this config (markers): nothing to do, Ray not started")
    return summary


def _info_without_ray(config: ExtractConfig, manifest: dict[str, Any]) -> DetectorInfo | None:
    """The provenance the detector actors would report, from the config and the manifest (None: unknown)."""
    from workers.detect.config import detector_config

    weights = manifest.get("weights") or {}
    if config.weights is not None:
        from workers.detect.weights import weights_digest

        digest, random_init = weights_digest(Path(config.weights)), False
    elif weights.get("random_init") and manifest.get("library_versions") == library_versions():
        digest, random_init = str(weights.get("digest")), True
        if not digest.startswith(f"random-init:seed={DETECTOR_SEED}:"):
            return None
    else:
        return None
    detector = detector_config(config.detector)
    return DetectorInfo(detector.to_dict(), int(detector.feature_dim), digest, random_init, "", 0)


def committed_shards(shard_urls: list[str], out: str) -> int:
    """How many of the run's shards the store ``out`` holds committed (a done marker): what an interrupted
    run leaves (Ctrl-C). Raises nothing: 0 when the URLs or the store cannot be read."""
    from workers.read.reader import shard_id_of
    from workers.read.urls import check_shard_urls

    try:
        location = StoreLocation.parse(out)
        shards = {shard_id_of(url) for url in check_shard_urls(list(shard_urls))}
        return sum(read_marker(location, shard) is not None for shard in shards)
    except (OSError, ValueError):
        return 0


def check_inputs(shard_urls: list[str], out: str, config: ExtractConfig) -> RunInputs:
    """Everything checked before the lock and Ray: shard URLs expanded, local shards present, the
    vocabularies readable, ``out`` a regionflow store or new.

    Raises:
        ShardsNotFound, ValueError, workers.store.StoreRefused: as ``extract``.
    """
    from workers.read.reader import shard_id_of
    from workers.read.tokenizer import CaptionTokenizer
    from workers.read.urls import check_shard_urls

    started_utc = _utc_now()
    urls = check_shard_urls(list(shard_urls))
    missing = missing_local_shards(urls)
    if missing:
        raise ShardsNotFound(missing)
    vocabularies = load_vocabularies(config.vocab) if config.vocab else None
    location = StoreLocation.parse(out)
    refuse_foreign_directory(location)
    tokenizer = CaptionTokenizer(checkpoint_dir=config.tokenizer, max_tokens=config.max_tokens)
    if not location.is_local:
        logger.warning("%s is on object storage: no store lock; do not run two extracts on it at once", out)
    shard_ids = {url: shard_id_of(url) for url in urls}
    return RunInputs(urls, shard_ids, out, location, tokenizer, vocabularies, started_utc)


def _run(
    inputs: RunInputs,
    committed: CommittedShards,
    config: ExtractConfig,
    pool: DetectorPool,
    info: DetectorInfo,
    startup_s: float,
    fault: FaultInjection | None,
) -> ExtractSummary:
    """Check and clean the store for this run's digest, write the manifest, extract the shards not yet
    committed (``WriterPool``: one part writer per detector node), and record the run."""
    location, urls = inputs.location, inputs.urls
    extraction = extraction_config(config, info, inputs.tokenizer)
    digest = config_digest(extraction)
    summary = _new_summary(inputs.out, digest, len(urls), info, startup_s)
    _announce_weights(info, config)
    check = check_config(location, digest, overwrite=config.overwrite, config=extraction)
    summary.stray_temporaries_removed = check.stray_temporaries_removed
    vocabularies = inputs.vocabularies or (check.existing or {}).get("vocabularies")
    provenance = _provenance(info, inputs.tokenizer, vocabularies)
    manifest = new_manifest(feature_dim=info.feature_dim, extraction_config=extraction, provenance=provenance)
    start_manifest(location, manifest, check)
    todo = [url for url in urls if not committed.is_done(inputs.shard_ids[url], digest)]
    summary.shards_skipped = len(urls) - len(todo)
    summary.shards_reextracted = committed.discard_changed(location)
    t1, cpu1 = time.perf_counter(), time.process_time()
    writers = WriterPool(
        pool.node_ids(), location, info.feature_dim, digest, object_store_env([inputs.out]), fault
    )
    try:
        scheduler = ShardScheduler(
            location, digest, info.feature_dim, config, pool, summary, object_store_env(urls), writers
        )
        scheduler.run(todo)
    finally:
        writers.shutdown()
    summary.processing_s = time.perf_counter() - t1 if todo else 0.0
    summary.driver_cpu_s = time.process_time() - cpu1
    run_entry = _run_entry(summary, config, urls, inputs.started_utc)
    run_shards = set(inputs.shard_ids.values())
    finish_manifest(location, manifest, run_entry, run_shards=run_shards, failed_shards=summary.failed_shards)
    return summary


def _start_detectors(
    config: ExtractConfig,
    resources: RayResources,
    urls: list[str],
    fault: FaultInjection | None,
    build_detector: Callable[[DetectorSpec], Any] | None = None,
) -> tuple[DetectorPool, DetectorInfo]:
    """Build the detector pool and warm ``shards_in_flight`` read workers; returns the pool and the
    detectors' provenance once every actor has built its model."""
    spec = DetectorSpec(
        config.detector,
        config.selection(),
        absolute(config.weights) if config.weights else None,
        resources.threads,
        config.with_cls_prob,
        config.box_source(),
        build_detector,
    )
    pool = DetectorPool(spec, resources, config.detectors, fault)
    read_env = object_store_env(urls)
    warm = [
        warm_read_worker_task.options(runtime_env=read_env).remote(config.tokenizer, config.max_tokens)
        for _ in range(config.shards_in_flight)
    ]
    info = pool.describe()
    ray.get(warm)
    return pool, info


def _new_summary(out: str, digest: str, shards: int, info: DetectorInfo, startup_s: float) -> ExtractSummary:
    summary = ExtractSummary(store=out, config_digest=digest, shards_total=shards)
    summary.startup_s, summary.random_init = startup_s, info.random_init
    summary.weights_digest, summary.device = info.weights_digest, info.device
    summary.detector_threads, summary.detector_omp_wait_policy = info.threads, info.omp_wait_policy
    return summary


def extraction_config(config: ExtractConfig, info: DetectorInfo, tokenizer: Any) -> dict[str, Any]:
    """The dict the config digest is computed from: everything that changes output bytes (§9), nothing
    that does not (batch size, actor count, shards in flight, threads)."""
    return {
        "schema_version": SCHEMA_VERSION,
        "detector": info.config,
        "feature_dim": info.feature_dim,
        "weights_digest": info.weights_digest,
        "box_selection": config.selection().to_dict(),
        "tokenizer_digest": tokenizer.digest,
        "max_tokens": config.max_tokens,
        "captions": config.captions,
        "max_pixels": config.max_pixels,
        "with_cls_prob": config.with_cls_prob,
    }


def _utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _provenance(info: DetectorInfo, tokenizer: Any, vocabularies: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "detector_config": info.config,
        "weights": {"digest": info.weights_digest, "random_init": info.random_init},
        "tokenizer": tokenizer.to_dict(),
        "library_versions": library_versions(),
        "vocabularies": vocabularies,
    }


def library_versions() -> dict[str, str | None]:
    """Versions of Python and of the libraries that shape the store's bytes (None: not installed)."""
    return manifest_library_versions(VERSIONED_LIBRARIES)


def _run_entry(
    summary: ExtractSummary, config: ExtractConfig, urls: list[str], started_utc: str
) -> dict[str, Any]:
    """This run's entry of the manifest's ``runs`` (excluded from comparisons)."""
    counts = {k: v for k, v in summary.to_dict().items() if k not in ("store", "config_digest")}
    return {
        "started_utc": started_utc,
        "ended_utc": _utc_now(),
        "host": socket.gethostname(),
        "args": {**dataclasses.asdict(config), "shard_urls": urls},
        "counts": counts,
    }


def _announce_weights(info: DetectorInfo, config: ExtractConfig) -> None:
    if info.random_init:
        logger.warning(
            "RANDOM INIT: no --weights given; the %s detector is seeded random init (weights digest %s). "
            "Its features and classes carry no visual meaning; this is recorded in manifest.json.",
            config.detector,
            info.weights_digest,
        )
    else:
        logger.info("detector weights %s (digest %s)", config.weights, info.weights_digest[:16])


def _log_summary(summary: ExtractSummary) -> None:
    logger.info(
        "%d shards done, %d skipped, %d failed; %d rows, %d error rows; %.2f images/s",
        summary.shards_done,
        summary.shards_skipped,
        len(summary.failed_shards),
        summary.rows,
        summary.error_rows,
        summary.images_per_s,
    )
    for warning in summary.warnings():
        logger.warning("%s", warning)
    if summary.random_init:
        logger.warning("RANDOM INIT: this store's features come from an untrained detector")
