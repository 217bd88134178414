"""Phase 2's starting weights: Phase 1's ``best.pt``, else its ``latest.pt`` (``INIT_FROM``), loaded into the
LoRA-wrapped network. Never a silent random start: without a Phase 1 checkpoint it is an error unless the user asks
for ``INIT_FROM='fresh'``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from cellseg.checkpoint.layout import BEST, LATEST
from cellseg.checkpoint.ledger import Ledger
from cellseg.checkpoint.sidecar import CorruptCheckpoint, read_payload, read_sidecar, verify_file
from cellseg.checkpoint.state import rank_and_world
from cellseg.checkpoint.weights import check_compatibility, load_weights

log = logging.getLogger(__name__)


def init_phase2(model: nn.Module, phase1_dir: str | Path, init_from: str = "auto", *, strict: bool = True,
                merge_lora: bool = False, ledger_dir: str | Path | None = None,
                is_main: bool | None = None) -> Path | None:
    """Phase 2's starting weights (``INIT_FROM``), loaded after LoRA has been applied to ``model``.

    'auto': Phase 1's ``best.pt``, else its ``latest.pt`` (each validated against its sidecar), saying which;
    'fresh': None, no weights loaded (logged loudly); a path: that file. Weights only: a new phase gets a new
    optimizer. Every rank calls it; the ledger line (in ``ledger_dir``) is written by rank 0 only (``is_main``
    defaults to "rank 0 of the process group, or no process group").

    Raises:
        FileNotFoundError: 'auto' finds no valid Phase 1 checkpoint, or the path does not exist.
        IncompatibleCheckpoint: the checkpoint does not fit the network.
        ValueError: ``init_from`` is none of the accepted forms.
    """
    if is_main is None:  # every rank loads the weights; only rank 0 writes the ledger
        is_main = rank_and_world()[0] == 0
    ledger = Ledger(Path(ledger_dir), enabled=is_main) if ledger_dir is not None else None

    def record(event: str, **fields: Any) -> None:
        if ledger is not None:
            ledger.append(event, phase=2, **fields)

    phase1_dir = Path(phase1_dir)
    if init_from == "fresh":
        log.warning("INIT_FROM='fresh': Phase 2 starts WITHOUT Phase 1's decoder weights (the encoder keeps its "
                    "pretrained weights, the decoder is random). This is what you asked for; it is rarely what you want.")
        record("init", source="fresh")
        return None
    if init_from == "auto":
        candidates = [phase1_dir / BEST, phase1_dir / LATEST]
    elif str(init_from).endswith(".pt"):
        if not Path(init_from).exists():
            raise FileNotFoundError(f"INIT_FROM={init_from!r}: no such file. Give an existing .pt checkpoint, 'auto' "
                                    f"(Phase 1's best.pt, else latest.pt in {phase1_dir}) or 'fresh'.")
        candidates = [Path(init_from)]
    else:
        raise ValueError(f"INIT_FROM must be 'auto', 'fresh' or a path to a .pt file, got {init_from!r}.")
    rejected = []
    for path in candidates:
        try:
            if not path.exists():
                raise CorruptCheckpoint(path, "missing")
            try:
                side = read_sidecar(path)
            except CorruptCheckpoint:
                if init_from == "auto":
                    raise
                side = None
            if side is not None:
                check_compatibility(side, model, strict=strict, merge_lora=merge_lora, path=path,
                                    checkpoint_dir=path.parent)
                verify_file(path, side)
            payload = read_payload(path)
        except CorruptCheckpoint as e:
            rejected.append(f"{path.name}: {e.reason}")
            if path.exists():
                log.warning("INIT_FROM: %s", e)
            record("reject", file=str(path), reason=e.reason, detail=e.detail)
            if init_from != "auto":
                raise
            continue
        report = load_weights(model, payload, strict=strict, merge_lora=merge_lora, checkpoint_dir=path.parent,
                              source_name=str(path))
        del payload
        which = "best" if path.name == BEST and init_from == "auto" else ("latest, as Phase 1 has no valid best.pt"
                                                                          if init_from == "auto" else "INIT_FROM")
        log.info("Phase 2 starts from %s (%s): %d tensors loaded%s", path, which, len(report.loaded),
                 f", {len(report.adapters_kept)} LoRA adapter tensors fresh" if report.adapters_kept else "")
        record("init", source=str(path), which=which, loaded=len(report.loaded), rejected=rejected)
        return path
    raise FileNotFoundError(
        f"INIT_FROM='auto' found no valid Phase 1 checkpoint in {phase1_dir} ({'; '.join(rejected)}). Run Phase 1 first "
        "(PHASE=1), point INIT_FROM at a .pt file, or set INIT_FROM='fresh' to start Phase 2 without Phase 1's weights.")
