"""The Python API: every CLI command is one of these functions.

    from spard import load_config, align, train, evaluate, run
    cfg = load_config("configs/quickstart.yaml", ["defense.name=safeinstr"])
    result = run(cfg)            # align (cached) -> poisoned fine-tune under the defense -> evaluate
    print(result.table)
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from spard.args import RunConfig
from spard.config import load_config
from spard.errors import SpardError
from spard.io import atomic_write_json, atomic_write_text
from spard.jobs.align import AlignResult, align
from spard.jobs.finetune import TrainResult, train
from spard.models import cache_dir
from spard.rundir import (
    ATTACK_PROMPTS_FILE,
    BEFORE_FILE,
    CONFIG_FILE,
    EVAL_DIR,
    FINAL_DIR,
    SUMMARY_FILE,
    TRAIN_RESULT_FILE,
)

log = logging.getLogger(__name__)

__all__ = ["load_config", "align", "train", "evaluate", "evaluate_base", "evaluate_before_after", "run",
           "AlignResult", "TrainResult", "EvalResult", "RunResult"]


@dataclass
class EvalResult:
    """Evaluation of one model: the results dict (also in ``out_dir/results.json``) and a printable table."""

    out_dir: Path
    """Where results.json and samples_<set>.jsonl are."""
    results: dict[str, Any]
    """Metrics with intervals, counts, timings."""
    table: str
    """Short plain-text summary."""


@dataclass
class RunResult:
    """``spard run``: training plus evaluation before and after fine-tuning."""

    train: TrainResult
    before: EvalResult
    after: EvalResult
    table: str


def _load_for_eval(base_model: str, cfg: RunConfig, adapter_dir: Path | None):
    from peft import PeftModel

    from spard.models import load_model

    model, tokenizer = load_model(replace(cfg.model, name_or_path=base_model))
    if adapter_dir is not None:
        # merged weights generate faster than an unmerged adapter and give the same outputs
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).merge_and_unload()
    model.eval()
    return model, tokenizer


def _finished_run(run_dir: Path, overrides: list[str] | tuple[str, ...]) -> tuple[RunConfig, str, list[str]]:
    """A finished run's config (with eval overrides), base model and attack prompts."""
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / TRAIN_RESULT_FILE).is_file():
        raise SpardError(f"{run_dir}: not a finished spard run ({CONFIG_FILE} / {TRAIN_RESULT_FILE} missing)")
    cfg = load_config(run_dir / CONFIG_FILE, list(overrides))
    base = json.loads((run_dir / TRAIN_RESULT_FILE).read_text())["base_model"]
    return cfg, base, json.loads((run_dir / ATTACK_PROMPTS_FILE).read_text())


def evaluate(run_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = ()) -> EvalResult:
    """(Re-)evaluate the fine-tuned model of a finished run; writes ``run_dir/eval/``."""
    from spard.evaluate import evaluate_model, format_results_table

    run_dir = Path(run_dir)
    cfg, base, attack = _finished_run(run_dir, overrides)
    model, tok = _load_for_eval(base, cfg, run_dir / FINAL_DIR)
    info = {"base_model": base, "adapter": str(run_dir / FINAL_DIR), "defense": cfg.defense.name}
    results = evaluate_model(model, tok, cfg.eval, run_dir / EVAL_DIR, attack_prompts=attack, model_info=info)
    return EvalResult(run_dir / EVAL_DIR, results, format_results_table(None, results))


def evaluate_base(cfg: RunConfig, base_model: str, *, attack_prompts: list[str] = ()) -> EvalResult:
    """Evaluate the model before fine-tuning; cached by (base model, eval options) since every run on the
    same base shares it. The overlap guard still runs against this run's attack prompts."""
    from spard.evaluate import evaluate_model, format_results_table
    from spard.evaluate.harm import check_overlap, load_harm_sets

    key = hashlib.sha256(json.dumps([base_model, asdict(cfg.eval)], sort_keys=True, default=str).encode())
    out_dir = cache_dir() / "base_eval" / key.hexdigest()[:16]
    if (out_dir / "results.json").is_file():
        check_overlap([r.prompt for r in load_harm_sets(cfg.eval)], list(attack_prompts), cfg.eval.allow_overlap)
        results = json.loads((out_dir / "results.json").read_text())
    else:
        model, tok = _load_for_eval(base_model, cfg, None)
        info = {"base_model": base_model, "adapter": None}
        results = evaluate_model(model, tok, cfg.eval, out_dir, attack_prompts=attack_prompts, model_info=info)
    return EvalResult(out_dir, results, format_results_table(None, results))


def evaluate_before_after(run_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = ()
                          ) -> tuple[EvalResult, EvalResult, str]:
    """Evaluate a finished run's fine-tuned model and its base (cached); writes ``eval/before.json`` and the
    side-by-side table ``eval/summary.txt`` next to what :func:`evaluate` writes. Returns (before, after, table)."""
    from spard.evaluate import format_results_table

    run_dir = Path(run_dir)
    cfg, base, attack = _finished_run(run_dir, overrides)  # validates the run before the long evaluation
    after = evaluate(run_dir, overrides=overrides)
    before = evaluate_base(cfg, base, attack_prompts=attack)
    table = format_results_table(before.results, after.results)
    atomic_write_json(run_dir / EVAL_DIR / BEFORE_FILE, before.results)
    atomic_write_text(run_dir / EVAL_DIR / SUMMARY_FILE, table + "\n")
    return before, after, table


def run(cfg: RunConfig) -> RunResult:
    """Align (cached) → fine-tune under the defense → evaluate before and after; table in ``eval/summary.txt``."""
    trained = train(cfg)
    before, after, table = evaluate_before_after(trained.run_dir)
    return RunResult(trained, before, after, table)
