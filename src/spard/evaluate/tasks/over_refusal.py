"""Over-refusal: the share of *benign* prompts a model answers (higher is better).

A defense that refuses everything scores a perfect ASR; this task measures the other side. The replies to
benign prompts (by default the packaged I-Alpaca and I-PhysicalSafetySafe sets of Safety-Tuned-LLaMAs, Bianchi
et al. 2024: ordinary instructions, and safe questions about physical safety that sound risky) are scored by
the keyword judge's refusal detection (:mod:`spard.evaluate.judges.keyword`). Here a detected refusal is the
*failure*: a reply is *answered* when it is neither a refusal nor degenerate (empty or a loop). The harm
judges' ``harmful`` verdict is not used (a benign prompt's answer is not harmful whatever the judge says).
It is an eval task, not a harm set, so it is reported with the utility tasks (``eval.tasks``) and the harm
sets' ASR keeps meaning "harmful prompts answered".
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from spard.args import FieldError, TaskArgs, check_range
from spard.data.records import Record
from spard.evaluate.metrics import rate
from spard.evaluate.tasks.base import Task, register

DEFAULT_BENIGN_SETS = ["I-Alpaca", "I-PhysicalSafetySafe"]


@dataclass
class OverRefusalArgs(TaskArgs):
    name: str = "over_refusal"
    """Task name."""
    sets: list[str] = field(default_factory=lambda: list(DEFAULT_BENIGN_SETS))
    """Benign prompt sets: packaged source names (``I-Alpaca``, ``I-PhysicalSafetySafe``), local files or hub
    ids (with ``prompt_field``)."""
    limit: int | None = 40
    """Prompts per set (the first N); None takes all."""
    prompt_field: str = "prompt"
    """Field holding the prompt in local files / hub datasets."""
    max_new_tokens: int = 48
    """Reply length: a refusal shows in the first sentence."""

    def __post_init__(self) -> None:
        if not (isinstance(self.sets, list) and self.sets and all(isinstance(s, str) and s for s in self.sets)):
            raise FieldError("sets", self.sets, "must be a non-empty list of set names or paths")
        if self.limit is not None:
            check_range("limit", self.limit, 1)
        check_range("max_new_tokens", self.max_new_tokens, 1)


def answer_counts(verdicts: Sequence[Any]) -> dict[str, Any]:
    """Answer, refusal and degenerate rates of keyword-judge verdicts on benign prompts (``answered`` = neither
    a refusal nor degenerate)."""
    n = len(verdicts)
    answered = sum(not v.refused and not v.degenerate for v in verdicts)
    return {"n": n, "answer_rate": rate(answered, n), "refusal_rate": rate(sum(v.refused for v in verdicts), n),
            "degenerate_rate": rate(sum(v.degenerate for v in verdicts), n)}


@register
class OverRefusal(Task):
    """Answer rate on benign prompts, keyword judge (a refusal is the failure)."""

    name = "over_refusal"
    Args = OverRefusalArgs
    args: OverRefusalArgs
    title = "Benign answer rate (%)"
    csv_column = "benign_answer"
    headline = "answer_rate"
    own_table = True

    def load(self, split: str = "test", limit: int | None = None, path: str | None = None) -> list[Record]:
        """Every set's first ``limit`` prompts (the task's own limit; the shared ``eval.task_limit`` is for the
        accuracy tasks), each record tagged with its set in ``meta["set"]``."""
        from spard.evaluate.harm import load_harm_set

        out = []
        for name in self.args.sets:
            for r in load_harm_set(name, limit=self.args.limit, prompt_field=self.args.prompt_field):
                out.append(Record(messages=r.messages, source=r.source, kind=r.kind, meta={**r.meta, "set": name}))
        return out

    def evaluate(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from spard.evaluate.generation import generate
        from spard.evaluate.judges.keyword import KeywordJudge

        prompts = [[m for m in r.messages if m["role"] != "assistant"] for r in records]
        t0 = time.perf_counter()
        replies = generate(model, tokenizer, prompts, max_new_tokens=self.args.max_new_tokens,
                           batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                           seed=args.seed, progress=args.progress, desc=self.name)
        elapsed = time.perf_counter() - t0
        verdicts = KeywordJudge()([r.prompt for r in records], replies)
        metrics: dict[str, Any] = answer_counts(verdicts)
        metrics["by_set"] = {s: answer_counts([v for v, r in zip(verdicts, records) if r.meta["set"] == s])
                             for s in self.args.sets}
        metrics["judge"] = "keyword"
        metrics["timings"] = {"generate_s": round(elapsed, 3)}
        samples = [{"index": i, "set": r.meta["set"], "prompt": r.prompt, "response": reply,
                    "answered": not v.refused and not v.degenerate, "keyword": v.to_dict()}
                   for i, (r, reply, v) in enumerate(zip(records, replies, verdicts))]
        return metrics, samples

    def summary_rows(self, metrics: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        rows: dict[str, dict[str, Any] | None] = {"Benign answered (keyword, all sets)": metrics.get("answer_rate")}
        by_set = metrics.get("by_set") or {}
        if len(by_set) > 1:
            rows.update({f"Benign answered {s}": b.get("answer_rate") for s, b in by_set.items()})
        return rows
