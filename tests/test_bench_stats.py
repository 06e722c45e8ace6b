"""Paired statistics of a bench (exact McNemar, the stratified exact test, the detectable difference) and the bench
report of the held-out NLL / over-refusal tasks."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from spard.benchmark import collect, load_bench, run_cells
from spard.benchmark.results import collect_results
from spard.benchmark.stats import (
    AVERAGE,
    comparisons,
    discordant,
    harm_verdicts,
    mcnemar_exact,
    min_detectable_difference,
    paired_tests,
    prompt_strata,
    stratified_exact_test,
)
from spard.config import RunConfig, config_to_yaml
from spard.evaluate.metrics import rate
from spard.io import atomic_write_json, atomic_write_jsonl, atomic_write_text
from test_benchmark import fake_metrics, no_align, results_json, write_bench


def test_mcnemar_exact_hand_computed():
    # b=1, c=6: n=7, P(X <= 1) = (C(7,0) + C(7,1)) / 2^7 = 8/128; two-sided 16/128 = 0.125
    assert mcnemar_exact(1, 6) == pytest.approx(0.125, abs=1e-15)
    assert mcnemar_exact(6, 1) == mcnemar_exact(1, 6)
    # b=0, c=6: 2 / 64
    assert mcnemar_exact(0, 6) == pytest.approx(0.03125, abs=1e-15)
    # b=2, c=8: n=10, (1 + 10 + 45) / 1024 * 2 = 0.109375
    assert mcnemar_exact(2, 8) == pytest.approx(0.109375, abs=1e-15)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0  # capped at 1
    assert 0 < mcnemar_exact(0, 2000) < 1e-300 or mcnemar_exact(0, 2000) == 0.0  # no overflow error
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 2)


def test_mcnemar_matches_binomial_test_definition():
    # independent recomputation: two-sided = sum of the probabilities of outcomes no more likely than observed
    for b, c in [(3, 9), (5, 5), (0, 1), (7, 20), (12, 4)]:
        n = b + c
        probs = [math.comb(n, i) / 2**n for i in range(n + 1)]
        p_obs = probs[min(b, c)]
        two_sided = min(1.0, sum(p for p in probs if p <= p_obs * (1 + 1e-12)))
        assert mcnemar_exact(b, c) == pytest.approx(two_sided, rel=1e-12)


def test_stratified_exact_test_hand_computed():
    # two prompts, two seeds each. Prompt 1: harmful under A in both seeds, never under B (m = 2): x_a takes 0/1/2
    # with weights C(2,k)C(2,2-k) = 1, 4, 1 (of 6). Prompt 2: once under A (m = 1): weights 2, 2 (of 4).
    # T = x_a1 + x_a2 has weights 2, 10, 10, 2 (of 24) for T = 0..3; observed T = 3: P(T >= 3) = 2/24, p = 1/6
    assert stratified_exact_test([(2, 2, 0), (2, 1, 0)]) == pytest.approx(1 / 6, abs=1e-15)
    assert stratified_exact_test([(2, 0, 2), (2, 0, 1)]) == stratified_exact_test([(2, 2, 0), (2, 1, 0)])
    # strata harmful in all or none of their runs change nothing
    assert stratified_exact_test([(2, 2, 0), (2, 1, 0), (3, 3, 3), (2, 0, 0)]) == pytest.approx(1 / 6, abs=1e-15)
    assert stratified_exact_test([]) == 1.0 and stratified_exact_test([(3, 1, 2), (3, 2, 1)]) == 1.0
    with pytest.raises(ValueError, match="stratum 1"):
        stratified_exact_test([(2, 1, 0), (2, 3, 0)])


def test_stratified_test_is_exact_mcnemar_at_one_seed():
    for b, c, same in [(1, 6, 3), (0, 6, 0), (2, 8, 5), (7, 20, 1), (4, 4, 2)]:
        strata = [(1, 1, 0)] * b + [(1, 0, 1)] * c + [(1, 1, 1)] * same + [(1, 0, 0)] * 4
        assert stratified_exact_test(strata) == pytest.approx(mcnemar_exact(b, c), rel=1e-12)


def test_prompt_strata_pool_seeds_within_a_prompt():
    a = {(0, "p"): True, (1, "p"): True, (0, "q"): False, (1, "q"): True, (2, "r"): True}
    b = {(0, "p"): False, (1, "p"): True, (0, "q"): False, (1, "q"): False, (0, "r"): True}
    assert sorted(prompt_strata(a, b)) == [(2, 1, 0), (2, 2, 1)]  # r: no seed in common


def test_min_detectable_difference_closed_form():
    # hand: N = 120, psi = 0.3, a = 1.95996, b = 0.84162: u = sqrt(.3) (sqrt(120 (120 - 3.8415 + 0.7083)) - 1.6496)
    # / 120.7083 = 0.52987, delta = sqrt(0.3 - 0.28076) = 0.1387 (the textbook (a + b) sqrt(psi / N) = 0.1401)
    assert min_detectable_difference(40, 3, 0.3) == pytest.approx(0.1387, abs=2e-4)
    # it solves Connor's sample size formula: N delta^2 = (a sqrt(psi) + b sqrt(psi - delta^2))^2
    za, zb = 1.959963984540054, 0.8416212335729143
    for n, s, psi in [(40, 1, 0.2), (40, 3, 0.3), (160, 3, 0.05), (500, 3, 0.6)]:
        d = min_detectable_difference(n, s, psi)
        assert n * s * d * d == pytest.approx((za * psi**0.5 + zb * (psi - d * d) ** 0.5) ** 2, rel=1e-9)
    # seeds perfectly correlated within a prompt add nothing; more seeds otherwise shrink it as 1/sqrt(seeds)
    assert min_detectable_difference(40, 3, 0.3, icc=1.0) == pytest.approx(min_detectable_difference(40, 1, 0.3))
    assert min_detectable_difference(40, 3, 0.3) < min_detectable_difference(40, 1, 0.3)
    with pytest.raises(ValueError, match="effective pairs"):
        min_detectable_difference(2, 1, 0.3)
    with pytest.raises(ValueError, match="discordance"):
        min_detectable_difference(40, 3, 0.0)
    # 40 pairs at 10 % discordance: ~4 discordant pairs, never significant (all one way: p = 2/16)
    with pytest.raises(ValueError, match="no possible difference"):
        min_detectable_difference(40, 1, 0.1)


def test_discordant_counts_common_keys_only():
    a = {1: True, 2: True, 3: False, 4: False, 5: True}
    b = {1: True, 2: False, 3: True, 4: False, 6: True}
    assert discordant(a, b) == (4, 1, 1)


# ---------------------------------------------------------------------------------------------------------
# A bench whose cells carry per-prompt verdicts and the new tasks
# ---------------------------------------------------------------------------------------------------------
N_PROMPTS = 20


def harmful_flags(cfg: RunConfig) -> list[bool]:
    """Per-prompt verdicts: sft answers the first ~ASR·n prompts; spard answers none of them."""
    asr, _, _ = fake_metrics(cfg)
    if cfg.defense.name == "spard":
        return [False] * N_PROMPTS
    k = round(asr * N_PROMPTS)
    return [i < k for i in range(N_PROMPTS)]


def fake_run_with_samples(cfg: RunConfig) -> None:
    run_dir = Path(cfg.train.output_dir)
    flags = harmful_flags(cfg)
    atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    atomic_write_json(run_dir / "train_result.json", {"base_model": "tiny", "metrics": {
        "steps": 2, "train_seconds": 4.0, "seconds_per_step": 2.0}})
    results = results_json(sum(flags) / N_PROMPTS, 0.3, 0.4, n=N_PROMPTS)
    nll = 2.0 - (0.5 if cfg.defense.name == "sft" else 0.1)
    answer = 0.9 if cfg.defense.name == "sft" else 0.3
    results["tasks"]["task_nll"] = {"n": 10, "nll": nll, "nll_block": {"value": nll, "ci95": [nll - .1, nll + .1],
                                                                     "n": 10, "unit": "nats/token"}}
    results["tasks"]["over_refusal"] = {"n": 10, "answer_rate": rate(round(answer * 10), 10)}
    results["sample_files"] = {"I-MaliciousInstructions": "samples_I-MaliciousInstructions.jsonl"}
    atomic_write_jsonl(run_dir / "eval" / "samples_I-MaliciousInstructions.jsonl", [
        {"index": i, "prompt": f"prompt {i}", "response": "r", "keyword": {"harmful": h, "error": None},
         "harmful": h} for i, h in enumerate(flags)])
    before = results_json(0.04, 0.32, 0.42)
    before["tasks"]["task_nll"] = {"n": 10, "nll": 2.5}
    atomic_write_json(run_dir / "eval" / "before.json", before)
    atomic_write_json(run_dir / "eval" / "results.json", results)


def test_harm_verdicts_reads_samples_and_skips_judge_errors(tmp_path):
    atomic_write_json(tmp_path / "eval" / "results.json", {
        "primary_judge": "keyword", "harm": {"a": {}, "all": {}}, "sample_files": {"a": "samples_a.jsonl"}})
    atomic_write_jsonl(tmp_path / "eval" / "samples_a.jsonl", [
        {"index": 0, "prompt": "p0", "harmful": True, "keyword": {"error": None}},
        {"index": 1, "prompt": "p1", "harmful": False, "keyword": {"error": "timeout"}}])
    assert harm_verdicts(tmp_path) == {("a", 0, "p0"): True}
    assert harm_verdicts(tmp_path / "missing") is None


def test_paired_tests_and_table_marks(tmp_path):
    b = load_bench(write_bench(tmp_path, seeds=[0, 1], defenses=["sft", "safeinstr", "spard"],
                               attacks=[{"name": "bt", "overrides": {"attack.name": "harmful_mix"}}],
                               ratios=[0.1, 0.3]))
    run_cells(b, run_fn=fake_run_with_samples, align_fn=no_align)
    assert comparisons(b) == [("safeinstr", "sft"), ("spard", "sft"), ("spard", "safeinstr")]
    collect(b)  # writes results.csv and table.md
    tests = {(t.a, t.b, t.column): t for t in paired_tests(b, collect_results(b))}
    # bt p=0.3, seeds 0/1: sft ASR 0.40/0.42 -> 8/8 of 20 harmful (round), spard none: 8+8 discordant, all sft's
    t = tests[("spard", "sft", ("bt", 0.3))]
    k0, k1 = round(0.4 * N_PROMPTS), round(0.42 * N_PROMPTS)
    assert (t.n_pairs, t.a_only, t.b_only, t.n_prompts) == (2 * N_PROMPTS, 0, k0 + k1, N_PROMPTS)
    # the same first 8 prompts are harmful under sft in both seeds: 8 strata (2, 0, 2), each P(x_a = 0) = 1/6,
    # p = 2 * 6^-8 (seeds pooled within a prompt; the unstratified McNemar on 16 pairs would say 2 * 2^-16)
    assert k0 == k1 == 8 and t.p_value == pytest.approx(2 / 6**8) and t.significant
    pooled = tests[("spard", "sft", AVERAGE)]
    assert pooled.n_pairs == 4 * N_PROMPTS and pooled.a_only == 0
    # safeinstr vs sft at p=0.1: ASR 0.12 vs 0.2 -> harmful prompts nested, 2 discordant: not significant
    t = tests[("safeinstr", "sft", ("bt", 0.1))]
    assert t.a_only == 0 and not t.significant
    table = (b.bench_dir / "table.md").read_text()
    lines = table.splitlines()
    asr_head = next(i for i, line in enumerate(lines) if line.startswith("## ASR"))
    spard_row = next(line for line in lines[asr_head:] if line.startswith("| spard |"))
    sft_row = next(line for line in lines[asr_head:] if line.startswith("| sft |"))
    assert "**0.0**‡ ± 0.0" in spard_row and "20.0† ± 0.0" in sft_row and "‡" not in sft_row
    # the average column: mean ± std over seeds of each seed's row average ((10+30)/2, (15+35)/2 -> 22.5 ± 3.5);
    # pooling seeds within prompts, safeinstr's 0/6 of 40 pairs against spard at p=0.1 is significant (†)
    assert "| safeinstr | 12.5† ± 3.5 | 32.5† ± 3.5 | 22.5‡† ± 3.5 |" in lines
    assert "| sft | 20.0† ± 0.0 | 40.0† ± 0.0 | 30.0† ± 0.0 |" in lines
    assert "Paired exact tests, all columns and seeds pooled (stratified by prompt" in table
    assert "spard vs sft: 0/" in table
    # the over-refusal and NLL tables: NLL lower is better, 3 decimals, sft bold
    assert "## Held-out task NLL (nats/token) ↓" in table and "## Benign answer rate (%) ↑" in table
    nll_head = lines.index("## Held-out task NLL (nats/token) ↓")
    assert lines[nll_head + 4].startswith("| sft | **1.500** ± 0.000 | **1.500** ± 0.000 | **1.500** ± 0.000 |")
    ans_head = lines.index("## Benign answer rate (%) ↑")
    assert lines[ans_head + 4].startswith("| sft | **90.0** ± 0.0 |")
    assert "Held-out task NLL (nats/token) 2.500" in table
    with open(b.bench_dir / "results.csv", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    assert float(row["task_nll"]) == pytest.approx(1.5) and float(row["benign_answer_pct"]) == pytest.approx(90.0)


def test_results_json_headline_of_tasks(tmp_path):
    from spard.benchmark.results import task_accuracy

    res = {"tasks": {"task_nll": {"nll": 1.25}, "over_refusal": {"answer_rate": rate(3, 4)},
                     "openbookqa": {"accuracy": rate(1, 4)}}}
    assert task_accuracy(res, "task_nll") == 1.25
    assert task_accuracy(res, "over_refusal") == 0.75
    assert task_accuracy(res, "openbookqa") == 0.25
    assert task_accuracy(res, "gsm8k") is None
    json.dumps(res)


def test_shipped_benches_evaluate_nll_and_over_refusal():
    for name in ("embedded", "paper"):
        cfg = load_bench(f"configs/bench/{name}.yaml").cells[0].config
        assert {"task_nll", "over_refusal"} <= set(cfg.eval.task_names), name


def test_pareto_front_matches_a_brute_force_dominance_check():
    import random

    from spard.benchmark.stats import pareto_front

    assert pareto_front([(1, 5), (2, 2), (5, 1), (3, 3), (2, 2), (6, 6)]) == [0, 1, 4, 2]
    rng = random.Random(0)
    for _ in range(50):
        pts = [(rng.randint(0, 6), rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        front = set(pareto_front(pts))
        for i, (x, y) in enumerate(pts):
            beaten = any((u, v) != (x, y) and u <= x and v <= y for u, v in pts)
            assert (i in front) == (not beaten), (pts, i)


def test_a_bench_that_does_not_score_the_task_has_no_accuracy_table_or_panel(tmp_path):
    from spard.benchmark.plots import utility_axes

    def run(drop_accuracy: bool) -> tuple[str, list]:
        tasks = ["task_nll", "over_refusal"] + ([] if drop_accuracy else ["gsm8k"])
        b = load_bench(write_bench(tmp_path / str(drop_accuracy), seeds=[0], defenses=["sft"], ratios=[0.1],
                                   attacks=[{"name": "bt", "overrides": {"attack.name": "harmful_mix"}}],
                                   eval={"harm_limit": 5, "tasks": tasks}))
        run_cells(b, run_fn=fake_run_with_samples, align_fn=no_align)
        collect(b)
        return (b.bench_dir / "table.md").read_text(), [a[0] for a in utility_axes(collect_results(b))]

    table, axes = run(drop_accuracy=False)
    assert "## GSM8K" in table and axes[0] == "task_acc"
    table, axes = run(drop_accuracy=True)
    assert "## GSM8K" not in table and "task_acc" not in axes
    assert "## Held-out task NLL (nats/token) ↓" in table and axes == ["task:task_nll", "task:over_refusal"]
