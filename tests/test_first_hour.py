"""A new user's first hour: inputs checked before compute, resume never mixes two runs, own data works."""

from __future__ import annotations

import json
import time

import pytest
from transformers import TrainerCallback

from spard import api
from spard.config import load_config
from spard.data.sources import load_source
from spard.errors import ConfigError, DataError, SpardError
from spard.jobs.finetune import train
from spard.jobs.preflight import plan
from spard.testing import TINY_RUN_OVERRIDES, save_tiny_chat_model, tiny_model


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 3:
            raise KeyboardInterrupt("simulated interruption after step 3")


def _cfg(tmp_path, name, *extra):
    return load_config(None, [
        f"train.output_dir={tmp_path / name}", "align.enabled=false", "data.n_train=16", "data.max_length=64",
        "train.batch_size=4", "train.max_steps=4", "train.save_steps=3", "lora.r=4", "attack.harmful_ratio=0.25",
        "defense.name=safeinstr", *extra,
    ])


# --- integrity -----------------------------------------------------------------------------------------
def test_resume_under_another_config_is_refused_and_rewrites_nothing(tmp_path, tiny_tok):
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path, "run"), model=tiny_model(tiny_tok), tokenizer=tiny_tok, callbacks=[Crash()])
    stored = {f: (tmp_path / "run" / f).read_text() for f in ("config.yaml", "train_set.jsonl")}

    changed = _cfg(tmp_path, "run", "defense.name=sft", "train.lr=5", "train.resume=true")
    with pytest.raises(ConfigError) as err:
        train(changed, model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    message = str(err.value)
    assert "holds a run of another config" in message
    assert "defense.name (now: 'sft', stored: 'safeinstr')" in message and "train.lr (now: 5.0" in message
    assert {f: (tmp_path / "run" / f).read_text() for f in stored} == stored

    # how a run is done (checkpointing, logging) may change on resume; what it trains may not
    same = _cfg(tmp_path, "run", "train.save_steps=2", "train.resume=true")
    train(same, model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    assert (tmp_path / "run" / "config.yaml").read_text() == stored["config.yaml"]


# --- checked before any compute ------------------------------------------------------------------------
def test_missing_api_key_fails_before_training_and_leaves_nothing(tmp_path, tiny_tok, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "eval.judge=openai",
                             f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="eval.judge.api_key_env='OPENAI_API_KEY': environment variable is not set"):
        api.run(cfg)
    assert not (tmp_path / "run").exists()
    assert not list((tmp_path / "spard-cache").glob("aligned/*/model"))  # the alignment stage never started


def test_a_typo_in_a_data_path_fails_before_the_alignment_stage(tmp_path, tiny_tok):
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    cfg = load_config(None, [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "data.task=local",
                             f"data.task_path={tmp_path / 'my_dta.jsonl'}", f"train.output_dir={tmp_path / 'run'}"])
    started = time.perf_counter()
    with pytest.raises(DataError, match="my_dta.jsonl"):
        api.train(cfg)
    assert time.perf_counter() - started < 20 and not (tmp_path / "run").exists()
    assert not (tmp_path / "spard-cache" / "aligned").exists()


def test_a_hub_id_offline_fails_once_and_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = load_config(None, ["model.name_or_path=someorg/some-model", f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(SpardError, match=r"not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
                                         r"to use a local copy set model.name_or_path=/path/to"):
        api.train(cfg)


def test_spard_eval_accepts_only_eval_overrides(tmp_path):
    with pytest.raises(ConfigError, match=r"accepts only eval\.\* overrides.*defense.name=sft"):
        api.evaluate(tmp_path, overrides=["defense.name=sft", "train.lr=5"])


def test_an_unknown_override_section_is_blamed_on_the_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n")
    with pytest.raises(ConfigError, match=r"override 'trian.lr=5': unknown config section 'trian'; did you mean "
                                          r"'train'"):
        load_config(path, ["trian.lr=5"])


# --- your own data -------------------------------------------------------------------------------------
def test_too_little_task_data_names_the_key_and_the_file(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"a{i}"}) + "\n" for i in range(20)))
    cfg = load_config(None, ["data.task=local", f"data.task_path={data}", "data.prompt_field=question",
                             "data.response_field=answer", "data.n_train=96", "align.enabled=false"])
    with pytest.raises(DataError, match=rf"data.n_train=96 .*data.task_path='{data}' has 20 records: lower "
                                        r"data.n_train"):
        plan(cfg, ("train",), check_model=False)  # the data check alone (CI has no embedded model)


def test_empty_files_say_so_and_record_numbers_are_file_lines(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl: the file is empty"):
        load_source("local", path=str(empty))
    data = tmp_path / "gaps.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n')  # line 3 lacks the response
    with pytest.raises(DataError, match=r"gaps.jsonl line 3: record has no field 'response'"):
        load_source("local", path=str(data))


def test_dry_run_builds_and_summarises_the_training_set(tmp_path, tiny_tok, capsys):
    from spard.cli import main

    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    code = main(["train", "--dry-run", "configs/quickstart.yaml", f"model.name_or_path={model_dir}",
                 "align.enabled=false", f"train.output_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert code == 0 and "training set: 106 records (harmful 10, safety 10, task 86)" in out and "dry run" in out
    assert "truncated" in out and "attack prompts recorded (kept out of evaluation): 10" in out
    assert not (tmp_path / "run").exists()
