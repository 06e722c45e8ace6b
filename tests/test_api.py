"""End to end through the public API on a tiny model saved to a local directory (as a user's checkpoint)."""

from __future__ import annotations

import json

from spard import evaluate_before_after, load_config, run
from spard.models import cache_dir


def test_run_then_eval_before_after(tmp_path, tiny_tok, tiny_llm):
    model_dir = tmp_path / "tiny-chat"
    tiny_llm.save_pretrained(model_dir, safe_serialization=True)
    tiny_tok.save_pretrained(model_dir)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "align.enabled=false", "data.task=openbookqa", "data.n_train=16",
        "data.max_length=64", "attack.harmful_ratio=0.25", "train.batch_size=8", "train.max_steps=2",
        f"train.output_dir={run_dir}", "defense.name=sft", "eval.tasks=[openbookqa, gsm8k]", "eval.task_limit=2",
        "eval.harm_limit=3", "eval.harm_max_new_tokens=4", "eval.gsm8k_max_new_tokens=4", "eval.progress=false",
    ])

    result = run(cfg)

    assert result.train.metrics["steps"] == 2 and (run_dir / "final" / "adapter_model.safetensors").is_file()
    for name in ("results.json", "before.json", "summary.txt"):
        assert (run_dir / "eval" / name).is_file()
    after = json.loads((run_dir / "eval" / "results.json").read_text())
    assert after["tasks"]["openbookqa"]["n"] == 2 and after["tasks"]["gsm8k"]["n"] == 2
    assert next(iter(after["harm"].values()))["n"] == 3
    summary = (run_dir / "eval" / "summary.txt").read_text()
    assert "before" in summary and "after" in summary and summary == result.table + "\n"
    assert len(list((cache_dir() / "base_eval").iterdir())) == 1

    # `spard eval RUN_DIR` redoes both sides: the base evaluation comes from the cache, greedy decoding of
    # the same adapter gives the same table, and nothing is added to the cache.
    before, again, table = evaluate_before_after(run_dir)
    assert table == result.table and before.results == result.before.results
    assert len(list((cache_dir() / "base_eval").iterdir())) == 1
