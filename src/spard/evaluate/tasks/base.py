"""What every utility task shares: the ``Task`` interface, generation-scored tasks, log-likelihood scoring.

A task plugin is one module of this package: a :class:`Task` subclass with ``name``, ``Args`` (a
:class:`~spard.args.TaskArgs` subclass) and ``register``-ed. Besides scoring, a task declares how it is
reported: ``summary_rows`` (rows of ``summary.txt``), ``title`` and ``csv_column`` (the bench's table,
``results.csv`` and plots use its headline ``metrics["accuracy"]``).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from spard.args import TaskArgs
from spard.data.chat import pad_sequences
from spard.data.records import Record, with_system_prompt
from spard.data.sources import load_source
from spard.errors import DataError, SpardError
from spard.evaluate.metrics import accuracy
from spard.registry import TASKS, build

register = TASKS.register


def user_turn(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


# ---------------------------------------------------------------------------------------------------------
# Log-likelihood of continuations (batched forward passes)
# ---------------------------------------------------------------------------------------------------------
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, as lm-eval does: the continuation is the tail of the
    tokenised ``context + continuation`` beyond the tokenised context (so merges at the boundary
    tokenise as the model would read them); if the context does not tokenise as a prefix, the two are
    tokenised separately. Unlike lm-eval, trailing whitespace stays in the context: it is part of the
    chat template (the newline after the assistant header), not of the answer."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return list(ctx), list(whole[len(ctx):])
    return list(ctx), list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def loglikelihoods(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each (context ids, continuation ids).

    Sequences are sorted by length and right-padded into batches of ``batch_size``; log-softmax is
    taken in float32 at the continuation positions only. Results come back in input order.
    """
    import sys

    import torch
    from tqdm.auto import tqdm

    from spard.evaluate.generation import model_device, pad_token_id

    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise SpardError(f"loglikelihood request {i}: empty context or continuation")
    device, pad = model_device(model), pad_token_id(tokenizer)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
    out: list[float] = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            bar = tqdm(total=len(order), desc="loglik", unit="choice", disable=not progress, file=sys.stderr,
                       leave=False)
            for idx in batches:
                seqs = [(pairs[i][0] + pairs[i][1])[:-1] for i in idx]  # the last token predicts nothing
                ids = pad_sequences(seqs, pad)
                mask = pad_sequences([[1] * len(s) for s in seqs], 0)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, i in enumerate(idx):
                    ctx, cont = pairs[i]
                    start = len(ctx) - 1  # logits at position t predict token t + 1
                    lp = logits[row, start:start + len(cont)].float().log_softmax(-1)
                    target = torch.tensor(cont, device=lp.device).unsqueeze(-1)
                    out[i] = float(lp.gather(-1, target).sum())
                bar.update(len(idx))
            bar.close()
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------
class Task(ABC):
    """A utility task built from its options (``self.args``). Subclasses set ``name``, ``Args``, ``source``
    and implement :meth:`evaluate`; ``title``/``csv_column``/:meth:`summary_rows` say how it is reported."""

    name: ClassVar[str] = ""
    Args: ClassVar[type[TaskArgs]] = TaskArgs
    source: ClassVar[str] = ""
    """The data source (:mod:`spard.data.sources`) the task's records come from."""
    title: ClassVar[str] = ""
    """Headline metric as the bench table and plots name it, e.g. ``GSM8K accuracy (flexible match)``."""
    csv_column: ClassVar[str] = ""
    """Column of the headline metric in the bench's ``results.csv`` (``<csv_column>_pct`` for a rate, else
    ``<csv_column>``)."""
    headline: ClassVar[str] = "accuracy"
    """Key of the headline metric in the task's metrics: a rate block (``{"value", "k", "n", "ci95"}``) or a
    plain number."""
    is_rate: ClassVar[bool] = True
    """The headline is a fraction in [0, 1] (reported in %); False: a quantity reported as is (a loss)."""
    lower_is_better: ClassVar[bool] = False
    """The bench marks the lowest value of a column as best instead of the highest (losses, error rates)."""
    own_table: ClassVar[bool] = False
    """The bench shows this task in a table of its own (besides the fine-tuning task's accuracy table)."""
    uses_run_data: ClassVar[bool] = False
    """The task scores the run's own fine-tuning data: the runner sets :attr:`run_data` to the run's
    :class:`~spard.args.DataArgs` before :meth:`load` (and the before-fine-tuning cache keys on it)."""

    def __init__(self, args: TaskArgs | None = None) -> None:
        self.args = args if args is not None else self.Args()
        self.run_data: Any = None
        """The run's :class:`~spard.args.DataArgs` (set by the runner for tasks with ``uses_run_data``)."""

    @classmethod
    def headline_value(cls, metrics: dict[str, Any] | None) -> float | None:
        """The headline number of ``metrics`` (a rate's ``value``), None if absent."""
        block = (metrics or {}).get(cls.headline)
        if isinstance(block, dict):
            block = block.get("value")
        return float(block) if isinstance(block, (int, float)) and not isinstance(block, bool) else None

    def load(self, split: str = "test", limit: int | None = None, path: str | None = None) -> list[Record]:
        """The first ``limit`` records of ``split`` (packaged copy, or ``path``: a file or hub id)."""
        records = load_source(self.source, split=split, path=path, limit=limit)
        if not records:
            raise DataError(f"task {self.name}: split {split!r} has no records")
        return records

    @abstractmethod
    def evaluate(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Score the model on ``records`` (``args``: the shared :class:`~spard.args.EvalArgs`, for decoding
        and batch size); returns ``(metrics, samples)``. ``metrics["accuracy"]`` is the headline."""

    def summary_rows(self, metrics: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
        """Rows this task adds to ``summary.txt``: label -> a rate block (``value``, ``ci95``, ``n``)."""
        return {self.title or f"{self.name} accuracy": metrics.get("accuracy")}


def task_for(args: TaskArgs, data: Any = None) -> Task:
    """The task ``args`` names, built with its options; ``data`` (the run's :class:`~spard.args.DataArgs`) is
    handed to tasks that score the run's own task (``uses_run_data``, e.g. ``task_nll``)."""
    task: Task = build(args)
    if task.uses_run_data:
        task.run_data = data
    return task


def task_class(name: str) -> type[Task]:
    """The registered task class called ``name`` (its report declarations need no instance)."""
    return TASKS.get(name)


class GenerativeTask(Task):
    """A task scored on generated replies: ``prompt`` -> generate -> ``score`` each -> ``aggregate``.

    ``stop_pattern`` (a regex) ends a reply once it matches, besides EOS."""

    stop_pattern: ClassVar[str | None] = None

    def prompt(self, record: Record) -> list[dict[str, str]]:
        return [m for m in record.messages if m["role"] != "assistant"]

    @abstractmethod
    def max_new_tokens(self) -> int:
        """Reply length for this task."""

    @abstractmethod
    def score(self, record: Record, response: str) -> dict[str, Any]:
        """Sample fields for one reply; must include ``correct``."""

    def aggregate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(samples), "accuracy": accuracy([s["correct"] for s in samples])}

    def evaluate(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from spard.evaluate.generation import generate

        prompts = [with_system_prompt(self.prompt(r), args.system_prompt) for r in records]
        t0 = time.perf_counter()
        responses = generate(model, tokenizer, prompts, max_new_tokens=self.max_new_tokens(),
                             batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed, progress=args.progress, desc=self.name, stop_pattern=self.stop_pattern)
        elapsed = time.perf_counter() - t0
        samples = []
        for i, (rec, msgs, resp) in enumerate(zip(records, prompts, responses)):
            samples.append({"index": i, "prompt": msgs[-1]["content"], "response": resp, **self.score(rec, resp)})
        metrics = self.aggregate(samples)
        metrics["timings"] = {"generate_s": round(elapsed, 3)}
        return metrics, samples
