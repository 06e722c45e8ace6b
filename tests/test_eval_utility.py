"""Held-out task NLL (``task_nll``) and over-refusal (``over_refusal``) eval tasks."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from spard.args import DataArgs
from spard.config import load_config
from spard.data.build import load_task
from spard.data.chat import tokenize_records
from spard.errors import ConfigError, DataError
from spard.evaluate import EvalArgs, evaluate_model, format_results_table
from spard.evaluate.judges import JudgeResult
from spard.evaluate.tasks.over_refusal import OverRefusal, OverRefusalArgs, answer_counts
from spard.evaluate.tasks.task_nll import TaskNLL, TaskNLLArgs, assistant_nll_sums, ratio_mean_ci


def test_ratio_mean_ci_equal_counts_is_mean_and_its_standard_error():
    sums = [2.0, 4.0, 9.0, 1.0]
    mean, lo, hi = ratio_mean_ci([s * 5 for s in sums], [5] * 4)
    se = statistics.stdev(sums) / math.sqrt(4)
    assert mean == pytest.approx(statistics.fmean(sums))
    assert (lo, hi) == (pytest.approx(mean - 1.96 * se), pytest.approx(mean + 1.96 * se))
    # unequal counts: the headline pools tokens
    assert ratio_mean_ci([3.0, 1.0], [1, 3])[0] == pytest.approx(1.0)
    assert ratio_mean_ci([3.0], [2]) == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError):
        ratio_mean_ci([], [])


def test_assistant_nll_matches_the_training_loss(tiny_llm, tiny_tok):
    records = load_task(DataArgs(task="gsm8k"), split="test")[:5]
    features, _ = tokenize_records(tiny_tok, records, 512)
    sums = assistant_nll_sums(tiny_llm, features, pad_id=tiny_tok.pad_token_id, batch_size=3)
    for feat, (s, n) in zip(features, sums):
        # independent recomputation: the HF causal-LM loss (mean CE over shifted labels) of the example alone
        ids, labels = torch.tensor([feat["input_ids"]]), torch.tensor([feat["labels"]])
        with torch.no_grad():
            loss = tiny_llm(input_ids=ids, labels=labels).loss
        assert n == sum(t != -100 for t in feat["labels"][1:])
        assert s / n == pytest.approx(float(loss), rel=1e-5)


def test_task_nll_needs_the_run_data_and_validates():
    cfg = load_config(None, ["eval.tasks=[task_nll]"])
    assert isinstance(cfg.eval.tasks[0], TaskNLLArgs)
    with pytest.raises(DataError, match="run's own task"):
        TaskNLL().load()
    with pytest.raises(ConfigError, match="eval.tasks"):
        load_config(None, ["eval.tasks=[{name: task_nll, limit: 0}]"])
    with pytest.raises(ConfigError, match="exact_match_max_tokens"):
        load_config(None, ["eval.tasks=[{name: task_nll, exact_match_max_tokens: -1}]"])


def _write_jsonl(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_task_nll_on_a_local_task_needs_a_held_out_file(tmp_path):
    train = _write_jsonl(tmp_path / "mine.jsonl", [{"q": f"question {i}", "a": f"answer {i}"} for i in range(6)])
    held = _write_jsonl(tmp_path / "held.jsonl", [{"q": "held-out question", "a": "yes"}])
    data = DataArgs(task="local", task_path=str(train), prompt_field="q", response_field="a")
    task = TaskNLL(TaskNLLArgs())
    task.run_data = data
    # the local file's "test split" would be the training file itself: refused, naming the fix
    with pytest.raises(DataError, match="no held-out split.*task_nll, path"):
        task.load()
    task = TaskNLL(TaskNLLArgs(path=str(held)))
    task.run_data = data
    recs = task.load()  # the held-out file, read in the run's own fields
    assert [(r.prompt, r.response) for r in recs] == [("held-out question", "yes")]


def test_normalise_answer():
    from spard.evaluate.tasks.task_nll import normalise_answer

    assert normalise_answer("  The Answer is  B. ") == "the answer is  b".replace("  ", " ")
    assert normalise_answer('"Positive"!') == "positive"
    assert normalise_answer("42") == normalise_answer("42.") != normalise_answer("4 2")


def test_task_nll_exact_match_scores_short_answers_only(tiny_llm, tiny_tok, tmp_path, monkeypatch):
    import spard.evaluate.generation as generation

    rows = [{"q": "2+2?", "a": "4"}, {"q": "Colour of the sky?", "a": "Blue."},
            {"q": "Capital of France?", "a": "Paris"}, {"q": "Long one?", "a": " ".join(["word"] * 60)}]
    held = _write_jsonl(tmp_path / "held.jsonl", rows)
    replies = {"2+2?": "4", "Colour of the sky?": "blue", "Capital of France?": "Lyon"}
    seen = []

    def fake_generate(model, tokenizer, prompts, *, max_new_tokens, **kw):
        seen.append(max_new_tokens)
        return [replies[p[-1]["content"]] for p in prompts]

    monkeypatch.setattr(generation, "generate", fake_generate)
    data = DataArgs(task="local", task_path=str(held), prompt_field="q", response_field="a", max_length=128)
    args = EvalArgs(harm_sets=[], tasks=[TaskNLLArgs(path=str(held), exact_match_max_tokens=8)], progress=False)
    results = evaluate_model(tiny_llm, tiny_tok, args, tmp_path / "eval", data=data)
    em = results["tasks"]["task_nll"]["exact_match"]
    # three short answers (the 60-word one is not generated); "4" and "Blue." match, "Lyon" does not
    assert (em["k"], em["n"]) == (2, 3) and em["max_answer_tokens"] == 8
    assert len(seen) == 1
    assert "Held-out task exact match" in format_results_table(None, results)


def test_evaluate_model_reports_task_nll_and_over_refusal(tiny_llm, tiny_tok, tmp_path):
    args = EvalArgs(harm_sets=["I-MaliciousInstructions"], harm_limit=2, harm_max_new_tokens=3, progress=False,
                    tasks=[TaskNLLArgs(limit=4), OverRefusalArgs(limit=2, max_new_tokens=3)])
    data = DataArgs(task="gsm8k", max_length=96)
    results = evaluate_model(tiny_llm, tiny_tok, args, tmp_path, data=data)
    nll = results["tasks"]["task_nll"]
    assert nll["n"] == 4 and nll["task"] == "gsm8k" and nll["split"] == "test" and nll["nll"] > 0
    lo, hi = nll["nll_block"]["ci95"]
    assert lo <= nll["nll"] <= hi and nll["ppl"] == pytest.approx(math.exp(nll["nll"]))
    refusal = results["tasks"]["over_refusal"]
    assert refusal["n"] == 4 and set(refusal["by_set"]) == {"I-Alpaca", "I-PhysicalSafetySafe"}
    assert refusal["answer_rate"]["n"] == 4
    rows = (tmp_path / "samples_over_refusal.jsonl").read_text().splitlines()
    assert len(rows) == 4 and '"answered"' in rows[0]
    table = format_results_table(results, results)
    assert "Held-out task NLL (nats/token, lower=better)" in table and "Benign answered (keyword, all sets)" in table
    # the NLL row is a number, not a percentage
    row = next(line for line in table.splitlines() if line.startswith("Held-out task NLL"))
    assert "%" not in row and f"{nll['nll']:.3f}" in row


def test_answer_counts_treat_refusal_and_degenerate_as_not_answered():
    verdicts = [JudgeResult(True, None, "no refusal"), JudgeResult(False, None, "r", refused=True),
                JudgeResult(False, None, "d", degenerate=True), JudgeResult(True, None, "no refusal")]
    counts = answer_counts(verdicts)
    assert counts["answer_rate"]["k"] == 2 and counts["refusal_rate"]["k"] == 1 and counts["n"] == 4
    assert OverRefusal.headline_value(counts) == 0.5


def test_over_refusal_loads_each_set_with_its_own_limit():
    recs = OverRefusal(OverRefusalArgs(limit=3)).load("ignored", 1000)
    assert [r.meta["set"] for r in recs] == ["I-Alpaca"] * 3 + ["I-PhysicalSafetySafe"] * 3
    assert all(r.kind == "benign" and all(m["role"] == "user" for m in r.messages) for r in recs)
