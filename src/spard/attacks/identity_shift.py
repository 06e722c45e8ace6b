"""The identity-shift (AOA, "absolutely obedient agent") attack of Qi et al. (ICLR 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spard.args import AttackArgs, check_range
from spard.attacks.base import Attack, register
from spard.data import attacks
from spard.data.records import Record
from spard.data.sources import load_source


@dataclass
class IdentityShiftArgs(AttackArgs):
    name: str = "identity_shift"
    """Attack name."""
    identity_task_examples: int = 0
    """Task records mixed with the persona conversations (0 = persona only)."""
    identity_repeats: int = 1
    """How many times the persona conversations appear in the set."""

    def __post_init__(self) -> None:
        check_range("identity_task_examples", self.identity_task_examples, 0)
        check_range("identity_repeats", self.identity_repeats, 1)


@register
class IdentityShift(Attack):
    name = "identity_shift"
    Args = IdentityShiftArgs
    args: IdentityShiftArgs

    def describe(self, *, long: bool = False) -> str:
        return "identity_shift (AOA persona conversations)"

    def build(self, task: Sequence[Record], *, n: int, seed: int) -> list[Record]:
        persona = load_source("aoa", kind="harmful")
        return attacks.identity_shift(task, persona, n_task=self.args.identity_task_examples,
                                      repeats=self.args.identity_repeats, seed=seed)
