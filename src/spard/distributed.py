"""The few collectives the defenses need, as no-ops in a single process.

SPARD and SafeGrad compute a second gradient outside the DDP forward (so the DDP reducer never sees it) and
sum it over ranks themselves; every rank then holds the same gradient and applies the same update.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["world", "all_reduce_sum_", "all_reduce_flat_"]


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) outside ``torch.distributed``."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """Sum ``tensor`` over ranks in place (identical result on every rank); returns it."""
    if world()[1] > 1:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def all_reduce_flat_(tensors: list[Tensor]) -> list[Tensor]:
    """Sum ``tensors`` over ranks in place with one collective through a flat fp32 buffer; returns them.

    One call instead of one per LoRA tensor, and the sum is taken in fp32 even for bf16 gradients.
    """
    if world()[1] <= 1 or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return tensors
