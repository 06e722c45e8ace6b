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
import os
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spard.args import EvalArgs, RunConfig
from spard.config import load_config
from spard.errors import ConfigError, SpardError
from spard.io import atomic_write_json, atomic_write_text
from spard.jobs import align as align_job
from spard.jobs import finetune
from spard.jobs.align import AlignResult
from spard.jobs.finetune import TrainResult
from spard.jobs.preflight import Plan, preflight
from spard.locking import dir_lock
from spard.models import cache_dir
from spard.registry import build
from spard.rundir import (
    ATTACK_PROMPTS_FILE,
    BEFORE_FILE,
    CONFIG_FILE,
    EVAL_DIR,
    EVAL_OPTIONS_FILE,
    EVALS_DIR,
    FINAL_DIR,
    RESULTS_FILE,
    SUMMARY_FILE,
    TRAIN_RESULT_FILE,
    check_writable_dir,
)

if TYPE_CHECKING:
    from spard.evaluate.judge_file import JudgeFileResult
    from spard.export import ExportResult

log = logging.getLogger(__name__)

__all__ = ["load_config", "align", "train", "plan", "evaluate", "evaluate_base", "evaluate_before_after", "run",
           "export", "judge_file", "changed_eval_options", "eval_variant_name", "list_evaluations", "AlignResult",
           "TrainResult", "EvalResult", "RunResult", "Plan"]


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


IGNORED_EVAL_OPTIONS = frozenset({"progress"})
"""Eval options that change how an evaluation is shown, not what it measures."""


def changed_eval_options(own: EvalArgs, other: EvalArgs) -> dict[str, Any]:
    """The options of ``other`` that differ from the run's ``own`` evaluation (field -> other's value)."""
    a, b = asdict(own), asdict(other)
    return {k: b[k] for k in b if k not in IGNORED_EVAL_OPTIONS and a.get(k) != b[k]}


def eval_variant_name(changed: dict[str, Any]) -> str:
    """A directory name for an evaluation with ``changed`` options: the option names and a short hash of their
    values (``tasks+harm_sets-1a2b3c4d``), so different values never share a directory."""
    digest = hashlib.sha256(json.dumps(changed, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{'+'.join(sorted(changed))[:60]}-{digest}"


def _eval_dir(run_dir: Path, cfg: RunConfig, overrides: list[str] | tuple[str, ...], out: str | Path | None) -> Path:
    """Where an evaluation of ``run_dir`` with ``cfg.eval`` goes: ``eval/`` for the run's own options,
    ``evals/<name>/`` (or ``out``) for any other, so a re-evaluation never replaces the run's results."""
    own = load_config(run_dir / CONFIG_FILE)
    changed = changed_eval_options(build(own.defense).evaluation_args(own.eval), cfg.eval)
    if out is None and not changed:
        return run_dir / EVAL_DIR
    target = Path(out) if out is not None else run_dir / EVALS_DIR / eval_variant_name(changed)
    if target.resolve() == (run_dir / EVAL_DIR).resolve():
        raise ConfigError(f"--out {out}: that is the run's own evaluation directory; choose another")
    atomic_write_json(target / EVAL_OPTIONS_FILE, {"run_dir": str(run_dir), "overrides": list(overrides),
                                                   "changed": changed})
    log.info("evaluation with other options than the run's own: writing %s (eval/ is left as it is)", target)
    return target


def list_evaluations(run_dir: str | Path) -> list[tuple[Path, list[str]]]:
    """The run's further evaluations (``evals/<name>/``) with the overrides each was made with."""
    root = Path(run_dir) / EVALS_DIR
    found = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        try:
            overrides = json.loads((d / EVAL_OPTIONS_FILE).read_text(encoding="utf-8")).get("overrides", [])
        except (OSError, ValueError):
            overrides = []
        if (d / RESULTS_FILE).is_file():
            found.append((d, list(overrides)))
    return found


def evaluate(run_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
             out_dir: str | Path | None = None) -> EvalResult:
    """(Re-)evaluate the fine-tuned model of a finished run. With the run's own eval options it writes
    ``run_dir/eval/``; with other options (``overrides``) ``run_dir/evals/<name>/`` or ``out_dir``: the
    run's own results are never replaced by another evaluation."""
    from spard.evaluate import evaluate_model, format_results_table

    run_dir = Path(run_dir)
    cfg, base, attack = _finished_run(run_dir, overrides)
    target = _eval_dir(run_dir, cfg, overrides, out_dir)
    model, tok = _load_for_eval(base, cfg, run_dir / FINAL_DIR)
    info = {"base_model": base, "adapter": str(run_dir / FINAL_DIR), "defense": cfg.defense.name}
    results = evaluate_model(model, tok, cfg.eval, target, attack_prompts=attack, model_info=info,
                             data=cfg.data)
    return EvalResult(target, results, format_results_table(None, results))


def _cacheable(results: dict[str, Any]) -> bool:
    """A base evaluation goes into (or comes from) the cache only when valid and free of judge errors: a judge
    that failed (a wrong key) must not leave a result that is reused after it is fixed."""
    from spard.evaluate.metrics import judge_error_count

    return results.get("valid", True) is not False and judge_error_count(results.get("harm") or {}) == 0


def _move_dir(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def evaluate_base(cfg: RunConfig, base_model: str, *, attack_prompts: list[str] = ()) -> EvalResult:
    """Evaluate the model before fine-tuning; cached by (base model, eval options) since every run on the
    same base shares it. The overlap guard still runs against this run's attack prompts. An evaluation with
    judge errors is not cached (it is left in ``base_eval/uncached/<key>``), and one found in the cache is
    ignored."""
    from spard.evaluate.tasks import task_class

    key_parts: list[Any] = [base_model, asdict(cfg.eval)]
    if any(task_class(t.name).uses_run_data for t in cfg.eval.tasks):  # e.g. task_nll scores the run's own task
        d = cfg.data
        key_parts.append([d.task, d.task_path, d.prompt_field, d.response_field, d.max_length])
    if cfg.data.prompt_format != "chat":  # the prompts' wording changes every reply (chat keeps the old keys)
        key_parts.append({"prompt_format": cfg.data.prompt_format})
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    root = cache_dir() / "base_eval"
    # one process evaluates, others (bench workers, job-array cells) wait for it and read the cache
    # the lock lives outside base_eval/, whose entries are the cached evaluations only
    with dir_lock(cache_dir() / "locks" / "base_eval" / key, what="base evaluation cache entry", wait=True):
        return _evaluate_base_locked(cfg, base_model, root, key, attack_prompts)


def _evaluate_base_locked(cfg: RunConfig, base_model: str, root: Path, key: str,
                          attack_prompts: list[str]) -> EvalResult:
    from spard.evaluate import evaluate_model, format_results_table
    from spard.evaluate.harm import check_overlap, load_harm_sets

    out_dir = root / key
    if (out_dir / RESULTS_FILE).is_file():
        results = json.loads((out_dir / RESULTS_FILE).read_text())
        if _cacheable(results):
            check_overlap([r.prompt for r in load_harm_sets(cfg.eval)], list(attack_prompts),
                          cfg.eval.overlap_allowed)
            return EvalResult(out_dir, results, format_results_table(None, results))
        log.warning("ignoring the cached base evaluation %s: it has judge errors; evaluating again", out_dir)
    model, tok = _load_for_eval(base_model, cfg, None)
    info = {"base_model": base_model, "adapter": None}
    scratch = root / f".tmp-{key}-{os.getpid()}"
    uncached = root / "uncached" / key
    try:
        results = evaluate_model(model, tok, cfg.eval, scratch, attack_prompts=attack_prompts, model_info=info,
                                 data=cfg.data)
    except BaseException:
        if scratch.exists():
            _move_dir(scratch, uncached)  # an invalid evaluation's samples, for inspection; never read as cache
        raise
    if _cacheable(results):
        _move_dir(scratch, out_dir)
    else:
        log.warning("base evaluation not cached: its judge could not score %d replies (kept in %s)",
                    results.get("judge_errors", 0), uncached)
        _move_dir(scratch, uncached)
        out_dir = uncached
    return EvalResult(out_dir, results, format_results_table(None, results))


def evaluate_before_after(run_dir: str | Path, *, overrides: list[str] | tuple[str, ...] = (),
                          out_dir: str | Path | None = None) -> tuple[EvalResult, EvalResult, str]:
    """Evaluate a finished run's fine-tuned model and its base (cached); writes ``before.json`` and the
    side-by-side table ``summary.txt`` next to what :func:`evaluate` writes (``eval/`` for the run's own
    options, else ``evals/<name>/`` or ``out_dir``). Returns (before, after, table)."""
    from spard.evaluate import format_results_table

    run_dir = Path(run_dir)
    cfg, base, attack = _finished_run(run_dir, overrides)  # validates the run before the long evaluation
    check_writable_dir(run_dir, "run directory")
    if out_dir is not None:
        check_writable_dir(out_dir, "--out")
    with dir_lock(run_dir, what="run directory"):  # one process writes a run at a time
        after = evaluate(run_dir, overrides=overrides, out_dir=out_dir)
        before = evaluate_base(cfg, base, attack_prompts=attack)
        table = format_results_table(before.results, after.results)
        atomic_write_json(after.out_dir / BEFORE_FILE, before.results)
        atomic_write_text(after.out_dir / SUMMARY_FILE, table + "\n")
    return before, after, table


def run(cfg: RunConfig) -> RunResult:
    """Align (cached) → fine-tune under the defense → evaluate before and after; table in ``eval/summary.txt``.
    Every input of every stage (data, model, judge, evaluation sets) is checked first."""
    preflight(cfg)
    with dir_lock(cfg.train.output_dir, what="train.output_dir"):  # held from training to the evaluation
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
