"""configs/bench/paper.yaml and configs/paper_single.yaml express the SPARD reference protocol, and a cell of
the paper bench runs end to end (model swapped for the tiny one, sizes shrunk), so the GPU configuration is
exercised on every CI run."""

from __future__ import annotations

import json
import logging

import pytest

from spard.benchmark import load_bench
from spard.config import config_to_yaml, load_config

# The reference's hyperparameters (github shuhao02/SPARD c70f8c1: README Quick Start, SPAG_op_finetune.py
# defaults, scripts/finetune/Qwen2.5-7B-Instruct/*.sh), as listed in issue 13.
REFERENCE = {
    "model.name_or_path": "Qwen/Qwen2.5-7B-Instruct",
    "model.load_in_8bit": "auto",
    "lora.r": 32, "lora.alpha": 8, "lora.dropout": 0.05,
    "lora.target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "train.lr": 5e-5, "train.epochs": 10.0, "train.lr_scheduler": "linear", "train.warmup_steps": 100,
    "train.weight_decay": 0.01, "train.max_grad_norm": 1.0, "train.batch_size": 32, "train.grad_accum": 4,
    "data.max_length": 2048, "data.prompt_format": "alpaca_chat",
    "attack.name": "harmful_mix", "attack.mode": "append", "attack.harmful_ratio": 0.1,
    "align.enabled": False,
}
REFERENCE_SPARD = {
    "defense.projection": "reference", "defense.tau": 0.2, "defense.delta": 0.1, "defense.alpha_max": 1.0,
    "defense.safety_batch_size": 1, "defense.safety_micro_batches": None, "defense.safety_dropout": True,
    "defense.beta": 4.0, "defense.safety_fraction": 0.03, "defense.selection": "dpp",
    "defense.safety_source": "spard_ref",
}
PAPER_ATTACKS = {"beavertails_ref", "i_beavertails", "latharmful", "q_latharmful"}


def get(cfg, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check(cfg, expected: dict) -> None:
    wrong = {k: (get(cfg, k), v) for k, v in expected.items() if get(cfg, k) != v}
    assert not wrong, wrong


def test_paper_bench_is_the_reference_protocol() -> None:
    bench = load_bench("configs/bench/paper.yaml")
    assert len(bench.cells) == 6 * 2 * 4  # defenses x tasks x the paper's four attacks
    for cell in bench.cells:
        check(cell.config, REFERENCE)
        assert cell.config.train.seed == 43
        assert cell.config.train.batch_size * cell.config.train.grad_accum == 128
        if cell.config.defense.name == "spard":
            check(cell.config, REFERENCE_SPARD)
            assert cell.config.defense.micro_batches(cell.config.train.grad_accum) == 4  # 4 x 1 per check
    assert {c.config.attack.harmful_source for c in bench.cells} == PAPER_ATTACKS
    assert {c.task for c in bench.cells} == {"gsm8k", "openbookqa_ref"}
    assert {c.config.defense.name for c in bench.cells} == {"sft", "safeinstr", "safegrad", "spard", "safelora", "lisa"}
    harm_sets = bench.cells[0].config.eval.harm_sets
    assert PAPER_ATTACKS <= set(harm_sets)  # their held-out evaluation parts


def test_paper_single_is_one_cell_of_the_bench() -> None:
    cfg = load_config("configs/paper_single.yaml")
    check(cfg, {**REFERENCE, **REFERENCE_SPARD})
    assert cfg.attack.harmful_source in PAPER_ATTACKS and cfg.train.seed == 43
    cell = next(c for c in load_bench("configs/bench/paper.yaml").cells
                if c.config.defense.name == "spard" and c.task == "gsm8k" and c.attack == "lat")
    for section in ("model", "lora", "data", "attack", "defense"):
        assert get(cfg, section) == get(cell.config, section), section


def test_a_paper_cell_runs_end_to_end_on_the_tiny_model(tmp_path, tiny_tok, tiny_llm, caplog) -> None:
    from spard import run

    cell = next(c for c in load_bench("configs/bench/paper.yaml").cells
                if c.config.defense.name == "spard" and c.task == "gsm8k" and c.attack == "lat")
    model_dir = tmp_path / "tiny-chat"
    tiny_llm.save_pretrained(model_dir, safe_serialization=True)
    tiny_tok.save_pretrained(model_dir)
    cell_file = tmp_path / "cell.yaml"
    cell_file.write_text(config_to_yaml(cell.config))
    run_dir = tmp_path / "run"
    cfg = load_config(cell_file, [  # the tiny model and small sizes; everything else as the paper cell
        f"model.name_or_path={model_dir}", "data.n_train=20", "data.max_length=96", "train.batch_size=2",
        "train.grad_accum=2", "train.max_steps=2", "train.warmup_steps=1", f"train.output_dir={run_dir}",
        "defense.safety_source=local", f"defense.safety_path={tmp_path / 'pool.jsonl'}",
        "eval.judge=keyword", "eval.harm_sets=[latharmful]", "eval.harm_limit=2", "eval.harm_max_new_tokens=2",
        "eval.tasks=[gsm8k]", "eval.task_limit=1", "eval.gsm8k_max_new_tokens=2", "eval.progress=false",
    ])
    # the spard_ref pool's first refusals (a local copy of 12 keeps the selection's embedding pass short)
    from spard.data.sources import load_source

    pool = load_source("spard_ref", limit=12)
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n"
                                                 for r in pool))
    check(cfg, {k: v for k, v in {**REFERENCE, **REFERENCE_SPARD}.items()
                if not k.startswith(("model.name_or_path", "train.batch_size", "train.grad_accum", "train.warmup",
                                     "data.max_length", "defense.safety_source"))})
    with caplog.at_level(logging.INFO, logger="spard.models"):
        result = run(cfg)
    assert "model.load_in_8bit=auto: no 8-bit" in caplog.text  # no GPU here: the fallback is said in the log
    assert result.train.metrics["steps"] == 2
    assert result.train.metrics["n_harmful"] == 2  # int(0.1 x 20) appended
    train_set = [json.loads(line) for line in (run_dir / "train_set.jsonl").read_text().splitlines()]
    assert len(train_set) == 22 and sum(r["kind"] == "harmful" for r in train_set) == 2
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["safety_steps"] for m in metrics] == [1, 2]
    state = json.loads((run_dir / "eval" / "results.json").read_text())
    assert state["prompt_format"] == "alpaca_chat" and state["harm"]["latharmful"]["n"] == 2


@pytest.mark.parametrize("value,ok", [("auto", True), (True, True), (False, True), ("maybe", False)])
def test_load_in_8bit_accepts_auto(value, ok) -> None:
    from spard.errors import ConfigError

    override = f"model.load_in_8bit={str(value).lower()}"
    if ok:
        assert load_config(None, [override]).model.load_in_8bit == value
    else:
        with pytest.raises(ConfigError, match="model.load_in_8bit"):
            load_config(None, [override])
