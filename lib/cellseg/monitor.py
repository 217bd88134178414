"""The validation metrics that ``MONITOR_METRIC`` may name, each with the direction that means better.

best.pt, early stopping and the plateau schedule all follow ``MONITOR_METRIC`` in ``MONITOR_MODE``: a loss watched in
'max' mode keeps the worst epoch as best.pt and stops on improvement. So the name is checked when the configuration
is built (not after the first epoch), and the mode must agree with the metric. The table lists what
:func:`cellseg.training.validation.run_validation` returns (a test runs it and compares); counts such as ``det_tp``
are left out: they grow with the data, not with quality.
"""

from __future__ import annotations

_QUALITY = ("pq", "sq", "rq", "bpq", "mpq", "mpq_plus", "aji", "aji_plus", "dice", "mdice", "miou", "map", "ap50",
            "ap75", "det_f1", "det_precision", "det_recall", "det_centroid_f1", "det_centroid_precision",
            "det_centroid_recall", "bpq_incl_empty_gt", "mpq_gt_or_pred", "ap50_agnostic", "ap75_agnostic",
            "map_agnostic")
_LOSSES = ("val_loss", "val_loss_np", "val_loss_hv", "val_loss_nc")

# metric -> the MONITOR_MODE under which a change of it is an improvement
MONITOR_MODES: dict[str, str] = {**{m: "max" for m in _QUALITY}, **{m: "min" for m in _LOSSES}}
# numbers validation also returns that are not a measure of quality
NOT_MONITORABLE = ("det_tp", "det_fp", "det_fn", "n_images", "match_radius")


def check_monitor(metric: str, mode: str) -> str | None:
    """None when ``metric`` is a validation metric and ``mode`` its direction; otherwise the error message."""
    if metric not in MONITOR_MODES:
        return (f"MONITOR_METRIC must be one of the validation metrics {sorted(MONITOR_MODES)}, got {metric!r}. "
                f"Set it in the parameters cell, in the -f YAML file, or with `-p MONITOR_METRIC ...`.")
    want = MONITOR_MODES[metric]
    if mode != want:
        kind = "a loss: lower is better" if want == "min" else "higher is better"
        return (f"MONITOR_METRIC={metric!r} is {kind}, but MONITOR_MODE={mode!r}: best.pt would keep the worst epoch "
                f"and early stopping would fire on improvement. Set MONITOR_MODE={want!r} (`-p MONITOR_MODE {want}`).")
    return None


__all__ = ["MONITOR_MODES", "NOT_MONITORABLE", "check_monitor"]
