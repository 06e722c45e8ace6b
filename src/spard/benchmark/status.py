"""What state a cell's run directory is in, read from the files ``spard run`` leaves there.

``done``     eval/results.json exists (and the run's config.yaml matches the bench's config for the cell)
``stale``    the directory holds a run of a *different* config (the bench file changed since): never rerun
             or overwritten automatically, and left out of the table; delete the directory to redo it
``failed``   the last attempt crashed: error.txt holds the traceback; the next invocation retries it
``partial``  training started (checkpoints) but did not finish, without a recorded crash: interrupted
             (or running in another process right now)
``pending``  nothing there yet
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from spard.benchmark.grid import Cell
from spard.config import config_to_yaml

# The layout of a run directory, as spard.train / spard.evaluate.runner write it. Not imported from there:
# spard.train pulls in peft and the transformers Trainer (seconds to import), and ``--cells`` / ``--collect``
# should not pay that; tests/test_benchmark.py checks the names agree.
FINAL_DIR = "final"
RESULTS_FILE = "results.json"
ERROR_FILE = "error.txt"
STATUSES = ("done", "stale", "failed", "partial", "pending")


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint-N`` directory of a run, if any."""
    ckpts = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    return max(ckpts, key=lambda p: int(p.name.split("-")[1]), default=None)


def results_path(run_dir: Path) -> Path:
    return run_dir / "eval" / RESULTS_FILE


def has_training_state(run_dir: Path) -> bool:
    """A checkpoint, a final adapter or finished results: things a rerun would resume or overwrite."""
    return (last_checkpoint(run_dir) is not None or (run_dir / FINAL_DIR).exists()
            or results_path(run_dir).is_file())


def config_diff(expected: dict[str, Any], stored: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ. Keys present on one side only are skipped, so a run written
    before a new config field was added still matches; ``train.resume`` is how, not what, and is skipped."""
    out = []
    for key in expected.keys() & stored.keys():
        dotted = prefix + key
        a, b = expected[key], stored[key]
        if dotted == "train.resume":
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, dotted + ".")
        elif a != b:
            out.append(f"{dotted} (bench: {a!r}, run: {b!r})")
    return sorted(out)


def stale_reason(cell: Cell) -> str | None:
    """Why the cell directory's config.yaml is not the cell's config, or None when it matches / is absent."""
    path = cell.run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        stored = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        return f"{path} is not valid YAML"
    expected = yaml.safe_load(config_to_yaml(cell.config))  # through YAML, so types compare as stored
    diff = config_diff(expected, stored)
    return f"{path} differs in " + "; ".join(diff) if diff else None


def cell_status(cell: Cell) -> str:
    """One of :data:`STATUSES` (see the module docstring)."""
    d = cell.run_dir
    if has_training_state(d) and stale_reason(cell) is not None:
        return "stale"
    if results_path(d).is_file():
        return "done"
    if (d / ERROR_FILE).is_file():
        return "failed"
    if has_training_state(d):
        return "partial"
    return "pending"
