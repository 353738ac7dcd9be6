"""The feature store (docs/design.md §4, docs/design.md §9): where it lives (``location``), writing a shard's part
(``writer``), reading committed shards (``reader``), the lock (``lock``) and its life across runs
(``lifecycle``: foreign-directory refusal, config check, ``--overwrite``, stray temporaries, committed
sources, manifest start and finish). Used by ``regionflow extract`` and ``regionflow import``.
"""

from workers.store.lifecycle import (
    CommittedShards,
    StoreCheck,
    StoreConfigMismatch,
    StoreRefused,
    check_config,
    clear_store,
    committed_sources,
    discard_shard,
    finish_manifest,
    refuse_foreign_directory,
    remove_stray_temporaries,
    shard_source,
    start_manifest,
)
from workers.store.location import (
    StoreLocation,
    local_path,
    part_names,
    read_manifest,
    read_marker,
    write_manifest,
)
from workers.store.lock import StoreLock, StoreLockedError
from workers.store.reader import StoreReader
from workers.store.writer import ROWS_PER_RECORD_BATCH, OrderedPartWriter, PartWriter

__all__ = [
    "ROWS_PER_RECORD_BATCH",
    "OrderedPartWriter",
    "CommittedShards",
    "PartWriter",
    "StoreCheck",
    "StoreConfigMismatch",
    "StoreLocation",
    "StoreLock",
    "StoreLockedError",
    "StoreReader",
    "StoreRefused",
    "check_config",
    "clear_store",
    "committed_sources",
    "discard_shard",
    "finish_manifest",
    "local_path",
    "part_names",
    "read_manifest",
    "read_marker",
    "refuse_foreign_directory",
    "remove_stray_temporaries",
    "shard_source",
    "start_manifest",
    "write_manifest",
]
