"""OpenBookQA: log-likelihood ranking of the four choices (as lm-evaluation-harness), or a generated letter."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from spard.args import TaskArgs, check_choice, check_range
from spard.data.records import Record, with_system_prompt
from spard.data.sources import OBQA_LETTERS
from spard.evaluate.metrics import accuracy
from spard.evaluate.tasks.base import GenerativeTask, encode_pair, loglikelihoods, register, user_turn

OBQA_MODES = ("loglik", "generate")
OBQA_FORMATS = ("cloze", "letter")


@dataclass
class OpenBookQAArgs(TaskArgs):
    legacy_keys: ClassVar[dict[str, str]] = {"obqa_mode": "mode", "obqa_format": "format",
                                             "obqa_max_new_tokens": "max_new_tokens"}

    name: str = "openbookqa"
    """Task name."""
    mode: str = "loglik"
    """``loglik`` ranks the four choices by log-likelihood (acc, acc_norm); ``generate`` parses the answer
    letter from a generated reply."""
    format: str = "cloze"
    """Loglik mode: ``cloze`` asks the bare question and scores each choice text as the reply (as
    lm-evaluation-harness does); ``letter`` shows lettered choices and scores the letters A-D."""
    max_new_tokens: int = 32
    """Generate mode: reply length."""

    def __post_init__(self) -> None:
        check_choice("mode", self.mode, OBQA_MODES)
        check_choice("format", self.format, OBQA_FORMATS)
        check_range("max_new_tokens", self.max_new_tokens, 1)


# ---------------------------------------------------------------------------------------------------------
# OpenBookQA helpers
# ---------------------------------------------------------------------------------------------------------
_LETTER_PATTERNS = [
    # "The answer is B", "Answer: C", "answer is option (D)"; the letter itself must be upper case
    re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?\s*(?:(?i:option)\s*)?\(?([A-D])\b"),
    re.compile(r"^\s*\(?([A-D])(?:[\).:]|\s*$)"),  # reply is/opens with the letter: "B", "B.", "(B)"
    re.compile(r"\banswer\s*([1-4])\b", re.IGNORECASE),  # "answer2" / "answer 2" numbering
    re.compile(r"\(([A-D])\)"),  # "(B)" anywhere
    re.compile(r"\b([A-D])[\.:](?:\s|$)"),  # "B." / "B:" anywhere
]


def parse_choice(text: str, choices: Sequence[str]) -> int | None:
    """Index of the choice a generated reply picks: an explicit letter (``answer is B``, a leading
    ``B.``/``(B)``), ``answerN`` numbering, or else the one choice whose text the reply contains."""
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(text)
        if m:
            token = m.group(1)
            idx = int(token) - 1 if token.isdigit() else OBQA_LETTERS.index(token.upper())
            if idx < len(choices):
                return idx
    folded = text.casefold()
    hits = [i for i, c in enumerate(choices) if c.strip() and c.strip().casefold() in folded]
    return hits[0] if len(hits) == 1 else None


def obqa_loglik_requests(record: Record, fmt: str = "cloze") -> tuple[list[dict[str, str]], list[str]]:
    """The (context messages, continuations) whose log-likelihoods rank an OpenBookQA question.

    ``cloze`` (lm-eval's openbookqa.yaml adapted to a chat model): the user turn is the bare question
    stem and each continuation is a choice's text as the start of the assistant reply (lm-eval's " "
    delimiter is dropped: the chat template already ends the context with the assistant header).
    ``letter``: the user turn lists the lettered choices and each continuation is its letter.
    """
    choices = list(record.meta["choices"])
    if fmt == "cloze":
        return user_turn(str(record.meta["stem"]).strip()), [c.strip() for c in choices]
    if fmt == "letter":
        return user_turn(record.prompt), list(OBQA_LETTERS[: len(choices)])
    raise ValueError(f"obqa format {fmt!r} must be 'cloze' or 'letter'")




@register
class OpenBookQA(GenerativeTask):
    """OpenBookQA: ``mode="loglik"`` ranks the four choices by summed log-likelihood
    (``acc``) and by log-likelihood per character of the choice text (``acc_norm``, the headline
    ``accuracy`` in the cloze format), as lm-eval;
    ``"generate"`` parses the answer letter from a reply to the lettered question (``acc``)."""

    name = source = "openbookqa"
    Args = OpenBookQAArgs
    args: OpenBookQAArgs
    title = "OpenBookQA accuracy (acc_norm)"
    csv_column = "obqa_acc"

    def max_new_tokens(self) -> int:
        return self.args.max_new_tokens

    def score(self, record: Record, response: str) -> dict[str, Any]:
        gold = int(record.meta["gold"])
        pred = parse_choice(response, record.meta["choices"])
        return {"gold": OBQA_LETTERS[gold], "pred": OBQA_LETTERS[pred] if pred is not None else None,
                "correct": pred == gold}

    def summary_rows(self, metrics: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        rows = {f"OpenBookQA acc ({metrics.get('mode', '?')})": metrics.get("acc")}
        if "acc_norm" in metrics:
            rows["OpenBookQA acc_norm"] = metrics.get("acc_norm")
        return rows

    def aggregate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        acc = accuracy([s["correct"] for s in samples])
        return {"n": len(samples), "mode": "generate", "accuracy": acc, "acc": acc,
                "unparsed": sum(s["pred"] is None for s in samples)}

    def evaluate(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if self.args.mode == "generate":
            return super().evaluate(model, tokenizer, records, args)
        return self.evaluate_loglik(model, tokenizer, records, args)

    def evaluate_loglik(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from spard.evaluate.generation import render_prompt

        fmt = self.args.format
        pairs, spans, conts = [], [], []
        for rec in records:
            messages, continuations = obqa_loglik_requests(rec, fmt)
            messages = with_system_prompt(messages, args.system_prompt)
            context = render_prompt(tokenizer, messages)
            spans.append((len(pairs), len(continuations)))
            conts.append(continuations)
            pairs.extend(encode_pair(tokenizer, context, c) for c in continuations)
        t0 = time.perf_counter()
        lls = loglikelihoods(model, tokenizer, pairs, batch_size=args.batch_size, progress=args.progress)
        elapsed = time.perf_counter() - t0

        samples = []
        for i, (rec, (start, k), continuations) in enumerate(zip(records, spans, conts)):
            ll = lls[start:start + k]
            # acc_norm divides by the character length of the continuation (the choice text, or the
            # letter), as lm-eval's completion_len does.
            norm = [x / max(len(c), 1) for x, c in zip(ll, continuations)]
            gold = int(rec.meta["gold"])
            pred, pred_norm = max(range(k), key=ll.__getitem__), max(range(k), key=norm.__getitem__)
            samples.append({
                "index": i, "prompt": rec.meta["stem"] if fmt == "cloze" else rec.prompt,
                "continuations": continuations, "loglik": [round(x, 4) for x in ll],
                "gold": OBQA_LETTERS[gold], "pred": OBQA_LETTERS[pred], "pred_norm": OBQA_LETTERS[pred_norm],
                "correct": pred == gold, "correct_norm": pred_norm == gold,
            })
        acc, acc_norm = accuracy([s["correct"] for s in samples]), accuracy([s["correct_norm"] for s in samples])
        # The headline for cloze is acc_norm, as lm-eval reports OpenBookQA: the unnormalised sum favours the
        # shortest choice (SmolLM2-135M then scores 0-16 %, below chance). Letters are one token: acc == acc_norm.
        metrics = {"n": len(samples), "mode": "loglik", "format": fmt,
                   "accuracy": acc_norm if fmt == "cloze" else acc, "acc": acc, "acc_norm": acc_norm,
                   "timings": {"loglik_s": round(elapsed, 3)}}
        return metrics, samples
