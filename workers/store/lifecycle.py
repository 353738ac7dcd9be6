"""A store's life across runs: who may write it, what a rerun keeps, what ``--overwrite`` deletes, and how a
run is recorded (docs/design.md §9 *Commit and resume*). One owner, used by ``regionflow extract`` and
``regionflow import``.

- ``refuse_foreign_directory``: an existing, non-empty directory that is not a regionflow store is refused.
- ``check_config``: a store (manifest or markers) of another config digest is refused unless ``overwrite``,
  which deletes exactly the files not committed under this run's digest; stray temporaries are deleted.
- ``start_manifest`` / ``finish_manifest``: the manifest is written before any part and records the run
  (failed shards, the ``runs`` history that comparisons exclude) at the end.
- ``committed_sources``: the markers of this run's shards, compared with the inputs now (a rebuilt tar of
  the same name is refused, or re-extracted with ``overwrite``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from schemas.manifest import DoneMarker, ShardSource
from schemas.store import (
    ERRORS_SUFFIX,
    LOCK_FILE,
    MANIFEST_FILE,
    MARKER_SUFFIX,
    PART_SUFFIX,
    PARTS_DIR,
    TMP_SUFFIX,
)
from workers.store.location import (
    StoreLocation,
    local_path,
    part_names,
    read_manifest,
    read_marker,
    write_manifest,
)

logger = logging.getLogger(__name__)

CHANGED_SHARDS_SHOWN = 5  # shards with another source named in the refusal message
FOREIGN_SHARDS_SHOWN = 5  # shards of another config named in the refusal message
DIFFERENCES_SHOWN = 6  # differing settings named in the refusal message
DIFF_VALUE_CHARS = 40  # a longer value (a digest) is cut


class StoreRefused(RuntimeError):
    """The store cannot be written by this run (not a regionflow store, another config, changed inputs);
    nothing was written."""


class StoreConfigMismatch(StoreRefused):
    """The store holds a manifest or shards of another config digest, and ``overwrite`` was not given."""


def discard_shard(location: StoreLocation, shard: str) -> None:
    """Delete a committed shard: its marker first (the commit point, so a crash in between leaves an
    uncommitted part that readers ignore and a resume redoes), then its part and error table."""
    part, errors, marker = part_names(shard)
    for name in (marker, part, errors):
        path = location.path(PARTS_DIR, name)
        if location.exists(path):
            location.fs.delete_file(path)


def clear_store(location: StoreLocation) -> list[str]:
    """Delete every done marker, then every part, error table and temporary file in ``parts/``, then
    ``manifest.json`` (replacing a whole store, e.g. ``import --overwrite``); other files and the lock stay.

    Markers go first (the commit point), so a crash part-way leaves only uncommitted files. Returns the
    names deleted (``parts/NAME`` and ``manifest.json``), in deletion order.
    """
    names = location.list_names(location.path(PARTS_DIR))
    markers = [n for n in names if n.endswith(MARKER_SUFFIX)]
    others = [n for n in names if n.endswith((PART_SUFFIX, ERRORS_SUFFIX, TMP_SUFFIX)) and n not in markers]
    removed = []
    for name in markers + others:
        location.fs.delete_file(location.path(PARTS_DIR, name))
        removed.append(f"{PARTS_DIR}/{name}")
    if location.exists(location.path(MANIFEST_FILE)):
        location.fs.delete_file(location.path(MANIFEST_FILE))
        removed.append(MANIFEST_FILE)
    return removed


def remove_stray_temporaries(location: StoreLocation) -> list[str]:
    """Delete ``parts/*.tmp`` left by a killed run; returns the names removed."""
    removed = [n for n in location.list_names(location.path(PARTS_DIR)) if n.endswith(TMP_SUFFIX)]
    for name in removed:
        location.fs.delete_file(location.path(PARTS_DIR, name))
    return removed


def refuse_foreign_directory(location: StoreLocation) -> None:
    """Refuse an existing, non-empty directory that is not a regionflow store (no ``manifest.json``). The
    lock and a ``manifest.json.tmp`` (a run killed while writing its first manifest) are our own.

    Raises:
        StoreRefused: ``location.root`` is a file, or a non-empty directory without a manifest; on object
            storage, its bucket does not exist or cannot be read (was a traceback after Ray started).
    """
    if not location.is_local:
        _refuse_missing_bucket(location)
    info = location.fs.get_file_info(location.root)
    if info.type == pafs.FileType.NotFound:
        return
    if info.type != pafs.FileType.Directory:
        raise StoreRefused(f"{location.root} exists and is not a directory")
    selector = pafs.FileSelector(location.root, allow_not_found=True)
    ours = {LOCK_FILE, MANIFEST_FILE + TMP_SUFFIX}
    entries = [e.base_name for e in location.fs.get_file_info(selector) if e.base_name not in ours]
    if entries and read_manifest(location) is None:
        raise StoreRefused(
            f"{location.root} is not empty and is not a regionflow store (no manifest.json); "
            "choose another --out"
        )


def _refuse_missing_bucket(location: StoreLocation) -> None:
    """Raise ``StoreRefused`` when the bucket of an object-storage store does not exist or cannot be read
    (the store would fail at its first write, after the detectors started)."""
    bucket = location.root.split("/", 1)[0]
    try:
        info = location.fs.get_file_info(bucket)
    except OSError as exc:
        raise StoreRefused(f"cannot read the bucket {bucket!r} of the store: {exc}") from exc
    if info.type == pafs.FileType.NotFound:
        raise StoreRefused(
            f"the bucket {bucket!r} of the store does not exist; create it first or choose another --out"
        )


@dataclass(frozen=True)
class StoreCheck:
    """What ``check_config`` found and did.

    Attributes:
        existing: the store's manifest when it is of this run's digest (its ``runs`` and ``failed_shards``
            carry over), None for a new or replaced store.
        stray_temporaries_removed: ``parts/*.tmp`` files deleted (left by a killed run).
        deleted_other_config: files of another config deleted by ``overwrite``.
    """

    existing: dict[str, Any] | None
    stray_temporaries_removed: int
    deleted_other_config: int = 0


def check_config(
    location: StoreLocation, digest: str, *, overwrite: bool, config: dict[str, Any] | None = None
) -> StoreCheck:
    """Check the store against this run's config ``digest`` and clean it, before any part is written.

    A manifest of another digest, or a done marker of another digest, is refused unless ``overwrite``, which
    deletes every part, error table, marker and temporary not committed under ``digest`` (a crash part-way
    leaves only uncommitted files: markers are the commit point). Stray temporaries are always deleted.
    With ``config`` (this run's extraction config, whose digest is ``digest``) the refusal names the settings
    that differ from the manifest's ``extraction_config``.

    Raises:
        StoreConfigMismatch: another config's manifest or shards, and not ``overwrite``.
    """
    existing = read_manifest(location)
    foreign = foreign_shards(location, digest)
    deleted = 0
    if existing is not None and existing["config_digest"] != digest or foreign:
        if not overwrite:
            theirs = existing["config_digest"] if existing else "?"
            shown = foreign[:FOREIGN_SHARDS_SHOWN]
            changed = ""
            if existing is not None and config is not None:
                changed = "; ".join(config_differences(existing["extraction_config"], config)) + "; "
            raise StoreConfigMismatch(
                f"{location.root} holds shards of another extraction config ({changed}digest {theirs} ≠ "
                f"{digest}{', shards ' + ', '.join(shown) if shown else ''}); "
                "use --overwrite to replace them or choose another --out"
            )
        deleted = delete_other_config(location, digest)
        existing = None
    strays = remove_stray_temporaries(location)
    return StoreCheck(existing, len(strays), deleted)


def config_differences(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """The settings that differ between two extraction configs, as ``name: old → new`` (nested keys
    dotted, sorted; long values cut to ``DIFF_VALUE_CHARS``), at most ``DIFFERENCES_SHOWN`` of them."""
    old, new = _flat(before), _flat(after)
    names = sorted(k for k in old.keys() | new.keys() if old.get(k, _ABSENT) != new.get(k, _ABSENT))
    shown = [f"{k}: {_short(old.get(k, _ABSENT))} → {_short(new.get(k, _ABSENT))}" for k in names]
    more = len(shown) - DIFFERENCES_SHOWN
    return shown[:DIFFERENCES_SHOWN] + ([f"and {more} more"] if more > 0 else [])


_ABSENT = "(absent)"


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value: Any) -> str:
    text = value if value is _ABSENT else json.dumps(value)
    return text if len(text) <= DIFF_VALUE_CHARS else text[: DIFF_VALUE_CHARS - 1] + "…"


def foreign_shards(location: StoreLocation, digest: str) -> list[str]:
    """Shard ids whose done marker holds another config digest than ``digest``, sorted."""
    names = location.list_names(location.path(PARTS_DIR))
    shards = [n[: -len(MARKER_SUFFIX)] for n in names if n.endswith(MARKER_SUFFIX)]
    return [s for s in shards if read_marker(location, s).config_digest != digest]  # type: ignore[union-attr]


def delete_other_config(location: StoreLocation, digest: str) -> int:
    """``--overwrite``: delete every part, error table, marker and temporary not committed under ``digest``,
    markers first; returns how many files were deleted."""
    names = location.list_names(location.path(PARTS_DIR))
    keep: set[str] = set()
    markers = [n for n in names if n.endswith(MARKER_SUFFIX)]
    for name in markers:
        shard = name[: -len(MARKER_SUFFIX)]
        marker = read_marker(location, shard)
        if marker is not None and marker.config_digest == digest:
            keep |= set(part_names(shard))
    ours = [n for n in names if n.endswith((PART_SUFFIX, ERRORS_SUFFIX, MARKER_SUFFIX, TMP_SUFFIX))]
    doomed = [n for n in markers if n not in keep] + [n for n in ours if n not in keep and n not in markers]
    for name in doomed:
        location.fs.delete_file(location.path(PARTS_DIR, name))
    logger.warning("--overwrite: deleted %d files of another config in %s", len(doomed), location.root)
    return len(doomed)


def start_manifest(location: StoreLocation, manifest: dict[str, Any], check: StoreCheck) -> dict[str, Any]:
    """Write ``manifest`` (a fresh ``schemas.manifest.new_manifest``) before any part, carrying over the
    failed shards and run history of an existing store of the same digest; returns it."""
    if check.existing is not None:
        manifest["failed_shards"] = check.existing.get("failed_shards", [])
        manifest["runs"] = check.existing.get("runs", [])
    write_manifest(location, manifest)
    return manifest


def finish_manifest(
    location: StoreLocation,
    manifest: dict[str, Any],
    run: dict[str, Any],
    *,
    run_shards: set[str] | None = None,
    failed_shards: list[dict[str, str]] | None = None,
) -> None:
    """Record a finished run: ``failed_shards`` replace earlier failures of ``run_shards`` (failures of
    other shards stay), and ``run`` is appended to ``runs`` (excluded from comparisons)."""
    if run_shards is not None:
        earlier = [f for f in manifest["failed_shards"] if f["shard"] not in run_shards]
        manifest["failed_shards"] = sorted(earlier + (failed_shards or []), key=lambda f: f["shard"])
    manifest["runs"].append(run)
    write_manifest(location, manifest)


@dataclass(frozen=True)
class CommittedShards:
    """The done markers the store holds for this run's shards, read before any work.

    Attributes:
        markers: shard id -> its marker (of any config digest).
        changed: shard id -> how this run's input differs from the marker's source (``--overwrite`` only:
            without it such a run is refused).
    """

    markers: dict[str, DoneMarker]
    changed: dict[str, list[str]]

    def is_done(self, shard: str, digest: str) -> bool:
        """A marker of ``digest`` from this same input exists (trusted: no re-hash, §9)."""
        marker = self.markers.get(shard)
        return marker is not None and marker.config_digest == digest and shard not in self.changed

    def discard_changed(self, location: StoreLocation) -> list[dict[str, str]]:
        """Delete the shards whose input changed (they are re-extracted, or failed: never left stale);
        returns them for the summary."""
        for shard in sorted(self.changed):
            discard_shard(location, shard)
            logger.warning("--overwrite: re-extracting %s (%s)", shard, "; ".join(self.changed[shard]))
        return [{"shard": s, "changed": "; ".join(d)} for s, d in sorted(self.changed.items())]


def committed_sources(
    location: StoreLocation, inputs: dict[str, ShardSource], *, overwrite: bool
) -> CommittedShards:
    """Read the markers of the shards in ``inputs`` (shard id -> its input now, ``shard_source``) and
    compare each recorded source with the input.

    Raises:
        StoreRefused: some committed shard came from another path or another byte size than this run's
            input (a rebuilt tar of the same name, a same-named shard elsewhere), and not ``overwrite``.
    """
    markers: dict[str, DoneMarker] = {}
    changed: dict[str, list[str]] = {}
    unrecorded = []
    for shard, source in inputs.items():
        marker = read_marker(location, shard)
        if marker is None:
            continue
        markers[shard] = marker
        if marker.source is None:
            unrecorded.append(shard)
        elif differences := marker.source_differences(source):
            changed[shard] = differences
    if unrecorded:
        logger.warning(
            "%d committed shards (%s...) have markers without their source (an older regionflow): "
            "trusted without checking that they come from this run's input",
            len(unrecorded),
            unrecorded[0],
        )
    if changed and not overwrite:
        shown = [f"{s} ({'; '.join(d)})" for s, d in sorted(changed.items())[:CHANGED_SHARDS_SHOWN]]
        more = len(changed) - len(shown)
        raise StoreRefused(
            f"{location.root}: {len(changed)} committed shards came from another input than this run's: "
            f"{', '.join(shown)}{f' and {more} more' if more > 0 else ''}; their rows would be stale. "
            "Use --overwrite to re-extract them, or choose another --out"
        )
    return CommittedShards(markers, changed)


def shard_source(url: str) -> ShardSource:
    """The input of a shard now: its normalised URL (an absolute path for local files and ``file://`` URLs,
    object-store URLs as given) and its byte size from a stat (``os.stat``; on object storage or http(s) a
    HEAD, ``workers.read.urls.shard_size``, as the reader opens it). The size is None, with a warning, when
    the stat fails: the read then reports the problem."""
    path = local_path(url)
    if path is not None:
        try:
            return ShardSource(path, os.stat(path).st_size)
        except OSError as exc:
            logger.warning("cannot stat shard %s: %s", path, exc)
            return ShardSource(path, None)
    from workers.read.urls import ShardReadError, shard_size

    try:
        return ShardSource(url, shard_size(url))
    except ShardReadError as exc:
        logger.warning("%s", exc)
        return ShardSource(url, None)
