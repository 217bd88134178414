"""The validation cell reads the parameters cell's own names, so a live kernel survives "Run All" twice, while a
papermill typo is still caught. Runs the notebooks' real parameters and validation code in a real IPython shell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cellseg.config import ConfigError
from cellseg.notebook_params import assigned_literals, parameter_cell_names

ROOT = Path(__file__).resolve().parents[1]


def _cells(notebook: str) -> tuple[str, str]:
    """(parameters cell, the validation cell's resolve_config line) of a notebook."""
    nb = json.loads((ROOT / "notebooks" / f"{notebook}.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    check = [ln for ln in code[1].splitlines() if ln.startswith(("from cellseg.config", "cfg = resolve_config"))]
    return code[0], "\n".join(check)


@pytest.fixture
def shell():
    """An in-process IPython shell; it replaces ``sys.modules['__main__']`` (spawned processes of later tests need the
    real one) and may touch the SIGINT handler, so both are put back."""
    import signal
    import sys

    from IPython.core.interactiveshell import InteractiveShell

    main, sigint = sys.modules["__main__"], signal.getsignal(signal.SIGINT)
    sh = InteractiveShell.instance()
    sh.reset(new_session=True)
    try:
        yield sh
    finally:
        sh.reset(new_session=True)
        InteractiveShell.clear_instance()
        sys.modules["__main__"] = main
        signal.signal(signal.SIGINT, sigint)


def _run(sh, source: str):
    result = sh.run_cell(source, store_history=True)
    return result.error_in_exec or result.error_before_exec


@pytest.mark.parametrize("notebook", ["00_prepare_data", "01_train", "02_evaluate"])
def test_run_all_twice_in_a_live_kernel(shell, notebook):
    params, validate = _cells(notebook)
    later = "epoch = 3\nstats = {'total': 0.5}\nsummary = 'done'\nmodel_name = 'x'\n"  # what later cells leave behind
    for _ in range(2):  # "Run All", then "Run All" again in the same kernel
        assert _run(shell, params) is None
        error = _run(shell, validate)
        assert error is None, error
        assert _run(shell, later) is None
    assert shell.user_ns["cfg"].RUN_DIR == "runs/bccd_uni"


def test_rerunning_the_validation_cell_alone_finds_the_parameters(shell):
    params, validate = _cells("01_train")
    for source in (params, validate, "epoch = 1", "x = [1, 2]", "print(epoch)"):
        assert _run(shell, source) is None
    assert _run(shell, params.replace("EPOCHS: int = 50", "EPOCHS: int = 7")) is None
    assert _run(shell, "stats = 1") is None
    assert _run(shell, validate) is None
    assert shell.user_ns["cfg"].EPOCHS == 7


def test_papermill_injected_typo_is_still_caught(shell):
    params, validate = _cells("01_train")
    assert _run(shell, params) is None
    assert _run(shell, "# Parameters\nEPOHCS = 3\nDEVICE = \"cpu\"\n") is None  # papermill's injected cell
    error = _run(shell, validate)
    assert isinstance(error, ConfigError) and "EPOHCS" in str(error) and "epoch" not in str(error)


def test_parameter_cells_are_literal_assignments_only():
    assert assigned_literals("# c\nA: int = 1  # x\nB = [1, 'a']\nC = -2.5\n") == ["A", "B", "C"]
    for source in ("A = f(1)", "A = B = 1", "print(1)", "", "A: int", "import os", "A = 1\nx.y = 2", "A = ("):
        assert assigned_literals(source) is None, source
    history = ["", "RUN_DIR = 'a'\nSEED = 1", "# Parameters\nEPOHCS = 3\n", "cfg = make()", "x = 1", "current cell"]
    assert parameter_cell_names(history, ["RUN_DIR", "SEED"]) == ["RUN_DIR", "SEED", "EPOHCS"]
    assert parameter_cell_names(["", "x = 1", "now"], ["RUN_DIR"]) is None
    # literal-only cells that ran before or after the parameters cell are not parameters
    assert parameter_cell_names(["", "epoch = 3", "RUN_DIR = 'a'", "stats = 1", "now"], ["RUN_DIR"]) == ["RUN_DIR"]
    # papermill's cell with known names is not mistaken for the parameters cell
    history = ["", "RUN_DIR = 'a'\nSEED = 1", "# Parameters\nSEED = 3\n", "now"]
    assert parameter_cell_names(history, ["RUN_DIR", "SEED"]) == ["RUN_DIR", "SEED"]
