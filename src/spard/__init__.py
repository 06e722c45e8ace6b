"""spard: keep a chat LLM's safety alignment while fine-tuning it on data you do not fully trust.

The Python API (``load_config``, ``align``, ``train``, ``evaluate``, ``run``, ``bench``) is imported lazily
so ``import spard`` stays cheap. No submodule shares these names except the ``spard.evaluate`` package and
the ``spard.export`` module, which are callable as :func:`spard.api.evaluate` / :func:`spard.api.export`
for that reason.
"""

from __future__ import annotations

import types
from typing import Any

__version__ = "0.1.0"
__all__ = ["load_config", "align", "train", "evaluate", "run", "bench", "__version__"]

_API = ("align", "train", "evaluate", "run", "load_config", "evaluate_base", "evaluate_before_after", "export",
        "judge_file")


class CallablePackage(types.ModuleType):
    """A package that is also the API function of the same name (``spard.evaluate(run_dir)``).

    Importing a subpackage binds it as an attribute of its parent, so ``spard.evaluate`` is the package once
    anything imports ``spard.evaluate.judges``; calling it forwards to ``spard.api.<name>``.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from spard import api

        return getattr(api, self.__name__.rpartition(".")[2])(*args, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "bench":
        from spard.benchmark import bench

        return bench
    if name in _API:
        from spard import api

        return getattr(api, name)
    raise AttributeError(f"module 'spard' has no attribute {name!r}")
