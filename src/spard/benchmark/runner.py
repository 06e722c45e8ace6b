"""Run the cells of a bench: skip finished ones, resume partial ones, record crashes and go on.

The function that runs one cell is injectable (``run_fn``, default :func:`run_cell`, i.e. ``spard.api.run``),
so the scheduling logic is tested without training and a caller can run cells its own way.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spard.args import RunConfig
from spard.benchmark.grid import Bench, Cell
from spard.benchmark.status import cell_status, stale_reason
from spard.errors import SpardError
from spard.io import atomic_write_text
from spard.locking import DirectoryLocked, dir_lock
from spard.redact import RedactFilter
from spard.rundir import (
    ERROR_FILE,
    FINAL_DIR,
    TRAIN_RESULT_FILE,
    checkpoints,
)

log = logging.getLogger(__name__)

RunFn = Callable[[RunConfig], Any]
"""Runs one cell: gets the cell's full run config (``train.output_dir`` = the cell directory) and must leave
``eval/results.json`` there when it succeeds; any exception marks the cell failed."""
CELL_LOG = "bench.log"


@dataclass
class CellOutcome:
    """What happened to one cell in this invocation."""

    cell: Cell
    status: str
    """``ran`` (finished now), ``skipped`` (finished before), ``stale`` (not run: other config), ``failed``."""
    attempts: int = 0
    """Attempts made in this invocation."""
    seconds: float = 0.0
    """Wall time of those attempts."""
    error: str | None = None
    """Last line of the last traceback, for failed cells."""


def run_cell(cfg: RunConfig) -> None:
    """Default cell runner: :func:`spard.api.run`. A cell whose training finished but whose evaluation crashed
    is only evaluated: re-entering ``train`` would resume from the final checkpoint, run zero steps and
    overwrite train_result.json's timings with those of that empty run."""
    from spard import api

    run_dir = Path(cfg.train.output_dir)
    if (run_dir / TRAIN_RESULT_FILE).is_file() and (run_dir / FINAL_DIR / "adapter_config.json").is_file():
        log.info("%s: training finished earlier; evaluating only", run_dir)
        api.evaluate_before_after(run_dir)
    else:
        api.run(cfg)


def _default_align(cfg: RunConfig) -> Any:
    from spard import api

    return api.align(cfg)


def _attempt_config(cell: Cell) -> RunConfig:
    """The cell's config, with ``train.resume`` on when an earlier attempt left checkpoints or an adapter
    (``spard train`` refuses to overwrite those otherwise, and resuming saves the steps already done)."""
    d = cell.run_dir
    resume = bool(checkpoints(d)) or (d / FINAL_DIR).exists()  # whole or not: resume picks the whole one
    return dataclasses.replace(cell.config, train=dataclasses.replace(cell.config.train, resume=resume))


def _write_error(cell: Cell, attempt: int) -> str:
    tb = traceback.format_exc()
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    header = f"cell {cell.index} {cell.name}: attempt {attempt} failed at {stamp}\n\n"
    atomic_write_text(cell.run_dir / ERROR_FILE, header + tb)
    return tb.strip().splitlines()[-1]


class _CellLog:
    """Copy log records to ``<cell>/bench.log`` while the cell runs (the console scrolls away in a long grid)."""

    def __init__(self, cell: Cell) -> None:
        self.path = cell.run_dir / CELL_LOG

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handler = logging.FileHandler(self.path, encoding="utf-8")
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.handler.addFilter(RedactFilter())  # no judge key in bench.log
        logging.getLogger().addHandler(self.handler)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()


def _run_one(cell: Cell, run_fn: RunFn, retry: int) -> CellOutcome:
    """Run one cell under its directory's lock; a cell another process is running is left to it (failed
    here, with the owner named, and nothing written into its directory)."""
    try:
        with dir_lock(cell.run_dir, what=f"bench cell {cell.index} directory"):
            return _run_locked(cell, run_fn, retry)
    except DirectoryLocked as e:
        log.error("cell %d %s: %s", cell.index, cell.name, e)
        return CellOutcome(cell, "failed", error=str(e))


def _run_locked(cell: Cell, run_fn: RunFn, retry: int) -> CellOutcome:
    outcome = CellOutcome(cell, "failed")
    start = time.perf_counter()
    for attempt in range(1, retry + 2):
        outcome.attempts = attempt
        log.info("cell %d %s: running (attempt %d of %d)", cell.index, cell.name, attempt, retry + 1)
        try:
            with _CellLog(cell):
                run_fn(_attempt_config(cell))
            if cell_status(cell) != "done":
                raise SpardError(f"cell {cell.name}: the run finished without writing eval/results.json")
        except Exception:  # any crash of one cell is recorded and the grid goes on
            outcome.error = _write_error(cell, attempt)
            log.error("cell %d %s: attempt %d failed: %s (traceback in %s)", cell.index, cell.name, attempt,
                      outcome.error, cell.run_dir / ERROR_FILE)
            continue
        (cell.run_dir / ERROR_FILE).unlink(missing_ok=True)  # an old crash no longer describes this cell
        outcome.status, outcome.error = "ran", None
        break
    outcome.seconds = round(time.perf_counter() - start, 1)
    return outcome


def run_cells(
    bench: Bench,
    *,
    indices: Sequence[int] | None = None,
    run_fn: RunFn | None = None,
    align_fn: Callable[[RunConfig], Any] | None = None,
    retry: int = 0,
    jobs: int = 1,
) -> list[CellOutcome]:
    """Run the bench's cells (or those at ``indices``) in order, or ``jobs`` at a time in worker processes.

    Finished cells are skipped, partial ones resume, stale ones (their directory holds a run of another
    config) are left alone. A crash is written to ``<cell>/error.txt`` and the next cell starts; a crashed
    cell is tried again up to ``retry`` more times here, and again on the next invocation. The alignment
    stage runs once first (``align_fn``, default ``spard.api.align``, cached), so a broken alignment stops
    the bench instead of failing every cell in turn.

    With ``jobs > 1`` the cells run in that many spawned worker processes (:mod:`spard.benchmark.parallel`),
    the cores split between them; ``run_fn`` must then be picklable (a module-level function). A worker that
    dies leaves its cell and the cells not started marked failed; the next invocation resumes them.
    """
    if retry < 0:
        raise SpardError(f"retry={retry}: must be >= 0")
    if jobs < 1:
        raise SpardError(f"jobs={jobs}: must be >= 1")
    cells = bench.cells if indices is None else [_cell_at(bench, i) for i in indices]
    run_fn = run_fn or run_cell
    align_fn = align_fn or _default_align
    outcomes: dict[int, CellOutcome] = {}
    todo = []
    for cell in cells:
        status = cell_status(cell)
        if status == "done":
            outcomes[cell.index] = CellOutcome(cell, "skipped")
        elif status == "stale":
            log.warning("cell %d %s: not run: %s. Delete the directory to redo it with the bench's config.",
                        cell.index, cell.name, stale_reason(cell))
            outcomes[cell.index] = CellOutcome(cell, "stale", error=stale_reason(cell))
        else:
            todo.append(cell)
    log.info("bench %s: %d cells, %d finished, %d to run", bench.name, len(cells), len(cells) - len(todo), len(todo))
    alignments = _alignments_needed(todo)
    if jobs == 1 or len(todo) < 2:
        for cfg in alignments:
            align_fn(cfg)
        for n, cell in enumerate(todo, 1):
            log.info("bench %s: cell %d of %d to run", bench.name, n, len(todo))
            outcomes[cell.index] = _run_one(cell, run_fn, retry)
    else:
        outcomes.update(_run_in_workers(bench, alignments, todo, run_fn, align_fn, retry, jobs))
    return [outcomes[c.index] for c in cells]


def _alignments_needed(todo: Sequence[Cell]) -> list[RunConfig]:
    """One config per distinct aligned model (its cache entry) the cells to run use."""
    from spard.jobs.align import aligned_model_dir

    seen: dict[Path, RunConfig] = {}
    for cell in todo:
        cfg = cell.config
        if cfg.align.enabled:
            seen.setdefault(aligned_model_dir(cfg.model, cfg.align, cfg.train.bf16), cfg)
    return list(seen.values())


def _worker_task(item: tuple[str, Any], *, run_fn: RunFn, align_fn: Callable[[RunConfig], Any],
                 retry: int) -> CellOutcome | None:
    """One alignment stage (``("align", config)``) or one cell (``("cell", cell)``) in a worker process
    (module-level, so it pickles)."""
    kind, payload = item
    if kind == "align":
        align_fn(payload)
        return None
    return _run_one(payload, run_fn, retry)


def _run_in_workers(bench: Bench, alignments: list[RunConfig], todo: list[Cell], run_fn: RunFn,
                    align_fn: Callable[[RunConfig], Any], retry: int, jobs: int) -> dict[int, CellOutcome]:
    """The alignment stages and then the cells, in one queue: a worker free after an alignment starts cells
    while a longer alignment goes on elsewhere (a cell that needs an alignment still in progress waits for
    its cache entry). A failed alignment stops the bench, as without workers."""
    from spard.benchmark.parallel import WorkerDied, map_in_workers, threads_per_worker

    threads = threads_per_worker(jobs)
    log.info("bench %s: %d alignment stage(s) and %d cells in %d worker processes of %d thread(s) each",
             bench.name, len(alignments), len(todo), jobs, threads)
    items: list[tuple[str, Any]] = [("align", cfg) for cfg in alignments] + [("cell", c) for c in todo]
    outcomes: dict[int, CellOutcome] = {}
    task = functools.partial(_worker_task, run_fn=run_fn, align_fn=align_fn, retry=retry)
    try:
        for _, outcome in map_in_workers(task, items, jobs=jobs, threads=threads):
            if outcome is None:
                continue
            outcomes[outcome.cell.index] = outcome
            log.info("bench %s: cell %d %s %s in %.0f s (%d of %d)", bench.name, outcome.cell.index,
                     outcome.cell.name, outcome.status, outcome.seconds, len(outcomes), len(todo))
    except WorkerDied as e:
        log.error("bench %s: %s; rerun the same command to resume", bench.name, e)
        for cell in todo:  # a cell finished just before the pool broke is done on disk: say so
            done = cell_status(cell) == "done"
            outcomes.setdefault(cell.index, CellOutcome(cell, "ran" if done else "failed",
                                                        error=None if done else str(e)))
    return outcomes


def _cell_at(bench: Bench, index: int) -> Cell:
    if not 0 <= index < len(bench.cells):
        raise SpardError(f"cell {index}: {bench.path} has {len(bench.cells)} cells (0-{len(bench.cells) - 1}); "
                         "list them with --cells")
    return bench.cells[index]
