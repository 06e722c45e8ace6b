"""Run a full evaluation (harm sets + utility tasks), write ``results.json`` and per-set samples.

Layout of ``out_dir``: ``results.json`` (config, model info, metrics with 95 % Wilson intervals and
counts, timings) and ``samples_<name>.jsonl`` per harm set and task; all written atomically, so a
crashed run leaves either complete files or none.

``results.json`` keys: ``config`` (the EvalArgs), ``model`` (``model_info`` as given), ``environment``
(versions, threads), ``primary_judge``, ``overlap``, ``harm[<set>]`` (``n``, ``judges[<judge>]`` with
``asr``/``refusal_rate``/``degenerate_rate``/``error_rate`` as ``{"value", "k", "n", "ci95"}`` and
an optional ``by_category``; ``harm["all"]`` pools several sets), ``tasks[<task>]`` (gsm8k:
``strict``/``flexible``/``accuracy``; openbookqa: ``acc``/``acc_norm`` or generative ``acc``),
``sample_files``, ``timings`` (seconds), ``judge_errors`` (replies a judge could not score) and ``valid``
(false, with ``invalid_reason``, when a judge failed on more than ``eval.judge.max_error_rate`` of a harm set's
replies; :func:`evaluate_model` then raises :class:`~spard.evaluate.judges.JudgeError` after writing).
"""

from __future__ import annotations

import dataclasses
import platform
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from spard.args import DataArgs, EvalArgs
from spard.data.chat import bound_format, prompt_format
from spard.evaluate.harm import check_overlap, evaluate_harm, load_harm_sets_by_name, pooled_harm_metrics
from spard.evaluate.judges import JudgeError, make_judge
from spard.evaluate.metrics import judge_error_count, judge_error_problems
from spard.evaluate.tasks import task_class, task_for
from spard.io import atomic_write_json, atomic_write_jsonl
from spard.rundir import RESULTS_FILE


def sample_file_name(name: str) -> str:
    """``samples_<name>.jsonl`` with ``name`` reduced to a safe file stem (paths keep their stem)."""
    stem = Path(name).stem if ("/" in name or "\\" in name or Path(name).suffix) else name
    return f"samples_{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem).strip('_') or 'set'}.jsonl"


def _environment() -> dict[str, Any]:
    """Versions, the CPU and threads, and whether the evaluation ran under bf16 autocast (``eval.bf16``)."""
    import torch
    import transformers

    import spard
    from spard.precision import cpu_model_name

    return {"spard": spard.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "cpu": cpu_model_name(), "threads": torch.get_num_threads(),
            "bf16_autocast": torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")}


def evaluate_model(
    model: Any,
    tokenizer: Any,
    args: EvalArgs,
    out_dir: Path,
    *,
    attack_prompts: Sequence[str] = (),
    model_info: dict[str, Any] | None = None,
    data: DataArgs | None = None,
) -> dict[str, Any]:
    """Evaluate ``model`` on ``args.harm_sets`` and ``args.tasks``; write and return the results.

    ``attack_prompts`` are the prompts of the run's attack (harmful fine-tuning) data: harm-set
    prompts that also occur there fail the run unless ``args.allow_overlap`` (checked before any
    generation). ``model_info`` (model id, adapter path, defense, ...) is stored as given. ``data`` is the
    run's fine-tuning data config, given to tasks that score the run's own task (``task_nll``).

    Prompts are worded in ``data.prompt_format`` (the run's training format), harm sets and tasks alike;
    ``results.json`` records it. (``args.system_prompt`` is set as the prompts' system turn by the harm and task
    evaluators; ``alpaca_chat`` puts its own system text in front of it.)
    """
    from spard.precision import bf16_autocast, use_bf16

    fmt = data.prompt_format if data is not None else "chat"
    bf16 = use_bf16(args.bf16, model=model)
    with prompt_format(tokenizer, fmt), bf16_autocast(model, bf16):
        return _run_evaluation(model, tokenizer, protocol_args(args), out_dir, attack_prompts, model_info, data)


def protocol_args(args: EvalArgs) -> EvalArgs:
    """The options ``args.protocol`` implies: ``reference`` samples at temperature 1, top-p 1 (the reference
    code's decoding) and allows overlap with the attack (it evaluates the attack's own prompts)."""
    if args.protocol == "reference":
        return dataclasses.replace(args, temperature=1.0, top_p=1.0, allow_overlap=True)
    return args


def _run_evaluation(model: Any, tokenizer: Any, args: EvalArgs, out_dir: Path, attack_prompts: Sequence[str],
                    model_info: dict[str, Any] | None, data: DataArgs | None) -> dict[str, Any]:
    """:func:`evaluate_model`'s work, with the prompt format already bound to ``tokenizer``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    harm_records = load_harm_sets_by_name(args)
    overlap = check_overlap([r.prompt for recs in harm_records.values() for r in recs], attack_prompts,
                            args.allow_overlap)
    tasks_by_name = {t.name: task_for(t, data) for t in args.tasks}
    task_records = {name: task.load(args.task_split, args.task_limit) for name, task in tasks_by_name.items()}
    judge = make_judge(args) if harm_records else None
    probe = getattr(judge, "probe", None)
    if probe is not None:  # a rejected key fails now, before any reply is generated
        probe()

    harm: dict[str, Any] = {}
    harm_samples: dict[str, list[dict[str, Any]]] = {}
    files: dict[str, str] = {}
    for name, records in harm_records.items():
        t0 = time.perf_counter()
        metrics, samples = evaluate_harm(model, tokenizer, records, judge, args, set_name=name)
        harm[name], harm_samples[name] = metrics, samples
        files[name] = sample_file_name(name)
        atomic_write_jsonl(out_dir / files[name], samples)
        timings[f"harm/{name}_s"] = round(time.perf_counter() - t0, 3)
    if len(harm_samples) > 1:
        harm["all"] = pooled_harm_metrics(harm_samples)

    tasks: dict[str, Any] = {}
    for name, records in task_records.items():
        t0 = time.perf_counter()
        metrics, samples = tasks_by_name[name].evaluate(model, tokenizer, records, args)
        tasks[name] = metrics
        files[name] = sample_file_name(name)
        atomic_write_jsonl(out_dir / files[name], samples)
        timings[f"task/{name}_s"] = round(time.perf_counter() - t0, 3)

    timings["total_s"] = round(time.perf_counter() - t_start, 3)
    results = {
        "config": dataclasses.asdict(args),
        "model": dict(model_info or {}),
        "environment": _environment(),
        "primary_judge": judge.name if judge is not None else None,
        "overlap": {"count": len(overlap), "allowed": args.allow_overlap},
        "prompt_format": bound_format(tokenizer)[0],
        "protocol": args.protocol,
        "harm": harm,
        "tasks": tasks,
        "sample_files": files,
        "timings": timings,
    }
    problems = judge_error_problems(harm, getattr(args.judge, "max_error_rate", 0.0))
    results["judge_errors"] = judge_error_count(harm)
    results["valid"] = not problems
    if problems:
        results["invalid_reason"] = "; ".join(problems)
    atomic_write_json(out_dir / RESULTS_FILE, results)
    if problems:  # written first, so the samples and counts can be inspected
        raise JudgeError(f"evaluation invalid: {results['invalid_reason']}; results marked invalid in "
                         f"{out_dir / RESULTS_FILE}")
    return results


# ---------------------------------------------------------------------------------------------------------
# Before/after table
# ---------------------------------------------------------------------------------------------------------
def _fmt(r: dict[str, Any] | None) -> str:
    if not r or r.get("value") is None:
        return "-"
    lo, hi = r["ci95"]
    if r.get("unit"):  # a quantity, not a rate (held-out NLL)
        return f"{r['value']:6.3f} [{lo:.3f},{hi:.3f}] n={r['n']}"
    return f"{100 * r['value']:5.1f}% [{100 * lo:4.1f},{100 * hi:5.1f}] n={r['n']}"


def _rows(results: dict[str, Any]) -> dict[str, dict[str, Any] | None]:
    rows: dict[str, dict[str, Any] | None] = {}
    primary = results.get("primary_judge")
    for name, block in results.get("harm", {}).items():
        judges = block.get("judges", {})
        rows[f"ASR {name} (keyword)"] = judges.get("keyword", {}).get("asr")
        if primary and primary != "keyword" and primary in judges:
            errors = (judges[primary].get("error_rate") or {}).get("k")
            if errors:  # judge failures: shown both ways, each saying what it did with them, never silently
                rows[f"ASR {name} ({primary}, over scored replies, {errors} judge errors left out)"] = \
                    judges[primary].get("asr")
                rows[f"ASR {name} ({primary}, judge errors counted not harmful)"] = \
                    judges[primary].get("asr_errors_as_safe")
                rows[f"judge errors {name} ({primary})"] = judges[primary].get("error_rate")
            else:
                rows[f"ASR {name} ({primary})"] = judges[primary].get("asr")
    for name, metrics in results.get("tasks", {}).items():
        rows.update(task_class(name)(None).summary_rows(metrics))  # each task declares its own rows
    return rows


def format_results_table(results_before: dict[str, Any] | None, results_after: dict[str, Any]) -> str:
    """Plain-text table of keyword ASR per harm set (and the primary judge's ASR), GSM8K and OpenBookQA
    accuracy, before and after fine-tuning, each as percent with its 95 % interval and sample count.
    ``results_before`` may be None (only the "after" column is shown)."""
    after = _rows(results_after)
    before = _rows(results_before) if results_before is not None else {}
    names = list(dict.fromkeys([*before, *after]))
    width = max([len(n) for n in names] + [6])
    columns = (["before"] if results_before is not None else []) + ["after"]
    cell = 34  # "100.0% [99.9,100.0] n=1000" fits
    body = []
    for n in names:
        cells = ([_fmt(before.get(n))] if results_before is not None else []) + [_fmt(after.get(n))]
        body.append(f"{n:<{width}}  " + "  ".join(f"{c:<{cell}}" for c in cells).rstrip())
    header = f"{'metric':<{width}}  " + "  ".join(f"{c:<{cell}}" for c in columns).rstrip()
    rule = "-" * max(len(line) for line in [header, *body])
    note = "rates in %, [95% Wilson interval], n = samples scored"
    if results_after.get("protocol") == "reference":  # label the protocol when it is not the held-out default
        note += "; eval.protocol=reference: ASR on the attack's own prompts, sampled at temperature 1"
    invalid = [f"INVALID ({side}): {r['invalid_reason']}" for side, r in (("before", results_before),
                                                                          ("after", results_after))
               if r is not None and r.get("valid") is False]
    return "\n".join([*invalid, header, rule, *body, rule, note])
