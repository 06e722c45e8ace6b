"""Vaccine (Huang et al., NeurIPS 2024, arXiv 2402.01109): perturbation-aware alignment.

Per step, on the same alignment batch (reference: git-disl/Vaccine ``trainer.py`` ``VaccineTrainer``):

1. the trainer's forward records each decoder layer's self-attention output ``a_l`` (the tensor added to
   the residual stream; the reference hooks the attention sub-module, not the decoder layer), and the
   gradient ``g_l = dL/da_l`` is taken (no parameter gradients: the reference discards them);
2. ``eps_l = rho * g_l / (||g|| + 1e-7)`` with one L2 norm over all layers and the whole batch jointly;
3. a second forward adds the constant ``eps_l`` to ``a_l`` through forward hooks; its loss is what the
   trainer back-propagates, so the optimizer steps on the perturbed pass's gradient.

About twice the cost of a plain alignment step (two forwards, one full backward, one backward to the
activations).

Under DDP and FSDP2 each rank holds its share of the batch: the joint norm of step 2 is summed over ranks
(:func:`batch_norm`), so each rank perturbs its examples exactly as one process would perturb them in the whole
batch. The first pass reaches no parameter, so DDP's reducer and FSDP's reduce-scatter only see the second
pass's backward (``tests/test_fsdp_align.py`` checks both against one process).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spard.align_defenses.base import AlignDefense, layer_modules, mean_over_ranks, register
from spard.args import AlignDefenseArgs, check_range
from spard.signal_guard import SignalGuard

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import Trainer

# torch is imported where it runs, so resolving a config that names this defense does not load it.

__all__ = ["Vaccine", "VaccineArgs", "vaccine_perturbation", "joint_norm", "batch_norm"]

NORM_EPS = 1e-7
"""Added to the joint gradient norm before dividing (reference ``trainer.py``: ``grad_norm + 1e-7``)."""


@dataclass
class VaccineArgs(AlignDefenseArgs):
    name: str = "vaccine"
    """Alignment defense name."""
    rho: float = 2.0
    """Perturbation radius: the joint L2 norm of the added perturbations over all layers and the batch
    (reference default 2, git-disl/Vaccine ``train.py`` and README; the Booster repository's Vaccine runs use 5)."""

    def __post_init__(self) -> None:
        check_range("rho", self.rho, 0.0)


def joint_norm(tensors: Sequence[Tensor]) -> Tensor:
    """One L2 norm over all ``tensors`` as if they were one flat vector (computed in fp32; fp64 inputs in fp64).
    Sharded tensors (FSDP2 parameters and gradients) count whole: their shards' partial sums are summed over the
    shard group (:func:`spard.distributed.per_tensor_sq_norms`), so every rank gets the same norm."""
    import torch

    from spard.distributed import per_tensor_sq_norms

    return torch.sqrt(per_tensor_sq_norms(tensors).sum())


def vaccine_perturbation(grads: Sequence[Tensor], rho: float, norm: Tensor | None = None) -> list[Tensor]:
    """``rho * g_l / (||g|| + 1e-7)`` for every layer ``l``, ``||g||`` the joint norm over all layers (``norm``,
    default :func:`joint_norm` of ``grads``): the ascent direction of the loss in activation space, of total norm
    ``rho`` (just under, by the 1e-7)."""
    scale = float(rho / ((joint_norm(grads) if norm is None else norm) + NORM_EPS))
    return [(g.detach().float() * scale).to(g.dtype) for g in grads]


def batch_norm(grads: Sequence[Tensor], n_ranks: int) -> Tensor:
    """:func:`joint_norm` of activation gradients over the whole batch when it is split over ``n_ranks`` ranks
    (DDP, FSDP2: each rank holds its examples' activations), summed over ranks with one collective."""
    from spard.distributed import all_reduce_sum_

    norm = joint_norm(grads)
    return norm if n_ranks <= 1 else all_reduce_sum_((norm**2).reshape(1).clone())[0].sqrt()


class _ActivationHooks:
    """Forward hooks on the attention modules: record their outputs, or add a perturbation to them."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.outputs: list[Tensor | None] = [None] * len(modules)
        self.shift: list[Tensor] | None = None
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    def _hook(self, i: int):  # noqa: ANN202
        import torch

        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> Any:
            first = output[0] if isinstance(output, tuple) else output
            if self.shift is not None:
                shifted = first + self.shift[i]  # a constant: gradients flow through unchanged
                return (shifted, *output[1:]) if isinstance(output, tuple) else shifted
            if torch.is_grad_enabled():
                self.outputs[i] = first
            return None
        return hook

    def clear(self) -> None:
        self.outputs = [None] * len(self.outputs)
        self.shift = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.clear()


@register
class Vaccine(AlignDefense):
    """Align on the loss under the worst-case (first-order) perturbation of the attention outputs."""

    name = "vaccine"
    Args = VaccineArgs
    args: VaccineArgs

    def __init__(self, args: VaccineArgs) -> None:
        super().__init__(args)
        self.hooks: _ActivationHooks | None = None
        self._inner = False
        self._num_items: Any = None
        self.guard = SignalGuard(self.name, "attention-output gradient norm")
        self.last: dict[str, float] = {}

    def setup(self, trainer: Trainer) -> None:
        from spard.checkpointing import refuse_reentrant

        refuse_reentrant(trainer.model, "align.defense.name='vaccine'", "the attention outputs it perturbs are "
                         "computed without autograd there")
        self.hooks = _ActivationHooks(layer_modules(trainer.model, "self_attn"))
        self.guard = SignalGuard(self.name, "attention-output gradient norm")

    def training_batch(self, trainer: Trainer, inputs: dict[str, Tensor], num_items_in_batch: Any
                       ) -> tuple[dict[str, Tensor], Any]:
        self._num_items = num_items_in_batch  # so the second pass normalises its loss as the first did
        if self.hooks is not None and not self._inner:
            self.hooks.clear()  # the last micro-batch's perturbation, kept through its backward
        return inputs, num_items_in_batch

    def before_optimizer_step(self, trainer: Trainer) -> None:
        if self.hooks is not None:
            self.hooks.clear()

    def loss(self, trainer: Trainer, model: torch.nn.Module, inputs: dict[str, Tensor],
             loss: Tensor, outputs: Any) -> Tensor:
        import torch

        from spard.distributed import world

        if self._inner or not model.training or self.hooks is None:
            return loss
        hooks = self.hooks
        acts = hooks.outputs
        if any(a is None for a in acts):
            raise RuntimeError("vaccine: the forward pass did not run through every attention module")
        grads = torch.autograd.grad(loss, acts, allow_unused=True)  # type: ignore[arg-type]
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]  # type: ignore[arg-type]
        hooks.outputs = [None] * len(acts)
        n_ranks = world()[1]
        norm = batch_norm(grads, n_ranks)  # over the whole batch, however it is split over ranks
        hooks.shift = vaccine_perturbation(grads, self.args.rho, norm)
        self._inner = True
        try:
            perturbed = trainer.compute_loss(model, inputs, num_items_in_batch=self._num_items)
        except BaseException:
            hooks.clear()
            raise
        finally:
            self._inner = False
        # The perturbation stays on until the next micro-batch (or the optimizer step): gradient checkpointing
        # recomputes the perturbed layers during the trainer's backward of this loss, and they must see it again.
        # each rank's loss is its share of the batch's mean loss times the rank count (the trainer's scaling under
        # DDP / FSDP), so its gradient is n_ranks times that of the mean loss: the norm logged is of the mean loss
        grad_norm = float(norm) / n_ranks
        if self.args.rho > 0:
            self.guard.observe(grad_norm, trainer.state.global_step + 1)
        clean, perturbed_value = mean_over_ranks([float(loss.detach()), float(perturbed.detach())], trainer.args.device)
        self.last = {"vaccine_loss_clean": clean, "vaccine_act_grad_norm": grad_norm,
                     "vaccine_loss_perturbed": perturbed_value}
        if not math.isfinite(grad_norm):
            raise FloatingPointError(f"vaccine: non-finite activation gradient norm at step "
                                     f"{trainer.state.global_step + 1}")
        return perturbed

    def after_train(self, trainer: Trainer) -> None:
        if self.hooks is not None:
            self.hooks.remove()
            self.hooks = None

    def log_stats(self) -> dict[str, float]:
        return dict(self.last)
