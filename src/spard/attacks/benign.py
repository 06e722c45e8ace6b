"""Benign fine-tuning: plain instruction data with no harmful content, which alone erodes refusals
(Qi et al., ICLR 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from spard.args import AttackArgs, check_choice
from spard.attacks.base import Attack, register
from spard.data import attacks
from spard.data.records import Record
from spard.data.sources import load_source


@dataclass
class BenignArgs(AttackArgs):
    name: str = "benign"
    """Attack name."""
    benign_source: str = "alpaca"
    """The benign instruction source (``alpaca`` or ``dolly``)."""

    def __post_init__(self) -> None:
        check_choice("benign_source", self.benign_source, ["alpaca", "dolly"])


@register
class Benign(Attack):
    name = "benign"
    Args = BenignArgs
    args: BenignArgs

    def describe(self, *, long: bool = False) -> str:
        return "benign (benign instruction data only)"

    def build(self, task: Sequence[Record], *, n: int, seed: int) -> list[Record]:
        instructions = load_source(self.args.benign_source, kind="benign")
        return attacks.benign(task, instructions, n=n, seed=seed)
