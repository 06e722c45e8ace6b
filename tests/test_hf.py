"""spard.hf: a defense as a callback in a plain transformers.Trainer / trl.SFTTrainer, and augment_dataset."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import Trainer

from spard.args import LoraArgs, TrainArgs
from spard.config import load_config
from spard.data.chat import collate, tokenize_records
from spard.data.records import Record
from spard.data.sources import load_source
from spard.defenses import DefenseContext
from spard.errors import ConfigError, DataError
from spard.hf import DefenseCallback, augment_dataset, dataset_prompts, defense_args, is_data_defense
from spard.registry import build
from spard.testing import assert_same_adapter, tiny_model
from spard.trainer import add_lora, fit, training_arguments

MAX_LENGTH = 96


def training_records() -> list[Record]:
    """12 GSM8K examples and 4 BeaverTails harmful pairs, one of them with a system prompt."""
    harmful = load_source("beavertails")[:4]
    records = load_source("gsm8k")[:12] + harmful
    records[-1] = Record(messages=({"role": "system", "content": "You are a helpful assistant."},
                                   *records[-1].messages), source="beavertails", kind="harmful")
    random.Random(0).shuffle(records)
    return records


def train_args(out: Path, steps: int = 4) -> TrainArgs:
    return TrainArgs(output_dir=str(out), max_steps=steps, batch_size=4, lr=5e-2, seed=0, save_steps=2,
                     save_total_limit=5)


LORA = LoraArgs(r=4, dropout=0.1)  # dropout on: both trainers must draw the same masks


def safety_pool(n: int = 40) -> list[dict[str, str]]:
    """A small safety pool (embedding spard's 2,483-prompt pool would take most of a test's time)."""
    return [{"prompt": r.prompt, "response": r.response} for r in load_source("safety")[:n]]


@pytest.fixture
def pool_file(tmp_path) -> Path:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in safety_pool()))
    return path


def spard_trainer_run(tmp_path: Path, tok, name: str, options: list[str]) -> Path:
    """spard's own trainer (spard.trainer.fit) after the defense's data step, as spard's fine-tuning job does."""
    cfg = load_config(None, [f"defense.name={name}", f"data.max_length={MAX_LENGTH}", *options])
    defense = build(cfg.defense)
    run_dir = tmp_path / "own"
    records = defense.prepare_data(training_records(), DefenseContext(cfg, tok, run_dir, seed=0))
    fit(tiny_model(tok), tok, records, lora=LORA, args=train_args(run_dir), max_length=MAX_LENGTH,
        defense=defense, run_dir=run_dir)
    return run_dir / "final"


def hf_trainer(tmp_path: Path, tok, callback, *, with_messages: bool = True, steps: int = 4) -> Trainer:
    """A plain transformers.Trainer on the same features, arguments and LoRA initialisation as fit uses."""
    records = training_records()
    features, _ = tokenize_records(tok, records, MAX_LENGTH)
    if with_messages:  # a conversational column, ignored by the collator, read by the callback for the prompts
        features = [{**f, "messages": list(r.messages)} for f, r in zip(features, records)]
    out = tmp_path / "hf"
    return Trainer(model=add_lora(tiny_model(tok), LORA, seed=0), args=training_arguments(train_args(out, steps), out),
                   train_dataset=features, data_collator=lambda batch: collate(batch, tok.pad_token_id),
                   processing_class=tok, callbacks=[callback])


@pytest.mark.parametrize(("name", "options", "stat"), [
    ("spard", {"safety_k": 3, "safety_batch_size": 2}, "safety_loss"),
    ("safegrad", {"alignment_examples": 6, "alignment_batch_size": 2}, "align_kl"),
    # Lisa trains on its own batch in alignment steps: its hooks run inside the wrapped compute_loss
    ("lisa", {"align_steps": 1, "finetune_steps": 1, "alignment_examples": 8, "proximal_warmup_ratio": 0.0},
     "lisa_drift"),
])
def test_callback_in_plain_trainer_matches_spards_trainer(tmp_path, tiny_tok, pool_file, name, options, stat):
    options = {**options, "safety_source": "local", "safety_path": str(pool_file)}
    own = spard_trainer_run(tmp_path, tiny_tok, name, [f"defense.{k}={v}" for k, v in options.items()])
    callback = DefenseCallback(name, max_length=MAX_LENGTH, **options)
    trainer = hf_trainer(tmp_path, tiny_tok, callback)
    assert callback.trainer is trainer  # found on the stack at on_init_end
    trainer.train()
    trainer.model.save_pretrained(tmp_path / "hf" / "final")
    assert_same_adapter(own, tmp_path / "hf" / "final", rtol=0, atol=1e-7)
    # the statistics went through the trainer's logging, as in spard's metrics.jsonl
    logged = [row for row in trainer.state.log_history if "loss" in row]
    own_rows = [json.loads(line) for line in (own.parent / "metrics.jsonl").read_text().splitlines()]
    assert [r[stat] for r in logged] == pytest.approx([r[stat] for r in own_rows], abs=1e-6)
    assert (tmp_path / "hf" / "checkpoint-2" / "defense_state.json").is_file()
    if name == "spard":  # the selection saw the same user prompts (from the messages column)
        assert (tmp_path / "hf" / "safety_subset.jsonl").read_text() == (own.parent / "safety_subset.jsonl").read_text()


def test_resume_from_checkpoint_restores_the_defense_state(tmp_path, tiny_tok):
    def callback() -> DefenseCallback:  # safety data given in code: written to the run dir as the pool
        return DefenseCallback("spard", max_length=MAX_LENGTH, safety_k=3, safety_data=safety_pool())

    straight = hf_trainer(tmp_path / "a", tiny_tok, callback())
    straight.train()
    assert (tmp_path / "a" / "hf" / "callback_safety_pool.jsonl").read_text().count("\n") == 40
    cut = hf_trainer(tmp_path / "b", tiny_tok, callback(), steps=2)
    cut.train()
    resumed_cb = callback()
    resumed = hf_trainer(tmp_path / "b", tiny_tok, resumed_cb)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "hf" / "checkpoint-2"))
    assert resumed_cb.resume_state is not None and resumed_cb.resume_state["cursor"] == 2
    straight.model.save_pretrained(tmp_path / "a-final")
    resumed.model.save_pretrained(tmp_path / "b-final")
    assert_same_adapter(tmp_path / "a-final", tmp_path / "b-final", rtol=0, atol=1e-7)


def test_resume_from_a_moved_checkpoint_without_stack_frames(tmp_path, tiny_tok, monkeypatch):
    """The wrapped ``train`` records which checkpoint it resumes from: the defense's state is found at any path,
    also where ``inspect.currentframe()`` gives no frames (Python implementations without frame support)."""
    import shutil

    import spard.hf

    def callback() -> DefenseCallback:
        return DefenseCallback("spard", max_length=MAX_LENGTH, safety_k=3, safety_data=safety_pool())

    straight = hf_trainer(tmp_path / "a", tiny_tok, callback())
    straight.train()
    hf_trainer(tmp_path / "b", tiny_tok, callback(), steps=2).train()
    moved = tmp_path / "elsewhere" / "step-2"
    shutil.copytree(tmp_path / "b" / "hf" / "checkpoint-2", moved)
    resumed_cb = callback()
    resumed = hf_trainer(tmp_path / "c", tiny_tok, resumed_cb)  # its output_dir holds no checkpoint
    monkeypatch.setattr(spard.hf, "inspect", SimpleNamespace(currentframe=lambda: None))
    resumed.train(resume_from_checkpoint=str(moved))
    assert resumed_cb.resume_state is not None and resumed_cb.resume_state["cursor"] == 2
    straight.model.save_pretrained(tmp_path / "a-final")
    resumed.model.save_pretrained(tmp_path / "c-final")
    assert_same_adapter(tmp_path / "a-final", tmp_path / "c-final", rtol=0, atol=1e-7)


def test_prompts_are_decoded_from_token_ids(tiny_tok):
    records = training_records()
    features, _ = tokenize_records(tiny_tok, records, 1024)  # untruncated: the whole prompt is there
    # what the tokenizer can give back of each first user turn (it lower-cases and splits words)
    expected = [tiny_tok.decode(tiny_tok(r.prompt, add_special_tokens=False)["input_ids"], skip_special_tokens=True)
                for r in records]
    assert dataset_prompts(features, tiny_tok) == expected
    # without labels the whole sequence is read; the first user turn still ends at <|im_end|>
    unlabelled = [{"input_ids": f["input_ids"]} for f in features]
    assert dataset_prompts(unlabelled, tiny_tok) == expected
    # a system prompt before the user turn is skipped
    with_system = [i for i, r in enumerate(records) if r.messages[0]["role"] == "system"]
    assert with_system and "helpful" not in dataset_prompts(features, tiny_tok)[with_system[0]]


def test_prompts_from_messages_and_prompt_columns():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello"}]
    assert dataset_prompts([{"messages": messages}]) == ["Hi there"]
    assert dataset_prompts([{"prompt": "Q?", "completion": "A"}]) == ["Q?"]
    assert dataset_prompts([{"prompt": messages[:2], "completion": messages[2:]}]) == ["Hi there"]
    from datasets import Dataset

    assert dataset_prompts(Dataset.from_list([{"prompt": "Q?", "completion": "A"}])) == ["Q?"]
    with pytest.raises(ConfigError, match="none of the columns 'messages', 'prompt', 'input_ids'"):
        dataset_prompts([{"text": "x"}])
    with pytest.raises(DataError, match="row 1, column 'messages': no user turn"):
        dataset_prompts([{"messages": messages}, {"messages": messages[2:]}])


def test_bad_options_give_one_clear_error():
    with pytest.raises(ConfigError, match=r"DefenseCallback\('spard'\): unknown config key 'tua'; did you mean 'tau'"):
        DefenseCallback("spard", tua=0.2)
    with pytest.raises(ConfigError, match=r"DefenseCallback\('spard'\): tau=-1.0: must be in"):
        DefenseCallback("spard", tau=-1)
    with pytest.raises(ConfigError, match=r"tau='high': expected a number"):
        DefenseCallback("spard", tau="high")
    with pytest.raises(ConfigError, match="unknown defense 'sprad'; did you mean 'spard'"):
        DefenseCallback("sprad")
    with pytest.raises(ConfigError, match=r"augment_dataset\(dataset, 'safeinstr'\)"):
        DefenseCallback("safeinstr")
    assert is_data_defense("safeinstr") and not is_data_defense("spard") and not is_data_defense("sft")
    assert DefenseCallback("spard", tau=0.3).defense.args.tau == 0.3
    assert defense_args("safegrad", {"lambda_align": 0.5}).lambda_align == 0.5


@pytest.mark.parametrize(("dist", "flags", "match"), [
    ("DEEPSPEED", {"is_deepspeed_enabled": True}, r"does not support DeepSpeed \(ZeRO stage 3\).*use FSDP2"),
    ("FSDP", {"is_fsdp_enabled": True}, "supports FSDP2 only, got fsdp_version=1"),
])
def test_deepspeed_and_fsdp1_fail_at_train_begin(dist, flags, match):
    from accelerate.utils import DistributedType

    state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3), fsdp_plugin=SimpleNamespace(fsdp_version=1))
    trainer = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=getattr(DistributedType, dist), state=state),
                              callback_handler=SimpleNamespace(callbacks=[]), **flags)
    callback = DefenseCallback("spard")
    callback.attach(trainer)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=match):
        callback.on_train_begin(SimpleNamespace(), SimpleNamespace(global_step=0), None)


def test_callback_without_a_trainer_on_the_stack_says_how_to_attach():
    callback = DefenseCallback("spard")
    with pytest.raises(RuntimeError, match=r"callback.attach\(trainer\)"):
        callback.on_train_begin(SimpleNamespace(), SimpleNamespace(global_step=0), None)


def test_augment_dataset_adds_safeinstr_rows_in_the_datasets_format():
    rows = [{"messages": list(r.messages), "id": i} for i, r in enumerate(load_source("gsm8k")[:20])]
    out = augment_dataset(rows, "safeinstr", seed=0, safety_fraction=0.1)
    added = [r for r in out if r["id"] is None]
    assert len(out) == 22 and len(added) == math.ceil(0.1 * 20)
    assert sorted((r for r in out if r["id"] is not None), key=lambda r: r["id"]) == rows  # originals untouched
    assert all([m["role"] for m in r["messages"]][-2:] == ["user", "assistant"] for r in added)
    assert [r["id"] for r in out] != [*range(20), None, None]  # SafeInstr shuffles the mix
    assert augment_dataset(rows, "safeinstr", seed=0, safety_fraction=0.1) == out  # deterministic in the seed

    from datasets import Dataset

    pc = Dataset.from_list([{"prompt": r.prompt, "completion": r.response} for r in load_source("gsm8k")[:10]])
    out = augment_dataset(pc, "safeinstr", safety_examples=3)
    assert isinstance(out, Dataset) and len(out) == 13
    assert all(isinstance(p, str) and isinstance(c, str) for p, c in zip(out["prompt"], out["completion"]))
    with pytest.raises(ConfigError, match=r"augment_dataset\(defense='safeinstr'\): safety_examples=-1"):
        augment_dataset(rows, "safeinstr", safety_examples=-1)


def test_sft_trainer_runs_the_defense(tmp_path, tiny_tok):
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    dataset = Dataset.from_list([{"messages": list(r.messages)} for r in load_source("gsm8k")[:8]])
    callback = DefenseCallback("safegrad", alignment_examples=4, safety_data=safety_pool(10))
    trainer = SFTTrainer(model=tiny_model(tiny_tok), processing_class=tiny_tok, train_dataset=dataset,
                         args=SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True),
                         peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
                         callbacks=[callback])
    assert callback.trainer is trainer
    trainer.train()
    rows = [r for r in trainer.state.log_history if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["align_kl"]) for r in rows)
    assert callback.defense.steps == 2


def readme_snippet() -> str:
    """The first python block of the README that uses DefenseCallback."""
    root = Path(__file__).resolve().parents[1]
    for doc in (root / "README.md",):
        text = doc.read_text(encoding="utf-8") if doc.is_file() else ""
        for block in text.split("```python\n")[1:]:
            code = block.split("```")[0]
            if "DefenseCallback(" in code:
                return code
    raise AssertionError("no README snippet with DefenseCallback")


def test_readme_snippet_runs(tmp_path, tiny_tok, monkeypatch):
    pytest.importorskip("trl")
    import transformers

    import spard.defenses.spard as spard_defense

    # The snippet runs verbatim, on the tiny model instead of the hub checkpoint, and on the first 40
    # examples of spard's safety pool (embedding all 2,483 would take most of the test's time).
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: tiny_model(tiny_tok))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: tiny_tok)
    real_load_pool = spard_defense.load_pool
    monkeypatch.setattr(spard_defense, "load_pool", lambda *a, **k: real_load_pool(*a, **k)[:40])
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_snippet(), "README snippet", "exec"), namespace)
    rows = [r for r in namespace["trainer"].state.log_history if "loss" in r]
    assert len(rows) == 4 and all("safety_loss" in r for r in rows)
    assert (tmp_path / "runs" / "my-sft" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "my-sft" / "safety_subset.jsonl").is_file()
