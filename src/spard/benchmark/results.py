"""Read a cell's metrics back from its run directory (train_result.json, eval/results.json, eval/before.json).

Metrics are fractions in [0, 1] (or seconds); a metric the run did not produce is None, never 0, so a
missing cell or a task that was not evaluated shows as missing downstream.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spard.benchmark.grid import Bench, Cell
from spard.benchmark.status import cell_status, invalid_reason
from spard.evaluate.tasks import task_class
from spard.registry import TASKS
from spard.rundir import BEFORE_FILE, ERROR_FILE, EVAL_DIR, TRAIN_RESULT_FILE, results_path


@dataclass
class CellResult:
    """One results.csv row."""

    cell: Cell
    status: str
    """See :mod:`spard.benchmark.status`."""
    asr: float | None = None
    """Attack success rate of the primary judge, pooled over the harm sets."""
    refusal_rate: float | None = None
    """Refusal rate of the same judge."""
    task_metrics: dict[str, float | None] = field(default_factory=dict)
    """Headline metric of every utility task evaluated, by task name (a fraction for rates; ``task_nll``: nats)."""
    task_acc: float | None = None
    """Accuracy on the cell's own fine-tuning task (the table's accuracy)."""
    judge: str | None = None
    n_harm: int | None = None
    """Harmful prompts scored."""
    judge_errors: int | None = None
    """Replies the primary judge could not score (left out of ``asr``; within ``eval.judge.max_error_rate``)."""
    train_seconds: float | None = None
    seconds_per_step: float | None = None
    steps: int | None = None
    eval_seconds: float | None = None
    error: str | None = None
    """Last line of error.txt for failed cells."""

    @property
    def ok(self) -> bool:
        return self.status == "done"


def _value(block: Any) -> float | None:
    return block.get("value") if isinstance(block, dict) else None


def harm_summary(results: dict[str, Any]) -> tuple[str | None, float | None, float | None, int | None]:
    """``(judge, asr, refusal_rate, n)`` of the primary judge over all harm sets (``harm["all"]`` when there
    are several sets, else the only one)."""
    harm = results.get("harm") or {}
    block = harm.get("all") if "all" in harm else (next(iter(harm.values())) if len(harm) == 1 else None)
    if not block:
        return None, None, None, None
    judges = block.get("judges") or {}
    judge = results.get("primary_judge") or "keyword"
    if judge not in judges:
        judge = "keyword" if "keyword" in judges else next(iter(judges), None)
    m = judges.get(judge) or {}
    n = (m.get("asr") or {}).get("n")
    return judge, _value(m.get("asr")), _value(m.get("refusal_rate")), n


def primary_judge_errors(results: dict[str, Any]) -> int:
    """Replies the primary judge (the one :func:`harm_summary` reads) could not score, over all harm sets."""
    judge = harm_summary(results)[0]
    harm = results.get("harm") or {}
    return sum(((((block.get("judges") or {}).get(judge) or {}).get("error_rate") or {}).get("k") or 0)
               for name, block in harm.items() if not (name == "all" and len(harm) > 1))


def evaluates_task(rows: list[CellResult], task: str) -> bool:
    """Whether the cells fine-tuned on ``task`` also score its accuracy (``task`` is among their
    ``eval.tasks``); a bench may leave it out, e.g. where a small model scores chance on it."""
    return any(task in r.cell.config.eval.task_names for r in rows if r.cell.task == task)


def task_accuracy(results: dict[str, Any], task: str) -> float | None:
    """A utility task's headline metric (``metrics["accuracy"]``, or the ``headline`` the task declares, e.g.
    ``task_nll``'s loss), None if not evaluated."""
    metrics = (results.get("tasks") or {}).get(task)
    if task in TASKS:
        return task_class(task).headline_value(metrics)
    return _value((metrics or {}).get("accuracy"))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_cell(cell: Cell) -> CellResult:
    """The cell's metrics, or a row with only its status when it has not finished."""
    status = cell_status(cell)
    row = CellResult(cell, status)
    trained = _read_json(cell.run_dir / TRAIN_RESULT_FILE)
    if trained:
        m = trained.get("metrics") or {}
        row.train_seconds, row.seconds_per_step, row.steps = (m.get(k) for k in ("train_seconds", "seconds_per_step",
                                                                                  "steps"))
    if status == "failed":
        error_file = cell.run_dir / ERROR_FILE
        lines = (error_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()
                 if error_file.is_file() else [])
        row.error = lines[-1] if lines else (invalid_reason(cell.run_dir) or "failed")
    if status != "done":
        return row
    results = _read_json(results_path(cell.run_dir))
    if results is None:  # unreadable: count as missing rather than guess
        row.status, row.error = "failed", "eval/results.json is not valid JSON"
        return row
    row.judge, row.asr, row.refusal_rate, row.n_harm = harm_summary(results)
    row.judge_errors = primary_judge_errors(results)
    row.task_metrics = {name: task_accuracy(results, name) for name in results.get("tasks") or {}}
    row.task_acc = task_accuracy(results, cell.task)
    row.eval_seconds = (results.get("timings") or {}).get("total_s")
    return row


def collect_results(bench: Bench) -> list[CellResult]:
    """One :class:`CellResult` per cell, in grid order."""
    return [read_cell(c) for c in bench.cells]


def before_results(rows: list[CellResult]) -> dict[str, Any] | None:
    """The aligned model's evaluation before fine-tuning (``eval/before.json`` of the first finished cell;
    every cell on the same aligned model and eval settings shares it)."""
    for row in rows:
        if row.ok:
            before = _read_json(row.cell.run_dir / EVAL_DIR / BEFORE_FILE)
            if before:
                return before
    return None
