"""GSM8K: zero-shot chain of thought, answers extracted as lm-evaluation-harness does."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from spard.args import GSM8K_PROMPT, FieldError, TaskArgs, check_range
from spard.data.records import Record
from spard.errors import DataError
from spard.evaluate.metrics import accuracy
from spard.evaluate.tasks.base import GenerativeTask, register, user_turn


@dataclass
class GSM8KArgs(TaskArgs):
    legacy_keys: ClassVar[dict[str, str]] = {"gsm8k_prompt": "prompt", "gsm8k_max_new_tokens": "max_new_tokens"}

    name: str = "gsm8k"
    """Task name."""
    prompt: str = GSM8K_PROMPT
    """User turn; ``{question}`` is replaced by the question."""
    max_new_tokens: int = 256
    """Reply length (chain of thought plus the ``#### N`` line)."""

    def __post_init__(self) -> None:
        if "{question}" not in self.prompt:
            raise FieldError("prompt", self.prompt, "must contain the placeholder {question}")
        check_range("max_new_tokens", self.max_new_tokens, 1)


# ---------------------------------------------------------------------------------------------------------
# GSM8K answer extraction
# ---------------------------------------------------------------------------------------------------------
# lm-evaluation-harness tasks/gsm8k/gsm8k.yaml (v3): "strict-match" takes the first "#### N";
# "flexible-extract" takes the last number-like run (group_select -1). Both then drop ",", "$" and a
# trailing "." (its regexes_to_ignore) before an exact string match with the gold answer.
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalise_number(text: str) -> str | None:
    """Canonical form of an extracted number: no ``,``/``$``, no trailing ``.``, and (beyond lm-eval,
    which would count "18.00" wrong against "18") no trailing zeros after a decimal point, so
    ``"1,234"`` -> ``"1234"``, ``"$18.00"`` -> ``"18"``, ``"2.50"`` -> ``"2.5"``, ``"-3.5"`` stays.
    None when no digit is left (a flexible match such as ``".."``)."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s == "-0":
        s = "0"
    return s if any(c.isdigit() for c in s) else None


def extract_gsm8k_answer(text: str, mode: str = "strict") -> str | None:
    """The final answer in a GSM8K reply, normalised by :func:`normalise_number`; None if none.

    ``mode="strict"``: the first ``#### N`` (lm-eval strict-match). ``mode="flexible"``: the last
    number-like match anywhere (lm-eval flexible-extract), skipping matches without a digit.
    """
    if mode == "strict":
        m = GSM8K_STRICT.search(text)
        return normalise_number(m.group(1)) if m else None
    if mode == "flexible":
        for groups in reversed(GSM8K_FLEXIBLE.findall(text)):
            value = normalise_number(groups[0] or groups[1])
            if value is not None:
                return value
        return None
    raise ValueError(f"extract_gsm8k_answer: mode={mode!r} must be 'strict' or 'flexible'")


def gsm8k_gold(answer_field: str) -> str:
    """The gold number of a GSM8K ``answer`` field (its ``#### N`` line)."""
    gold = extract_gsm8k_answer(answer_field, "strict")
    if gold is None:
        raise DataError(f"GSM8K answer field has no '#### N' line: {answer_field[-80:]!r}")
    return gold


def gsm8k_is_correct(text: str, gold_answer_field: str, mode: str = "flexible") -> bool:
    """Whether the reply's extracted answer equals the gold answer (from the ``#### N`` answer field)."""
    pred = extract_gsm8k_answer(text, mode)
    return pred is not None and pred == gsm8k_gold(gold_answer_field)




@register
class GSM8K(GenerativeTask):
    """GSM8K zero-shot with chain of thought: the user turn is ``eval.tasks[gsm8k].prompt`` around the question
    (by default it asks for a final ``#### <number>`` line, the format of GSM8K's own answers, so
    strict-match works before fine-tuning too). Generation stops after the first ``#### N`` line.
    Reports strict and flexible accuracy; ``accuracy`` is the flexible one."""

    name = source = "gsm8k"
    Args = GSM8KArgs
    args: GSM8KArgs
    title = "GSM8K accuracy (flexible match)"
    csv_column = "gsm8k_acc"
    # Stop after the first complete "#### N" line: the answer is given, and small models otherwise
    # often repeat that line until max_new_tokens (lm-eval's gsm8k stops on "Question:" likewise).
    stop_pattern = r"####[^\n]*\d[^\n]*\n"

    def prompt(self, record: Record) -> list[dict[str, str]]:
        return user_turn(self.args.prompt.replace("{question}", record.prompt))

    def max_new_tokens(self) -> int:
        return self.args.max_new_tokens

    def score(self, record: Record, response: str) -> dict[str, Any]:
        gold_field = record.meta.get("answer") or record.response
        if not gold_field:
            raise DataError(f"gsm8k record has no answer field: {record.prompt[:60]!r}")
        gold = gsm8k_gold(gold_field)
        strict, flexible = extract_gsm8k_answer(response, "strict"), extract_gsm8k_answer(response, "flexible")
        return {"gold": gold, "strict": strict, "flexible": flexible,
                "correct_strict": strict == gold, "correct": flexible == gold}

    def summary_rows(self, metrics: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        return {"GSM8K acc (flexible)": metrics.get("flexible"), "GSM8K acc (strict)": metrics.get("strict")}

    def aggregate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        flexible = accuracy([s["correct"] for s in samples])
        return {"n": len(samples), "accuracy": flexible, "flexible": flexible,
                "strict": accuracy([s["correct_strict"] for s in samples])}
