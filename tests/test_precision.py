"""``train.bf16`` / ``eval.bf16``: what ``auto`` decides on a CPU (measured, cached per machine) and that the
settings reach the Trainer and the evaluation. The timings themselves are faked here: speed is measured by
``perf/cpu_bf16.py``, never asserted in a unit test."""

from __future__ import annotations

import json

import pytest
import torch

import spard.precision as precision
from spard.args import TrainArgs
from spard.config import load_config
from spard.testing import tiny_model
from spard.trainer import training_arguments


@pytest.fixture
def fresh_decisions(monkeypatch, tmp_path):
    monkeypatch.setenv("SPARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision, "_DECISIONS", {})
    monkeypatch.setattr(precision, "MIN_HIDDEN", 0)  # let the tiny model through to the measurement


def _fake(monkeypatch, matmul, step):
    calls = {"matmul": 0, "step": 0}

    def fake_matmul(*a, **k):
        calls["matmul"] += 1
        return matmul

    def fake_step(*a, **k):
        calls["step"] += 1
        return step

    monkeypatch.setattr(precision, "matmul_speedup", fake_matmul)
    monkeypatch.setattr(precision, "step_speedup", fake_step)
    return calls


@pytest.mark.parametrize(("matmul", "step", "want", "step_measured"), [
    (0.01, 5.0, False, False),  # AVX2-only: emulated bf16; the model step is never tried
    (5.8, 0.81, False, True),   # fast matmuls, slower whole step (what the issue measured): fp32
    (5.8, 1.29, False, True),   # just under the bar
    (5.8, 1.6, True, True),
])
def test_auto_on_a_cpu_takes_bf16_only_when_the_model_step_is_measured_faster(
        matmul, step, want, step_measured, monkeypatch, fresh_decisions, tiny_tok):
    calls = _fake(monkeypatch, matmul, step)
    decision = precision.decide_cpu_bf16(tiny_model(tiny_tok))
    assert decision.use_bf16 is want
    assert calls["step"] == int(step_measured)
    assert precision.use_bf16("auto", model=tiny_model(tiny_tok)) is want


def test_decision_is_measured_once_per_machine_and_kept_on_disk(monkeypatch, fresh_decisions, tmp_path, tiny_tok):
    calls = _fake(monkeypatch, 2.0, 2.0)
    assert precision.decide_cpu_bf16(tiny_model(tiny_tok)).use_bf16
    monkeypatch.setattr(precision, "_DECISIONS", {})  # a new process: read back from precision.json
    assert precision.decide_cpu_bf16(tiny_model(tiny_tok)).use_bf16
    assert calls == {"matmul": 1, "step": 1}
    stored = json.loads((tmp_path / "cache" / "precision.json").read_text())
    assert list(stored.values()) == [{"use_bf16": True, "matmul_speedup": 2.0, "step_speedup": 2.0}]


def test_explicit_settings_and_small_models_are_not_measured(monkeypatch, tiny_tok):
    calls = _fake(monkeypatch, 9.0, 9.0)
    monkeypatch.setattr(precision, "_DECISIONS", {})
    assert precision.use_bf16("true") and precision.use_bf16(True)
    assert not precision.use_bf16("false")
    if not torch.cuda.is_available():
        assert not precision.use_bf16("auto", model=tiny_model(tiny_tok))  # 32 wide: below MIN_HIDDEN
        assert not precision.use_bf16("auto", model=None)
    assert calls == {"matmul": 0, "step": 0}


def test_training_arguments_follow_the_decision(monkeypatch, fresh_decisions, tmp_path, tiny_tok):
    if torch.cuda.is_available():
        pytest.skip("CPU decision")
    _fake(monkeypatch, 2.0, 2.0)
    model = tiny_model(tiny_tok)
    assert training_arguments(TrainArgs(output_dir=str(tmp_path)), tmp_path, model).bf16
    assert not training_arguments(TrainArgs(output_dir=str(tmp_path), bf16="false"), tmp_path, model).bf16
    assert not training_arguments(TrainArgs(output_dir=str(tmp_path)), tmp_path).bf16  # no model: fp32


def test_bf16_keys_accept_yaml_booleans_and_refuse_other_words():
    cfg = load_config(None, ["train.bf16=true", "eval.bf16=false", "train.gradient_checkpointing=false"])
    assert (cfg.train.bf16, cfg.eval.bf16, cfg.train.gradient_checkpointing) == ("true", "false", "false")
    with pytest.raises(Exception, match=r"eval.bf16"):
        load_config(None, ["eval.bf16=maybe"])
    with pytest.raises(Exception, match=r"train.gradient_checkpointing"):
        load_config(None, ["train.gradient_checkpointing=sometimes"])


def test_real_matmul_probe_returns_a_positive_ratio():
    assert precision.matmul_speedup(16, 16, tokens=8, reps=1) > 0


@pytest.mark.parametrize("setting", ["true", "false"])
def test_eval_bf16_runs_the_evaluation_under_autocast_and_records_it(setting, tiny_tok, tmp_path):
    from spard.evaluate.args import EvalArgs
    from spard.evaluate.runner import evaluate_model

    args = EvalArgs(harm_sets=["I-MaliciousInstructions"], harm_limit=2, harm_max_new_tokens=3, tasks=[],
                    progress=False, bf16=setting)
    seen = []
    model = tiny_model(tiny_tok)
    model.register_forward_hook(lambda m, i, o: seen.append(torch.is_autocast_enabled("cpu")))
    results = evaluate_model(model, tiny_tok, args, tmp_path)
    assert results["environment"]["bf16_autocast"] is (setting == "true")
    assert seen and set(seen) == {setting == "true"}


def test_auto_is_fp32_in_a_multi_process_cpu_run_without_measuring(monkeypatch, fresh_decisions, tiny_tok):
    """Ranks timing for themselves could disagree; a CPU run under torchrun stays fp32 unless told otherwise."""
    if torch.cuda.is_available():
        pytest.skip("CPU decision")
    calls = _fake(monkeypatch, 9.0, 9.0)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not precision.use_bf16("auto", model=tiny_model(tiny_tok))
    assert precision.use_bf16("true", model=tiny_model(tiny_tok))
    assert calls == {"matmul": 0, "step": 0}


@pytest.mark.parametrize(("bf16_cost", "want_bf16_steps", "want"), [
    (2.0, 2, 0.5),    # bf16 slower at the first timed step: no more bf16 steps after it (warm-up + 1)
    (0.5, 4, 2.0),    # bf16 faster: every rep measured (warm-up + 3), median ratio
])
def test_step_speedup_stops_timing_bf16_once_it_is_no_faster(monkeypatch, tiny_tok, bf16_cost, want_bf16_steps,
                                                             want):
    clock = {"t": 0.0, "bf16_steps": 0}
    model = tiny_model(tiny_tok)
    forward = model.forward

    def timed_forward(*args, **kwargs):  # a fake clock: a bf16 step costs bf16_cost, an fp32 step 1
        bf16 = torch.is_autocast_enabled("cpu")
        clock["t"] += bf16_cost if bf16 else 1.0
        clock["bf16_steps"] += bf16
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", timed_forward)
    monkeypatch.setattr(precision.time, "perf_counter", lambda: clock["t"])
    assert precision.step_speedup(model, tokens=8, rows=1, reps=3) == pytest.approx(want)
    assert clock["bf16_steps"] == want_bf16_steps


def _decide_in_a_new_process(cache: str, log: str) -> bool:
    """A spawned process's decision, with a measurement that takes a second and records that it ran."""
    import os
    import time

    from spard.testing import tiny_model, tiny_tokenizer

    os.environ["SPARD_CACHE"] = cache

    def slow_matmul(*a, **k):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return 2.0

    precision.matmul_speedup = slow_matmul
    precision.step_speedup = lambda *a, **k: 2.0
    return precision.decide_cpu_bf16(tiny_model(tiny_tokenizer())).use_bf16


@pytest.mark.multiprocess
def test_processes_deciding_at_once_measure_once(tmp_path):
    """Bench workers start together: one measures (alone), the other waits and reads its decision."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    log = tmp_path / "measured.log"
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        decisions = list(pool.map(_decide_in_a_new_process, [str(tmp_path / "cache")] * 2, [str(log)] * 2))
    assert decisions == [True, True]
    assert len(log.read_text().splitlines()) == 1
