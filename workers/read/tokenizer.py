"""Caption and question tokenization: BERT WordPiece from a checkpoint directory's ``tokenizer.json``
(docs/design.md §3). The one tokenizer: extract tokenizes captions with it, train and evaluate VQA questions
(``max_tokens`` 23, ``model.vqa.DEFAULT_MAX_QUESTION_TOKENS``) and decode generated captions.

The file's own padding (to 128) and truncation (at 128) are switched off and replaced by ours: captions are
cut at ``max_tokens`` tokens *including* ``[CLS]`` and ``[SEP]`` (the checkpoint's post-processor adds them;
``tokenizers`` counts them toward the limit and keeps ``[SEP]`` last), stored unpadded, with a
per-caption truncation flag.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from schemas.text_checkpoint import packaged_checkpoint_dir

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_TOKENS = 36
MIN_MAX_TOKENS = 3  # [CLS] + one token + [SEP]


@dataclass(frozen=True)
class TokenizedCaptions:
    """Token ids of several captions, unpadded.

    Attributes:
        input_ids: per caption, ``[CLS] ... [SEP]`` ids (int), at most ``max_tokens`` long.
        truncated: per caption, whether tokens were cut to fit ``max_tokens``.
    """

    input_ids: list[list[int]]
    truncated: list[bool]


class CaptionTokenizer:
    """BERT WordPiece tokenizer with our length limit.

    Args:
        checkpoint_dir: a BERT checkpoint directory holding ``tokenizer.json`` (HF format); ``None``: the
            packaged all-MiniLM-L6-v2 checkpoint.
        max_tokens: the most tokens per caption, ``[CLS]`` and ``[SEP]`` included (default 36).

    Attributes:
        digest: sha256 hex of the ``tokenizer.json`` bytes and ``max_tokens`` (goes into the store's
            extraction-config digest).

    Raises:
        FileNotFoundError: the directory or its ``tokenizer.json`` is missing.
        ValueError: ``max_tokens < 3``.
    """

    def __init__(self, checkpoint_dir: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
        from tokenizers import Tokenizer  # only extraction tasks pay for the import

        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < MIN_MAX_TOKENS:
            raise ValueError(
                f"max_tokens must be an int >= {MIN_MAX_TOKENS} ([CLS] x [SEP]), got {max_tokens!r}"
            )
        directory = packaged_checkpoint_dir() if checkpoint_dir is None else Path(checkpoint_dir)
        path = directory / TOKENIZER_FILE
        if not directory.is_dir():
            raise FileNotFoundError(f"BERT checkpoint directory {directory} does not exist")
        if not path.is_file():
            raise FileNotFoundError(f"BERT checkpoint directory {directory} has no {TOKENIZER_FILE}")
        raw = path.read_bytes()
        self.checkpoint_dir = str(directory)
        self.max_tokens = max_tokens
        self.digest = hashlib.sha256(raw + f"\nmax_tokens={max_tokens}".encode()).hexdigest()
        self._tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_length=max_tokens)

    def encode(self, captions: Sequence[str]) -> TokenizedCaptions:
        """Tokenize captions (any count, including none) -> ``TokenizedCaptions`` in the same order."""
        encodings = self._tokenizer.encode_batch(list(captions)) if captions else []
        return TokenizedCaptions(
            input_ids=[list(e.ids) for e in encodings],
            truncated=[len(e.overflowing) > 0 for e in encodings],
        )

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids, special tokens (``[CLS]``, ``[SEP]``, padding) left out."""
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    def to_dict(self) -> dict:
        """Plain dict for the manifest: tokenizer file digest and max tokens (no local path: it would make
        stores from different machines differ)."""
        return {"tokenizer_digest": self.digest, "max_tokens": self.max_tokens}
