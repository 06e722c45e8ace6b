"""Lisa, lazy safety alignment (Huang et al., NeurIPS 2024): bi-state optimisation with a proximal term.

Training alternates between an *alignment state* (``align_steps`` optimizer steps on safety data: harmful
prompt + refusal, attack prompts excluded) and a *fine-tuning state* (``finetune_steps`` steps on the user's
data), starting in the alignment state. Each state's loss gets ``rho/2 ‖θ − θ_switch‖²``, ``θ_switch`` being
the trainable weights at the moment the current state began (where the other state left them). One optimizer
and one LR schedule serve both states (Adam moments are not reset at a switch).

Follows the reference code, git-disl/Lisa ``trainer.py::LisaTrainer`` (= git-disl/Booster
``trainer.py::ADMMTrainer``, ``--optimizer lisa``):

- The step count is the user data's: an alignment step fetches the user batch the HF loop hands it and
  trains on a safety batch instead, so of ``max_steps`` steps a fraction ``align/(align+finetune)`` (10 % with
  the 1:9 default) trains on safety data and the user data gets that many fewer updates than under SFT.
- The proximal term is off until the step index exceeds ``proximal_warmup_ratio × total steps`` (the reference's
  hard-coded 10 %: "proximal term will hurt convergence" on GSM8K).
- The proximal term is part of the loss, so it is clipped with the task gradient and goes through AdamW.
- Safety batches have the user batch size (``alignment_batch_size`` null) and are drawn from a seeded, reshuffled
  cyclic stream (:class:`spard.data.safety.SafetyStream`; the reference: a ``RandomSampler`` loader re-created
  when exhausted).

The state is a pure function of the step (which phase, whether it is a switch), the stream cursor and the
anchor weights; the anchor is saved into each checkpoint as ``lisa_anchor.safetensors``.

FSDP2: each rank keeps the anchor of its own shard. The proximal term's value is the whole-tensor sum (each rank's
partial sums all-reduced, :func:`spard.distributed.whole_sums`) while its gradient reaches each rank's shard
directly, as a single process computes it for those entries. The process that writes checkpoints also holds the
anchor whole on the CPU (gathered when the anchor is taken, a collective every rank joins then), so a checkpoint's
anchor file is the whole anchor, the file a single process writes, and either engine reads it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spard.args import SafetyPoolArgs, check_range
from spard.data.build import sample
from spard.data.chat import IGNORE_INDEX, collate
from spard.data.records import Record
from spard.data.safety import StreamOwner, load_pool, tokenize_safety
from spard.defenses.base import Defense, DefenseContext, register
from spard.errors import ConfigError
from spard.signal_guard import SignalGuard

if TYPE_CHECKING:
    import torch
    from torch import Tensor
    from transformers import Trainer

# torch is imported where it runs, so resolving a config that names this defense does not load it.

__all__ = ["Lisa", "LisaArgs", "phase_at", "is_switch", "alignment_steps_before", "proximal_active",
           "proximal_term", "squared_distance", "ANCHOR_FILE"]

log = logging.getLogger(__name__)

ALIGNMENT, FINETUNE = "alignment", "finetune"
ANCHOR_FILE = "lisa_anchor.safetensors"
"""In each checkpoint directory: the anchor weights θ_switch (one tensor per trainable parameter)."""


@dataclass
class LisaArgs(SafetyPoolArgs):
    name: str = "lisa"
    """Defense name."""
    align_steps: int = 100
    """Optimizer steps per alignment state (git-disl/Lisa script/finetune/lisa_poison_ratio.sh: 100); 0 = never
    align (plain fine-tuning with the proximal term toward the start)."""
    finetune_steps: int = 900
    """Optimizer steps per fine-tuning state (same script: 900, a 1:9 ratio). Training starts with an alignment
    state; scale both to the run length (e.g. 1 and 9 for a 20-step run)."""
    rho: float = 1.0
    """Weight of the proximal term rho/2 ||θ − θ_switch||² (Lisa repo scripts: 1; Booster's Lisa baseline: 0.01);
    0 = alternation only."""
    proximal_warmup_ratio: float = 0.1
    """The proximal term is applied only once the step index exceeds this fraction of the total steps (the
    reference hard-codes 0.1); 0 = from the second step."""
    alignment_examples: int | None = None
    """Safety examples drawn (by train.seed) from the pool to align on; null = the whole pool minus attack
    prompts (the reference uses 10000 BeaverTails safe answers, more than spard's pool holds)."""
    alignment_batch_size: int | None = None
    """Safety examples per device per micro-batch of an alignment step (like train.batch_size); null =
    train.batch_size, as in the reference."""
    alignment_max_length: int | None = None
    """Token limit per safety example; null = data.max_length."""

    def __post_init__(self) -> None:
        check_range("align_steps", self.align_steps, 0)
        check_range("finetune_steps", self.finetune_steps, 1)
        check_range("rho", self.rho, 0.0)
        check_range("proximal_warmup_ratio", self.proximal_warmup_ratio, 0.0, 1.0)
        if self.alignment_examples is not None:
            check_range("alignment_examples", self.alignment_examples, 1)
        if self.alignment_batch_size is not None:
            check_range("alignment_batch_size", self.alignment_batch_size, 1)
        if self.alignment_max_length is not None:
            check_range("alignment_max_length", self.alignment_max_length, 8)


# ---------------------------------------------------------------------------------------------------------
# The schedule and the proximal term (pure functions)
# ---------------------------------------------------------------------------------------------------------
def phase_at(step: int, align_steps: int, finetune_steps: int) -> str:
    """The state of 0-based optimizer step ``step``: ``align_steps`` alignment steps, then ``finetune_steps``
    fine-tuning steps, repeated (always fine-tuning when ``align_steps`` is 0)."""
    if align_steps == 0:
        return FINETUNE
    return ALIGNMENT if step % (align_steps + finetune_steps) < align_steps else FINETUNE


def is_switch(step: int, align_steps: int, finetune_steps: int) -> bool:
    """Whether step ``step`` begins a new state (the anchor is reset to the weights before it)."""
    return step > 0 and phase_at(step, align_steps, finetune_steps) != phase_at(step - 1, align_steps, finetune_steps)


def alignment_steps_before(step: int, align_steps: int, finetune_steps: int) -> int:
    """How many of steps ``0 .. step-1`` were alignment steps."""
    rounds, rest = divmod(step, align_steps + finetune_steps)
    return rounds * align_steps + min(rest, align_steps)


def proximal_active(step: int, total_steps: int, warmup_ratio: float) -> bool:
    """The reference's gate: the proximal term applies when ``step > warmup_ratio * total_steps``."""
    return step > warmup_ratio * total_steps


def proximal_term(params: Sequence[Tensor], anchors: Sequence[Tensor], rho: float) -> Tensor:
    """``rho/2 Σ_i ‖p_i − a_i‖²`` (differentiable in ``params``; gradient ``rho (p − a)``), accumulated in fp32.

    Sharded ``params`` (FSDP2 ``DTensor``s, anchors sharded alike): the value is over whole tensors, the same on
    every rank; the gradient of each rank's shard is ``rho (p − a)`` on that shard."""
    import torch

    from spard.distributed import local_part, whole_sums

    if len(params) != len(anchors):
        raise ValueError(f"{len(params)} parameters but {len(anchors)} anchors")
    if not params:
        return torch.zeros((), dtype=torch.float32)
    partials = torch.stack([(local_part(p).float() - local_part(a).float()).pow(2).sum()
                            for p, a in zip(params, anchors)])
    return rho / 2 * whole_sums(partials, params).sum()


def squared_distance(params: Sequence[Tensor], anchors: Sequence[Tensor]) -> float:
    """``Σ_i ‖p_i − a_i‖²`` over whole tensors (collective when sharded: call on every rank), no gradient."""
    import torch

    from spard.distributed import per_tensor_sq_norms

    with torch.no_grad():
        return float(per_tensor_sq_norms([p.detach() - a for p, a in zip(params, anchors)]).sum())


# ---------------------------------------------------------------------------------------------------------
# The defense
# ---------------------------------------------------------------------------------------------------------
def _micro_batches(trainer: Trainer) -> int:
    """Micro-batches in the current optimizer step (HF sets it per step; the last of an epoch may have fewer)."""
    return int(getattr(trainer, "current_gradient_accumulation_steps", 0) or trainer.args.gradient_accumulation_steps)


def _label_tokens(feature: dict[str, list[int]]) -> int:
    """Label tokens HF counts into ``num_items_in_batch`` for a causal LM (labels shifted by one)."""
    return sum(1 for t in feature["labels"][1:] if t != IGNORE_INDEX)


@register
class Lisa(StreamOwner, Defense):
    """Alternate alignment and fine-tuning states with a proximal term toward the last switching point."""

    name = "lisa"
    Args = LisaArgs
    args: LisaArgs

    def __init__(self, args: LisaArgs) -> None:
        super().__init__(args)
        self.guard = SignalGuard(self.name, "proximal term")
        self.alignment_records: list[Record] | None = None
        self.seed = 0
        self.max_length = 256
        self.names: list[str] = []
        self.params: list[Tensor] = []
        self.anchor: list[Tensor] = []
        self.sharded = False
        """FSDP2: parameters and anchors are DTensors; each rank holds its shard."""
        self.writes_checkpoints = True
        """This process writes the checkpoints (``trainer.args.should_save``)."""
        self._whole_anchor: dict[str, Tensor] | None = None
        """Under FSDP, on the process that writes checkpoints: the anchor gathered whole, on the CPU."""
        self.anchor_step = 0
        """The step at whose start the anchor was taken (0: the initial weights)."""
        self._prepared_step = -1
        self._queue: list[dict[str, Tensor]] = []
        self._num_items: Tensor | None = None
        self._counted = True
        self._phase = ALIGNMENT if args.align_steps else FINETUNE
        self.last_prox = 0.0
        self.last_drift = 0.0

    # -- data -------------------------------------------------------------------------------------------
    def _pick(self, exclude: list[str], seed: int, max_length: int) -> None:
        a = self.args
        pool = load_pool(a, exclude_prompts=exclude, need=a.alignment_examples or 1)
        self.alignment_records = sample(pool, a.alignment_examples or len(pool), seed)
        self.seed = seed
        self.max_length = a.alignment_max_length or max_length

    def prepare_data(self, records: list[Record], ctx: DefenseContext) -> list[Record]:
        """Pick the safety examples (never an attack prompt); the user's data pass through unchanged."""
        if self.args.align_steps:
            self._pick(ctx.attack_prompts, ctx.seed, ctx.config.data.max_length)
        return records

    def setup(self, trainer: Trainer) -> None:
        from spard.distributed import any_sharded, check_engine

        # DeepSpeed ZeRO-3 and FSDP1 hold parameters in flat partitions the anchor and the proximal term cannot
        # address (they would silently see empty tensors); FSDP2's DTensors are handled
        check_engine(trainer, "defense.name='lisa'")
        wrapped = getattr(getattr(trainer, "compute_loss", None), "_spard_wrapped", False)
        hooks_run = getattr(trainer, "defense", None) is self or wrapped
        if not hooks_run:
            # The batch swap and the proximal term live in compute_loss's hooks (SpardTrainer, or the wrapper
            # spard.hf.DefenseCallback installs); with a bare DefenseHookCallback they would silently not run.
            raise ConfigError("defense.name='lisa' needs spard.trainer.SpardTrainer (spard.trainer.fit) or "
                              "spard.hf.DefenseCallback: it swaps batches in compute_loss, which a bare "
                              "DefenseHookCallback cannot reach")
        model = trainer.accelerator.unwrap_model(trainer.model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ConfigError("defense.name='lisa': the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.sharded = any_sharded(self.params)
        self.writes_checkpoints = bool(getattr(trainer.args, "should_save", True))
        self._take_anchor()  # θ_0: the reference's initial snapshots
        self.last_drift = 0.0
        self.guard = SignalGuard(self.name, "proximal term")
        self.anchor_step = 0
        self._prepared_step = -1
        if not self.args.align_steps:
            return
        if self.alignment_records is None:
            log.warning("lisa: prepare_data was not called; drawing safety examples without excluding attack prompts")
            self._pick([], trainer.args.seed, self.max_length)
        assert self.alignment_records is not None
        tokenizer = trainer.processing_class
        features = tokenize_safety(tokenizer, self.alignment_records, self.max_length,
                                   key="defense.alignment_max_length")
        self.start_stream(features, seed=self.seed, pad_id=tokenizer.pad_token_id)

    def _take_anchor(self) -> None:
        """θ_switch := the trainable weights now. Under FSDP each rank keeps its shard, and the process that writes
        checkpoints also gets them whole on the CPU: every rank takes the anchor here, so the gather (one tensor at
        a time) is a collective they all join, and saving a checkpoint later needs none."""
        from spard.distributed import full_tensor

        self.anchor = [p.detach().clone() for p in self.params]
        self._whole_anchor = None
        if self.sharded:
            whole = {n: full_tensor(a).cpu() for n, a in zip(self.names, self.anchor)}
            self._whole_anchor = whole if self.writes_checkpoints else None

    def _begin_step(self, trainer: Trainer, step: int, counted: bool) -> None:
        """At the first micro-batch of optimizer step ``step``: reset the anchor at a switch and, in the
        alignment state, draw the step's safety micro-batches and their label-token count."""
        a = self.args
        self._prepared_step = step
        self._phase = phase_at(step, a.align_steps, a.finetune_steps)
        if is_switch(step, a.align_steps, a.finetune_steps):
            self._take_anchor()
            self.anchor_step = step
        self._queue, self._num_items = [], None
        if self._phase != ALIGNMENT:
            return
        import torch

        from spard.distributed import world

        assert self.stream is not None
        rank, n_ranks = world()
        per_device = a.alignment_batch_size or trainer.args.per_device_train_batch_size
        n_micro = _micro_batches(trainer)
        global_tokens = local_tokens = 0
        for _ in range(n_micro):
            # Draw the global micro-batch, keep this rank's share: every rank advances the cursor identically.
            idx = self.stream.next_indices(per_device * n_ranks)
            feats = [self.stream.features[i] for i in idx]
            mine = feats[rank::n_ranks]
            global_tokens += sum(_label_tokens(f) for f in feats)
            local_tokens += sum(_label_tokens(f) for f in mine)
            self._queue.append({k: v.to(trainer.args.device) for k, v in collate(mine, self.stream.pad_id).items()})
        if counted:
            # Mirror HF's num_items_in_batch: the step's label tokens, summed over ranks when it averages over them.
            tokens = global_tokens if trainer.args.average_tokens_across_devices and n_ranks > 1 else local_tokens
            self._num_items = torch.tensor(tokens, device=trainer.args.device)

    def training_batch(self, trainer: Trainer, inputs: dict[str, Tensor], num_items_in_batch: Any
                       ) -> tuple[dict[str, Tensor], Any]:
        step = trainer.state.global_step
        if step != self._prepared_step:
            self._begin_step(trainer, step, num_items_in_batch is not None)
        self._counted = num_items_in_batch is not None
        if self._phase != ALIGNMENT:
            return inputs, num_items_in_batch
        if not self._queue:
            raise RuntimeError(f"lisa: more micro-batches in step {step} than gradient accumulation steps")
        return self._queue.pop(0), self._num_items

    def loss(self, trainer: Trainer, model: torch.nn.Module, inputs: dict[str, Tensor],
             loss: Tensor, outputs: Any) -> Tensor:
        a = self.args
        step = trainer.state.global_step
        if a.rho <= 0 or not proximal_active(step, trainer.state.max_steps, a.proximal_warmup_ratio):
            self.last_prox = 0.0
            return loss
        prox = proximal_term(self.params, self.anchor, a.rho)
        self.last_prox = float(prox.detach())
        if not is_switch(step, a.align_steps, a.finetune_steps):  # the anchor was just reset: 0 by design
            self.guard.observe(self.last_prox if prox.requires_grad else 0.0, step + 1)
        # The term must enter the step's gradient once. HF sums the micro-batch losses when they are normalised by
        # the step's token count (num_items_in_batch), else it divides each by the number of micro-batches itself
        # (transformers.Trainer.training_step's loss_is_scaled_for_ga rule).
        n_micro = _micro_batches(trainer)
        scaled = trainer.loss_is_scaled_for_ga
        if scaled is None:
            scaled = (trainer.model_accepts_loss_kwargs and self._counted) or trainer.compute_loss_func is not None
        return loss + (prox / n_micro if scaled else prox).to(loss.dtype)

    # -- bookkeeping ------------------------------------------------------------------------------------
    def after_optimizer_step(self, trainer: Trainer) -> None:
        # Measured here, where every rank runs (under FSDP it is a collective), not in log_stats (rank 0 only).
        self.last_drift = squared_distance(self.params, self.anchor) if self.params else 0.0

    def log_stats(self) -> dict[str, float]:
        """The last step's state (1 = alignment, 0 = fine-tuning), its proximal term (0 while gated off),
        ‖θ − θ_switch‖² now, and the alignment steps run so far."""
        a = self.args
        done = self._prepared_step + 1
        return {"lisa_alignment": float(self._phase == ALIGNMENT), "lisa_prox": self.last_prox,
                "lisa_drift": self.last_drift,
                "lisa_alignment_steps": float(alignment_steps_before(done, a.align_steps, a.finetune_steps))}

    def state_dict(self) -> dict[str, Any]:
        return {"cursor": self.stream_cursor, "phase": self._phase, "anchor_step": self.anchor_step,
                "anchor_file": ANCHOR_FILE, "last_prox": self.last_prox}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.restore_stream_cursor(state.get("cursor", 0))
        self.anchor_step = int(state.get("anchor_step", 0))
        self._phase = str(state.get("phase", self._phase))
        self.last_prox = float(state.get("last_prox", 0.0))

    def save_tensors(self, directory: Path) -> None:
        from safetensors.torch import save_file

        if self.sharded:
            if self._whole_anchor is None:
                raise RuntimeError("lisa: this process holds only its shard of the anchor; checkpoints are written "
                                   "by the process with trainer.args.should_save")
            whole = self._whole_anchor
        else:
            whole = {n: a.detach().cpu() for n, a in zip(self.names, self.anchor)}
        save_file({n: t.contiguous() for n, t in whole.items()}, str(Path(directory) / ANCHOR_FILE))

    def load_tensors(self, directory: Path) -> None:
        from safetensors.torch import load_file

        path = Path(directory) / ANCHOR_FILE
        if not path.is_file():
            raise ConfigError(f"train.resume=true: {path} is missing; Lisa cannot resume without its anchor weights")
        saved = load_file(str(path))
        if sorted(saved) != sorted(self.names):
            raise ConfigError(f"train.resume=true: {path} holds other parameters than the model being trained")
        from spard.distributed import local_part, shard_like

        # whole tensors, whichever engine wrote them; each rank keeps its shard of its copy
        self.anchor = [shard_like(saved[n].to(device=local_part(p).device, dtype=p.dtype), p)
                       for n, p in zip(self.names, self.params)]
        self._whole_anchor = {n: saved[n].to(dtype=p.dtype) for n, p in zip(self.names, self.params)} \
            if self.sharded and self.writes_checkpoints else None
