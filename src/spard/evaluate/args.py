"""Evaluation settings, kept importable from their first home: :class:`~spard.args.EvalArgs` now lives in
:mod:`spard.args` and each judge's options in its own module (``spard.evaluate.judges.*``)."""

from spard.args import GSM8K_PROMPT, EvalArgs, JudgeArgs, TaskArgs
from spard.evaluate.judges.classifier import ClassifierArgs
from spard.evaluate.judges.openai import OpenAIArgs

__all__ = ["EvalArgs", "JudgeArgs", "TaskArgs", "ClassifierArgs", "OpenAIArgs", "GSM8K_PROMPT"]
