"""Reader of the bottom-up-attention TSV (``--from butd-tsv``): one image per line, as raw records.

The bottom-up-attention TSV of peteanderson80/bottom-up-attention ``tools/generate_tsv.py`` (read back
by its ``tools/read_tsv.py``): one image per line, tab-separated, no header, fields
``image_id, image_w, image_h, num_boxes, boxes, features`` and, in some re-implementations (ViLBERT's
and VL-BERT's TSVs), a seventh ``cls_prob``. ``boxes`` is base64 of float32 ``[num_boxes, 4]`` xyxy
pixels of the original image (float64 ``[num_boxes, 4]`` is recognised by its length and cast);
``features`` base64 of float32 ``[num_boxes, D]``; ``cls_prob`` base64 of float32 ``[num_boxes, C]``
(column 0 = background). Lines are read with ``csv`` (quoted fields allowed); the csv field-size limit
is raised to 2**31 - 1 while reading (a 36 × 2048 feature field is ~390 KB of base64) and restored
after.

Records are decoded and checked by ``workers.interop.import_records``; the import itself is
``workers.interop.feature_import``.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections.abc import Iterator

from schemas.reasons import ErrorReason
from workers.interop.import_records import TSV_CLS_PROB_FIELD, RawRecord, RecordError

TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
CSV_FIELD_LIMIT = 2**31 - 1


@contextlib.contextmanager
def _csv_field_limit(limit: int) -> Iterator[None]:
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def iter_butd_tsv(path: str) -> Iterator[RawRecord | RecordError]:
    """Records of a bottom-up-attention TSV in file order (module docstring). Blank lines are skipped."""
    name = os.path.basename(path)
    with _csv_field_limit(CSV_FIELD_LIMIT), open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        for values in reader:
            if not values:
                continue
            where = f"{name}:{reader.line_num}"
            key = values[0]
            if len(values) not in (len(TSV_FIELDS), len(TSV_FIELDS) + 1):
                yield RecordError(
                    key or where,
                    where,
                    ErrorReason.DETECTOR_OUTPUT_INVALID,
                    f"{len(values)} tab-separated fields, expected {len(TSV_FIELDS)} or "
                    f"{len(TSV_FIELDS) + 1} (a truncated line?)",
                )
                continue
            yield RawRecord(key, where, dict(zip((*TSV_FIELDS, TSV_CLS_PROB_FIELD), values, strict=False)))
