"""Optimal one-to-one assignment on a sparse bipartite graph, one small Hungarian problem per connected component.

HoVer-Net's ``get_fast_aji_plus`` and ``pair_coordinates`` run ``scipy.optimize.linear_sum_assignment`` on the full
dense (n_gt x n_pred) matrix, cubic in the number of instances. Instances only interact with the few they overlap
(or lie near), so the graph splits into small components and the optimum of the whole is the union of the optima of
the components. Components with a single row or column are solved by a vectorised argmax.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components


def assign_max_weight(
    rows: np.ndarray, cols: np.ndarray, weights: np.ndarray, n_rows: int, n_cols: int
) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-weight matching over the given edges (weights > 0). Returns the indices of the chosen edges, as
    (row, col) pairs sorted by row. Ties between equally good matchings are broken arbitrarily.

    Shape: (E,), (E,), (E,) -> (M,), (M,).
    """
    rows = np.asarray(rows, dtype=np.int64)
    cols = np.asarray(cols, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    if rows.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    graph = coo_matrix(
        (np.ones(rows.size), (rows, cols + n_rows)), shape=(n_rows + n_cols, n_rows + n_cols)
    ).tocsr()
    _, comp_of_node = connected_components(graph, directed=False)
    comp = comp_of_node[rows]
    n_comp = int(comp.max()) + 1
    rows_per_comp = np.bincount(comp_of_node[:n_rows][np.unique(rows)], minlength=n_comp)
    cols_per_comp = np.bincount(comp_of_node[n_rows:][np.unique(cols)], minlength=n_comp)
    simple = (rows_per_comp[comp] == 1) | (cols_per_comp[comp] == 1)
    out_r: list[np.ndarray] = []
    out_c: list[np.ndarray] = []
    # Star-shaped components: the single best edge is optimal.
    idx = np.flatnonzero(simple)
    if idx.size:
        order = idx[np.lexsort((-weights[idx], comp[idx]))]
        _, first = np.unique(comp[order], return_index=True)
        best = order[first]
        out_r.append(rows[best])
        out_c.append(cols[best])
    idx = np.flatnonzero(~simple)
    if idx.size:
        order = idx[np.argsort(comp[idx], kind="stable")]
        bounds = np.flatnonzero(np.diff(comp[order])) + 1
        for group in np.split(order, bounds):
            ur, r_local = np.unique(rows[group], return_inverse=True)
            uc, c_local = np.unique(cols[group], return_inverse=True)
            dense = np.zeros((ur.size, uc.size))
            dense[r_local, c_local] = weights[group]
            ri, ci = linear_sum_assignment(dense, maximize=True)
            real = dense[ri, ci] > 0
            out_r.append(ur[ri[real]])
            out_c.append(uc[ci[real]])
    r = np.concatenate(out_r)
    c = np.concatenate(out_c)
    order = np.argsort(r, kind="stable")
    return r[order], c[order]
