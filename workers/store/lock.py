"""The store lock: one writing run per local store (docs/design.md §9 *Commit and resume*)."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from schemas.store import LOCK_FILE
from workers.store.location import StoreLocation


class StoreLockedError(RuntimeError):
    """Another live process holds the store's lock."""


LOCK_ATTEMPTS = 3  # tries when the lock file is replaced between opening and locking it


class StoreLock:
    """An exclusive lock on a local store (§9): the file ``.regionflow.lock``, holding the holder's host, pid
    and process start time, with an ``flock`` on it kept for the whole run.

    The kernel drops an ``flock`` when its process ends, however it ends (SIGKILL included), so a lock file
    whose ``flock`` can be taken is stale and is taken over, unless it names another host: a store on a
    shared filesystem may be written from a host whose processes this one cannot see, so such a lock is
    treated as live. Checking and rewriting the lock file happen under the ``flock``, so two runs starting
    together never both win (with a create-then-write file, a starting run could read a live holder's
    still-empty lock file, take it for stale and delete it). The lock file descriptor is not inherited by
    child processes (PEP 446), so a leftover child of a killed run does not keep the lock.
    Object-storage stores have no lock: ``acquire`` is then a no-op (the caller must say so).

    Raises:
        StoreLockedError: a live process holds the lock (message names host and pid).
    """

    def __init__(self, location: StoreLocation) -> None:
        self.location = location
        self.path = location.path(LOCK_FILE)
        self.held = False
        self._fd = -1

    def acquire(self) -> None:
        if not self.location.is_local:
            return
        os.makedirs(self.location.root, exist_ok=True)
        me = json.dumps(_process_identity(os.getpid())).encode()
        for _ in range(LOCK_ATTEMPTS):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            taken = False
            try:
                taken = self._take(fd, me)
            finally:
                if not taken:  # refused (raised), or the file was released and replaced meanwhile
                    os.close(fd)
            if taken:
                self._fd, self.held = fd, True
                return
        raise StoreLockedError(f"{self.location.root}: could not take the store lock {self.path}")

    def _take(self, fd: int, me: bytes) -> bool:
        """``flock`` the open lock file and write ``me`` into it; False if ``fd`` is no longer the file at
        ``self.path``. Raises ``StoreLockedError`` when a live holder has it."""
        import fcntl

        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._locked(_read_holder(fd)) from None
        if not _is_same_file(fd, self.path):
            return False
        holder = _read_holder(fd)
        if holder is not None and holder.get("host") != socket.gethostname():
            raise self._locked(holder)  # another host's run: cannot tell whether it is alive
        os.ftruncate(fd, 0)
        os.pwrite(fd, me, 0)
        return True

    def _locked(self, holder: dict[str, Any] | None) -> StoreLockedError:
        holder = holder or {}
        return StoreLockedError(
            f"{self.location.root} is being written by pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')} (lock {self.path}); wait for it or stop it"
        )

    def release(self) -> None:
        if self.held:
            os.unlink(self.path)  # while still holding the flock: a waiter then sees a replaced file
            os.close(self._fd)
            self.held, self._fd = False, -1

    def __enter__(self) -> StoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _process_identity(pid: int) -> dict[str, Any]:
    import psutil

    return {"host": socket.gethostname(), "pid": pid, "started": psutil.Process(pid).create_time()}


def _read_holder(fd: int) -> dict[str, Any] | None:
    """The holder recorded in an open lock file; None when empty or half-written."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_same_file(fd: int, path: str) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
