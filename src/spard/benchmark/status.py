"""What state a cell's run directory is in, read from the files ``spard run`` leaves there.

``done``     eval/results.json exists and is valid (and the run's config.yaml matches the bench's config)
``stale``    the directory holds a run of a *different* config (the bench file changed since): never rerun
             or overwritten automatically, and left out of the table; delete the directory to redo it
``failed``   the last attempt crashed (error.txt holds the traceback), or its evaluation is marked invalid (its
             judge failed too often); the next invocation retries it
``partial``  training started (checkpoints) but did not finish, without a recorded crash: interrupted
             (or running in another process right now)
``pending``  nothing there yet
"""

from __future__ import annotations

import json
from pathlib import Path

from spard.benchmark.grid import Cell
from spard.config import stored_config_diff
from spard.rundir import CONFIG_FILE, ERROR_FILE, has_training_state, results_path

STATUSES = ("done", "stale", "failed", "partial", "pending")
HOW_ONLY = frozenset({"train.resume"})
"""What a bench cell's stored config may differ in and still be the cell (evaluation settings count here:
the cell's results must be the bench's)."""


def stale_reason(cell: Cell) -> str | None:
    """Why the cell directory's config.yaml is not the cell's config, or None when it matches / is absent."""
    path = cell.run_dir / CONFIG_FILE
    if not path.is_file():
        return None
    diff = stored_config_diff(cell.config, path, ignore=HOW_ONLY)
    return f"{path} differs in " + "; ".join(diff) if diff else None


def invalid_reason(run_dir: Path) -> str | None:
    """Why the run's eval/results.json is marked invalid (``"valid": false``), or None."""
    try:
        results = json.loads(results_path(run_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(results, dict) and results.get("valid") is False:
        return str(results.get("invalid_reason") or "evaluation marked invalid")
    return None


def cell_status(cell: Cell) -> str:
    """One of :data:`STATUSES` (see the module docstring)."""
    d = cell.run_dir
    if has_training_state(d) and stale_reason(cell) is not None:
        return "stale"
    if results_path(d).is_file():
        return "failed" if invalid_reason(d) else "done"
    if (d / ERROR_FILE).is_file():
        return "failed"
    if has_training_state(d):
        return "partial"
    return "pending"
