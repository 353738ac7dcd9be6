"""WebDataset shard -> decoded samples and error rows, every tar member counted (docs/design.md §1, §9).

Members are read with ``tarfile`` in stream mode (``r|``), not with ``webdataset``'s tar iterator: that
iterator skips, without telling, non-regular members (directories, links), ``__*__`` names and metadata
names, so those members could not be counted, and it stops a shard on a read error. Grouping is ours too:
a sample's key is the member path up to the first dot of its basename, directory prefix kept (webdataset's
``base_plus_ext``); the extension (everything after that dot, lower-cased) picks the member's role by its
last component (``a.b.c.jpg`` is key ``a``, an image), as webdataset's decoders do.

Per key (a *group* of adjacent members):

- roles: image (``jpg jpeg png webp bmp``), ``txt`` caption, ``json`` metadata/caption; pickle-like
  extensions are never decoded (ignored, ``unsafe_extension``); any other extension, or a name whose
  basename has no dot, is ignored (``unknown_extension``); non-regular members are ignored (``not_a_file``).
- the group becomes a ``DecodedSample`` or a ``SampleError`` (reason codes in ``schemas.reasons``); a key
  whose group holds only ignored members still counts as a sample (``missing_image``).
- a key seen again after another key (non-adjacent members) makes that later group an error row
  (``non_adjacent_members``). Reading streams, so the earlier group was already emitted as whatever it
  was: the key can then appear both as a row and as an error row.
- caption source: the JSON's ``caption``/``captions`` field when present, else the first ``.txt``; an
  unused second caption member is ignored (``caption_unused``).
- names: member names are text. A name whose bytes are not UTF-8 (a GNU tar written with latin-1 names) is
  shown with ``\\xNN`` for each such byte (``shown_member_name``: ``caf\\xe9.jpg``); a sample whose *key* had
  such bytes becomes a ``member_name_not_utf8`` error row under that shown key; the samples beside it are
  read as usual.
- damage: a member whose data is cut short, or a stream that ends in an invalid header or without the tar
  end-of-archive marker: the group being read becomes a ``tar_truncated`` error row (with the cut member),
  reading stops, and every sample before it is kept. No exception. Gzip-compressed tars are recognised by
  their magic bytes (whatever the file name); damaged or cut gzip data counts as a truncated tar at the
  point where decompression failed. A tar cut exactly at a member boundary is seen as a missing
  end-of-archive block, so the group being read is reported as cut even if it happened to be complete.
- a shard that cannot be opened, whose first header is unreadable, or that fails with an I/O error:
  ``ShardReadError`` (the caller retries or reports a failed shard; error rows already yielded for it
  must then be discarded).

Accounting (§9): ``members == sum(len(s.member_names) for s in samples) + sum(len(e.member_names) for e in
errors) + sum(counts().members_ignored.values())``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from schemas.reasons import ErrorReason, IgnoredReason, SampleRejected
from workers.read.captions import (
    image_id_from_key,
    parse_json_metadata,
    parse_text_caption,
    validate_boxes,
)
from workers.read.decode import OPENCV_MAX_PIXELS_ENV, decode_image, opencv_pixel_limit
from workers.read.tarstream import TarDamage, TarEntry, iter_tar_entries
from workers.read.urls import (  # noqa: F401  (ShardReadError, expand_shard_urls: re-exported)
    ShardReadError,
    expand_shard_urls,
    open_shard_stream,
    shard_id_of,
)

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp"})
TEXT_EXTENSION = "txt"
JSON_EXTENSION = "json"
UNSAFE_EXTENSIONS = frozenset(
    {"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "bin", "npy", "npz", "joblib", "torch", "mp", "msgpack"}
)
CAPTION_MODES = ("required", "optional")

_IMAGE, _TEXT, _JSON = "image", "text", "json"


@dataclass(frozen=True)
class ReaderConfig:
    """How a shard's samples are read.

    Attributes:
        captions: ``"required"`` (no caption -> ``missing_caption`` error row) or ``"optional"``.
        max_pixels: refuse images whose header declares more pixels, before any decode (default 50e6); the
            only pixel limit (``workers.read.decode``), at most OpenCV's (``opencv_pixel_limit``, 2**30).
        require_boxes: ``True`` for ``--boxes given``: a sample without ``boxes`` in its JSON (or with an
            empty list) is an error row (``boxes_missing``).
    """

    captions: str = "required"
    max_pixels: int = 50_000_000
    require_boxes: bool = False

    def __post_init__(self) -> None:
        if self.captions not in CAPTION_MODES:
            raise ValueError(f"captions must be one of {CAPTION_MODES}, got {self.captions!r}")
        if isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"max_pixels must be a positive int, got {self.max_pixels!r}")
        if self.max_pixels > opencv_pixel_limit():
            raise ValueError(
                f"max_pixels {self.max_pixels} is above OpenCV's decode limit {opencv_pixel_limit()} "
                f"(set {OPENCV_MAX_PIXELS_ENV} to raise it)"
            )

    def to_dict(self) -> dict:
        """Plain dict for manifests and config digests."""
        return asdict(self)


@dataclass(frozen=True)
class DecodedSample:
    """One good sample.

    Attributes:
        key, shard: identity (shard id, key).
        image_id: int64 id from the JSON or a COCO-style key, else ``None``.
        image_rgb: uint8 ``[H, W, 3]`` RGB, EXIF orientation applied.
        width_px, height_px: ``W`` and ``H`` of ``image_rgb``.
        captions: whitespace-stripped, non-empty captions (may be empty when captions are optional).
        given_boxes_xyxy_px: float32 ``[N, 4]`` xyxy pixels inside the image, or ``None`` if not given.
        member_names: the tar members used, in source order (ignored members are not listed).
    """

    key: str
    shard: str
    image_id: int | None
    image_rgb: np.ndarray
    width_px: int
    height_px: int
    captions: tuple[str, ...]
    given_boxes_xyxy_px: np.ndarray | None
    member_names: tuple[str, ...]


@dataclass(frozen=True)
class SampleError:
    """One sample that did not make it: a row of the shard's error table (``schemas.store.error_schema``)."""

    key: str
    shard: str
    member_names: tuple[str, ...]
    reason: ErrorReason
    detail: str


@dataclass
class MemberCounts:
    """Tar members of one shard: all of them, and the ignored ones per ``IgnoredReason`` value."""

    members: int = 0
    members_ignored: dict[str, int] = field(default_factory=dict)


def split_member_name(name: str) -> tuple[str, str] | None:
    """``dir/key.ext.more`` -> ``("dir/key", "ext.more")`` (extension lower-cased); ``None`` if the
    basename has no dot or starts with one. Same as webdataset's ``base_plus_ext`` except for dot-files
    in a directory (``x/.h.txt``), which webdataset keys as ``x/`` and we leave without a key."""
    directory, _, basename = name.rpartition("/")
    stem, dot, extension = basename.partition(".")
    if not dot or not stem:
        return None
    return (f"{directory}/{stem}" if _ else stem), extension.lower()


def shown_member_name(name: str) -> str:
    """A member name as regionflow shows and stores it: the name itself when its bytes are UTF-8; else each
    byte that is not, as ``\\xNN`` (``tarfile`` gives such bytes as surrogate escapes: the latin-1 name
    ``caf\\xe9.jpg``, 0x63 0x61 0x66 0xE9 ..., becomes the text ``caf\\xe9.jpg`` with a literal backslash).
    Keys are text, so a sample whose key is shown this way is an error row (``member_name_not_utf8``)."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def member_role(extension: str) -> str | IgnoredReason:
    """Role of a member from its extension's last component: image / text / json, or why it is ignored."""
    last = extension.rsplit(".", 1)[-1]
    if last in IMAGE_EXTENSIONS:
        return _IMAGE
    if last == TEXT_EXTENSION:
        return _TEXT
    if last == JSON_EXTENSION:
        return _JSON
    if last in UNSAFE_EXTENSIONS:
        return IgnoredReason.UNSAFE_EXTENSION
    return IgnoredReason.UNKNOWN_EXTENSION


@dataclass
class _Member:
    name: str  # as shown: ``shown_member_name``
    key: str
    role: str
    data: bytes
    key_not_utf8: bool = False


@dataclass
class _Group:
    key: str
    members: list[_Member] = field(default_factory=list)
    non_adjacent: bool = False


def _wanted(name: str, keys: frozenset[str] | None) -> bool:
    split = split_member_name(name)
    if split is None or isinstance(member_role(split[1]), IgnoredReason):
        return False
    return keys is None or shown_member_name(split[0]) in keys


class ShardReader:
    """Iterate one shard's samples in source order, streaming (one sample's members held at a time).

    Yields ``DecodedSample`` or ``SampleError`` (module docstring: rules). ``counts()`` is valid once the
    iteration has finished. With ``keys``, only the samples of those keys are read, decoded and yielded
    (the other members are skipped without reading their data; ``counts()`` is then not the shard's
    accounting): how ``regionflow visualize`` finds one image with the same rules as ``extract``.

    Raises (from iteration):
        ShardReadError: the shard cannot be opened, is not a tar, or an I/O error occurs.
    """

    def __init__(self, url: str, config: ReaderConfig, keys: frozenset[str] | None = None) -> None:
        self.url = url
        self.config = config
        self.keys = keys
        self.shard_id = shard_id_of(url)
        self._counts = MemberCounts()
        self._ignored: Counter[str] = Counter()
        self._finished = False

    def counts(self) -> MemberCounts:
        """Member counts of the finished iteration (``members_ignored`` keys sorted).

        Raises:
            RuntimeError: the iteration has not finished.
        """
        if not self._finished:
            raise RuntimeError(f"counts() of shard {self.url} before its iteration finished")
        return MemberCounts(self._counts.members, dict(sorted(self._ignored.items())))

    def __iter__(self) -> Iterator[DecodedSample | SampleError]:
        self._counts, self._ignored, self._finished = MemberCounts(), Counter(), False
        stream = open_shard_stream(self.url)
        try:
            entries = iter_tar_entries(stream, self.url, lambda name: _wanted(name, self.keys))
            yield from self._samples(entries)
        finally:
            stream.close()
        self._finished = True

    def _samples(self, entries: Iterator[TarEntry | TarDamage]) -> Iterator[DecodedSample | SampleError]:
        group: _Group | None = None
        closed_keys: set[str] = set()
        for entry in entries:
            if isinstance(entry, TarDamage):
                yield from self._damaged(group, entry)
                return
            self._counts.members += 1
            member = self._classify(entry)
            if member is None:
                continue
            key = member.key
            if group is None or group.key != key:
                if group is not None:
                    closed_keys.add(group.key)
                    yield from self._finish_selected(group)
                group = _Group(key=key, non_adjacent=key in closed_keys)
            if member.role:
                group.members.append(member)
        if group is not None:
            yield from self._finish_selected(group)

    def _finish_selected(self, group: _Group) -> Iterator[DecodedSample | SampleError]:
        if self.keys is None or group.key in self.keys:
            yield self._finish(group)

    def _classify(self, entry: TarEntry) -> _Member | None:
        """Count an ignored member; return ``None`` for one without a key (not a file, no extension),
        else the member with its role (role ``""``: ignored, but it still opens or continues its key's
        group, as in webdataset's grouping)."""
        if not entry.regular:
            self._ignored[IgnoredReason.NOT_A_FILE.value] += 1
            return None
        split = split_member_name(entry.name)
        if split is None:
            self._ignored[IgnoredReason.UNKNOWN_EXTENSION.value] += 1
            return None
        name, key = shown_member_name(entry.name), shown_member_name(split[0])
        key_not_utf8 = key != split[0]
        role = member_role(split[1])
        if isinstance(role, IgnoredReason):
            self._ignored[role.value] += 1
            return _Member(name=name, key=key, role="", data=b"", key_not_utf8=key_not_utf8)
        if entry.data is None:  # a key not selected (``keys``): grouped, never built
            return _Member(name=name, key=key, role=role, data=b"", key_not_utf8=key_not_utf8)
        return _Member(name=name, key=key, role=role, data=entry.data, key_not_utf8=key_not_utf8)

    def _damaged(self, group: _Group | None, damage: TarDamage) -> Iterator[SampleError | DecodedSample]:
        """The sample cut by stream damage becomes a ``tar_truncated`` error row (with the cut member).

        Damage found at a header (``damage.name is None``) cuts the group being read (it may have lost
        members we cannot see). A member whose data is cut belongs to its own key: if that key differs
        from the group being read, that group was complete and is finished normally first.
        """
        if damage.name is not None:
            self._counts.members += 1
            cut_name = shown_member_name(damage.name)
            split = split_member_name(cut_name)
            cut_key = split[0] if split is not None else cut_name
            if group is not None and group.key != cut_key:
                yield self._finish(group)
                group = None
            if group is None:
                group = _Group(key=cut_key)
            group.members.append(_Member(name=cut_name, key=cut_key, role="", data=b""))
        elif group is None:
            group = _Group(key="")  # damage before any keyed member: reported under the empty key
        yield self._error(group, ErrorReason.TAR_TRUNCATED, damage.detail)

    def _finish(self, group: _Group) -> DecodedSample | SampleError:
        try:
            return self._build(group)
        except SampleRejected as rejected:
            return self._error(group, rejected.reason, rejected.detail)

    def _error(self, group: _Group, reason: ErrorReason, detail: str) -> SampleError:
        names = tuple(m.name for m in group.members)
        return SampleError(group.key, self.shard_id, names, reason, detail)

    def _build(self, group: _Group) -> DecodedSample:
        """Checks in order of cost: grouping, captions/metadata, boxes presence, image decode, box values.

        Raises:
            SampleRejected: the sample is an error row.
        """
        image = _check_grouping(group)
        json_members = [m for m in group.members if m.role == _JSON]
        text_members = [m for m in group.members if m.role == _TEXT]
        used = [image]
        meta = None
        if json_members:
            meta = parse_json_metadata(json_members[0].data, json_members[0].name)
            used.append(json_members[0])
        captions: tuple[str, ...] = ()
        if meta is not None and meta.captions is not None:
            captions = meta.captions
        elif text_members:
            captions = parse_text_caption(text_members[0].data, text_members[0].name)
            used.append(text_members[0])
        if self.config.captions == "required" and not captions:
            raise SampleRejected(ErrorReason.MISSING_CAPTION, "no non-empty caption in .json or .txt")
        boxes = meta.boxes_xyxy_px if meta is not None else None
        if self.config.require_boxes and (boxes is None or len(boxes) == 0):
            raise SampleRejected(ErrorReason.BOXES_MISSING, "no 'boxes' in the sample's JSON")
        rgb = decode_image(image.data, self.config.max_pixels)
        height, width = rgb.shape[:2]
        if boxes is not None:
            boxes = validate_boxes(boxes, width, height)
        image_id = meta.image_id if meta is not None and meta.image_id is not None else None
        if image_id is None:
            image_id = image_id_from_key(group.key)
        used_ids = {id(m) for m in used}
        if len(group.members) > len(used):
            self._ignored[IgnoredReason.CAPTION_UNUSED.value] += len(group.members) - len(used)
        return DecodedSample(
            key=group.key,
            shard=self.shard_id,
            image_id=image_id,
            image_rgb=rgb,
            width_px=width,
            height_px=height,
            captions=captions,
            given_boxes_xyxy_px=boxes,
            member_names=tuple(m.name for m in group.members if id(m) in used_ids),
        )


def _check_grouping(group: _Group) -> _Member:
    """Return the group's one image member, or raise for a key that is not UTF-8, non-adjacent, duplicate or
    missing/extra images."""
    if any(m.key_not_utf8 for m in group.members):
        raise SampleRejected(
            ErrorReason.MEMBER_NAME_NOT_UTF8,
            f"the tar stores key '{group.key}' in bytes that are not UTF-8 (shown with \\xNN for those bytes); "
            "keys are text: rename the members, e.g. re-pack the tar with UTF-8 names",
        )
    if group.non_adjacent:
        raise SampleRejected(
            ErrorReason.NON_ADJACENT_MEMBERS,
            f"members of key {group.key!r} appear again after another key; the earlier group was read "
            "as its own sample",
        )
    names = [m.name for m in group.members]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise SampleRejected(ErrorReason.DUPLICATE_MEMBER, f"member(s) {duplicates} appear more than once")
    images = [m for m in group.members if m.role == _IMAGE]
    if not images:
        raise SampleRejected(
            ErrorReason.MISSING_IMAGE, f"no member with an image extension {sorted(IMAGE_EXTENSIONS)}"
        )
    if len(images) > 1:
        raise SampleRejected(ErrorReason.MULTIPLE_IMAGES, f"image members {[m.name for m in images]}")
    return images[0]
