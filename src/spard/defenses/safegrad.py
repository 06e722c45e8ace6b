"""SafeGrad (Yi et al., arXiv 2508.07172): safe fine-tuning by gradient surgery.

Every optimizer step, next to the task gradient ``g_u`` (the user's possibly poisoned batch, accumulated,
all-reduced and clipped by the trainer), SafeGrad computes an alignment gradient ``g_a``: the gradient of
the token-level KL divergence between the frozen well-aligned base model and the current model on the
assistant tokens of a small batch of safety examples (harmful prompt + safe reply). If the two conflict
(``g_u · g_a < 0``), the component of ``g_u`` along ``g_a`` is removed; the step then follows
``g_u' + lambda_align * g_a``. The base distribution comes from the same weights with the LoRA adapter
switched off, so no second copy of the model is kept. Since neither the base model nor the alignment examples
change, the base distributions are computed once per example at setup (``base_cache``: exact logits,
or the top-k plus the tail mass when the exact cache would be too large), and a step runs only the current
model's forward and backward over the alignment batch.

Distributed data parallel: each rank computes the KL on its share of the alignment batch, normalised by the
token count of the whole batch, and the gradients are summed with one ``all_reduce``; every rank then holds
the gradient of the full batch and applies the identical update. The gradient is taken with
``torch.autograd.grad`` on the unwrapped model, which neither touches ``.grad`` (holding ``g_u``) nor fires
the DDP reducer's hooks, so it works under HF Trainer's DDP wrapping without a stash of ``g_u``.

FSDP2: the gradient comes from a backward through the sharded model (``g_u`` set aside meanwhile), and the
surgery's dot products and norms are over whole tensors (:mod:`spard.distributed`); each rank rewrites its shard.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spard.args import FieldError, SafetyPoolArgs, check_choice, check_range
from spard.data.build import sample
from spard.data.chat import IGNORE_INDEX, collate
from spard.data.records import Record
from spard.data.safety import StreamOwner, load_pool, tokenize_safety
from spard.defenses.base import Defense, DefenseContext, register
from spard.errors import ConfigError
from spard.signal_guard import SignalGuard

if TYPE_CHECKING:
    from torch import Tensor
    from transformers import Trainer

    from spard.alignment_kl import BaseTokens

# The tensor code (spard.alignment_kl, spard.surgery, torch) is imported where it runs, so resolving a config that
# names this defense does not load torch.
__all__ = ["SafeGrad", "SafeGradArgs"]

log = logging.getLogger(__name__)

KL_DIRECTIONS = ("forward", "reverse")
"""``kl_direction`` choices (also :data:`spard.alignment_kl.KL_DIRECTIONS`)."""
BASE_CACHE_MODES = ("auto", "exact", "topk", "none")


@dataclass
class SafeGradArgs(SafetyPoolArgs):
    name: str = "safegrad"
    """Defense name."""
    alignment_examples: int = 100
    """Safety examples (harmful prompt + safe reply) the alignment gradient is computed on; as few as 20 work."""
    alignment_batch_size: int = 2
    """Alignment examples per optimizer step (across all ranks). Each step adds the current model's forward and
    backward over this batch (the base side comes from ``base_cache``), so the extra cost grows with its share of
    the step's tokens: ``perf/step_overhead.py`` prints it beside plain SFT (docs/fidelity.md has the figures)."""
    alignment_max_length: int | None = None
    """Token limit per alignment example; ``null`` = ``data.max_length``."""
    kl_direction: str = "forward"
    """``forward`` = KL(p_base ‖ p_θ) (distillation from the aligned base); ``reverse`` = KL(p_θ ‖ p_base)."""
    lambda_align: float = 1.0
    """Weight of the alignment gradient added to the (projected) task gradient; 0 = surgery only."""
    base_cache: str = "auto"
    """The base model (adapter off) and the alignment examples never change, so their next-token distributions
    are computed once per example at setup and a step runs only the current model's forward/backward.
    ``exact``: full logits (the same KL and gradient as recomputing them, up to float rounding);
    ``topk``: the ``base_cache_topk`` likeliest tokens plus the rest as one tail bucket (the KL of the
    coarse-grained distributions: never above the exact KL, short of it by the tail's own divergence);
    ``auto``: ``exact`` if it fits in ``base_cache_max_mb``, else ``topk``; ``none``: a base forward every step
    (the unoptimised per-step computation the paper describes)."""
    base_cache_topk: int = 256
    """``topk`` cache: tokens kept per position."""
    base_cache_max_mb: float = 1024.0
    """``auto``: the largest exact cache (MiB, fp32 logits at every assistant position of the examples a run
    draws) before ``topk`` is used instead."""
    pack_alignment: bool = True
    """Forward the alignment batch as one packed row (the examples back to back, no padding) instead of a padded
    batch, when the model keeps packed examples apart: checked once at setup on this rank's first planned batch
    against the padded forward (``spard.alignment_kl.packing_matches_padding``); if they differ, padding is used
    with a warning. Applies to the cached modes (``base_cache`` not ``none``)."""

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
# The defense
# ---------------------------------------------------------------------------------------------------------
def _check_supported(trainer: Trainer) -> None:
    """SafeGrad reads and rewrites whole gradients in ``param.grad`` (sharded ones under FSDP2, reduced over their
    shard group): engines that keep gradients elsewhere (DeepSpeed, FSDP1, Megatron, XLA) are refused."""
    from spard.distributed import check_engine

    check_engine(trainer, "defense.name='safegrad'")


@register
class SafeGrad(StreamOwner, Defense):
    """Project the task gradient off the alignment gradient when they conflict; add the alignment gradient."""

    name = "safegrad"
    Args = SafeGradArgs
    args: SafeGradArgs

    def __init__(self, args: SafeGradArgs) -> None:
        super().__init__(args)
        self.alignment_records: list[Record] | None = None
        self.seed = 0
        self.max_length = 256
        self.steps = 0
        self.projected_steps = 0
        self.skipped_steps = 0
        self.last: dict[str, float] = {}
        self.base_cache: dict[int, BaseTokens] = {}
        """Base distributions per alignment example (index into ``features``), filled at setup."""
        self.cache_topk: int | None = None
        """None: the cache holds exact logits; else the k of the top-k cache."""
        self.cache_stats: dict[str, float] = {}
        self.packed = False
        """Whether the alignment batch is forwarded packed (decided at setup)."""
        self.guard = SignalGuard(self.name, "alignment gradient norm")
        self.checkpointing = "off"
        """The model's gradient checkpointing mode (``spard.checkpointing``), read at setup."""
        self.sharded = False
        """Under FSDP2: forwards are collective (every rank runs each one or none does)."""

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
        from spard.distributed import any_sharded, world

        self.sharded = any_sharded([p for p in trainer.model.parameters() if p.requires_grad])
        from spard.checkpointing import checkpointing_mode

        self.checkpointing = checkpointing_mode(trainer.model)  # read once: it walks every module
        n_ranks = world()[1]
        if self.sharded and self.args.alignment_batch_size < n_ranks:
            # every FSDP rank must run the alignment forward (it all-gathers the shards), so each needs an example
            raise ConfigError(f"defense.alignment_batch_size={self.args.alignment_batch_size} is below the "
                              f"{n_ranks} FSDP ranks: under FSDP every rank needs at least one alignment example "
                              "per step")
        self.start_stream(features, seed=self.seed, pad_id=tokenizer.pad_token_id)
        self.guard = SignalGuard(self.name, "alignment gradient norm")
        self.base_cache = {}
        self.packed = False
        if self.args.base_cache != "none":
            batches = self.planned_batches(trainer)
            if self.args.pack_alignment:
                self._decide_packing(trainer, batches)
            self._fill_cache(trainer, batches)

    def planned_batches(self, trainer: Trainer) -> list[list[int]]:
        """This rank's alignment examples at each step of the run: the stream from its start over ``max_steps``
        steps (a resumed run draws a part of the same stream), or, when the step count is not known, every
        example once in stream order."""
        from spard.distributed import world

        assert self.stream is not None
        rank, n_ranks = world()
        n, size = len(self.stream.features), self.args.alignment_batch_size
        steps = int(getattr(getattr(trainer, "state", None), "max_steps", 0) or 0) or -(-n // size)
        return [self.stream.indices_at(step * size, size, rank, n_ranks) for step in range(steps)]

    @contextlib.contextmanager
    def _setup_pass(self, trainer: Trainer) -> Iterator[None]:
        """A forward outside the training step: eval mode (no dropout) under the trainer's autocast, the model's
        mode restored afterwards."""
        model = trainer.model
        was_training = model.training
        model.eval()
        try:
            with trainer.accelerator.autocast():
                yield
        finally:
            model.train(was_training)

    def _decide_packing(self, trainer: Trainer, batches: list[list[int]]) -> None:
        """Pack the alignment batch if this model keeps packed examples apart (checked on the first planned batch
        of two or more examples, forwarded both ways)."""
        from spard.alignment_kl import packing_matches_padding

        assert self.stream is not None
        batch = next((b for b in batches if len(b) > 1), None)
        if not self._all_ranks(batch is not None):  # one example per step (on some rank): nothing to pad
            return
        assert batch is not None
        with self._setup_pass(trainer):
            same, tv = packing_matches_padding(trainer.model, [self.stream.features[i] for i in batch],
                                               self.stream.pad_id)
        same = self._all_ranks(same)
        self.packed = same
        if same:
            log.info("safegrad: alignment batches are forwarded packed (largest difference from padding: total "
                     "variation %.1e)", tv)
        else:
            log.warning("safegrad: this model's attention does not keep packed examples apart (total variation "
                        "%.3g from the padded forward); alignment batches are padded", tv)
        self.cache_stats["alignment_packed"] = float(same)

    def _fill_cache(self, trainer: Trainer, batches: list[list[int]]) -> None:
        """Compute the base distributions of the planned examples once (adapter off), batch by batch in the order
        the steps will draw them; ``auto`` picks exact or top-k by the exact cache's size."""
        import time

        a = self.args
        wanted = sorted({i for batch in batches for i in batch})
        vocab = int(trainer.model.get_output_embeddings().weight.shape[0])
        assert self.stream is not None
        features = self.stream.features
        tokens = sum(sum(t != IGNORE_INDEX for t in features[i]["labels"][1:]) for i in wanted)
        exact_mb = tokens * vocab * 4 / 2**20
        mode = a.base_cache if a.base_cache != "auto" else ("exact" if exact_mb <= a.base_cache_max_mb else "topk")
        self.cache_topk = a.base_cache_topk if mode == "topk" and a.base_cache_topk < vocab else None
        start = time.perf_counter()
        for batch in batches:
            self._ensure_cached(trainer, batch)
        self.cache_stats.update({
            "base_cache_examples": float(len(self.base_cache)), "base_cache_tokens": float(tokens),
            "base_cache_mb": sum(b.nbytes for b in self.base_cache.values()) / 2**20,
            "base_cache_seconds": time.perf_counter() - start})
        log.info("safegrad: cached the base distributions of %d alignment examples (%d tokens, %s, %.1f MiB) in "
                 "%.1f s", len(wanted), tokens, "exact" if self.cache_topk is None else f"top-{self.cache_topk}",
                 self.cache_stats["base_cache_mb"], self.cache_stats["base_cache_seconds"])

    def _ensure_cached(self, trainer: Trainer, batch: list[int]) -> None:
        """Cache the base distributions of the examples of ``batch`` not cached yet, computed on the whole batch
        (the forward a step runs on it, padded or packed); an example keeps the values of the first batch it was
        in."""
        from spard.alignment_kl import base_tokens

        if self._all_ranks(all(i in self.base_cache for i in batch)):
            return
        assert self.stream is not None
        with self._setup_pass(trainer):
            bases = base_tokens(trainer.model, [self.stream.features[i] for i in batch], self.stream.pad_id,
                                self.cache_topk, packed=self.packed)
        for i, base in zip(batch, bases):
            self.base_cache.setdefault(i, base.to("cpu"))

    def _all_ranks(self, flag: bool) -> bool:
        """Under FSDP2, whether ``flag`` holds on every rank (so a forward runs on all ranks or on none: a forward
        all-gathers the shards); else ``flag`` itself."""
        if not self.sharded:
            return flag
        import torch

        from spard.distributed import all_reduce_sum_, world

        return int(all_reduce_sum_(torch.tensor([float(not flag)]))[0]) == 0 if world()[1] > 1 else flag

    def alignment_gradient(self, trainer: Trainer, params: list[Tensor]) -> tuple[list[Tensor], float]:
        """``g_a`` over the whole alignment batch (summed across ranks) and the mean KL it is the gradient of."""
        import torch

        from spard.alignment_kl import alignment_kl_sum, cached_alignment_kl_sum
        from spard.checkpointing import parameter_gradients
        from spard.distributed import all_reduce_flat_, all_reduce_sum_, any_sharded, world

        model = trainer.model
        rank, n_ranks = world()
        assert self.stream is not None
        mine = self.stream.next_indices(self.args.alignment_batch_size, rank, n_ranks)
        if mine and self.args.base_cache != "none":
            self._ensure_cached(trainer, mine)
            with trainer.accelerator.autocast():
                kl_sum, n_local = cached_alignment_kl_sum(model, [self.stream.features[i] for i in mine],
                                                          [self.base_cache[i] for i in mine], self.stream.pad_id,
                                                          self.args.kl_direction, packed=self.packed)
        elif mine:
            batch = {k: v.to(trainer.args.device)
                     for k, v in collate([self.stream.features[i] for i in mine], self.stream.pad_id).items()}
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
        if any_sharded(params):
            return self._sharded_gradient(loss, params, n_ranks)
        if loss.requires_grad:
            # after DDP's backward has finished, so a plain backward (reentrant checkpointing) is safe here
            g_align = parameter_gradients(loss, params, mode=self.checkpointing)
        else:
            g_align = [torch.zeros_like(p) for p in params]
        if n_ranks > 1:
            *g_align, kl_total = all_reduce_flat_([*g_align, loss.detach().reshape(1).clone()])
            return g_align, float(kl_total)
        return g_align, float(loss.detach())

    @staticmethod
    def _sharded_gradient(loss: Tensor, params: list[Tensor], n_ranks: int) -> tuple[list[Tensor], float]:
        """FSDP2: ``autograd.grad`` cannot reach sharded parameters (FSDP's all-gather is outside autograd), so a
        plain backward through the sharded model fills ``.grad`` (its reduce-scatter averages over ranks: the loss
        is scaled by the rank count to make that the sum); ``g_u`` is set aside in the meantime."""
        import torch

        from spard.distributed import all_reduce_sum_

        task = [p.grad for p in params]
        for p in params:
            p.grad = None
        try:
            if loss.requires_grad:
                (loss * n_ranks).backward()
            g_align = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        finally:
            for p, g in zip(params, task):
                p.grad = g
        kl_total = all_reduce_sum_(loss.detach().float().reshape(1).clone())
        return g_align, float(kl_total)

    def before_optimizer_step(self, trainer: Trainer) -> None:
        import torch

        from spard.surgery import flat_dot, safegrad_update

        params = [p for p in trainer.model.parameters() if p.requires_grad]
        g_task = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        g_align, kl = self.alignment_gradient(trainer, params)
        align_sq = float(flat_dot(g_align, g_align))  # identical on all ranks after all_reduce
        # zero at step 1 by design (the adapter is still the identity, KL 0); the guard looks at the first steps
        self.guard.observe(math.sqrt(align_sq) if align_sq >= 0 else align_sq, trainer.state.global_step + 1)
        finite = math.isfinite(align_sq)
        if not finite:
            log.warning("safegrad: non-finite alignment gradient at step %d (KL=%s); using the task gradient "
                        "unchanged this step", trainer.state.global_step + 1, kl)
            self.skipped_steps += 1
            g_align = [torch.zeros_like(p) for p in params]
        result = safegrad_update(g_task, g_align, self.args.lambda_align)
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
        return {"cursor": self.stream_cursor, "steps": self.steps, "projected_steps": self.projected_steps,
                "skipped_steps": self.skipped_steps, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore_stream_cursor(state.get("cursor", 0))
        self.steps = int(state.get("steps", 0))
        self.projected_steps = int(state.get("projected_steps", 0))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.last = dict(state.get("last", {}))
