"""``spard bench``: defenses × attacks × harmful ratios (× tasks × seeds), one ``spard run`` per cell, then the
paper-style table and plots.

    from spard.benchmark import bench, load_bench
    result = bench("configs/bench/smoke.yaml")     # run every unfinished cell, then collect
    print(result.report.table)                       # table.md; results.csv and the PNGs are next to it

Modules: :mod:`~spard.benchmark.grid` (bench config, validation, cells), :mod:`~spard.benchmark.status`
(what a cell directory holds), :mod:`~spard.benchmark.runner` (run/skip/resume/retry cells),
:mod:`~spard.benchmark.results` (read metrics back), :mod:`~spard.benchmark.report` (results.csv, table.md),
:mod:`~spard.benchmark.plots` (the PNGs).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spard.benchmark.grid import Bench, BenchConfig, Cell, load_bench
from spard.benchmark.results import CellResult, collect_results
from spard.benchmark.runner import CellOutcome, RunFn, run_cell, run_cells
from spard.benchmark.status import cell_status
from spard.config import RunConfig
from spard.rundir import check_writable_dir

__all__ = ["bench", "collect", "load_bench", "run_cells", "run_cell", "format_cell_list", "cell_status", "Bench",
           "BenchConfig", "Cell", "CellOutcome", "CellResult", "BenchReport", "BenchResult", "RunFn"]

log = logging.getLogger(__name__)

RESULTS_CSV = "results.csv"
TABLE_MD = "table.md"
SAFETY_UTILITY_PNG = "safety_utility.png"
ASR_VS_RATIO_PNG = "asr_vs_ratio.png"


@dataclass
class BenchReport:
    """The collected results and the files written from them."""

    rows: list[CellResult]
    table: str
    """table.md's text."""
    files: dict[str, Path] = field(default_factory=dict)
    """``results.csv``, ``table.md``, ``safety_utility.png``, ``asr_vs_ratio.png`` (when written)."""


@dataclass
class BenchResult:
    bench: Bench
    outcomes: list[CellOutcome]
    """What each cell run in this invocation did (empty for a collect)."""
    report: BenchReport | None
    """None when only one cell was run (``cell=I``): collect once all cells are done."""

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


def collect(b: Bench, *, plots: bool = True) -> BenchReport:
    """Read every cell's results and write results.csv, table.md and the plots into the bench directory."""
    from spard.benchmark import report
    from spard.io import atomic_write_text

    rows = collect_results(b)
    b.bench_dir.mkdir(parents=True, exist_ok=True)
    files = {RESULTS_CSV: report.write_csv(b.bench_dir / RESULTS_CSV, rows)}
    table = report.format_table(b, rows)
    files[TABLE_MD] = atomic_write_text(b.bench_dir / TABLE_MD, table)
    if plots:
        files.update(_plots(b, rows))
    return BenchReport(rows, table, files)


def _plots(b: Bench, rows: list[CellResult]) -> dict[str, Path]:
    from spard.benchmark import plots

    out = {SAFETY_UTILITY_PNG: plots.safety_utility(b, rows, b.bench_dir / SAFETY_UTILITY_PNG)}
    made = plots.asr_vs_ratio(b, rows, b.bench_dir / ASR_VS_RATIO_PNG)
    if made is not None:
        out[ASR_VS_RATIO_PNG] = made
    return out


def bench(
    config: str | Path | Bench,
    *,
    cell: int | None = None,
    collect_only: bool = False,
    retry: int = 0,
    output_dir: str | Path | None = None,
    run_fn: RunFn | None = None,
    align_fn: Callable[[RunConfig], Any] | None = None,
    jobs: int = 1,
) -> BenchResult:
    """Run a bench (every unfinished cell, or only ``cell``) and collect its results.

    ``collect_only`` runs nothing. ``retry`` extra attempts for a crashing cell. ``run_fn`` runs one cell
    (default :func:`run_cell`, i.e. ``spard.api.run``); ``align_fn`` the alignment stage (``spard.api.align``).
    ``jobs`` cells at a time, each in its own worker process with its share of the cores
    (:mod:`spard.benchmark.parallel`).
    """
    b = config if isinstance(config, Bench) else load_bench(config, output_dir=output_dir)
    check_writable_dir(b.bench_dir, "output_dir (bench)")  # before any cell's compute
    if collect_only:
        return BenchResult(b, [], collect(b))
    outcomes = run_cells(b, indices=None if cell is None else [cell], run_fn=run_fn, align_fn=align_fn, retry=retry,
                         jobs=jobs)
    return BenchResult(b, outcomes, None if cell is not None else collect(b))


def format_cell_list(b: Bench) -> str:
    """``index  name  status`` per cell (``spard bench CONFIG --cells``)."""
    width = max([len(c.name) for c in b.cells] + [4])
    lines = [f"{'#':>3}  {'cell':<{width}}  status", *(f"{c.index:>3}  {c.name:<{width}}  {cell_status(c)}"
                                                       for c in b.cells)]
    counts: dict[str, int] = {}
    for c in b.cells:
        counts[cell_status(c)] = counts.get(cell_status(c), 0) + 1
    lines.append(f"{len(b.cells)} cells in {b.bench_dir / 'cells'}: "
                 + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return "\n".join(lines)
