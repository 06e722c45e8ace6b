"""The math of SPAG's safety step: pure functions over tensors, no model, no trainer.

SPAG keeps the safety loss ``L_s`` on a small set of refusals below a threshold ``tau`` while fine-tuning.
After each utility step, if ``L_s`` is too high, it moves the trainable parameters toward the half-space
``{θ : L_s(θ) ≤ tau}`` of the linearised loss ``L_s(θ) + <g, Δ>`` (``g = ∇L_s``).

Two update rules are provided:

* ``halfspace`` (:func:`safety_projection`): the exact Euclidean projection onto that half-space, over all
  trainable tensors jointly: ``Δ = -min((L_s - tau) / ‖g‖², max_step / ‖g‖) · g``.
* ``reference`` (:func:`reference_scaled_grads`): the rule of the reference implementation
  (github.com/shuhao02/SPARD, ``utils/SPAGOptimizerTrainer.py``): each tensor's gradient is rescaled to
  norm ``min(L_s - tau, alpha_max · ‖g_p‖)`` and handed to the optimizer.

Norms are accumulated in fp32 whatever the gradients' dtype (bf16 squares lose too many bits), and
scalars are returned as Python floats so every caller (and every rank) applies the very same number. Under
FSDP2 the gradients are sharded ``DTensor``s: norms are then over the whole tensors (local partial sums summed
over the shard group, :mod:`spard.distributed`), so every rank computes what a single process would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

REFERENCE_EPS = 1e-8
"""Added to each tensor's gradient norm in the reference rule (as in the reference code)."""


def tensor_norms(grads: Sequence[torch.Tensor]) -> list[float]:
    """``‖g_p‖`` of each tensor (whole, even when sharded), accumulated in fp32."""
    from spard.distributed import per_tensor_sq_norms

    if not grads:
        return []
    return [math.sqrt(v) for v in per_tensor_sq_norms([g.float() for g in grads]).tolist()]


def global_grad_norm(grads: Sequence[torch.Tensor]) -> float:
    """``‖g‖`` over all tensors jointly (whole, even when sharded), accumulated in fp32."""
    from spard.distributed import per_tensor_sq_norms

    if not grads:
        return 0.0
    return math.sqrt(float(per_tensor_sq_norms([g.float() for g in grads]).sum()))


def halfspace_step_size(loss: float, tau: float, grad_norm: float, max_step: float | None = None) -> float:
    """The coefficient ``c`` of the projection ``Δ = -c · g``; 0 when nothing should move.

    ``c = (loss - tau) / ‖g‖²`` puts the linearised loss exactly at ``tau``; ``max_step`` caps the step
    norm ``c · ‖g‖``. Zero when ``loss ≤ tau`` (already feasible), when ``‖g‖`` is 0 (no direction
    lowers the loss to first order) or when either is not finite (never move on a NaN).
    """
    if not (math.isfinite(loss) and math.isfinite(grad_norm)) or loss <= tau or grad_norm <= 0.0:
        return 0.0
    step = (loss - tau) / (grad_norm * grad_norm)
    if max_step is not None:
        step = min(step, max_step / grad_norm)
    return step


def safety_projection(
    grads: list[torch.Tensor], loss: float, tau: float, max_step: float | None = None
) -> list[torch.Tensor]:
    """Parameter deltas of the half-space projection: ``Δ = -min((loss - tau)/‖g‖², max_step/‖g‖) · g``.

    ``grads`` are the safety-loss gradients of all trainable tensors (one list, projected jointly).
    Returns one delta per gradient (same shape and dtype); all zeros when ``loss ≤ tau`` or ``g = 0``.
    Without the cap, ``loss + <g, Δ> == tau``; with it binding, ``‖Δ‖ == max_step``.
    """
    step = halfspace_step_size(float(loss), tau, global_grad_norm(grads), max_step)
    return [(g.detach().float() * -step).to(g.dtype) for g in grads]


def reference_scale(grad_norm: float, loss: float, tau: float, alpha_max: float, eps: float = REFERENCE_EPS) -> float:
    """The reference code's per-tensor factor ``alpha = min((loss - tau) / (‖g_p‖ + eps), alpha_max)``."""
    return min((loss - tau) / (grad_norm + eps), alpha_max)


def reference_scaled_grads(
    grads: list[torch.Tensor], loss: float, tau: float, alpha_max: float, eps: float = REFERENCE_EPS
) -> list[torch.Tensor]:
    """Each tensor's gradient times :func:`reference_scale` of its own norm (what the reference hands Adam).

    The factor is computed per tensor (not jointly), so every LoRA matrix gets a step of norm
    ``min(loss - tau, alpha_max · ‖g_p‖)`` whatever its share of the total gradient.
    """
    out = []
    for g, norm in zip(grads, tensor_norms(grads)):  # one collective for all the per-tensor norms
        alpha = reference_scale(norm, float(loss), tau, alpha_max, eps)
        out.append((g.detach().float() * alpha).to(g.dtype))
    return out


def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float) -> tuple[list[torch.Tensor], float]:
    """Scale ``grads`` so their joint norm is at most ``max_norm``, exactly as ``torch.nn.utils.clip_grad_norm_``
    (factor ``min(1, max_norm / (‖g‖ + 1e-6))``).

    Returns the (possibly) scaled gradients and the norm before clipping. ``max_norm <= 0`` = no clipping.
    """
    norm = global_grad_norm(grads)
    factor = max_norm / (norm + 1e-6) if max_norm > 0 else 1.0
    if factor >= 1.0:  # torch clamps the coefficient at 1: a norm within 1e-6 of max_norm is still scaled
        return [g.detach() for g in grads], norm
    return [(g.detach().float() * factor).to(g.dtype) for g in grads], norm


def token_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over labelled positions (labels ``!= -100``) and their count.

    Returns sums rather than a mean so ranks and micro-batches can be combined into one exact token mean.
    Logits are upcast to fp32 (as HF's causal-LM loss does), so bf16 forwards give an fp32 loss.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:].to(shift_logits.device)
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, (shift_labels != -100).sum()
