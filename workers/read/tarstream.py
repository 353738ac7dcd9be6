"""Tar stream -> members, with damage told apart from a clean end (docs/design.md §1).

``iter_tar_entries`` reads a shard's byte stream with ``tarfile`` in stream mode (``r|``): every member in
order, data read only for the members the caller wants, gzip recognised by its magic bytes. A member whose
data is cut short, or a stream that ends in an invalid header or without the end-of-archive block, ends the
iteration with one ``TarDamage`` (the caller keeps what came before); a stream that is not a tar at all, or
an I/O error, raises ``ShardReadError``. Names are decoded as UTF-8 with surrogate escapes (bytes that are not
UTF-8 stay recoverable: ``workers.read.reader.shown_member_name``).
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from workers.read.urls import STREAM_BUFFER_BYTES, ShardNotATar, ShardReadError

TAIL_BYTES = 8 * tarfile.RECORDSIZE  # uncompressed bytes kept to inspect where the tar stream stopped
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class TarEntry:
    """A member from the tar stream: ``data`` is ``None`` for non-regular members or unread ones."""

    name: str
    regular: bool
    data: bytes | None


@dataclass(frozen=True)
class TarDamage:
    """The stream is damaged; ``name`` is the member being read when it was found (``None``: a header)."""

    name: str | None
    detail: str


class _TailRecorder(io.RawIOBase):
    """Pass-through reader that remembers the last ``TAIL_BYTES`` bytes and how many bytes it returned."""

    def __init__(self, source: io.RawIOBase | io.BufferedIOBase) -> None:
        super().__init__()
        self._source = source
        self.total = 0
        self.tail = bytearray()

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._source.read(size)
        self.total += len(chunk)
        self.tail += chunk
        if len(self.tail) > TAIL_BYTES:
            del self.tail[: len(self.tail) - TAIL_BYTES]
        return chunk

    def block_at(self, offset: int) -> bytes | None:
        """The (up to 512) bytes at stream ``offset``, or ``None`` when no longer remembered."""
        start = offset - (self.total - len(self.tail))
        if start < 0:
            return None
        return bytes(self.tail[start : start + tarfile.BLOCKSIZE])


def _decompressed(raw: BinaryIO) -> io.RawIOBase | io.BufferedIOBase:
    """Gzip is detected from the magic bytes, not the file name; anything else is read as a plain tar."""
    head = raw.read(len(GZIP_MAGIC))
    prefixed = io.BufferedReader(_Prefixed(head, raw), buffer_size=STREAM_BUFFER_BYTES)
    if head == GZIP_MAGIC:
        return _GzipChunks(gzip.GzipFile(fileobj=prefixed, mode="rb"))
    return prefixed


class _GzipChunks(io.RawIOBase):
    """Gzip data as far as it decompresses. ``GzipFile.read(n)`` drops what it decompressed when the
    compressed data ends early or is corrupt; this returns that data, then reports end of data and keeps
    the error in ``error``, so ``tarfile`` sees a truncated tar and the samples before the damage are
    kept."""

    def __init__(self, source: gzip.GzipFile) -> None:
        super().__init__()
        self._source = source
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        if self.error is not None:
            return b""
        parts, wanted = [], size if size >= 0 else 1 << 62
        try:
            while wanted > 0:
                chunk = self._source.read1(min(wanted, STREAM_BUFFER_BYTES))
                if not chunk:
                    break
                parts.append(chunk)
                wanted -= len(chunk)
        except _DAMAGE_ERRORS as exc:
            self.error = exc
        return b"".join(parts)


class _Prefixed(io.RawIOBase):
    """``prefix`` then the rest of ``source`` (undoes a peek on a non-seekable stream)."""

    def __init__(self, prefix: bytes, source: BinaryIO) -> None:
        super().__init__()
        self._prefix, self._source = prefix, source

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        chunk = self._source.read(len(buffer))
        buffer[: len(chunk)] = chunk
        return len(chunk)


# Exceptions that mean "this tar stream is damaged" (truncated plain or gzip data, corrupt gzip).
_DAMAGE_ERRORS = (tarfile.ReadError, EOFError, zlib.error, gzip.BadGzipFile)


def iter_tar_entries(
    stream: BinaryIO, url: str, wanted: Callable[[str], bool]
) -> Iterator[TarEntry | TarDamage]:
    """Every member of a tar stream in order; data read only for regular members ``wanted(name)`` accepts.

    Ends with one ``TarDamage`` if the stream is damaged. Raises ``ShardNotATar`` (a ``ShardReadError``)
    if the stream is not a tar at all (first header unreadable), ``ShardReadError`` on I/O errors.
    """
    source = _decompressed(stream)
    recorder = _TailRecorder(source)
    try:
        tar = tarfile.open(fileobj=recorder, mode="r|", encoding="utf-8", errors="surrogateescape")
    except _DAMAGE_ERRORS as exc:
        raise ShardNotATar(
            f"shard {url} is not a readable tar: {_with_gzip_error(str(exc), source)}"
        ) from exc
    name: str | None = None
    try:
        for info in tar:
            name = info.name
            data = None
            if info.isreg() and wanted(name):
                extracted = tar.extractfile(info)
                assert extracted is not None, "isreg() members always extract"
                data = extracted.read()
            yield TarEntry(name=name, regular=info.isreg(), data=data)
            name = None
            tar.members = []  # type: ignore[attr-defined]  # stream mode: do not accumulate TarInfo
    except _DAMAGE_ERRORS as exc:
        detail = f"tar stream damaged at byte {tar.offset}: {exc}"
        yield TarDamage(name=name, detail=_with_gzip_error(detail, source))
        return
    except OSError as exc:
        raise ShardReadError(f"I/O error reading shard {url}: {exc}") from exc
    damage = _end_of_stream_damage(recorder, tar.offset)
    if damage is not None:
        yield TarDamage(name=None, detail=_with_gzip_error(damage.detail, source))


def _with_gzip_error(detail: str, source: object) -> str:
    error = getattr(source, "error", None)
    return detail if error is None else f"{detail} (gzip: {error})"


def _end_of_stream_damage(recorder: _TailRecorder, offset: int) -> TarDamage | None:
    """``tarfile`` ends iteration silently at an invalid header or at the end of data; tell those apart
    from a proper end-of-archive (zero) block."""
    block = recorder.block_at(offset)
    assert block is not None, "tail recorder too short for tarfile's read-ahead"
    if len(block) < tarfile.BLOCKSIZE:
        return TarDamage(
            name=None, detail=f"tar stream ends at byte {offset} without an end-of-archive block"
        )
    if block.count(0) != tarfile.BLOCKSIZE:
        return TarDamage(name=None, detail=f"invalid tar header at byte {offset}")
    return None
