"""The precision/memory path matrix: every defense and alignment defense, run for a few steps on the tiny model on
each path GPU users take, must give the plain fp32 path's adapter and defense statistics (or refuse the path with
a clear error). A defense whose extra gradient a path silently zeroes trains as plain SFT; this is where that
shows.

SafeLoRA's signal is its projection after training (``final/`` holds the projected adapter), compared like the others.

Paths: ``bf16`` (CPU bf16 autocast through the Trainer), ``gc`` (non-reentrant gradient checkpointing),
``gc_reentrant`` (torch's reentrant checkpointing, what peft's k-bit preparation picks on its own) and ``kbit``
(the 8/4-bit path simulated on CPU: a tiny fp32 model flagged ``is_loaded_in_8bit``, so spard runs peft's
``prepare_model_for_kbit_training`` and the checkpointing it brings).

Tolerances: the checkpointing and k-bit paths run the same fp32 arithmetic in another order of recomputation, so
adapters and statistics agree to float rounding (``FP32_TOL``). bf16 autocast rounds every matmul to 8 mantissa
bits; after a few Adam steps an adapter differs from fp32 by a part of its own movement, so bf16 is held to
``BF16_TOL`` of the adapter's change from its initial value, and its statistics to ``BF16_STAT_RTOL``.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from spard.config import load_config
from spard.errors import ConfigError
from spard.jobs.align import align
from spard.jobs.finetune import train
from spard.testing import save_tiny_chat_model, tiny_model

FP32_TOL = 1e-5
"""Checkpointing and k-bit paths: max |difference| of adapter weights and of each logged statistic (relative to
the statistic's size, absolute near 0)."""
BF16_TOL = 0.35
"""bf16: ‖A_bf16 − A_fp32‖ / ‖A_fp32 − A_init‖ over the adapter (weights move by 3 steps of Adam here)."""
BF16_STAT_RTOL = 0.15
"""bf16: relative difference of each logged defense statistic, or ``BF16_STAT_RTOL * BF16_STAT_FLOOR`` absolute for
statistics below the floor (early-step cosines and KLs of a few 1e-2 are at bf16's resolution)."""
BF16_STAT_FLOOR = 0.1

PATHS = ("bf16", "gc", "gc_reentrant", "kbit")
PATH_OVERRIDES = {"fp32": (), "bf16": ("train.bf16=true",), "gc": ("train.gradient_checkpointing=true",),
                  "gc_reentrant": ("train.gradient_checkpointing=reentrant",), "kbit": ()}

RUN = ("align.enabled=false", "data.task=gsm8k", "data.n_train=24", "data.max_length=64", "attack.harmful_ratio=0.25",
       "train.batch_size=4", "train.max_steps=3", "train.lr=0.01", "lora.dropout=0", "train.save_steps=100")
DEFENSES = {
    "sft": ("defense.name=sft",),
    "safeinstr": ("defense.name=safeinstr",),
    "ptst": ("defense.name=ptst",),
    "safelora": ("defense.name=safelora", "defense.num_proj_layers=3"),
    "safegrad": ("defense.name=safegrad", "defense.alignment_examples=8"),
    "spard-halfspace": ("defense.name=spard", "defense.projection=halfspace"),
    "spard-reference": ("defense.name=spard", "defense.projection=reference"),
    "lisa": ("defense.name=lisa", "defense.align_steps=1", "defense.finetune_steps=2", "defense.rho=1.0",
             "defense.proximal_warmup_ratio=0", "defense.alignment_examples=40", "defense.alignment_max_length=64"),
}
SIGNAL = {  # the statistic that carries each defense's own signal; it must be non-zero on the plain path
    "safegrad": "align_grad_norm", "spard-halfspace": "safety_loss", "spard-reference": "safety_loss",
    "lisa": "lisa_prox", "booster": "booster_reg_norm", "repnoise": "repnoise_mmd",
    "vaccine": "vaccine_act_grad_norm",
}

ALIGN_RUN = ("align.n_safety=8", "align.n_benign=8", "align.max_length=48", "align.batch_size=4", "align.epochs=1",
             "align.lora_r=4")
ALIGN_DEFENSES = {
    "vaccine": ("align.defense.name=vaccine",),
    "booster": ("align.defense.name=booster", "align.defense.n_harmful=8"),
    "repnoise": ("align.defense.name=repnoise", "align.defense.n_harmful=8"),
}
REFUSES_REENTRANT = {"vaccine", "booster", "repnoise"}


def _model(tok, path, directory=None):
    model = tiny_model(tok, seed=0)
    if path == "kbit":
        if directory is not None:  # a checkpoint on disk, as a real quantised base has (SPARD re-reads it in fp32)
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(save_tiny_chat_model(directory, tok, seed=0))
        model.is_loaded_in_8bit = True  # what bitsandbytes' loader sets; spard then prepares the model for k-bit
    return model


def _rows(metrics_file):
    return [json.loads(line) for line in metrics_file.read_text().splitlines()]


def _run(kind, name, path, tmp_path, tok):
    """(adapter tensors, metrics rows, initial adapter) of one run."""
    out = tmp_path / f"{name}-{path}"
    if kind == "finetune":
        extra = []
        if name == "safelora":  # its unaligned model: another tiny checkpoint (seed 1), the same on every path
            extra = [f"defense.unaligned_model={save_tiny_chat_model(tmp_path / 'unaligned', tok, seed=1)}"]
        cfg = load_config(None, [*RUN, *DEFENSES[name], *extra, *PATH_OVERRIDES[path], f"train.output_dir={out}"])
        res = train(cfg, model=_model(tok, path, tmp_path / "base"), tokenizer=tok)
        run_dir = res.run_dir
    else:
        cfg = load_config(None, [*ALIGN_RUN, *ALIGN_DEFENSES[name], *PATH_OVERRIDES[path],
                                 f"align.output_dir={out}"])
        align(cfg, model=_model(tok, path, tmp_path / "base"), tokenizer=tok)
        run_dir = out / "run"
    return load_file(str(run_dir / "final" / "adapter_model.safetensors")), _rows(run_dir / "metrics.jsonl")


_BASELINES: dict[tuple[str, str], tuple] = {}


def _baseline(kind, name, tmp_path_factory, tok):
    key = (kind, name)
    if key not in _BASELINES:
        _BASELINES[key] = _run(kind, name, "fp32", tmp_path_factory.mktemp("fp32"), tok)
    return _BASELINES[key]


def _initial_adapter(tok, kind):
    """The adapter's values before any step (LoRA A random, B zero): what 'moved' is measured from."""
    from spard.args import LoraArgs
    from spard.trainer import add_lora

    lora = LoraArgs(r=4, alpha=8, dropout=0.0) if kind == "align" else LoraArgs(dropout=0.0)
    seed = 1234 if kind == "align" else 0
    model = add_lora(tiny_model(tok, seed=0), lora, seed)
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}


def _stat_keys(rows):
    skip = {"step", "epoch", "learning_rate", "grad_norm", "loss"}
    return sorted({k for r in rows for k, v in r.items()
                   if isinstance(v, (int, float)) and k not in skip and not k.endswith("_seconds")})


def _compare(kind, name, path, got, want, tok):
    adapter, rows = got
    base_adapter, base_rows = want
    assert [r["step"] for r in rows] == [r["step"] for r in base_rows]
    signal = SIGNAL.get(name)
    if signal is not None:  # the signal is there on the plain path, so equality below is not trivially 0 == 0,
        assert any(abs(r.get(signal, 0.0)) > 0 for r in base_rows), f"{name}: {signal} is 0 on the fp32 path"
        for r, b in zip(rows, base_rows):  # and it is there on this path at every step it is there in fp32
            if b.get(signal):
                assert r.get(signal), f"{name}/{path}: {signal} is {r.get(signal)} at step {r['step']}"
    keys = sorted(base_adapter)
    assert keys == sorted(adapter)
    if path == "bf16":
        init = _initial_adapter(tok, kind)
        init = {k: init[k] for k in keys} if set(keys) <= set(init) else None
        diff = math.sqrt(sum(float((adapter[k].float() - base_adapter[k].float()).pow(2).sum()) for k in keys))
        moved = math.sqrt(sum(float((base_adapter[k].float() - (init[k] if init else 0)).pow(2).sum())
                              for k in keys))
        assert diff <= BF16_TOL * moved, f"{name}/{path}: adapter differs by {diff:.3g}, moved {moved:.3g}"
    else:
        worst = max(float((adapter[k].float() - base_adapter[k].float()).abs().max()) for k in keys)
        assert worst <= FP32_TOL, f"{name}/{path}: adapter differs by {worst:.3g}"
    rtol = BF16_STAT_RTOL if path == "bf16" else FP32_TOL
    for key in _stat_keys(base_rows):
        for r, b in zip(rows, base_rows):
            if key not in b:
                continue
            assert key in r, f"{name}/{path}: {key} missing at step {b['step']}"
            want_v, got_v = float(b[key]), float(r[key])
            assert abs(got_v - want_v) <= rtol * max(abs(want_v), BF16_STAT_FLOOR if path == "bf16" else 1.0), (
                f"{name}/{path}: {key} at step {b['step']}: {got_v} vs fp32 {want_v}")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_finetune_defense_path_equals_fp32(defense, path, tmp_path, tmp_path_factory, tiny_tok):
    want = _baseline("finetune", defense, tmp_path_factory, tiny_tok)
    got = _run("finetune", defense, path, tmp_path, tiny_tok)
    _compare("finetune", defense, path, got, want, tiny_tok)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("defense", sorted(ALIGN_DEFENSES))
def test_alignment_defense_path_equals_fp32(defense, path, tmp_path, tmp_path_factory, tiny_tok):
    if path == "gc_reentrant" and defense in REFUSES_REENTRANT:
        with pytest.raises(ConfigError, match=rf"align.defense.name='{defense}'.*reentrant.*"
                                              r"train.gradient_checkpointing=true"):
            _run("align", defense, path, tmp_path, tiny_tok)
        return
    want = _baseline("align", defense, tmp_path_factory, tiny_tok)
    got = _run("align", defense, path, tmp_path, tiny_tok)
    _compare("align", defense, path, got, want, tiny_tok)


def test_kbit_path_turns_on_non_reentrant_checkpointing(tiny_tok):
    """What ``train.gradient_checkpointing=auto`` picks: off on a full-precision base, non-reentrant on a k-bit one
    (peft before 0.22 would pick reentrant)."""
    from spard.args import LoraArgs
    from spard.checkpointing import NON_REENTRANT, OFF, REENTRANT, checkpointing_mode
    from spard.trainer import add_lora

    assert checkpointing_mode(add_lora(_model(tiny_tok, "fp32"), LoraArgs(), 0)) == OFF
    assert checkpointing_mode(add_lora(_model(tiny_tok, "kbit"), LoraArgs(), 0)) == NON_REENTRANT
    assert checkpointing_mode(add_lora(_model(tiny_tok, "kbit"), LoraArgs(), 0,
                                       gradient_checkpointing="reentrant")) == REENTRANT
    assert checkpointing_mode(add_lora(_model(tiny_tok, "fp32"), LoraArgs(), 0,
                                       gradient_checkpointing=True)) == NON_REENTRANT
    import peft
    from packaging.version import Version
    from peft import prepare_model_for_kbit_training

    # peft's own default: reentrant before 0.22, non-reentrant since (spard's choice above holds for both)
    peft_default = NON_REENTRANT if Version(peft.__version__) >= Version("0.22") else REENTRANT
    assert checkpointing_mode(prepare_model_for_kbit_training(_model(tiny_tok, "kbit"))) == peft_default


def test_autograd_grad_is_empty_under_reentrant_checkpointing_and_parameter_gradients_is_not(tiny_tok):
    """The mechanism of the bug: under reentrant checkpointing ``torch.autograd.grad`` reaches no LoRA parameter;
    ``spard.checkpointing.parameter_gradients`` gives the plain path's gradient and leaves ``.grad`` alone."""
    from spard.args import LoraArgs
    from spard.checkpointing import OFF, REENTRANT, parameter_gradients
    from spard.trainer import add_lora

    ids = torch.randint(4, 40, (2, 12), generator=torch.Generator().manual_seed(0))
    grads = {}
    for mode in ("false", "reentrant"):
        model = add_lora(_model(tiny_tok, "fp32"), LoraArgs(dropout=0.0), 0, gradient_checkpointing=mode)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.fill_(0.01)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.full_like(p, 7.0)
        loss = model(input_ids=ids, labels=ids).loss
        if mode == "reentrant":
            raw = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
            assert all(g is None for g in raw)
        grads[mode] = parameter_gradients(loss, params, mode=REENTRANT if mode == "reentrant" else OFF)
        assert all(bool((p.grad == 7.0).all()) for p in params)  # untouched
    for a, b in zip(grads["false"], grads["reentrant"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in grads["false"])
