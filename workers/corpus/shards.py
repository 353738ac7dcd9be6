"""An image folder (+ COCO captions) -> deterministic WebDataset tar shards (``regionflow shards``, §9 CLI).

Each image file becomes one sample, key = its file stem with every dot mapped to ``_`` (``sample_key``): a
WebDataset key ends at the first dot of the member's basename, so ``a.b.jpg`` and ``a.c.jpg`` written as
``a.b.jpg`` / ``a.c.jpg`` would both be read back as key ``a`` (one ``multiple_images`` error). Two files whose
keys would collide (``a.b.jpg`` and ``a_b.png``) are refused, naming both.

- ``KEY.<ext>``: the original bytes, extension lower-cased and kept (``.jpg``, ``.png``, ...);
- ``KEY.json``: ``{"captions": [...], "file_name": NAME, "height": H, "image_id": ID, "width": W}`` —
  ``file_name`` is the image's original file name (``photo.v2.jpg``); captions from the COCO
  file in annotation-id order (``[]`` when none), ``image_id`` from the COCO file, else from a COCO-style
  file name, else null; ``width``/``height`` as displayed (EXIF orientation applied) read from the header,
  null when the header is unreadable (the sample is still written: ``extract`` reports it as an error row).

The captions file may name more images than the folder holds (a subset of COCO): the images present are
sharded, and the count of captioned images absent is logged and in the summary (``captioned_images_absent``).
A captions file that names none of the folder's images is refused (the wrong file).

Samples are sorted by key (plain string order) and cut into shards of ``samples_per_shard``, named
``PREFIX-000000.tar``; tar headers are fixed (``workers.corpus.tar_writer``), so the output is byte-for-byte
deterministic. All inputs are checked before anything is written.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from schemas.reasons import SampleRejected
from workers.corpus.tar_writer import write_tar
from workers.read.captions import image_id_from_key
from workers.read.decode import read_header
from workers.read.reader import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

SHARD_INDEX_DIGITS = 6
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")  # no dot: a shard id is the file name up to the first dot
SWAPPED_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that turn the picture by 90 degrees


class ShardsInputError(ValueError):
    """Bad ``regionflow shards`` input (missing folder, bad count, captions naming absent images, ...)."""


@dataclass(frozen=True)
class ShardsConfig:
    """Inputs of ``regionflow shards``.

    Attributes:
        images_dir: folder of images (``jpg jpeg png webp bmp``, not recursive).
        out_dir: output folder (created); refuses to mix with existing ``PREFIX-*.tar`` unless ``overwrite``.
        samples_per_shard: samples per tar, >= 1 (the last shard may hold fewer).
        captions_json: COCO captions file (``images`` + ``annotations``), or ``None``.
        prefix: shard name prefix (letters, digits, ``_``, ``-``).
        overwrite: delete existing ``PREFIX-NNNNNN.tar`` files in ``out_dir`` first.
    """

    images_dir: str
    out_dir: str
    samples_per_shard: int
    captions_json: str | None = None
    prefix: str = "shard"
    overwrite: bool = False


@dataclass(frozen=True)
class CocoImage:
    """One image of a COCO captions file."""

    image_id: int
    captions: tuple[str, ...]


@dataclass(frozen=True)
class ShardsSummary:
    """What ``write_shards`` wrote."""

    shards: list[str]
    samples: int
    samples_with_captions: int
    unreadable_headers: list[str]
    captioned_images_absent: int = 0  # images of --captions not in the folder (not sharded)

    def to_dict(self) -> dict:
        return asdict(self)


def sample_key(stem: str) -> str:
    """The sample key of an image file stem: dots mapped to ``_`` (``photo.v2`` -> ``photo_v2``), so the key
    is the whole name up to the extension when read back (docs/design.md §9 *Identity*)."""
    return stem.replace(".", "_")


def list_images(images_dir: Path) -> dict[str, Path]:
    """``key (sample_key of the file stem) -> path`` of the folder's image files, sorted by key.

    Raises:
        ShardsInputError: two files share a key (``a.jpg`` and ``a.png``; ``a.b.jpg`` and ``a_b.jpg``), or
            there is no image.
    """
    found: dict[str, Path] = {}
    for path in sorted(images_dir.iterdir()):
        if not path.is_file() or path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
            continue
        key = sample_key(path.stem)
        if key in found:
            raise ShardsInputError(f"two images with key {key!r}: {found[key].name}, {path.name}")
        found[key] = path
    if not found:
        raise ShardsInputError(f"no image files ({sorted(IMAGE_EXTENSIONS)}) in {images_dir}")
    return dict(sorted(found.items()))


def load_coco_captions(path: Path) -> dict[str, CocoImage]:
    """COCO captions JSON -> ``file stem -> CocoImage`` (captions in annotation-id order).

    Raises:
        ShardsInputError: unreadable file, not COCO captions, or an annotation for an unknown image id.
    """
    try:
        coco = json.loads(path.read_bytes())
        images = {int(i["id"]): Path(str(i["file_name"])).stem for i in coco["images"]}
        annotations = sorted(coco["annotations"], key=lambda a: int(a["id"]))
        pairs = [(int(a["image_id"]), str(a["caption"])) for a in annotations]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ShardsInputError(
            f"{path} is not a readable COCO captions file: {type(exc).__name__}: {exc}"
        ) from None
    captions: dict[int, list[str]] = {image_id: [] for image_id in images}
    for image_id, caption in pairs:
        if image_id not in captions:
            raise ShardsInputError(f"{path}: a caption names image id {image_id}, absent from its 'images'")
        captions[image_id].append(caption)
    return {stem: CocoImage(image_id, tuple(captions[image_id])) for image_id, stem in images.items()}


def _displayed_size(data: bytes) -> tuple[int | None, int | None]:
    try:
        header = read_header(data)
    except SampleRejected:
        return None, None
    if header.orientation in SWAPPED_ORIENTATIONS:
        return header.height_px, header.width_px
    return header.width_px, header.height_px


def _sample_members(key: str, path: Path, coco: CocoImage | None, unreadable: list[str]) -> list:
    data = path.read_bytes()
    width, height = _displayed_size(data)
    if width is None:
        unreadable.append(path.name)
        log.warning("image header of %s unreadable: written without width/height", path)
    image_id = coco.image_id if coco is not None else image_id_from_key(key)
    meta = {
        "captions": list(coco.captions) if coco is not None else [],
        "file_name": path.name,
        "height": height,
        "image_id": image_id,
        "width": width,
    }
    meta_bytes = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return [(f"{key}.{path.suffix.lower().lstrip('.')}", data), (f"{key}.json", meta_bytes)]


def _check_config(config: ShardsConfig) -> tuple[Path, Path]:
    images_dir, out_dir = Path(config.images_dir), Path(config.out_dir)
    if not images_dir.is_dir():
        raise ShardsInputError(f"--images {images_dir} is not a directory")
    if isinstance(config.samples_per_shard, bool) or config.samples_per_shard < 1:
        raise ShardsInputError(f"--samples-per-shard must be >= 1, got {config.samples_per_shard}")
    if not PREFIX_PATTERN.match(config.prefix):
        raise ShardsInputError(f"--prefix {config.prefix!r} must match {PREFIX_PATTERN.pattern}")
    if config.captions_json is not None and not Path(config.captions_json).is_file():
        raise ShardsInputError(f"--captions {config.captions_json} is not a file")
    if out_dir.exists() and not out_dir.is_dir():
        raise ShardsInputError(f"--out {out_dir} exists and is not a directory")
    return images_dir, out_dir


def _existing_shards(out_dir: Path, prefix: str) -> list[Path]:
    if not out_dir.is_dir():
        return []
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{{SHARD_INDEX_DIGITS}}}\.tar$")
    return sorted(p for p in out_dir.iterdir() if pattern.match(p.name))


def write_shards(config: ShardsConfig) -> ShardsSummary:
    """Write the shards (module docstring); every input check happens before the first write.

    Raises:
        ShardsInputError: missing folder, ``samples_per_shard < 1``, bad prefix, unreadable captions file,
            captions naming none of the folder's images, two images with one key, no images, or
            existing shards in ``out_dir`` without ``overwrite``.
    """
    images_dir, out_dir = _check_config(config)
    images = list_images(images_dir)
    coco: dict[str, CocoImage] = {}
    absent = 0
    if config.captions_json is not None:
        coco = load_coco_captions(Path(config.captions_json))
        absent = _captioned_images_absent(coco, images, images_dir)
    existing = _existing_shards(out_dir, config.prefix)
    if existing and not config.overwrite:
        raise ShardsInputError(f"{out_dir} already holds {len(existing)} {config.prefix}-*.tar shards")
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in existing:
        path.unlink()
    keys = list(images)
    step = config.samples_per_shard
    shards: list[str] = []
    unreadable: list[str] = []
    for index, start in enumerate(range(0, len(keys), step)):
        name = f"{config.prefix}-{index:0{SHARD_INDEX_DIGITS}d}.tar"
        write_tar(out_dir / name, _shard_members(keys[start : start + step], images, coco, unreadable))
        shards.append(name)
    with_captions = sum(1 for path in images.values() if path.stem in coco and coco[path.stem].captions)
    return ShardsSummary(shards, len(keys), with_captions, unreadable, absent)


def _captioned_images_absent(coco: dict[str, CocoImage], images: dict[str, Path], images_dir: Path) -> int:
    """How many images of the captions file are not in the folder (a subset of COCO is sharded: said in a log
    line, not an error).

    Raises:
        ShardsInputError: the folder has images but the captions file names none of them (the wrong file).
    """
    stems = {path.stem for path in images.values()}
    absent = sorted(set(coco) - stems)
    if images and absent and len(absent) == len(coco):
        raise ShardsInputError(
            f"--captions names none of the {len(images)} images in {images_dir} (all its {len(coco)} images "
            f"are absent, e.g. {absent[:3]}): is it the captions file of this folder?"
        )
    if absent:
        log.info(
            "--captions: %d captioned images are absent from %s (e.g. %s): sharding the %d images present",
            len(absent),
            images_dir,
            ", ".join(absent[:3]),
            len(images),
        )
    return len(absent)


def _shard_members(
    keys: list[str], images: dict[str, Path], coco: dict[str, CocoImage], unreadable: list[str]
) -> Iterator:
    for key in keys:
        yield from _sample_members(key, images[key], coco.get(images[key].stem), unreadable)
