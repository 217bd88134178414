"""Shared fixtures. Real-data locations: ``CELLSEG_*_ROOT``, then ``../shared/data``, then a copy fetched into
``data/`` with ``cellseg data fetch``; otherwise the real-data tests skip with one line saying how to get the data.
Under CI (``CI=true``, set by `.ci/run`) a missing dataset fails instead: CI must run everything."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
FETCHED_DATA = ROOT / "data"  # git-ignored; where the skip message tells you to fetch


def in_ci() -> bool:
    """CI runs every test: there a skip is a failure."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_or_fail(message: str) -> None:
    """Skip with a one-line reason on a developer machine; fail under CI."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: skipping is not allowed in CI)", pytrace=False)
    pytest.skip(message)


def find_data_dir(var: str, shared_name: str, fetch_name: str, must_contain: tuple[str, ...]) -> Path | None:
    """The first of $var, ../shared/data/<shared_name>, data/<shared_name> that exists (None: none does).

    A folder named by $var that lacks the files is an error, not a fallback: the user pointed at it.
    """
    value = os.environ.get(var)
    if value:
        path = Path(value)
        missing = [name for name in must_contain if not (path / name).exists()]
        if missing:
            pytest.fail(f"{var}={value} lacks {missing}; point it at the real data folder, or unset it and run "
                        f"`cellseg data fetch {fetch_name} {FETCHED_DATA / shared_name}`.", pytrace=False)
        return path
    for candidate in (SHARED_DATA / shared_name, FETCHED_DATA / shared_name):
        if all((candidate / name).exists() for name in must_contain):
            return candidate
    return None


def _data_dir(var: str, shared_name: str, fetch_name: str, must_contain: tuple[str, ...]) -> Path:
    path = find_data_dir(var, shared_name, fetch_name, must_contain)
    if path is None:
        skip_or_fail(f"no {fetch_name} data: run `cellseg data fetch {fetch_name} {FETCHED_DATA / shared_name}` "
                     f"(or set {var})")
    return path


@pytest.fixture(scope="session")
def bccd_root() -> Path:
    """The BCCD dataset folder (Annotations/, JPEGImages/, ImageSets/)."""
    return _data_dir("CELLSEG_BCCD_ROOT", "BCCD", "bccd", ("Annotations", "JPEGImages", "ImageSets"))


@pytest.fixture(scope="session")
def dsb2018_root() -> Path:
    """The DSB2018 nuclei folder (img2d.tif, mask2d.tif)."""
    return _data_dir("CELLSEG_DSB2018_ROOT", "dsb2018_nuclei", "dsb2018-tile", ("img2d.tif", "mask2d.tif"))


@pytest.fixture(autouse=True, scope="session")
def _private_hash_cache(tmp_path_factory):
    """The weights-file hash cache (cellseg.checkpoint.fingerprint) of the test session, not the user's ~/.cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("CELLSEG_CACHE_DIR", str(tmp_path_factory.mktemp("cellseg-cache")))
    yield
    mp.undo()


@pytest.fixture
def logs():
    """Messages of the cellseg loggers (attached directly: the run set-up may stop propagation to the root)."""
    records: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler, logger = _Keep(level=logging.INFO), logging.getLogger("cellseg")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield lambda: "\n".join(r.getMessage() for r in records)
    logger.removeHandler(handler)
    logger.setLevel(old_level)
