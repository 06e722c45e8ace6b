"""SafeInstr (Bianchi et al., ICLR 2024): mix safety examples (harmful instruction + refusal) into the
fine-tuning set. Nothing else changes: the defense lives entirely in ``prepare_data``."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from spard.args import FieldError, SafetyPoolArgs, check_range
from spard.data.records import Record
from spard.data.safety import load_pool
from spard.defenses.base import Defense, DefenseContext, register


@dataclass
class SafeInstrArgs(SafetyPoolArgs):
    name: str = "safeinstr"
    """Defense name."""
    safety_examples: int | None = None
    """Number of safety examples to add; ``null`` = ``ceil(safety_fraction * len(training set))``."""
    safety_fraction: float = 0.1
    """Safety examples added, as a fraction of the fine-tuning set, when ``safety_examples`` is null."""

    def __post_init__(self) -> None:
        check_range("safety_fraction", self.safety_fraction, 0.0, 1.0)
        if self.safety_examples is not None and self.safety_examples < 0:
            raise FieldError("safety_examples", self.safety_examples, "must be >= 0")


@register
class SafeInstr(Defense):
    name = "safeinstr"
    Args = SafeInstrArgs
    args: SafeInstrArgs

    def prepare_data(self, records: list[Record], ctx: DefenseContext) -> list[Record]:
        a = self.args
        k = a.safety_examples if a.safety_examples is not None else math.ceil(a.safety_fraction * len(records))
        pool = load_pool(a, exclude_prompts=ctx.attack_prompts, need=k)
        rng = random.Random(ctx.seed)
        mixed = records + rng.sample(pool, k)
        rng.shuffle(mixed)
        self.added = k
        return mixed

    def log_stats(self) -> dict[str, float]:
        return {"safety_examples": float(getattr(self, "added", 0))}
