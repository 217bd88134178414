"""Chaos: a tiny training run (the real Trainer, CheckpointManager and StopRequest) is killed with SIGKILL at random
moments and inside saves (before a payload rename, and between a payload and its sidecar), restarted each time with
RESUME='auto', and must end with exactly the weights, optimizer state and history of an uninterrupted run; SIGTERM
saves latest within one step, exits 0, records the reason, and the next run resumes from that step.

Every run is its own process driving ``cellseg.training.trainer.Trainer`` the way ``cellseg train`` does, on the
in-memory ToyDataset. To keep the test fast, the processes are forked from a "zygote" process that has imported
torch, timm, peft and cellseg once (3-5 s per fresh interpreter otherwise) and has run no torch op; each run writes
its output to its own log file, and SIGKILL / SIGTERM go straight to its pid.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from cellseg.checkpoint import read_ledger, read_sidecar

TESTS = Path(__file__).resolve().parent

_ZYGOTE = textwrap.dedent("""
    import json, logging, os, sys, traceback
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from toydata import ToyDataset
    from cellseg.checkpoint import CheckpointManager
    import cellseg.checkpoint.manager as manager_mod
    from cellseg.config import resolve_config
    from cellseg.distributed import DistEnv
    from cellseg.losses import loss_from_config
    from cellseg.model import build_model_from_config
    from cellseg.optim import configure_phase
    from cellseg.runtime import RunContext, seed_everything
    from cellseg.stopping import StopRequest
    from cellseg.training.trainer import Trainer


    def run(root, kill_at):
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s", force=True)
        if kill_at:  # die inside a save: right before the kill_at-th rename (a payload or its sidecar)
            real_commit, calls = manager_mod.commit, [0]

            def commit(tmp, target, **kw):
                calls[0] += 1
                if calls[0] == kill_at:
                    print("KILLING at commit", calls[0], target.name, flush=True)
                    os.kill(os.getpid(), 9)
                return real_commit(tmp, target, **kw)

            manager_mod.commit = commit
        cfg = resolve_config(dict(
            ENCODER="test_vit", ENCODER_WEIGHTS="", DECODER_WIDTH=8, PATCH_SIZE=32, DEVICE="cpu", NUM_WORKERS=0,
            BATCH_SIZE=2, GRAD_ACCUM_TARGET=4, EPOCHS=4, PRECISION="fp32", LOG_EVERY=1, SCHEDULER="cosine_warmup",
            WARMUP_STEPS=2, PATIENCE_P1=0, SEED=3, DETERMINISTIC=True, SAVE_EVERY_STEPS=1, KEEP_LAST=2,
            RESUME="auto", RUN_DIR=str(root / "run"), CHECKPOINT_DIR=str(root / "ck")))
        seed_everything(cfg.SEED, cfg.DETERMINISTIC)
        model = build_model_from_config(cfg, num_classes=2)
        configure_phase(model, cfg)
        loss_fn = loss_from_config(cfg, 2)
        val = [ToyDataset(n=2, size=32, seed=9)[i] for i in range(2)]

        @torch.no_grad()
        def validate(model, epoch):
            model.eval()
            total = sum(float(loss_fn(model(v["image"][None]), {{k: t[None] for k, t in v.items()}})["total"])
                        for v in val)
            return {{"pq": -total}}

        ctx = RunContext(cfg, DistEnv(), torch.device("cpu"), Path(cfg.RUN_DIR))
        ckpt = CheckpointManager(cfg.checkpoint_dir(), phase=1, keep_last=cfg.KEEP_LAST)
        stop = StopRequest(list(cfg.STOP_SIGNALS), stop_file=ctx.run_dir / "STOP", file_check_interval=0).install()
        trainer = Trainer(ctx, model, loss_fn, ToyDataset(n=8, size=32), validate_fn=validate, ckpt=ckpt, stop=stop)
        trainer.resume()
        print("TRAINING from step", trainer.progress["step"], flush=True)
        summary = trainer.fit()
        print("SUMMARY", json.dumps({{k: summary[k] for k in ("steps", "stopped")}}), flush=True)


    os.write(1, b"READY\\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        if "wait" in cmd:
            _, status = os.waitpid(cmd["wait"], 0)
            os.write(1, f"EXIT {{os.waitstatus_to_exitcode(status)}}\\n".encode())
            continue
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                fd = os.open(cmd["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                sys.stdout = sys.stderr = open(1, "w", buffering=1, closefd=False)
                os.environ["PYTHONHASHSEED"] = "0"
                run(Path(cmd["root"]), int(cmd.get("kill_at", 0)))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                os._exit(code)
        os.write(1, f"PID {{pid}}\\n".encode())
""")


class Zygote:
    """Forks training runs from one pre-imported interpreter; each run logs to its own file."""

    def __init__(self, tmp: Path):
        script = tmp / "zygote.py"
        script.write_text(_ZYGOTE.format(tests=str(TESTS)))
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env)
        line = self.proc.stdout.readline()
        if line.strip() != "READY":
            raise RuntimeError(f"zygote failed to start: {line}{self.proc.stderr.read()}")
        self.tmp, self.n = tmp, 0

    def _ask(self, cmd: dict) -> str:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def start(self, root: Path, kill_at: int = 0) -> tuple[int, Path]:
        self.n += 1
        log = self.tmp / f"run{self.n}.log"
        reply = self._ask({"root": str(root), "kill_at": kill_at, "log": str(log)})
        assert reply.startswith("PID "), reply
        return int(reply.split()[1]), log

    def wait(self, pid: int) -> int:
        reply = self._ask({"wait": pid})
        assert reply.startswith("EXIT "), reply
        return int(reply.split()[1])

    def run(self, root: Path, kill_at: int = 0) -> tuple[int, str]:
        pid, log = self.start(root, kill_at)
        return self.wait(pid), log.read_text()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def _follow(log: Path, until, timeout: float = 120.0) -> bool:
    """Read ``log`` as it grows until ``until(line)`` is true for a line; False on timeout."""
    end, pos, buf = time.monotonic() + timeout, 0, ""
    while time.monotonic() < end:
        if log.exists():
            with open(log) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            buf += chunk
            *lines, buf = buf.split("\n")
            if any(until(line) for line in lines):
                return True
        time.sleep(0.005)
    return False


def _is_step_line(line: str) -> bool:
    return " step " in line and " loss " in line  # the loop's per-step log line (LOG_EVERY=1)


def _final(root: Path) -> dict:
    return torch.load(root / "ck" / "phase1" / "latest.pt", map_location="cpu", weights_only=True)


def _assert_equal_trees(a, b, where="payload"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal_trees(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal_trees(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_sigkill_at_random_moments_and_during_saves_gives_the_uninterrupted_result(zygote, tmp_path):
    ref_pid, ref_log = zygote.start(tmp_path / "ref")  # runs alongside the chaos
    rng = random.Random(20240601)
    chaos_root = tmp_path / "chaos"
    # (kind, n): 'commit' = die right before the n-th rename of that run; 'step' = SIGKILL a random moment (0-0.2 s)
    # after the n-th optimizer step of that run. The first three are deterministic (2 optimizer steps per epoch; a
    # step save renames latest.pt + sidecar, an epoch-end save epoch_XXXX, best, then latest, each + sidecar):
    #   1. dies between the first latest.pt and its sidecar -> rejected ('sidecar missing'), fresh start
    #   2. the step-1 save completes, the epoch-end save dies before its first rename -> mid-epoch resume at step 1
    #   3. resumed at step 1, dies between the new latest.pt and its sidecar -> latest rejected (size/hash mismatch),
    #      resume falls back to epoch_0001.pt, which holds the same state
    kills = [("commit", 2), ("commit", 3), ("commit", 6), ("step", 1), ("commit", 5), ("step", 2)]
    outcomes = []
    for kind, n in kills:
        pid, log = zygote.start(chaos_root, kill_at=n if kind == "commit" else 0)
        if kind == "step":
            seen = [0]

            def nth_step(line, seen=seen, n=n):
                seen[0] += _is_step_line(line)
                return seen[0] >= n

            if _follow(log, nth_step):
                time.sleep(rng.uniform(0.0, 0.2))
                os.kill(pid, signal.SIGKILL)
        code = zygote.wait(pid)
        assert code in (-signal.SIGKILL, 0), log.read_text()
        outcomes.append(code)
        if code == 0:
            break
    if outcomes[-1] != 0:  # the last, uninterrupted restart
        code, text = zygote.run(chaos_root)
        assert code == 0, text
    assert zygote.wait(ref_pid) == 0, ref_log.read_text()

    a, b = _final(tmp_path / "ref"), _final(chaos_root)
    assert a["progress"]["epoch"] == 4 and b["progress"]["step"] == a["progress"]["step"] == 8
    for part in ("model", "optimizer", "scheduler", "progress"):
        _assert_equal_trees(a[part], b[part], part)
    ledger = read_ledger(chaos_root / "ck" / "phase1")
    for r in ledger:  # shown on failure: what the kills did
        print(r["event"], r.get("file", ""), r.get("reason", ""), r.get("step", ""), r.get("batch_in_epoch", ""))
    loads = [r for r in ledger if r["event"] == "load"]
    assert len(loads) >= 3, "the chaos run hardly resumed: the kills did not interrupt it"
    rejects = [(Path(r["file"]).name, r["reason"].split(" (")[0]) for r in ledger
               if r["event"] == "reject" and r["reason"] != "missing"]
    assert rejects[:2] in ([("latest.pt", "sidecar missing"), ("latest.pt", "size mismatch")],
                           [("latest.pt", "sidecar missing"), ("latest.pt", "hash mismatch")]), rejects
    assert loads[0]["step"] == 1 and loads[0]["batch_in_epoch"] == 2, "the second restart must resume mid-epoch"
    assert Path(loads[1]["file"]).name == "epoch_0001.pt" and loads[1]["step"] == 2, loads[1]


def test_sigterm_saves_latest_within_one_step_exits_0_and_resumes_there(zygote, tmp_path):
    root = tmp_path / "run1"
    pid, log = zygote.start(root)
    seen = [0]

    def second_step(line):
        seen[0] += _is_step_line(line)
        return seen[0] >= 2

    assert _follow(log, second_step), log.read_text()
    os.kill(pid, signal.SIGTERM)
    assert zygote.wait(pid) == 0, log.read_text()
    side = read_sidecar(root / "ck" / "phase1" / "latest.pt")
    assert side["reason"] == "stop: signal SIGTERM" and side["step"] in (2, 3)  # within one step of the signal
    stops = [r for r in read_ledger(root / "ck" / "phase1") if r["event"] == "stop"]
    assert stops and stops[-1]["reason"] == "signal SIGTERM" and stops[-1]["step"] == side["step"]
    status = json.loads((root / "run" / "phase1" / "status.json").read_text())
    assert status["status"] == "preempted" and status["resumable"] is True
    code, text = zygote.run(root)
    assert code == 0, text
    assert f"TRAINING from step {side['step']}" in text
    assert json.loads((root / "run" / "phase1" / "status.json").read_text())["status"] == "finished"
