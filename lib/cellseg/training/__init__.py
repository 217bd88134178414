"""Training: the loop (:mod:`trainer`), deterministic sampling (:mod:`sampler`), validation, and the per-cell set-up
functions the notebook and the ``cellseg train`` command share (:mod:`session`)."""

from cellseg.training.trainer import Trainer

__all__ = ["Trainer"]
