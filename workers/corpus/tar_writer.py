"""Byte-for-byte deterministic WebDataset tar writing (used by ``regionflow shards`` and ``synth``)."""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable
from pathlib import Path

MEMBER_MODE = 0o644


def tar_member_header(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with fixed metadata: mtime 0, uid/gid 0, empty user/group names, mode 0644."""
    info = tarfile.TarInfo(name=name)
    info.size = size
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = MEMBER_MODE
    return info


def write_tar(path: str | Path, members: Iterable[tuple[str, bytes]]) -> int:
    """Write ``members`` (name, bytes), in the order given, as a POSIX ustar/pax tar at ``path``.

    The file is written to ``path + '.tmp'`` then renamed, so a reader never sees half a shard.
    Returns the number of members written.

    Raises:
        ValueError: a member name is empty, absolute, or contains ``..`` (WebDataset keys are relative).
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            if not name or name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"refusing tar member name {name!r}")
            tar.addfile(tar_member_header(name, len(data)), io.BytesIO(data))
            count += 1
    tmp.replace(path)
    return count
