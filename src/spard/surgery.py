"""Gradient surgery on gradients given as lists of tensors (one tensor per trainable parameter).

The pure math of SafeGrad (arXiv 2508.07172): when the task gradient ``g_u`` conflicts with the alignment
gradient ``g_a`` (``g_u · g_a < 0``), remove from ``g_u`` its component along ``g_a``, so a small step along
the result no longer increases the alignment loss to first order. Dot products and norms run over all
tensors together (the gradient is one vector over every trainable parameter) and accumulate in at least
fp32, so bf16/fp16 gradients do not lose the small terms of a sum over millions of entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def _accumulation_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (tests and callers who want more precision keep it)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_pair(a: Sequence[Tensor], b: Sequence[Tensor]) -> None:
    if len(a) != len(b):
        raise ValueError(f"gradient lists differ in length: {len(a)} vs {len(b)} tensors")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"gradient tensor {i}: shapes differ, {tuple(x.shape)} vs {tuple(y.shape)}")


def flat_dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """``a · b`` with both lists read as one flattened vector; a 0-d tensor in fp32 (fp64 for fp64 inputs).

    Sharded (FSDP2 ``DTensor``) gradients are read whole: the shard-local partial sums are summed over the
    shard group (:func:`spard.distributed.whole_dot`), so every rank gets the single-process value.
    """
    from spard.distributed import whole_dot

    _check_pair(a, b)
    if not a:
        return torch.zeros((), dtype=_accumulation_dtype([*a, *b]))
    return whole_dot(a, b)


def flat_sq_norm(a: Sequence[Tensor]) -> Tensor:
    """``‖a‖²`` with the list read as one flattened vector, accumulated like :func:`flat_dot`."""
    return flat_dot(a, a)


def project_conflicting(g_task: list[Tensor], g_align: list[Tensor]) -> list[Tensor]:
    """One-sided gradient surgery: ``g_task − (g_task·g_align / ‖g_align‖²) g_align`` if ``g_task·g_align < 0``.

    Returns ``g_task`` itself (the same tensors) when there is no conflict (dot product ≥ 0, which includes
    orthogonal gradients) or when the alignment gradient is zero (nothing to protect, and no division by 0).
    Otherwise returns new tensors in ``g_task``'s dtypes, computed in fp32 (fp64 for fp64 inputs); the result
    is orthogonal to ``g_align`` up to rounding.
    """
    _check_pair(g_task, g_align)
    dot = flat_dot(g_task, g_align)
    sq_norm = flat_sq_norm(g_align)
    if not (sq_norm > 0 and dot < 0):
        return g_task
    coef = dot / sq_norm
    # a Python float (exact for fp32/fp64): it scales plain tensors and sharded DTensors alike
    c = float(coef)
    return [(gt.to(coef.dtype) - c * ga.to(coef.dtype)).to(gt.dtype) for gt, ga in zip(g_task, g_align)]


@dataclass
class SurgeryResult:
    """The update SafeGrad applies and what the surgery saw."""

    update: list[Tensor]
    """``project_conflicting(g_task, g_align) + lambda_align * g_align``, in ``g_task``'s dtypes."""
    cosine: float
    """Cosine of the angle between the task and alignment gradients before surgery (0 if either is zero)."""
    projected: bool
    """Whether the task gradient conflicted with the alignment gradient and was projected."""
    task_norm: float
    """‖g_task‖ before surgery."""
    align_norm: float
    """‖g_align‖."""


def safegrad_update(g_task: list[Tensor], g_align: list[Tensor], lambda_align: float) -> SurgeryResult:
    """The SafeGrad update direction: the de-conflicted task gradient plus ``lambda_align`` times ``g_align``."""
    _check_pair(g_task, g_align)
    dot = flat_dot(g_task, g_align)
    task_norm = flat_sq_norm(g_task).sqrt()
    align_norm = flat_sq_norm(g_align).sqrt()
    denom = task_norm * align_norm
    cosine = float(dot / denom) if denom > 0 else 0.0
    surgered = project_conflicting(g_task, g_align)
    projected = surgered is not g_task
    if lambda_align:
        update = [(u.to(dot.dtype) + lambda_align * ga.to(dot.dtype)).to(u.dtype) for u, ga in zip(surgered, g_align)]
    else:
        update = list(surgered)
    return SurgeryResult(update=update, cosine=cosine, projected=projected,
                         task_norm=float(task_norm), align_norm=float(align_norm))
