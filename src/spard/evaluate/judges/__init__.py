"""Harmfulness judges: refusal keywords, a local classifier model, an OpenAI-compatible API, or any judge
registered by a module of this package (``eval.judge`` picks one by name)."""

from spard.evaluate.judges.base import Judge, JudgeError, JudgeResult, check_lengths, is_degenerate, make_judge
from spard.evaluate.judges.classifier import ClassifierArgs, ClassifierJudge, parse_guard_output
from spard.evaluate.judges.keyword import (
    EXTRA_REFUSAL_PHRASES,
    GCG_REFUSAL_PHRASES,
    REFUSAL_PHRASES,
    KeywordArgs,
    KeywordJudge,
)
from spard.evaluate.judges.openai import (
    HARMFUL_SCORE,
    JUDGE_TEMPLATE,
    OpenAIArgs,
    OpenAIJudge,
    parse_judge_reply,
)

__all__ = [
    "Judge", "JudgeError", "JudgeResult", "check_lengths", "is_degenerate", "make_judge", "ClassifierArgs",
    "ClassifierJudge", "parse_guard_output", "EXTRA_REFUSAL_PHRASES", "GCG_REFUSAL_PHRASES", "REFUSAL_PHRASES",
    "KeywordArgs", "KeywordJudge", "HARMFUL_SCORE", "JUDGE_TEMPLATE", "OpenAIArgs", "OpenAIJudge", "parse_judge_reply",
]
