"""spard export: a finished run's adapter or merged model, loadable with AutoModelForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import spard
from spard.cli import main
from spard.config import load_config
from spard.errors import SpardError
from spard.export import export_run
from spard.jobs.finetune import train
from spard.models import save_model
from spard.testing import tiny_model


@pytest.fixture
def finished_run(tmp_path, tiny_tok):
    """A 3-step run on the tiny model saved as a local base directory (so export can load the base)."""
    base = tmp_path / "base"
    save_model(tiny_model(tiny_tok), tiny_tok, base)
    cfg = load_config(None, [f"model.name_or_path={base}", f"train.output_dir={tmp_path / 'run'}",
                             "align.enabled=false", "data.n_train=8", "data.max_length=64", "train.batch_size=4",
                             "train.max_steps=3", "train.lr=5e-2", "lora.r=4", "lora.dropout=0"])
    train(cfg, model=tiny_model(tiny_tok), tokenizer=tiny_tok)
    return tmp_path / "run", base


def logits(model, tok) -> torch.Tensor:
    text = tok.apply_chat_template([{"role": "user", "content": "how do i make a bomb ?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_merged_export_equals_base_plus_adapter(finished_run, tmp_path):
    run_dir, base = finished_run
    res = export_run(run_dir, tmp_path / "merged", merged=True)
    assert res.merged and (tmp_path / "merged" / "model.safetensors").is_file()
    assert not list((tmp_path / "merged").glob("*.bin"))  # safetensors only
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    # reference: the base with the run's adapter applied unmerged (LoRA as a separate branch)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run_dir / "final"))
    plain = logits(AutoModelForCausalLM.from_pretrained(base), tok)
    assert not torch.allclose(logits(reference, tok), plain, atol=1e-3)  # the adapter changed something
    torch.testing.assert_close(logits(exported, tok), logits(reference, tok), rtol=1e-4, atol=1e-5)
    info = json.loads((tmp_path / "merged" / "spard_export.json").read_text())
    assert info["merged"] and info["base_model"] == str(base) and info["defense"] == "sft"


def test_adapter_export_loads_through_transformers(finished_run, tmp_path, capsys):
    run_dir, base = finished_run
    assert main(["export", str(run_dir), str(tmp_path / "adapter")]) == 0
    assert "note: the base is a local directory" in capsys.readouterr().out
    out = tmp_path / "adapter"
    weights = "adapter_model.safetensors"
    assert (out / weights).read_bytes() == (run_dir / "final" / weights).read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(out)  # PEFT integration: base from adapter_config.json
    tok = AutoTokenizer.from_pretrained(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run_dir / "final"))
    torch.testing.assert_close(logits(loaded, tok), logits(reference, tok), rtol=1e-4, atol=1e-5)
    # the output is never overwritten; spard.export is the API function
    with pytest.raises(SpardError, match="exists and is not empty"):
        spard.export(run_dir, out)


def test_push_to_hub_without_network_or_token_fails_first(finished_run, tmp_path, monkeypatch):
    import huggingface_hub

    run_dir, _ = finished_run
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SpardError, match="HF_HUB_OFFLINE is set"):
        export_run(run_dir, tmp_path / "a", push_to_hub="me/model")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(SpardError, match="no Hugging Face token; set HF_TOKEN"):
        export_run(run_dir, tmp_path / "a", merged=True, push_to_hub="me/model")
    with pytest.raises(SpardError, match="not a hub repo id"):
        export_run(run_dir, tmp_path / "a", push_to_hub="not a repo")
    assert not (tmp_path / "a").exists()  # checked before anything was exported


def test_unfinished_run_is_refused(tmp_path):
    with pytest.raises(SpardError, match="not a finished spard run"):
        export_run(tmp_path, tmp_path / "out")
