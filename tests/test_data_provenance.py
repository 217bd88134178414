"""The prepared cache records what it was made from; training, evaluation and the sbatch scripts refuse (or
re-prepare) a cache made for other parameters instead of trusting any manifest.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellseg.config import resolve_config
from cellseg.data import load_manifest, prepare_dataset
from cellseg.data.provenance import CacheMismatch, cache_fingerprint, check_cache, content_fingerprint, main

ROOT = Path(__file__).resolve().parents[1]
PREP = dict(seed=42, synth_num_images=4, synth_image_size=64, val_fraction=0.25, test_fraction=0.25)
CFG = dict(DATASET="synthetic", SEED=42, SYNTH_NUM_IMAGES=4, SYNTH_IMAGE_SIZE=64, VAL_FRACTION=0.25,
           TEST_FRACTION=0.25)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("run")
    prepare_dataset("synthetic", None, run / "data", progress=False, **PREP)
    return run


def test_manifest_records_inputs_and_content(run_dir):
    manifest = load_manifest(run_dir / "data")
    assert manifest["dataset"] == "synthetic" and manifest["parameters"]["seed"] == 42
    assert manifest["content_fingerprint"] == content_fingerprint(manifest) == cache_fingerprint(manifest)
    older = {k: v for k, v in manifest.items() if k != "content_fingerprint"}  # a cache prepared before this
    assert cache_fingerprint(older) == manifest["content_fingerprint"]
    changed = {**manifest, "checksums": {**manifest["checksums"], "x": {"png": "0"}}}
    assert content_fingerprint(changed) != manifest["content_fingerprint"]


def test_cache_fits_its_own_parameters(run_dir):
    assert check_cache(resolve_config({**CFG, "RUN_DIR": str(run_dir)}))["dataset"] == "synthetic"


@pytest.mark.parametrize("change, match", [
    ({"DATASET": "bccd"}, r"DATASET: cache 'synthetic', this run 'bccd'"),
    ({"SEED": 7}, r"SEED: cache 42, this run 7"),
])
def test_training_refuses_a_cache_made_for_other_parameters(run_dir, change, match):
    """Why (d): a tiny synthetic cache under RUN_DIR/data used to be trained on by a later DATASET='bccd' job."""
    from cellseg.training.session import load_training_data

    cfg = resolve_config({**CFG, **change, "RUN_DIR": str(run_dir)})
    with pytest.raises(CacheMismatch, match=match) as e:
        load_training_data(cfg)
    assert "00_prepare_data" in str(e.value) and "DATA_CACHE" in str(e.value)


def test_preparation_only_parameters_are_compared_where_they_are_known(run_dir):
    """01_train does not declare SYNTH_*/fractions (they keep their defaults there), so training compares DATASET,
    DATA_ROOT and SEED; the batch scripts' check reads the whole parameter file and compares everything."""
    cfg = resolve_config({**CFG, "SYNTH_NUM_IMAGES": 48, "RUN_DIR": str(run_dir)})
    assert check_cache(cfg, notebook="01_train")["dataset"] == "synthetic"
    with pytest.raises(CacheMismatch, match=r"SYNTH_NUM_IMAGES: cache 4, this run 48"):
        check_cache(cfg)


def test_data_root_is_compared_for_real_datasets(tmp_path):
    manifest = {"dataset": "folder", "source": str(tmp_path / "a"), "parameters": {"seed": 42}}
    cfg = resolve_config({"DATASET": "folder", "DATA_ROOT": str(tmp_path / "b"), "SEED": 42})
    from cellseg.data.provenance import cache_differences

    assert cache_differences(cfg, manifest) == [("DATA_ROOT", str(tmp_path / "a"), str((tmp_path / "b").resolve()))]


def test_command_line_exit_codes(run_dir, tmp_path, capsys):
    args = ["-p", "RUN_DIR", str(run_dir)] + [a for k, v in CFG.items() for a in ("-p", k, str(v))]
    assert main(["--", *args]) == 0
    assert main(["--", *args, "-p", "DATASET", "bccd"]) == 4
    assert "DATASET: cache 'synthetic'" in capsys.readouterr().err
    assert main(["--", "-p", "RUN_DIR", str(tmp_path / "none")]) == 3
    assert main(["--", "-p", "NOT_A_PARAM", "1"]) == 2


STUB = r'''
source "$1/slurm/common.sh"
CS_PY="$2"; CS_DATA_CACHE="$3/data"; CS_JOB_DIR="$3"
cs_papermill() { echo "PREPARE $*"; CS_RC=0; }
shift 3
cs_prepare_data "$@"
echo "TRAIN"
'''


@pytest.mark.parametrize("change, prepares", [({}, False), ({"DATASET": "bccd"}, True), ({"SEED": 1}, True)])
def test_sbatch_scripts_prepare_again_instead_of_trusting_manifest_json(run_dir, change, prepares):
    """The scripts used to skip preparation whenever manifest.json existed."""
    values = {**CFG, **change}
    args = ["-p", "RUN_DIR", str(run_dir)] + [a for k, v in values.items() for a in ("-p", k, str(v))]
    out = subprocess.run(["bash", "-c", STUB, "stub", str(ROOT), sys.executable, str(run_dir), *args],
                         capture_output=True, text=True, env={**os.environ, "CELLSEG_PREPARE": "auto"}, cwd=ROOT)
    # after the stub "prepares", the cache still fits its old parameters only: the script then fails, naming them
    text = out.stdout + out.stderr
    assert ("PREPARE 00_prepare_data" in text) == prepares, text
    if prepares:
        assert "prepared for other parameters" in text and out.returncode == 1
        assert "still does not fit the parameters" in text
    else:
        assert "TRAIN" in out.stdout and out.returncode == 0
