"""Utility tasks (GSM8K, OpenBookQA, or any task registered by a module of this package; ``eval.tasks``
picks them by name)."""

from spard.evaluate.tasks.base import (
    GenerativeTask,
    Task,
    encode_pair,
    loglikelihoods,
    task_class,
    task_for,
    user_turn,
)
from spard.evaluate.tasks.gsm8k import (
    GSM8K,
    GSM8KArgs,
    extract_gsm8k_answer,
    gsm8k_gold,
    gsm8k_is_correct,
    normalise_number,
)
from spard.evaluate.tasks.openbookqa import OpenBookQA, OpenBookQAArgs, obqa_loglik_requests, parse_choice

__all__ = [
    "GenerativeTask", "Task", "encode_pair", "loglikelihoods", "task_class", "task_for", "user_turn", "GSM8K",
    "GSM8KArgs", "extract_gsm8k_answer", "gsm8k_gold", "gsm8k_is_correct", "normalise_number", "OpenBookQA",
    "OpenBookQAArgs", "obqa_loglik_requests", "parse_choice",
]
