"""SafeGrad (Yi et al., arXiv 2508.07172): safe fine-tuning by gradient surgery.

Every optimizer step, next to the task gradient ``g_u`` (the user's possibly poisoned batch, accumulated,
all-reduced and clipped by the trainer), SafeGrad computes an alignment gradient ``g_a``: the gradient of
the token-level KL divergence between the frozen well-aligned base model and the current model on the
assistant tokens of a small batch of safety examples (harmful prompt + safe reply). If the two conflict
(``g_u · g_a < 0``), the component of ``g_u`` along ``g_a`` is removed; the step then follows
``g_u' + lambda_align * g_a``. The base distribution comes from the same weights with the LoRA adapter
switched off, so no second copy of the model is kept.

Distributed data parallel: each rank computes the KL on its share of the alignment batch, normalised by the
token count of the whole batch, and the gradients are summed with one ``all_reduce``; every rank then holds
the gradient of the full batch and applies the identical update. The gradient is taken with
``torch.autograd.grad`` on the unwrapped model, which neither touches ``.grad`` (holding ``g_u``) nor fires
the DDP reducer's hooks, so it works under HF Trainer's DDP wrapping without a stash of ``g_u``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spard.args import FieldError, SafetyPoolArgs, check_choice, check_range
from spard.data.build import sample
from spard.data.chat import IGNORE_INDEX
from spard.data.records import Record
from spard.data.safety import SafetyStream, load_pool, tokenize_safety
from spard.defenses.base import Defense, DefenseContext, register
from spard.distributed import all_reduce_flat_, all_reduce_sum_, world
from spard.errors import ConfigError
from spard.surgery import SurgeryResult, flat_dot, project_conflicting, safegrad_update

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import Trainer

__all__ = ["SafeGrad", "SafeGradArgs", "project_conflicting", "token_kl", "alignment_kl", "alignment_kl_sum"]

log = logging.getLogger(__name__)

KL_DIRECTIONS = ("forward", "reverse")


@dataclass
class SafeGradArgs(SafetyPoolArgs):
    name: str = "safegrad"
    """Defense name."""
    alignment_examples: int = 100
    """Safety examples (harmful prompt + safe reply) the alignment gradient is computed on; as few as 20 work."""
    alignment_batch_size: int = 2
    """Alignment examples per optimizer step (across all ranks). Each step adds a forward with the adapter off
    and a forward/backward with it on over this batch: next to a user batch of 8, 2 makes a step cost about
    1.35x plain SFT with 128-160-token task examples (1.2x at 256), 4 about 1.7-1.8x (1.45x at 256)."""
    alignment_max_length: int | None = None
    """Token limit per alignment example; ``null`` = ``data.max_length``."""
    kl_direction: str = "forward"
    """``forward`` = KL(p_base ‖ p_θ) (distillation from the aligned base); ``reverse`` = KL(p_θ ‖ p_base)."""
    lambda_align: float = 1.0
    """Weight of the alignment gradient added to the (projected) task gradient; 0 = surgery only."""

    def __post_init__(self) -> None:
        check_range("alignment_examples", self.alignment_examples, 1)
        check_range("alignment_batch_size", self.alignment_batch_size, 1)
        if self.alignment_batch_size > self.alignment_examples:
            raise FieldError("alignment_batch_size", self.alignment_batch_size,
                             f"must be <= alignment_examples ({self.alignment_examples})")
        if self.alignment_max_length is not None:
            check_range("alignment_max_length", self.alignment_max_length, 8)
        check_choice("kl_direction", self.kl_direction, KL_DIRECTIONS)
        check_range("lambda_align", self.lambda_align, 0.0)


# ---------------------------------------------------------------------------------------------------------
# The alignment loss
# ---------------------------------------------------------------------------------------------------------
class _TokenKL(torch.autograd.Function):
    """Per-token KL with a hand-written gradient with respect to the current logits.

    Autograd through ``log_softmax`` leaves a rounding residue (``p * (Σp − 1)``) in the gradient even when
    the two distributions are bitwise equal; since the surgery is scale-invariant, that noise would act as
    a random projection direction at step 1, when the adapter is still the identity. The closed forms below
    are exactly zero there: forward KL(q ‖ p) → ``p − q``; reverse KL(p ‖ q) → ``p ⊙ (log p − log q − KL)``.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, base_logits: Tensor, reverse: bool) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
        log_p = F.log_softmax(logits.to(dtype), dim=-1)
        log_q = F.log_softmax(base_logits.to(dtype), dim=-1)
        p, diff = log_p.exp(), log_p - log_q
        if reverse:
            kl = (p * diff).sum(-1)
            ctx.save_for_backward(p, diff, kl)
        else:
            q = log_q.exp()
            kl = -(q * diff).sum(-1)
            ctx.save_for_backward(p, q)
        ctx.reverse, ctx.dtype = reverse, logits.dtype
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor, None, None]:
        if ctx.reverse:
            p, diff, kl = ctx.saved_tensors
            grad = p * (diff - kl.unsqueeze(-1))
        else:
            p, q = ctx.saved_tensors
            grad = p - q
        return (grad_kl.unsqueeze(-1) * grad).to(ctx.dtype), None, None


def token_kl(logits: Tensor, base_logits: Tensor, direction: str = "forward") -> Tensor:
    """Per-token KL divergence between next-token distributions, computed in (at least) fp32.

    ``logits`` (current model, differentiable) and ``base_logits`` (treated as constant) have shape
    ``(..., vocab)``; returns shape ``(...)``. ``forward`` is KL(p_base ‖ p_θ), ``reverse`` is KL(p_θ ‖ p_base).
    """
    check_choice("kl_direction", direction, KL_DIRECTIONS)
    return _TokenKL.apply(logits, base_logits.detach(), direction == "reverse")


def alignment_kl_sum(model: PeftModel, batch: dict[str, Tensor], direction: str = "forward") -> tuple[Tensor, int]:
    """Sum over assistant tokens of the KL between the base (adapter off) and current model, and the token count.

    The base pass runs under ``torch.no_grad()`` with ``model.disable_adapter()``; the current pass keeps its
    graph, so the sum can be differentiated. A token counts when it is a label (not -100): the logits at
    position ``t`` are the prediction of token ``t + 1``.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    n_tokens = int(mask.sum())
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs).logits[:, :-1][mask]
    current = model(**inputs).logits[:, :-1][mask]
    return token_kl(current, base, direction).sum(), n_tokens


def alignment_kl(model: PeftModel, batch: dict[str, Tensor], direction: str = "forward") -> Tensor:
    """Mean per-token KL over the assistant tokens of ``batch`` (the SafeGrad alignment loss)."""
    total, n = alignment_kl_sum(model, batch, direction)
    return total / max(n, 1)


# ---------------------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------------------
def _check_supported(trainer: Trainer) -> None:
    """SafeGrad reads and rewrites whole gradients in ``param.grad``: sharded or engine-owned gradients
    (DeepSpeed, FSDP, Megatron, XLA) do not expose them there."""
    from accelerate.utils import DistributedType

    dist_type = trainer.accelerator.distributed_type
    if getattr(trainer, "is_deepspeed_enabled", False) or dist_type == DistributedType.DEEPSPEED:
        plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
        stage = getattr(plugin, "zero_stage", None)
        raise ConfigError(
            f"defense.name='safegrad' does not support DeepSpeed (ZeRO stage {stage}): the gradients live in "
            "DeepSpeed's partitioned buffers, not in param.grad; use DDP (accelerate launch / torchrun) instead"
        )
    if getattr(trainer, "is_fsdp_enabled", False) or dist_type == DistributedType.FSDP:
        raise ConfigError(
            "defense.name='safegrad' does not support FSDP: sharded parameters hold only a shard of each "
            "gradient; use DDP (accelerate launch / torchrun) instead"
        )
    if dist_type in (DistributedType.MEGATRON_LM, DistributedType.XLA):
        raise ConfigError(f"defense.name='safegrad' does not support distributed type {dist_type.value}; use DDP")


@register
class SafeGrad(Defense):
    """Project the task gradient off the alignment gradient when they conflict; add the alignment gradient."""

    name = "safegrad"
    Args = SafeGradArgs
    args: SafeGradArgs

    def __init__(self, args: SafeGradArgs) -> None:
        super().__init__(args)
        self.alignment_records: list[Record] | None = None
        self.stream: SafetyStream | None = None
        self.seed = 0
        self.max_length = 256
        self.steps = 0
        self.projected_steps = 0
        self.skipped_steps = 0
        self.last: dict[str, float] = {}
        self._resume_cursor = 0

    # -- data -------------------------------------------------------------------------------------------
    def _pick(self, exclude: list[str], seed: int, max_length: int) -> None:
        a = self.args
        pool = load_pool(a, exclude_prompts=exclude, need=a.alignment_examples)
        self.alignment_records = sample(pool, a.alignment_examples, seed)
        self.seed = seed
        self.max_length = a.alignment_max_length or max_length

    def prepare_data(self, records: list[Record], ctx: DefenseContext) -> list[Record]:
        """Pick the alignment examples (never an attack prompt); the user's data pass through unchanged."""
        self._pick(ctx.attack_prompts, ctx.seed, ctx.config.data.max_length)
        return records

    def setup(self, trainer: Trainer) -> None:
        from peft import PeftModel

        _check_supported(trainer)
        if not isinstance(trainer.model, PeftModel):
            raise ConfigError("defense.name='safegrad' needs a LoRA (peft) model: the base distribution is the "
                              f"model with its adapter disabled; got {type(trainer.model).__name__}")
        if self.alignment_records is None:
            # fit() called without prepare_data (e.g. a benchmark): no attack prompts are known to exclude.
            log.warning("safegrad: prepare_data was not called; drawing alignment examples without excluding "
                        "attack prompts")
            self._pick([], trainer.args.seed, self.max_length)
        assert self.alignment_records is not None
        tokenizer = trainer.processing_class
        features = tokenize_safety(tokenizer, self.alignment_records, self.max_length,
                                   key="defense.alignment_max_length")
        if self.args.alignment_batch_size > len(features):
            raise ConfigError(f"defense.alignment_batch_size={self.args.alignment_batch_size} exceeds the "
                              f"{len(features)} usable alignment examples")
        self.stream = SafetyStream(features, seed=self.seed, pad_id=tokenizer.pad_token_id)
        self.stream.cursor = self._resume_cursor

    def alignment_gradient(self, trainer: Trainer, params: list[Tensor]) -> tuple[list[Tensor], float]:
        """``g_a`` over the whole alignment batch (summed across ranks) and the mean KL it is the gradient of."""
        model = trainer.model
        rank, n_ranks = world()
        assert self.stream is not None
        batch = self.stream.next_batch(self.args.alignment_batch_size, trainer.args.device, rank, n_ranks)
        if batch is not None:
            with trainer.accelerator.autocast():
                kl_sum, n_local = alignment_kl_sum(model, batch, self.args.kl_direction)
        else:
            kl_sum, n_local = torch.zeros((), device=trainer.args.device), 0
        n_total = n_local
        if n_ranks > 1:
            count = all_reduce_sum_(torch.tensor([float(n_local)], device=trainer.args.device))
            n_total = int(count.item())
        # Normalise by the token count of the whole batch so the summed gradient is that of the global mean.
        loss = kl_sum / max(n_total, 1)
        if loss.requires_grad:
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            g_align = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        else:
            g_align = [torch.zeros_like(p) for p in params]
        if n_ranks > 1:
            *g_align, kl_total = all_reduce_flat_([*g_align, loss.detach().reshape(1).clone()])
            return g_align, float(kl_total)
        return g_align, float(loss.detach())

    def before_optimizer_step(self, trainer: Trainer) -> None:
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        g_task = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        g_align, kl = self.alignment_gradient(trainer, params)
        finite = bool(torch.isfinite(flat_dot(g_align, g_align)))  # identical on all ranks after all_reduce
        if not finite:
            log.warning("safegrad: non-finite alignment gradient at step %d (KL=%s); using the task gradient "
                        "unchanged this step", trainer.state.global_step + 1, kl)
            self.skipped_steps += 1
            g_align = [torch.zeros_like(p) for p in params]
        result: SurgeryResult = safegrad_update(g_task, g_align, self.args.lambda_align)
        for p, u in zip(params, result.update):
            if p.grad is None:
                p.grad = u.to(p.dtype)
            elif u is not p.grad:
                p.grad.copy_(u)
        self.steps += 1
        self.projected_steps += result.projected
        self.last = {"align_kl": kl, "align_cosine": result.cosine, "align_projected": float(result.projected),
                     "align_grad_norm": result.align_norm, "task_grad_norm": result.task_norm}

    # -- bookkeeping ------------------------------------------------------------------------------------
    def log_stats(self) -> dict[str, float]:
        """The last step's alignment KL, cosine(g_u, g_a), projection flag (1 = conflict, projected) and gradient
        norms (``task_grad_norm`` after the trainer's clipping), plus the number of projected steps so far."""
        stats = dict(self.last)
        stats["align_projections"] = float(self.projected_steps)
        if self.skipped_steps:
            stats["align_skipped_steps"] = float(self.skipped_steps)
        return stats

    def state_dict(self) -> dict[str, Any]:
        cursor = self.stream.cursor if self.stream is not None else self._resume_cursor
        return {"cursor": cursor, "steps": self.steps, "projected_steps": self.projected_steps,
                "skipped_steps": self.skipped_steps, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume_cursor = int(state.get("cursor", 0))
        if self.stream is not None:
            self.stream.cursor = self._resume_cursor
        self.steps = int(state.get("steps", 0))
        self.projected_steps = int(state.get("projected_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last = dict(state.get("last", {}))
