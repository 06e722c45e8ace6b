"""spard: keep a chat LLM's safety alignment while fine-tuning it on data you do not fully trust.

The Python API (``load_config``, ``align``, ``train``, ``evaluate``, ``run``) is imported lazily so
``import spard`` stays cheap.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["load_config", "align", "train", "evaluate", "run", "bench", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "bench":
        from spard.benchmark import bench

        return bench
    if name in ("align", "train", "evaluate", "run", "load_config", "evaluate_base", "evaluate_before_after"):
        from spard import api

        return getattr(api, name)
    raise AttributeError(f"module 'spard' has no attribute {name!r}")
