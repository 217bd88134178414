"""Shared fixtures. Real-data locations come from environment variables that `.ci/run` (and `make test`) set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _data_dir(var: str, must_contain: tuple[str, ...]) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.fail(
            f"environment variable {var} is not set: it must name the folder with the real test data "
            f"(containing {', '.join(must_contain)}). `make test` sets it when ../shared/data exists; "
            f"otherwise export it before running pytest.",
            pytrace=False,
        )
    path = Path(value)
    missing = [name for name in must_contain if not (path / name).exists()]
    if missing:
        pytest.fail(f"{var}={value} lacks {missing}; point it at the real data folder.", pytrace=False)
    return path


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    """The BCCD dataset folder (Annotations/, JPEGImages/, ImageSets/)."""
    return _data_dir("CELLSEG_BCCD_ROOT", ("Annotations", "JPEGImages", "ImageSets"))


@pytest.fixture(scope="session")
def dsb2018_root() -> Path:
    """The DSB2018 nuclei folder (img2d.tif, mask2d.tif)."""
    return _data_dir("CELLSEG_DSB2018_ROOT", ("img2d.tif", "mask2d.tif"))


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory):
    """The weights-file hash cache (cellseg.checkpoint.fingerprint) of the test session, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CELLSEG_CACHE_DIR", str(tmp_path_factory.mktemp("cellseg-cache")))
    yield
    mp.undo()
