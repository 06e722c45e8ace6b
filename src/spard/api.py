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
from typing import TYPE_CHECKING, Any

from spard.args import RunConfig
from spard.config import load_config
from spard.errors import ConfigError, SpardError
from spard.io import atomic_write_json, atomic_write_text
from spard.jobs import align as align_job
from spard.jobs import finetune
from spard.jobs.align import AlignResult
from spard.jobs.finetune import TrainResult
from spard.jobs.preflight import Plan, preflight
from spard.models import cache_dir
from spard.registry import build
from spard.rundir import (
    ATTACK_PROMPTS_FILE,
    BEFORE_FILE,
    CONFIG_FILE,
    EVAL_DIR,
    FINAL_DIR,
    SUMMARY_FILE,
    TRAIN_RESULT_FILE,
)

if TYPE_CHECKING:
    from spard.evaluate.judge_file import JudgeFileResult
    from spard.export import ExportResult

log = logging.getLogger(__name__)

__all__ = ["load_config", "align", "train", "plan", "evaluate", "evaluate_base", "evaluate_before_after", "run",
           "export", "judge_file", "AlignResult", "TrainResult", "EvalResult", "RunResult", "Plan"]


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


def align(cfg: RunConfig, **kwargs: Any) -> AlignResult:
    """The alignment stage (cached): :func:`spard.jobs.align.align` after checking its inputs."""
    preflight(cfg, ("align",), check_model=kwargs.get("model") is None)
    return align_job.align(cfg, **kwargs)


def plan(cfg: RunConfig, stages: tuple[str, ...] = ("align", "train")) -> Plan:
    """What a run would train on, checked, without loading a model or training (``spard train --dry-run``)."""
    return preflight(cfg, stages)


def train(cfg: RunConfig, **kwargs: Any) -> TrainResult:
    """The fine-tuning job (:func:`spard.jobs.finetune.train`) after checking every input it needs."""
    own_model = kwargs.get("model") is not None
    preflight(cfg, ("train",) if own_model else ("align", "train"), check_model=not own_model)
    return finetune.train(cfg, **kwargs)


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
    not_eval = [o for o in overrides if not o.strip().startswith("eval.")]
    if not_eval:
        raise ConfigError(f"spard eval accepts only eval.* overrides (the run's own config says what was trained); "
                          f"got {not_eval}")
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / TRAIN_RESULT_FILE).is_file():
        raise SpardError(f"{run_dir}: not a finished spard run ({CONFIG_FILE} / {TRAIN_RESULT_FILE} missing)")
    cfg = load_config(run_dir / CONFIG_FILE, list(overrides))
    cfg = replace(cfg, eval=build(cfg.defense).evaluation_args(cfg.eval))  # e.g. PTST's safe-testing prompt
    base = json.loads((run_dir / TRAIN_RESULT_FILE).read_text())["base_model"]
    return cfg, base, json.loads((run_dir / ATTACK_PROMPTS_FILE).read_text())


def evaluate(run_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = ()) -> EvalResult:
    """(Re-)evaluate the fine-tuned model of a finished run; writes ``run_dir/eval/``."""
    from spard.evaluate import evaluate_model, format_results_table

    run_dir = Path(run_dir)
    cfg, base, attack = _finished_run(run_dir, overrides)
    model, tok = _load_for_eval(base, cfg, run_dir / FINAL_DIR)
    info = {"base_model": base, "adapter": str(run_dir / FINAL_DIR), "defense": cfg.defense.name}
    results = evaluate_model(model, tok, cfg.eval, run_dir / EVAL_DIR, attack_prompts=attack, model_info=info,
                             data=cfg.data)
    return EvalResult(run_dir / EVAL_DIR, results, format_results_table(None, results))


def evaluate_base(cfg: RunConfig, base_model: str, *, attack_prompts: list[str] = ()) -> EvalResult:
    """Evaluate the model before fine-tuning; cached by (base model, eval options) since every run on the
    same base shares it. The overlap guard still runs against this run's attack prompts."""
    from spard.evaluate import evaluate_model, format_results_table
    from spard.evaluate.harm import check_overlap, load_harm_sets
    from spard.evaluate.tasks import task_class

    key_parts: list[Any] = [base_model, asdict(cfg.eval)]
    if any(task_class(t.name).uses_run_data for t in cfg.eval.tasks):  # e.g. task_nll scores the run's own task
        d = cfg.data
        key_parts.append([d.task, d.task_path, d.prompt_field, d.response_field, d.max_length])
    if cfg.data.prompt_format != "chat":  # the prompts' wording changes every reply (chat keeps the old keys)
        key_parts.append({"prompt_format": cfg.data.prompt_format})
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode())
    out_dir = cache_dir() / "base_eval" / key.hexdigest()[:16]
    if (out_dir / "results.json").is_file():
        check_overlap([r.prompt for r in load_harm_sets(cfg.eval)], list(attack_prompts), cfg.eval.overlap_allowed)
        results = json.loads((out_dir / "results.json").read_text())
    else:
        model, tok = _load_for_eval(base_model, cfg, None)
        info = {"base_model": base_model, "adapter": None}
        results = evaluate_model(model, tok, cfg.eval, out_dir, attack_prompts=attack_prompts, model_info=info,
                                 data=cfg.data)
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
    """Align (cached) → fine-tune under the defense → evaluate before and after; table in ``eval/summary.txt``.
    Every input of every stage (data, model, judge, evaluation sets) is checked first."""
    preflight(cfg)
    trained = finetune.train(cfg)
    before, after, table = evaluate_before_after(trained.run_dir)
    return RunResult(trained, before, after, table)


def export(run_dir: str | Path, out_dir: str | Path, *, merged: bool = False, push_to_hub: str | None = None,
           private: bool = False) -> ExportResult:
    """``spard export``: a finished run's LoRA adapter (or, ``merged``, the merged model) with its tokenizer
    and chat template in ``out_dir``, optionally pushed to the hub; see :func:`spard.export.export_run`."""
    from spard.export import export_run

    return export_run(run_dir, out_dir, merged=merged, push_to_hub=push_to_hub, private=private)


def judge_file(path: str | Path, judge: str = "keyword", options: Any = None, **kwargs: Any) -> JudgeFileResult:
    """``spard judge``: judge the prompt + response rows of a JSONL/CSV file; see
    :func:`spard.evaluate.judge_file.judge_file`."""
    from spard.evaluate.judge_file import judge_file as judge_rows

    return judge_rows(path, judge, options, **kwargs)
