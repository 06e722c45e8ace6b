"""Checkpoints are whole or ignored (spard.rundir, the DefenseCallback), and preflight covers the outputs: a bad
output directory, a local model changed in place, a mistyped key."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from spard.config import load_config, suggest_keys
from spard.errors import ConfigError
from spard.rundir import (
    CHECKPOINT_COMPLETE_FILE,
    checkpoint_problem,
    checkpoints,
    last_checkpoint,
    mark_complete,
    rotate_checkpoints,
    rotation_victims,
    skipped_checkpoints,
)


def fake_checkpoint(run: Path, step: int, *, whole: bool = True) -> Path:
    ckpt = run / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text("{}")
    (ckpt / "defense_state.json").write_text(f'{{"cursor": {step}}}')
    if whole:
        mark_complete(ckpt)
    return ckpt


# ---------------------------------------------------------------------------------------------------------
# whole checkpoints
# ---------------------------------------------------------------------------------------------------------
def test_resume_takes_the_newest_whole_checkpoint_and_says_why_it_skipped_newer_ones(tmp_path):
    for step, whole in ((2, True), (4, True), (6, False)):
        fake_checkpoint(tmp_path, step, whole=whole)
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-4"  # HF's get_last_checkpoint says checkpoint-6
    (skipped, why), = skipped_checkpoints(tmp_path)
    assert skipped == tmp_path / "checkpoint-6" and "no COMPLETE marker: its save was interrupted" in why
    # a file of a whole checkpoint changed or removed afterwards makes it not whole
    (tmp_path / "checkpoint-4" / "defense_state.json").write_text("{}")
    assert "defense_state.json has 2 bytes, 13 when the checkpoint was completed" in checkpoint_problem(
        tmp_path / "checkpoint-4")
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    (tmp_path / "checkpoint-2" / "trainer_state.json").unlink()
    assert checkpoint_problem(tmp_path / "checkpoint-2") == "trainer_state.json is missing"
    assert last_checkpoint(tmp_path) is None
    (tmp_path / "checkpoint-2" / CHECKPOINT_COMPLETE_FILE).write_text("{not json")
    assert "is unreadable" in checkpoint_problem(tmp_path / "checkpoint-2")


def test_marker_lists_every_file_but_temporaries(tmp_path):
    ckpt = fake_checkpoint(tmp_path, 3, whole=False)
    (ckpt / ".defense_state.json.abc.tmp").write_text("half")  # a kill's leftover
    mark_complete(ckpt)
    marker = json.loads((ckpt / CHECKPOINT_COMPLETE_FILE).read_text())
    assert marker == {"step": 3, "files": {"defense_state.json": 13, "trainer_state.json": 2}}


@pytest.mark.parametrize(("found", "limit", "victims"), [
    # save_total_limit=1 while the newest save is not whole yet: the whole checkpoint-4 survives
    ([(2, True), (4, True), (6, False)], 1, [2]),
    ([(2, True), (4, True), (6, True)], 2, [2]),
    # a broken checkpoint older than the newest whole one is rubbish; one newer is left for the resume to redo
    ([(2, False), (4, True), (6, False)], 1, [2]),
    ([(2, True), (4, True)], None, []),
    ([(2, False)], 1, []),
])
def test_rotation_never_deletes_the_newest_whole_checkpoint(tmp_path, found, limit, victims):
    paths = [(tmp_path / f"checkpoint-{s}", ok) for s, ok in found]
    assert rotation_victims(paths, limit) == [tmp_path / f"checkpoint-{s}" for s in victims]


def test_rotation_keeps_protected_checkpoints_and_deletes_on_disk(tmp_path):
    for step in (1, 2, 3):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 4, whole=False)
    assert rotate_checkpoints(tmp_path, 1, protect=[tmp_path / "checkpoint-1"]) == [tmp_path / "checkpoint-2"]
    assert [c.name for c in checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-3", "checkpoint-4"]


def test_save_total_limit_1_keeps_a_whole_checkpoint_when_the_next_save_is_cut(tmp_path, tiny_tok):
    """spard's trainer rotates after the marker: with save_total_limit=1, a save cut after HF's own files (where
    HF's rotation would already have deleted the previous checkpoint) leaves the previous one, whole."""
    from transformers import TrainerCallback

    from spard.jobs.finetune import train
    from spard.testing import tiny_model
    from spard.trainer import SpardTrainer

    class Cut(BaseException):
        pass

    original = SpardTrainer._save_checkpoint

    def save(self, model, trial):  # noqa: ANN001, ANN202
        if self.state.global_step == 2:
            import spard.trainer as trainer_module

            real = trainer_module.mark_complete

            def no_marker(ckpt):  # noqa: ANN001, ANN202
                raise Cut("killed before the marker")
            trainer_module.mark_complete = no_marker
            try:
                return original(self, model, trial)
            finally:
                trainer_module.mark_complete = real
        return original(self, model, trial)

    class Nothing(TrainerCallback):
        pass

    cfg = load_config(None, [f"train.output_dir={tmp_path / 'run'}", "align.enabled=false", "data.n_train=8",
                             "data.max_length=64", "train.batch_size=4", "train.max_steps=3", "train.save_steps=1",
                             "train.save_total_limit=1", "lora.r=2"])
    SpardTrainer._save_checkpoint = save
    try:
        with pytest.raises(Cut):
            train(cfg, model=tiny_model(tiny_tok), tokenizer=tiny_tok, callbacks=[Nothing()])
    finally:
        SpardTrainer._save_checkpoint = original
    assert last_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoint-1"


# ---------------------------------------------------------------------------------------------------------
# DefenseCallback in the user's own Trainer
# ---------------------------------------------------------------------------------------------------------
def test_callback_resume_true_skips_a_cut_checkpoint_and_a_cut_checkpoint_is_refused(tmp_path, tiny_tok):
    from spard.hf import DefenseCallback
    from test_hf import MAX_LENGTH, hf_trainer, safety_pool

    def callback() -> DefenseCallback:
        return DefenseCallback("spard", max_length=MAX_LENGTH, safety_k=3, safety_data=safety_pool())

    hf_trainer(tmp_path / "b", tiny_tok, callback(), steps=4).train()
    out = tmp_path / "b" / "hf"
    assert (out / "checkpoint-4" / CHECKPOINT_COMPLETE_FILE).is_file()
    # a kill between HF's trainer_state.json and the callback's defense state at checkpoint-4
    (out / "checkpoint-4" / CHECKPOINT_COMPLETE_FILE).unlink()
    (out / "checkpoint-4" / "defense_state.json").unlink()
    with pytest.raises(ConfigError, match=r"resumed from .*checkpoint-4, which is not a whole checkpoint \(no "
                                          r"COMPLETE marker.*spard.rundir.last_checkpoint\(output_dir\)\) \(here: "
                                          r".*checkpoint-2\)"):
        cut = hf_trainer(tmp_path / "b", tiny_tok, callback(), steps=4)
        cut.train(resume_from_checkpoint=str(out / "checkpoint-4"))
    resumed_cb = callback()
    resumed = hf_trainer(tmp_path / "b", tiny_tok, resumed_cb, steps=4)
    resumed.train(resume_from_checkpoint=True)  # HF alone would take checkpoint-4
    assert resumed_cb.resume_state is not None and resumed_cb.resume_state["cursor"] == 2
    assert last_checkpoint(out) == out / "checkpoint-4"  # saved again, whole
    assert resumed.args.save_total_limit == 5  # the callback's own rotation handed the limit back


# ---------------------------------------------------------------------------------------------------------
# preflight of the outputs
# ---------------------------------------------------------------------------------------------------------
def test_an_output_dir_that_is_a_file_fails_before_any_compute(tmp_path, monkeypatch):
    from spard import api
    from spard.jobs import align as align_job

    def no_alignment(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the alignment stage ran before the output directory was checked")

    monkeypatch.setattr(align_job, "align", no_alignment)
    monkeypatch.setattr(align_job, "alignment_records", no_alignment)
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    for out in (blocker, blocker / "run"):
        cfg = load_config(None, [f"train.output_dir={out}", "align.enabled=true"])
        with pytest.raises(ConfigError, match=rf"train.output_dir='{out}': {blocker} is a file, not a directory"):
            api.train(cfg)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_dir_fails_before_any_compute(tmp_path):
    from spard.jobs.preflight import plan

    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        cfg = load_config(None, [f"train.output_dir={locked / 'run'}", "align.enabled=false"])
        with pytest.raises(ConfigError, match=rf"train.output_dir=.*{locked} is not writable"):
            plan(cfg, ("train",), check_model=False)
    finally:
        locked.chmod(0o700)


def test_unwritable_checks_use_the_nearest_existing_parent(tmp_path, monkeypatch):
    from spard.rundir import check_writable_dir

    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(ConfigError, match=rf"--out='{tmp_path}/a/b': {tmp_path} is not writable \(it would be "
                                          rf"created in {tmp_path}\)"):
        check_writable_dir(tmp_path / "a" / "b", "--out")
    check_writable_dir(tmp_path.parent / "elsewhere", "--out")


def test_bench_and_eval_outputs_are_checked_first(tmp_path):
    from spard import api
    from spard.benchmark import bench

    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    with pytest.raises(ConfigError, match=rf"output_dir \(bench\)='{blocker}': {blocker} is a file"):
        bench(str(_bench_yaml(tmp_path)), output_dir=blocker, run_fn=lambda cfg: None, align_fn=lambda cfg: None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / "train_result.json").write_text('{"base_model": "x"}')
    (run / "attack_prompts.json").write_text("[]")
    with pytest.raises(ConfigError, match=rf"--out='{blocker}': {blocker} is a file"):
        api.evaluate_before_after(run, out_dir=blocker)


def _bench_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bench.yaml"
    path.write_text("defenses: [sft]\nattacks: [{name: harmful_mix}]\nratios: [0.1]\n")
    return path


def test_aligned_model_cache_key_changes_when_a_local_model_changes_in_place(tmp_path, tiny_tok):
    from spard.args import AlignArgs, ModelArgs
    from spard.jobs.align import aligned_model_dir
    from spard.testing import save_tiny_chat_model

    model_dir = save_tiny_chat_model(tmp_path / "model", tiny_tok)
    args = ModelArgs(name_or_path=str(model_dir))
    before = aligned_model_dir(args, AlignArgs())
    assert aligned_model_dir(args, AlignArgs()) == before  # stable while nothing changes
    weights = model_dir / "model.safetensors"
    save_tiny_chat_model(tmp_path / "other", tiny_tok, seed=1)  # same size, other values
    weights.write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1_000_000))
    assert aligned_model_dir(args, AlignArgs()) != before
    # hub ids and the embedded model keep their keys (no directory to read)
    assert aligned_model_dir(ModelArgs(name_or_path="embedded"), AlignArgs()) == \
        aligned_model_dir(ModelArgs(name_or_path="embedded"), AlignArgs())


# ---------------------------------------------------------------------------------------------------------
# did you mean
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("train.lerning_rate=1e-4", r"unknown config key 'train.lerning_rate'; did you mean 'train.lr'\?"),
    ("train.learning_rate=1e-4", r"did you mean 'train.lr'\?"),
    ("train.num_train_epochs=2", r"did you mean 'train.epochs'\?"),
    ("train.seve_steps=3", r"did you mean 'train.save_steps'\? \(also close: 'train.max_steps'\)"),
    (["defense.name=safegrad", "defense.lamda_align=2"], r"did you mean 'defense.lambda_align'\?"),
    # an option of another defense than the one chosen
    (["defense.name=spard", "defense.lamda_align=2"],
     r"unknown config key 'defense.lamda_align'; did you mean 'defense.lambda_align' of defense 'safegrad'\? "
     r"\(defense.name is 'spard', which has no such option\)"),
])
def test_unknown_keys_suggest_the_closest_real_keys(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override if isinstance(override, list) else [override])


def test_suggest_keys():
    names = ["lr", "lr_scheduler", "epochs", "save_steps", "max_steps"]
    assert suggest_keys("lerning_rate", names)[0] == "lr"
    assert suggest_keys("l_r", names)[0] == "lr"
    assert suggest_keys("zzz", names) == []
