"""``spard bench``: grid expansion, validation, resume/crash handling and the report, with a fake cell runner
that writes run directories in the real format (no training)."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from spard.benchmark import bench, collect, format_cell_list, load_bench, run_cells
from spard.benchmark.grid import Cell
from spard.benchmark.status import cell_status
from spard.cli import main
from spard.config import RunConfig, config_to_yaml
from spard.errors import ConfigError, SpardError
from spard.evaluate.metrics import rate
from spard.io import atomic_write_json, atomic_write_text
from spard.rundir import ERROR_FILE

BASE_RUN = {
    "defense": {"name": "safeinstr", "safety_fraction": 0.5},  # must not leak into other defenses' cells
    "data": {"n_train": 40, "max_length": 64},
    "align": {"enabled": False},
}


def write_bench(tmp_path: Path, **changes) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(BASE_RUN))
    raw = {
        "base_config": "run.yaml",
        "output_dir": str(tmp_path / "out"),
        "base": {"train.max_steps": 2},
        "eval": {"harm_limit": 5, "task_limit": 5},
        "attacks": [
            {"name": "bt", "overrides": {"attack.name": "harmful_mix", "attack.harmful_source": "beavertails"}},
            {"name": "hh", "overrides": {"attack": {"name": "harmful_mix", "harmful_source": "hh_rlhf"}}},
            {"name": "aoa", "overrides": {"attack.name": "identity_shift"}},
            "benign",
        ],
        "ratios": [0, 0.1, 0.3],
        "defenses": ["sft", {"name": "safeinstr", "overrides": {"defense.safety_fraction": 0.2}}],
        "seeds": [0, 1],
    }
    raw.update(changes)
    path = tmp_path / "bench.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------
# A fake ``spard.api.run``: the files a finished run leaves, in their real format
# ---------------------------------------------------------------------------------------------------------
def fake_metrics(cfg: RunConfig) -> tuple[float, float, float]:
    """Deterministic (asr, gsm8k acc, obqa acc) per cell: more harmful data → higher ASR; safeinstr safer."""
    ratio = cfg.attack.harmful_ratio if cfg.attack.name == "harmful_mix" else 0.5
    asr = min(1.0, 0.1 + ratio + 0.02 * cfg.train.seed - (0.08 if cfg.defense.name == "safeinstr" else 0.0))
    return round(asr, 2), 0.3 - 0.02 * cfg.train.seed, 0.4


def results_json(asr: float, gsm: float, obqa: float, n: int = 50) -> dict:
    k = round(asr * n)
    keyword = {"n": n, "n_judged": n, "asr": rate(k, n), "refusal_rate": rate(n - k, n),
               "degenerate_rate": rate(0, n), "error_rate": rate(0, n)}
    return {
        "config": {}, "model": {}, "environment": {}, "primary_judge": "keyword",
        "overlap": {"count": 0, "allowed": False},
        "harm": {"I-MaliciousInstructions": {"n": n, "primary_judge": "keyword", "judges": {"keyword": keyword},
                                             "timings": {}}},
        "tasks": {"gsm8k": {"n": 20, "accuracy": rate(round(gsm * 20), 20), "flexible": rate(round(gsm * 20), 20),
                            "strict": rate(0, 20)},
                  "openbookqa": {"n": 20, "mode": "loglik", "format": "cloze", "accuracy": rate(round(obqa * 20), 20),
                                 "acc": rate(round(obqa * 20), 20), "acc_norm": rate(0, 20)}},
        "sample_files": {}, "timings": {"total_s": 3.5},
    }


def fake_run(cfg: RunConfig) -> None:
    run_dir = Path(cfg.train.output_dir)
    atomic_write_text(run_dir / "config.yaml", config_to_yaml(cfg))
    atomic_write_json(run_dir / "train_result.json", {"base_model": "tiny", "metrics": {
        "steps": 2, "train_seconds": 4.0, "seconds_per_step": 2.0}})
    atomic_write_json(run_dir / "eval" / "before.json", results_json(0.04, 0.32, 0.42))
    atomic_write_json(run_dir / "eval" / "results.json", results_json(*fake_metrics(cfg)))


class Recorder:
    """A cell runner that records the configs it got and crashes on the cells named in ``crash``."""

    def __init__(self, crash: tuple[str, ...] = ()) -> None:
        self.calls: list[RunConfig] = []
        self.crash = set(crash)

    def __call__(self, cfg: RunConfig) -> None:
        self.calls.append(cfg)
        if Path(cfg.train.output_dir).name in self.crash:
            Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
            raise RuntimeError("boom: simulated crash")
        fake_run(cfg)

    @property
    def names(self) -> list[str]:
        return [Path(c.train.output_dir).name for c in self.calls]


def no_align(cfg: RunConfig) -> None:
    raise AssertionError("align.enabled is false: the alignment stage must not run")


# ---------------------------------------------------------------------------------------------------------
# Grid
# ---------------------------------------------------------------------------------------------------------
def test_grid_counts_names_and_configs(tmp_path):
    b = load_bench(write_bench(tmp_path))
    # per defense and seed: one shared p=0 cell + bt, hh x {0.1, 0.3} + aoa + benign = 7
    assert len(b.cells) == 2 * 2 * 7
    names = [c.name for c in b.cells]
    assert len(set(names)) == len(names)
    assert [c.index for c in b.cells] == list(range(len(b.cells)))
    assert names[:2] == ["sft__bt+hh__p0__s0", "safeinstr__bt+hh__p0__s0"]
    assert {"sft__bt__p0.1__s1", "safeinstr__hh__p0.3__s0", "sft__aoa__s0", "safeinstr__benign__s1"} <= set(names)
    # attacks without a ratio get one cell per defense and seed, not one per ratio
    assert sum(c.attack == "aoa" for c in b.cells) == 4 and sum(c.attack == "benign" for c in b.cells) == 4
    merged = b.cells[0]
    assert merged.columns == (("bt", 0.0), ("hh", 0.0)) and merged.ratio == 0.0
    cell = next(c for c in b.cells if c.name == "safeinstr__hh__p0.3__s1")
    cfg = cell.config
    assert (cfg.attack.name, cfg.attack.harmful_source, cfg.attack.harmful_ratio) == ("harmful_mix", "hh_rlhf", 0.3)
    assert cfg.train.seed == 1 and cfg.train.max_steps == 2 and cfg.data.n_train == 40
    assert cfg.eval.harm_limit == 5 and cfg.eval.task_limit == 5
    assert cell.run_dir == tmp_path / "out" / "cells" / cell.name
    assert cfg.defense.name == "safeinstr" and cfg.defense.safety_fraction == 0.2
    # the base config's safeinstr options do not leak into the sft cells
    sft = next(c for c in b.cells if c.defense == "sft").config
    assert yaml.safe_load(config_to_yaml(sft))["defense"] == {"name": "sft"}
    assert b.columns() == [("bt", 0.0), ("bt", 0.1), ("bt", 0.3), ("hh", 0.0), ("hh", 0.1), ("hh", 0.3),
                           ("aoa", None), ("benign", None)]


def test_several_tasks_and_defense_variants(tmp_path):
    b = load_bench(write_bench(
        tmp_path, tasks=["gsm8k", "openbookqa"], ratios=[0.1], seeds=[0],
        attacks=[{"name": "bt", "overrides": {"attack.name": "harmful_mix"}}],
        defenses=["sft", {"name": "safeinstr", "label": "si-low", "overrides": {"defense.safety_fraction": 0.05}},
                  {"name": "safeinstr", "label": "si-high", "overrides": {"defense.safety_fraction": 0.3}}]))
    assert [c.name for c in b.cells] == [
        "sft__gsm8k__bt__p0.1__s0", "si-low__gsm8k__bt__p0.1__s0", "si-high__gsm8k__bt__p0.1__s0",
        "sft__openbookqa__bt__p0.1__s0", "si-low__openbookqa__bt__p0.1__s0", "si-high__openbookqa__bt__p0.1__s0"]
    assert b.cells[3].config.data.task == "openbookqa" and b.cells[2].config.defense.safety_fraction == 0.3


@pytest.mark.parametrize(("changes", "message"), [
    ({"defences": ["sft"]}, r"bench.yaml: unknown config key 'defences'; did you mean 'defenses'\?"),
    ({"defenses": ["sft", "sprad"]}, r"defenses\[1\]\.name='sprad': unknown defense 'sprad'; did you mean 'spard'\?"),
    ({"ratios": [0, 1.5]}, r"bench.yaml: ratios\[1\]=1.5: must be in \[0.0, 1.0\]"),
    ({"seeds": [0, "x"]}, r"seeds\[1\]='x': expected an integer"),
    ({"attacks": [{"name": "bt", "overides": {}}]},
     r"unknown config key 'attacks\[0\]\.overides'; did you mean 'attacks\[0\]\.overrides'"),
    ({"attacks": [{"name": "bt", "overrides": {"attack.harmfull_ratio": 0.1}}]},
     r"attacks\[0\] \(bt\): .*unknown config key 'attack.harmfull_ratio'; did you mean 'attack.harmful_ratio'"),
    ({"attacks": [{"name": "bt", "overrides": {"attack.name": "harmful_mix", "attack.harmful_ratio": 0.2}}]},
     r"attack.harmful_ratio is set by the bench's 'ratios'"),
    ({"attacks": [{"name": "a__b", "overrides": {}}]}, r"attacks\[0\]\.name='a__b': a label must be"),
    ({"defenses": ["sft", "sft"]}, r"defenses='sft': label used twice; give variants a 'label'"),
    ({"defenses": [{"name": "sft", "overrides": {"defense.beta": 2}}]},
     r"defenses\[0\] \(sft\).*unknown config key 'defense.beta'"),
    ({"base": {"defense.safety_fraction": 0.1}},
     r"base=\['defense.safety_fraction'\]: defense options belong in a 'defenses' entry"),
    ({"base_config": "missing.yaml"}, r"base_config='missing.yaml': no such file"),
    ({"attacks": [{"name": "aoa", "ratios": [0.1], "overrides": {"attack.name": "identity_shift"}}]},
     r"attacks\[0\] \(aoa\): 'ratios' given but attack.name='identity_shift' has no strength to vary"),
    ({"attacks": [{"name": "a", "overrides": {"attack.name": "benign"}}, {"name": "b", "overrides": {
        "attack.name": "benign"}}]}, r"attack b with defense sft gives the same run as cell sft__a__s0"),
])
def test_bench_config_errors_name_file_key_value(tmp_path, changes, message):
    with pytest.raises(ConfigError, match=message):
        load_bench(write_bench(tmp_path, **changes))


def test_shipped_bench_configs_load():
    smoke, embedded, paper = (load_bench(f"configs/bench/{n}.yaml") for n in ("smoke", "embedded", "paper"))
    assert [c.name for c in smoke.cells] == ["sft__bt__p0__s0", "safeinstr__bt__p0__s0", "sft__bt__p0.3__s0",
                                             "safeinstr__bt__p0.3__s0"]
    assert {c.config.defense.name for c in embedded.cells} == {"sft", "safeinstr", "safegrad", "spard", "ptst",
                                                               "safelora", "lisa"}
    # 11 rows (8 fine-tuning defenses incl. both SPAG rules + 3 alignment-defense rows) x the paper's 4 attacks
    assert {c.defense for c in embedded.cells} >= {"spard", "spard-hs", "vaccine", "booster", "repnoise"}
    assert {c.ratio for c in embedded.cells} == {0.1} and len(embedded.cells) == 11 * 4 * 3
    assert {c.config.attack.harmful_source for c in embedded.cells} == {"beavertails_ref", "i_beavertails",
                                                                        "latharmful", "q_latharmful"}
    assert {c.config.align.defense.name for c in embedded.cells} == {"none", "vaccine", "booster", "repnoise"}
    hs = {c.config.defense.max_step for c in embedded.cells if c.defense == "spard-hs"}
    assert hs == {0.25} and {c.config.defense.projection for c in embedded.cells if c.defense == "spard"} == {
        "reference"}
    # three seeds by default; seed 0 first, so the one-seed bench's cells keep their names and indices (reused)
    assert {c.seed for c in embedded.cells} == {0, 1, 2}
    assert all(c.seed == 0 and c.name.endswith("__s0") for c in embedded.cells[:44])
    assert [c.name for c in embedded.cells[44:48]] == [c.name[:-1] + "1" for c in embedded.cells[:4]]
    study = load_bench("configs/bench/trust_region.yaml")
    assert [c.config.defense.max_step for c in study.cells] == [None, 1.0, 0.25, 0.05]
    # the study's cells are the embedded bench's spard-hs cell but for max_step
    same = next(c for c in embedded.cells if c.defense == "spard-hs" and c.attack == "bt_ref").config
    assert dataclasses.replace(study.cells[2].config, train=same.train) == same
    # the seed study's seed-0 cells are the embedded bench's cells of the same rows
    seeds = load_bench("configs/bench/seeds.yaml")
    assert [(c.defense, c.seed) for c in seeds.cells] == [(d, s) for s in (0, 1, 2) for d in ("sft", "spard", "lisa")]
    for cell in (c for c in seeds.cells if c.seed == 0):
        twin = next(c for c in embedded.cells if c.name == cell.name).config
        assert dataclasses.replace(cell.config, train=twin.train) == twin
        assert dataclasses.replace(cell.config.train, output_dir=twin.train.output_dir) == twin.train
    cfg = paper.cells[0].config
    assert (cfg.model.name_or_path, cfg.lora.r, cfg.lora.alpha, cfg.train.lr, cfg.train.epochs) == (
        "Qwen/Qwen2.5-7B-Instruct", 32, 8, 5e-5, 10.0)
    assert cfg.train.batch_size * cfg.train.grad_accum == 128 and cfg.data.max_length == 2048
    assert cfg.eval.judge.name == "openai" and cfg.eval.judge.model == "gpt-4o-mini" and cfg.attack.harmful_ratio == 0.1
    assert {c.task for c in paper.cells} == {"gsm8k", "openbookqa_ref"}


# ---------------------------------------------------------------------------------------------------------
# Runner
# ---------------------------------------------------------------------------------------------------------
def small_bench(tmp_path, **changes):
    defaults = {"attacks": [{"name": "bt", "overrides": {"attack.name": "harmful_mix"}}], "ratios": [0, 0.3],
                "seeds": [0]}
    return load_bench(write_bench(tmp_path, **{**defaults, **changes}))


def test_finished_cells_are_skipped(tmp_path):
    b = small_bench(tmp_path)
    runner = Recorder()
    first = run_cells(b, run_fn=runner, align_fn=no_align)
    assert [o.status for o in first] == ["ran"] * 4 and len(runner.calls) == 4
    assert all(cell_status(c) == "done" for c in b.cells)
    second = run_cells(b, run_fn=runner, align_fn=no_align)
    assert [o.status for o in second] == ["skipped"] * 4 and len(runner.calls) == 4  # nothing rerun


def test_alignment_runs_once_for_the_cells_to_run(tmp_path):
    b = small_bench(tmp_path, align={"enabled": True})
    aligned = []
    run_cells(b, run_fn=Recorder(), align_fn=aligned.append)
    assert len(aligned) == 1
    run_cells(b, run_fn=Recorder(), align_fn=aligned.append)
    assert len(aligned) == 1  # nothing left to run: no alignment either


def test_a_crashed_cell_does_not_stop_the_grid_and_is_retried_next_time(tmp_path):
    b = small_bench(tmp_path)
    bad = b.cells[1]
    runner = Recorder(crash=(bad.name,))
    outcomes = run_cells(b, run_fn=runner, align_fn=no_align)
    assert [o.status for o in outcomes] == ["ran", "failed", "ran", "ran"]
    assert outcomes[1].error == "RuntimeError: boom: simulated crash"
    text = (bad.run_dir / ERROR_FILE).read_text()
    assert text.startswith(f"cell 1 {bad.name}: attempt 1 failed") and "Traceback" in text and "boom" in text
    assert cell_status(bad) == "failed" and "failed" in format_cell_list(b)
    assert not list(bad.run_dir.glob(".error.txt.*"))  # written atomically: no temp file left

    fixed = Recorder()
    again = run_cells(b, run_fn=fixed, align_fn=no_align)
    assert fixed.names == [bad.name] and [o.status for o in again] == ["skipped", "ran", "skipped", "skipped"]
    assert cell_status(bad) == "done" and not (bad.run_dir / ERROR_FILE).exists()


def test_retry_within_one_invocation(tmp_path):
    b = small_bench(tmp_path, ratios=[0.3], defenses=["sft"])
    attempts = []

    def flaky(cfg):
        attempts.append(cfg)
        if len(attempts) == 1:
            raise OSError("disk hiccup")
        fake_run(cfg)

    (outcome,) = run_cells(b, run_fn=flaky, align_fn=no_align, retry=1)
    assert (outcome.status, outcome.attempts) == ("ran", 2)
    (failed,) = run_cells(small_bench(tmp_path / "other", ratios=[0.3], defenses=["sft"]),
                          run_fn=Recorder(crash=("sft__bt__p0.3__s0",)), align_fn=no_align, retry=2)
    assert (failed.status, failed.attempts) == ("failed", 3)


def test_partial_cell_resumes_from_its_checkpoint(tmp_path):
    b = small_bench(tmp_path, ratios=[0.3], defenses=["sft"])
    (cell,) = b.cells
    (cell.run_dir / "checkpoint-2").mkdir(parents=True)
    atomic_write_text(cell.run_dir / "config.yaml", config_to_yaml(cell.config))
    assert cell_status(cell) == "partial"
    runner = Recorder()
    run_cells(b, run_fn=runner, align_fn=no_align)
    assert runner.calls[0].train.resume is True
    assert cell_status(cell) == "done"  # train.resume=true in config.yaml does not make the cell stale


def test_cell_of_another_config_is_stale_and_left_alone(tmp_path):
    b = small_bench(tmp_path, ratios=[0.3], defenses=["sft"])
    run_cells(b, run_fn=Recorder(), align_fn=no_align)
    changed = load_bench(write_bench(tmp_path, attacks=[{"name": "bt", "overrides": {"attack.name": "harmful_mix"}}],
                                     ratios=[0.3], defenses=["sft"], seeds=[0], base={"train.max_steps": 3}))
    assert cell_status(changed.cells[0]) == "stale"
    runner = Recorder()
    (outcome,) = run_cells(changed, run_fn=runner, align_fn=no_align)
    assert outcome.status == "stale" and "train.max_steps (now: 3, stored: 2)" in outcome.error and not runner.calls
    assert "0 of 1 cells finished" in collect(changed, plots=False).table


def test_crashed_cell_without_checkpoints_reruns_under_a_changed_config(tmp_path):
    b = small_bench(tmp_path, ratios=[0.3], defenses=["sft"])
    (cell,) = b.cells
    earlier = dataclasses.replace(cell.config, train=dataclasses.replace(cell.config.train, max_steps=7))
    atomic_write_text(cell.run_dir / "config.yaml", config_to_yaml(earlier))
    atomic_write_text(cell.run_dir / ERROR_FILE, "Traceback ...\nValueError: bad option\n")
    assert cell_status(cell) == "failed"  # nothing to resume, so a fixed bench config simply reruns it
    runner = Recorder()
    run_cells(b, run_fn=runner, align_fn=no_align)
    assert runner.calls[0].train.resume is False and cell_status(cell) == "done"


def test_cell_index_out_of_range(tmp_path):
    with pytest.raises(SpardError, match=r"cell 9: .* has 4 cells \(0-3\)"):
        bench(small_bench(tmp_path), cell=9, run_fn=Recorder(), align_fn=no_align)


# ---------------------------------------------------------------------------------------------------------
# Collect: results.csv, table.md, plots
# ---------------------------------------------------------------------------------------------------------
def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_collect_shows_a_missing_cell_as_missing(tmp_path):
    b = small_bench(tmp_path, seeds=[0])
    missing: Cell = b.cells[3]  # safeinstr at p=0.3
    run_cells(b, run_fn=Recorder(crash=(missing.name,)), align_fn=no_align)
    report = collect(b)
    rows = {r["cell"]: r for r in _rows(b.bench_dir / "results.csv")}
    assert len(rows) == 4
    assert rows[missing.name]["status"] == "failed" and rows[missing.name]["asr_pct"] == ""
    assert rows[missing.name]["gsm8k_acc_pct"] == "" and "boom" in rows[missing.name]["error"]
    ok = rows["sft__bt__p0.3__s0"]
    assert (ok["status"], ok["asr_pct"], ok["gsm8k_acc_pct"], ok["obqa_acc_pct"]) == ("done", "40.0", "30.0", "40.0")
    assert (ok["ratio"], ok["seed"], ok["train_seconds"], ok["seconds_per_step"]) == ("0.3", "0", "4.0", "2.0")
    table = report.table
    assert "3 of 4 cells finished" in table and f"Not finished: {missing.name} (failed)" in table
    asr_rows = [line for line in table.splitlines() if line.startswith("| safeinstr")]
    assert asr_rows[0] == "| safeinstr | **2.0** | – | – |"  # missing, not 0; no average over a hole
    assert "| sft | 10.0 | **40.0** | **25.0** |" in table  # the only value of a column is its best


def test_table_and_plots_from_run_dirs(tmp_path):
    b = load_bench(write_bench(tmp_path, seeds=[0, 1]))
    run_cells(b, run_fn=fake_run, align_fn=no_align)
    report = collect(b)
    for name in ("results.csv", "table.md", "safety_utility.png", "asr_vs_ratio.png"):
        path = b.bench_dir / name
        assert path.is_file() and report.files[name] == path
    for png in ("safety_utility.png", "asr_vs_ratio.png"):
        assert (b.bench_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(_rows(b.bench_dir / "results.csv")) == len(b.cells)
    table = (b.bench_dir / "table.md").read_text()
    assert table == report.table
    lines = table.splitlines()
    head = "| defense | bt p=0 | bt p=0.1 | bt p=0.3 | hh p=0 | hh p=0.1 | hh p=0.3 | aoa | benign | average |"
    assert lines.count(head) == 2  # ASR and accuracy tables
    # ASR: mean over seeds 0, 1 (0.10 and 0.12 for sft at p=0), safeinstr best (bold) in every column
    assert lines[lines.index(head) + 2].startswith("| sft | 11.0 ± 1.4 | 21.0 ± 1.4 | 41.0 ± 1.4 |")
    assert lines[lines.index(head) + 3].startswith("| safeinstr | **3.0** ± 1.4 | **13.0** ± 1.4")
    assert ("Before fine-tuning (the aligned model): ASR 4.0, GSM8K accuracy (flexible match) 30.0, "
            "OpenBookQA accuracy (acc_norm) 40.0 (%).") in table
    assert "`hh` = harmful_mix with hh_rlhf" in table and "28 of 28 cells finished" in table


def test_cli_bench_cells_run_and_collect(tmp_path, capsys, monkeypatch):
    path = write_bench(tmp_path, attacks=[{"name": "bt", "overrides": {"attack.name": "harmful_mix"}}],
                       ratios=[0.3], seeds=[0])
    assert main(["bench", str(path), "--cells"]) == 0
    out = capsys.readouterr().out
    assert "0  sft__bt__p0.3__s0        pending" in out and "2 cells" in out
    monkeypatch.setattr("spard.benchmark.runner.run_cell", fake_run)  # the default cell runner
    assert main(["bench", str(path), "--cell", "1"]) == 0
    assert "cells: 1 ran" in capsys.readouterr().out
    assert main(["bench", str(path), "--collect"]) == 0
    out = capsys.readouterr().out
    assert "1 of 2 cells finished" in out and "| sft | – | – |" in out and "table.md" in out
    assert main(["bench", str(path), "--cell", "5"]) == 2
    assert "cell 5:" in capsys.readouterr().err


def test_cli_bench_reports_failures_with_exit_code(tmp_path, capsys, monkeypatch):
    path = write_bench(tmp_path, attacks=[{"name": "bt", "overrides": {"attack.name": "harmful_mix"}}],
                       ratios=[0.3], seeds=[0], defenses=["sft"])
    monkeypatch.setattr("spard.benchmark.runner.run_cell", Recorder(crash=("sft__bt__p0.3__s0",)))
    assert main(["bench", str(path)]) == 1
    out = capsys.readouterr().out
    assert "FAILED cell 0 sft__bt__p0.3__s0: RuntimeError: boom" in out and "0 of 1 cells finished" in out
    assert json.loads(json.dumps(_rows(tmp_path / "out" / "results.csv")))[0]["status"] == "failed"


def test_judge_errors_are_marked_and_an_invalid_evaluation_is_a_failed_cell(tmp_path):
    """Issue 27: an ASR computed with judge errors left out says so (§, judge_errors); an evaluation marked
    invalid (its judge failed too often) is not a finished cell."""
    b = small_bench(tmp_path, seeds=[0])
    run_cells(b, run_fn=fake_run, align_fn=no_align)
    with_errors, invalid = b.cells[0], b.cells[3]
    for cell, k, valid in ((with_errors, 2, True), (invalid, 50, False)):
        path = cell.run_dir / "eval" / "results.json"
        results = json.loads(path.read_text())
        results["primary_judge"] = "openai"
        block = next(iter(results["harm"].values()))
        block["judges"]["openai"] = {**block["judges"]["keyword"], "error_rate": rate(k, 50)}
        results["valid"] = valid
        if not valid:
            results["invalid_reason"] = "judge 'openai' could not score 50 of 50 replies"
        atomic_write_json(path, results)
    assert cell_status(with_errors) == "done" and cell_status(invalid) == "failed"
    report = collect(b)
    rows = {r["cell"]: r for r in _rows(b.bench_dir / "results.csv")}
    assert rows[with_errors.name]["judge_errors"] == "2" and rows[b.cells[1].name]["judge_errors"] == "0"
    assert rows[invalid.name]["status"] == "failed" and "could not score 50 of 50" in rows[invalid.name]["error"]
    assert "§" in report.table and "could not score 2 replies in these cells" in report.table
    sft_row = next(line for line in report.table.splitlines() if line.startswith("| sft |"))
    assert sft_row.startswith("| sft | 10.0§ |")


def test_the_committed_embedded_cells_are_cells_of_the_shipped_bench():
    """docs/results/embedded/cells holds finished cells a later run resumes from (its README): each must be a cell
    of configs/bench/embedded.yaml under its current config, or the table would mix configs. Changing the bench
    means deleting the cells it changes."""
    from spard.benchmark.status import HOW_ONLY
    from spard.config import stored_config_diff

    committed = Path("docs/results/embedded/cells")
    if not committed.is_dir():
        pytest.skip("no committed cells")
    cells = {c.name: c for c in load_bench("configs/bench/embedded.yaml").cells}
    names = sorted(p.name for p in committed.iterdir() if p.is_dir())
    assert names and set(names) <= set(cells), set(names) - set(cells)
    for name in names:
        assert not stored_config_diff(cells[name].config, committed / name / "config.yaml", ignore=HOW_ONLY), name
        results = json.loads((committed / name / "eval" / "results.json").read_text())
        assert results.get("valid") is not False and results["harm"], name


def test_the_bf16_probe_differs_from_the_embedded_bench_only_in_precision():
    """perf/embedded_bf16.yaml times a bf16 grid against the fp32 cells of the same names: anything else that
    differs would make the comparison meaningless."""
    import dataclasses

    full = {c.name: c for c in load_bench("configs/bench/embedded.yaml").cells}
    probe = load_bench("perf/embedded_bf16.yaml").cells
    assert probe and {c.name for c in probe} <= set(full)

    def without_precision(config) -> dict:
        d = dataclasses.asdict(config)
        assert d["train"].pop("bf16") is not None and d["eval"].pop("bf16") is not None
        d["train"].pop("output_dir")
        return d

    for cell in probe:
        assert cell.config.train.bf16 == "true" and cell.config.eval.bf16 == "true", cell.name
        assert without_precision(cell.config) == without_precision(full[cell.name].config), cell.name
