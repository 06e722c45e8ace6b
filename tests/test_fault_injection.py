"""Fault injection: a checkpoint save (or the alignment stage) killed at any of its writes never yields a wrong
resume.

For each stateful defense (SPARD under both projection rules, SafeGrad, Lisa) a run saves checkpoint-1, then
checkpoint-2; the save of checkpoint-2 is cut before each of its writes in turn (adapter, config, model card,
tokenizer files, optimizer, scheduler, RNG, trainer state, defense state and tensors, each atomic write's rename,
the COMPLETE marker). The run directory as such a kill leaves it (a copy taken at that instant, in-progress
temporary files included) is resumed with ``train.resume=true``; the resumed run must take the newest *whole*
checkpoint and end with exactly the adapter of the uninterrupted run. Tolerance: 0.0 (``rtol=atol=0``): resumes
are bit-exact. A real ``kill -9`` in a subprocess (the multiprocess test) checks that the copies stand for it.

Writes counted: Python ``open`` for writing, ``torch.save``, safetensors' ``save_file``, ``os.replace``/``rename``.
The tokenizer's ``tokenizer.json`` is written by Rust code no hook sees; the writes before and after it are cut.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors.torch
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from spard.config import load_config
from spard.defenses.lisa import ANCHOR_FILE
from spard.errors import ConfigError
from spard.jobs.finetune import train
from spard.rundir import CHECKPOINT_COMPLETE_FILE, DEFENSE_STATE_FILE, last_checkpoint, skipped_checkpoints
from spard.testing import assert_same_adapter, tiny_model
from spard.trainer import SpardTrainer

ROOT = Path(__file__).resolve().parents[1]
FAULT_STEP = 2
"""The checkpoint whose save is cut; checkpoint-1 before it is whole, step 3 comes after it."""

DEFENSES = {
    "spard-reference": ("defense.name=spard", "defense.projection=reference", "defense.safety_k=2",
                        "defense.safety_batch_size=1"),
    "spard-halfspace": ("defense.name=spard", "defense.projection=halfspace", "defense.safety_k=2",
                        "defense.safety_batch_size=1", "defense.max_step=1.0"),
    "safegrad": ("defense.name=safegrad", "defense.alignment_examples=8", "defense.alignment_max_length=64"),
    "lisa": ("defense.name=lisa", "defense.align_steps=1", "defense.finetune_steps=2", "defense.rho=1.0",
             "defense.proximal_warmup_ratio=0", "defense.alignment_examples=8", "defense.alignment_max_length=64"),
}


@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny model gains nothing from a second thread, and on a shared CPU two threads wait on each other: a
    run takes a few seconds instead of fifteen."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_config(out: Path, defense: str, *extra: str):
    return load_config(None, [
        f"train.output_dir={out}", "align.enabled=false", "data.n_train=8", "data.max_length=64",
        "train.batch_size=4", "train.max_steps=3", "train.lr=5e-2", "train.save_steps=1", "lora.r=2",
        "lora.dropout=0.1", "attack.harmful_ratio=0.5", *DEFENSES[defense], *extra,
    ])


def model_for(defense: str, tok):
    model = tiny_model(tok)
    if defense == "safegrad":  # a sharper output distribution, so the KL gradient is not ~0 (as test_safegrad)
        with torch.no_grad():
            model.model.norm.weight.mul_(10.0)
    return model


# ---------------------------------------------------------------------------------------------------------
# The write hooks
# ---------------------------------------------------------------------------------------------------------
class Writes:
    """Counts the writes made while :attr:`active`, and calls ``before(k, what)`` before the k-th (from 1)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, before) -> None:  # noqa: ANN001
        self.before, self.active, self.names, self.depth = before, False, [], 0

        def hooked(original, what):  # noqa: ANN001, ANN202
            def call(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                if what == "open" and not _writes(args, kwargs):
                    return original(*args, **kwargs)
                self._hit(what, args)
                self.depth += 1
                try:
                    return original(*args, **kwargs)
                finally:
                    self.depth -= 1
            return call

        for mod, attr in ((builtins, "open"), (io, "open"), (os, "replace"), (os, "rename")):
            monkeypatch.setattr(mod, attr, hooked(getattr(mod, attr), "open" if attr == "open" else attr))
        savers = {id(torch.save): ("torch.save", torch.save),
                  id(safetensors.torch.save_file): ("save_file", safetensors.torch.save_file)}
        for mod in list(sys.modules.values()):  # every module that imported a saver under any name
            for attr, value in list(getattr(mod, "__dict__", {}).items()):
                if id(value) in savers and savers[id(value)][1] is value and callable(value):
                    monkeypatch.setattr(mod, attr, hooked(value, savers[id(value)][0]))

    def _hit(self, what: str, args: tuple) -> None:
        if not self.active or self.depth:
            return
        target = next((a for a in args if isinstance(a, (str, os.PathLike))), "?")
        name = f"{what} {Path(target).name}" if what != "replace" else f"rename -> {Path(args[1]).name}"
        self.names.append(name)
        self.depth += 1  # the callback's own file operations (a snapshot) are not writes of the save
        try:
            self.before(len(self.names), name)
        finally:
            self.depth -= 1


def _writes(args: tuple, kwargs: dict) -> bool:
    mode = kwargs.get("mode", args[1] if len(args) > 1 else "r")
    return isinstance(mode, str) and any(c in mode for c in "wax+")


@contextlib.contextmanager
def during_checkpoint_save(writes: Writes, step: int):
    """Make ``writes`` active inside the save of ``checkpoint-<step>`` only."""
    original = SpardTrainer._save_checkpoint

    def save(self, model, trial):  # noqa: ANN001, ANN202
        writes.active = self.state.global_step == step
        try:
            return original(self, model, trial)
        finally:
            writes.active = False

    SpardTrainer._save_checkpoint = save
    try:
        yield
    finally:
        SpardTrainer._save_checkpoint = original


def snapshot(run_dir: Path, dest: Path) -> None:
    """The run directory as a kill at this instant leaves it (every earlier write was closed: HF, torch and
    safetensors close each file before the next write starts)."""
    shutil.copytree(run_dir, dest, symlinks=True)


# ---------------------------------------------------------------------------------------------------------
# Checkpoints of the fine-tuning job
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_kill_at_each_checkpoint_write_resumes_exactly(tmp_path, tiny_tok, monkeypatch, defense):
    straight_dir, snaps = tmp_path / "straight", tmp_path / "killed"

    def take(k: int, what: str) -> None:
        snapshot(straight_dir, snaps / f"k{k:02d}")

    writes = Writes(monkeypatch, take)
    with during_checkpoint_save(writes, FAULT_STEP):
        straight = train(run_config(straight_dir, defense), model=model_for(defense, tiny_tok), tokenizer=tiny_tok)
    monkeypatch.undo()
    names = writes.names
    print(f"{defense}: {len(names)} writes cut:", names)
    # every part is cut at least once, and the marker is the last write of the save
    assert any("trainer_state.json" in n for n in names) and any(DEFENSE_STATE_FILE in n for n in names), names
    assert any("optimizer.pt" in n for n in names) and any("adapter_model.safetensors" in n for n in names), names
    assert names[-1] == f"rename -> {CHECKPOINT_COMPLETE_FILE}", names
    if defense == "lisa":
        assert any(ANCHOR_FILE in n for n in names), names

    for k, what in enumerate(names, 1):
        cut = snaps / f"k{k:02d}"
        where = f"{defense}: killed before write {k} of {len(names)} ({what})"
        # the cut checkpoint is not whole, and resume says so and takes checkpoint-1
        assert last_checkpoint(cut) == cut / "checkpoint-1", where
        assert [c.name for c, _ in skipped_checkpoints(cut)] == [f"checkpoint-{FAULT_STEP}"], where
        resumed = train(run_config(cut, defense, "train.resume=true"), model=model_for(defense, tiny_tok),
                        tokenizer=tiny_tok)
        try:
            assert_same_adapter(straight.adapter_dir, resumed.adapter_dir, rtol=0.0, atol=0.0)
        except AssertionError as e:
            raise AssertionError(f"{where}: the resumed adapter differs: {e}") from None
        shutil.rmtree(cut)  # keep the tmp dir small


class StopAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001
        if state.global_step == FAULT_STEP:
            raise KeyboardInterrupt("stopped after checkpoint-2")


def test_a_whole_checkpoint_is_resumed_and_a_defense_without_its_state_is_refused(tmp_path, tiny_tok):
    """After the marker the checkpoint is taken; a whole-looking checkpoint whose defense state was removed is
    refused with a clear error (the defense would silently start afresh)."""
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(run_config(out, "safegrad"), model=model_for("safegrad", tiny_tok), tokenizer=tiny_tok,
              callbacks=[StopAfterSave()])
    ckpt = out / f"checkpoint-{FAULT_STEP}"
    assert last_checkpoint(out) == ckpt and json.loads((ckpt / DEFENSE_STATE_FILE).read_text())["cursor"] > 0
    (ckpt / DEFENSE_STATE_FILE).unlink()
    assert last_checkpoint(out) == out / "checkpoint-1"  # no longer whole: its marker lists the file
    from spard.trainer import resume_state

    with pytest.raises(ConfigError, match=rf"checkpoint-{FAULT_STEP}: the checkpoint is not whole "
                                          rf"\({DEFENSE_STATE_FILE} is missing\)"):
        resume_state(ckpt)
    (ckpt / CHECKPOINT_COMPLETE_FILE).unlink()
    with pytest.raises(ConfigError, match="no COMPLETE marker: its save was interrupted"):
        resume_state(ckpt)


# ---------------------------------------------------------------------------------------------------------
# The alignment stage
# ---------------------------------------------------------------------------------------------------------
def align_config(out: Path):
    return load_config(None, [
        "align.enabled=true", f"align.output_dir={out}", "align.n_safety=4", "align.n_benign=4",
        "align.max_length=48", "align.batch_size=4", "align.epochs=1", "lora.r=2",
    ])


def test_alignment_stage_killed_at_each_write_is_rebuilt_exactly(tmp_path, tiny_tok, monkeypatch):
    """Every write of the alignment stage (its training's metrics and adapter, the record, the merged model and
    its rename into the cache): a kill there never publishes a model, and the next call rebuilds exactly the
    uninterrupted one (0.0 difference)."""
    from spard.jobs.align import align

    out, snaps = tmp_path / "straight", tmp_path / "killed"
    writes = Writes(monkeypatch, lambda k, what: snapshot(out, snaps / f"k{k:02d}"))
    writes.active = True
    straight = align(align_config(out), model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    monkeypatch.undo()
    names = writes.names
    assert any("align_result.json" in n for n in names) and any("model.safetensors" in n for n in names), names
    expected = load_file(str(straight.model_dir / "model.safetensors"))
    for k, what in enumerate(names, 1):
        cut = snaps / f"k{k:02d}"
        where = f"alignment killed before write {k} of {len(names)} ({what})"
        rebuilt = align(align_config(cut), model=tiny_model(tiny_tok), tokenizer=tiny_tok)
        assert not rebuilt.cached, where  # a cut attempt never publishes a model
        assert json.loads((cut / "align_result.json").read_text())["metrics"] == rebuilt.metrics, where
        got = load_file(str(rebuilt.model_dir / "model.safetensors"))
        assert got.keys() == expected.keys(), where
        for name in expected:
            assert torch.equal(got[name], expected[name]), f"{where}: {name}"
        shutil.rmtree(cut)


# ---------------------------------------------------------------------------------------------------------
# A real kill -9
# ---------------------------------------------------------------------------------------------------------
KILL_WORKER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    import test_fault_injection as t
    from conftest_tok import tok
    from spard.jobs.finetune import train
    out, defense, target = Path(sys.argv[1]), sys.argv[2], sys.argv[3]

    def kill(k, what):
        if target in what:
            os.kill(os.getpid(), signal.SIGKILL)

    class MP:  # a minimal monkeypatch: the process dies anyway
        def setattr(self, obj, name, value):
            setattr(obj, name, value)

    writes = t.Writes(MP(), kill)
    with t.during_checkpoint_save(writes, t.FAULT_STEP):
        train(t.run_config(out, defense), model=t.model_for(defense, tok()), tokenizer=tok())
""")

TOK_HELPER = textwrap.dedent("""
    import functools
    from spard.data.sources import load_source
    from spard.testing import tiny_tokenizer

    @functools.lru_cache(maxsize=1)
    def tok():
        texts = [m["content"] for name in ("gsm8k", "beavertails", "safety")
                 for r in load_source(name)[:300] for m in r.messages]
        return tiny_tokenizer(texts)
""")


@pytest.mark.multiprocess
def test_kill_9_between_trainer_state_and_defense_state_resumes_exactly(tmp_path, tiny_tok):
    """The issue's case, with a real SIGKILL: the process dies after trainer_state.json, before the defense's
    state; the resume takes checkpoint-1 and ends on the uninterrupted adapter (0.0 difference)."""
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "conftest_tok.py").write_text(TOK_HELPER)
    (helpers / "worker.py").write_text(KILL_WORKER.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": f"{helpers}{os.pathsep}{ROOT / 'src'}", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "cut"
    proc = subprocess.run([sys.executable, str(helpers / "worker.py"), str(out), "safegrad", DEFENSE_STATE_FILE],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt = out / f"checkpoint-{FAULT_STEP}"
    assert (ckpt / "trainer_state.json").is_file() and not (ckpt / DEFENSE_STATE_FILE).exists()
    assert list(ckpt.glob(f".{DEFENSE_STATE_FILE}.*.tmp"))  # the kill left the atomic write's temp file
    straight = train(run_config(tmp_path / "straight", "safegrad"), model=model_for("safegrad", tiny_tok),
                     tokenizer=tiny_tok)
    resumed = train(run_config(out, "safegrad", "train.resume=true"), model=model_for("safegrad", tiny_tok),
                    tokenizer=tiny_tok)
    assert_same_adapter(straight.adapter_dir, resumed.adapter_dir, rtol=0.0, atol=0.0)
