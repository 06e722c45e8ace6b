"""OpenBookQA as the SPARD reference code trains and scores it (``evaluate/eval_openbookqa.py``).

The prompt lists the four choices as ``Answer1: … Answer4: …`` and asks for ``answer1/answer2/answer3/answer4``;
the reference fine-tunes on replies "fact: <supporting fact> \\n\\nthe correct answer is answerN" (train on it
with ``data.task=openbookqa_ref``). A reply is correct when it contains exactly one ``answer<digit>`` and that
is the gold one; none or several count as wrong, as in the reference. Packaged data: the reference's own files
(``spard_reference/openbookqa``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spard.args import TaskArgs, check_range
from spard.data.records import Record
from spard.data.sources import OBQA_REF_ANSWER
from spard.evaluate.metrics import accuracy
from spard.evaluate.tasks.base import GenerativeTask, register, user_turn


@dataclass
class OpenBookQARefArgs(TaskArgs):
    name: str = "openbookqa_ref"
    """Task name."""
    max_new_tokens: int = 64
    """Reply length. The reference generates up to its 2048-token ``max_length`` (prompt included); the fact and
    the answer sentence take ~30 tokens, and a reply that has not named its answer by 64 rarely does later."""

    def __post_init__(self) -> None:
        check_range("max_new_tokens", self.max_new_tokens, 1)


def reference_choice(reply: str) -> str | None:
    """The ``answerN`` a reply gives, if it gives exactly one (the reference's rule), else None."""
    found = OBQA_REF_ANSWER.findall(reply.lower().strip())
    return found[0] if len(found) == 1 else None


@register
class OpenBookQARef(GenerativeTask):
    """OpenBookQA in the reference's answerN format, scored on a generated reply."""

    name = source = "openbookqa_ref"
    Args = OpenBookQARefArgs
    args: OpenBookQARefArgs
    title = "OpenBookQA accuracy (reference format, generated)"
    csv_column = "obqa_ref_acc"

    def prompt(self, record: Record) -> list[dict[str, str]]:
        return user_turn(record.prompt)

    def max_new_tokens(self) -> int:
        return self.args.max_new_tokens

    def score(self, record: Record, response: str) -> dict[str, Any]:
        gold = record.meta["target_answer"]
        pred = reference_choice(response)
        return {"gold": gold, "pred": pred, "correct": pred == gold}

    def aggregate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(samples), "accuracy": accuracy([s["correct"] for s in samples]),
                "unparsed": sum(s["pred"] is None for s in samples)}
