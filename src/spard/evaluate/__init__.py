"""Evaluation: harmfulness (ASR under a keyword, classifier or API judge) and utility (GSM8K, OpenBookQA).

``evaluate_model(model, tokenizer, EvalArgs(), out_dir)`` runs everything and writes ``results.json``;
``format_results_table(before, after)`` prints the before/after summary. Names that need torch are
imported on first use, so ``import spard.evaluate`` stays cheap.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from spard.evaluate.args import ClassifierArgs, EvalArgs, OpenAIArgs
from spard.evaluate.judges import ClassifierJudge, Judge, JudgeResult, KeywordJudge, OpenAIJudge, make_judge
from spard.evaluate.metrics import harm_metrics, wilson_interval

_LAZY = {
    "evaluate_model": "spard.evaluate.runner",
    "format_results_table": "spard.evaluate.runner",
    "generate": "spard.evaluate.generation",
    "evaluate_harm": "spard.evaluate.harm",
    "check_overlap": "spard.evaluate.harm",
    "load_harm_set": "spard.evaluate.harm",
    "TASKS": "spard.evaluate.tasks",
    "extract_gsm8k_answer": "spard.evaluate.tasks",
    "gsm8k_is_correct": "spard.evaluate.tasks",
}

__all__ = [
    "ClassifierArgs", "ClassifierJudge", "EvalArgs", "Judge", "JudgeResult", "KeywordJudge", "OpenAIArgs",
    "OpenAIJudge", "harm_metrics", "make_judge", "wilson_interval", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'spard.evaluate' has no attribute {name!r}")
