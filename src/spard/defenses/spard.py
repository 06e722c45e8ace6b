"""SPARD: DPP-selected safety data + SPAG (safety-projected gradient) steps during LoRA fine-tuning.

The defense never adds safety data to the utility loss. Instead:

1. **Selection** (``setup``): a few refusals (``safety_fraction`` of the fine-tuning set, or ``safety_k``)
   are chosen from the safety pool by :func:`spard.selection.select_safety_subset`: relevant to the user's
   prompts and diverse (DPP), embedded by the base model itself (LoRA adapter disabled) or a
   sentence-transformers encoder. Attack prompts never enter the pool. The subset is written to
   ``run_dir/safety_subset.jsonl`` (+ ``safety_subset_stats.json``); the pool's embeddings are cached once
   per base model under the spard cache (``embeddings/``), the task prompts' under the run dir.
2. **SPAG** (``after_optimizer_step``): after every utility step, ``L_s`` (the joint assistant-token mean
   cross-entropy of the next ``train.grad_accum × safety_batch_size`` examples of that subset, for the
   default ``projection: reference``) is measured. Only when ``L_s > tau + delta`` is a safety step taken:
   ``reference`` = the reference code's step (global clip, per-tensor scale, a step of the run's own AdamW,
   dropout on; ``tests/test_spard_reference.py`` re-computes it), ``halfspace`` = the exact first-order
   projection onto ``{θ : L_s(θ) ≤ tau}`` (:mod:`spard.projection`).

Multi-process (DDP) runs: every rank draws its own slice of one global safety batch; the loss sums, token
counts and the gradient are all-reduced explicitly, so every rank sees the same ``L_s`` and gradient,
takes the same decision and applies the same update. We back-propagate through the *unwrapped* model: the
DDP reducer ignores autograd hooks it did not arm with a DDP forward, so this neither trips the reducer
nor depends on bucket internals (``tests/test_spard_ddp.py`` checks DDP against a single process).

FSDP2 runs: the model *is* the sharded module, so its backward hooks reduce-scatter the safety gradient
(an average over ranks, undone by scaling the local loss by the rank count); norms and per-tensor scales are
taken over whole tensors (:mod:`spard.distributed`), and each rank updates its own shard
(``tests/test_fsdp.py`` checks FSDP2 against a single process).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spard.args import FieldError, SafetyPoolArgs, check_choice, check_range
from spard.data.records import Record
from spard.data.safety import StreamOwner, load_pool, tokenize_safety
from spard.defenses.base import Defense, DefenseContext, register
from spard.errors import ConfigError
from spard.io import atomic_write_json, atomic_write_jsonl
from spard.signal_guard import SignalGuard

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, Trainer

# The tensor code (torch, spard.projection: the SPAG math, spard.distributed) is imported where it runs, so
# resolving a config that names this defense does not load torch.
__all__ = ["SpardArgs", "Spard", "BaseModelEmbedder"]

log = logging.getLogger(__name__)

SELECTIONS = ("dpp", "random", "relevance_topk")
PROJECTIONS = ("halfspace", "reference")
SUBSET_FILE = "safety_subset.jsonl"
SUBSET_STATS_FILE = "safety_subset_stats.json"
EMBED_CACHE_DIR = "cache/embeddings"
SHARED_EMBED_CACHE_DIR = "embeddings"
"""Under :func:`spard.models.cache_dir`: safety-pool embeddings shared by every run on the same base model."""


@dataclass
class SpardArgs(SafetyPoolArgs):
    name: str = "spard"
    """Defense name."""
    selection: str = "dpp"
    """How the safety subset is chosen: ``dpp`` (relevant and diverse), ``relevance_topk`` or ``random``."""
    safety_fraction: float = 0.03
    """Safety subset size as a fraction of the fine-tuning set (``ceil``), when ``safety_k`` is null."""
    safety_k: int | None = None
    """Explicit safety subset size (overrides ``safety_fraction``)."""
    beta: float = 4.0
    """DPP relevance sharpness: quality = |max cosine similarity to a task prompt| ** beta (the reference's
    ``max_cos ** beta``; the kernel sees only its square, so the sign does not matter)."""
    embedder: str = "base"
    """Prompt embedder for selection: ``base`` (mean-pooled last hidden state of the model being fine-tuned,
    LoRA adapter disabled) or a sentence-transformers hub id / local path."""
    embedder_dtype: str = "float32"
    """Precision of the ``base`` embedder: ``float32`` (the reference: its own fp32 load; when the model being
    fine-tuned is 8/4-bit or bf16, its checkpoint is loaded again in fp32 for the embeddings, else the model
    itself is used) or ``model`` (the model being fine-tuned as loaded, no second load)."""
    tau: float = 0.2
    """Safety threshold: the projection targets ``L_s(θ) ≤ tau`` (mean refusal-token cross-entropy)."""
    delta: float = 0.1
    """Tolerance: project only when ``L_s > tau + delta`` (saves the backward when nearly feasible)."""
    projection: str = "reference"
    """``reference`` (the paper's numbers come from it): the reference code's rule, step for step: the safety
    gradient clipped globally to ``train.max_grad_norm``, each tensor's gradient scaled by
    ``min((L_s - tau) / (‖g_p‖ + 1e-8), alpha_max)``, then a step of the run's own AdamW (shared moments, current
    LR). ``halfspace``: the exact first-order projection onto ``{L_s ≤ tau}`` over all trainable parameters,
    applied directly (capped by ``max_step``)."""
    max_step: float | None = 0.25
    """``halfspace``: cap on the L2 norm of one projection step over the trainable (LoRA) parameters, a trust
    region; null = uncapped. 0.25 was chosen by the trust-region study on the embedded model
    (``configs/bench/trust_region.yaml``, docs/fidelity.md); the scale depends on the model and adapter size."""
    alpha_max: float = 1.0
    """``reference``: cap on the per-tensor gradient scale (reference default 1)."""
    safety_batch_size: int = 1
    """Safety examples per device per safety micro-batch (1 = the reference's size). A check draws
    ``safety_micro_batches`` of them per device (global: x ranks)."""
    safety_micro_batches: int | None = None
    """Micro-batches per safety check; ``null`` = ``train.grad_accum`` for ``projection: reference`` (the
    reference draws grad_accum x safety_batch_size examples per check, L_s is their joint token mean) and 1
    for ``halfspace``."""
    safety_dropout: bool | None = None
    """Run the safety forward in train mode (LoRA dropout on); ``null`` = on for ``reference`` (as the reference
    code), off for ``halfspace`` (its step relies on L_s and its gradient being one deterministic function)."""
    safety_max_length: int | None = None
    """Token limit per safety example; null = ``data.max_length``."""

    def __post_init__(self) -> None:
        check_choice("selection", self.selection, SELECTIONS)
        check_choice("projection", self.projection, PROJECTIONS)
        check_range("safety_fraction", self.safety_fraction, 0.0, 1.0)
        if self.safety_k is not None and self.safety_k < 1:
            raise FieldError("safety_k", self.safety_k, "must be >= 1 (or null to use safety_fraction)")
        check_range("beta", self.beta, 0.0)
        if not self.embedder or not str(self.embedder).strip():
            raise FieldError("embedder", self.embedder, "must be 'base' or a sentence-transformers id / path")
        check_choice("embedder_dtype", self.embedder_dtype, ("float32", "model"))
        check_range("tau", self.tau, 0.0)
        check_range("delta", self.delta, 0.0)
        if self.max_step is not None and not self.max_step > 0:
            raise FieldError("max_step", self.max_step, "must be > 0 (or null for no cap)")
        if not self.alpha_max > 0:
            raise FieldError("alpha_max", self.alpha_max, "must be > 0")
        check_range("safety_batch_size", self.safety_batch_size, 1)
        if self.safety_micro_batches is not None:
            check_range("safety_micro_batches", self.safety_micro_batches, 1)
        if self.safety_dropout is not None and not isinstance(self.safety_dropout, bool):
            raise FieldError("safety_dropout", self.safety_dropout, "must be true, false or null")
        if self.safety_max_length is not None:
            check_range("safety_max_length", self.safety_max_length, 8)

    @property
    def dropout_on(self) -> bool:
        """Whether the safety forward runs in train mode (resolves ``safety_dropout: null``)."""
        return self.projection == "reference" if self.safety_dropout is None else self.safety_dropout

    def micro_batches(self, grad_accum: int) -> int:
        """Safety micro-batches per check (resolves ``safety_micro_batches: null``)."""
        if self.safety_micro_batches is not None:
            return self.safety_micro_batches
        return grad_accum if self.projection == "reference" else 1


# ---------------------------------------------------------------------------------------------------------
# Selection helpers
# ---------------------------------------------------------------------------------------------------------
def base_weights_fingerprint(model: torch.nn.Module, samples: int = 16) -> str:
    """A hash of a PEFT model's *base* weights (LoRA tensors excluded), naming the ``base`` embedder in the
    embedding cache: a resumed run (whose adapter holds trained weights) reuses the first start's embeddings."""
    from spard.fingerprint import weights_fingerprint

    return weights_fingerprint(model, samples, exclude_lora=True)


class BaseModelEmbedder:
    """The ``base`` embedder: :class:`spard.selection.LMEmbedder` run on a PEFT model with its adapter off.

    Embedding inside ``disable_adapter()`` means the result is the base model's whatever the adapter holds
    (fresh at start, trained on resume), so selection is identical on resume; ``cache_key`` hashes the base
    weights only, so the resumed run also hits the embedding cache.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 16,
                 max_length: int = 512) -> None:
        from spard.distributed import any_sharded
        from spard.selection import LMEmbedder

        self.model = model
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        # FSDP2: the forward must enter at the sharded root (the PEFT model; its adapter is off while embedding)
        sharded = any_sharded([p for p in model.parameters() if p.requires_grad])
        self.inner = LMEmbedder(model if sharded else base, tokenizer, batch_size=batch_size, max_length=max_length)
        self._key = (f"BaseModelEmbedder({type(base).__name__}:{base_weights_fingerprint(model)}, "
                     f"vocab={len(tokenizer)}, max_length={max_length}, pooling=mean-last-hidden)")

    @property
    def cache_key(self) -> str:
        return self._key

    def _adapter_off(self) -> contextlib.AbstractContextManager:
        return self.model.disable_adapter() if hasattr(self.model, "disable_adapter") else contextlib.nullcontext()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        with self._adapter_off():
            return self.inner(texts)


def subset_rows(subset: list[Record], pool: list[Record]) -> list[dict[str, Any]]:
    """``safety_subset.jsonl`` rows: selection rank, index in the (attack-filtered) pool, the record."""
    where = {id(r): i for i, r in enumerate(pool)}
    return [{"rank": i, "pool_index": where.get(id(r)), **r.to_dict()} for i, r in enumerate(subset)]


# ---------------------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------------------
@dataclass
class _StepStats:
    """What the last safety step did (logged by ``log_stats``)."""

    loss: float = float("nan")
    projected: bool = False
    step_norm: float = 0.0
    grad_norm: float | None = None
    """``‖g_s‖`` (before any clipping); None when the backward was skipped."""


@dataclass
class _State:
    """The running counters resume needs (the stream position is the safety stream's own ``cursor``)."""

    steps: int = 0
    projections: int = 0
    last: _StepStats = field(default_factory=_StepStats)


@register
class Spard(StreamOwner, Defense):
    """SPARD: DPP-selected refusals, kept out of the utility loss, enforced by a safety projection per step."""

    name = "spard"
    Args = SpardArgs
    args: SpardArgs

    def __init__(self, args: SpardArgs) -> None:
        super().__init__(args)
        self.state = _State()
        self.guard = SignalGuard(self.name, "safety gradient norm")
        self.task_records: list[Record] | None = None
        self.pool: list[Record] = []
        self.subset: list[Record] = []
        self.params: list[torch.nn.Parameter] = []
        self.has_grad: list[bool] = []
        """Per trainable tensor: did the last safety backward reach it (on some rank)."""
        self.selection_stats: dict[str, Any] = {}
        self.sharded = False
        """FSDP2: the backward goes through the sharded model, whose hooks average the gradient over ranks."""
        self._grad_scale = 1.0
        self._ctx: DefenseContext | None = None

    # -- data --------------------------------------------------------------------------------------------
    def target_k(self, n_task: int) -> int:
        """Subset size: ``safety_k``, else ``ceil(safety_fraction · n_task)``."""
        from spard.selection.select import target_k

        return self.args.safety_k if self.args.safety_k is not None else target_k(n_task, self.args.safety_fraction)

    def prepare_data(self, records: list[Record], ctx: DefenseContext) -> list[Record]:
        """Keep the training set unchanged; remember it (selection compares the pool to it) and load the pool."""
        k = self.target_k(len(records))
        if k < 1:
            raise ConfigError(
                f"defense.safety_fraction={self.args.safety_fraction} of {len(records)} training records selects "
                "no safety example; raise it or set defense.safety_k"
            )
        self.pool = load_pool(self.args, exclude_prompts=ctx.attack_prompts, need=k)
        self.task_records = list(records)
        self._ctx = ctx
        return records

    # -- setup -------------------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        if self._ctx is None or self.task_records is None:
            raise RuntimeError("Spard.setup needs prepare_data(records, ctx) first "
                               "(spard.jobs.finetune.train does both)")
        from spard.distributed import any_sharded, check_engine

        check_engine(trainer, "defense.name=spard")
        ctx = self._ctx
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        self.sharded = any_sharded(self.params)
        # Rank 0 embeds first and fills the cache; the other ranks then read the very same embeddings, so
        # every rank selects the same subset without relying on bitwise-identical forwards. Under FSDP a forward
        # is collective (it gathers the shards): all ranks embed together instead, from one cache state (the
        # barrier), so they run the same forwards on the same gathered weights and select the same subset.
        if self.sharded:
            trainer.accelerator.wait_for_everyone()
        first = contextlib.nullcontext() if self.sharded else trainer.args.main_process_first(
            desc="spard safety selection")
        with first:
            self.subset = self.select(trainer.model, ctx.tokenizer, ctx.run_dir, ctx.seed)
        if trainer.is_world_process_zero():
            atomic_write_jsonl(ctx.run_dir / SUBSET_FILE, subset_rows(self.subset, self.pool))
            atomic_write_json(ctx.run_dir / SUBSET_STATS_FILE, self.selection_stats)
        max_length = self.args.safety_max_length or ctx.config.data.max_length
        key = "defense.safety_max_length" if self.args.safety_max_length else "data.max_length"
        features = tokenize_safety(ctx.tokenizer, self.subset, max_length, key=key)
        self.start_stream(features, seed=ctx.seed, pad_id=ctx.tokenizer.pad_token_id)
        self.guard = SignalGuard(self.name, "safety gradient norm")
        log.info("spard: %d safety examples (%s), tau=%g delta=%g projection=%s", len(features),
                 self.args.selection, self.args.tau, self.args.delta, self.args.projection)

    def make_embedder(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> Any:
        """The prompt embedder ``defense.embedder`` names (``base`` = ``model`` with its adapter off)."""
        if self.args.embedder == "base":
            from spard.selection.embed import ReloadedLMEmbedder, is_full_precision

            max_length = self.args.safety_max_length or 512
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            if self.args.embedder_dtype == "float32" and not is_full_precision(base):
                key = f"{type(base).__name__}:{base_weights_fingerprint(model)}"
                return ReloadedLMEmbedder(base.config.name_or_path, tokenizer, key=key, max_length=max_length,
                                          revision=getattr(base.config, "_commit_hash", None))
            return BaseModelEmbedder(model, tokenizer, max_length=max_length)
        from spard.selection import SentenceTransformerEmbedder

        return SentenceTransformerEmbedder(self.args.embedder, show_progress=False)

    def select(self, model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, run_dir: Path,
               seed: int) -> list[Record]:
        """Choose the safety subset (deterministic in ``seed``); fills ``selection_stats``."""
        from spard.models import cache_dir
        from spard.selection import cached_embed, embed_from_superset, select_safety_subset, selection_stats
        from spard.selection.select import prompts_of

        assert self.task_records is not None
        a = self.args
        k = self.target_k(len(self.task_records))
        embedder = self.make_embedder(model, tokenizer)
        # The pool is embedded once per embedder (its key hashes the base weights) and kept in the spard cache
        # for every later run: the entry is the whole pool before this run's attack prompts were removed, so
        # runs with other attacks or seeds hit the same file. Only the user's prompts are embedded per run.
        full_pool = prompts_of(load_pool(a), "pool")
        pool_emb = embed_from_superset(embedder, prompts_of(self.pool, "pool"), full_pool,
                                       cache_dir() / SHARED_EMBED_CACHE_DIR, lock=not self.sharded)
        task_emb = cached_embed(embedder, prompts_of(self.task_records, "task"), Path(run_dir) / EMBED_CACHE_DIR)
        subset = select_safety_subset(self.pool, self.task_records, k=k, beta=a.beta, embedder=embedder,
                                      method=a.selection, seed=seed, pool_emb=pool_emb, task_emb=task_emb)
        where = {id(r): i for i, r in enumerate(self.pool)}
        stats = selection_stats(pool_emb, task_emb, [where[id(r)] for r in subset], beta=a.beta)
        self.selection_stats = {
            "method": a.selection, "k_requested": k, "k_selected": len(subset), "pool_size": len(self.pool),
            "n_task": len(self.task_records), "beta": a.beta, "embedder": a.embedder, "seed": seed,
            **{n: (None if math.isnan(v) else v) for n, v in stats.items()},
        }
        return subset

    # -- the SPAG step -----------------------------------------------------------------------------------
    def next_batch(self, trainer: Trainer) -> dict[str, torch.Tensor]:
        """This rank's slice of the next global safety batch (``safety_batch_size`` per rank)."""
        b, world, rank = self.args.safety_batch_size, trainer.args.world_size, trainer.args.process_index
        assert self.stream is not None
        batch = self.stream.next_batch(b * world, trainer.args.device, rank, world)
        assert batch is not None
        return batch

    @contextlib.contextmanager
    def _forward_context(self, trainer: Trainer) -> Iterator[None]:
        """The trainer's autocast (bf16 etc.); dropout on or off as ``safety_dropout`` says; mode restored after.

        ``halfspace`` runs dropout off so ``L_s`` and its gradient belong to one deterministic function: the
        linearisation the projection relies on, and the trigger, are then not at the mercy of a dropout mask.
        ``reference`` keeps train mode, as the reference code does.
        """
        model = trainer.model
        was_training = model.training
        model.train(self.args.dropout_on)
        try:
            with trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
                yield
        finally:
            model.train(was_training)

    def _loss_sum(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from spard.projection import token_cross_entropy_sum

        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return token_cross_entropy_sum(out.logits, batch["labels"])

    def after_optimizer_step(self, trainer: Trainer) -> None:
        # The check draws `micro_batches` safety micro-batches; L_s is the token mean over all of them (the
        # count is known from the labels before any forward, as the reference's get_batch_samples counts it).
        # Every micro-batch but the last is forwarded and back-propagated at once (one graph alive at a time,
        # as the reference); the last one's forward, with autograd on, serves both the trigger and, only if it
        # fires, the backward. With one micro-batch (the halfspace default) no backward runs when L_s <= tau +
        # delta; the reference always back-propagates, which changes nothing since it then discards the grads.
        import torch

        from spard.distributed import all_reduce_sum_, world

        a, model = self.args, trainer.model
        batches = [self.next_batch(trainer) for _ in range(a.micro_batches(trainer.args.gradient_accumulation_steps))]
        for p in self.params:  # the task gradient is still in .grad (HF zeroes it only after this hook)
            p.grad = None
        count = sum((b["labels"][:, 1:] != -100).sum() for b in batches)
        n_global = float(all_reduce_sum_(torch.as_tensor(count, dtype=torch.float64).reshape(1))[0])
        # FSDP2 averages the gradient over ranks in its backward hooks: scaling the local loss by the rank count
        # makes that average the sum of the ranks' shares (as HF does for its token-mean loss)
        self._grad_scale = float(world()[1]) if self.sharded else 1.0
        sums = []
        for i, batch in enumerate(batches):
            with self._forward_context(trainer):
                loss_sum, _ = self._loss_sum(model, batch)
            if i < len(batches) - 1 and n_global > 0:
                (loss_sum * self._grad_scale / n_global).backward()
            sums.append(loss_sum.detach().double())
        total = float(all_reduce_sum_(torch.stack(sums).sum().reshape(1))[0])
        loss = total / n_global if n_global > 0 else float("nan")
        stats = _StepStats(loss=loss)
        self.state.steps += 1
        if math.isfinite(loss) and loss > a.tau + a.delta:
            stats = self._project(trainer, loss_sum, loss, n_global)
        else:
            for p in self.params:
                p.grad = None
        self.state.last = stats

    def _safety_grads(self, loss_sum: torch.Tensor, n_global: float) -> list[torch.Tensor]:
        """All-reduced gradient of the global token-mean ``L_s``: the last micro-batch's sum / global count is
        back-propagated on top of the earlier micro-batches' gradients."""
        import torch

        from spard.distributed import all_reduce_flat_, all_reduce_sum_

        (loss_sum * self._grad_scale / n_global).backward()
        # A tensor the safety loss reaches on no rank has no gradient; the reference leaves its .grad None, so
        # its AdamW skips it (no moment decay, no weight decay). Zero-filled here for the sums, never stepped.
        present = torch.tensor([float(p.grad is not None) for p in self.params], dtype=torch.float64,
                               device=self.params[0].device if self.params else None)
        self.has_grad = [bool(n > 0) for n in all_reduce_sum_(present).tolist()]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if not self.sharded:  # FSDP2's reduce-scatter already summed (scaled average) the shards over ranks
            all_reduce_flat_(grads)
        return grads

    def _apply_halfspace(self, grads: list[torch.Tensor], loss: float) -> tuple[float, float]:
        import torch

        from spard.projection import global_grad_norm, halfspace_step_size

        norm = global_grad_norm(grads)
        step = halfspace_step_size(loss, self.args.tau, norm, self.args.max_step)
        with torch.no_grad():
            for p, g in zip(self.params, grads):
                p.add_(g.to(p.dtype), alpha=-step)  # same delta as safety_projection(), without a copy
        return step * norm, norm

    def _apply_reference(self, trainer: Trainer, grads: list[torch.Tensor], loss: float) -> tuple[float, float]:
        # As the reference: the trainer's global-norm clipping (there HF clips the safety grads like task
        # grads), then per-tensor rescaling, then the (shared) optimizer's step at the current LR.
        from spard.projection import clip_by_global_norm, global_grad_norm, reference_scaled_grads

        norm = global_grad_norm(grads)
        grads, _ = clip_by_global_norm(grads, float(trainer.args.max_grad_norm or 0.0))
        scaled = reference_scaled_grads(grads, loss, self.args.tau, self.args.alpha_max)
        before = [p.detach().clone() for p in self.params]
        for p, g, has in zip(self.params, scaled, self.has_grad):
            p.grad = g.to(p.dtype) if has else None
        # The raw torch optimizer: accelerate's wrapper would unscale by an fp16 loss scale we never applied.
        getattr(trainer.optimizer, "optimizer", trainer.optimizer).step()
        moved = global_grad_norm([p.detach() - b for p, b in zip(self.params, before)])
        return moved, norm

    def _project(self, trainer: Trainer, loss_sum: torch.Tensor, loss: float, n_global: float) -> _StepStats:
        from spard.projection import global_grad_norm

        grads = self._safety_grads(loss_sum, n_global)
        # a step whose safety backward ran: its gradient must not be (identically) zero
        self.guard.observe(global_grad_norm(grads), trainer.state.global_step)
        if self.args.projection == "halfspace":
            step_norm, norm = self._apply_halfspace(grads, loss)
        else:
            step_norm, norm = self._apply_reference(trainer, grads, loss)
        for p in self.params:
            p.grad = None
        projected = step_norm > 0
        self.state.projections += int(projected)
        return _StepStats(loss=loss, projected=projected, step_norm=step_norm, grad_norm=norm)

    # -- logging and resume ------------------------------------------------------------------------------
    def log_stats(self) -> dict[str, float]:
        last = self.state.last
        stats = {
            "safety_loss": last.loss,
            "safety_projected": float(last.projected),
            "safety_step_norm": last.step_norm,
            "safety_projections": float(self.state.projections),
            "safety_steps": float(self.state.steps),
        }
        if last.grad_norm is not None:  # only on steps that ran the safety backward
            stats["safety_grad_norm"] = last.grad_norm
        return stats

    def state_dict(self) -> dict[str, Any]:
        # cursor: safety examples drawn so far over all ranks (position in the endless shuffled stream)
        return {"cursor": self.stream_cursor, **asdict(self.state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        last = _StepStats(**state.get("last", {}))
        self.state = _State(steps=int(state.get("steps", 0)), projections=int(state.get("projections", 0)), last=last)
        self.restore_stream_cursor(state["cursor"])
