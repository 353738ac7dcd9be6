"""Reader of ViLBERT's feature LMDB (``--from vilbert-lmdb``): one image per key, as raw records.

ViLBERT's feature LMDB (facebookresearch/vilbert-multi-task ``script/convert_to_lmdb.py``, read by
``vilbert/datasets/_image_features_reader.py``): keys are image ids (UTF-8), values pickled dicts with
``image_id``, ``image_h``, ``image_w``, ``num_boxes``, ``boxes``, ``features`` and optionally
``cls_prob``; the arrays are base64 float32 (as in the TSV) or numpy arrays. The extra key ``keys``
(the pickled list of ids) is the index, not an image, and is not counted. Values are unpickled with
``workers.interop.safe_unpickle`` (builtins and numpy arrays only); a value naming any other global aborts
the import with ``UnsafePickleError``.

Records are decoded and checked by ``workers.interop.import_records``; the import itself is
``workers.interop.feature_import``.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator

from schemas.reasons import ErrorReason
from workers.interop.import_records import RawRecord, RecordError
from workers.interop.safe_unpickle import UnsafePickleError, safe_loads

LMDB_INDEX_KEY = b"keys"
LMDB_DATA_FILE = "data.mdb"


def iter_vilbert_lmdb(path: str) -> Iterator[RawRecord | RecordError]:
    """Records of a ViLBERT feature LMDB in key order (module docstring).

    Raises:
        UnsafePickleError: a value's pickle names a global outside the allow-list (import stops).
        lmdb.Error: ``path`` is not an LMDB environment.
    """
    import lmdb

    env = lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=os.path.isdir(path))
    try:
        with env.begin(write=False) as txn:
            for raw_key, value in txn.cursor():
                if raw_key == LMDB_INDEX_KEY:
                    continue
                yield _lmdb_record(os.path.basename(path.rstrip("/")), bytes(raw_key), bytes(value))
    finally:
        env.close()


def _lmdb_record(name: str, raw_key: bytes, value: bytes) -> RawRecord | RecordError:
    key = raw_key.decode("utf-8", errors="backslashreplace")
    where = f"{name}[{key}]"
    try:
        item = safe_loads(value, where=where)
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        return RecordError(
            key, where, ErrorReason.DETECTOR_OUTPUT_INVALID, f"value is not a readable pickle: {exc}"
        )
    if not isinstance(item, dict):
        return RecordError(
            key, where, ErrorReason.DETECTOR_OUTPUT_INVALID, f"value is a {type(item).__name__}, not a dict"
        )
    return RawRecord(key, where, item)
