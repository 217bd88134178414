"""Failing together in DDP: an error on one rank stops every rank at the same point, with the failing rank's reason.

Without it a rank whose loss turned NaN (or whose data loader or forward pass raised) leaves, while the others sit in
the next gradient all-reduce until the NCCL timeout (30 minutes by default, then an unhelpful watchdog error) or the
time limit. Each training micro-batch therefore meets at two cheap checkpoints, after loading and after the loss,
where every rank says whether it failed (one small all-reduce); if any did, all of them raise
:class:`RankFailure` naming the first failing rank and its error, and rank 0 writes ``status.json`` 'failed'.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RankFailure(RuntimeError):
    """Raised on every rank when one rank failed; ``rank`` is the first failing rank, ``reason`` its error."""

    def __init__(self, message: str, *, rank: int, reason: str):
        super().__init__(message)
        self.rank, self.reason = rank, reason


def describe_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def fail_together(error: BaseException | None, *, where: str) -> None:
    """A collective every rank calls at the same point, with its own error or None.

    Single process: re-raises ``error`` as it is. Several ranks: returns when no rank failed; otherwise raises
    :class:`RankFailure` on every rank (chained to the local error where there is one).

    Raises:
        BaseException: ``error`` itself without a process group.
        RankFailure: in a process group, when any rank passed an error.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if error is not None:
            raise error
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    flags = torch.zeros(world, dtype=torch.float32, device=device)
    flags[rank] = 1.0 if error is not None else 0.0
    dist.all_reduce(flags)
    failed = [r for r, f in enumerate(flags.tolist()) if f > 0]
    if not failed:
        return
    reasons: list = [None] * world
    dist.all_gather_object(reasons, describe_error(error) if error is not None else None)
    first = failed[0]
    also = f" (ranks {failed[1:]} failed too)" if len(failed) > 1 else ""
    text = f"rank {first} of {world} failed {where}: {reasons[first]}{also}"
    if error is not None:
        raise RankFailure(text, rank=first, reason=reasons[first]) from error
    raise RankFailure(f"rank {rank} stops because {text}", rank=first, reason=reasons[first])


__all__ = ["RankFailure", "fail_together", "describe_error"]
