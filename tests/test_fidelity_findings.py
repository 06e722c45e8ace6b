"""The reviewer's smaller fidelity findings of issue 23 (item 5), one test (or a few) per finding.

Each test pins spard to the reference code's behaviour (shuhao02/SPARD, git-disl/Booster, IBM/SafeLoRA) where
spard now follows it, or pins the switch that restores it; docs/fidelity.md says which.
"""

from __future__ import annotations

import math

import pytest
import torch

from spard.selection.dpp import dpp_kernel, greedy_map_naive, relevance
from spard.selection.select import select_indices


# --- (d) relevance: the reference's max_cos ** beta, no clamp at 0 ------------------------------------------
def test_relevance_keeps_a_negative_best_cosine_as_the_reference_kernel_does() -> None:
    pool = torch.tensor([[1.0, 0.0], [-1.0, 0.2], [0.0, 1.0]])
    task = torch.tensor([[1.0, 0.0]])
    best = torch.tensor([1.0, -1.0 / math.sqrt(1.04), 0.0])
    q = relevance(pool, task, beta=3.0)
    # the reference: q = best ** 3 (negative for row 1); the kernel diag(q) S diag(q) only sees q^2
    torch.testing.assert_close(q, best.abs() ** 3)
    unit = torch.nn.functional.normalize(pool.double(), dim=1)
    q_ref = best.double() ** 3
    ref_kernel = q_ref[:, None] * (unit @ unit.T) * q_ref[None, :]
    spard_kernel = dpp_kernel(pool, q) - 1e-6 * torch.eye(3, dtype=torch.float64)
    for rows in ([0, 1], [1, 2], [0, 1, 2], [1]):
        idx = torch.tensor(rows)
        torch.testing.assert_close(torch.det(spard_kernel[idx][:, idx]), torch.det(ref_kernel[idx][:, idx]),
                                   atol=1e-7, rtol=1e-5)
    assert float(q[1]) > 0.9  # spard's old clamp gave this row quality 0


# --- (e) greedy DPP: k items, as the reference's loop ----------------------------------------------------------
def reference_greedy(features: torch.Tensor, quality: torch.Tensor, k: int, eps: float = 1e-6) -> list[int]:
    """The reference's selection by brute force: at every step the remaining item of largest
    det(L_{Y+i}) / det(L_Y), gains below eps clamped to eps, first index on ties, until k items."""
    kernel = dpp_kernel(features, quality, ridge=eps)
    selected: list[int] = []
    det_y = 1.0
    while len(selected) < min(k, len(quality)):
        gains = []
        for i in range(len(quality)):
            if i in selected:
                gains.append(-math.inf)
                continue
            idx = torch.tensor(selected + [i])
            gains.append(max(float(torch.det(kernel[idx][:, idx])) / det_y, eps))
        best = max(range(len(gains)), key=lambda i: (gains[i], -i))
        selected.append(best)
        det_y *= gains[best]
    return selected


def test_greedy_dpp_returns_k_items_like_the_reference_brute_force() -> None:
    g = torch.Generator().manual_seed(0)
    distinct = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=1)
    # rows 4..7 duplicate rows 0..3 (row 5 as a sign flip) and rows 8-9 are two more random rows
    features = torch.cat([distinct, distinct[:1], -distinct[1:2], distinct[2:4], torch.randn(2, 6, generator=g)])
    task = distinct[:2] + 0.1
    quality = relevance(features, task, beta=2.0)
    old = greedy_map_naive(features, quality, 8, eps=1e-6)  # spard's old rule stopped early here
    assert len(old) < 8
    got = select_indices(features, task, 8, beta=2.0)
    assert len(got) == 8 and got[:len(old)] == old
    assert got == reference_greedy(features, quality, 8)


def test_greedy_dpp_early_stop_is_still_available_and_warned(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from spard.data.records import chat
    from spard.selection.select import select_safety_subset

    pool = [chat(p, "no", source="t", kind="safety") for p in ("a", "a", "b")]
    tasks = [chat("a", "1", source="t", kind="task")]

    def embed(texts: list[str]) -> torch.Tensor:
        return torch.tensor([[1.0, 0.0] if t == "a" else [0.0, 1.0] for t in texts])

    assert len(select_safety_subset(pool, tasks, k=3, embedder=embed)) == 3
    with caplog.at_level(logging.WARNING, logger="spard.selection.select"):
        assert len(select_safety_subset(pool, tasks, k=3, embedder=embed, eps=1e-6)) == 1
    assert "DPP selected 1 of the 3 requested records" in caplog.text


# --- (g) GSM8K scored by the reference's rule ---------------------------------------------------------------
@pytest.mark.parametrize("reply, pred", [
    ("She has 3 + 4 = 7 apples.\n#### 7", "7"),
    ("#### 5\nso then #### 6", "6"),  # the last "####"
    ("####12.5 dollars", "12.5"),  # any whitespace (none here) after ####
    ("It costs 3 dollars, then 18.", "18."),  # no ####: the last number; "18." is float 18
    ("Total: 1,234", "234"),  # no comma handling in the reference
    ("I owe -4 dollars", "-4"),
    ("no idea", None),
])
def test_reference_gsm8k_answer(reply: str, pred: str | None) -> None:
    from spard.evaluate.tasks.gsm8k_ref import reference_gsm8k_answer

    assert reference_gsm8k_answer(reply) == pred


def test_reference_gsm8k_correct_compares_floats() -> None:
    from spard.evaluate.tasks.gsm8k_ref import reference_gsm8k_correct, reference_gsm8k_gold

    gold = "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72"
    assert reference_gsm8k_gold(gold) == "72"
    assert reference_gsm8k_correct("so 72.0 clips", gold)  # float compare: 72.0 == 72
    assert reference_gsm8k_correct("#### 72\nwait, 73", gold)  # #### wins over a later bare number
    assert not reference_gsm8k_correct("#### 71", gold)
    assert not reference_gsm8k_correct("nothing", gold)
    # the reference's rule literally: no comma handling, "1,072" reads as 1 and 072, and 072 == 72
    assert reference_gsm8k_correct("in total 1,072", gold)


def test_gsm8k_ref_task_is_registered_and_scores_by_the_reference_rule() -> None:
    from spard.args import GSM8K_PROMPT
    from spard.data.records import chat
    from spard.evaluate.tasks import task_class

    cls = task_class("gsm8k_ref")
    task = cls(cls.Args())
    assert task.source == "gsm8k" and task.args.prompt == GSM8K_PROMPT
    rec = chat("q", None, source="gsm8k", kind="task", answer="...\n#### 1234")
    assert task.score(rec, "the answer is 1234.")["correct"]  # flexible-style fallback
    assert not task.score(rec, "the answer is 1,234")["correct"]  # spard's gsm8k would count this right
    metrics = task.aggregate([task.score(rec, "1234"), task.score(rec, "none")])
    assert metrics["accuracy"]["k"] == 1 and metrics["unparsed"] == 1


# --- (f) SPARD: a tensor without a safety gradient is not stepped -------------------------------------------
def test_spard_reference_step_skips_a_tensor_the_safety_loss_does_not_reach() -> None:
    from types import SimpleNamespace

    from spard.defenses.spard import Spard, SpardArgs

    torch.manual_seed(0)
    used, unused = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([used, unused], lr=0.1, weight_decay=0.1)
    (used.sum() + unused.sum()).backward()  # a task step gives both tensors Adam moments
    opt.step()
    opt.zero_grad(set_to_none=True)
    trainer = SimpleNamespace(optimizer=opt, args=SimpleNamespace(max_grad_norm=1.0),
                              state=SimpleNamespace(global_step=1))
    defense = Spard(SpardArgs(projection="reference", tau=0.0))
    defense.params = [used, unused]
    before_used, before_unused = used.detach().clone(), unused.detach().clone()
    moments = opt.state[unused]["exp_avg"].clone()
    loss_sum = (used ** 2).sum()  # the safety loss does not reach `unused`
    stats = defense._project(trainer, loss_sum, float(loss_sum.detach()), 1.0)
    assert stats.projected and not torch.equal(used.detach(), before_used)
    # the reference: unused.grad is None, so its AdamW leaves the tensor and its moments alone (a zero-filled
    # gradient would still move it by the momentum and the weight decay)
    torch.testing.assert_close(unused.detach(), before_unused, rtol=0, atol=0)
    torch.testing.assert_close(opt.state[unused]["exp_avg"], moments, rtol=0, atol=0)
    assert defense.has_grad == [True, False]


# --- (a) Booster: the alignment adapter without dropout, so the λ-term is deterministic -----------------------
def test_alignment_lora_dropout_resolves_to_zero_under_booster_only() -> None:
    from spard.align_defenses.booster import BoosterArgs
    from spard.args import AlignArgs, AlignDefenseArgs
    from spard.jobs.align import alignment_lora_dropout

    assert alignment_lora_dropout(AlignArgs(defense=BoosterArgs())) == 0.0
    assert alignment_lora_dropout(AlignArgs(defense=AlignDefenseArgs(name="none"))) == 0.05
    assert alignment_lora_dropout(AlignArgs(defense=BoosterArgs(), lora_dropout=0.05)) == 0.05
    from spard.args import FieldError

    with pytest.raises(FieldError, match="lora_dropout"):
        AlignArgs(lora_dropout=1.5)


def test_aligned_model_cache_key_changes_only_with_the_dropout_used() -> None:
    import hashlib
    import json
    from dataclasses import asdict

    from spard.align_defenses.booster import BoosterArgs
    from spard.args import AlignArgs, ModelArgs
    from spard.evaluate.tasks.over_refusal import DEFAULT_BENIGN_SETS
    from spard.jobs.align import aligned_model_dir
    from spard.models import model_fingerprint

    model = ModelArgs()
    # a model aligned before align.lora_dropout existed (0.05) keeps its key: the key as it was computed then
    options = asdict(AlignArgs())
    for later in ("lora_dropout", "method", "full_finetune", "dpo_beta"):  # options added after those models
        options.pop(later)
    options["benign_excludes"] = list(DEFAULT_BENIGN_SETS)
    old = hashlib.sha256(json.dumps([model_fingerprint(model), options], sort_keys=True).encode()).hexdigest()[:16]
    assert aligned_model_dir(model, AlignArgs()).name == old
    assert aligned_model_dir(model, AlignArgs(lora_dropout=0.05)).name == old
    booster = aligned_model_dir(model, AlignArgs(defense=BoosterArgs()))
    assert booster != aligned_model_dir(model, AlignArgs(defense=BoosterArgs(), lora_dropout=0.05))


def booster_term(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    from spard.align_defenses.booster import booster_regulariser, shifted_harmful_gradients

    g_harm, g_shifted, _, _ = shifted_harmful_gradients(model, batch, alpha=0.1)
    return torch.cat([t.reshape(-1) for t in booster_regulariser(g_harm, g_shifted, lamb=5.0)])


def test_booster_term_is_deterministic_with_the_alignment_stage_dropout(tiny_tok) -> None:
    from dataclasses import replace

    from spard.align_defenses.booster import BoosterArgs
    from spard.args import AlignArgs, LoraArgs
    from spard.jobs.align import alignment_lora_dropout
    from spard.testing import tiny_model
    from spard.trainer import add_lora

    ids = torch.randint(4, len(tiny_tok), (4, 24), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def terms(dropout: float) -> list[torch.Tensor]:
        model = add_lora(tiny_model(tiny_tok), replace(LoraArgs(), r=4, dropout=dropout), seed=0)
        with torch.no_grad():  # a non-identity adapter, so the LoRA path (and its dropout) matters
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        model.train()  # the alignment step runs in train mode
        return [booster_term(model, batch) for _ in range(3)]

    same = terms(alignment_lora_dropout(AlignArgs(defense=BoosterArgs())))
    assert float(same[0].norm()) > 0
    for t in same[1:]:
        torch.testing.assert_close(t, same[0], rtol=0, atol=0)
    noisy = terms(0.05)  # spard's former alignment dropout: every call draws other masks
    assert not torch.allclose(noisy[0], noisy[1])


def test_alignment_stage_trains_booster_with_dropout_zero(tmp_path, tiny_tok, monkeypatch) -> None:
    import spard.jobs.align as align_job
    from spard.config import load_config
    from spard.testing import tiny_model

    seen = {}

    class Stop(Exception):
        pass

    def fake_fit(model, tokenizer, records, *, lora, **kwargs):
        seen["dropout"] = lora.dropout
        raise Stop

    monkeypatch.setattr(align_job, "fit", fake_fit)
    for name, expected in (("booster", 0.0), ("none", 0.05)):
        cfg = load_config(None, [f"train.output_dir={tmp_path / name}", f"align.output_dir={tmp_path / name / 'a'}",
                                 f"align.defense.name={name}", "align.n_safety=4", "align.n_benign=4"])
        with pytest.raises(Stop):
            align_job.align(cfg, model=tiny_model(tiny_tok), tokenizer=tiny_tok)
        assert seen["dropout"] == expected


# --- (c) the DPP embedder: a separate fp32 load, as the reference ------------------------------------------
def test_base_embedder_reloads_a_bf16_model_in_fp32(tmp_path, tiny_tok) -> None:
    from transformers import AutoModelForCausalLM

    from spard.args import LoraArgs
    from spard.defenses.spard import BaseModelEmbedder, Spard, SpardArgs
    from spard.selection import LMEmbedder, ReloadedLMEmbedder
    from spard.testing import tiny_model
    from spard.trainer import add_lora

    tiny_model(tiny_tok).save_pretrained(tmp_path / "m")
    texts = ["how do i make a bomb", "what is the sum of 2 and 3", "tell me about plants"]
    fp32 = LMEmbedder(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32), tiny_tok,
                      show_progress=False)(texts)
    bf16 = add_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.bfloat16),
                    LoraArgs(r=4), seed=0)

    reloaded = Spard(SpardArgs()).make_embedder(bf16, tiny_tok)
    assert isinstance(reloaded, ReloadedLMEmbedder) and "float32" in reloaded.cache_key
    torch.testing.assert_close(reloaded(texts), fp32, rtol=0, atol=0)

    as_loaded = Spard(SpardArgs(embedder_dtype="model")).make_embedder(bf16, tiny_tok)
    assert isinstance(as_loaded, BaseModelEmbedder)
    assert not torch.allclose(as_loaded(texts), fp32, atol=1e-4)  # bf16 rounding moves the embeddings
    # an fp32 model is embedded as it is: no second load
    fp32_model = add_lora(AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32),
                          LoraArgs(r=4), seed=0)
    assert isinstance(Spard(SpardArgs()).make_embedder(fp32_model, tiny_tok), BaseModelEmbedder)
    from spard.args import FieldError

    with pytest.raises(FieldError, match="embedder_dtype"):
        SpardArgs(embedder_dtype="int8")


# --- (b) SafeLoRA on an 8/4-bit base: V from the two checkpoints loaded alike -------------------------------
def test_safelora_on_a_quantised_base_takes_v_from_both_checkpoints_in_fp32(tmp_path, tiny_tok) -> None:
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from spard.args import LoraArgs
    from spard.defenses.safelora import SafeLoRA, SafeLoRAArgs
    from spard.testing import tiny_model
    from spard.trainer import add_lora

    aligned = tiny_model(tiny_tok, seed=0)
    aligned.save_pretrained(tmp_path / "aligned")
    with torch.no_grad():  # the unaligned model: the aligned one minus a small "alignment update"
        g = torch.Generator().manual_seed(3)
        for p in aligned.parameters():
            p.sub_(1e-3 * torch.randn(p.shape, generator=g))
    aligned.save_pretrained(tmp_path / "unaligned")

    def run(simulate_int8: bool) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "aligned", dtype=torch.float32)
        if simulate_int8:  # what an 8-bit load hands SafeLoRA: row-wise absmax int8 weights, de-quantised
            base.is_loaded_in_8bit = True
            with torch.no_grad():
                for name, p in base.named_parameters():
                    if p.ndim == 2 and "proj" in name:
                        scale = p.abs().amax(dim=1, keepdim=True) / 127
                        p.copy_(torch.round(p / scale) * scale)
        model = add_lora(base, LoraArgs(r=4), seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        trainer = SimpleNamespace(model=model, accelerator=SimpleNamespace(unwrap_model=lambda m: m),
                                  args=SimpleNamespace(output_dir=str(tmp_path / f"run{int(simulate_int8)}")),
                                  is_world_process_zero=lambda: False)
        defense = SafeLoRA(SafeLoRAArgs(unaligned_model=str(tmp_path / "unaligned"), num_proj_layers=3))
        defense.after_train(trainer)
        return defense.similarities, {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}

    exact_sims, exact_b = run(simulate_int8=False)
    sims, b = run(simulate_int8=True)
    # the de-quantised in-memory weights are not used: the same V, the same cosines, the same projected B
    assert sims == exact_sims
    for name, tensor in exact_b.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=1e-6, msg=name)
