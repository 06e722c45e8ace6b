"""Held-out task loss: the mean assistant-token negative log-likelihood of held-out examples of the run's own
fine-tuning task, in the chat format training uses.

Accuracy on a task a small model cannot solve stays at chance whatever fine-tuning does (OpenBookQA acc_norm
on the 135M embedded model); the loss on held-out examples of the same task moves as soon as the model
learns the task's answers, so it separates "learned the task" from "did not" where accuracy cannot. Lower is
better. By default the examples are the run's task (``data.task`` / ``data.task_path`` / fields) at
``split`` (``test``: training draws from ``train``), tokenised exactly as for training
(:func:`spard.data.chat.tokenize_records`, ``data.max_length``). A run that trains on a local file has no
held-out split: ``path`` names a held-out file in the same fields (``configs/finetune.yaml`` does).

Where the reference answers are short (a label, a number, a word), loss alone hides whether the model gets
them right: examples whose answer has at most ``exact_match_max_tokens`` tokens are also answered greedily
and compared with the reference after :func:`normalise_answer` (exact match, with a Wilson interval).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from spard.args import DataArgs, FieldError, TaskArgs, check_range
from spard.data.build import normalise_prompt
from spard.data.records import Record
from spard.errors import DataError
from spard.evaluate.tasks.base import Task, register
from spard.hub import is_hub_id


@dataclass
class TaskNLLArgs(TaskArgs):
    name: str = "task_nll"
    """Task name."""
    split: str = "test"
    """Split of the run's task the held-out examples come from (training draws from ``train``)."""
    limit: int | None = 50
    """Held-out examples scored (the first N of ``split``); None takes all."""
    task: str | None = None
    """``null`` = the run's own task (``data.task`` etc.); else a named source scored instead."""
    path: str | None = None
    """A local file / hub id of held-out examples. Without ``task``: held-out examples of the run's own task in
    its fields (``data.prompt_field`` / ``data.response_field``), needed when the run trains on a local file;
    with ``task``: a file of that source."""
    max_length: int | None = None
    """Token limit per example; ``null`` = the run's ``data.max_length`` (as in training)."""
    exact_match_max_tokens: int = 16
    """Examples whose reference answer has at most this many tokens are also answered greedily and scored by
    exact match (after normalising case, whitespace and end punctuation); 0 = loss only."""

    def __post_init__(self) -> None:
        if not self.split:
            raise FieldError("split", self.split, "must be non-empty")
        if self.limit is not None:
            check_range("limit", self.limit, 1)
        if self.max_length is not None:
            check_range("max_length", self.max_length, 8)
        check_range("exact_match_max_tokens", self.exact_match_max_tokens, 0)


def ratio_mean_ci(sums: Sequence[float], counts: Sequence[int], z: float = 1.96) -> tuple[float, float, float]:
    """``Σ sums / Σ counts`` (the token-pooled mean) and its ``z`` interval by the delta method over examples.

    With per-example loss sums ``s_i`` over ``t_i`` tokens, ``R = Σ s_i / Σ t_i`` and
    ``SE(R) = sqrt(Σ (s_i − R t_i)² / (n (n − 1))) / mean(t)``: the standard error of a ratio estimator when
    the examples (not the tokens) are the sampled units. One example gives a zero-width interval.
    """
    if len(sums) != len(counts) or not sums:
        raise ValueError(f"ratio_mean_ci: need equally many sums and counts (> 0), got {len(sums)} and {len(counts)}")
    total = sum(counts)
    if total <= 0:
        raise ValueError("ratio_mean_ci: no tokens")
    n = len(sums)
    r = sum(sums) / total
    if n < 2:
        return r, r, r
    resid = sum((s - r * t) ** 2 for s, t in zip(sums, counts))
    se = math.sqrt(resid / (n * (n - 1))) / (total / n)
    return r, r - z * se, r + z * se


def normalise_answer(text: str) -> str:
    """Case-folded, whitespace-collapsed, without surrounding quotes/spaces and trailing ``.!;:,``."""
    return re.sub(r"^[\s\"'`]+|[\s\"'`.!;:,]+$", "", normalise_prompt(text))


def assistant_nll_sums(model: Any, features: Sequence[dict[str, list[int]]], *, pad_id: int, batch_size: int = 16
                       ) -> list[tuple[float, int]]:
    """Per example: (sum of −log p(label token | prefix) over its label tokens, number of label tokens).

    ``features`` are training features (``input_ids``/``attention_mask``/``labels``, labels −100 outside the
    assistant turns). Right-padded batches; log-softmax in float32; the logits at position ``t`` predict
    token ``t + 1``, as the training loss shifts them.
    """
    import torch

    from spard.data.chat import IGNORE_INDEX, collate
    from spard.evaluate.generation import model_device

    device = model_device(model)
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(features), batch_size):
                batch = collate(features[start:start + batch_size], pad_id)
                logits = model(input_ids=batch["input_ids"].to(device),
                               attention_mask=batch["attention_mask"].to(device)).logits[:, :-1].float()
                labels = batch["labels"][:, 1:].to(logits.device)
                mask = labels != IGNORE_INDEX
                nll = -logits.log_softmax(-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                nll = nll * mask
                out.extend((float(s), int(c)) for s, c in zip(nll.sum(1), mask.sum(1)))
    finally:
        model.train(was_training)
    return out


@register
class TaskNLL(Task):
    """Mean assistant-token NLL (nats per token) of held-out examples of the run's fine-tuning task."""

    name = "task_nll"
    Args = TaskNLLArgs
    args: TaskNLLArgs
    title = "Held-out task NLL (nats/token)"
    csv_column = "task_nll"
    headline = "nll"
    is_rate = False
    lower_is_better = True
    own_table = True
    uses_run_data = True

    def _data(self) -> DataArgs:
        a = self.args
        if a.task is not None:
            base = self.run_data if isinstance(self.run_data, DataArgs) else DataArgs()
            return replace(base, task=a.task, task_path=a.path, prompt_field=None, response_field=None)
        if not isinstance(self.run_data, DataArgs):
            raise DataError("task task_nll scores the run's own task but got no run data config; evaluate through "
                            "spard.api (which passes it) or set the task's task= option")
        if a.path is not None:
            return replace(self.run_data, task_path=a.path)
        if self.run_data.task_path and not is_hub_id(self.run_data.task_path):
            # a local file has no held-out split: its "test" split would be the training file itself
            raise DataError(f"task task_nll: the run trains on the local file data.task_path="
                            f"{self.run_data.task_path!r}, which has no held-out split; give a held-out file in the "
                            "same fields: eval.tasks=[{name: task_nll, path: held_out.jsonl}]")
        return self.run_data

    def load(self, split: str = "test", limit: int | None = None, path: str | None = None) -> list[Record]:
        """The held-out examples: the task's own ``split``/``limit`` (the shared eval split/limit are for the
        accuracy tasks)."""
        from spard.data.build import load_task

        records = load_task(self._data(), split=self.args.split)
        records = records[: self.args.limit] if self.args.limit is not None else records
        if not records:
            raise DataError(f"task task_nll: split {self.args.split!r} of {self._data().task!r} has no records")
        return records

    def evaluate(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from spard.data.chat import tokenize_records
        from spard.evaluate.generation import pad_token_id

        data = self._data()
        max_length = self.args.max_length or data.max_length
        features, stats = tokenize_records(tokenizer, records, max_length, desc="tokenize task_nll")
        kept = [i for i, f in enumerate(features) if any(t != -100 for t in f["labels"][1:])]
        if not kept:
            raise DataError(f"task task_nll: no held-out example keeps an answer token within max_length={max_length}")
        t0 = time.perf_counter()
        sums = assistant_nll_sums(model, [features[i] for i in kept], pad_id=pad_token_id(tokenizer),
                                  batch_size=args.batch_size)
        elapsed = time.perf_counter() - t0
        nll, lo, hi = ratio_mean_ci([s for s, _ in sums], [c for _, c in sums])
        samples = [{"index": i, "prompt": records[i].prompt, "nll_sum": round(s, 5), "tokens": c,
                    "nll": round(s / c, 5)} for i, (s, c) in zip(kept, sums)]
        metrics = {"n": len(kept), "nll": nll, "tokens": sum(c for _, c in sums), "ppl": math.exp(nll),
                   "nll_block": {"value": nll, "ci95": [lo, hi], "n": len(kept), "unit": "nats/token"},
                   "split": self.args.split, "task": data.task, "max_length": max_length,
                   "truncated": stats.truncated, "skipped_no_answer": len(records) - len(kept),
                   "timings": {"loglik_s": round(elapsed, 3)}}
        if self.args.exact_match_max_tokens:
            t0 = time.perf_counter()
            matched = self._exact_match(model, tokenizer, records, args, samples)
            if matched is not None:
                metrics["exact_match"] = matched
                metrics["timings"]["exact_match_s"] = round(time.perf_counter() - t0, 3)
        return metrics, samples

    def _exact_match(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any,
                     samples: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Greedy replies to the examples with a short reference answer, scored by normalised exact match;
        adds ``response``/``exact_match`` to their samples. None when no answer is short enough."""
        from spard.data.records import with_system_prompt
        from spard.evaluate.generation import generate
        from spard.evaluate.metrics import accuracy

        limit = self.args.exact_match_max_tokens
        lengths = {s["index"]: len(tokenizer(records[s["index"]].response or "", add_special_tokens=False)["input_ids"])
                   for s in samples}
        short = [s for s in samples if records[s["index"]].response and lengths[s["index"]] <= limit]
        if not short:
            return None
        prompts = [with_system_prompt([m for m in records[s["index"]].messages if m["role"] != "assistant"],
                                      args.system_prompt) for s in short]
        replies = generate(model, tokenizer, prompts, max_new_tokens=max(lengths[s["index"]] for s in short) + 8,
                           batch_size=args.batch_size, progress=args.progress, desc="task_nll exact match")
        for s, reply in zip(short, replies):
            s["response"] = reply
            s["exact_match"] = normalise_answer(reply) == normalise_answer(records[s["index"]].response or "")
        return {**accuracy([s["exact_match"] for s in short]), "max_answer_tokens": limit}

    def summary_rows(self, metrics: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        rows: dict[str, dict[str, Any] | None] = {
            "Held-out task NLL (nats/token, lower=better)": metrics.get("nll_block")}
        if "exact_match" in metrics:
            rows[f"Held-out task exact match (answers <= {metrics['exact_match']['max_answer_tokens']} tokens)"] = \
                metrics["exact_match"]
        return rows
