"""Failing together, with two gloo ranks on the CPU: a NaN loss or an exception on one rank stops both ranks at the
same step, nobody waits for a collective timeout, and status.json says 'failed' with the reason and the rank."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from pathlib import Path

import pytest
import torch

from cellseg.distributed import DistEnv
from test_training import _free_port, make_trainer

FAULTS = {"nan": ["FloatingPointError", "non-finite loss"],
          "exception": ["RuntimeError", "simulated CUDA error on rank 1"]}


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        for fault in FAULTS:  # one process group for both cases: a failure that all ranks saw leaves it usable
            out = Path(out_dir) / fault
            out.mkdir(parents=True, exist_ok=True)
            t = make_trainer(out, n=16, BATCH_SIZE=2, GRAD_ACCUM_TARGET=4, EPOCHS=1, env=DistEnv(rank, 2, rank, "test"))
            real, calls = t.loss_fn, [0]

            def faulty(o, batch, real=real, calls=calls, fault=fault):
                calls[0] += 1
                losses = real(o, batch)
                if rank == 1 and calls[0] == 3:  # third optimizer step (one micro-batch per step and rank)
                    if fault == "nan":
                        return {**losses, "total": losses["total"] * float("nan")}
                    raise RuntimeError("simulated CUDA error on rank 1")
                return losses

            t.loss_fn = faulty
            try:
                t.train_one_epoch(0)
                (out / f"rank{rank}.txt").write_text("finished without error")
            except Exception as e:  # noqa: BLE001 - the test reads what each rank saw
                (out / f"rank{rank}.txt").write_text(f"{type(e).__name__}: {e}\nstep {t.progress['step']}\n"
                                                    + traceback.format_exc())
    finally:
        torch.distributed.destroy_process_group()


def test_one_failing_rank_stops_every_rank_and_says_which(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.time() + 240  # starting the processes is most of it; a collective timeout would be 30 minutes
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} were still waiting for the failed rank"
    for fault, words in FAULTS.items():
        seen = {r: (tmp_path / fault / f"rank{r}.txt").read_text() for r in (0, 1)}
        assert seen[1].startswith("RankFailure: rank 1 of 2 failed in the forward pass or loss at epoch 0, step 2")
        assert seen[0].startswith("RankFailure: rank 0 stops because rank 1 of 2 failed")
        for text in seen.values():
            assert "\nstep 2\n" in text  # both stopped at the same optimizer step
            for w in words:
                assert w in text.splitlines()[0], w
        status = json.loads((tmp_path / fault / "run" / "phase1" / "status.json").read_text())
        assert status["status"] == "failed" and status["rank"] == 1 and status["resumable"] is False
        assert all(w in status["reason"] for w in words) and "rank 1 of 2" in status["reason"]


def test_single_process_failure_is_recorded_in_status(tmp_path):
    t = make_trainer(tmp_path)
    real = t.loss_fn
    t.loss_fn = lambda o, b: {**real(o, b), "total": real(o, b)["total"] * float("nan")}
    with pytest.raises(FloatingPointError, match="non-finite loss at epoch 0"):
        t.train_one_epoch(0)
    status = json.loads((tmp_path / "run" / "phase1" / "status.json").read_text())
    assert status["status"] == "failed" and status["rank"] == 0 and "non-finite loss" in status["reason"]
