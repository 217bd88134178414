"""Checkpoints that survive anything: atomic, exactly resumable, preemption-safe, LoRA-aware, and never loading the
wrong thing silently (issue 4). See :class:`CheckpointManager` for the files of a phase directory."""

from cellseg.checkpoint.compat import IncompatibleCheckpoint
from cellseg.checkpoint.contents import WeightsOnlyCheckpoint
from cellseg.checkpoint.keys import canonical_state_dict, canonicalize, strip_wrappers, unwrap_model
from cellseg.checkpoint.ledger import Ledger, read_ledger
from cellseg.checkpoint.manager import CheckpointManager
from cellseg.checkpoint.phase2 import init_phase2
from cellseg.checkpoint.sidecar import FORMAT_VERSION, CorruptCheckpoint, read_sidecar
from cellseg.checkpoint.state import collect_rng, collect_state, restore_rng
from cellseg.checkpoint.weights import LoadReport, check_compatibility, load_weights

__all__ = [
    "CheckpointManager", "WeightsOnlyCheckpoint", "init_phase2", "collect_state", "load_weights", "LoadReport", "check_compatibility",
    "IncompatibleCheckpoint", "CorruptCheckpoint", "FORMAT_VERSION", "read_sidecar", "Ledger", "read_ledger",
    "collect_rng", "restore_rng", "canonical_state_dict", "canonicalize", "strip_wrappers", "unwrap_model",
]
