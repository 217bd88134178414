"""Every shell command in README.md and HPC_SETUP_GUIDE.md is run by a test or listed as cluster-only (issue 15).

A fenced ``bash`` block is preceded by a marker comment saying which:

- ``<!-- docs-test: run -->``: this test runs each command, in the project root with the test environment first on
  ``PATH``; it must exit 0.
- ``<!-- docs-test: tested-by tests/test_x.py::test_name [tests/test_y.py::test_other ...] -->``: those tests run the
  same commands (they must exist).
- ``<!-- docs-test: cluster-only -->``: needs a cluster, a GPU, conda, gated weights or the internet.

An unmarked block whose every command starts with a SLURM/conda/hf program counts as cluster-only (so sections others
add with ``sbatch`` lines need no marker); any other unmarked block fails this test with its file and line. Every
block is also checked statically: ``bash -n``, scripts and config files it names exist (``configs/my_run.yaml`` is the
documented example of your own file), ``-p NAME`` names a parameter, ``make TARGET`` is a Makefile target.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cellseg.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "HPC_SETUP_GUIDE.md")
MARKER = re.compile(r"<!--\s*docs-test:\s*(run|cluster-only|tested-by\s+(\S+(?:\s+\S+::\S+)*))\s*-->")
CLUSTER_PROGRAMS = {"sbatch", "srun", "squeue", "sacct", "scontrol", "scancel", "sinfo", "conda", "hf", "module",
                    "nvidia-smi", "ssh", "sudo"}
EXAMPLE_FILES = {"configs/my_run.yaml"}  # the guide's example of the user's own parameter file


@dataclasses.dataclass
class Block:
    doc: str
    line: int
    kind: str  # run | cluster-only | tested-by | unmarked
    target: str | None
    commands: list[str]
    text: str = ""  # the block as written (bash -n reads it: loops and $(...) survive)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}"


def _commands(text: str) -> list[str]:
    """Logical command lines: continuation lines joined, comments and blank lines dropped."""
    joined = text.replace("\\\n", " ")
    out = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line, comments=True)
        except ValueError:
            words = line.split()
        if words:
            out.append(shlex.join(words))
    return out


def blocks() -> list[Block]:
    found = []
    for doc in DOCS:
        lines = (ROOT / doc).read_text().splitlines()
        i = 0
        while i < len(lines):
            if lines[i].strip() in ("```bash", "```sh", "```shell"):
                start, body = i, []
                i += 1
                while i < len(lines) and lines[i].strip() != "```":
                    body.append(lines[i])
                    i += 1
                prev = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
                m = MARKER.fullmatch(prev)
                kind = "unmarked" if m is None else m.group(1).split()[0]
                found.append(Block(doc, start + 1, kind, m.group(2) if m else None, _commands("\n".join(body)),
                                   "\n".join(body)))
            i += 1
    return found


def _program(cmd: str) -> str:
    """The program a command line starts (after VAR=value assignments and `x=$(`)."""
    words = shlex.split(cmd)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        value = words.pop(0).split("=", 1)[1]
        if value.startswith("$("):
            return value[2:].split()[0] if value[2:].split() else ""
    return words[0] if words else ""


BLOCKS = blocks()


def test_every_block_is_run_tested_or_cluster_only():
    assert len(BLOCKS) >= 10
    problems = [f"{b}: unmarked block starting `{b.commands[0]}`; put <!-- docs-test: run -->, <!-- docs-test: "
                f"tested-by tests/FILE.py::TEST --> or <!-- docs-test: cluster-only --> on the line above it"
                for b in BLOCKS if b.kind == "unmarked" and b.commands
                and not all(_program(c) in CLUSTER_PROGRAMS for c in b.commands)]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "tested-by"], ids=str)
def test_tested_by_names_an_existing_test(block):
    for target in block.target.split():
        path, _, name = target.partition("::")
        assert (ROOT / path).is_file(), f"{block}: {path} does not exist"
        assert re.search(rf"^def {re.escape(name)}\(", (ROOT / path).read_text(), re.M), f"{block}: no {name} in {path}"


@pytest.mark.parametrize("block", BLOCKS, ids=str)
def test_commands_are_well_formed(block):
    out = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    assert out.returncode == 0, f"{block}: {out.stderr}"
    fields = {f.name for f in dataclasses.fields(Config)}
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    for cmd in block.commands:
        words = shlex.split(cmd)
        for k, w in enumerate(words):
            if w in ("-p", "-r") and k + 1 < len(words) and _program(cmd) not in ("conda", "mkdir"):
                assert words[k + 1] in fields, f"{block}: `{cmd}` sets unknown parameter {words[k + 1]}"
            if re.fullmatch(r"(slurm|tools|configs|notebooks)/[\w./-]+\.(sh|py|yaml|ipynb)", w):
                assert w in EXAMPLE_FILES or (ROOT / w).exists(), f"{block}: `{cmd}` names missing {w}"
        if _program(cmd) == "make":
            for w in words[1:]:
                if "=" not in w and not w.startswith("-"):
                    assert w in targets, f"{block}: make target {w} does not exist"


@pytest.mark.parametrize("block", [b for b in BLOCKS if b.kind == "run"], ids=str)
def test_runnable_blocks_run(block):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "lib"), os.environ.get("PYTHONPATH", "")]),
           "VENV": sys.prefix}
    for cmd in block.commands:
        # `make` here must use this environment, not build .venv
        if _program(cmd) == "make":
            cmd = cmd.replace("make ", f"make PYTHON={shlex.quote(sys.executable)} ", 1)
        out = subprocess.run(cmd, shell=True, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"{block}: `{cmd}` exited {out.returncode}:\n{out.stdout[-1500:]}{out.stderr[-1500:]}"
