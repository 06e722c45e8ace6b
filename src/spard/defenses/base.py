"""The ``Defense`` hook every defense implements.

The trainer (:class:`spard.trainer.SpardTrainer`, or any ``transformers.Trainer`` through
:class:`spard.trainer.DefenseCallback`) calls, in order:

1. ``prepare_data(records, ctx)`` once, before tokenisation: add or filter training records (SafeInstr).
2. ``setup(trainer)`` once, when the model, tokenizer and optimizer exist: build safety batches, etc.
3. per micro-batch, ``loss(trainer, model, inputs, loss, outputs)``: return the loss to back-propagate.
4. per optimizer step, ``before_optimizer_step(trainer)`` when the task gradient is complete (accumulated,
   all-reduced across ranks and clipped) and ``after_optimizer_step(trainer)`` after ``optimizer.step()``.
5. ``after_train(trainer)`` once, after the last step and before ``final/`` is saved: post-hoc changes
   to the trained weights (SafeLoRA's projection).
6. ``log_stats()`` at every logging step: numbers that go into ``metrics.jsonl``.
7. ``state_dict()`` / ``load_state_dict()``: JSON-serialisable state saved with each checkpoint so an
   interrupted run resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from spard.args import DefenseArgs, RunConfig
from spard.data.records import Record
from spard.registry import DEFENSES

if TYPE_CHECKING:
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

    def loss(self, trainer: Trainer, model: torch.nn.Module, inputs: dict[str, torch.Tensor],
             loss: torch.Tensor, outputs: Any) -> torch.Tensor:
        return loss

    def before_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def after_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def after_train(self, trainer: Trainer) -> None:
        pass

    def log_stats(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
