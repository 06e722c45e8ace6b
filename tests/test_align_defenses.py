"""Alignment-stage defenses (Vaccine, Booster, RepNoise): their math against independent computations on
the tiny model, their config and cache key, the disjointness of their harmful data, and one real
alignment run each."""

from __future__ import annotations

import contextlib
import copy
import json
import math
from dataclasses import asdict
from types import SimpleNamespace

import pytest
import torch

from spard.align_defenses.base import harmful_alignment_pool, layer_modules
from spard.align_defenses.booster import Booster, BoosterArgs
from spard.align_defenses.repnoise import RepNoise, RepNoiseArgs, mmd_rbf, noise_mmd
from spard.align_defenses.vaccine import Vaccine, VaccineArgs, vaccine_perturbation
from spard.args import LoraArgs
from spard.config import field_docs, load_config
from spard.data.build import normalise_prompt, sample
from spard.data.chat import collate, tokenize_records
from spard.data.sources import SOURCES, load_source
from spard.errors import ConfigError, DataError
from spard.jobs.align import align, aligned_model_dir, check_alignment_data_disjoint
from spard.registry import ALIGN_DEFENSES
from spard.testing import TINY_RUN_OVERRIDES, save_tiny_chat_model, tiny_model
from spard.trainer import add_lora


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def lora_model(tok, seed=0):
    """A tiny Llama with a LoRA adapter whose B matrices are non-zero (so the adapter matters), no dropout."""
    model = add_lora(tiny_model(tok, seed=seed), LoraArgs(r=4, alpha=8, dropout=0.0,
                                                          target_modules=["q_proj", "v_proj", "o_proj"]), seed=0)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model


def batch_of(tok, source, n, seed=0, max_length=48, kind=None):
    records = sample(load_source(source, kind=kind), n, seed)
    features, _ = tokenize_records(tok, records, max_length)
    return collate(features, tok.pad_token_id)


class FakeTrainer:
    """The parts of a transformers.Trainer the defenses' hooks use, with a plain forward as compute_loss."""

    def __init__(self, model, defense, tok, batch_size=4):
        self.model, self.defense, self.processing_class = model, defense, tok
        self.args = SimpleNamespace(world_size=1, device="cpu", per_device_train_batch_size=batch_size, seed=0)
        self.state = SimpleNamespace(global_step=0)
        self.accelerator = SimpleNamespace(autocast=contextlib.nullcontext)

    def compute_loss(self, model, inputs, num_items_in_batch=None):
        loss = model(**inputs).loss
        return self.defense.loss(self, model, inputs, loss, None)


def param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------------------
# config, registry, cache key
# ---------------------------------------------------------------------------------------------------------
def test_registry_config_docs_and_validation():
    assert ALIGN_DEFENSES.names() == ["booster", "none", "repnoise", "vaccine"]
    assert load_config(None).align.defense.name == "none"
    cfg = load_config("configs/quickstart.yaml", ["align.defense=booster", "align.defense.lamb=2"])
    assert isinstance(cfg.align.defense, BoosterArgs) and cfg.align.defense.lamb == 2.0
    for cls in (VaccineArgs, BoosterArgs, RepNoiseArgs):
        docs = field_docs(cls)
        missing = [f for f in asdict(cls()) if not docs.get(f)]
        assert not missing, (cls.__name__, missing)
    for override, key in [("align.defense.rho=-1", "align.defense.rho"),
                          ("align.defense.n_harmful=0", "align.defense.n_harmful"),
                          ("align.defense.harmful_source=beavertalis", "align.defense.harmful_source")]:
        name = "vaccine" if "rho" in override else "repnoise"
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"align.defense={name}", override])
    with pytest.raises(ConfigError, match="did you mean 'vaccine'"):
        load_config(None, ["align.defense=vacine"])


def test_cache_key_holds_the_defense_and_its_options():
    plain = load_config(None)
    dirs = {
        "plain": aligned_model_dir(plain.model, plain.align),
        "vaccine": aligned_model_dir(plain.model, load_config(None, ["align.defense=vaccine"]).align),
        "vaccine5": aligned_model_dir(plain.model, load_config(None, ["align.defense=vaccine",
                                                                      "align.defense.rho=5"]).align),
        "booster": aligned_model_dir(plain.model, load_config(None, ["align.defense=booster"]).align),
        "repnoise": aligned_model_dir(plain.model, load_config(None, ["align.defense=repnoise"]).align),
    }
    assert len(set(dirs.values())) == len(dirs), dirs
    assert aligned_model_dir(plain.model, load_config(None, ["align.defense=none"]).align) == dirs["plain"]


# ---------------------------------------------------------------------------------------------------------
# Vaccine
# ---------------------------------------------------------------------------------------------------------
def test_vaccine_perturbation_has_norm_rho_and_the_gradient_direction():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(2, 5, 8, generator=gen) * s for s in (0.01, 3.0, 0.5)]
    eps = vaccine_perturbation(grads, rho=2.0)
    flat_g, flat_e = torch.cat([g.flatten() for g in grads]), torch.cat([e.flatten() for e in eps])
    assert math.isclose(float(flat_e.norm()), 2.0, rel_tol=1e-6)
    assert float(torch.nn.functional.cosine_similarity(flat_g, flat_e, dim=0)) > 1 - 1e-6
    # one joint norm, not one per layer: each layer keeps its share of the gradient
    ratios = [float(e.norm() / g.norm()) for e, g in zip(eps, grads)]
    assert max(ratios) - min(ratios) < 1e-6 and ratios[0] == pytest.approx(2.0 / float(flat_g.norm()), rel=1e-6)
    assert all(float(e.norm()) == 0 for e in vaccine_perturbation([torch.zeros(3)], 2.0))  # no NaN at g = 0


def _attention_gradients(model, batch):
    """dL/d(attention output) of every layer, taken by adding a zero leaf to each output (no spard code)."""
    layers = model.base_model.model.model.layers
    zeros = []

    def add_leaf(module, inputs, output):
        z = torch.zeros_like(output[0], requires_grad=True)
        zeros.append(z)
        return (output[0] + z, *output[1:])

    handles = [layer.self_attn.register_forward_hook(add_leaf) for layer in layers]
    loss = model(**batch).loss
    for h in handles:
        h.remove()
    return list(torch.autograd.grad(loss, zeros))


def _grads_with_shift(model, batch, shifts):
    layers = model.base_model.model.model.layers
    handles = [layer.self_attn.register_forward_hook(lambda m, i, o, s=s: (o[0] + s, *o[1:]))
               for layer, s in zip(layers, shifts)]
    model.zero_grad()
    model(**batch).loss.backward()
    for h in handles:
        h.remove()
    return param_grads(model)


@pytest.mark.parametrize("rho", [0.0, 2.0])
def test_vaccine_gradient_is_the_perturbed_pass_gradient(tiny_tok, rho):
    model = lora_model(tiny_tok)
    batch = batch_of(tiny_tok, "safety", 4, kind="safety")
    defense = Vaccine(VaccineArgs(rho=rho))
    trainer = FakeTrainer(model, defense, tiny_tok)
    defense.setup(trainer)
    model.zero_grad()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = param_grads(model)
    defense.after_train(trainer)
    assert not any(m._forward_hooks for m in layer_modules(model, "self_attn"))  # hooks removed

    # independent: activation gradients through zero leaves, eps by hand, a shifted pass, its gradients
    g = _attention_gradients(model, batch)
    total = math.sqrt(sum(float((x.double() ** 2).sum()) for x in g))
    eps = [x * rho / (total + 1e-7) for x in g]
    assert math.isclose(math.sqrt(sum(float((e.double() ** 2).sum()) for e in eps)), rho, rel_tol=1e-5)
    expected = _grads_with_shift(model, batch, eps)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)
    plain = _grads_with_shift(model, batch, [torch.zeros_like(e) for e in eps])
    differs = any(not torch.allclose(plain[n], expected[n], atol=1e-6) for n in plain)
    assert differs == (rho > 0)  # the perturbation changes the step, and rho = 0 is plain SFT
    assert defense.last["vaccine_act_grad_norm"] == pytest.approx(total, rel=1e-5)
    assert defense.last["vaccine_loss_perturbed"] >= defense.last["vaccine_loss_clean"] - 1e-6  # an ascent step


# ---------------------------------------------------------------------------------------------------------
# Booster
# ---------------------------------------------------------------------------------------------------------
def test_booster_gradient_equals_the_formula_with_explicit_parameter_copies(tiny_tok):
    lamb, alpha = 5.0, 0.1
    model = lora_model(tiny_tok)
    align_batch = batch_of(tiny_tok, "safety", 4, kind="safety")
    harm_batch = batch_of(tiny_tok, "pyrit", 4, seed=1)
    defense = Booster(BoosterArgs(lamb=lamb, alpha=alpha))
    defense.harmful_batch = lambda trainer: harm_batch  # type: ignore[method-assign]
    trainer = FakeTrainer(model, defense, tiny_tok)
    before = {n: p.detach().clone() for n, p in trainable(model).items()}

    model.zero_grad()
    loss = trainer.compute_loss(model, align_batch)
    plain_loss = float(model(**align_batch).loss.detach())
    loss.backward()
    got = param_grads(model)
    for n, p in trainable(model).items():  # the shifted pass left no trace on the weights, bit for bit
        assert torch.equal(p.detach(), before[n]), n
    assert float(loss.detach()) == pytest.approx(plain_loss, abs=1e-6)  # the logged loss is the alignment loss

    # independent: g_a and g_h on one copy, g_h' on a second copy whose LoRA weights are θ - α g_h/‖g_h‖
    def grads_on(m, batch):
        m.zero_grad()
        m(**batch).loss.backward()
        return param_grads(m)

    ref = copy.deepcopy(model)
    g_a, g_h = grads_on(ref, align_batch), grads_on(ref, harm_batch)
    norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in g_h.values()))
    shifted = copy.deepcopy(ref)
    with torch.no_grad():
        for n, p in trainable(shifted).items():
            p.copy_(before[n] - alpha * g_h[n] / (norm + 1e-7))
    g_h2 = grads_on(shifted, harm_batch)
    for n in got:
        expected = g_a[n] + lamb * (g_h[n] - g_h2[n])
        torch.testing.assert_close(got[n], expected, rtol=1e-4, atol=1e-6, msg=n)
    assert any(float((g_h[n] - g_h2[n]).abs().max()) > 1e-6 for n in got)  # the term is not vacuous
    assert defense.last["booster_harmful_drop"] > 0  # one normalised harmful step lowers the harmful loss


# ---------------------------------------------------------------------------------------------------------
# RepNoise
# ---------------------------------------------------------------------------------------------------------
def test_mmd_against_a_hand_computed_value():
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    y = torch.tensor([[0.0, 0.0], [2.0, 1.0]])
    # by hand: pooled z = x0, x1, y0, y1; squared distances
    z = [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (2.0, 1.0)]
    d2 = [[(a[0] - b[0]) ** 2 + (a[1] - b[1]) ** 2 for b in z] for a in z]
    assert d2[0][1] == 2 and d2[0][3] == 4 and d2[1][3] == 2 and d2[2][3] == 5
    bw = sum(map(sum, d2)) / (4 * 4 - 4) / 4  # mean off-diagonal distance / kernel_mul ** (5 // 2)
    k = [[sum(math.exp(-d / (bw * 2**i)) for i in range(5)) for d in row] for row in d2]
    xx = sum(k[i][j] for i in (0, 1) for j in (0, 1)) / 4
    yy = sum(k[i][j] for i in (2, 3) for j in (2, 3)) / 4
    xy = sum(k[i][j] for i in (0, 1) for j in (2, 3)) / 4
    expected = xx + yy - 2 * xy
    assert float(mmd_rbf(x, y)) == pytest.approx(expected, rel=1e-6)
    assert float(mmd_rbf(x, x)) == pytest.approx(0.0, abs=1e-7)
    # the bandwidth carries no gradient: d/dx with the bandwidth held fixed at its value
    xg = x.clone().requires_grad_(True)
    mmd_rbf(xg, y).backward()
    xf = x.clone().requires_grad_(True)
    zz = torch.cat([xf, y])
    d = ((zz[None] - zz[:, None]) ** 2).sum(-1)
    kk = sum(torch.exp(-d / (bw * 2**i)) for i in range(5))
    (kk[:2, :2] + kk[2:, 2:] - kk[:2, 2:] - kk[2:, :2]).mean().backward()
    torch.testing.assert_close(xg.grad, xf.grad)


def test_repnoise_terms_match_an_independent_recomputation(tiny_tok):
    model = lora_model(tiny_tok)
    batch = batch_of(tiny_tok, "pyrit", 3, seed=2)
    layers = model.base_model.model.model.layers
    gen = torch.Generator().manual_seed(0)
    shape = (*batch["input_ids"].shape, model.config.hidden_size)
    noise = [torch.randn(shape, generator=gen) for _ in layers]
    noise_term, harmful = RepNoise(RepNoiseArgs()).harmful_terms(model, batch, noise)

    # independent: MLP outputs by direct attribute hooks, masks and CE by hand
    acts = []
    handles = [layer.mlp.register_forward_hook(lambda m, i, o: acts.append(o)) for layer in layers]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    for h in handles:
        h.remove()
    labels = batch["labels"]
    m = (labels != -100).float()[..., None]
    mmds = [mmd_rbf((a * m).flatten(1), (n * m).flatten(1)) for a, n in zip(acts, noise)]
    assert float(noise_term) == pytest.approx(float(sum(mmds) / len(mmds)), rel=1e-6)
    assert float(noise_mmd(acts, labels != -100, acts)) == pytest.approx(0.0, abs=1e-6)  # noise = acts

    def ce(logits):
        logp = torch.log_softmax(logits.double(), -1)
        terms = [-logp[b, t, labels[b, t + 1]] for b in range(labels.shape[0])
                 for t in range(labels.shape[1] - 1) if labels[b, t + 1] != -100]
        return sum(terms) / len(terms)

    inner = model.base_model.model
    readouts = [inner.lm_head(inner.model.norm(h)) for h in out.hidden_states]
    expected = (ce(out.logits) + sum(ce(r) for r in readouts)) / len(out.hidden_states) + 1
    assert len(out.hidden_states) == len(layers) + 1  # L + 2 CE terms over L + 1, as the reference
    assert float(harmful) == pytest.approx(float(expected), rel=1e-5)

    # the full loss on a fake trainer: harmless + beta * mmd - alpha * log(H)
    args = RepNoiseArgs(alpha=0.5, beta=0.1)
    defense = RepNoise(args)
    defense.harmful_batch = lambda trainer: batch  # type: ignore[method-assign]
    defense.harmful_terms = lambda model, b: (noise_term, harmful)  # type: ignore[method-assign]
    harmless = torch.tensor(1.25)
    total = defense.loss(FakeTrainer(model, defense, tiny_tok), model, {}, harmless, None)
    assert float(total) == pytest.approx(1.25 + 0.1 * float(noise_term) - 0.5 * math.log(float(harmful)), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Harmful alignment data: disjoint from every attack and evaluation set
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["pyrit", "beavertails", "hh_rlhf"])
def test_harmful_alignment_pool_shares_no_prompt_with_any_other_packaged_dataset(source):
    pool = harmful_alignment_pool(source)
    keys = {normalise_prompt(r.prompt) for r in pool}
    assert len(keys) == len(pool) and all(r.response for r in pool)
    for name, src in SOURCES.items():
        for split in src.files:
            if (name, split) == (source, "train"):
                continue
            shared = keys & {normalise_prompt(r.prompt) for r in load_source(name, split=split) if r.prompt}
            assert not shared, (name, split, sorted(shared)[:2])
    if source == "pyrit":  # the default: enough pairs for the default n_harmful
        assert len(pool) >= BoosterArgs().n_harmful
        harmbench = {normalise_prompt(r.prompt) for r in load_source("harmbench", split="test")}
        raw = {normalise_prompt(r.prompt) for r in load_source("pyrit")}
        assert raw & harmbench  # the filter is not vacuous: PyRIT's examples include HarmBench behaviours


def test_a_run_whose_attack_or_harm_sets_meet_the_harmful_alignment_data_is_refused():
    cfg = load_config("configs/quickstart.yaml", ["align.defense=booster"])
    harmful = Booster(cfg.align.defense).harmful_records(cfg.align)
    check_alignment_data_disjoint(cfg, ["an unrelated prompt"])  # the quickstart's harm set: disjoint
    with pytest.raises(DataError, match="attack data"):
        check_alignment_data_disjoint(cfg, [harmful[0].prompt.upper()])  # compared normalised
    plain = load_config("configs/quickstart.yaml")
    check_alignment_data_disjoint(plain, [harmful[0].prompt])  # no harmful data: nothing to check


def test_a_harm_set_holding_a_harmful_alignment_prompt_is_refused(tmp_path):
    harm_set = tmp_path / "my_harm_set.jsonl"
    cfg = load_config("configs/quickstart.yaml", ["align.defense=repnoise", f"eval.harm_sets=[{harm_set}]"])
    harmful = RepNoise(cfg.align.defense).harmful_records(cfg.align)
    harm_set.write_text("\n".join(json.dumps({"prompt": p}) for p in ["an unrelated prompt", harmful[3].prompt]))
    with pytest.raises(DataError, match="harm sets"):
        check_alignment_data_disjoint(cfg, [])


# ---------------------------------------------------------------------------------------------------------
# The alignment stage end to end on the tiny model, and the bench
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vaccine", "booster", "repnoise"])
def test_alignment_stage_runs_each_defense(tmp_path, tiny_tok, name):
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    overrides = [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "align.batch_size=8",
                 f"align.defense={name}", "align.defense.n_harmful=16" if name != "vaccine" else "align.defense.rho=2"]
    cfg = load_config(None, overrides)
    plain = load_config(None, [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "align.batch_size=8"])
    result = align(cfg)
    assert result.model_dir.parent == aligned_model_dir(cfg.model, cfg.align) != aligned_model_dir(plain.model,
                                                                                                  plain.align)
    assert result.metrics["steps"] == 2 and math.isfinite(result.metrics["last_loss"])
    stats = {k for k in result.metrics if k.startswith(f"defense/{name}")}
    assert stats, result.metrics
    rows = [json.loads(line) for line in (result.model_dir.parent / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(f"{name}_" in k for r in rows for k in r)
    stored = json.loads((result.model_dir.parent / "align_result.json").read_text())
    assert stored["align"]["defense"]["name"] == name
    assert align(cfg).cached


def test_bench_rows_align_with_a_defense_then_fine_tune_with_sft(tmp_path):
    from spard.benchmark import load_bench

    bench = tmp_path / "b.yaml"
    bench.write_text(json.dumps({
        "base_config": None, "output_dir": str(tmp_path / "out"), "attacks": [{"name": "bt", "overrides": {}}],
        "ratios": [0.1], "defenses": ["sft", {"name": "sft", "label": "vaccine",
                                              "overrides": {"align.defense.name": "vaccine"}},
                                      {"name": "sft", "label": "booster", "overrides": {"align.defense": "booster"}}],
    }))
    b = load_bench(bench)
    by_row = {c.defense: c.config for c in b.cells}
    assert by_row["sft"].align.defense.name == "none" and by_row["vaccine"].align.defense.name == "vaccine"
    assert by_row["booster"].align.defense.name == "booster"
    assert all(c.defense.name == "sft" for c in by_row.values())
    assert len({aligned_model_dir(c.model, c.align) for c in by_row.values()}) == 3


def test_fine_tuning_a_booster_aligned_model_on_its_own_harmful_pairs_is_refused(tmp_path, tiny_tok):
    from spard.jobs.finetune import train

    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    base = [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "align.batch_size=8", "align.defense=booster",
            "align.defense.n_harmful=150", "train.max_steps=1"]
    cfg = load_config(None, [*base, "attack.harmful_source=pyrit", "attack.harmful_ratio=1.0",
                             f"train.output_dir={tmp_path / 'pyrit'}"])
    with pytest.raises(DataError, match="attack data"):
        train(cfg)
    ok = train(load_config(None, [*base, f"train.output_dir={tmp_path / 'bt'}"]))  # BeaverTails attack: disjoint
    assert ok.metrics["steps"] == 1
