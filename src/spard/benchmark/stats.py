"""Paired tests between the defenses of a bench: the exact McNemar test on per-prompt verdicts.

Every cell of a bench is evaluated on the same prompts, and cells that differ only in the defense share the
attack, harmful ratio and seed (the same task and harmful examples), so two defenses are compared *paired*:
per (seed, prompt) the two verdicts (harmful or not) form a 2×2 table, and only the discordant pairs carry
information: ``b`` = harmful under A only, ``c`` = harmful under B only. Under H0 (equal ASR) each discordant
pair is A's with probability 1/2, so the exact two-sided p-value is ``min(1, 2 · P(Binom(b + c, 1/2) ≤ min(b,
c)))`` (McNemar 1947; the exact form as in ``statsmodels.stats.contingency_tables.mcnemar(exact=True)``).

Per-prompt verdicts are read from each cell's ``eval/samples_<set>.jsonl`` (the ``harmful`` field, the
primary judge's verdict; samples whose judge failed are left out of both sides of their pair).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spard.benchmark.grid import Bench
from spard.benchmark.results import CellResult
from spard.rundir import EVAL_DIR, results_path

Verdicts = dict[Hashable, bool]
ALPHA = 0.05
AVERAGE = "average"
"""The column key of the test pooled over all columns (the table's average column)."""


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c`` (1.0 when both are 0)."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"mcnemar_exact: counts must be integers >= 0, got b={b}, c={c}")
    n, k = int(b + c), int(min(b, c))
    if n == 0:
        return 1.0
    # exact integer arithmetic: no underflow of 0.5**n for large n
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


def discordant(a: Mapping[Hashable, bool], b: Mapping[Hashable, bool]) -> tuple[int, int, int]:
    """``(n_pairs, a_only, b_only)`` over the keys both hold: pairs, true under ``a`` only, under ``b`` only."""
    keys = a.keys() & b.keys()
    return len(keys), sum(a[k] and not b[k] for k in keys), sum(b[k] and not a[k] for k in keys)


@dataclass
class PairedTest:
    """One comparison of defense ``a`` with defense ``b`` on a column (or ``average``: all columns pooled)."""

    task: str
    a: str
    b: str
    column: Any
    """``(attack, ratio)`` or :data:`AVERAGE`."""
    n_pairs: int
    a_only: int
    """Pairs harmful under ``a`` but not ``b``."""
    b_only: int
    p_value: float

    @property
    def significant(self) -> bool:
        return self.n_pairs > 0 and self.p_value < ALPHA


def harm_verdicts(run_dir: Path) -> Verdicts | None:
    """Per-prompt primary-judge verdicts of a finished cell, keyed by ``(harm set, index, prompt)``; None when
    its results or samples cannot be read."""
    try:
        results = json.loads(results_path(run_dir).read_text(encoding="utf-8"))
        out: Verdicts = {}
        for name in results.get("harm") or {}:
            if name == "all":
                continue
            file = (results.get("sample_files") or {}).get(name)
            if not file:
                return None
            judge = results.get("primary_judge") or "keyword"
            for line in (Path(run_dir) / EVAL_DIR / file).read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                if ((row.get(judge) or {}).get("error")) is not None:
                    continue
                out[(name, row["index"], row["prompt"])] = bool(row["harmful"])
        return out
    except (OSError, ValueError, KeyError):
        return None


def reference_labels(bench: Bench, reference: str = "sft", focus: str = "spard") -> tuple[str | None, str | None]:
    """Row labels of the first defense entries of the ``reference`` and ``focus`` plugins (None if absent)."""
    defs = bench.config.defenses
    return (next((d.label or d.name for d in defs if d.name == reference), None),
            next((d.label or d.name for d in defs if d.name == focus), None))


def comparisons(bench: Bench, reference: str = "sft", focus: str = "spard") -> list[tuple[str, str]]:
    """The pairs (a, b) of defense labels to test: every defense against ``reference`` (``a`` = the defense),
    and ``focus`` against every other defense but the reference. Defenses are matched by plugin name, the
    first of each kind (a bench may list one plugin twice with other options)."""
    ref, foc = reference_labels(bench, reference, focus)
    labels = [d.label or d.name for d in bench.config.defenses]
    pairs = [(d, ref) for d in labels if ref is not None and d != ref]
    pairs += [(foc, d) for d in labels if foc is not None and d not in (foc, ref)]
    return pairs


def paired_tests(bench: Bench, rows: list[CellResult],
                 verdicts: Callable[[Path], Verdicts | None] = harm_verdicts) -> list[PairedTest]:
    """Exact McNemar tests of :func:`comparisons`, per task, per column and pooled over all columns.

    Pairs are (seed, prompt) within a column; the pooled test takes each cell once (a merged ratio-0 cell
    that fills two columns counts once) so no pair is counted twice. Cells that did not finish are left out
    (with their pairs).
    """
    by: dict[tuple[str, str, int], list[tuple[tuple, Verdicts]]] = {}
    for r in rows:
        if not r.ok:
            continue
        v = verdicts(r.cell.run_dir)
        if v is None:
            continue
        cols = tuple(sorted(r.cell.columns, key=repr))
        by.setdefault((r.cell.task, r.cell.defense, r.cell.seed), []).append((cols, v))

    def keyed(task: str, defense: str, column: Any) -> Verdicts:
        out: Verdicts = {}
        for seed in bench.config.seeds:
            for cols, v in by.get((task, defense, seed), []):
                if column == AVERAGE or column in cols:
                    prefix = (seed, cols) if column == AVERAGE else (seed,)
                    out.update({(*prefix, k): x for k, x in v.items()})
        return out

    tests = []
    for task in bench.tasks:
        for a, b in comparisons(bench):
            for column in [*bench.columns(), AVERAGE]:
                n, a_only, b_only = discordant(keyed(task, a, column), keyed(task, b, column))
                tests.append(PairedTest(task, a, b, column, n, a_only, b_only, mcnemar_exact(a_only, b_only)))
    return tests
