"""Download a file and verify its SHA-256 before anything reads it (pinned data, nothing that can change quietly)."""

from __future__ import annotations

import logging
import shutil
import urllib.request
from pathlib import Path

from cellseg.data.files import sha256_file  # noqa: F401  (one hasher, also imported from here)

log = logging.getLogger(__name__)

DOWNLOAD_TIMEOUT_S = 60.0


class ChecksumError(ValueError):
    """The downloaded bytes are not the pinned ones."""




def fetch_url(url: str, dest: str | Path, *, what: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download ``url`` to ``dest``, unchecked: the caller verifies the bytes (:func:`download_verified`) or the
    unpacked content (:mod:`cellseg.data.bccd_pin`) before anything uses them.

    Raises:
        OSError: the download failed (URLError, timeouts).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s from %s", what, url)
    with urllib.request.urlopen(url, timeout=timeout) as response, open(dest, "wb") as fh:
        shutil.copyfileobj(response, fh)
    return dest


def download_verified(url: str, dest: str | Path, sha256: str | None, *, what: str, pin_name: str,
                      timeout: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Fetch ``url`` to ``dest`` and check it against ``sha256``.

    Args:
        what: the thing downloaded, for messages ("the BCCD archive").
        pin_name: where the pinned hash lives (``cellseg.data.fetch.STARDIST_WHEEL_SHA256``), named in messages.

    Raises:
        ChecksumError: the file's hash differs from ``sha256``, or no hash is pinned (the message gives the file's
            hash, so a maintainer with internet access can pin it after checking the content).
        OSError: the download failed (URLError, timeouts) — the caller adds what to do offline.
    """
    dest = fetch_url(url, dest, what=what, timeout=timeout)
    got = sha256_file(dest)
    if sha256 is None:
        raise ChecksumError(
            f"{what} from {url} has SHA-256 {got}, but no hash is pinned ({pin_name} is None), so it cannot be "
            f"verified. On a machine with internet access check the content and set {pin_name} = '{got}' "
            f"(or pass --sha256 {got} to `cellseg data fetch` if you trust this download).")
    if got != sha256.lower():
        raise ChecksumError(
            f"{what} from {url} has SHA-256 {got}, expected {sha256.lower()} ({pin_name}): the file changed or the "
            f"download is damaged. Nothing was unpacked. Retry; if it persists the upstream file changed: "
            f"check it and update {pin_name}.")
    log.info("%s verified (SHA-256 %s)", what, got)
    return dest
