"""align.method=dpo and align.full_finetune on the tiny model: the pairs, the training, the cache key, the errors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spard.config import load_config
from spard.data.build import normalise_prompt
from spard.data.sources import SPARD_REF_ATTACKS, load_source
from spard.errors import ConfigError, DataError
from spard.evaluate.tasks.over_refusal import DEFAULT_BENIGN_SETS
from spard.jobs.align import ALIGN_LORA_DROPOUT, align, aligned_model_dir, check_alignment_data_disjoint
from spard.jobs.align_dpo import as_conversation, pair_pool, preference_pairs
from spard.models import cache_dir, model_fingerprint
from spard.testing import TINY_RUN_OVERRIDES, save_tiny_chat_model

DPO = ["align.method=dpo", "align.n_benign=0"]


def _overrides(model_dir, *extra: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", *TINY_RUN_OVERRIDES, "align.batch_size=4", *extra]


def test_pairs_are_packaged_refusal_vs_harmful_answer_and_held_out_sets_stay_out():
    pool = pair_pool()
    assert len(pool) > 1000
    held_out = {normalise_prompt(r.prompt) for name in ("I-MaliciousInstructions", *DEFAULT_BENIGN_SETS)
                for r in load_source(name, split="test")}
    attacks = {normalise_prompt(r.prompt) for name in SPARD_REF_ATTACKS for r in load_source(name, split="all")}
    keys = [normalise_prompt(p.prompt) for p in pool]
    assert len(set(keys)) == len(keys) and not (set(keys) & (held_out | attacks))
    # chosen is the packaged refusal of that prompt (the spard_ref safety pool), rejected its harmful answer
    refusals = {r.prompt: r.response for r in load_source("spard_ref")}
    assert all(refusals[p.prompt] == p.chosen and p.rejected != p.chosen for p in pool[:200])
    cfg = load_config(None, [*DPO, "align.n_safety=12"])
    assert preference_pairs(cfg.align) == preference_pairs(cfg.align) and len(preference_pairs(cfg.align)) == 12


def test_a_pair_in_trl_format_carries_the_bound_prompt_format(tiny_tok):
    from spard.data.chat import prompt_format

    pair = pair_pool()[0]
    plain = as_conversation(pair, tiny_tok)
    assert plain == {"prompt": [{"role": "user", "content": pair.prompt}],
                     "chosen": [{"role": "assistant", "content": pair.chosen}],
                     "rejected": [{"role": "assistant", "content": pair.rejected}]}
    with prompt_format(tiny_tok, "chat", "Be safe."):
        assert as_conversation(pair, tiny_tok)["prompt"][0] == {"role": "system", "content": "Be safe."}


def _margin(model, tok, pairs) -> float:
    """Mean log p(chosen) - log p(rejected) over the answers' tokens."""
    total = 0.0
    for p in pairs:
        conv = as_conversation(p, tok)
        prompt = tok.apply_chat_template(conv["prompt"], tokenize=False, add_generation_prompt=True)
        for sign, answer in ((1, conv["chosen"]), (-1, conv["rejected"])):
            text = tok.apply_chat_template(conv["prompt"] + answer, tokenize=False)
            ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :64]
            start = len(tok(prompt, add_special_tokens=False).input_ids)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1], -1)
            tgt = ids[0, 1:]
            total += sign * logp[torch.arange(len(tgt)), tgt][start - 1:].sum().item()
    return total / len(pairs)


@pytest.mark.parametrize("full", [False, True])
def test_dpo_raises_the_preference_for_the_refusal(tmp_path, tiny_tok, full):
    from transformers import AutoModelForCausalLM

    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    cfg = load_config(None, _overrides(model_dir, *DPO, "align.lr=5e-3", "align.epochs=3",
                                       f"align.full_finetune={str(full).lower()}"))
    result = align(cfg)

    assert not result.cached and result.metrics["method"] == "dpo" and result.metrics["steps"] == 6  # 3 x 8/4
    pairs = preference_pairs(cfg.align)
    before = AutoModelForCausalLM.from_pretrained(model_dir)
    after = AutoModelForCausalLM.from_pretrained(result.model_dir)
    assert _margin(after, tiny_tok, pairs) > _margin(before, tiny_tok, pairs) + 0.5
    info = json.loads((result.model_dir.parent / "align_result.json").read_text())
    assert (info["adapter"] is None) == full and (result.model_dir.parent / "run" / "final").exists() == (not full)
    assert align(cfg).cached


def test_full_finetune_sft_trains_every_parameter(tmp_path, tiny_tok, monkeypatch):
    from transformers import PreTrainedModel

    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    cfg = load_config(None, _overrides(model_dir, "align.full_finetune=true", "align.lr=1e-2"))
    saved_to, save = [], PreTrainedModel.save_pretrained

    def recording_save(self, path, *a, **k):
        saved_to.append(Path(path))
        return save(self, path, *a, **k)

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", recording_save)
    result = align(cfg)
    assert not any(p.name == "final" for p in saved_to), saved_to  # never written, not written then deleted

    base = load_file(str(model_dir / "model.safetensors"))
    aligned = load_file(str(result.model_dir / "model.safetensors"))
    # LoRA on the default target modules never touches the norms or the embeddings; full fine-tuning does
    changed = {k for k in base if not torch.equal(base[k], aligned[k])}
    assert any("norm" in k for k in changed) and any("embed" in k for k in changed)
    assert not (result.model_dir.parent / "run" / "final").exists()  # no second copy of the weights


def test_full_finetune_keeps_an_alignment_defense_working(tmp_path, tiny_tok):
    model_dir = save_tiny_chat_model(tmp_path / "tiny", tiny_tok)
    cfg = load_config(None, _overrides(model_dir, "align.full_finetune=true", "align.defense.name=vaccine"))
    result = align(cfg)
    assert result.metrics["steps"] == 4 and result.metrics["last_loss"] is not None


def test_method_data_and_full_finetune_are_in_the_key_and_old_keys_stay_valid():
    base = load_config(None, [])
    dirs = {aligned_model_dir(c.model, c.align) for c in (
        base, load_config(None, DPO), load_config(None, [*DPO, "align.dpo_beta=0.5"]),
        load_config(None, ["align.full_finetune=true"]), load_config(None, [*DPO, "align.full_finetune=true"]))}
    assert len(dirs) == 5
    # SFT with LoRA keeps the key every model aligned before these options existed was cached under
    old = asdict(base.align)
    for new in ("method", "full_finetune", "dpo_beta", "lora_dropout"):
        old.pop(new)
    assert ALIGN_LORA_DROPOUT == 0.05
    old["benign_excludes"] = list(DEFAULT_BENIGN_SETS)
    key = hashlib.sha256(json.dumps([model_fingerprint(base.model), old], sort_keys=True).encode()).hexdigest()
    assert aligned_model_dir(base.model, base.align) == cache_dir() / "aligned" / key[:16]


@pytest.mark.parametrize("overrides, field", [
    ([*DPO, "align.defense.name=vaccine"], "align.defense"),
    ([*DPO, "align.dpo_beta=0"], "align.dpo_beta"),
    (["align.method=orpo"], "align.method"),
])
def test_bad_alignment_method_options_are_refused_naming_the_field(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_config(None, overrides)


def test_benign_pairs_prefer_the_answer_over_a_refusal_of_another_prompt():
    from spard.jobs.align_data import benign_alignment_records

    plain = load_config(None, [*DPO, "align.n_safety=12"]).align
    mixed = load_config(None, ["align.method=dpo", "align.n_safety=12", "align.n_benign=8"]).align
    harmful_only, both = preference_pairs(plain), preference_pairs(mixed)
    assert len(both) == 20
    refusals = {p.chosen for p in pair_pool()}
    benign = [p for p in both if p.chosen not in refusals]
    assert {p.prompt for p in both} - {p.prompt for p in benign} == {p.prompt for p in harmful_only}
    # the benign half is SFT's benign data, its answer chosen over a real refusal written for another prompt
    sft_benign = benign_alignment_records(mixed)
    assert [(p.prompt, p.chosen) for p in sorted(benign, key=lambda p: p.prompt)] == sorted(
        (r.prompt, r.response) for r in sft_benign)
    pool_prompts = {p.prompt for p in pair_pool()}
    by_refusal = {p.chosen: p.prompt for p in pair_pool()}
    assert all(p.rejected in refusals and by_refusal[p.rejected] not in {q.prompt for q in both} for p in benign)
    assert not {p.prompt for p in benign} & pool_prompts
    held_out = {normalise_prompt(r.prompt) for name in DEFAULT_BENIGN_SETS for r in load_source(name, split="test")}
    assert not {normalise_prompt(p.prompt) for p in benign} & held_out
    assert preference_pairs(mixed) == both  # deterministic
    assert aligned_model_dir(load_config(None, []).model, mixed) != aligned_model_dir(
        load_config(None, []).model, load_config(None, ["align.method=dpo", "align.n_safety=12",
                                                         "align.n_benign=0"]).align)


def test_a_run_attacking_with_a_dpo_pair_prompt_is_refused():
    cfg = load_config(None, [*DPO, "align.n_safety=16"])
    prompt = preference_pairs(cfg.align)[3].prompt
    with pytest.raises(DataError, match="DPO pairs"):
        check_alignment_data_disjoint(cfg, ["an unrelated prompt", prompt])
    check_alignment_data_disjoint(cfg, ["an unrelated prompt"])  # no overlap: no error


@pytest.mark.parametrize(("overrides", "match"), [
    (["align.n_safety=99999", "align.n_benign=0"], r"align.n_safety \+ align.n_benign = 99999"),
    (["align.n_safety=7000", "align.n_benign=1000"], r"align.n_safety \+ align.n_benign = 8000"),
    (["align.n_safety=8", "align.n_benign=2000", "align.benign_source=dolly"], r"align.n_benign=2000"),
])
def test_more_pairs_than_the_packaged_data_holds_is_one_clear_error(overrides, match):
    cfg = load_config(None, ["align.method=dpo", *overrides])
    with pytest.raises(DataError, match=match):
        preference_pairs(cfg.align)


def test_preflight_counts_dpo_pairs_not_sft_examples(tmp_path, monkeypatch):
    from spard.jobs.preflight import plan

    monkeypatch.setenv("SPARD_CACHE", str(tmp_path / "cache"))
    # more harmful pairs than the SFT refusal pool holds: fine for DPO, which draws from its own pairs
    sft_pool = len(load_source("safety"))
    cfg = load_config(None, ["align.method=dpo", f"align.n_safety={sft_pool + 10}", "align.n_benign=5"])
    assert plan(cfg, ("align",), check_model=False).n_align == sft_pool + 15
    too_many = load_config(None, ["align.method=dpo", "align.n_safety=8000", "align.n_benign=0"])
    with pytest.raises(DataError, match=r"align.n_safety \+ align.n_benign = 8000"):
        plan(too_many, ("align",), check_model=False)


def test_a_benign_example_without_an_answer_is_refused_not_paired_with_an_empty_one(monkeypatch):
    import spard.jobs.align_dpo as align_dpo
    from spard.data.records import chat

    monkeypatch.setattr(align_dpo, "benign_alignment_records",
                        lambda align: [chat("Name a colour.", "Blue.", source="x", kind="benign"),
                                       chat("Name a fruit.", None, source="x", kind="benign")])
    cfg = load_config(None, ["align.method=dpo", "align.n_safety=4", "align.n_benign=2"])
    with pytest.raises(DataError, match="have no answer to prefer, e.g. 'Name a fruit.'"):
        preference_pairs(cfg.align)
