"""SPARD defense: the projection math, selection, resume, and the safety effect on a tiny aligned model."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from transformers import TrainerCallback

from spard.config import load_config
from spard.data.chat import collate, tokenize_records
from spard.data.records import Record
from spard.data.safety import cyclic_indices
from spard.data.sources import load_source
from spard.defenses.spard import SpardArgs
from spard.errors import ConfigError
from spard.jobs.finetune import train
from spard.projection import (
    clip_by_global_norm,
    global_grad_norm,
    halfspace_step_size,
    reference_scale,
    reference_scaled_grads,
    safety_projection,
    token_cross_entropy_sum,
)
from spard.testing import assert_same_adapter, tiny_model


def rand_grads(seed: int, shapes=((4, 3), (7,), (2, 5)), dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return float(sum((x.double() * y.double()).sum() for x, y in zip(a, b)))


def norm(a: list[torch.Tensor]) -> float:
    return math.sqrt(dot(a, a))


# --- the half-space projection ------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_projection_puts_linearised_loss_exactly_at_tau(seed: int) -> None:
    grads, loss, tau = rand_grads(seed), 1.7 + seed, 0.2
    delta = safety_projection(grads, loss, tau)
    assert [d.shape for d in delta] == [g.shape for g in grads]
    assert loss + dot(grads, delta) == pytest.approx(tau, abs=1e-5)
    # the minimum-norm such step: anti-parallel to g, norm (loss - tau) / ||g||
    assert norm(delta) == pytest.approx((loss - tau) / norm(grads), rel=1e-5)
    assert dot(grads, delta) == pytest.approx(-norm(grads) * norm(delta), rel=1e-5)


def test_projection_respects_max_step() -> None:
    grads, loss, tau = rand_grads(0), 5.0, 0.2
    uncapped = norm(safety_projection(grads, loss, tau))
    capped = safety_projection(grads, loss, tau, max_step=uncapped / 4)
    assert norm(capped) == pytest.approx(uncapped / 4, rel=1e-5)  # the cap binds: ||delta|| == max_step
    assert loss + dot(grads, capped) > tau  # and the step stops short of tau
    loose = safety_projection(grads, loss, tau, max_step=uncapped * 2)  # a cap that does not bind changes nothing
    assert loss + dot(grads, loose) == pytest.approx(tau, abs=1e-5)


@pytest.mark.parametrize("loss", [0.2, 0.1, -1.0])
def test_projection_is_zero_when_feasible(loss: float) -> None:
    grads = rand_grads(1)
    delta = safety_projection(grads, loss, 0.2)
    assert all(torch.count_nonzero(d) == 0 for d in delta)


def test_projection_zero_gradient_and_non_finite() -> None:
    zeros = [torch.zeros(3, 2), torch.zeros(4)]
    delta = safety_projection(zeros, 3.0, 0.2, max_step=1.0)
    assert all(torch.equal(d, torch.zeros_like(d)) and torch.isfinite(d).all() for d in delta)
    assert halfspace_step_size(float("nan"), 0.2, 1.0) == 0.0
    assert halfspace_step_size(3.0, 0.2, float("inf")) == 0.0
    assert safety_projection([], 3.0, 0.2) == []


def test_projection_keeps_dtype_and_norms_in_fp32() -> None:
    # 4096 bf16 values of 1/64: a bf16 running sum of squares stalls (1 + 2^-12 rounds back to 1), fp32 does not
    grads = [torch.full((4096,), 1 / 64, dtype=torch.bfloat16)]
    assert global_grad_norm(grads) == pytest.approx(1.0, rel=1e-6)
    delta = safety_projection(grads, 1.2, 0.2)
    assert delta[0].dtype == torch.bfloat16
    assert float(delta[0][0]) == pytest.approx(-(1.0 / 1.0) * (1 / 64), rel=1e-2)


# --- the reference rule -------------------------------------------------------------------------------------


def test_reference_scaling_matches_hand_computation() -> None:
    # ||g1|| = 5 (3-4-5), ||g2|| = 0.5; loss - tau = 2
    g1, g2 = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])
    out = reference_scaled_grads([g1, g2], loss=2.2, tau=0.2, alpha_max=1.0)
    # g1: alpha = min(2 / (5 + 1e-8), 1) = 0.4 -> [1.2, 1.6]; g2: min(2 / 0.5, 1) = 1 (capped) -> unchanged
    torch.testing.assert_close(out[0], torch.tensor([1.2, 1.6]), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[1], g2, rtol=0, atol=0)
    assert reference_scale(5.0, 2.2, 0.2, alpha_max=10.0) == pytest.approx(2 / (5 + 1e-8), rel=1e-12)
    assert reference_scale(0.0, 2.2, 0.2, alpha_max=3.0) == 3.0  # eps guards a zero gradient; the cap binds


def test_clip_by_global_norm() -> None:
    grads = [torch.tensor([3.0]), torch.tensor([4.0])]
    clipped, before = clip_by_global_norm(grads, 1.0)
    assert before == pytest.approx(5.0)
    assert norm(clipped) == pytest.approx(1.0, rel=1e-5)
    same, _ = clip_by_global_norm(grads, 10.0)
    assert all(torch.equal(a, b) for a, b in zip(same, grads))
    unclipped, _ = clip_by_global_norm(grads, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(unclipped, grads))


# --- small pure helpers -------------------------------------------------------------------------------------


def test_cyclic_indices_is_a_reshuffled_endless_stream() -> None:
    stream = cyclic_indices(0, 15, 5, seed=3)
    for p in range(3):  # every pass is a permutation
        assert sorted(stream[5 * p : 5 * p + 5]) == list(range(5))
    assert stream[:5] != stream[5:10] or stream[5:10] != stream[10:15]  # reshuffled between passes
    # any window is the same slice of the same stream: one cursor is enough to resume
    assert cyclic_indices(7, 6, 5, seed=3) == stream[7:13]
    assert cyclic_indices(0, 15, 5, seed=3) == stream
    with pytest.raises(ValueError):
        cyclic_indices(0, 1, 0, seed=0)


def test_token_cross_entropy_sum_matches_mean_loss() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, -100, -100, -100]])
    total, count = token_cross_entropy_sum(logits, labels)
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert int(count) == 5
    assert float(total / count) == pytest.approx(float(expected), rel=1e-6)


# --- config -------------------------------------------------------------------------------------------------


def test_config_defaults_and_validation() -> None:
    cfg = load_config(None, ["defense.name=spard"])
    a = cfg.defense
    assert isinstance(a, SpardArgs)
    assert (a.selection, a.safety_fraction, a.safety_k, a.beta, a.embedder) == ("dpp", 0.03, None, 4.0, "base")
    assert (a.tau, a.delta, a.projection, a.max_step, a.alpha_max) == (0.2, 0.1, "reference", 0.25, 1.0)
    assert (a.safety_micro_batches, a.safety_dropout, a.dropout_on, a.micro_batches(4)) == (None, None, True, 4)
    hs = load_config(None, ["defense.name=spard", "defense.projection=halfspace"]).defense
    assert (hs.dropout_on, hs.micro_batches(4)) == (False, 1)
    for bad, match in [("defense.projection=adam", "defense.projection"), ("defense.tau=-1", "defense.tau"),
                       ("defense.max_step=0", "defense.max_step"), ("defense.selection=greedy", "defense.selection"),
                       ("defense.safety_k=0", "defense.safety_k"), ("defense.safety_batch_size=0", "batch_size"),
                       ("defense.safety_micro_batches=0", "defense.safety_micro_batches"),
                       ("defense.safety_max_length=4", "defense.safety_max_length")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["defense.name=spard", bad])


# --- end-to-end on the tiny model ---------------------------------------------------------------------------


def tiny_config(tmp_path, name, *extra):
    return load_config(None, [
        f"train.output_dir={tmp_path / name}", "align.enabled=false", "data.n_train=16", "data.max_length=128",
        "train.batch_size=4", "train.max_steps=5", "train.lr=5e-2", "train.save_steps=3", "lora.r=4",
        "attack.harmful_ratio=0.25", "defense.name=spard", "defense.max_step=1.0", *extra,
    ])


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_selection_is_deterministic_cached_and_excludes_attack_prompts(tmp_path, tiny_tok) -> None:
    # a local pool holding every BeaverTails prompt (with a refusal) plus 30 ordinary refusals
    pool = [{"prompt": r.prompt, "response": "Sorry, I cannot help with that."} for r in load_source("beavertails")]
    pool += [{"prompt": r.prompt, "response": r.response} for r in load_source("safety")[:30]]
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("".join(json.dumps(p) + "\n" for p in pool))
    extra = ("train.max_steps=1", "defense.safety_source=local", f"defense.safety_path={pool_file}",
             "defense.safety_k=5")
    a = train(tiny_config(tmp_path, "a", *extra), model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    b = train(tiny_config(tmp_path, "b", *extra), model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    subset_a = rows(a.run_dir / "safety_subset.jsonl")
    assert subset_a == rows(b.run_dir / "safety_subset.jsonl")
    assert [r["rank"] for r in subset_a] == list(range(len(subset_a))) and 1 <= len(subset_a) <= 5
    attack = set(json.loads((a.run_dir / "attack_prompts.json").read_text()))
    assert len(attack) == 4
    stats = json.loads((a.run_dir / "safety_subset_stats.json").read_text())
    assert stats["pool_size"] == len(pool) - 4 and stats["k_requested"] == 5
    assert not attack & {r["messages"][0]["content"] for r in subset_a}
    # the training set is untouched: SPARD keeps safety data out of the utility loss
    assert sum(r["kind"] == "safety" for r in rows(a.run_dir / "train_set.jsonl")) == 0
    # the run dir caches the task prompts' embeddings; the pool's are in the shared spard cache, once for a and b
    assert len(list((a.run_dir / "cache" / "embeddings").glob("emb-*.safetensors"))) == 1
    from spard.models import cache_dir

    assert len(list((cache_dir() / "embeddings").glob("emb-*.safetensors"))) == 1
    # another seed, another random subset; dpp ignores the seed
    c = train(tiny_config(tmp_path, "c", *extra, "defense.selection=random", "train.seed=1"),
              model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    d = train(tiny_config(tmp_path, "d", *extra, "defense.selection=random", "train.seed=2"),
              model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    assert rows(c.run_dir / "safety_subset.jsonl") != rows(d.run_dir / "safety_subset.jsonl")


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise KeyboardInterrupt("simulated interruption after step 4")


@pytest.mark.parametrize("projection", ["halfspace", "reference"])
def test_resume_matches_uninterrupted_run(tmp_path, tiny_tok, projection) -> None:
    extra = ("train.max_steps=6", "lora.dropout=0.1", f"defense.projection={projection}", "defense.safety_k=3",
             "defense.safety_batch_size=2")
    straight = train(tiny_config(tmp_path, "straight", *extra), model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(tmp_path, "cut", *extra), model=tiny_model(tiny_tok), tokenizer=tiny_tok, callbacks=[Crash()])
    state = json.loads((tmp_path / "cut" / "checkpoint-3" / "defense_state.json").read_text())
    assert state["cursor"] == 3 * 2 and state["steps"] == 3  # 3 steps x safety_batch_size 2
    resumed = train(tiny_config(tmp_path, "cut", *extra, "train.resume=true"),
                    model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    assert_same_adapter(straight.adapter_dir, resumed.adapter_dir, rtol=0, atol=1e-7)
    ra, rb = rows(straight.run_dir / "metrics.jsonl"), rows(resumed.run_dir / "metrics.jsonl")
    assert [r["step"] for r in rb] == [1, 2, 3, 4, 5, 6]
    assert [r["safety_loss"] for r in ra] == pytest.approx([r["safety_loss"] for r in rb], abs=1e-6)
    # the random tiny model is far from safe: every step projects
    assert [r["safety_projections"] for r in rb] == [1, 2, 3, 4, 5, 6]
    assert all(r["safety_step_norm"] > 0 for r in rb)
    if projection == "halfspace":
        assert all(r["safety_step_norm"] <= 1.0 + 1e-6 for r in rb)  # max_step=1.0


def safety_loss(model: torch.nn.Module, tokenizer, records: list[Record], max_length: int = 64) -> float:
    """Mean assistant-token cross-entropy of ``records`` (what SPARD calls L_s), dropout off."""
    features, _ = tokenize_records(tokenizer, records, max_length)
    batch = collate(features, tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        total, count = token_cross_entropy_sum(out.logits, batch["labels"])
    model.train(was_training)
    return float(total / count)


def test_spard_holds_safety_loss_near_tau_while_sft_drifts(tmp_path, tiny_tok) -> None:
    # "Align" the tiny model: fit 4 refusals (full fine-tune) so their loss starts far below tau.
    refusals = load_source("safety")[:4]
    pool_file = tmp_path / "refusals.jsonl"
    pool_file.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.response}) + "\n" for r in refusals))
    aligned = tiny_model(tiny_tok)
    batch = collate(tokenize_records(tiny_tok, refusals, 64)[0], tiny_tok.pad_token_id)
    opt = torch.optim.Adam(aligned.parameters(), lr=1e-2)
    for _ in range(100):
        aligned(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    start = safety_loss(aligned, tiny_tok, refusals)
    assert start < 0.05

    # Then fine-tune on nothing but harmful QA pairs, with and without SPARD.
    common = ["align.enabled=false", "data.n_train=16", "data.max_length=64", "train.batch_size=8",
              "train.max_steps=15", "train.lr=5e-3", "lora.r=4", "lora.dropout=0", "attack.harmful_ratio=1.0"]
    spard_opts = ["defense.name=spard", "defense.safety_source=local", f"defense.safety_path={pool_file}",
                  "defense.safety_k=4", "defense.selection=random", "defense.safety_batch_size=4",
                  "defense.projection=halfspace", "defense.max_step=null"]  # the assertions: landing at tau
    final = {}
    for name, opts in [("sft", ["defense.name=sft"]), ("spard", spard_opts)]:
        model = copy.deepcopy(aligned)  # train() adds the LoRA adapter in place: `model` ends up fine-tuned
        cfg = load_config(None, [f"train.output_dir={tmp_path / name}", *common, *opts])
        train(cfg, model=model, tokenizer=tiny_tok)
        final[name] = safety_loss(model, tiny_tok, refusals)
    subset = [Record.from_dict(r) for r in rows(tmp_path / "spard" / "safety_subset.jsonl")]
    assert {r.prompt for r in subset} == {r.prompt for r in refusals}

    log = rows(tmp_path / "spard" / "metrics.jsonl")
    losses = [r["safety_loss"] for r in log]
    fired = [r["safety_projected"] for r in log]
    assert log[-1]["safety_projections"] == sum(fired) >= 5, losses
    # the trigger is tau + delta = 0.3: steps at or below it do not project, steps above it do
    assert all((loss > 0.3) == bool(f) for loss, f in zip(losses, fired)), (losses, fired)
    # Plain SFT wrecks the refusals (8e-3 -> ~3.9). SPARD keeps L_s within a few tenths of tau = 0.2: each
    # projection lands near tau (first order; the curvature leaves it a little above), the next utility step
    # pushes it up again (~0.4-0.8 before projection), and the run ends at ~0.43 (numbers of torch 2.13 CPU).
    assert final["sft"] > 2.5, final
    assert final["spard"] < 0.7, final
    assert max(losses) < 1.2 and sum(losses) / len(losses) < 0.7, losses
    assert final["sft"] > 4 * final["spard"], final
