"""A process that srun or torchrun did not start per rank runs alone, and says so, even inside a multi-task SLURM
allocation (a Jupyter kernel in `salloc -n 4` or an sbatch-started Jupyter waited forever for ranks)."""

from __future__ import annotations

import pytest

from cellseg.distributed import detect_env

# what an sbatch script, or a Jupyter kernel started from it or from an salloc shell, inherits
ALLOCATION = {"SLURM_JOB_ID": "91", "SLURM_NTASKS": "4", "SLURM_NPROCS": "4", "SLURM_PROCID": "0",
              "SLURM_JOB_NODELIST": "node01", "SLURM_JOB_NAME": "jupyter"}


def test_kernel_in_a_multi_task_allocation_runs_as_one_process_and_says_so():
    env = dict(ALLOCATION)
    d = detect_env(env)
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "none")
    assert "SLURM_NTASKS=4" in d.note and "srun or torchrun" in d.note and "slurm_train_ddp.sh" in d.note
    assert "MASTER_ADDR" not in env  # nothing set up for a rendezvous that would never complete


@pytest.mark.parametrize("rank", [0, 3])
def test_srun_tasks_still_form_the_process_group(rank):
    env = {**ALLOCATION, "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_STEP_ID": "0",
           "SLURM_STEP_NUM_TASKS": "4"}
    d = detect_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher, d.note) == (rank, 4, rank, "slurm", "")


def test_torchrun_wins_over_the_allocation():
    d = detect_env({**ALLOCATION, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (d.rank, d.world_size, d.launcher) == (1, 2, "torchrun")


def test_the_note_reaches_the_run_log(tmp_path, monkeypatch):
    from cellseg.config import resolve_config
    from cellseg.runtime import setup_run

    for k, v in ALLOCATION.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    ctx = setup_run(resolve_config({"RUN_DIR": str(tmp_path / "run"), "DEVICE": "cpu"}, "00_prepare_data"),
                    "00_prepare_data")
    assert ctx.env.world_size == 1
    assert "runs alone (rank 0 of 1)" in (tmp_path / "run" / "logs" / "00_prepare_data.log").read_text()
