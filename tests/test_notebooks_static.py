"""Static checks of the committed notebooks: one literal-only parameters cell first, names equal to the config
fields, defaults equal to the config defaults, no outputs; and the tiny override file is valid for every notebook."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from cellseg.config import NOTEBOOK_PARAMS, Config, resolve_config

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_notebooks_exist():
    assert [p.stem for p in NOTEBOOKS] == ["00_prepare_data", "01_train", "02_evaluate", "03_predict"]


def _code_cells(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_outputs_committed(path):
    for cell in _code_cells(path):
        assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has outputs"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell(path):
    cells = _code_cells(path)
    tagged = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert tagged == [0], f"{path.name}: exactly one parameters cell, the first code cell"
    source = "".join(cells[0]["source"])
    tree = ast.parse(source)
    names, defaults = [], Config()
    for node in tree.body:
        assert isinstance(node, ast.AnnAssign), f"{path.name}: only annotated assignments, got {ast.dump(node)[:60]}"
        name = node.target.id
        value = ast.literal_eval(node.value)  # literals only (raises otherwise)
        assert value == getattr(defaults, name), f"{path.name}: {name} default differs from cellseg.config.Config"
        names.append(name)
    assert names == list(NOTEBOOK_PARAMS[path.stem])
    code_lines = [ln for ln in source.splitlines() if ln and not ln.startswith("#")]
    assert all("  # " in ln for ln in code_lines), "every parameter has a trailing comment"


@pytest.mark.parametrize("config", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.stem)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_config_file_is_valid_for_every_notebook(path, config):
    values = yaml.safe_load(config.read_text())
    for phase in (1, 2):
        resolve_config({**values, "PHASE": phase}, notebook=path.stem)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_papermill_parses_every_parameter(path, caplog):
    """papermill's own parser (used by `--help-notebook` and type translation) must see every parameter: it gives up
    on lines with more than one '=' (so help comments never contain one)."""
    import papermill as pm

    params = pm.inspect_notebook(str(path))
    assert list(params) == list(NOTEBOOK_PARAMS[path.stem])
    assert "Unable to parse" not in caplog.text
