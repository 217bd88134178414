"""Which names a notebook's parameters cell set, read from the kernel's input history instead of from ``globals()``.

A live Jupyter kernel holds every variable of every cell that ran (``epoch``, ``stats``, ``trainer``, ...). Reading
the parameters as "every literal global" made the validation cell call those typos on the second "Run All". IPython
keeps the source of each executed cell in ``In`` (the current cell last): the parameters are the names assigned in the
most recent run of parameter cells before the current one, i.e. the ``parameters`` cell and, under papermill, the
injected-parameters cell right after it. A parameter cell is one made only of ``NAME = literal`` /
``NAME: type = literal`` lines, as the notebook rules require.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence


def assigned_literals(source: str) -> list[str] | None:
    """The names a cell of literal assignments sets, in order; None when the cell is anything else (or empty)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names: list[str] = []
    for stmt in tree.body:
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.value is not None:
            target, value = stmt.target, stmt.value
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            target, value = stmt.targets[0], stmt.value
        else:
            return None
        try:
            ast.literal_eval(value)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            return None
        names.append(target.id)
    return names or None


PAPERMILL_MARKER = "# Parameters"  # first line of the cell papermill injects after the parameters cell


def parameter_cell_names(history: Sequence[str], known: Iterable[str]) -> list[str] | None:
    """The names set by the latest run of the ``parameters`` cell in ``history`` (IPython's ``In``; its last entry
    is the cell running now), plus those of papermill's injected cell when it ran right after it (typos included, so
    they are still reported).

    The parameters cell is the latest literal-only cell that sets a ``known`` name and is not papermill's; cells that
    ran since (the epoch loop's ``epoch``, a scratch ``x = 1``) are not parameters.

    Returns None when the history holds no such cell (then the caller falls back to the namespace).
    """
    known = set(known)
    for i in range(len(history) - 2, -1, -1):  # skip the current cell
        names = _names_of(history[i])
        if names is None or not known.intersection(names) or _injected(history[i]):
            continue
        after = history[i + 1] if i + 1 < len(history) - 1 else None
        injected = _names_of(after) if after is not None and _injected(after) else None
        return list(dict.fromkeys(names + (injected or [])))
    return None


def _injected(cell: object) -> bool:
    return isinstance(cell, str) and cell.strip().splitlines()[:1] == [PAPERMILL_MARKER]


def _names_of(cell: object) -> list[str] | None:
    return assigned_literals(cell) if isinstance(cell, str) else None


__all__ = ["assigned_literals", "parameter_cell_names"]
