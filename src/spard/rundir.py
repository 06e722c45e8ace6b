"""The layout of a run directory, written once: every module that reads or writes a run uses these names.

    config.yaml          the resolved config (written once; never rewritten by a resume)
    train_set.jsonl      the fine-tuning set as trained on (after the attack and the defense's data step)
    attack_prompts.json  prompts of the attack's harmful records (kept out of evaluation)
    metrics.jsonl        one row per logging step
    checkpoint-N/        adapter + trainer state + defense_state.json, then COMPLETE (written last: whole)
    final/               the final LoRA adapter (safetensors)
    final_unprojected/   SafeLoRA only: the adapter before its projection, and the per-module cosines
    train_result.json    base model and training metrics (written last: the run finished)
    eval/                results.json, samples_<set>.jsonl, before.json, summary.txt
    evals/<name>/        further evaluations with other options (``spard eval RUN eval.x=...``): the same files

Kept free of torch/transformers imports so light commands (``spard bench --cells``) stay fast.

A checkpoint counts only when it is whole: :func:`mark_complete` writes ``checkpoint-N/COMPLETE`` (the size of
every file, fsynced) after every other part (adapter, optimizer, scheduler, RNG, trainer state, defense state
and tensors). :func:`last_checkpoint` is the newest whole checkpoint (unlike
``transformers.trainer_utils.get_last_checkpoint``, which takes the highest ``checkpoint-<step>`` directory
whatever it holds); :func:`skipped_checkpoints` says which newer ones were passed over and why.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from spard.errors import ConfigError
from spard.io import atomic_write_json

CONFIG_FILE = "config.yaml"
TRAIN_SET_FILE = "train_set.jsonl"
ATTACK_PROMPTS_FILE = "attack_prompts.json"
METRICS_FILE = "metrics.jsonl"
FINAL_DIR = "final"
FINAL_UNPROJECTED_DIR = "final_unprojected"
TRAIN_RESULT_FILE = "train_result.json"
DEFENSE_STATE_FILE = "defense_state.json"
EVAL_DIR = "eval"
RESULTS_FILE = "results.json"
BEFORE_FILE = "before.json"
SUMMARY_FILE = "summary.txt"
EVALS_DIR = "evals"
EVAL_OPTIONS_FILE = "eval_options.json"
ERROR_FILE = "error.txt"
CHECKPOINT_COMPLETE_FILE = "COMPLETE"
"""Written last into a checkpoint: the checkpoint is whole (see :func:`mark_complete`)."""

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-<step>`` directory."""
    m = _CHECKPOINT.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint-<step> directory")
    return int(m.group(1))


def checkpoints(run_dir: Path) -> list[Path]:
    """Every ``checkpoint-<step>`` directory of a run, whole or not, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted((p for p in run_dir.iterdir() if p.is_dir() and _CHECKPOINT.fullmatch(p.name)),
                  key=checkpoint_step)


def checkpoint_files(ckpt: Path) -> dict[str, int]:
    """Size of every file in a checkpoint (relative path -> bytes), leaving out the marker and the hidden
    temporary files of interrupted atomic writes."""
    ckpt = Path(ckpt)
    files = {}
    for path in sorted(ckpt.rglob("*")):
        rel = path.relative_to(ckpt)
        if path.is_file() and rel.as_posix() != CHECKPOINT_COMPLETE_FILE and \
                not any(part.startswith(".") for part in rel.parts):
            files[rel.as_posix()] = path.stat().st_size
    return files


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(ckpt: Path) -> Path:
    """Declare checkpoint ``ckpt`` whole: fsync its files, then write ``COMPLETE`` (their sizes) atomically.

    Call it after every part is written: a process killed earlier leaves a checkpoint without the marker,
    which :func:`last_checkpoint` ignores."""
    ckpt = Path(ckpt)
    files = checkpoint_files(ckpt)
    for name in files:  # durable before the marker says so (a power loss, not only a kill)
        _fsync(ckpt / name)
    marker = atomic_write_json(ckpt / CHECKPOINT_COMPLETE_FILE, {"step": checkpoint_step(ckpt), "files": files})
    if hasattr(os, "O_DIRECTORY"):
        _fsync(ckpt, os.O_RDONLY | os.O_DIRECTORY)  # the marker's rename itself
    return marker


def checkpoint_problem(ckpt: Path) -> str | None:
    """Why checkpoint ``ckpt`` is not whole, or None when it is (its marker is there and every file it lists
    has the recorded size)."""
    marker = Path(ckpt) / CHECKPOINT_COMPLETE_FILE
    if not marker.is_file():
        return (f"no {CHECKPOINT_COMPLETE_FILE} marker: its save was interrupted (or an older spard, or a Trainer "
                "without spard, wrote it)")
    try:
        files = json.loads(marker.read_text())["files"]
        recorded = {str(k): int(v) for k, v in files.items()}
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{marker} is unreadable"
    for name, size in recorded.items():
        path = Path(ckpt) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when the checkpoint was completed"
    return None


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest whole ``checkpoint-<step>`` directory of a run, if any (see :func:`checkpoint_problem`)."""
    return next((c for c in reversed(checkpoints(run_dir)) if checkpoint_problem(c) is None), None)


def skipped_checkpoints(run_dir: Path) -> list[tuple[Path, str]]:
    """The checkpoints newer than :func:`last_checkpoint` that are not whole, each with the reason."""
    newest = last_checkpoint(run_dir)
    after = checkpoint_step(newest) if newest is not None else -1
    found = ((c, checkpoint_problem(c)) for c in checkpoints(run_dir) if checkpoint_step(c) > after)
    return [(c, why) for c, why in found if why is not None]


def rotation_victims(found: Iterable[tuple[Path, bool]], limit: int | None,
                     protect: Iterable[Path] = ()) -> list[Path]:
    """Which checkpoints ``save_total_limit=limit`` deletes, given ``(checkpoint, whole)`` pairs: all but the
    newest ``limit`` whole ones (and ``protect``), and the broken ones older than the newest whole one.
    Broken checkpoints newer than it are kept (a resumed run rewrites them) and never count toward the
    limit, so the newest whole checkpoint is never deleted in favour of a broken one."""
    found = sorted(found, key=lambda item: checkpoint_step(item[0]))
    whole = [c for c, ok in found if ok]
    if not whole:
        return []
    newest = checkpoint_step(whole[-1])
    keep = set(whole[-limit:]) if limit and limit > 0 else set(whole)
    keep |= {Path(p) for p in protect}
    return [c for c, ok in found if c not in keep and (ok or checkpoint_step(c) < newest)]


def rotate_checkpoints(run_dir: Path, limit: int | None, protect: Iterable[Path] = ()) -> list[Path]:
    """Delete the checkpoints :func:`rotation_victims` names; returns them. A no-op without a limit."""
    if not limit or limit <= 0:
        return []
    victims = rotation_victims(((c, checkpoint_problem(c) is None) for c in checkpoints(run_dir)), limit, protect)
    for c in victims:
        shutil.rmtree(c, ignore_errors=True)
    return victims


def results_path(run_dir: Path) -> Path:
    """``eval/results.json`` of a run."""
    return Path(run_dir) / EVAL_DIR / RESULTS_FILE


def is_finished(run_dir: Path) -> bool:
    """Training finished (``train_result.json`` exists)."""
    return (Path(run_dir) / TRAIN_RESULT_FILE).is_file()


def has_training_state(run_dir: Path) -> bool:
    """A checkpoint (whole or not), a final adapter or finished results: things a rerun would resume or
    overwrite."""
    run_dir = Path(run_dir)
    return bool(checkpoints(run_dir)) or (run_dir / FINAL_DIR).exists() or results_path(run_dir).is_file()


def check_writable_dir(path: str | Path, key: str) -> None:
    """Refuse, before any compute, an output directory that cannot be written: ``path`` (or the nearest of its
    parents that exists, where it would be created) is a regular file or not writable. The error names
    ``key`` (the config key or option that set the path) and the path."""
    path = Path(path).expanduser()
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    where = "" if probe == path else f" (it would be created in {probe})"
    if not probe.is_dir():
        raise ConfigError(f"{key}={str(path)!r}: {probe} is a file, not a directory{where}; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={str(path)!r}: {probe} is not writable{where}; choose another path")
