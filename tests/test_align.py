"""The alignment stage on the tiny model: trains once, then comes from the cache, also under two processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from spard.config import load_config
from spard.jobs.align import align, aligned_model_dir
from spard.testing import TINY_RUN_OVERRIDES, save_tiny_chat_model


def _overrides(model_dir) -> list[str]:
    return [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "align.batch_size=4"]


def test_align_trains_once_then_hits_the_cache(tmp_path, tiny_tok):
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    cfg = load_config(None, _overrides(model_dir))

    first = align(cfg)
    second = align(cfg)

    assert not first.cached and second.cached and first.model_dir == second.model_dir
    assert (first.model_dir / "model.safetensors").is_file() and first.metrics["steps"] == 4  # 16 examples / 4
    assert second.metrics == first.metrics  # read back from align_result.json
    other = load_config(None, [*_overrides(model_dir), "align.lr=1e-3"])
    assert aligned_model_dir(other.model, other.align) != first.model_dir.parent  # options are in the key



def test_the_alignment_stage_trains_at_the_runs_pinned_precision(tmp_path, tiny_tok, monkeypatch):
    import spard.trainer

    settings = []
    real = spard.trainer.use_bf16
    monkeypatch.setattr(spard.trainer, "use_bf16",
                        lambda setting, **kw: settings.append(setting) or real(setting, **kw))
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    auto = load_config(None, _overrides(model_dir))
    pinned = load_config(None, [*_overrides(model_dir), "train.bf16=true"])
    # auto keeps the key every earlier model was cached under; a pinned precision is a model of its own
    assert aligned_model_dir(auto.model, auto.align, auto.train.bf16) == aligned_model_dir(auto.model, auto.align)
    assert aligned_model_dir(pinned.model, pinned.align, "true") != aligned_model_dir(auto.model, auto.align)
    assert aligned_model_dir(pinned.model, pinned.align, "true") != aligned_model_dir(pinned.model, pinned.align,
                                                                                     "false")
    result = align(pinned)
    assert settings and set(settings) == {"true"}  # the Trainer was asked for bf16, not the auto decision
    assert result.model_dir.parent == aligned_model_dir(pinned.model, pinned.align, "true")

@pytest.mark.multiprocess
def test_two_processes_aligning_at_once_train_once(tmp_path, tiny_tok):
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    raw: dict = {}
    for item in _overrides(model_dir):
        key, value = item.split("=", 1)
        section, field = key.split(".", 1)
        raw.setdefault(section, {})[field] = yaml.safe_load(value)
    config = tmp_path / "align.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "SPARD_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "spard", "align", str(config)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]

    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    lines = [out.strip().splitlines()[-1] for out, _ in outs]
    assert sorted(line.endswith("(cached)") for line in lines) == [False, True], lines  # one trained, one waited
    assert len({line.split()[2] for line in lines}) == 1  # the same model directory
    target = Path(lines[0].split()[2]).parent
    assert target.parent.parent == tmp_path / "cache"
    assert (target / "model" / "model.safetensors").is_file() and (target / "align_result.json").is_file()


def test_alignment_benign_data_leaves_out_the_over_refusal_prompts():
    from spard.args import AlignArgs
    from spard.data.build import normalise_prompt
    from spard.data.sources import load_source
    from spard.evaluate.tasks.over_refusal import DEFAULT_BENIGN_SETS
    from spard.jobs.align import alignment_records

    held_out = {normalise_prompt(r.prompt) for s in DEFAULT_BENIGN_SETS for r in load_source(s, split="test")}
    pool = load_source("alpaca", kind="benign")
    overlap = [r for r in pool if normalise_prompt(r.prompt) in held_out]
    assert overlap  # Alpaca is the source of I-Alpaca: without the filter some would be trained on
    records = alignment_records(AlignArgs(n_safety=0, n_benign=len(pool) - len(overlap)))
    assert len(records) == len(pool) - len(overlap)
    assert not {normalise_prompt(r.prompt) for r in records} & held_out
