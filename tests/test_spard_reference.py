"""SPARD ``projection: reference`` against an independent re-computation of the reference code's loop.

The reference (github shuhao02/SPARD, ``utils/SPAGOptimizerTrainer.py``) runs, per update: the utility step
(token-mean CE over grad_accum micro-batches, global clip, AdamW step), then the safety check (grad_accum x
safety_batch_size safety examples, token-mean L_s in train mode, global clip of the safety gradient, fire
when L_s > tau + delta, per-tensor factor min((L_s - tau) / (||g_p|| + 1e-8), alpha_max), a step of the SAME
AdamW), then one LR-scheduler step. The test below re-does that arithmetic with plain torch on the very
batches the run used and compares the adapters after three updates.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import TrainerCallback

from spard.config import load_config
from spard.defenses.spard import Spard
from spard.jobs.finetune import train
from spard.testing import tiny_model

LR, WD, MAX_NORM, TAU, DELTA, ALPHA_MAX, STEPS, ACCUM = 2e-2, 0.1, 0.5, 0.0, 0.1, 30.0, 3, 2


class Snapshot(TrainerCallback):
    """Copies of the model before the first step and the trained LoRA tensors at the end."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.start = copy.deepcopy(model)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.final = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def config(tmp_path, *extra):
    # a small local safety pool keeps the selection's embedding pass short
    from spard.data.sources import load_source

    pool = tmp_path / "pool.jsonl"
    pool.parent.mkdir(parents=True, exist_ok=True)
    pool.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n"
                            for r in load_source("safety")[:12]))
    return load_config(None, [
        f"train.output_dir={tmp_path / 'run'}", "align.enabled=false", "data.n_train=12", "data.max_length=128",
        "defense.safety_source=local", f"defense.safety_path={pool}",
        "train.batch_size=2", f"train.grad_accum={ACCUM}", f"train.max_steps={STEPS}", f"train.lr={LR}",
        "train.lr_scheduler=linear", f"train.weight_decay={WD}", f"train.max_grad_norm={MAX_NORM}", "lora.r=4",
        "lora.dropout=0", "attack.harmful_ratio=0.25", "defense.name=spard", "defense.selection=random",
        "defense.safety_k=5", f"defense.tau={TAU}", f"defense.delta={DELTA}", f"defense.alpha_max={ALPHA_MAX}",
        *extra,
    ])


def token_mean_backward(model, batches) -> float:
    """Back-propagate sum CE / (label tokens of all batches), as HF with num_items_in_batch; return the mean."""
    n = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    total = 0.0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                               b["labels"][:, 1:].reshape(-1), ignore_index=-100, reduction="sum")
        (ce / n).backward()
        total += float(ce.detach())
    return total / n


def test_reference_rule_matches_an_independent_recomputation(tmp_path, tiny_tok, monkeypatch) -> None:
    task_batches, safety_batches = [], []
    loss_hook, next_batch = Spard.loss, Spard.next_batch

    def record_loss(self, trainer, model, inputs, loss, outputs):
        task_batches.append({k: v.detach().clone() for k, v in inputs.items()})
        return loss_hook(self, trainer, model, inputs, loss, outputs)

    def record_batch(self, trainer):
        batch = next_batch(self, trainer)
        safety_batches.append({k: v.clone() for k, v in batch.items()})
        return batch

    monkeypatch.setattr(Spard, "loss", record_loss)
    monkeypatch.setattr(Spard, "next_batch", record_batch)
    snap = Snapshot()
    train(config(tmp_path), model=tiny_model(tiny_tok), tokenizer=tiny_tok, callbacks=[snap])
    assert len(task_batches) == STEPS * ACCUM
    assert len(safety_batches) == STEPS * ACCUM  # grad_accum micro-batches of safety_batch_size 1 per check
    assert all(b["input_ids"].shape[0] == 1 for b in safety_batches)

    # --- the reference loop, re-done with plain torch --------------------------------------------------------
    model = snap.start
    model.train()  # the reference's safety forward runs in train mode (dropout is 0 here so the test is exact)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    init = {n: p.detach().clone() for n, p in named}
    # fused: the kernel of transformers' default optimizer (adamw_torch_fused); the for-each kernel rounds
    # differently and drifts ~3e-6 from it over these 6 steps.
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=WD, fused=True)
    capped = uncapped = 0
    for t in range(STEPS):
        for group in opt.param_groups:  # linear decay, no warm-up, one scheduler step per (utility, safety) round
            group["lr"] = LR * (STEPS - t) / STEPS
        token_mean_backward(model, task_batches[t * ACCUM:(t + 1) * ACCUM])
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_s = token_mean_backward(model, safety_batches[t * ACCUM:(t + 1) * ACCUM])
        torch.nn.utils.clip_grad_norm_(params, MAX_NORM)  # the global clip comes first
        assert loss_s > TAU + DELTA  # a random tiny model is far from safe: every check fires
        for p in params:
            alpha = (loss_s - TAU) / (torch.norm(p.grad) + 1e-8)
            capped, uncapped = capped + int(alpha >= ALPHA_MAX), uncapped + int(alpha < ALPHA_MAX)
            p.grad.mul_(min(float(alpha), ALPHA_MAX))
        opt.step()  # the same AdamW: shared moments, step count, weight decay
        opt.zero_grad(set_to_none=True)
    assert capped and uncapped  # both branches of min(., alpha_max) were exercised

    assert set(snap.final) == {n for n, _ in named}
    for name, p in named:
        torch.testing.assert_close(snap.final[name], p.detach(), rtol=0, atol=1e-6, msg=name)
    moved = max(float((snap.final[n] - q).abs().max()) for n, q in init.items())
    assert moved > 1e-3  # the adapter did change (the comparison is not between two untouched inits)


def test_reference_safety_forward_runs_in_train_mode_and_halfspace_in_eval_mode(tmp_path, tiny_tok,
                                                                               monkeypatch) -> None:
    seen: dict[str, list[bool]] = {}
    loss_sum = Spard._loss_sum

    def record_mode(self, model, batch):
        seen.setdefault(self.args.projection, []).append(model.training)
        return loss_sum(self, model, batch)

    monkeypatch.setattr(Spard, "_loss_sum", record_mode)
    for projection in ("reference", "halfspace"):
        train(config(tmp_path / projection, "lora.dropout=0.1", f"defense.projection={projection}",
                     "train.max_steps=2"), model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    assert seen["reference"] == [True] * (2 * ACCUM)  # grad_accum micro-batches per check, dropout on
    assert seen["halfspace"] == [False] * 2  # one micro-batch per check, dropout off


@pytest.mark.parametrize("extra,expected", [((), [True, True]), (("defense.safety_dropout=false",), [False, False])])
def test_safety_dropout_switch(tmp_path, tiny_tok, monkeypatch, extra, expected) -> None:
    seen: list[bool] = []
    loss_sum = Spard._loss_sum

    def record_mode(self, model, batch):
        seen.append(model.training)
        return loss_sum(self, model, batch)

    monkeypatch.setattr(Spard, "_loss_sum", record_mode)
    train(config(tmp_path, "train.max_steps=1", *extra), model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    assert seen == expected
