"""``regionflow visualize STORE KEY [--shard ID] --out FILE.png [--images SHARD_URL ...]``.

Draws one image with its stored region boxes, each labelled with its class (the name when the store's
manifest carries the object vocabulary, ``manifest["vocabularies"]["objects"]``, where class ``i + 1`` is
entry ``i``; else ``#id``) and its confidence.

The store holds no pixels: the image is read from the input shard whose id is the row's ``shard``, found
among ``--images`` (brace ranges allowed) or, without it, at the source its done marker records (the URL
the rows were extracted from, whichever run committed the shard); markers written before sources were
recorded fall back to the shard URLs the store's last extraction run recorded in its manifest. The image is
read with the extractor's reader (``ShardReader`` restricted to the key: the same grouping, gzip handling,
decode and EXIF orientation), so the picture is the one the boxes were computed on. A store extracted by a
random-init detector (``manifest["weights"]["random_init"]``) gets a dark red band under the picture saying
so. ``--out`` must end in ``.png``; its folder is created when missing (as
``regionflow export`` does); an existing file is refused unless ``--overwrite``. Exit codes: 0 written; 2 the
key, shard or image cannot be found, the key repeats across shards and ``--shard`` is missing, or ``--out``
is refused.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pyarrow.compute as pc

from pipelines.cli import ExitCode, fail
from schemas.reasons import SampleRejected
from schemas.store import StoreSchemaError
from workers.corpus.drawing import DrawingConfig, RegionLabel, class_name, draw_regions, mark_random_init
from workers.read.reader import ReaderConfig, SampleError, ShardReader
from workers.read.urls import ShardReadError, check_shard_urls, shard_id_of
from workers.store import StoreReader

log = logging.getLogger(__name__)

# Where an extraction run records its input shard URLs in manifest.json (``shard_urls`` is what extract writes).
RECORDED_URL_FIELDS = ("shard_urls", "shards", "urls", "inputs")
PICTURE_SUFFIX = ".png"


class VisualizeError(RuntimeError):
    """The request cannot be served (message says what is missing and what to pass)."""


@dataclass(frozen=True)
class StoreRow:
    """The stored regions of one image."""

    key: str
    shard: str
    width_px: int
    height_px: int
    boxes_xyxy_px: np.ndarray  # float32 [N, 4]
    object_ids: list[int]
    object_conf: list[float]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="feature store directory or URI")
    parser.add_argument("key", help="sample key (tar member path up to the first dot of the basename)")
    parser.add_argument("--shard", help="shard id, required when KEY appears in several shards")
    parser.add_argument(
        "--out",
        required=True,
        metavar="FILE.png",
        help="PNG file to write (its folder is created if missing)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it already exists")
    parser.add_argument(
        "--images",
        nargs="+",
        metavar="SHARD_URL",
        help="input shard(s) holding the image (default: the source recorded in the shard's done marker)",
    )
    parser.add_argument("--scale", type=float, default=1.0, help="resize factor of the picture (default 1)")
    parser.add_argument(
        "--max-boxes", type=int, default=0, help="draw only the N most confident boxes (0 = all)"
    )


def find_row(store: StoreReader, key: str, shard: str | None) -> StoreRow:
    """The row of ``key`` (in ``shard`` when given). Raises ``VisualizeError`` if absent or ambiguous."""
    shards = store.shards()
    if shard is not None:
        if shard not in shards:
            raise VisualizeError(
                f"shard {shard!r} is not committed in the store (shards: {_preview(shards)})"
            )
        shards = [shard]
    found = []
    for name in shards:
        table = store.table(name)
        matches = table.filter(pc.equal(table["key"], key))
        found += [(name, row) for row in matches.to_pylist()]
    if not found:
        where = f"shard {shard!r}" if shard else f"any of the store's {len(shards)} shard(s)"
        raise VisualizeError(f"key {key!r} is not in {where}")
    if len(found) > 1:
        raise VisualizeError(
            f"key {key!r} is in several shards ({', '.join(s for s, _ in found)}): pass --shard ID"
        )
    name, row = found[0]
    return StoreRow(
        key=key,
        shard=name,
        width_px=int(row["image_width_px"]),
        height_px=int(row["image_height_px"]),
        boxes_xyxy_px=np.asarray(row["boxes_xyxy_px"], dtype=np.float32).reshape(-1, 4),
        object_ids=[int(i) for i in row["object_ids"]],
        object_conf=[float(c) for c in row["object_conf"]],
    )


def _preview(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f", ... ({len(items)} in all)" if len(items) > limit else "")


def recorded_shard_urls(manifest: dict[str, Any]) -> list[str] | None:
    """Input shard URLs recorded in the manifest: the newest run's ``args`` that has them (``regionflow
    extract`` writes ``runs[-1]["args"]["shard_urls"]``), then the extraction config; None when absent."""
    runs = [r for r in manifest.get("runs") or [] if isinstance(r, dict)]
    places = [r.get("args") for r in reversed(runs)] + [manifest.get("extraction_config")]
    for place in places:
        if not isinstance(place, dict):
            continue
        for field in RECORDED_URL_FIELDS:
            urls = place.get(field)
            if isinstance(urls, list) and urls and all(isinstance(u, str) for u in urls):
                return urls
    return None


def shard_url_for(shard: str, urls: list[str]) -> str:
    """The URL among ``urls`` (brace ranges expanded) whose shard id is ``shard``; raises VisualizeError."""
    try:
        expanded = check_shard_urls(urls)
    except ValueError as exc:
        raise VisualizeError(str(exc)) from exc
    for url in expanded:
        if shard_id_of(url) == shard:
            return url
    raise VisualizeError(f"none of the given shard URLs has shard id {shard!r} ({_preview(expanded)})")


def read_image(url: str, key: str, max_pixels: int) -> np.ndarray:
    """The decoded image of ``key`` in the shard at ``url``: uint8 RGB ``[H, W, 3]``, EXIF orientation
    applied, read with the extractor's reader (only that key's members are read and decoded).

    Raises:
        VisualizeError: the shard has no sample ``key``, or the sample is an error row there (its reason).
        ShardReadError: the shard cannot be opened.
    """
    config = ReaderConfig(captions="optional", max_pixels=max_pixels)
    for item in ShardReader(url, config, keys=frozenset({key})):
        if isinstance(item, SampleError):
            raise VisualizeError(
                f"sample {key!r} of {url} cannot be read: {item.reason.value}: {item.detail}"
            )
        return item.image_rgb
    raise VisualizeError(f"shard {url} has no sample with key {key!r}")


def source_url(store: StoreReader, shard: str) -> str | None:
    """The input URL the shard's done marker records (None for markers written before sources were)."""
    source = store.marker(shard).source
    return source.url if source is not None else None


def _labels(row: StoreRow, manifest: dict[str, Any]) -> list[RegionLabel]:
    vocabularies = manifest.get("vocabularies") or {}
    objects = vocabularies.get("objects") if isinstance(vocabularies, dict) else None
    return [
        RegionLabel(class_id, conf, class_name(class_id, objects))
        for class_id, conf in zip(row.object_ids, row.object_conf, strict=True)
    ]


def _max_pixels(manifest: dict[str, Any]) -> int:
    value = (manifest.get("extraction_config") or {}).get("max_pixels")
    return int(value) if isinstance(value, int) and value > 0 else ReaderConfig().max_pixels


def render(args: argparse.Namespace) -> np.ndarray:
    """The drawn picture, uint8 RGB; raises ``VisualizeError`` naming what is missing."""
    store = StoreReader(args.store)
    row = find_row(store, args.key, args.shard)
    url = None if args.images else source_url(store, row.shard)
    if url is None:
        urls = args.images or recorded_shard_urls(store.manifest)
        if not urls:
            raise VisualizeError(
                f"the store records no input shard URLs: pass --images SHARD_URL (the shard {row.shard!r} "
                f"holds key {row.key!r})"
            )
        url = shard_url_for(row.shard, urls)
    try:
        image = read_image(url, row.key, _max_pixels(store.manifest))
    except ShardReadError as exc:
        raise VisualizeError(f"{exc} (if the shard moved, pass --images SHARD_URL)") from exc
    if image.shape[:2] != (row.height_px, row.width_px):
        raise VisualizeError(
            f"image {row.key!r} in {url} is {image.shape[1]}x{image.shape[0]} but the store row says "
            f"{row.width_px}x{row.height_px}: not the shard this store was extracted from"
        )
    config = DrawingConfig(scale=args.scale, max_boxes=args.max_boxes)
    picture = draw_regions(image, row.boxes_xyxy_px, _labels(row, store.manifest), config)
    if (store.manifest.get("weights") or {}).get("random_init"):  # boxes of an untrained detector: say so
        picture = mark_random_init(picture, config.font_scale)
    return picture


def check_out_path(out: str, overwrite: bool) -> None:
    """Refuse an ``--out`` that is not a ``.png`` file name, is a directory, or exists (without
    ``overwrite``). A missing parent folder is fine: ``write_picture`` creates it.

    Raises:
        VisualizeError: the message names the flag and what to do.
    """
    path = Path(out)
    if path.suffix.lower() != PICTURE_SUFFIX:
        raise VisualizeError(f"--out {out}: the extension must be {PICTURE_SUFFIX}")
    if path.is_dir():
        raise VisualizeError(f"--out {out} is a directory: give a {PICTURE_SUFFIX} file name")
    if path.exists() and not overwrite:
        raise VisualizeError(f"--out {out} already exists: pass --overwrite to replace it")


def write_picture(out: str, picture: np.ndarray) -> None:
    """Write uint8 RGB ``picture`` ``[H, W, 3]`` as a PNG at ``out``, creating its folder.

    Raises:
        VisualizeError: the folder cannot be created or OpenCV cannot write the file.
    """
    path = Path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise VisualizeError(f"--out {out}: cannot create the folder {path.parent}: {exc}") from exc
    if not cv2.imwrite(str(path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR)):
        raise VisualizeError(f"OpenCV could not write {out}")


def run(args: argparse.Namespace) -> int:
    try:
        check_out_path(args.out, args.overwrite)
        picture = render(args)
        write_picture(args.out, picture)
    except (VisualizeError, StoreSchemaError, ShardReadError, SampleRejected) as exc:
        return fail("visualize", exc)
    log.info("wrote %s (%dx%d)", args.out, picture.shape[1], picture.shape[0])
    return ExitCode.OK
