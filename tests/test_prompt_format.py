"""data.prompt_format (chat | alpaca_chat) and eval.system_prompt: one wording for training, safety data and
evaluation."""

from __future__ import annotations

import json

import pytest

from spard.config import load_config
from spard.data import chat as chat_mod
from spard.data.chat import (
    ALPACA_SYSTEM,
    assistant_char_spans,
    bound_format,
    format_messages,
    prompt_format,
    tokenize_record,
)
from spard.data.records import chat
from spard.errors import ConfigError, DataError
from spard.evaluate.generation import render_prompt

QA = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Knead, rise, bake."}]


def test_alpaca_chat_uses_the_reference_strings() -> None:
    # github shuhao02/SPARD utils/data_utils.py, get_chat_instruction_template("alpaca"), no input field
    assert format_messages(QA, "alpaca_chat") == [
        {"role": "system", "content": "Below is an instruction that describes a task. Write a response that "
                                      "appropriately completes the request.\n\n"},
        {"role": "user", "content": "### Instruction:\nHow do I bake bread?\n\n"},
        {"role": "assistant", "content": "### Response:\nKnead, rise, bake."},
    ]
    assert format_messages(QA, "chat") == QA
    assert format_messages(QA) is not QA  # a copy: records are never mutated


def test_system_prompt_and_a_records_own_system_turn_share_one_system_turn() -> None:
    persona = [{"role": "system", "content": "You are AOA."}, *QA]
    assert format_messages(QA, "chat", "Be safe.")[0] == {"role": "system", "content": "Be safe."}
    assert format_messages(persona, "chat", "Be safe.")[0]["content"] == "Be safe.\n\nYou are AOA."
    out = format_messages(persona, "alpaca_chat", "Be safe.")
    assert [m["role"] for m in out] == ["system", "user", "assistant"]
    assert out[0]["content"] == ALPACA_SYSTEM + "Be safe.\n\nYou are AOA."
    with pytest.raises(DataError, match="alpaca"):
        format_messages(QA, "alpaca")


def test_tokenisation_learns_the_response_turn_in_the_bound_format(tiny_tok) -> None:
    with prompt_format(tiny_tok, "alpaca_chat"):
        text, spans = assistant_char_spans(tiny_tok, QA)
        assert bound_format(tiny_tok) == ("alpaca_chat", None)
    assert bound_format(tiny_tok) == ("chat", None)  # restored on exit
    assert "### Instruction:\nHow do I bake bread?" in text and text.startswith("<|im_start|>system\nBelow is")
    (a, b), = spans
    assert text[a:b] == "### Response:\nKnead, rise, bake.<|im_end|>\n"
    plain, _ = tokenize_record(tiny_tok, chat(QA[0]["content"], QA[1]["content"], source="t", kind="task"), 256)
    with prompt_format(tiny_tok, "alpaca_chat"):
        alpaca, _ = tokenize_record(tiny_tok, chat(QA[0]["content"], QA[1]["content"], source="t", kind="task"), 256)
    assert len(alpaca["input_ids"]) > len(plain["input_ids"])
    assert sum(t != -100 for t in alpaca["labels"]) > sum(t != -100 for t in plain["labels"])


def test_evaluation_prompt_prefills_the_response_turn(tiny_tok) -> None:
    plain = render_prompt(tiny_tok, QA[:1])
    assert plain == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    with prompt_format(tiny_tok, "alpaca_chat", "Be safe."):
        text = render_prompt(tiny_tok, "How do I bake bread?")
    assert text == ("<|im_start|>system\n" + ALPACA_SYSTEM + "Be safe.<|im_end|>\n"
                    "<|im_start|>user\n### Instruction:\nHow do I bake bread?\n\n<|im_end|>\n"
                    "<|im_start|>assistant\n### Response:\n")


def test_config_keys() -> None:
    cfg = load_config(None, ["data.prompt_format=alpaca_chat", "eval.system_prompt=Be safe."])
    assert (cfg.data.prompt_format, cfg.eval.system_prompt) == ("alpaca_chat", "Be safe.")
    assert load_config(None, []).eval.system_prompt is None
    with pytest.raises(ConfigError, match="data.prompt_format"):
        load_config(None, ["data.prompt_format=alpaca"])


def test_training_safety_data_and_evaluation_all_use_the_format(tmp_path, tiny_tok, tiny_llm, monkeypatch) -> None:
    """One run (SPARD, alpaca_chat): every text tokenised in training (task and safety batches) and every
    evaluation prompt is in the alpaca wording; results.json records the format and the system prompt."""
    from spard import run

    rendered: list[str] = []
    spans = chat_mod.assistant_char_spans

    def spy(tokenizer, messages):
        text, s = spans(tokenizer, messages)
        rendered.append(text)
        return text, s

    monkeypatch.setattr(chat_mod, "assistant_char_spans", spy)
    from spard.evaluate import generation

    prompts: list[str] = []
    render = generation.render_prompt
    monkeypatch.setattr(generation, "render_prompt", lambda tok, p: prompts.append(render(tok, p)) or prompts[-1])
    model_dir = tmp_path / "tiny-chat"
    tiny_llm.save_pretrained(model_dir, safe_serialization=True)
    tiny_tok.save_pretrained(model_dir)
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"prompt": f"harmful request {i}", "response": "I cannot help."}) + "\n"
                            for i in range(6)))
    run_dir = tmp_path / "run"
    cfg = load_config(None, [
        f"model.name_or_path={model_dir}", "align.enabled=false", "data.n_train=8", "data.max_length=96",
        "data.prompt_format=alpaca_chat", "eval.system_prompt=Be safe.", "attack.harmful_ratio=0.25",
        "train.batch_size=4", "train.max_steps=1", f"train.output_dir={run_dir}", "defense.name=spard",
        "defense.selection=random", "defense.safety_k=2", "defense.safety_source=local", f"defense.safety_path={pool}",
        "eval.tasks=[gsm8k]", "eval.task_limit=1", "eval.harm_limit=2", "eval.harm_max_new_tokens=2",
        "eval.gsm8k_max_new_tokens=2", "eval.progress=false",
    ])
    result = run(cfg)
    assert len(rendered) == 8 + 2  # the training set, then the two selected safety examples
    assert all("### Instruction:\n" in t and "<|im_start|>assistant\n### Response:\n" in t for t in rendered)
    assert any("I cannot help." in t for t in rendered[-2:])
    assert len(prompts) == 2 * (2 + 1)  # before and after: 2 harm prompts + 1 GSM8K question
    assert all(p.startswith("<|im_start|>system\n" + ALPACA_SYSTEM + "Be safe.<|im_end|>") for p in prompts)
    assert all(p.endswith("<|im_start|>assistant\n### Response:\n") and "### Instruction:\n" in p for p in prompts)
    for results in (result.after.results, result.before.results):
        assert results["prompt_format"] == "alpaca_chat"
        assert results["config"]["system_prompt"] == "Be safe."
