"""schemas.manifest.library_versions: the one record of library versions in a store manifest (extract and
import both write it)."""

from __future__ import annotations

import platform

import pyarrow

from schemas.manifest import library_versions


def test_versions_of_installed_and_missing_distributions() -> None:
    versions = library_versions(["pyarrow", "regionflow-no-such-distribution"])
    assert versions == {
        "python": platform.python_version(),
        "pyarrow": pyarrow.__version__,
        "regionflow-no-such-distribution": None,
    }
