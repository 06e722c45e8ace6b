"""The zero-signal guard: a defense whose own signal is identically zero (or not finite) over its first steps stops
the run with an error instead of training on as plain fine-tuning. Unit tests of ``SignalGuard``, then each
defense with its signal forced to zero through the trainer."""

from __future__ import annotations

import math

import pytest
import torch

from spard.config import load_config
from spard.errors import DefenseSignalError
from spard.jobs.align import align
from spard.jobs.finetune import train
from spard.signal_guard import SignalGuard
from spard.testing import tiny_model


def test_guard_stops_after_a_window_of_zeros():
    guard = SignalGuard("safegrad", "alignment gradient norm", window=3)
    guard.observe(0.0, 1)
    guard.observe(0.0, 2)
    with pytest.raises(DefenseSignalError, match=r"'safegrad'.*alignment gradient norm.*exactly 0.*first 3"):
        guard.observe(0.0, 3)


def test_guard_passes_a_signal_that_is_zero_only_at_first():
    guard = SignalGuard("safegrad", "alignment gradient norm", window=3)
    for step, value in enumerate([0.0, 1e-12, 0.0, 0.0, 0.0], start=1):
        guard.observe(value, step)
    assert guard.done and guard.nonzero and guard.seen == 3


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_guard_stops_on_a_non_finite_signal_in_the_window(bad):
    guard = SignalGuard("booster", "attenuation term norm", window=3)
    guard.observe(1.0, 1)
    with pytest.raises(DefenseSignalError, match=r"'booster'.*(nan|inf) at step 2"):
        guard.observe(bad, 2)


def test_guard_leaves_late_steps_to_the_defense():
    guard = SignalGuard("spard", "safety gradient norm", window=2)
    guard.observe(0.0, 1)
    guard.observe(0.5, 2)
    guard.observe(math.nan, 3)  # after the window: not the guard's business
    guard.observe(0.0, 4)


# ---------------------------------------------------------------------------------------------------------
# each defense, its signal forced to zero
# ---------------------------------------------------------------------------------------------------------
RUN = ("align.enabled=false", "data.task=gsm8k", "data.n_train=24", "data.max_length=64", "attack.harmful_ratio=0.25",
       "train.batch_size=4", "train.max_steps=4", "train.lr=0.01", "lora.dropout=0", "train.save_steps=100")


def _zero_safegrad(monkeypatch):
    import spard.checkpointing as ck

    monkeypatch.setattr(ck, "parameter_gradients", lambda loss, params, mode: [torch.zeros_like(p) for p in params])


def _zero_spard(monkeypatch):
    from spard.defenses.spard import Spard

    def zero_grads(self, loss_sum, n_global):
        return [torch.zeros_like(p) for p in self.params]

    monkeypatch.setattr(Spard, "_safety_grads", zero_grads)


def _zero_lisa(monkeypatch):
    import spard.defenses.lisa as lisa

    monkeypatch.setattr(lisa, "proximal_term", lambda params, anchors, rho: torch.zeros(()))  # cut from the graph


FINETUNE_CASES = {
    "safegrad": (("defense.name=safegrad", "defense.alignment_examples=8"), _zero_safegrad, "alignment gradient"),
    "spard": (("defense.name=spard", "defense.projection=halfspace", "defense.embedder_dtype=model"), _zero_spard,
              "safety gradient"),
    "lisa": (("defense.name=lisa", "defense.align_steps=1", "defense.finetune_steps=3", "defense.rho=1.0",
              "defense.proximal_warmup_ratio=0", "defense.alignment_examples=40", "defense.alignment_max_length=64",
              "train.max_steps=8"), _zero_lisa, "proximal term"),
}


@pytest.mark.parametrize("defense", sorted(FINETUNE_CASES))
def test_finetune_defense_with_a_zero_signal_stops(defense, monkeypatch, tmp_path, tiny_tok):
    options, zero, what = FINETUNE_CASES[defense]
    zero(monkeypatch)
    cfg = load_config(None, [*RUN, *options, f"train.output_dir={tmp_path / 'run'}"])
    with pytest.raises(DefenseSignalError, match=rf"'{defense}'.*{what}.*exactly 0"):
        train(cfg, model=tiny_model(tiny_tok, seed=0), tokenizer=tiny_tok)
    assert not (tmp_path / "run" / "final").exists()  # no adapter that looks like a defended one


def _zero_booster(monkeypatch):
    import spard.align_defenses.booster as booster

    monkeypatch.setattr(booster, "booster_regulariser", lambda a, b, lamb: [torch.zeros_like(x) for x in a])


def _zero_repnoise(monkeypatch):
    import spard.align_defenses.repnoise as repnoise

    monkeypatch.setattr(repnoise, "noise_mmd", lambda acts, mask, noise=None: torch.zeros(()))


def _zero_vaccine(monkeypatch):
    import spard.align_defenses.vaccine as vaccine

    monkeypatch.setattr(vaccine, "joint_norm", lambda grads: torch.zeros(()))


ALIGN_CASES = {
    "booster": (("align.defense.name=booster", "align.defense.n_harmful=8"), _zero_booster, "attenuation term"),
    "repnoise": (("align.defense.name=repnoise", "align.defense.n_harmful=8"), _zero_repnoise, "noise"),
    "vaccine": (("align.defense.name=vaccine",), _zero_vaccine, "attention-output gradient"),
}


@pytest.mark.parametrize("defense", sorted(ALIGN_CASES))
def test_alignment_defense_with_a_zero_signal_stops(defense, monkeypatch, tmp_path, tiny_tok):
    options, zero, what = ALIGN_CASES[defense]
    zero(monkeypatch)
    cfg = load_config(None, ["align.n_safety=8", "align.n_benign=8", "align.max_length=48", "align.batch_size=4",
                             "align.lora_r=4", *options, f"align.output_dir={tmp_path / 'aligned'}"])
    with pytest.raises(DefenseSignalError, match=rf"'{defense}'.*{what}.*exactly 0"):
        align(cfg, model=tiny_model(tiny_tok, seed=0), tokenizer=tiny_tok)
    assert not (tmp_path / "aligned" / "model").exists()
