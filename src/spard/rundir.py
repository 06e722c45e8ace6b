"""The layout of a run directory, written once: every module that reads or writes a run uses these names.

    config.yaml          the resolved config (written once; never rewritten by a resume)
    train_set.jsonl      the fine-tuning set as trained on (after the attack and the defense's data step)
    attack_prompts.json  prompts of the attack's harmful records (kept out of evaluation)
    metrics.jsonl        one row per logging step
    checkpoint-N/        adapter + trainer state + defense_state.json
    final/               the final LoRA adapter (safetensors)
    final_unprojected/   SafeLoRA only: the adapter before its projection, and the per-module cosines
    train_result.json    base model and training metrics (written last: the run finished)
    eval/                results.json, samples_<set>.jsonl, before.json, summary.txt

Kept free of torch/transformers imports so light commands (``spard bench --cells``) stay fast; for the same
reason :func:`last_checkpoint` follows ``transformers.trainer_utils.get_last_checkpoint``'s rule (the
highest ``checkpoint-<step>`` directory) instead of importing it (that import pulls in peft and torch).
"""

from __future__ import annotations

import re
from pathlib import Path

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
ERROR_FILE = "error.txt"

_CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def checkpoint_step(path: Path) -> int:
    """The step of a ``checkpoint-<step>`` directory."""
    m = _CHECKPOINT.fullmatch(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint-<step> directory")
    return int(m.group(1))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest ``checkpoint-<step>`` directory of a run, if any."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    ckpts = [p for p in run_dir.iterdir() if p.is_dir() and _CHECKPOINT.fullmatch(p.name)]
    return max(ckpts, key=checkpoint_step, default=None)


def results_path(run_dir: Path) -> Path:
    """``eval/results.json`` of a run."""
    return Path(run_dir) / EVAL_DIR / RESULTS_FILE


def is_finished(run_dir: Path) -> bool:
    """Training finished (``train_result.json`` exists)."""
    return (Path(run_dir) / TRAIN_RESULT_FILE).is_file()


def has_training_state(run_dir: Path) -> bool:
    """A checkpoint, a final adapter or finished results: things a rerun would resume or overwrite."""
    run_dir = Path(run_dir)
    return last_checkpoint(run_dir) is not None or (run_dir / FINAL_DIR).exists() or results_path(run_dir).is_file()
