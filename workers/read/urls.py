"""Shard URLs: which are accepted, how patterns expand, how a shard's bytes are opened (docs/design.md §1).

Accepted shard URLs:

- a local path (relative or absolute) or a ``file://`` URL naming a *file*; a directory is refused.
- ``s3://BUCKET/KEY`` through ``s3fs`` (``AWS_ENDPOINT_URL``, ``AWS_REGION`` and the credential variables
  are honoured, as by the store's ``pyarrow.fs``). The key is taken *verbatim*: everything after the
  bucket's slash, spaces, ``%``, ``?`` and ``#`` included; nothing is percent-decoded, so
  ``s3://b/trip data/s.tar`` is the key ``trip data/s.tar`` and ``s3://b/trip%20data/s.tar`` the key with a
  literal ``%20``. (``pyarrow.fs.FileSystem.from_uri`` parses the whole URL as a URI: it refuses a space and
  decodes ``%20``.)
- ``http://`` and ``https://`` through ``fsspec``'s aiohttp file system: one streamed GET per shard
  (``block_size=0``: no Range requests, so a server without Range support such as ``python -m http.server``
  serves shards of any size), the size from the server's ``Content-Length`` when it sends one.

Refused before anything starts (``ShardURLError``, a ``ValueError``; ``check_shard_urls``):

- ``pipe:CMD``: webdataset runs ``CMD`` in a shell. A shard URL that executes a program is not accepted;
  fetch the shards first (``aws s3 cp``, ``curl``) or give their ``s3://`` / ``https://`` URL.
- any other scheme, or a malformed one (``s3:/b/k.tar``, ``s3:b/k.tar``, ``s4://``);
- a local directory (give its files, e.g. ``'DIR/*.tar'``);
- a pattern that matches nothing, or a pattern over http(s) (HTTP has no listing: use a brace range);
- an http(s) server that cannot be reached at all (connection refused, unknown host, no answer within
  ``HTTP_TIMEOUT_S``): one HEAD per host, the cause in the message;
  the first shard of a host that the server answers 404 (or 410, 401, 403) for. Other shards of the host
  are not HEADed before the run: a 404 there fails that shard of the run.

Patterns: brace ranges (``s-{000..099}.tar``, any scheme) always expand; shell-style ``*``, ``?`` and
``[...]`` (quoted, so the shell did not expand them) expand for local paths (``glob``; ``**`` spans
folders) and object storage
(one listing below the last slash before the first wildcard; ``*`` and ``?`` do not cross ``/``), sorted.
A local file whose name really contains those characters is taken as it is. In an http(s) URL the first
``?`` starts the query (presigned URLs: ``...tar?X-Amz-Signature=...``): the query is sent as given, never
expanded, and is not part of the shard id.

Short reads (issue: an object store that answers a ranged GET with fewer bytes than asked, a short ``206``
with a matching ``Content-Length``, ray-project/ray#66011). Shards on S3 are read with ``s3fs``, not
``pyarrow.fs``: pyarrow 26's S3 input stream returns the requested length anyway, the missing part filled
with whatever its buffer held (measured against the fault proxy of ``tests/faultproxy.py``: a 4 MB shard
read back with 512 KiB of garbage, which the tar reader saw as ``tar_truncated`` and the run committed).
``s3fs`` asks again for the rest of a short range, so the bytes are right. Beyond that, ``open_shard_stream``
knows the shard's size (a stat, or a HEAD) and raises ``ShardReadError`` when the stream ends before that
many bytes or delivers more: the attempt fails and is retried, instead of a tar that looks cut.
``tar_truncated`` is left for tars whose stored bytes are damaged.
"""

from __future__ import annotations

import glob
import io
import os
import re
from dataclasses import dataclass
from typing import Any, BinaryIO

LOCAL_FILE_SCHEME = "file://"
OBJECT_STORE_SCHEMES = ("s3",)
HTTP_SCHEMES = ("http", "https")
SUPPORTED = "local paths, file://, s3://, http://, https://"
STREAM_BUFFER_BYTES = 1 << 20
HTTP_TIMEOUT_S = 30.0
"""Seconds an http(s) request may wait to connect, and between two reads of an answer (aiohttp
``ClientTimeout(sock_connect, sock_read)``); no total limit, so a large shard may stream for as long as
bytes keep coming. A server that accepts the connection and never answers fails the HEAD after this long
(trial 2 item 1: it hung the pre-Ray check forever)."""
NEVER_SERVED_STATUSES = (401, 403, 404, 410)
"""HTTP statuses of the pre-Ray HEAD that refuse the run: retrying the shard cannot change them."""
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.DOTALL)
_WILDCARD = re.compile(r"[*?[]")


class ShardReadError(RuntimeError):
    """The shard cannot be read (missing, not a tar, I/O failure, short read); the message contains the URL."""


class ShardNotATar(ShardReadError):
    """The shard's bytes were read and are not a tar (random bytes, an empty file): reading it again cannot
    succeed, so the run fails the shard once instead of retrying it (trial 2 item 7)."""


class ShardURLError(ValueError):
    """A shard URL that can never be read (unsupported scheme, a directory, a pattern matching nothing)."""


@dataclass(frozen=True)
class ShardLocation:
    """A parsed shard URL.

    Attributes:
        scheme: ``""`` for a local file, else ``s3``, ``http`` or ``https``.
        path: the absolute local path; ``BUCKET/KEY`` (key verbatim) on object storage; the URL for http(s).
    """

    scheme: str
    path: str

    @property
    def bucket(self) -> str:
        return self.path.split("/", 1)[0]


def shard_id_of(url: str) -> str:
    """Shard id: the file name without any extension (``"a/b/coco-000.tar.gz"`` -> ``"coco-000"``); an
    http(s) URL's query and fragment are not part of it (``".../s-000.tar?X-Amz-Signature=..."`` -> ``"s-000"``)."""
    name = _http_path_part(url).rstrip("/").rsplit("/", 1)[-1]
    return name.split(".", 1)[0]


def _http_path_part(url: str) -> str:
    """``url`` without its query (``?...``) and fragment (``#...``) when it is an http(s) URL, else ``url``:
    the first ``?`` of an http URL starts its query (presigned URLs), it is not a pattern."""
    if url.lower().startswith(("http://", "https://")):
        return url.split("#", 1)[0].split("?", 1)[0]
    return url


def parse_shard_url(url: str) -> ShardLocation:
    """Where a shard URL points (module docstring: what is accepted).

    Raises:
        ShardURLError: ``pipe:``, an unsupported or malformed scheme, an object-store URL without a key.
    """
    if url.startswith(LOCAL_FILE_SCHEME):
        return ShardLocation("", os.path.abspath(url.removeprefix(LOCAL_FILE_SCHEME)))
    match = _SCHEME.match(url)
    if match is None or os.path.exists(url):  # a local file named "a:b.tar" is still a file
        return ShardLocation("", os.path.abspath(url))
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "pipe":
        raise ShardURLError(
            f"shard URL {url!r}: pipe: URLs run a shell command and are refused; fetch the shards first "
            "(aws s3 cp, curl) or give their s3:// or https:// URL"
        )
    if scheme not in OBJECT_STORE_SCHEMES + HTTP_SCHEMES or not rest.startswith("//"):
        raise ShardURLError(
            f"shard URL {url!r}: unsupported or malformed scheme {scheme!r}; accepted: {SUPPORTED}"
        )
    if scheme in HTTP_SCHEMES:
        return ShardLocation(scheme, url)
    bucket, _, key = rest[2:].partition("/")
    if not bucket or not key or key.endswith("/"):
        raise ShardURLError(f"shard URL {url!r}: expected {scheme}://BUCKET/KEY naming one object")
    return ShardLocation(scheme, f"{bucket}/{key}")


def expand_shard_urls(urls: list[str]) -> list[str]:
    """Expand brace ranges (``shard-{000..099}.tar``) in order; refuse two URLs with one shard id.

    Raises:
        ValueError: two URLs share a shard id, or a URL has an empty shard id.
    """
    return _unique_shard_ids(_braces(urls))


def check_shard_urls(urls: list[str]) -> list[str]:
    """The shard URLs a run reads, checked before any worker starts: brace ranges and shell-style patterns
    expanded, local paths made absolute (``file://`` too), shard ids unique. Local files that do not exist
    are returned as they are (the caller reports them together).

    Raises:
        ShardURLError: a URL that can never be read (module docstring), a directory, a pattern matching
            nothing or over http(s).
        ValueError: two URLs with one shard id, an empty shard id.
    """
    checked = [match for url in _braces(urls) for match in _expand_pattern(url)]
    for url in checked:
        if os.path.isdir(url):
            raise ShardURLError(f"shard {url!r} is a directory; give its shard files, e.g. '{url}/*.tar'")
    _refuse_unreachable_http_hosts(checked)
    return _unique_shard_ids(checked)


def _refuse_unreachable_http_hosts(urls: list[str]) -> None:
    """One HEAD (``shard_size``) of the first shard of each http(s) host; raise ``ShardURLError`` when the
    host cannot be reached at all (connection refused, unknown host, TLS failure, no answer in time) or
    answers a status that never changes (``NEVER_SERVED_STATUSES``: 404, 410, 401, 403). Any other answer
    (a 5xx, a missing size) is left to the shard's read, which retries."""
    first_by_host: dict[str, str] = {}
    for url in urls:
        location = parse_shard_url(url)
        if location.scheme in HTTP_SCHEMES:
            first_by_host.setdefault(url.split("/", 3)[2], url)
    for host, url in first_by_host.items():
        try:
            shard_size(url)
        except ShardReadError as exc:
            if _connection_error(exc) is not None:
                raise ShardURLError(f"cannot reach {host} for shard {url}: {_cause_text(exc)}") from exc
            status = _refusing_status(exc)
            if status is not None:
                raise ShardURLError(
                    f"shard {url}: the server answers HTTP {status} (a shard that can never be read)"
                ) from exc


def _refusing_status(exc: BaseException) -> int | None:
    """The HTTP status in ``exc``'s cause chain when it says the shard will never be served
    (``NEVER_SERVED_STATUSES``), else None."""
    import aiohttp

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, aiohttp.ClientResponseError) and seen.status in NEVER_SERVED_STATUSES:
            return seen.status
        seen = seen.__cause__ or seen.__context__
    return None


def _connection_error(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s cause chain that says the server could not be reached, or None."""
    import aiohttp

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, aiohttp.ClientConnectorError | ConnectionError | TimeoutError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _cause_text(exc: BaseException) -> str:
    """``Type: message`` of the innermost exception of ``exc``'s cause chain: fsspec's HTTP ``info`` turns
    every failure (connection refused, 404, TLS) into ``FileNotFoundError(url)``; the real cause is below it."""
    inner = exc
    while (inner.__cause__ or inner.__context__) is not None:
        inner = inner.__cause__ or inner.__context__  # type: ignore[assignment]
    return f"{type(inner).__name__}: {inner}"


def _braces(urls: list[str]) -> list[str]:
    expanded: list[str] = []
    for url in urls:
        if "{" in url:
            import braceexpand  # a webdataset dependency; only needed for ranges

            expanded.extend(braceexpand.braceexpand(url))
        else:
            expanded.append(url)
    return expanded


def _unique_shard_ids(urls: list[str]) -> list[str]:
    seen: dict[str, str] = {}
    for url in urls:
        shard = shard_id_of(url)
        if not shard:
            raise ValueError(f"shard URL {url!r} has an empty shard id")
        if shard in seen:
            raise ValueError(f"shard id {shard!r} given twice: {seen[shard]!r} and {url!r}")
        seen[shard] = url
    return urls


def _expand_pattern(url: str) -> list[str]:
    """``url`` normalised (local: absolute path), or the sorted matches of its shell-style pattern."""
    location = parse_shard_url(url)
    if not location.scheme:
        if os.path.exists(location.path) or not _WILDCARD.search(location.path):
            return [location.path]
        found = glob.glob(location.path, recursive=True)  # "**" spans folders, as in bash's globstar
        matches = sorted(path for path in found if os.path.isfile(path))
    elif not _WILDCARD.search(_http_path_part(location.path)):
        return [url]
    elif location.scheme in HTTP_SCHEMES:
        raise ShardURLError(
            f"shard URL {url!r}: a pattern over {location.scheme}:// cannot be listed; "
            "name the shards or use a brace range such as s-{000..099}.tar"
        )
    else:
        matches = [f"{location.scheme}://{path}" for path in _list_objects(location)]
    if not matches:
        raise ShardURLError(
            f"shard pattern {url!r} matches no file; check the folder, or quote a brace range instead"
        )
    return matches


def _list_objects(location: ShardLocation) -> list[str]:
    """Object paths (``BUCKET/KEY``) matching the pattern ``location.path`` (fsspec glob: ``*`` and ``?``
    stay within one ``/`` segment)."""
    try:
        found = _remote_filesystem(location.scheme).glob(location.path)
    except OSError as exc:
        raise ShardURLError(f"cannot list {location.scheme}://{location.path}: {exc}") from exc
    return sorted(str(path) for path in found)


def _remote_filesystem(scheme: str) -> Any:
    """A fresh fsspec file system for ``scheme`` (no instance or listing cache: the endpoint comes from the
    environment, which may change between runs of one process)."""
    if scheme in OBJECT_STORE_SCHEMES:
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    import aiohttp
    import fsspec

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=HTTP_TIMEOUT_S, sock_read=HTTP_TIMEOUT_S)
    return fsspec.filesystem(scheme, skip_instance_cache=True, client_kwargs={"timeout": timeout})


def shard_size(url: str) -> int | None:
    """The shard's byte size from a stat (local) or a HEAD (s3, http(s)); None when the server sends none.

    Raises:
        ShardReadError: the shard does not exist or cannot be reached (message contains the URL).
    """
    location = parse_shard_url(url)
    try:
        if not location.scheme:
            return os.stat(location.path).st_size
        info = _remote_filesystem(location.scheme).info(location.path)
    except (OSError, ValueError) as exc:
        raise ShardReadError(f"cannot stat shard {url}: {_cause_text(exc)}") from exc
    if info.get("type") not in (None, "file"):
        raise ShardReadError(f"shard {url} is not a file (a {info.get('type')})")
    size = info.get("size")
    return int(size) if size is not None else None


def open_shard_stream(url: str) -> BinaryIO:
    """Open a shard for sequential reading; returns the raw (possibly compressed) byte stream, which
    raises ``ShardReadError`` if it ends before the shard's size (module docstring: short reads).

    Raises:
        ShardReadError: the shard cannot be opened (message contains the URL).
    """
    location = parse_shard_url(url)
    size = shard_size(url)
    try:
        if not location.scheme:
            raw: Any = open(location.path, "rb", buffering=0)  # closed by the caller
        elif location.scheme in HTTP_SCHEMES:  # one streamed GET: no Range requests (module docstring)
            raw = _remote_filesystem(location.scheme).open(location.path, "rb", block_size=0, size=size)
        else:
            filesystem = _remote_filesystem(location.scheme)
            raw = filesystem.open(location.path, "rb", block_size=STREAM_BUFFER_BYTES)
    except (OSError, ValueError) as exc:
        raise ShardReadError(f"cannot open shard {url}: {_cause_text(exc)}") from exc
    return _SizedStream(raw, url, size)  # type: ignore[return-value]  # a RawIOBase: read(), close()


class _SizedStream(io.RawIOBase):
    """Pass-through reader that fails, instead of ending, when the source delivers fewer (or more) bytes
    than ``expected`` (``None``: unknown size, not checked)."""

    def __init__(self, source: Any, url: str, expected: int | None) -> None:
        super().__init__()
        self._source, self._url, self._expected = source, url, expected
        self.total = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        try:
            count = self._source.readinto(buffer)  # no copy: local files and fsspec files have readinto
        except OSError as exc:
            raise ShardReadError(f"I/O error reading shard {self._url}: {exc}") from exc
        count = count or 0
        self.total += count
        if self._expected is not None:
            if not count and self.total < self._expected:
                raise ShardReadError(
                    f"short read of shard {self._url}: the stream ended after {self.total} of "
                    f"{self._expected} bytes (the attempt fails and is retried)"
                )
            if self.total > self._expected:
                raise ShardReadError(
                    f"shard {self._url} delivered more than its {self._expected} bytes (changed while read?)"
                )
        return count

    def close(self) -> None:
        if not self.closed:
            self._source.close()
        super().close()
