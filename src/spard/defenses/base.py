"""The ``Defense`` hook every defense implements.

The trainer (:class:`spard.trainer.SpardTrainer`, or any ``transformers.Trainer`` through
:class:`spard.hf.DefenseCallback`) calls, in order:

1. ``prepare_data(records, ctx)`` once, before tokenisation: add or filter training records (SafeInstr).
2. ``setup(trainer)`` once, when the model, tokenizer and optimizer exist: build safety batches, etc.
3. per micro-batch, ``loss(trainer, model, inputs, loss, outputs)``: return the loss to back-propagate.
4. per optimizer step, ``before_optimizer_step(trainer)`` when the task gradient is complete (accumulated,
   all-reduced across ranks and clipped) and ``after_optimizer_step(trainer)`` after ``optimizer.step()``.
5. ``evaluation_args(eval_args)`` when the run is evaluated: settings a defense applies at test time.
6. ``after_train(trainer)`` once, after the last step and before ``final/`` is saved: post-hoc changes
   to the trained weights (SafeLoRA's projection).
7. ``log_stats()`` at every logging step: numbers that go into ``metrics.jsonl``.
8. ``state_dict()`` / ``load_state_dict()``: JSON-serialisable state saved with each checkpoint so an
   interrupted run resumes exactly; ``save_tensors(dir)`` / ``load_tensors(dir)`` for state that is
   tensors (Lisa's anchor weights), written into the checkpoint directory as safetensors.

:class:`spard.trainer.SpardTrainer` also calls ``training_batch(trainer, inputs, num_items_in_batch)`` per
micro-batch before the forward pass: a defense may train on another batch instead (Lisa's alignment steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from spard.args import DefenseArgs, EvalArgs, RunConfig
from spard.data.records import Record
from spard.registry import DEFENSES

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase, Trainer

register = DEFENSES.register
"""Class decorator: make a defense selectable as ``defense.name=<cls.name>``."""


@dataclass
class DefenseContext:
    """What a defense may need when it prepares data."""

    config: RunConfig
    tokenizer: PreTrainedTokenizerBase
    run_dir: Path
    seed: int
    attack_prompts: list[str] = field(default_factory=list)
    """Prompts of harmful records in the attack set (a defense must not use them as safety data)."""


class Defense:
    """Plain LoRA fine-tuning behaviour; subclasses override the hooks they need."""

    name: ClassVar[str] = "base"
    Args: ClassVar[type[DefenseArgs]] = DefenseArgs

    def __init__(self, args: DefenseArgs) -> None:
        self.args = args

    def prepare_data(self, records: list[Record], ctx: DefenseContext) -> list[Record]:
        return records

    def setup(self, trainer: Trainer) -> None:
        pass

    def training_batch(self, trainer: Trainer, inputs: dict[str, torch.Tensor], num_items_in_batch: Any
                       ) -> tuple[dict[str, torch.Tensor], Any]:
        """The micro-batch to train on and its ``num_items_in_batch`` (label tokens of the whole optimizer step,
        which HF normalises the summed loss by); unchanged by default."""
        return inputs, num_items_in_batch

    def loss(self, trainer: Trainer, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
             loss: torch.Tensor, outputs: Any) -> torch.Tensor:
        return loss

    def before_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def after_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def evaluation_args(self, args: EvalArgs) -> EvalArgs:
        """The evaluation settings of a run under this defense (PTST sets a safe-testing system prompt);
        applied to the evaluation before and after fine-tuning alike."""
        return args

    def log_stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def save_tensors(self, directory: Path) -> None:
        """Write tensor state into checkpoint ``directory`` (safetensors); nothing by default."""

    def load_tensors(self, directory: Path) -> None:
        """Read what :meth:`save_tensors` wrote into checkpoint ``directory`` (after ``load_state_dict``)."""
