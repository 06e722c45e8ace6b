"""No attack: ``n_train`` clean task records."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spard.args import AttackArgs
from spard.attacks.base import Attack, register
from spard.data import attacks
from spard.data.records import Record


@dataclass
class NoAttackArgs(AttackArgs):
    name: str = "none"
    """Attack name."""


@register
class NoAttack(Attack):
    name = "none"
    Args = NoAttackArgs

    def describe(self, *, long: bool = False) -> str:
        return "none (task data only)"

    def build(self, task: Sequence[Record], *, n: int, seed: int) -> list[Record]:
        return attacks.harmful_mix(task, [], ratio=0.0, n=n, seed=seed)
