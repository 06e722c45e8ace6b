"""Evaluation: harmfulness (ASR under a keyword, classifier or API judge) and utility tasks.

``evaluate_model(model, tokenizer, EvalArgs(), out_dir)`` runs everything and writes ``results.json``;
``format_results_table(before, after)`` prints the before/after summary. Names that need torch are
imported on first use, so ``import spard.evaluate`` stays cheap.

This package is also callable: ``spard.evaluate(run_dir)`` is :func:`spard.api.evaluate`, so that
``from spard import evaluate`` gives the README's function whether or not the package was imported first.
"""

from __future__ import annotations

import sys
from importlib import import_module
from typing import Any

from spard import CallablePackage
from spard.args import EvalArgs
from spard.evaluate.judges import (
    ClassifierArgs,
    ClassifierJudge,
    Judge,
    JudgeResult,
    KeywordJudge,
    OpenAIArgs,
    OpenAIJudge,
    make_judge,
)
from spard.evaluate.metrics import harm_metrics, wilson_interval

_LAZY = {
    "evaluate_model": "spard.evaluate.runner",
    "format_results_table": "spard.evaluate.runner",
    "generate": "spard.evaluate.generation",
    "evaluate_harm": "spard.evaluate.harm",
    "check_overlap": "spard.evaluate.harm",
    "load_harm_set": "spard.evaluate.harm",
    "extract_gsm8k_answer": "spard.evaluate.tasks",
    "gsm8k_is_correct": "spard.evaluate.tasks",
    "judge_file": "spard.evaluate.judge_file",
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


sys.modules[__name__].__class__ = CallablePackage
