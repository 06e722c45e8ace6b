"""SafeGrad (Yi et al., arXiv 2508.07172): safe fine-tuning by gradient surgery.

Every optimizer step, next to the task gradient ``g_u`` (the user's possibly poisoned batch, accumulated,
all-reduced and clipped by the trainer), SafeGrad computes an alignment gradient ``g_a``: the gradient of
the token-level KL divergence between the frozen well-aligned base model and the current model on the
assistant tokens of a small batch of safety examples (harmful prompt + safe reply). If the two conflict
(``g_u · g_a < 0``), the component of ``g_u`` along ``g_a`` is removed; the step then follows
``g_u' + lambda_align * g_a``. The base distribution comes from the same weights with the LoRA adapter
switched off, so no second copy of the model is kept. Since neither the base model nor the alignment examples
change, the base distributions are computed once per example at setup (``base_cache``: exact log-probabilities,
or the top-k plus the tail mass when the exact cache would be too large), and a step runs only the current
model's forward and backward over the alignment batch.

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
from spard.data.chat import IGNORE_INDEX, collate
from spard.data.records import Record
from spard.data.safety import SafetyStream, cyclic_indices, load_pool, tokenize_safety
from spard.defenses.base import Defense, DefenseContext, register
from spard.distributed import all_reduce_flat_, all_reduce_sum_, world
from spard.errors import ConfigError
from spard.surgery import SurgeryResult, flat_dot, project_conflicting, safegrad_update

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import Trainer

__all__ = ["SafeGrad", "SafeGradArgs", "project_conflicting", "token_kl", "alignment_kl", "alignment_kl_sum",
           "BaseTokens", "base_token_kl", "base_tokens", "cached_alignment_kl_sum"]

log = logging.getLogger(__name__)

KL_DIRECTIONS = ("forward", "reverse")
BASE_CACHE_MODES = ("auto", "exact", "topk", "none")


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
    base_cache: str = "auto"
    """The base model (adapter off) and the alignment examples never change, so their next-token distributions
    are computed once per example at setup and a step runs only the current model's forward/backward.
    ``exact``: full log-probabilities (the same KL and gradient as recomputing them, up to float rounding);
    ``topk``: the ``base_cache_topk`` likeliest tokens plus the rest as one tail bucket (the KL of the
    coarse-grained distributions: never above the exact KL, short of it by the tail's own divergence);
    ``auto``: ``exact`` if it fits in ``base_cache_max_mb``, else ``topk``; ``none``: a base forward every step
    (the reference's cost)."""
    base_cache_topk: int = 256
    """``topk`` cache: tokens kept per position."""
    base_cache_max_mb: float = 1024.0
    """``auto``: the largest exact cache (MiB, fp32 log-probs at every assistant position of the examples a run
    draws) before ``topk`` is used instead."""

    def __post_init__(self) -> None:
        check_choice("base_cache", self.base_cache, BASE_CACHE_MODES)
        check_range("base_cache_topk", self.base_cache_topk, 1)
        check_range("base_cache_max_mb", self.base_cache_max_mb, 0.0)
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


@dataclass
class BaseTokens:
    """The base model's next-token distributions at a run of assistant positions (rows in batch order).

    Exact: ``scores`` are the logits ``[T, V]`` (fp32 at least), kept unnormalised so that :func:`token_kl`
    normalises them exactly as it normalises the current logits: an identical current model then gives a
    bitwise-zero KL. Top-k: ``scores`` ``[T, k]`` are the k largest log-probabilities, ``ids`` ``[T, k]`` their
    vocabulary ids and ``log_tail`` ``[T]`` the log of the mass of all other tokens."""

    scores: Tensor
    ids: Tensor | None = None
    log_tail: Tensor | None = None

    @classmethod
    def from_logits(cls, logits: Tensor, topk: int | None = None) -> BaseTokens:
        """From base logits ``[T, V]``: exact (the logits, fp32 at least), or (``topk`` < V) the top-k
        log-probabilities and the tail."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if topk is None or topk >= logits.shape[-1]:
            return cls(logits)
        log_q = F.log_softmax(logits, dim=-1)
        top, ids = log_q.topk(topk, dim=-1)
        # tail mass in log space (never 1 - sum(top), which cancels catastrophically when the tail is tiny)
        log_tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
        return cls(top, ids, log_tail.clamp(min=_LOG_FLOOR))

    @classmethod
    def cat(cls, parts: list[BaseTokens]) -> BaseTokens:
        if parts[0].ids is None:
            return cls(torch.cat([p.scores for p in parts]))
        return cls(torch.cat([p.scores for p in parts]), torch.cat([p.ids for p in parts]),  # type: ignore[misc]
                   torch.cat([p.log_tail for p in parts]))  # type: ignore[misc]

    def to(self, device: torch.device | str) -> BaseTokens:
        return BaseTokens(*(None if t is None else t.to(device) for t in (self.scores, self.ids, self.log_tail)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scores, self.ids, self.log_tail) if t is not None)


_LOG_FLOOR = -1e4
"""Floor of a cached log tail mass: a tail that underflows to 0 must not make 0 · (−inf) = NaN in the KL."""


def base_token_kl(logits: Tensor, base: BaseTokens, direction: str = "forward") -> Tensor:
    """Per-token KL between cached base distributions and the current ``logits`` ``[T, V]`` (differentiable).

    Exact base: :func:`token_kl` on the cached logits. Top-k base: the KL between the two
    distributions coarse-grained to k + 1 outcomes (the base's k likeliest tokens, and everything else as one
    bucket), for the current model ``[log p_top, log(1 − Σ p_top)]``; by the log-sum inequality it is at
    most the exact KL, and it equals it when each distribution's tail is proportional to the other's.
    """
    if base.ids is None:
        return token_kl(logits, base.scores, direction)
    assert base.log_tail is not None
    log_p = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top_p = log_p.gather(-1, base.ids)
    tail_p = log_p.scatter(-1, base.ids, float("-inf")).logsumexp(-1).clamp(min=_LOG_FLOOR)
    current = torch.cat([top_p, tail_p.unsqueeze(-1)], dim=-1)
    reference = torch.cat([base.scores, base.log_tail.unsqueeze(-1)], dim=-1)
    return token_kl(current, reference, direction)


def base_tokens(model: PeftModel, features: dict[str, list[int]], topk: int | None = None) -> BaseTokens:
    """The base model's (adapter off) distributions at one alignment example's assistant positions, computed on
    the example alone (no padding), so the result does not depend on which batch it is later drawn in."""
    with torch.no_grad(), model.disable_adapter():
        logits = assistant_logits(model, features)
    return BaseTokens.from_logits(logits, topk)


def assistant_logits(model: PeftModel, features: dict[str, list[int]]) -> Tensor:
    """Logits ``[T, V]`` at the positions predicting one example's assistant tokens, the example forwarded alone.

    The output head runs on those positions only (``logits_to_keep``): the vocabulary projection is a large
    share of a small model's forward and backward, and the prompt positions carry no KL term. The cache
    (:func:`base_tokens`) and the step (:func:`cached_alignment_kl_sum`) both go through here, so at an
    identity adapter their logits are computed identically and agree bitwise.
    """
    ids = torch.tensor([features["input_ids"]], device=model.device)
    mask = torch.tensor(features["labels"][1:], device=model.device) != IGNORE_INDEX
    positions = mask.nonzero().squeeze(-1)  # logits at position t predict token t + 1
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), logits_to_keep=positions).logits[0]


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


def cached_alignment_kl_sum(model: PeftModel, examples: list[dict[str, list[int]]], bases: list[BaseTokens],
                            direction: str = "forward") -> tuple[Tensor, int]:
    """:func:`alignment_kl_sum` from cached base distributions (:func:`base_tokens`): only the current model runs.

    Each example is forwarded alone and unpadded, exactly as its base distributions were computed, so at an
    identity adapter (LoRA B = 0: the first step) current and base logits are bitwise equal and the KL and its
    gradient exactly zero, as without the cache (a padded batch would differ by rounding, and the surgery is
    scale-invariant: it would project on that noise). On a CPU the unpadded forwards cost no more than one
    padded batch; on a GPU the alignment batch is small either way.
    """
    total: Tensor | None = None
    n_tokens = 0
    for features, base in zip(examples, bases, strict=True):
        logits = assistant_logits(model, features)
        n_assistant = logits.shape[0]
        if base.scores.shape[0] != n_assistant:
            raise ValueError(f"cached base distributions for {base.scores.shape[0]} tokens, the example has "
                             f"{n_assistant}")
        kl = base_token_kl(logits, base.to(logits.device), direction).sum()
        total = kl if total is None else total + kl
        n_tokens += n_assistant
    if total is None:
        raise ValueError("cached_alignment_kl_sum: no examples")
    return total, n_tokens


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
        self.features: list[dict[str, list[int]]] = []
        self.base_cache: dict[int, BaseTokens] = {}
        """Base distributions per alignment example (index into ``features``), filled at setup."""
        self.cache_topk: int | None = None
        """None: the cache holds exact log-probs; else the k of the top-k cache."""
        self.cache_stats: dict[str, float] = {}

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
        self.features, self.base_cache = features, {}
        if self.args.base_cache != "none":
            self._fill_cache(trainer)

    def planned_examples(self, trainer: Trainer) -> list[int]:
        """The alignment examples this run will draw: the stream from its start over ``max_steps`` steps (a
        resumed run draws a part of the same stream), or all of them when the step count is not known."""
        n = len(self.features)
        steps = int(getattr(getattr(trainer, "state", None), "max_steps", 0) or 0)
        if steps <= 0:
            return list(range(n))
        return sorted(set(cyclic_indices(0, steps * self.args.alignment_batch_size, n, self.seed)))

    def _fill_cache(self, trainer: Trainer) -> None:
        """Compute the base distributions of the planned examples once (adapter off, one example per forward);
        ``auto`` picks exact or top-k by the exact cache's size."""
        import time

        a = self.args
        wanted = self.planned_examples(trainer)
        vocab = int(trainer.model.get_output_embeddings().weight.shape[0])
        tokens = sum(sum(t != IGNORE_INDEX for t in self.features[i]["labels"][1:]) for i in wanted)
        exact_mb = tokens * vocab * 4 / 2**20
        mode = a.base_cache if a.base_cache != "auto" else ("exact" if exact_mb <= a.base_cache_max_mb else "topk")
        self.cache_topk = a.base_cache_topk if mode == "topk" and a.base_cache_topk < vocab else None
        start = time.perf_counter()
        self._ensure_cached(trainer, wanted)
        self.cache_stats = {"base_cache_examples": float(len(self.base_cache)), "base_cache_tokens": float(tokens),
                            "base_cache_mb": sum(b.nbytes for b in self.base_cache.values()) / 2**20,
                            "base_cache_seconds": time.perf_counter() - start}
        log.info("safegrad: cached the base distributions of %d alignment examples (%d tokens, %s, %.1f MiB) in "
                 "%.1f s", len(wanted), tokens, "exact" if self.cache_topk is None else f"top-{self.cache_topk}",
                 self.cache_stats["base_cache_mb"], self.cache_stats["base_cache_seconds"])

    def _ensure_cached(self, trainer: Trainer, indices: list[int]) -> None:
        """Compute the base distributions of any of ``indices`` not cached yet (e.g. steps beyond the plan)."""
        missing = [i for i in dict.fromkeys(indices) if i not in self.base_cache]
        if not missing:
            return
        model = trainer.model
        was_training = model.training
        model.eval()  # no dropout anywhere in the base pass (the adapter, which has the dropout, is off anyway)
        try:
            with trainer.accelerator.autocast():
                for i in missing:
                    self.base_cache[i] = base_tokens(model, self.features[i], self.cache_topk).to("cpu")
        finally:
            model.train(was_training)

    def alignment_gradient(self, trainer: Trainer, params: list[Tensor]) -> tuple[list[Tensor], float]:
        """``g_a`` over the whole alignment batch (summed across ranks) and the mean KL it is the gradient of."""
        model = trainer.model
        rank, n_ranks = world()
        assert self.stream is not None
        mine = self.stream.next_indices(self.args.alignment_batch_size, rank, n_ranks)
        if mine and self.args.base_cache != "none":
            self._ensure_cached(trainer, mine)
            with trainer.accelerator.autocast():
                kl_sum, n_local = cached_alignment_kl_sum(model, [self.features[i] for i in mine],
                                                          [self.base_cache[i] for i in mine], self.args.kl_direction)
        elif mine:
            batch = {k: v.to(trainer.args.device)
                     for k, v in collate([self.features[i] for i in mine], self.stream.pad_id).items()}
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
        stats.update(self.cache_stats)  # once, on the first logged row
        self.cache_stats = {}
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
