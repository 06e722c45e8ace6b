"""Harmfulness evaluation: load harmful prompt sets, guard against train/eval overlap, generate, judge.

Harm sets are named sources of :mod:`spard.data.sources` (``advbench``, ``harmbench``,
``I-MaliciousInstructions``, ...) or, for anything else, a local file or hub dataset whose
``prompt_field`` holds the prompt. The keyword judge always runs (it is free and is what the
before/after table shows); a model or API judge, when configured, runs in addition.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from spard.data.build import normalise_prompt
from spard.data.records import Record, with_system_prompt
from spard.data.sources import SOURCES, FieldMap, load_source
from spard.errors import DataError, SpardError
from spard.evaluate.judges import Judge, JudgeResult, KeywordJudge
from spard.evaluate.metrics import harm_metrics, mean_score
from spard.hub import is_hub_id

log = logging.getLogger(__name__)


def load_harm_set(name: str, *, limit: int | None = None, prompt_field: str = "prompt",
                  protocol: str = "heldout") -> list[Record]:
    """Prompt-only records of a harm set: a packaged source name, a local file, or a hub dataset id.

    Packaged sources use their ``test`` split when they have one (the evaluation sets) and otherwise
    their only split (e.g. ``beavertails``; the overlap guard then matters). With ``protocol="reference"`` a
    source split into attack / evaluation parts (the SPARD reference attack sets) is read whole (split ``all``),
    as the reference evaluates the attack's own prompts.
    """
    source = SOURCES.get(name)
    if source is not None:
        split = "test" if "test" in source.files else next(iter(source.files))
        if protocol == "reference" and "all" in source.files:
            split = "all"
        records = load_source(name, split=split, limit=limit)
    elif Path(name).exists() or is_hub_id(name):
        records = load_source("local", path=name, fields=FieldMap(prompt=prompt_field, response=None),
                              kind="harmful", limit=limit)
    else:
        raise DataError(f"harm set {name!r} is neither a known source ({sorted(SOURCES)}) nor an existing file "
                        "or hub dataset id")
    if not records:
        raise DataError(f"harm set {name!r} has no prompts")
    # Keep only the prompt side: a harmful QA source's answer must not reach the model.
    return [Record(messages=tuple(m for m in r.messages if m["role"] != "assistant"), source=r.source,
                   kind=r.kind, meta=r.meta) for r in records]


def load_harm_sets_by_name(args: Any) -> dict[str, list[Record]]:
    """Every harm set of ``args`` (an :class:`~spard.evaluate.args.EvalArgs`), keyed by its name."""
    return {name: load_harm_set(name, limit=args.harm_limit, prompt_field=args.harm_prompt_field,
                                protocol=getattr(args, "protocol", "heldout"))
            for name in args.harm_sets}


def load_harm_sets(args: Any) -> list[Record]:
    """The records of all harm sets of ``args`` in one list (e.g. for :func:`check_overlap`)."""
    return [r for records in load_harm_sets_by_name(args).values() for r in records]


def check_overlap(eval_prompts: Iterable[str], attack_prompts: Iterable[str], allow_overlap: bool = False) -> list[str]:
    """Evaluation prompts that also occur in the attack (fine-tuning) data, compared after normalising.

    Scoring a model on prompts it was fine-tuned on inflates ASR, so any overlap is an error naming the
    count and a few examples, unless ``allow_overlap`` (then it is logged and returned).
    """
    attack = {normalise_prompt(p) for p in attack_prompts}
    overlap = [p for p in eval_prompts if normalise_prompt(p) in attack]
    if overlap:
        examples = "; ".join(repr(p[:80]) for p in overlap[:3])
        message = (f"{len(overlap)} evaluation prompt(s) also appear in this run's attack data, e.g. {examples}. "
                   "Choose held-out harm sets, or set eval.allow_overlap=true to evaluate anyway")
        if not allow_overlap:
            raise SpardError(message)
        log.warning("%s (allowed by eval.allow_overlap)", message)
    return overlap


def _category(record: Record, default: str | None) -> str | None:
    cat = record.meta.get("category")
    return str(cat) if cat not in (None, "") else default


def judge_metrics(results: Sequence[JudgeResult], categories: Sequence[str | None] | None) -> dict[str, Any]:
    """:func:`~spard.evaluate.metrics.harm_metrics` plus the mean raw score when the judge gives one."""
    metrics = harm_metrics(results, categories)
    score = mean_score(results)
    if score is not None:
        metrics["mean_score"] = score
    return metrics


def evaluate_harm(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    judge: Judge | None,
    args: Any,
    *,
    set_name: str | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Generate replies to ``records`` and judge them; returns ``(metrics, samples)``.

    ``metrics`` has ``n``, one block per judge under ``judges`` (``keyword`` always, plus ``judge.name``)
    with ASR/refusal/degenerate/error rates and intervals, the primary judge's name, and timings.
    ``samples`` has one dict per prompt with the reply and each judge's verdict. ``args`` is an
    :class:`~spard.evaluate.args.EvalArgs` (decoding settings).
    """
    from spard.evaluate.generation import generate, render_prompt

    if not records:
        raise DataError(f"harm set {set_name or '?'}: no records to evaluate")
    system = getattr(args, "system_prompt", None)
    messages = [with_system_prompt([m for m in r.messages if m["role"] != "assistant"], system) for r in records]
    t0 = time.perf_counter()
    responses = generate(model, tokenizer, messages, max_new_tokens=args.harm_max_new_tokens,
                         batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                         seed=args.seed, progress=args.progress, desc=f"harm {set_name or ''}".strip())
    t_gen = time.perf_counter() - t0

    prompts = [r.prompt for r in records]
    categories = [_category(r, None) for r in records]
    judges: list[Judge] = [KeywordJudge()]
    if judge is not None and judge.name != "keyword":
        judges.append(judge)
    verdicts: dict[str, list[JudgeResult]] = {}
    timings = {"generate_s": round(t_gen, 3)}
    for j in judges:
        t0 = time.perf_counter()
        if getattr(j, "judged_prompt", "raw") == "templated":  # the whole text the model saw (the SPARD reference's)
            verdicts[j.name] = j([render_prompt(tokenizer, m) for m in messages], responses)
        else:
            verdicts[j.name] = j(prompts, responses)
        timings[f"judge_{j.name}_s"] = round(time.perf_counter() - t0, 3)
        if len(verdicts[j.name]) != len(prompts):
            raise SpardError(f"judge {j.name!r} returned {len(verdicts[j.name])} verdicts for {len(prompts)} replies")

    has_categories = any(c is not None for c in categories)
    metrics = {
        "n": len(records),
        "primary_judge": judges[-1].name,
        "judges": {name: judge_metrics(res, categories if has_categories else None)
                   for name, res in verdicts.items()},
        "timings": timings,
    }
    samples = []
    for i, (rec, response) in enumerate(zip(records, responses)):
        row: dict[str, Any] = {"index": i, "source": rec.source, "prompt": rec.prompt, "response": response}
        if categories[i] is not None:
            row["category"] = categories[i]
        for name, res in verdicts.items():
            row[name] = res[i].to_dict()
        row["harmful"] = verdicts[judges[-1].name][i].harmful
        samples.append(row)
    return metrics, samples


def pooled_harm_metrics(per_set_samples: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Metrics over all harm sets together, with each set as a category (for a run with several sets)."""
    names = sorted({k for rows in per_set_samples.values() for row in rows for k in row
                    if isinstance(row[k], dict) and "harmful" in row[k]})
    out: dict[str, Any] = {"n": sum(len(rows) for rows in per_set_samples.values()), "judges": {}}
    for name in names:
        results, cats = [], []
        for set_name, rows in per_set_samples.items():
            for row in rows:
                results.append(JudgeResult(**row[name]))
                cats.append(set_name)
        out["judges"][name] = judge_metrics(results, cats)
    return out
