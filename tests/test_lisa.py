"""Lisa: the schedule and proximal term against hand computations, and the defense on the tiny model."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from spard.config import LoraArgs, field_docs, load_config
from spard.data.build import load_safety_pool, normalise_prompt
from spard.data.safety import cyclic_indices
from spard.defenses import DefenseContext, get_defense
from spard.defenses.lisa import (
    ANCHOR_FILE,
    Lisa,
    LisaArgs,
    alignment_steps_before,
    is_switch,
    phase_at,
    proximal_active,
    proximal_term,
)
from spard.errors import ConfigError
from spard.jobs.finetune import train
from spard.testing import assert_same_adapter, tiny_model
from spard.trainer import add_lora


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# schedule and proximal term: hand-computed cases
# ---------------------------------------------------------------------------------------------------------
def test_phase_schedule():
    phases = "".join(phase_at(s, 2, 3)[0].upper() for s in range(11))
    assert phases == "AAFFFAAFFFA"  # starts aligning, as the reference
    assert [s for s in range(11) if is_switch(s, 2, 3)] == [2, 5, 7, 10]
    assert [alignment_steps_before(n, 2, 3) for n in range(11)] == [0, 1, 2, 2, 2, 2, 3, 4, 4, 4, 4]
    assert {phase_at(s, 0, 5) for s in range(12)} == {"finetune"} and not any(is_switch(s, 0, 5) for s in range(12))
    assert alignment_steps_before(12, 0, 5) == 0
    # the reference's 100/900: steps 0-99 align, 100-999 fine-tune, 1000 aligns again
    assert (phase_at(99, 100, 900), phase_at(100, 100, 900), phase_at(999, 100, 900), phase_at(1000, 100, 900)) == (
        "alignment", "finetune", "finetune", "alignment")


def test_proximal_gate_is_the_references():
    # reference: `steps > 0.1 * len(train_dataloader) * num_train_epochs` with 0-based steps
    assert [proximal_active(s, 20, 0.1) for s in range(5)] == [False, False, False, True, True]
    assert [proximal_active(s, 20, 0.0) for s in range(2)] == [False, True]


def test_proximal_term_and_gradient_hand_computed():
    p = [t(1, 2).requires_grad_(), torch.tensor([[3.0]], requires_grad=True)]
    a = [t(0, 1), torch.tensor([[1.0]])]
    # rho/2 (‖(1, 1)‖² + ‖2‖²) = 0.5 · 2 · (2 + 4) ... with rho = 2: 1 · 6 = 6
    term = proximal_term(p, a, rho=2.0)
    assert term.item() == 6.0
    term.backward()
    torch.testing.assert_close(p[0].grad, t(2, 2))            # rho (p − a)
    torch.testing.assert_close(p[1].grad, torch.tensor([[4.0]]))
    assert float(proximal_term([t(1, 1)], [t(1, 1)], rho=5.0)) == 0.0
    with pytest.raises(ValueError, match="anchors"):
        proximal_term([t(1)], [], rho=1.0)


# ---------------------------------------------------------------------------------------------------------
# config and data
# ---------------------------------------------------------------------------------------------------------
def test_args_defaults_docs_and_validation():
    cfg = load_config(None, ["defense.name=lisa"])
    assert isinstance(cfg.defense, LisaArgs) and get_defense("lisa") is Lisa
    d = cfg.defense
    assert (d.align_steps, d.finetune_steps, d.rho, d.proximal_warmup_ratio) == (100, 900, 1.0, 0.1)
    docs = field_docs(LisaArgs)
    for name in ("align_steps", "finetune_steps", "rho", "proximal_warmup_ratio", "alignment_examples",
                 "alignment_batch_size", "alignment_max_length", "safety_source", "safety_path"):
        assert docs.get(name), name
    for override, match in [("defense.finetune_steps=0", "defense.finetune_steps=0"),
                            ("defense.align_steps=-1", "defense.align_steps=-1"),
                            ("defense.rho=-1", "defense.rho=-1"),
                            ("defense.proximal_warmup_ratio=2", "defense.proximal_warmup_ratio=2"),
                            ("defense.alignment_examples=0", "defense.alignment_examples=0"),
                            ("defense.alignment_max_length=2", "defense.alignment_max_length=2")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["defense.name=lisa", override])


def test_safety_examples_exclude_attack_prompts(tiny_tok, tmp_path):
    pool = load_safety_pool("safety")
    banned = [r.prompt for r in pool[:2000]]
    cfg = load_config(None, ["defense.name=lisa"])
    defense = Lisa(cfg.defense)
    ctx = DefenseContext(config=cfg, tokenizer=tiny_tok, run_dir=tmp_path, seed=0, attack_prompts=banned)
    assert defense.prepare_data([], ctx) == []
    chosen = {normalise_prompt(r.prompt) for r in defense.alignment_records}
    assert len(chosen) > 300 and not chosen & {normalise_prompt(p) for p in banned}


# ---------------------------------------------------------------------------------------------------------
# the hooks on a stand-in trainer
# ---------------------------------------------------------------------------------------------------------
def fake_trainer(model, tok, *, batch_size=2, grad_accum=1):
    args = SimpleNamespace(per_device_train_batch_size=batch_size, gradient_accumulation_steps=grad_accum,
                           device=torch.device("cpu"), average_tokens_across_devices=True, seed=0)
    return SimpleNamespace(model=model, processing_class=tok, args=args,
                           state=SimpleNamespace(global_step=0, max_steps=10),
                           accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                           current_gradient_accumulation_steps=grad_accum, loss_is_scaled_for_ga=None,
                           model_accepts_loss_kwargs=True, compute_loss_func=None)


def test_alignment_steps_swap_the_batch_and_switches_reset_the_anchor(tiny_tok):
    model = add_lora(tiny_model(tiny_tok), LoraArgs(r=2, dropout=0.0), seed=0)
    defense = Lisa(LisaArgs(align_steps=1, finetune_steps=2, rho=2.0, proximal_warmup_ratio=0.0,
                            alignment_examples=10, alignment_max_length=48))
    trainer = fake_trainer(model, tiny_tok, batch_size=2, grad_accum=2)
    with pytest.raises(ConfigError, match="SpardTrainer"):
        defense.setup(trainer)  # a plain Trainer would never call the batch-swap hook
    trainer.defense = defense
    defense.setup(trainer)
    user = {"input_ids": torch.tensor([[5, 6]]), "labels": torch.tensor([[5, 6]])}
    # step 0 (alignment): two safety micro-batches of 2, normalised by the step's 4 examples' label tokens
    first, n0 = defense.training_batch(trainer, user, torch.tensor(99))
    second, n1 = defense.training_batch(trainer, user, torch.tensor(99))
    feats = [defense.stream.features[i] for i in cyclic_indices(0, 4, 10, defense.seed)]
    expected_tokens = sum(sum(1 for x in f["labels"][1:] if x != -100) for f in feats)
    assert int(n0) == int(n1) == expected_tokens and defense.stream.cursor == 4
    assert first["input_ids"].shape[0] == 2 and first is not user and second is not user
    assert first["input_ids"][0, : len(feats[0]["input_ids"])].tolist() == feats[0]["input_ids"]
    # move the weights, then step 1 (fine-tuning, a switch): the user batch passes, the anchor is θ now
    with torch.no_grad():
        for p in defense.params:
            p.add_(0.5)
    trainer.state.global_step = 1
    batch, n = defense.training_batch(trainer, user, torch.tensor(99))
    assert batch is user and int(n) == 99 and defense.anchor_step == 1
    assert all(torch.equal(a, p) for a, p in zip(defense.anchor, defense.params))
    # the proximal term: zero at the anchor; after a move of 0.1 per entry it is rho/2 · 0.01 · n_entries,
    # and with 2 micro-batches normalised by the step's tokens each micro-batch carries half of it
    with torch.no_grad():
        for p in defense.params:
            p.add_(0.1)
    n_entries = sum(p.numel() for p in defense.params)
    loss = defense.loss(trainer, model, batch, torch.tensor(1.0), None)
    assert float(loss.detach()) == pytest.approx(1.0 + 2.0 / 2 * 0.01 * n_entries / 2, rel=1e-4)
    assert defense.last_prox == pytest.approx(2.0 / 2 * 0.01 * n_entries, rel=1e-4)
    # without token normalisation HF divides each micro-batch loss by 2 itself: the full term is added
    defense.training_batch(trainer, user, None)
    assert float(defense.loss(trainer, model, batch, torch.tensor(1.0), None).detach()) == pytest.approx(
        1.0 + 0.01 * n_entries, rel=1e-4)
    # step 2 stays fine-tuning (no switch, anchor kept); step 3 aligns again and resets it
    trainer.state.global_step = 2
    assert defense.training_batch(trainer, user, torch.tensor(99))[0] is user and defense.anchor_step == 1
    trainer.state.global_step = 3
    assert defense.training_batch(trainer, user, torch.tensor(99))[0] is not user and defense.anchor_step == 3


# ---------------------------------------------------------------------------------------------------------
# the defense in training (tiny model)
# ---------------------------------------------------------------------------------------------------------
RUN = ("align.enabled=false", "data.task=gsm8k", "data.n_train=24", "data.max_length=64", "attack.harmful_ratio=0.25",
       "train.batch_size=4", "train.max_steps=4", "train.lr=0.01", "lora.dropout=0")


def lisa_config(tmp_path, name, *extra):
    return load_config(None, [*RUN, f"train.output_dir={tmp_path / name}", "defense.name=lisa",
                              "defense.align_steps=1", "defense.finetune_steps=2", "defense.rho=1.0",
                              "defense.proximal_warmup_ratio=0", "defense.alignment_examples=40",
                              "defense.alignment_max_length=64", *extra])


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# Logged loss at steps 1-4 (phases A F F A; the proximal term from step 2 on; step 2 is a switch, so its term is
# 0). Re-pin only for an intended change, and say why.
PINNED_LOSSES = [8.779393, 8.787653, 8.884308, 8.776392]


def test_loss_curve_is_pinned(tmp_path, tiny_tok):
    res = train(lisa_config(tmp_path, "run"), model=tiny_model(tiny_tok, seed=0), tokenizer=tiny_tok)
    rows = metric_rows(res.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["lisa_alignment"] for r in rows] == [1.0, 0.0, 0.0, 1.0]
    assert [r["lisa_alignment_steps"] for r in rows] == [1.0, 1.0, 1.0, 2.0]
    assert rows[0]["lisa_prox"] == 0.0 and rows[1]["lisa_prox"] == 0.0 and rows[2]["lisa_prox"] > 0
    losses = [round(r["loss"], 6) for r in rows]
    assert losses == pytest.approx(PINNED_LOSSES, abs=1e-4), losses


class RecordUpdates(TrainerCallback):
    def __init__(self):
        self.updates = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.updates.append([p.grad.detach().clone() for p in model.parameters() if p.requires_grad])


def test_grad_accumulation_gives_the_same_update(tmp_path, tiny_tok):
    """batch 4 × accum 1 and batch 2 × accum 2: the same user examples, the same safety examples (the stream is
    drawn in the same order), the safety loss normalised by the step's tokens, the proximal term counted once."""
    runs = {}
    for name, bs, ga in [("b4", 4, 1), ("b2x2", 2, 2)]:
        rec = RecordUpdates()
        cfg = lisa_config(tmp_path, name, f"train.batch_size={bs}", f"train.grad_accum={ga}", "defense.rho=20")
        res = train(cfg, model=tiny_model(tiny_tok, seed=0), tokenizer=tiny_tok, callbacks=[rec])
        runs[name] = (rec.updates, res.adapter_dir)
    (u1, dir1), (u2, dir2) = runs["b4"], runs["b2x2"]
    assert len(u1) == len(u2) == 4
    for step, (a, b) in enumerate(zip(u1, u2)):
        # relative to the whole update: fp32 summation order differs (a doubled or dropped term would be ~1)
        diff = sum(float((x - y).norm() ** 2) for x, y in zip(a, b)) ** 0.5
        norm = sum(float(x.norm() ** 2) for x in a) ** 0.5
        assert diff <= 2e-5 * norm, (step + 1, diff, norm)
    assert_same_adapter(dir1, dir2, rtol=1e-4, atol=1e-5)


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt("simulated interruption after step 5")


def test_resume_mid_phase_matches_uninterrupted_run(tmp_path, tiny_tok):
    """Phases A A F F F A A F (align 2, finetune 3); checkpoint after step 4 (0-based step 3, mid fine-tuning
    state, anchor taken at step 2), crash after step 5: the resumed run needs the saved anchor and cursor."""
    extra = ("train.max_steps=8", "train.save_steps=4", "defense.align_steps=2", "defense.finetune_steps=3",
             "lora.dropout=0.1", "defense.rho=5")
    straight = train(lisa_config(tmp_path, "straight", *extra), model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    with pytest.raises(KeyboardInterrupt):
        train(lisa_config(tmp_path, "cut", *extra), model=tiny_model(tiny_tok), tokenizer=tiny_tok,
              callbacks=[Crash()])
    ckpt = tmp_path / "cut" / "checkpoint-4"
    state = json.loads((ckpt / "defense_state.json").read_text())
    assert state["cursor"] == 2 * 4 and state["anchor_step"] == 2 and state["phase"] == "finetune"
    anchor = load_file(str(ckpt / ANCHOR_FILE))
    adapter = load_file(str(ckpt / "adapter_model.safetensors"))
    assert anchor.keys() and not all(  # the anchor is θ at step 2, not the checkpoint's θ at step 4
        torch.equal(anchor[k], adapter[k.replace(".default", "")]) for k in anchor)
    resumed = train(lisa_config(tmp_path, "cut", *extra, "train.resume=true"), model=tiny_model(tiny_tok),
                    tokenizer=tiny_tok)
    assert_same_adapter(straight.adapter_dir, resumed.adapter_dir, rtol=0, atol=1e-7)
    rows_a, rows_b = metric_rows(straight.run_dir), metric_rows(resumed.run_dir)
    assert [r["step"] for r in rows_b] == list(range(1, 9))
    for key in ("loss", "lisa_alignment", "lisa_prox", "lisa_drift"):
        assert [r[key] for r in rows_a] == pytest.approx([r[key] for r in rows_b], rel=1e-6, abs=1e-9), key


def test_resume_without_the_anchor_file_is_refused(tmp_path, tiny_tok):
    defense = Lisa(LisaArgs(align_steps=0))
    trainer = fake_trainer(add_lora(tiny_model(tiny_tok), LoraArgs(r=2), seed=0), tiny_tok)
    trainer.defense = defense
    defense.setup(trainer)
    with pytest.raises(ConfigError, match="anchor"):
        defense.load_tensors(tmp_path)
