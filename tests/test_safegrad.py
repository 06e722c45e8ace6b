"""SafeGrad: the surgery math, the KL alignment loss, and the defense on the tiny model."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from transformers import TrainerCallback

from spard.alignment_kl import alignment_kl, token_kl
from spard.config import LoraArgs, field_docs, load_config
from spard.data.build import load_safety_pool, normalise_prompt, sample
from spard.data.chat import collate, tokenize_records
from spard.defenses import DefenseContext, get_defense
from spard.defenses.safegrad import SafeGrad, SafeGradArgs
from spard.errors import ConfigError
from spard.jobs.finetune import train
from spard.surgery import flat_dot, project_conflicting, safegrad_update
from spard.testing import assert_same_adapter, tiny_model
from spard.trainer import add_lora


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# project_conflicting: hand-computed cases
# ---------------------------------------------------------------------------------------------------------
def test_conflict_is_projected_onto_the_normal_plane():
    # g·a = -1, ‖a‖² = 2  →  g - (-1/2) a = (1, 0) + (-0.5, 0.5)
    (out,) = project_conflicting([t(1, 0)], [t(-1, 1)])
    torch.testing.assert_close(out, t(0.5, 0.5))
    assert float(flat_dot([out], [t(-1, 1)])) == 0.0


def test_no_conflict_and_orthogonal_leave_task_gradient_unchanged():
    g = [t(1, 2)]
    assert project_conflicting(g, [t(1, 0)]) is g  # g·a = 1 > 0
    g = [t(1, 0)]
    assert project_conflicting(g, [t(0, 3)]) is g  # g·a = 0: orthogonal, no conflict


def test_zero_alignment_gradient_returns_task_gradient():
    g = [t(1, -2), t(3)]
    out = project_conflicting(g, [t(0, 0), t(0)])
    assert out is g and torch.equal(out[0], t(1, -2))


def test_multi_tensor_lists_are_one_vector():
    # per tensor: (1,0)·(0,1) = 0 would not conflict, [2]·[-1] = -2 would; jointly g·a = -2, ‖a‖² = 2, coef -1
    g = [t(1, 0), torch.tensor([[2.0]])]
    a = [t(0, 1), torch.tensor([[-1.0]])]
    out = project_conflicting(g, a)
    torch.testing.assert_close(out[0], t(1, 1))
    torch.testing.assert_close(out[1], torch.tensor([[1.0]]))
    assert float(flat_dot(out, a)) == 0.0


def test_low_precision_inputs_keep_dtype_and_accumulate_in_fp32():
    g = [torch.full((4096,), 0.01, dtype=torch.bfloat16), t(1, 0).bfloat16()]
    a = [torch.full((4096,), -0.01, dtype=torch.bfloat16), t(0, 1).bfloat16()]
    dot = flat_dot(g, a)
    assert dot.dtype == torch.float32
    torch.testing.assert_close(dot, torch.tensor(-4096 * 0.01**2), rtol=1e-2, atol=0)  # bf16 0.01 ≈ 0.0100098
    out = project_conflicting(g, a)
    assert [o.dtype for o in out] == [torch.bfloat16, torch.bfloat16]


def test_mismatched_lists_raise():
    with pytest.raises(ValueError, match="length"):
        project_conflicting([t(1)], [t(1), t(2)])
    with pytest.raises(ValueError, match="shapes differ"):
        project_conflicting([t(1, 2)], [t(1)])


@pytest.mark.parametrize("dtype,rel_tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_property_no_conflict_left_after_surgery(dtype, rel_tol):
    """For random gradients (several tensors, random scales) ``g' · a >= 0`` up to rounding, and ``g'`` only
    differs from ``g`` when they conflicted."""
    projected = 0
    for seed in range(300):
        gen = torch.Generator().manual_seed(seed)
        shapes = [(3, 5), (7,), (2, 2, 2)]
        scale = 10 ** torch.empty(2).uniform_(-3, 3, generator=gen)
        g = [torch.randn(s, generator=gen, dtype=dtype) * scale[0] for s in shapes]
        a = [torch.randn(s, generator=gen, dtype=dtype) * scale[1] for s in shapes]
        out = project_conflicting(g, a)
        norm = float(flat_dot(g, g).sqrt() * flat_dot(a, a).sqrt())
        assert float(flat_dot(out, a)) >= -rel_tol * norm, seed
        if float(flat_dot(g, a)) >= 0:
            assert out is g
        else:
            projected += 1
            # only the component along a was removed: out - g is parallel to a
            diff = [o - x for o, x in zip(out, g)]
            cos = flat_dot(diff, a) / (flat_dot(diff, diff).sqrt() * flat_dot(a, a).sqrt())
            assert abs(abs(float(cos)) - 1) < 1e-4
    assert 100 < projected < 200  # both branches were exercised


def test_safegrad_update_adds_weighted_alignment_gradient():
    g, a = [t(1, 0)], [t(-1, 1)]
    res = safegrad_update(g, a, lambda_align=0.0)
    assert res.projected and res.cosine == pytest.approx(-1 / 2**0.5)
    torch.testing.assert_close(res.update[0], t(0.5, 0.5))
    res = safegrad_update(g, a, lambda_align=2.0)
    torch.testing.assert_close(res.update[0], t(-1.5, 2.5))
    res = safegrad_update([t(1, 1)], [t(0, 0)], lambda_align=1.0)
    assert not res.projected and res.cosine == 0.0 and res.align_norm == 0.0
    torch.testing.assert_close(res.update[0], t(1, 1))


# ---------------------------------------------------------------------------------------------------------
# the KL alignment loss
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_token_kl_matches_definition_and_gradient(direction):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    base = torch.randn(4, 9, generator=gen, dtype=torch.float64)
    log_p, log_q = F.log_softmax(x, -1), F.log_softmax(base, -1)
    if direction == "forward":
        expected = (log_q.exp() * (log_q - log_p)).sum(-1)
    else:
        expected = (log_p.exp() * (log_p - log_q)).sum(-1)
    torch.testing.assert_close(token_kl(x, base, direction), expected)
    assert torch.autograd.gradcheck(lambda z: token_kl(z, base, direction), (x,))
    # at identical logits the value and the gradient are exactly zero (no rounding residue to project on)
    same = base.float().clone().requires_grad_()
    kl = token_kl(same, base.float(), direction).sum()
    kl.backward()
    assert float(kl.detach()) == 0.0 and float(same.grad.abs().max()) == 0.0


def alignment_batch(tok, n=8, max_length=96):
    feats, _ = tokenize_records(tok, sample(load_safety_pool("safety"), n, 0), max_length)
    return collate(feats, tok.pad_token_id)


def test_kl_is_zero_at_step_0_and_positive_after_a_harmful_step(tiny_tok):
    from spard.data.sources import load_source

    model = add_lora(sharp_tiny_model(tiny_tok), LoraArgs(r=4, dropout=0.0), seed=0)
    batch = alignment_batch(tiny_tok)
    # LoRA B starts at 0: the adapted model is the base model, bitwise
    with torch.no_grad():
        assert float(alignment_kl(model, batch)) == 0.0
        assert float(alignment_kl(model, batch, "reverse")) == 0.0
    harmful, _ = tokenize_records(tiny_tok, load_source("beavertails")[:8], 96)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(**collate(harmful, tiny_tok.pad_token_id)).loss.backward()
    opt.step()
    with torch.no_grad():
        forward, reverse = float(alignment_kl(model, batch)), float(alignment_kl(model, batch, "reverse"))
    assert forward > 1e-4 and reverse > 1e-4
    # the base model itself is untouched: with the adapter off the KL is zero again
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=batch["input_ids"]).logits,
                           sharp_tiny_model(tiny_tok)(input_ids=batch["input_ids"]).logits)


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------
def test_args_defaults_docs_and_validation():
    cfg = load_config(None, ["defense.name=safegrad"])
    assert isinstance(cfg.defense, SafeGradArgs) and get_defense("safegrad") is SafeGrad
    d = cfg.defense
    assert (d.alignment_examples, d.alignment_batch_size, d.kl_direction, d.lambda_align) == (100, 2, "forward", 1.0)
    docs = field_docs(SafeGradArgs)
    for name in ("alignment_examples", "alignment_batch_size", "alignment_max_length", "kl_direction",
                 "lambda_align", "safety_source", "safety_path"):
        assert docs.get(name), name
    for override, match in [("defense.kl_direction=sideways", "defense.kl_direction='sideways'"),
                            ("defense.alignment_examples=0", "defense.alignment_examples=0"),
                            ("defense.lambda_align=-1", "defense.lambda_align=-1.0"),
                            ("defense.alignment_batch_size=200", "must be <= alignment_examples"),
                            ("defense.alignment_max_length=2", "defense.alignment_max_length=2")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["defense.name=safegrad", override])


def test_alignment_examples_exclude_attack_prompts(tiny_tok, tmp_path):
    pool = load_safety_pool("safety")
    banned = [r.prompt for r in pool[:2000]]  # leaves 483 to draw 100 from
    cfg = load_config(None, ["defense.name=safegrad"])
    defense = SafeGrad(cfg.defense)
    ctx = DefenseContext(config=cfg, tokenizer=tiny_tok, run_dir=tmp_path, seed=0, attack_prompts=banned)
    assert defense.prepare_data([], ctx) == []
    chosen = {normalise_prompt(r.prompt) for r in defense.alignment_records}
    assert len(defense.alignment_records) == 100 and not chosen & {normalise_prompt(p) for p in banned}
    again = SafeGrad(cfg.defense)
    again.prepare_data([], ctx)
    assert again.alignment_records == defense.alignment_records  # deterministic by seed


def fake_trainer(dist_type, fsdp_version=None, **flags):
    plugin = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    accelerator = SimpleNamespace(distributed_type=dist_type,
                                  state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=plugin))
    return SimpleNamespace(**{"accelerator": accelerator, "is_deepspeed_enabled": False, "is_fsdp_enabled": False,
                              **flags})


@pytest.mark.parametrize("dist_type,flags,match", [
    (DistributedType.DEEPSPEED, {"is_deepspeed_enabled": True}, "does not support DeepSpeed"),
    (DistributedType.FSDP, {"is_fsdp_enabled": True, "fsdp_version": 1}, "supports FSDP2 only"),
    (DistributedType.MEGATRON_LM, {}, "MEGATRON_LM"),
])
def test_unsupported_setups_are_refused(dist_type, flags, match):
    defense = SafeGrad(SafeGradArgs())
    with pytest.raises(ConfigError, match=match):
        defense.setup(fake_trainer(dist_type, **flags))


def test_fsdp2_passes_the_engine_check(tiny_tok):
    # FSDP2 is supported: setup gets past the engine check to the next one (the LoRA model)
    defense = SafeGrad(SafeGradArgs())
    with pytest.raises(ConfigError, match="needs a LoRA"):
        defense.setup(fake_trainer(DistributedType.FSDP, fsdp_version=2, is_fsdp_enabled=True,
                                   model=tiny_model(tiny_tok)))


def test_needs_a_lora_model(tiny_tok):
    defense = SafeGrad(SafeGradArgs())
    with pytest.raises(ConfigError, match="needs a LoRA"):
        defense.setup(fake_trainer(DistributedType.NO, model=tiny_model(tiny_tok)))


# ---------------------------------------------------------------------------------------------------------
# the defense in training (tiny model)
# ---------------------------------------------------------------------------------------------------------
def sharp_tiny_model(tok):
    """The tiny Llama with its final norm scaled ×10. At random init its next-token distribution is nearly
    uniform and LoRA on the attention projections can barely move it, so neither an attack nor a defense
    would show; sharpening the output gives the base a distribution an attack can destroy."""
    model = tiny_model(tok)
    with torch.no_grad():
        model.model.norm.weight.mul_(10.0)
    return model


def sg_config(tmp_path, name, *extra):
    return load_config(None, [
        f"train.output_dir={tmp_path / name}", "align.enabled=false", "data.n_train=16", "data.max_length=128",
        "train.batch_size=4", "train.max_steps=6", "train.lr=1e-2", "train.save_steps=3", "lora.r=4",
        "attack.harmful_ratio=0.5", "defense.name=safegrad", "defense.alignment_examples=20",
        "defense.alignment_max_length=96", *extra,
    ])


def metric_rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


class RecordUpdates(TrainerCallback):
    """The gradient the optimizer stepped with (after the defense rewrote it), per step."""

    def __init__(self):
        self.updates = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.updates.append([p.grad.detach().clone() for p in model.parameters() if p.requires_grad])


def test_grad_accumulation_gives_the_same_update(tmp_path, tiny_tok):
    """batch 4 × accum 1 and batch 2 × accum 2 see the same 4 examples per step (same sampler permutation);
    HF normalises the task loss by the step's token count (``num_items_in_batch``) and g_a is computed once
    per optimizer step, so the updates agree up to fp32 summation order."""
    runs = {}
    for name, bs, ga in [("b4", 4, 1), ("b2x2", 2, 2)]:
        rec = RecordUpdates()
        cfg = sg_config(tmp_path, name, f"train.batch_size={bs}", f"train.grad_accum={ga}", "lora.dropout=0",
                        "train.max_steps=4")
        res = train(cfg, model=sharp_tiny_model(tiny_tok), tokenizer=tiny_tok, callbacks=[rec])
        runs[name] = (rec.updates, metric_rows(res.run_dir), res.adapter_dir)
    (u1, rows1, dir1), (u2, rows2, dir2) = runs["b4"], runs["b2x2"]
    assert len(u1) == len(u2) == 4
    assert sum(r["align_projected"] for r in rows1) >= 1  # the surgery branch ran
    assert [r["align_projected"] for r in rows1] == [r["align_projected"] for r in rows2]
    for step, (a, b) in enumerate(zip(u1, u2)):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=f"step {step + 1}")
    for r1, r2 in zip(rows1, rows2):
        assert r1["align_kl"] == pytest.approx(r2["align_kl"], rel=1e-4, abs=1e-7)
        assert r1["align_cosine"] == pytest.approx(r2["align_cosine"], rel=1e-4, abs=1e-5)
    a, b = load_file(dir1 / "adapter_model.safetensors"), load_file(dir2 / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


class Crash(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise KeyboardInterrupt("simulated interruption after step 4")


def test_resume_matches_uninterrupted_run(tmp_path, tiny_tok):
    extra = ("lora.dropout=0.1",)  # dropout: the resumed run must also restore the RNG the alignment pass uses
    straight = train(sg_config(tmp_path, "straight", *extra), model=sharp_tiny_model(tiny_tok), tokenizer=tiny_tok)
    with pytest.raises(KeyboardInterrupt):
        train(sg_config(tmp_path, "cut", *extra), model=sharp_tiny_model(tiny_tok), tokenizer=tiny_tok,
              callbacks=[Crash()])
    state = json.loads((tmp_path / "cut" / "checkpoint-3" / "defense_state.json").read_text())
    assert state["cursor"] == 3 * 2  # 3 steps of alignment_batch_size 2
    resumed = train(sg_config(tmp_path, "cut", *extra, "train.resume=true"), model=sharp_tiny_model(tiny_tok),
                    tokenizer=tiny_tok)
    assert_same_adapter(straight.adapter_dir, resumed.adapter_dir, rtol=0, atol=1e-7)
    rows_a, rows_b = metric_rows(straight.run_dir), metric_rows(resumed.run_dir)
    assert [r["step"] for r in rows_b] == [1, 2, 3, 4, 5, 6]
    for key in ("align_kl", "align_cosine", "align_projected", "align_projections"):
        assert [r[key] for r in rows_a] == pytest.approx([r[key] for r in rows_b], rel=1e-6, abs=1e-9), key


def test_safegrad_keeps_alignment_kl_below_sft_under_attack(tmp_path, tiny_tok):
    """Half the fine-tuning set is BeaverTails harmful QA; measured on 40 held-out safety examples."""
    from peft import PeftModel

    common = ("attack.harmful_ratio=0.5", "train.max_steps=10", "lora.dropout=0")
    sft_cfg = load_config(None, [
        f"train.output_dir={tmp_path / 'sft'}", "align.enabled=false", "data.n_train=16", "data.max_length=128",
        "train.batch_size=4", "train.lr=1e-2", "train.save_steps=100", "lora.r=4", *common,
    ])
    sft = train(sft_cfg, model=sharp_tiny_model(tiny_tok), tokenizer=tiny_tok)
    sg = train(sg_config(tmp_path, "sg", *common, "train.save_steps=100"), model=sharp_tiny_model(tiny_tok),
               tokenizer=tiny_tok)
    attack = json.loads((sg.run_dir / "attack_prompts.json").read_text())
    used = {normalise_prompt(r.prompt) for r in sample(load_safety_pool("safety", exclude_prompts=attack), 20, 0)}
    held_out = [r for r in sample(load_safety_pool("safety"), 100, 99) if normalise_prompt(r.prompt) not in used][:40]
    feats, _ = tokenize_records(tiny_tok, held_out, 96)
    batch = collate(feats, tiny_tok.pad_token_id)
    kl = {}
    for name, res in (("sft", sft), ("safegrad", sg)):
        model = PeftModel.from_pretrained(sharp_tiny_model(tiny_tok), res.adapter_dir)
        with torch.no_grad():
            kl[name] = float(alignment_kl(model, batch))
    rows = metric_rows(sg.run_dir)
    assert kl["sft"] > 0.3, kl  # the attack did move the model
    assert kl["safegrad"] < 0.2 * kl["sft"], kl
    assert rows[-1]["align_projections"] >= 3 and min(r["align_cosine"] for r in rows) < 0  # conflicts were seen
