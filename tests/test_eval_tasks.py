"""GSM8K answer extraction, OpenBookQA log-likelihood scoring and choice parsing, task plumbing."""

from __future__ import annotations

import pytest
import torch

from spard.args import EvalArgs
from spard.data.records import chat
from spard.data.sources import load_source
from spard.evaluate.generation import render_prompt
from spard.evaluate.tasks import (
    GSM8K,
    GSM8KArgs,
    OpenBookQA,
    OpenBookQAArgs,
    encode_pair,
    extract_gsm8k_answer,
    gsm8k_is_correct,
    loglikelihoods,
    obqa_loglik_requests,
    parse_choice,
)


# --- GSM8K extraction ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "strict", "flexible"),
    [
        ("She pays 2 * 617 = 1,234 dollars.\n#### 1,234", "1234", "1234"),
        ("The temperature drops to -3.5 degrees.\n#### -3.5", "-3.5", "-3.5"),
        ("Janet makes 9 * 2 = $18 every day.", None, "18"),
        ("He spends $1,250.50 in total.", None, "1250.5"),
        ("So the answer is 18.00.", None, "18"),
        ("#### 42.", "42", "42"),
        ("I do not know the answer to this one.", None, None),
        ("", None, None),
        ("First 3 apples, then 4 more... so 7", None, "7"),
        ("#### 5\nActually, wait: 6", "5", "6"),
        ("The loss is -12 dollars", None, "-12"),
        ("Total: 1,000,000 people.", None, "1000000"),
    ],
)
def test_extract_gsm8k_answer(text, strict, flexible):
    assert extract_gsm8k_answer(text) == strict  # strict is the default mode
    assert extract_gsm8k_answer(text, "strict") == strict
    assert extract_gsm8k_answer(text, "flexible") == flexible


def test_extract_mode_is_checked():
    with pytest.raises(ValueError, match="mode"):
        extract_gsm8k_answer("#### 3", "fuzzy")


def test_gsm8k_is_correct_against_gold_field():
    gold = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    assert gsm8k_is_correct("48 + 24 = 72 clips.\n#### 72", gold)
    assert gsm8k_is_correct("In total she sold 72 clips.", gold)  # flexible (default)
    assert not gsm8k_is_correct("In total she sold 72 clips.", gold, mode="strict")
    assert not gsm8k_is_correct("She sold 71 clips", gold)
    assert not gsm8k_is_correct("no idea", gold)
    assert gsm8k_is_correct("Total $1,234.00", "x\n#### 1234")


# --- OpenBookQA ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("B", 1),
        ("C. the plains", 2),
        ("(D) a desert", 3),
        ("I think the answer is A because fog forms over water.", 0),
        ("Answer: (C)", 2),
        ("ANSWER: D", 3),
        ("The answer is a marsh.", 0),  # lower-case "a" is the article; the choice text decides
        ("answer2", 1),
        ("Fog forms around a marsh.", 0),
        ("A person could say it is hard to know.", None),
        ("", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text, ["a marsh", "a tundra", "the plains", "a desert"]) == expected


def _direct_loglik(model, ids_ctx, ids_cont):
    """Sum of log-softmax of the continuation tokens from one plain, unpadded forward pass."""
    ids = torch.tensor([ids_ctx + ids_cont])
    with torch.no_grad():
        logp = model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(float(logp[len(ids_ctx) - 1 + j, t]) for j, t in enumerate(ids_cont))


def test_loglikelihoods_match_direct_computation(tiny_llm, tiny_tok):
    records = load_source("openbookqa", split="test", limit=3)
    pairs = []
    for rec in records:
        messages, conts = obqa_loglik_requests(rec, "cloze")
        context = render_prompt(tiny_tok, messages)
        pairs += [encode_pair(tiny_tok, context, c) for c in conts]
    assert len({len(c) + len(x) for c, x in pairs}) > 1, "sequences of different lengths exercise padding"
    batched = loglikelihoods(tiny_llm, tiny_tok, pairs, batch_size=5)
    direct = [_direct_loglik(tiny_llm, c, x) for c, x in pairs]
    assert batched == pytest.approx(direct, abs=1e-4)


def test_encode_pair_splits_at_context(tiny_tok):
    ctx, cont = encode_pair(tiny_tok, "<|im_start|>assistant\n", "the sun")
    assert tiny_tok.decode(cont) == "the sun"
    assert ctx == tiny_tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]


def test_obqa_loglik_metrics(tiny_llm, tiny_tok):
    task = OpenBookQA()
    records = task.load("test", limit=6)
    metrics, samples = task.evaluate(tiny_llm, tiny_tok, records, EvalArgs(progress=False))
    assert metrics["n"] == 6 and metrics["mode"] == "loglik"
    assert metrics["acc"]["k"] == sum(s["correct"] for s in samples)
    assert metrics["acc_norm"]["k"] == sum(s["correct_norm"] for s in samples)
    assert metrics["accuracy"] == metrics["acc_norm"]  # cloze headline, as lm-eval reports OpenBookQA
    for s, rec in zip(samples, records):
        assert len(s["loglik"]) == 4 and s["continuations"] == [c.strip() for c in rec.meta["choices"]]
        best = max(range(4), key=lambda i: s["loglik"][i])
        assert s["pred"] == "ABCD"[best]
    letter_task = OpenBookQA(OpenBookQAArgs(format="letter"))
    letter, _ = letter_task.evaluate(tiny_llm, tiny_tok, records, EvalArgs(progress=False))
    assert letter["format"] == "letter" and letter["n"] == 6 and letter["accuracy"] == letter["acc"]


def test_obqa_generate_mode(tiny_llm, tiny_tok):
    task = OpenBookQA(OpenBookQAArgs(mode="generate", max_new_tokens=4))
    records = task.load("test", limit=3)
    args = EvalArgs(progress=False)
    metrics, samples = task.evaluate(tiny_llm, tiny_tok, records, args)
    assert metrics["mode"] == "generate" and metrics["n"] == 3
    assert metrics["unparsed"] == sum(s["pred"] is None for s in samples)
    assert all("Answer with the letter" in s["prompt"] for s in samples)


def test_gsm8k_task_plumbing(tiny_llm, tiny_tok):
    task = GSM8K(GSM8KArgs(max_new_tokens=6))
    records = task.load("test", limit=3)
    args = EvalArgs(progress=False)
    metrics, samples = task.evaluate(tiny_llm, tiny_tok, records, args)
    assert metrics["n"] == 3 and set(metrics) >= {"strict", "flexible", "accuracy"}
    assert samples[0]["gold"] == "18"  # Janet's ducks
    assert samples[0]["prompt"].startswith("Solve this math problem") and "#### <number>" in samples[0]["prompt"]
    scored = task.score(chat("q", None, source="gsm8k", kind="task", answer="...\n#### 18"), "so $18.\n#### 18")
    assert scored["correct"] and scored["correct_strict"]


def test_openbookqa_ref_source_and_the_reference_scoring_rule(monkeypatch):
    import spard.evaluate.generation as generation
    from spard.data.sources import load_source
    from spard.evaluate.tasks.openbookqa_ref import OpenBookQARef, OpenBookQARefArgs, reference_choice

    train, test = load_source("openbookqa_ref"), load_source("openbookqa_ref", split="test")
    assert (len(train), len(test)) == (4957, 500)
    first = train[0]
    assert first.prompt.startswith("Please choose the correct answer to the question: The sun is responsible for")
    assert first.response.endswith("the correct answer is answer4") and first.meta["target_answer"] == "answer4"
    assert test[0].meta["target_answer"] == "answer2"  # the test file's own target_answer field
    # the reference's rule: exactly one answer<digit> in the reply, and it is the gold one
    assert reference_choice("fact: x.\n\nthe correct answer is Answer2") == "answer2"
    assert reference_choice("answer1 or answer2") is None and reference_choice("I think B") is None
    replies = iter(["the correct answer is answer2", "answer2 answer3", "no idea"])
    monkeypatch.setattr(generation, "generate", lambda model, tok, prompts, **kw: [next(replies) for _ in prompts])
    metrics, samples = OpenBookQARef(OpenBookQARefArgs()).evaluate(None, None, test[:3], EvalArgs(progress=False))
    assert [s["correct"] for s in samples] == [True, False, False]
    assert metrics["accuracy"]["k"] == 1 and metrics["unparsed"] == 2
