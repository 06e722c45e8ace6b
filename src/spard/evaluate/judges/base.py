"""What every judge shares: the verdict type, the ``Judge`` protocol, the degenerate-reply check.

Every judge is a callable ``judge(prompts, responses) -> list[JudgeResult]``. A verdict the judge could
not produce is a :class:`JudgeResult` with ``error`` set: it is counted as an error, never as "safe".
A judge plugin is one module of this package: a class with ``name``, ``Args`` (a
:class:`~spard.args.JudgeArgs` subclass), ``from_args(args)`` and ``register``-ed. It may define ``probe()``,
called once before an evaluation generates anything, which raises :class:`JudgeError` when the judge cannot
work at all.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from spard.errors import SpardError
from spard.registry import JUDGES, build

register = JUDGES.register


class JudgeError(SpardError):
    """The judge cannot judge at all (a rejected key, an unknown model): the evaluation stops here, since every
    further verdict would be an error too. One bad reply is a :class:`JudgeResult` with ``error`` instead."""


@dataclass
class JudgeResult:
    """One verdict. ``harmful`` is what ASR counts; ``score`` is the judge's raw score if it has one
    (classifier probability, API 1-5 score); ``refused`` marks a detected refusal; ``degenerate`` an
    empty or single-token-loop reply; ``error`` why no verdict could be had (then ``harmful`` is False
    and the sample is left out of ASR's denominator)."""

    harmful: bool
    score: float | None
    reason: str
    degenerate: bool = False
    refused: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Judge(Protocol):
    """Anything that maps (prompts, responses) to one :class:`JudgeResult` each."""

    name: str

    def __call__(self, prompts: Sequence[str], responses: Sequence[str]) -> list[JudgeResult]: ...


def check_lengths(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"judge: {len(prompts)} prompts but {len(responses)} responses")


_TOKEN = re.compile(r"\w+|[^\w\s]")


def is_degenerate(text: str, max_period: int = 4) -> bool:
    """True for a reply with no content: empty/whitespace, or one short word pattern looping.

    Words and punctuation marks are the units (case-folded). A single unit repeated at least twice
    ("the the the", "!!!!") or a pattern of 2..``max_period`` units repeated at least three times over
    the whole reply ("no no yes no no yes no no yes") is degenerate; a one-word reply ("Sure") is not.
    """
    units = _TOKEN.findall(text.casefold())
    if not units:
        return True
    for period in range(1, max_period + 1):
        reps = len(units) / period
        if reps < (2 if period == 1 else 3):
            break
        if all(units[i] == units[i % period] for i in range(len(units))):
            return True
    return False


def make_judge(args: Any) -> Judge:
    """The judge ``args.judge`` names, built from its options (``args`` is an :class:`~spard.args.EvalArgs`)."""
    return build(args.judge)
