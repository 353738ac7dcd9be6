"""CaptionTokenizer: the packaged BERT tokenizer.json, our max length, digests, errors."""

from __future__ import annotations

import pytest

from workers.read.tokenizer import CaptionTokenizer, packaged_checkpoint_dir

CLS, SEP = 101, 102  # uncased BERT vocabulary ids of [CLS] and [SEP]


@pytest.fixture(scope="module")
def tokenizer():
    try:
        return CaptionTokenizer()
    except FileNotFoundError as exc:
        pytest.skip(f"packaged BERT checkpoint absent: {exc}")


def vocab_ids(words: list[str]) -> list[int]:
    """Ids straight from vocab.txt (line number), independent of the tokenizers library."""
    vocab = (packaged_checkpoint_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()
    return [vocab.index(word) for word in words]


def test_ids_match_vocab_and_are_unpadded(tokenizer):
    out = tokenizer.encode(["A Man riding a horse.", "hello"])
    assert out.input_ids[0] == [CLS, *vocab_ids(["a", "man", "riding", "a", "horse", "."]), SEP]
    assert out.input_ids[1] == [CLS, *vocab_ids(["hello"]), SEP]
    assert out.truncated == [False, False]


def test_truncation_counts_special_tokens():
    tok = CaptionTokenizer(max_tokens=5)
    out = tok.encode(["one two three four five six", "one two three"])
    assert out.input_ids[0] == [CLS, *vocab_ids(["one", "two", "three"]), SEP]
    assert out.truncated == [True, False]
    assert len(out.input_ids[1]) == 5


def test_default_length_and_long_caption(tokenizer):
    long_caption = "word " * 20_000  # 100,000 characters
    out = tokenizer.encode([long_caption])
    assert len(out.input_ids[0]) == 36 and out.input_ids[0][0] == CLS and out.input_ids[0][-1] == SEP
    assert out.truncated == [True]


def test_empty_inputs(tokenizer):
    assert tokenizer.encode([]).input_ids == []
    assert tokenizer.encode([""]).input_ids == [[CLS, SEP]]


def test_digest_depends_on_file_and_max_tokens(tmp_path, tokenizer):
    assert CaptionTokenizer(max_tokens=36).digest == tokenizer.digest
    assert CaptionTokenizer(max_tokens=20).digest != tokenizer.digest
    copy = tmp_path / "ckpt"
    copy.mkdir()
    text = (packaged_checkpoint_dir() / "tokenizer.json").read_text()
    (copy / "tokenizer.json").write_text(text)
    assert CaptionTokenizer(str(copy)).digest == tokenizer.digest  # same bytes, other place
    (copy / "tokenizer.json").write_text(text.replace('"[UNK]"', '"[UNK]"', 1) + " ")
    assert CaptionTokenizer(str(copy)).digest != tokenizer.digest
    assert tokenizer.to_dict() == {"tokenizer_digest": tokenizer.digest, "max_tokens": 36}


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CaptionTokenizer(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        CaptionTokenizer(str(tmp_path))
    with pytest.raises(ValueError):
        CaptionTokenizer(max_tokens=2)


def test_one_tokenizer_for_questions_and_decoding() -> None:
    """VQA questions use the caption tokenizer at 23 tokens: ``[SEP]`` kept last when cut; decode drops the
    special tokens (model/vqa.py's second tokenizer is gone)."""
    from model.vqa import DEFAULT_MAX_QUESTION_TOKENS

    tokenizer = CaptionTokenizer(max_tokens=DEFAULT_MAX_QUESTION_TOKENS)
    long_question = "what " * 40 + "is it?"
    ids = tokenizer.encode([long_question, "is it red?"]).input_ids
    assert len(ids[0]) == DEFAULT_MAX_QUESTION_TOKENS and ids[0][0] == 101 and ids[0][-1] == 102
    assert tokenizer.decode(ids[1]) == "is it red?"
