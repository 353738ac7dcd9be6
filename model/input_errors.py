"""The errors that mean "this store, run or checkpoint cannot be used as given" (bad input, exit 1).

`train` and `evaluate` turn exactly these into their one-line refusal (``pipelines.cli.fail``); anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

from model.checkpoint import CheckpointError
from model.data import EmptyStoreError
from model.released import ReleasedCheckpointError
from model.vqa import VqaDataError
from schemas.store import StoreSchemaError

RUN_INPUT_ERRORS: tuple[type[Exception], ...] = (
    StoreSchemaError,
    EmptyStoreError,
    ReleasedCheckpointError,
    VqaDataError,
    CheckpointError,
    FileNotFoundError,
)
