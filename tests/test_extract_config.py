"""``ExtractConfig`` validates itself before Ray starts; a failed shard keeps its whole cause (no Ray needed)."""

from __future__ import annotations

import pytest

from pipelines.extract_config import ExtractConfig
from pipelines.extract_scheduler import _error_text


@pytest.mark.parametrize(
    ("field", "value"),
    [("boxes", "fixd"), ("captions", "maybe"), ("detector", "resnet"), ("batch_size", 0), ("max_tokens", 2)],
)
def test_config_refuses_unknown_settings(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.replace("_", "[-_]")):
        ExtractConfig(**{"detector": "tiny", field: value})  # type: ignore[arg-type]


def test_failed_shard_error_keeps_every_line_of_its_cause() -> None:
    cause = OSError("s3://b/s-000.tar: short read\nexpected 3235840 bytes, got 1048576")
    assert _error_text(cause) == "OSError: s3://b/s-000.tar: short read\nexpected 3235840 bytes, got 1048576"
