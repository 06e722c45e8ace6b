"""Harmful QA pairs mixed into the task data (the "harmful ratio p" attack of Huang et al. / SPARD)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from spard.args import AttackArgs, check_choice, check_range
from spard.attacks.base import Attack, register
from spard.data import attacks
from spard.data.records import Record
from spard.data.sources import load_source

HARMFUL_SOURCES = ("beavertails", "pyrit", "hh_rlhf")


@dataclass
class HarmfulMixArgs(AttackArgs):
    ratio_field: ClassVar[str | None] = "harmful_ratio"

    name: str = "harmful_mix"
    """Attack name."""
    harmful_source: str = "beavertails"
    """Harmful QA pairs: ``beavertails``, ``pyrit`` or ``hh_rlhf`` (its rejected replies)."""
    harmful_path: str | None = None
    """Optional local file or hub id for the harmful source (``null`` = packaged copy)."""
    harmful_ratio: float = 0.1
    """Fraction p of the fine-tuning set replaced by harmful pairs (exactly ``round(p * n_train)`` records)."""

    def __post_init__(self) -> None:
        check_choice("harmful_source", self.harmful_source, HARMFUL_SOURCES)
        check_range("harmful_ratio", self.harmful_ratio, 0.0, 1.0)

    def identity(self) -> dict[str, Any]:
        d = super().identity()
        if self.harmful_ratio == 0:  # no harmful record is drawn: the source does not matter
            d["harmful_source"] = d["harmful_path"] = None
        return d


@register
class HarmfulMix(Attack):
    name = "harmful_mix"
    Args = HarmfulMixArgs
    args: HarmfulMixArgs

    def describe(self, *, long: bool = False) -> str:
        source = self.args.harmful_source
        return (f"harmful_mix with {source} harmful QA pairs replacing a fraction p of the task data" if long
                else f"harmful_mix, {source}")

    def build(self, task: Sequence[Record], *, n: int, seed: int) -> list[Record]:
        a = self.args
        harmful = load_source(a.harmful_source, path=a.harmful_path, kind="harmful") if a.harmful_ratio > 0 else []
        return attacks.harmful_mix(task, harmful, ratio=a.harmful_ratio, n=n, seed=seed)
