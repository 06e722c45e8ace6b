"""GSM8K scored by the SPARD reference code's rule (``evaluate/eval_gsm8k.py``, ``eval.tasks=[gsm8k_ref]``).

The reference takes the number after the *last* ``####`` of a reply (``####\\s*(-?\\d+\\.?\\d*)``), else the
last number anywhere in it (``-?\\d+\\.?\\d*``); the gold answer is the last number of GSM8K's answer field;
the two are compared as floats. Unlike spard's ``gsm8k`` scoring there is no ``,``/``$`` clean-up, so a reply
ending "1,234" is read as 234. Prompt, generation and stop rule are ``gsm8k``'s (``eval.tasks[gsm8k_ref].prompt``
sets the user turn; generation stops after the first ``#### N`` line, so "last" and "first" coincide there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from spard.data.records import Record
from spard.errors import DataError
from spard.evaluate.metrics import accuracy
from spard.evaluate.tasks.base import register
from spard.evaluate.tasks.gsm8k import GSM8K, GSM8KArgs

__all__ = ["GSM8KRef", "GSM8KRefArgs", "reference_gsm8k_answer", "reference_gsm8k_gold", "reference_gsm8k_correct"]

REF_FINAL = re.compile(r"####\s*(-?\d+\.?\d*)")
REF_NUMBER = re.compile(r"(-?\d+\.?\d*)")


@dataclass
class GSM8KRefArgs(GSM8KArgs):
    name: str = "gsm8k_ref"
    """Task name."""


def reference_gsm8k_answer(text: str) -> str | None:
    """The reference's prediction: the number after the last ``####``, else the last number, else None."""
    finals = REF_FINAL.findall(text)
    if finals:
        return finals[-1]
    numbers = REF_NUMBER.findall(text)
    return numbers[-1] if numbers else None


def reference_gsm8k_gold(answer_field: str) -> str:
    """The reference's gold answer: the last number of the answer field (its ``#### N`` line)."""
    numbers = REF_NUMBER.findall(answer_field)
    if not numbers:
        raise DataError(f"GSM8K answer field has no number: {answer_field[-80:]!r}")
    return numbers[-1]


def reference_gsm8k_correct(reply: str, answer_field: str) -> bool:
    """Whether the reply's reference prediction equals the gold answer as a float (the reference's test)."""
    pred = reference_gsm8k_answer(reply)
    return pred is not None and float(pred) == float(reference_gsm8k_gold(answer_field))


@register
class GSM8KRef(GSM8K):
    """GSM8K with ``gsm8k``'s prompt and generation, scored by the reference's rule."""

    name = "gsm8k_ref"
    source = "gsm8k"
    Args = GSM8KRefArgs
    args: GSM8KRefArgs
    title = "GSM8K accuracy (reference rule)"
    csv_column = "gsm8k_ref_acc"

    def score(self, record: Record, response: str) -> dict[str, Any]:
        gold_field = record.meta.get("answer") or record.response
        if not gold_field:
            raise DataError(f"gsm8k record has no answer field: {record.prompt[:60]!r}")
        pred = reference_gsm8k_answer(response)
        return {"gold": reference_gsm8k_gold(gold_field), "pred": pred,
                "correct": reference_gsm8k_correct(response, gold_field)}

    def summary_rows(self, metrics: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        return {self.title: metrics.get("accuracy")}

    def aggregate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(samples), "accuracy": accuracy([s["correct"] for s in samples]),
                "unparsed": sum(s["pred"] is None for s in samples)}
