"""Booster (Huang et al., ICLR 2025, arXiv 2409.01586): alignment with harmful perturbation attenuation.

The update direction (reference: git-disl/Booster ``trainer.py`` ``BoosterAlignmentTrainer``, the paper's
Algorithm 1) is

    g = ∇f(θ) + λ (∇h(θ) − ∇h(θ − α ∇h(θ) / ‖∇h(θ)‖))

with ``f`` the alignment loss on the alignment batch and ``h`` the loss on a batch of harmful pairs: the
model is trained so that one normalised step of harmful fine-tuning lowers the harmful loss as little as
possible. Only trainable (LoRA) parameters enter ``∇h`` and its norm. Three forward/backward passes per
step (harmful twice on the same batch, alignment once).

spard computes ``λ (∇h(θ) − ∇h(θ'))`` in the ``loss`` hook and adds it to the gradient of the alignment loss
through a linear term of zero value, so the trainer's backward, gradient clipping and optimizer see the
combined gradient exactly as the reference's (which writes it into ``.grad`` before HF clips it).

Under DDP and FSDP2 every rank draws the same harmful batch (the term is computed alike on all ranks, and the
data-parallel average of the combined gradient adds it once). Under FSDP2 the harmful gradients come from plain
backwards through the sharded model and ``‖∇h‖`` is over whole tensors (:func:`_sharded_shifted_gradients`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spard.align_defenses.base import HarmfulDataArgs, HarmfulDataDefense, register
from spard.align_defenses.vaccine import NORM_EPS, joint_norm
from spard.args import check_range
from spard.signal_guard import SignalGuard

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import Trainer

# torch is imported where it runs, so resolving a config that names this defense does not load it.

__all__ = ["Booster", "BoosterArgs", "normalised_step", "shifted_harmful_gradients", "booster_regulariser",
           "with_extra_gradient"]


@dataclass
class BoosterArgs(HarmfulDataArgs):
    name: str = "booster"
    """Alignment defense name."""
    lamb: float = 5.0
    """λ, weight of the attenuation term (reference script ``smooth_align.sh``: 5; its argparse default 0.001
    is not what the experiments used)."""
    alpha: float = 0.1
    """α, length of the simulated harmful step ``α ∇h / ‖∇h‖`` (reference: 0.1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("lamb", self.lamb, 0.0)
        check_range("alpha", self.alpha, 0.0)


def normalised_step(grads: Sequence[Tensor], alpha: float) -> list[Tensor]:
    """``alpha * g / (‖g‖ + 1e-7)`` with one norm over all tensors (the simulated harmful step); sharded
    gradients (FSDP2) are scaled shard by shard with the norm of the whole tensors."""
    scale = float(alpha / (joint_norm(grads) + NORM_EPS))
    return [(g.detach().float() * scale).to(g.dtype) for g in grads]


def booster_regulariser(g_harm: Sequence[Tensor], g_harm_shifted: Sequence[Tensor], lamb: float) -> list[Tensor]:
    """``λ (∇h(θ) − ∇h(θ − step))`` per tensor."""
    return [lamb * (a - b) for a, b in zip(g_harm, g_harm_shifted)]


def _grads(loss: Tensor, params: Sequence[Tensor]) -> list[Tensor]:
    import torch

    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads)]


def shifted_harmful_gradients(model: torch.nn.Module, batch: dict[str, Tensor], alpha: float
                              ) -> tuple[list[Tensor], list[Tensor], float, float]:
    """``∇h(θ)``, ``∇h(θ − α ∇h/‖∇h‖)`` over ``model``'s trainable parameters, and the two harmful losses.

    The shifted pass runs on shifted copies of the trainable parameters swapped into the module: the weights
    are never modified in place (the reference subtracts the step from ``.data`` and adds it back, which is not
    exact in floating point, and here the alignment batch's graph, already built by the trainer, still needs
    the unshifted weights). The copies stay swapped in until their gradient is taken, since gradient
    checkpointing recomputes the layers during that backward and must see the same weights. Sharded (FSDP2)
    parameters take :func:`_sharded_shifted_gradients` instead."""
    from torch.nn.utils.stateless import _reparametrize_module

    from spard.distributed import fsdp_modules

    if fsdp_modules(model):
        return _sharded_shifted_gradients(model, trainable_parameters(model), batch, alpha)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    loss = model(**batch).loss
    g_harm = _grads(loss, params)
    step = normalised_step(g_harm, alpha)
    shifted = {n: (p.detach() - s).requires_grad_(True) for (n, p), s in zip(named, step)}
    with _reparametrize_module(model, shifted, tie_weights=True):  # a tied head moves with its embedding
        loss_shifted = model(**batch).loss
        g_shifted = _grads(loss_shifted, list(shifted.values()))
    return g_harm, g_shifted, float(loss.detach()), float(loss_shifted.detach())


def trainable_parameters(model: torch.nn.Module) -> list[Tensor]:
    """``model``'s trainable parameters as the optimizer holds them. Under FSDP2 a module left gathered after its
    forward (accelerate keeps the embeddings, final norm and head gathered) exposes its unsharded tensors in
    place of its parameters until resharded, so every FSDP module is resharded first (the trainer's backward
    gathers them again)."""
    from spard.distributed import fsdp_modules

    for module in fsdp_modules(model):
        module.reshard()
    return [p for p in model.parameters() if p.requires_grad]


def _sharded_shifted_gradients(model: torch.nn.Module, params: list[Tensor], batch: dict[str, Tensor],
                               alpha: float) -> tuple[list[Tensor], list[Tensor], float, float]:
    """:func:`shifted_harmful_gradients` under FSDP2, where ``autograd.grad`` cannot reach the sharded parameters
    (FSDP's all-gather is outside autograd) and a forward gathers FSDP's own shards, not module attributes.

    Each gradient comes from a plain backward, the trainer's gradients set aside meanwhile; every rank draws the
    same harmful batch, so FSDP's average over ranks is that batch's gradient. The shifted pass subtracts the step
    from this rank's shards in place and restores them bit for bit from a copy afterwards; every FSDP module is
    resharded around it, so that forward gathers the shifted weights and the trainer's backward (which gathers
    again) the restored ones."""
    import torch

    from spard.distributed import fsdp_modules, local_part

    def reshard() -> None:
        for module in fsdp_modules(model):
            module.reshard()

    def harmful_pass() -> tuple[list[Tensor], float]:
        for p in params:
            p.grad = None
        loss = model(**batch).loss
        loss.backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad for p in params], float(loss.detach())

    kept = [p.grad for p in params]
    try:
        g_harm, h0 = harmful_pass()
        step = normalised_step(g_harm, alpha)
        originals = [local_part(p).detach().clone() for p in params]
        try:
            with torch.no_grad():
                for p, s in zip(params, step):
                    local_part(p).sub_(local_part(s))
            reshard()
            g_shifted, h1 = harmful_pass()
        finally:
            with torch.no_grad():
                for p, original in zip(params, originals):
                    local_part(p).copy_(original)
            reshard()
    finally:
        for p, g in zip(params, kept):
            p.grad = g
    return g_harm, g_shifted, h0, h1


def with_extra_gradient(loss: Tensor, params: Sequence[Tensor], extra: Sequence[Tensor]) -> Tensor:
    """``loss`` with the same value whose gradient with respect to ``params`` is larger by ``extra``:
    adds ``Σ <p, e> − (Σ <p, e>).detach()``, a term of value zero and gradient ``e``. For sharded (FSDP2)
    parameters the term is over this rank's shards, so each rank's shard of ``.grad`` gets its shard of ``e``."""
    from spard.distributed import local_part

    linear = sum((local_part(p) * local_part(e).detach().to(p.dtype)).sum() for p, e in zip(params, extra))
    return loss + (linear - linear.detach())  # type: ignore[operator]


@register
class Booster(HarmfulDataDefense):
    """Align while attenuating how much one harmful step would lower the harmful loss."""

    name = "booster"
    Args = BoosterArgs
    args: BoosterArgs
    # The reference aligns with lora_dropout=0: with dropout the two harmful passes see different masks and
    # λ(∇h(θ) − ∇h(θ')) is dominated by that noise rather than by the step.
    lora_dropout = 0.0

    def __init__(self, args: BoosterArgs) -> None:
        super().__init__(args)
        self.guard = SignalGuard(self.name, "attenuation term (lambda * gradient difference) norm")

    def setup(self, trainer: Trainer) -> None:
        from spard.checkpointing import refuse_reentrant

        refuse_reentrant(trainer.model, "align.defense.name='booster'", "its harmful gradients are taken inside "
                         "the training step, where only torch.autograd.grad is safe")
        self.guard = SignalGuard(self.name, "attenuation term (lambda * gradient difference) norm")
        super().setup(trainer)

    def loss(self, trainer: Trainer, model: torch.nn.Module, inputs: dict[str, Tensor],
             loss: Tensor, outputs: Any) -> Tensor:
        if not model.training:
            return loss
        # DDP: the unwrapped module, so these passes do not trigger the reducer; FSDP2: the sharded module itself
        # (every rank runs the same passes on the same harmful batch, as its forwards gather shards)
        net = trainer.model
        params = trainable_parameters(net)
        batch = self.harmful_batch(trainer)
        with trainer.accelerator.autocast():
            g_harm, g_shifted, h0, h1 = shifted_harmful_gradients(net, batch, self.args.alpha)
        extra = booster_regulariser(g_harm, g_shifted, self.args.lamb)
        if self.args.lamb > 0:
            self.guard.observe(float(joint_norm(extra)), trainer.state.global_step + 1)
        self.last = {"booster_harmful_loss": h0, "booster_harmful_loss_shifted": h1,
                     "booster_harmful_drop": h0 - h1, "booster_reg_norm": float(joint_norm(extra))}
        return with_extra_gradient(loss, params, extra)
