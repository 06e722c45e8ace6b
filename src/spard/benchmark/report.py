"""results.csv and table.md of a bench (the plots are in :mod:`spard.benchmark.plots`).

table.md follows the papers' layout: defenses as rows, attacks × harmful ratio as columns, one table for ASR
(lower is better) and one for the fine-tuning task's accuracy (higher is better), an average column, the
best value of each column in bold, means over seeds. Tasks that declare ``own_table`` (held-out task NLL,
benign answer rate) get a table each. ASR entries carry the marks of the paired exact tests
(:mod:`spard.benchmark.stats`, stratified by prompt so seeds pool): ``‡`` differs from SFT, ``†`` differs from
SPARD, at 95 %. Every entry is the mean ± std over seeds (the average column: of each seed's row average). A
cell that has not finished is shown as ``–``.
"""

from __future__ import annotations

import csv
import io
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spard.benchmark.grid import Bench, ratio_text
from spard.benchmark.results import (
    CellResult,
    before_results,
    evaluates_task,
    harm_summary,
    primary_judge_errors,
    task_accuracy,
)
from spard.benchmark.stats import AVERAGE, PairedTest, paired_tests, reference_labels
from spard.evaluate.tasks import task_class
from spard.io import atomic_write_text
from spard.registry import TASKS, build

CSV_HEAD = ["index", "cell", "defense", "defense_name", "task", "attack", "attack_kind", "harmful_source", "ratio",
            "seed", "status", "judge", "n_harm", "asr_pct", "refusal_pct", "judge_errors"]
CSV_TAIL = ["task_acc_pct", "train_seconds", "seconds_per_step", "steps", "eval_seconds", "run_dir", "error"]
"""results.csv columns; between them one ``<task csv_column>_pct`` column per utility task evaluated."""
MISSING = "–"


def task_title(task: str) -> str:
    """How the bench names a task's headline metric (the task declares it)."""
    return (task_class(task).title if task in TASKS else "") or f"{task} accuracy"


def task_is_rate(task: str) -> bool:
    """The task's headline is a rate (shown in %); False for a quantity such as ``task_nll``'s loss."""
    return task_class(task).is_rate if task in TASKS else True


def task_column(task: str) -> str:
    stem = (task_class(task).csv_column if task in TASKS else '') or task + '_acc'
    return f"{stem}_pct" if task_is_rate(task) else stem


def csv_fields(rows: list[CellResult]) -> list[str]:
    tasks = list(dict.fromkeys(t for r in rows for t in r.task_metrics))
    return CSV_HEAD + [task_column(t) for t in tasks] + CSV_TAIL


def _pct(v: float | None) -> float | None:
    return None if v is None else round(100 * v, 2)


def csv_row(r: CellResult) -> dict[str, Any]:
    c = r.cell
    source = getattr(c.config.attack, "harmful_source", "") if c.ratio else ""
    row = {
        "index": c.index, "cell": c.name, "defense": c.defense, "defense_name": c.config.defense.name,
        "task": c.task, "attack": c.attack, "attack_kind": c.attack_kind, "harmful_source": source,
        "ratio": "" if c.ratio is None else c.ratio, "seed": c.seed, "status": r.status, "judge": r.judge,
        "n_harm": r.n_harm, "asr_pct": _pct(r.asr), "refusal_pct": _pct(r.refusal_rate), "judge_errors": r.judge_errors,
        **{task_column(t): _pct(v) if task_is_rate(t) else (None if v is None else round(v, 5))
           for t, v in r.task_metrics.items()}, "task_acc_pct": _pct(r.task_acc),
        "train_seconds": r.train_seconds, "seconds_per_step": r.seconds_per_step, "steps": r.steps,
        "eval_seconds": r.eval_seconds, "run_dir": str(c.run_dir), "error": r.error,
    }
    return {k: ("" if v is None else v) for k, v in row.items()}


def write_csv(path: Path, rows: list[CellResult]) -> Path:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=csv_fields(rows), lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(csv_row(r) for r in rows)
    return atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------
# Aggregation over seeds
# ---------------------------------------------------------------------------------------------------------
@dataclass
class Agg:
    """One table entry: a metric's mean (in %) over the seeds that finished."""

    mean: float | None
    std: float | None
    k: int
    """Seeds with a value."""
    n: int
    """Seeds in the bench."""


Column = tuple[str, float | None]


def aggregate(bench: Bench, rows: list[CellResult], metric: str, *, scale: float = 100.0
              ) -> dict[tuple[str, str, str, float | None], Agg]:
    """``{(task, defense, attack, ratio): Agg}`` of ``metric`` over seeds: a :class:`CellResult` field, or
    ``task:<name>`` for a utility task's headline; times ``scale`` (100: a fraction shown in %). A merged
    ratio-0 cell counts for each column it fills."""
    values: dict[tuple[str, str, str, float | None], list[float]] = {}
    for r in rows:
        v = r.task_metrics.get(metric[5:]) if metric.startswith("task:") else getattr(r, metric)
        for attack, ratio in r.cell.columns:
            key = (r.cell.task, r.cell.defense, attack, ratio)
            values.setdefault(key, [])
            if r.ok and v is not None:
                values[key].append(scale * v)
    n = len(bench.config.seeds)
    return {key: Agg(statistics.fmean(vs) if vs else None, statistics.stdev(vs) if len(vs) > 1 else None, len(vs), n)
            for key, vs in values.items()}


def row_average_std(bench: Bench, rows: list[CellResult], metric: str, task: str, *, scale: float = 100.0
                    ) -> dict[str, float]:
    """``{defense: std over seeds of the seed's mean over all columns}`` for the average column's ``±``: only
    seeds whose every column finished count, and a defense needs two of them."""
    columns = bench.columns()
    per_seed: dict[tuple[str, int], dict[Column, float]] = {}
    for r in rows:
        v = r.task_metrics.get(metric[5:]) if metric.startswith("task:") else getattr(r, metric)
        if r.cell.task != task or not r.ok or v is None:
            continue
        for column in r.cell.columns:
            per_seed.setdefault((r.cell.defense, r.cell.seed), {})[column] = scale * v
    means: dict[str, list[float]] = {}
    for (defense, _), values in per_seed.items():
        if all(c in values for c in columns):
            means.setdefault(defense, []).append(statistics.fmean(values[c] for c in columns))
    return {d: statistics.stdev(vs) for d, vs in means.items() if len(vs) > 1}


def defense_labels(bench: Bench) -> list[str]:
    return [d.label or d.name for d in bench.config.defenses]


def column_title(column: Column) -> str:
    attack, ratio = column
    return attack if ratio is None else f"{attack} p={ratio_text(ratio)}"


# ---------------------------------------------------------------------------------------------------------
# table.md
# ---------------------------------------------------------------------------------------------------------
def _entry(a: Agg | None, bold: bool, digits: int = 1, mark: str = "") -> str:
    if a is None or a.mean is None:
        return MISSING
    text = f"{a.mean:.{digits}f}"
    text = f"**{text}**" if bold else text
    text += mark
    if a.std is not None:
        text += f" ± {a.std:.{digits}f}"
    if a.k < a.n:
        text += f" ({a.k}/{a.n} seeds)"
    return text


def metric_table(bench: Bench, aggs: dict, task: str, *, lower_is_better: bool, digits: int = 1,
                 marks: dict[tuple[str, Any], str] | None = None, row_std: dict[str, float] | None = None) -> str:
    """One markdown table: defenses × columns + average, the best of each column in bold; ``marks`` maps
    ``(defense, column)`` (column ``"average"`` for the average) to a suffix such as ``‡``; ``row_std`` gives
    the average column's ``± std`` over seeds (:func:`row_average_std`)."""
    row_std = row_std or {}
    marks = marks or {}
    columns = bench.columns()
    labels = defense_labels(bench)
    grid = {(d, col): aggs.get((task, d, *col)) for d in labels for col in columns}
    averages: dict[str, float | None] = {}
    for d in labels:
        means = [grid[d, col].mean if grid[d, col] else None for col in columns]
        # an average over a row with holes would not be comparable with complete rows
        averages[d] = statistics.fmean(means) if means and all(m is not None for m in means) else None
    pick = min if lower_is_better else max

    def best(values: list[float | None]) -> float | None:
        shown = [round(v, digits) for v in values if v is not None]  # compare what is displayed: ties are all bold
        return pick(shown) if shown else None

    best_col = {col: best([grid[d, col].mean if grid[d, col] else None for d in labels]) for col in columns}
    best_avg = best(list(averages.values()))
    head = ["defense", *(column_title(c) for c in columns), "average"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for d in labels:
        cells = []
        for col in columns:
            a = grid[d, col]
            cells.append(_entry(a, a is not None and a.mean is not None and round(a.mean, digits) == best_col[col],
                                digits, marks.get((d, col), "")))
        avg = averages[d]
        text = f"{avg:.{digits}f}" if avg is not None else MISSING
        if avg is not None and round(avg, digits) == best_avg:
            text = f"**{text}**"
        if avg is not None:
            text += marks.get((d, "average"), "") + (f" ± {row_std[d]:.{digits}f}" if d in row_std else "")
        cells.append(text)
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def attack_description(bench: Bench, attack: Any, *, long: bool = False) -> str:
    """What an attack entry does, as its attack plugin describes it (``harmful_mix, beavertails``)."""
    # an unmerged cell of the attack has its options (a merged ratio-0 cell has none that matter)
    cell = next((c for c in bench.cells if c.attack == attack.name), None)
    if cell is None:
        return attack.kind
    return build(cell.config.attack).describe(long=long)  # type: ignore[no-any-return]


def _attack_legend(bench: Bench) -> str:
    return "; ".join(f"`{a.name}` = {attack_description(bench, a, long=True)}" for a in bench.config.attacks)


def _before_line(before: dict[str, Any] | None, tasks: list[str]) -> str | None:
    if not before:
        return None
    _, asr, _, _ = harm_summary(before)
    errors = primary_judge_errors(before)
    parts = [f"ASR {100 * asr:.1f}" + (f" (over scored replies; {errors} judge errors left out)" if errors else "")
             if asr is not None else None]
    for t in dict.fromkeys([*tasks, *(before.get("tasks") or {})]):  # fine-tuning task(s) first, then the rest
        acc = task_accuracy(before, t)
        if acc is not None:
            parts.append(f"{task_title(t)} {100 * acc:.1f}" if task_is_rate(t) else f"{task_title(t)} {acc:.3f}")
    unit = " (%)." if all(task_is_rate(t) for t in before.get("tasks") or {}) else " (rates in %)."
    return "Before fine-tuning (the aligned model): " + ", ".join(p for p in parts if p) + unit


def significance_marks(tests: list[PairedTest], task: str, reference: str | None, focus: str | None
                       ) -> dict[tuple[str, Any], str]:
    """Table marks from paired tests where the exact (stratified) p < 0.05: ``‡`` on a defense's entry = differs
    from ``reference`` (SFT); ``†`` = differs from ``focus`` (SPARD; on SFT's entry when SPARD vs SFT is)."""
    marks: dict[tuple[str, Any], str] = {}

    def add(label: str, column: Any, mark: str) -> None:
        marks[(label, column)] = marks.get((label, column), "") + mark

    for t in tests:
        if t.task != task or not t.significant:
            continue
        if t.b == reference:
            add(t.a, t.column, "‡")
            if t.a == focus:
                add(t.b, t.column, "†")
        elif t.a == focus:
            add(t.b, t.column, "†")
    return marks


JUDGE_ERROR_MARK = "§"


def judge_error_marks(rows: list[CellResult], task: str) -> dict[tuple[str, Any], str]:
    """``§`` on every ASR entry that includes a cell whose judge could not score some replies: that ASR is over
    the scored replies only, and the table says so."""
    marks: dict[tuple[str, Any], str] = {}
    for r in rows:
        if r.ok and r.judge_errors and r.cell.task == task:
            for column in r.cell.columns:
                marks[(r.cell.defense, column)] = JUDGE_ERROR_MARK
                marks[(r.cell.defense, "average")] = JUDGE_ERROR_MARK
    return marks


def _merge_marks(*dicts: dict[tuple[str, Any], str]) -> dict[tuple[str, Any], str]:
    out: dict[tuple[str, Any], str] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = out.get(k, "") + v
    return out


def _tests_text(tests: list[PairedTest], task: str) -> list[str]:
    pooled = [t for t in tests if t.task == task and t.column == AVERAGE and t.n_pairs]
    if not pooled:
        return []
    parts = [f"{t.a} vs {t.b}: {t.a_only}/{t.b_only} of {t.n_pairs}, p={t.p_value:.2g}" for t in pooled]
    return ["", "Paired exact tests, all columns and seeds pooled (stratified by prompt, seeds pooled within a "
            "prompt: exact Cochran–Mantel–Haenszel, = exact McNemar at one seed; (seed, prompt) pairs harmful "
            "under the first only / under the second only, of the pairs): " + "; ".join(parts) + "."]


def format_table(bench: Bench, rows: list[CellResult]) -> str:
    """The whole table.md text."""
    asr = aggregate(bench, rows, "asr")
    acc = aggregate(bench, rows, "task_acc")
    done = sum(r.ok for r in rows)
    judges = sorted({r.judge for r in rows if r.judge})
    n_harm = sorted({r.n_harm for r in rows if r.n_harm})
    ev = rows[0].cell.config.eval if rows else None
    seeds = bench.config.seeds
    out = [f"# Bench `{bench.name}`", ""]
    out.append(f"{done} of {len(rows)} cells finished. Values in %, "
               + (f"mean ± std over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}")
               + "; best per column in **bold**; – = not finished.")
    if ev is not None:
        n_text = f", n={n_harm[0]} prompts per cell" if len(n_harm) == 1 else ""
        out.append(f"ASR: share of harmful prompts answered harmfully, judge `{', '.join(judges) or ev.judge}`, "
                   f"harm sets {', '.join(ev.harm_sets)}{n_text}.")
    out.append(f"Columns: attack (p = harmful ratio). {_attack_legend(bench)}.")
    tests = paired_tests(bench, rows)
    errors = sum(r.judge_errors or 0 for r in rows if r.ok)
    if errors:
        out.append(f"{JUDGE_ERROR_MARK} ASR over the replies the judge scored: it could not score {errors} replies in "
                   "these cells (within eval.judge.max_error_rate; counts in results.csv judge_errors).")
    if any(t.n_pairs for t in tests):
        out.append("ASR marks: ‡ differs from sft, † differs from spard (exact paired test on the same prompts "
                   "and seeds, stratified by prompt, p < 0.05; the average column pools all columns; its ± is "
                   "the std over seeds of each seed's row average).")
    extra = [t for t in dict.fromkeys(t for r in rows for t in r.task_metrics)
             if t in TASKS and task_class(t).own_table]
    multi = len(bench.tasks) > 1
    for task in bench.tasks:
        title = task_title(task)
        if multi:
            out += ["", f"## Fine-tuning task: {task}"]
        h = "###" if multi else "##"
        out += ["", f"{h} ASR (%) ↓ (fine-tuned on {task})", "",
                metric_table(bench, asr, task, lower_is_better=True,
                             marks=_merge_marks(significance_marks(tests, task, *reference_labels(bench)),
                                                judge_error_marks(rows, task)),
                             row_std=row_average_std(bench, rows, "asr", task))]
        out += _tests_text(tests, task)
        if evaluates_task(rows, task):
            out += ["", f"{h} {title} (%) ↑", "", metric_table(bench, acc, task, lower_is_better=False,
                                                              row_std=row_average_std(bench, rows, "task_acc",
                                                                                      task))]
        for name in extra:
            cls = task_class(name)
            aggs = aggregate(bench, rows, f"task:{name}", scale=100.0 if cls.is_rate else 1.0)
            arrow = "↓" if cls.lower_is_better else "↑"
            out += ["", f"{h} {task_title(name)} {arrow}", "",
                    metric_table(bench, aggs, task, lower_is_better=cls.lower_is_better,
                                 digits=1 if cls.is_rate else 3,
                                 row_std=row_average_std(bench, rows, f"task:{name}", task,
                                                         scale=100.0 if cls.is_rate else 1.0))]
    before = _before_line(before_results(rows), bench.tasks)
    if before:
        out += ["", before]
    missing = [r for r in rows if not r.ok]
    if missing:
        out += ["", "Not finished: " + ", ".join(f"{r.cell.name} ({r.status})" for r in missing) + "."]
    return "\n".join(out) + "\n"
