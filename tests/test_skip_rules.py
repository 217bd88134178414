"""Issue 15's skip rules: missing real data or SLURM skip with one line on a developer machine and fail under CI."""

from __future__ import annotations

import pytest
from _pytest.outcomes import Failed, Skipped

import conftest


@pytest.mark.parametrize("ci, outcome", [("", Skipped), ("true", Failed), ("1", Failed), ("false", Skipped)])
def test_skip_becomes_failure_under_ci(monkeypatch, ci, outcome):
    monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome) as info:
        conftest.skip_or_fail("no bccd data: run `cellseg data fetch bccd data/BCCD`")
    assert "\n" not in str(info.value.msg)
    assert ("CI=true: skipping is not allowed" in info.value.msg) == (outcome is Failed)


def test_data_search_order(monkeypatch, tmp_path):
    shared, fetched, env_dir = tmp_path / "shared", tmp_path / "fetched", tmp_path / "env"
    monkeypatch.setattr(conftest, "SHARED_DATA", shared)
    monkeypatch.setattr(conftest, "FETCHED_DATA", fetched)
    monkeypatch.delenv("CELLSEG_DSB2018_ROOT", raising=False)
    args = ("CELLSEG_DSB2018_ROOT", "dsb2018_nuclei", "dsb2018-tile", ("img2d.tif", "mask2d.tif"))
    assert conftest.find_data_dir(*args) is None
    monkeypatch.setenv("CI", "")
    with pytest.raises(Skipped, match=r"no dsb2018-tile data: run `cellseg data fetch dsb2018-tile .*fetched/"
                                      r"dsb2018_nuclei` \(or set CELLSEG_DSB2018_ROOT\)"):
        conftest._data_dir(*args)
    for folder in (fetched / "dsb2018_nuclei", shared / "dsb2018_nuclei", env_dir):
        folder.mkdir(parents=True)
        for name in ("img2d.tif", "mask2d.tif"):
            (folder / name).write_bytes(b"x")
    assert conftest.find_data_dir(*args) == shared / "dsb2018_nuclei"  # ../shared/data before the fetched copy
    (shared / "dsb2018_nuclei" / "img2d.tif").unlink()
    assert conftest.find_data_dir(*args) == fetched / "dsb2018_nuclei"
    monkeypatch.setenv("CELLSEG_DSB2018_ROOT", str(env_dir))  # the variable wins
    assert conftest.find_data_dir(*args) == env_dir
    (env_dir / "mask2d.tif").unlink()  # a variable naming an incomplete folder is an error, not a fallback
    with pytest.raises(Failed, match=r"CELLSEG_DSB2018_ROOT=.* lacks \['mask2d.tif'\]"):
        conftest.find_data_dir(*args)
