"""eval.protocol: heldout (held-out evaluation part, greedy, overlap refused) vs reference (the attack's own
prompts, sampled at temperature 1, overlap allowed and counted), on the tiny model."""

from __future__ import annotations

import pytest

from spard.config import load_config
from spard.data.build import normalise_prompt
from spard.data.sources import load_source
from spard.errors import ConfigError, SpardError
from spard.evaluate import EvalArgs, evaluate_model, format_results_table
from spard.evaluate.harm import load_harm_set


def test_reference_protocol_reads_the_whole_attack_file() -> None:
    held_out = load_harm_set("latharmful")
    whole = load_harm_set("latharmful", protocol="reference")
    assert len(whole) == 495 and len(held_out) == len(load_source("latharmful", split="test")) < 495
    assert load_harm_set("I-MaliciousInstructions", protocol="reference") == load_harm_set("I-MaliciousInstructions")


def test_protocol_switch_on_the_tiny_model(tiny_llm, tiny_tok, tmp_path) -> None:
    # the attack drew from LatHarmful's attack part (spard's default split)
    attack = [r.prompt for r in load_source("latharmful", split="train")]
    common = dict(harm_sets=["latharmful"], harm_limit=4, harm_max_new_tokens=3, tasks=[], progress=False, seed=7)

    heldout = evaluate_model(tiny_llm, tiny_tok, EvalArgs(**common), tmp_path / "h", attack_prompts=attack)
    assert heldout["protocol"] == "heldout" and heldout["overlap"] == {"count": 0, "allowed": False}
    assert heldout["config"]["temperature"] == 0.0

    ref = evaluate_model(tiny_llm, tiny_tok, EvalArgs(**common, protocol="reference"), tmp_path / "r",
                         attack_prompts=attack)
    first4 = {normalise_prompt(r.prompt) for r in load_source("latharmful", split="all")[:4]}
    shared = len(first4 & {normalise_prompt(p) for p in attack})
    assert ref["protocol"] == "reference" and ref["overlap"] == {"count": shared, "allowed": True} and shared > 0
    assert ref["harm"]["latharmful"]["n"] == 4
    assert (ref["config"]["temperature"], ref["config"]["top_p"]) == (1.0, 1.0)
    assert "eval.protocol=reference" in format_results_table(None, ref)
    assert "eval.protocol" not in format_results_table(None, heldout)
    # sampling is seeded: the same seed gives the same replies
    evaluate_model(tiny_llm, tiny_tok, EvalArgs(**common, protocol="reference"), tmp_path / "r2",
                   attack_prompts=attack)
    assert (tmp_path / "r" / "samples_latharmful.jsonl").read_text() == (
        tmp_path / "r2" / "samples_latharmful.jsonl").read_text()
    # ... and it does sample: another seed gives other replies (greedy decoding would not change)
    other = evaluate_model(tiny_llm, tiny_tok, EvalArgs(**{**common, "seed": 8}, protocol="reference"),
                           tmp_path / "r3", attack_prompts=attack)
    assert other["harm"]["latharmful"]["n"] == 4
    assert (tmp_path / "r" / "samples_latharmful.jsonl").read_text() != (
        tmp_path / "r3" / "samples_latharmful.jsonl").read_text()

    # the held-out protocol refuses the same evaluation when the harm set is the attack's own file
    with pytest.raises(SpardError, match="evaluation prompt"):
        evaluate_model(tiny_llm, tiny_tok, EvalArgs(**{**common, "harm_sets": [str(_whole_file(tmp_path))]}),
                       tmp_path / "x", attack_prompts=attack)


def _whole_file(tmp_path):
    import json

    path = tmp_path / "lat_all.jsonl"
    path.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in load_source("latharmful", split="all")))
    return path


def test_protocol_key_is_validated() -> None:
    assert load_config(None, ["eval.protocol=reference"]).eval.overlap_allowed
    assert not load_config(None, []).eval.overlap_allowed
    with pytest.raises(ConfigError, match="eval.protocol"):
        load_config(None, ["eval.protocol=paper"])
