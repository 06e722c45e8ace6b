"""The attack interface: options in, the fine-tuning set out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from spard.args import AttackArgs
from spard.data.records import Record
from spard.registry import ATTACKS

register = ATTACKS.register


class Attack(ABC):
    """Builds the fine-tuning set from the user's task records; pure and deterministic in ``seed``."""

    name: ClassVar[str] = ""
    Args: ClassVar[type[AttackArgs]] = AttackArgs

    def __init__(self, args: AttackArgs) -> None:
        self.args = args

    def describe(self, *, long: bool = False) -> str:
        """How tables and plots name the attack (``long``: a phrase for a legend)."""
        return self.name

    @abstractmethod
    def build(self, task: Sequence[Record], *, n: int, seed: int) -> list[Record]:
        """The fine-tuning set; ``n`` is ``data.n_train``. Harmful records keep ``kind="harmful"``."""
