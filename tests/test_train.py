import json

import pytest
from transformers import TrainerCallback

from spard.config import load_config
from spard.errors import ConfigError
from spard.jobs.finetune import train
from spard.testing import assert_same_adapter, tiny_model


def tiny_config(tmp_path, name="run", *extra):
    return load_config(None, [
        f"train.output_dir={tmp_path / name}", "align.enabled=false", "data.n_train=16", "data.max_length=128",
        "train.batch_size=4", "train.max_steps=5", "train.lr=5e-2", "train.save_steps=3", "lora.r=4",
        "attack.harmful_ratio=0.25", *extra,
    ])


def test_five_step_sft_lowers_training_loss(tmp_path, tiny_tok):
    # one full batch of 8 examples per step, so every step sees the same data and the loss must fall
    cfg = tiny_config(tmp_path, "run", "data.n_train=8", "train.batch_size=8", "lora.dropout=0", "train.lr=1e-2")
    model = tiny_model(tiny_tok)
    res = train(cfg, model=model, tokenizer=tiny_tok)
    rows = [json.loads(line) for line in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert {"loss", "learning_rate", "grad_norm"} <= set(rows[0])
    losses = [r["loss"] for r in rows]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < losses[0] - 0.05, losses
    # run directory contents
    assert (res.adapter_dir / "adapter_model.safetensors").is_file()
    assert (res.run_dir / "config.yaml").is_file() and (res.run_dir / "checkpoint-3").is_dir()
    train_set = (res.run_dir / "train_set.jsonl").read_text().splitlines()
    assert len(train_set) == 8
    assert len(json.loads((res.run_dir / "attack_prompts.json").read_text())) == 2 == res.metrics["n_harmful"]
    m = res.metrics  # step time excludes the defense's one-off setup
    assert 0 <= m["defense_setup_seconds"] <= m["train_seconds"]
    assert abs(5 * m["seconds_per_step"] - (m["train_seconds"] - m["defense_setup_seconds"])) < 0.02


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise KeyboardInterrupt("simulated interruption after step 4")


def test_resume_matches_uninterrupted_run(tmp_path, tiny_tok):
    extra = ("train.max_steps=6", "lora.dropout=0.1")
    straight = train(tiny_config(tmp_path, "straight", *extra), model=tiny_model(tiny_tok), tokenizer=tiny_tok)

    cfg = tiny_config(tmp_path, "interrupted", *extra)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, model=tiny_model(tiny_tok), tokenizer=tiny_tok, callbacks=[Crash()])
    assert not (tmp_path / "interrupted" / "final").exists()
    with pytest.raises(ConfigError, match="already holds a run; pass train.resume=true"):
        train(cfg, model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    resumed = train(tiny_config(tmp_path, "interrupted", *extra, "train.resume=true"),
                    model=tiny_model(tiny_tok), tokenizer=tiny_tok)

    assert_same_adapter(straight.adapter_dir, resumed.adapter_dir, rtol=0, atol=1e-7)
    steps = [json.loads(line)["step"] for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # rows logged after the checkpoint were not duplicated
    # resuming a finished run trains nothing and keeps its recorded metrics
    again = train(tiny_config(tmp_path, "interrupted", *extra, "train.resume=true"),
                  model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    assert again.metrics == resumed.metrics


def test_safeinstr_adds_safety_examples(tmp_path, tiny_tok):
    cfg = tiny_config(tmp_path, "si", "defense.name=safeinstr", "defense.safety_examples=6", "train.max_steps=1")
    res = train(cfg, model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    rows = [json.loads(line) for line in (res.run_dir / "train_set.jsonl").read_text().splitlines()]
    assert len(rows) == 22 and sum(r["kind"] == "safety" for r in rows) == 6
    assert sum(r["kind"] == "harmful" for r in rows) == 4


def test_bad_target_modules(tmp_path, tiny_tok):
    with pytest.raises(ConfigError, match=r"no modules named \['qq_proj'\]"):
        train(tiny_config(tmp_path, "x", "lora.target_modules=qq_proj"), model=tiny_model(tiny_tok), tokenizer=tiny_tok)
