"""The README's Python snippet runs as written, in a fresh interpreter, and the API names are functions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from spard.testing import TINY_RUN_OVERRIDES, save_tiny_chat_model

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_block(after: str) -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    return re.search(r"```python\n(.*?)```", text[start:], re.DOTALL).group(1)


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "SPARD_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}


def test_api_names_are_the_readme_functions_whatever_was_imported_first(tmp_path):
    code = (
        "import spard.evaluate.judges, spard.evaluate.tasks, spard.jobs.align, spard.jobs.finetune\n"
        "from spard import load_config, align, train, evaluate, run, bench\n"
        "import spard.api as api, spard.benchmark as b\n"
        "assert (align, train, run, load_config) == (api.align, api.train, api.run, api.load_config)\n"
        "assert bench is b.bench and callable(evaluate) and evaluate.judges.KeywordJudge\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(tmp_path))
    assert done.returncode == 0, done.stderr


def test_readme_python_snippet_runs_as_written(tmp_path, tiny_tok):
    """The snippet, verbatim, in a fresh interpreter; only configs/quickstart.yaml (in the working directory it
    runs in) points at a tiny local model, so it takes seconds instead of minutes."""
    model_dir = save_tiny_chat_model(tmp_path / "tiny-chat", tiny_tok)
    raw: dict = {}
    for item in (f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES):
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        raw.setdefault(section, {})[field] = yaml.safe_load(value)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "quickstart.yaml").write_text(yaml.safe_dump(raw))

    snippet = _python_block("**Python API.**")
    done = subprocess.run([sys.executable, "-c", snippet], cwd=tmp_path, capture_output=True, text=True,
                          env=_env(tmp_path), timeout=600)

    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "runs" / "api_sft" / "final" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "api_run" / "eval" / "summary.txt").is_file()
    assert "before" in done.stdout and "after" in done.stdout
