"""``cellseg data fetch``: the public test datasets, pinned and verified, laid out as cellseg reads them.

- ``bccd``: commit ``BCCD_COMMIT`` of Shenggan/BCCD_Dataset (a GitHub archive), its ``BCCD/`` folder unpacked as
  ``DIR`` (``DATASET='bccd'``, ``DATA_ROOT=DIR``) once every file matches the pinned manifest
  (:mod:`cellseg.data.bccd_pin`; GitHub may re-compress an archive, so the files are pinned, not the archive).
- ``dsb2018-tile``: the 2D nuclei tile of the Data Science Bowl 2018 (``img2d.tif``, ``mask2d.tif``) that StarDist
  ships inside its wheel; the wheel comes from PyPI (pinned file and SHA-256), so any machine that can install
  packages can fetch it.

Fetch on a login node: compute nodes usually have no internet.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import zipfile
from pathlib import Path

from cellseg.data import bccd
from cellseg.data.bccd_pin import UNVERIFIED_MARKER, ContentMismatch, verify_bccd
from cellseg.data.download import ChecksumError, download_verified, sha256_file

log = logging.getLogger(__name__)

STARDIST_WHEEL_URL = (
    "https://files.pythonhosted.org/packages/9c/7b/19cdd1829523426dd45f4624d6e836834c0c8b91510df2c10520814ac918/"
    "stardist-0.9.1-cp311-cp311-manylinux_2_17_x86_64.manylinux2014_x86_64.whl")
STARDIST_WHEEL_SHA256 = "1f2caf3a071c1ead1b0cbbf9614ff2c82967be1bd22764f097871fb9bbd2718f"
# The two members, by their own hashes too: a wheel with the same hash cannot hold other bytes, but the tile files
# are what the tests read, so they are checked where they land.
DSB2018_TILE_FILES = {
    "stardist/data/images/img2d.tif": ("img2d.tif", "f9ccc1571b92c861ff87e28463068b43f61bd47357ed0503f711e5cd1eb97750"),
    "stardist/data/images/mask2d.tif": ("mask2d.tif", "59ad5e820b7982ca9d13e946fa6e7f64e2714899e00a2ae6c69aa79aad53d46f"),
}
BCCD_LAYOUT = ("Annotations", "JPEGImages", "ImageSets")
DATASETS = ("bccd", "dsb2018-tile")


class FetchError(RuntimeError):
    """A fetch failed; the message names the source, the target and what to do."""


def is_fetched(name: str, target: str | Path) -> bool:
    """Does ``target`` already hold the dataset ``name``?"""
    target = Path(target)
    if name == "bccd":
        return all((target / d).is_dir() for d in BCCD_LAYOUT)
    return all((target / out).is_file() for out, _ in DSB2018_TILE_FILES.values())


def fetch_bccd(target: str | Path, *, url: str | None = None, sha256: str | None = None,
               timeout: float = bccd.DOWNLOAD_TIMEOUT_S, verify: bool = True) -> Path:
    """Download the pinned BCCD archive, unpack ``BCCD/`` and move it to ``target`` once every file matches the
    pinned manifest (``verify=False``: moved anyway, marked unverified). A folder already there is checked instead.

    Raises:
        FetchError: the folder holds something else or differs from the manifest, or the download/check failed.
    """
    target = Path(target)
    if is_fetched("bccd", target):
        if (target / UNVERIFIED_MARKER).exists():
            log.warning("BCCD at %s was fetched with --no-verify and differs from the pinned dataset (see %s)", target,
                        target / UNVERIFIED_MARKER)
            return target
        try:
            verify_bccd(target)
        except ContentMismatch as e:
            raise FetchError(f"{e} (it is already there, so nothing was downloaded)") from e
        log.info("BCCD is already at %s (every file matches the pinned manifest)", target)
        return target
    if target.exists() and any(target.iterdir()):
        raise FetchError(f"{target} exists and is not empty but holds no BCCD layout ({', '.join(BCCD_LAYOUT)}); "
                         "choose an empty or new folder.")
    if target.exists():
        target.rmdir()  # the verified folder is moved into place as a whole
    try:
        bccd.download_bccd(target, url=url, timeout=timeout, sha256=sha256, verify=verify)
    except FileNotFoundError as e:
        raise FetchError(str(e)) from e
    return target


def verify(name: str, target: str | Path) -> str:
    """Check a dataset folder already on disk against its pins; returns a one-line summary.

    Raises:
        FetchError: the folder is missing, differs (files named), or the dataset is unknown.
    """
    target = Path(target)
    if name == "bccd":
        try:
            report = verify_bccd(target)
        except (ContentMismatch, FileNotFoundError) as e:
            raise FetchError(str(e)) from e
        note = f"; but {UNVERIFIED_MARKER} is there from a --no-verify fetch" if (target / UNVERIFIED_MARKER).exists() \
            else ""
        return f"all {report.checked} files match the pinned manifest{note}"
    if name == "dsb2018-tile":
        bad = [f"{out}: {'missing' if not (target / out).is_file() else 'other content'}"
               for out, expected in DSB2018_TILE_FILES.values()
               if not (target / out).is_file() or sha256_file(target / out) != expected]
        if bad:
            raise FetchError(f"{target} is not the pinned DSB2018 tile ({'; '.join(bad)}). Fetch it again with "
                             f"`cellseg data fetch dsb2018-tile NEW_DIR`.")
        return "both files match their pinned SHA-256"
    raise FetchError(f"unknown dataset '{name}': choose one of {list(DATASETS)}")


def fetch_dsb2018_tile(target: str | Path, *, url: str = STARDIST_WHEEL_URL, sha256: str = STARDIST_WHEEL_SHA256,
                       member_hashes: bool = True, timeout: float = bccd.DOWNLOAD_TIMEOUT_S) -> Path:
    """Download the pinned StarDist wheel, verify it, and write ``img2d.tif`` and ``mask2d.tif`` into ``target``.

    ``member_hashes`` checks the two files against their own pinned hashes (tests serving a home-made wheel turn
    it off).
    """
    target = Path(target)
    if is_fetched("dsb2018-tile", target):
        log.info("the DSB2018 tile is already at %s", target)
        return target
    try:
        with tempfile.TemporaryDirectory() as tmp:
            wheel = download_verified(url, Path(tmp) / "stardist.whl", sha256, what="the StarDist wheel",
                                      pin_name="cellseg.data.fetch.STARDIST_WHEEL_SHA256", timeout=timeout)
            staged = Path(tmp) / "tile"
            staged.mkdir()
            with zipfile.ZipFile(wheel) as zf:
                names = set(zf.namelist())
                for member, (out, expected) in DSB2018_TILE_FILES.items():
                    if member not in names:
                        raise FetchError(f"the wheel from {url} has no {member}")
                    with zf.open(member) as src, open(staged / out, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    got = sha256_file(staged / out)
                    if member_hashes and got != expected:
                        raise ChecksumError(f"{member} in the wheel from {url} has SHA-256 {got}, expected {expected}")
            target.mkdir(parents=True, exist_ok=True)
            for out, _ in DSB2018_TILE_FILES.values():
                shutil.move(str(staged / out), str(target / out))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise FetchError(
            f"could not fetch the DSB2018 tile into {target}: {type(e).__name__}: {e}. Run this on a machine that "
            f"can reach PyPI (a login node), or download {url} yourself and unzip {', '.join(DSB2018_TILE_FILES)} "
            f"into {target}.") from e
    log.info("DSB2018 tile written to %s", target)
    return target


def fetch(name: str, target: str | Path, **kwargs) -> Path:
    """Fetch dataset ``name`` (one of ``DATASETS``) into ``target``."""
    if name == "bccd":
        return fetch_bccd(target, **kwargs)
    if name == "dsb2018-tile":
        return fetch_dsb2018_tile(target, **kwargs)
    raise FetchError(f"unknown dataset '{name}': choose one of {list(DATASETS)}")
