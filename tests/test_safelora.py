"""SafeLoRA: the projection math on hand-made matrices, and the defense on the tiny model."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spard.config import field_docs, load_config
from spard.defenses import get_defense
from spard.defenses.safelora import (
    PROJECTION_FILE,
    UNPROJECTED_DIR,
    SafeLoRA,
    SafeLoRAArgs,
    alignment_projector,
    project_lora_b,
    projected_similarity,
    select_layers,
)
from spard.errors import ConfigError
from spard.jobs.finetune import train
from spard.testing import tiny_model


def m(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------------------
# the projection math: hand-computed cases
# ---------------------------------------------------------------------------------------------------------
def test_projector_hand_computed_and_rank():
    v = m([3, 0], [0, 4], [0, 0])  # ‖V‖_F = 5, V Vᵀ = diag(9, 16, 0)
    c = alignment_projector(v)
    torch.testing.assert_close(c, torch.diag(torch.tensor([1.8, 3.2, 0.0])))
    assert torch.linalg.matrix_rank(c) == 2  # the rank of V, not of the 3-dim output space
    rank_one = m([1, 2], [2, 4], [3, 6])  # columns parallel: rank 1
    assert torch.linalg.matrix_rank(alignment_projector(rank_one)) == 1
    # not idempotent (the reference's C is not an exact projector): C² = diag(3.24, 10.24, 0) ≠ C
    assert not torch.allclose(c @ c, c)


def test_factored_projection_matches_explicit_projector():
    gen = torch.Generator().manual_seed(0)
    v, b = torch.randn(7, 5, generator=gen), torch.randn(7, 3, generator=gen)
    torch.testing.assert_close(project_lora_b(v, b), alignment_projector(v) @ b, rtol=1e-5, atol=1e-6)


def test_similarity_hand_computed():
    v = m([3, 0], [0, 4], [0, 0])
    a = torch.eye(2)                                   # r = 2, in = 2
    b = m([1, 0], [0, 0], [0, 1])                     # ΔW = B: one column in the subspace, one outside
    # C ΔW = [[1.8, 0], [0, 0], [0, 0]]: <CΔW, ΔW> = 1.8, ‖CΔW‖ = 1.8, ‖ΔW‖ = √2  →  cos = 1/√2
    assert projected_similarity(v, a, b) == round(1 / 2**0.5, 5) == 0.70711
    # an update orthogonal to the alignment subspace projects to zero: cosine 0
    assert projected_similarity(v, a, m([0, 0], [0, 0], [1, 1])) == 0.0


def test_update_inside_the_alignment_subspace_has_similarity_one_and_is_not_selected():
    v = m([1, 0], [0, 1], [0, 0])                     # equal singular values: C = diag(1, 1, 0)/√2 on the subspace
    a = m([1, 2], [3, -1])
    b = m([2, 1], [-1, 1], [0, 0])                     # ΔW = B A lies in span(V)
    assert projected_similarity(v, a, b) == 1.0
    chosen, _ = select_layers({"inside": 1.0, "outside": 0.2}, "threshold", threshold=0.5)
    assert chosen == ["outside"]


def test_similarity_against_brute_force_float64():
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        v, a, b = torch.randn(6, 5, generator=gen), torch.randn(2, 5, generator=gen), torch.randn(6, 2, generator=gen)
        vv, aa, bb = v.double().numpy(), a.double().numpy(), b.double().numpy()
        c = vv @ vv.T / np.linalg.norm(vv)
        dw, pw = bb @ aa, c @ bb @ aa
        expected = float((dw * pw).sum() / (np.linalg.norm(dw) * np.linalg.norm(pw)))
        assert projected_similarity(v, a, b) == pytest.approx(expected, abs=2e-5), seed


def test_select_layers_threshold_number_and_ties():
    sims = {"a": 0.2, "b": 0.5, "c": 0.9}
    assert select_layers(sims, "threshold", threshold=0.5) == (["a", "b"], 0.5)  # <=, as the reference
    assert select_layers(sims, "threshold", threshold=0.1) == ([], 0.1)
    assert select_layers(sims, "number", number=1) == (["a"], 0.2)
    assert select_layers(sims, "number", number=2) == (["a", "b"], 0.5)
    assert select_layers(sims, "number", number=10) == (["a", "b", "c"], 0.9)  # more than there are: all
    tied = {"q0": 0.3, "v0": 0.1, "q1": 0.3, "v1": 0.8}
    assert select_layers(tied, "number", number=2) == (["q0", "v0", "q1"], 0.3)  # the tie at the cut-off joins


# ---------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------
def test_args_defaults_docs_and_validation():
    cfg = load_config(None, ["defense.name=safelora"])
    assert isinstance(cfg.defense, SafeLoRAArgs) and get_defense("safelora") is SafeLoRA
    d = cfg.defense
    assert (d.unaligned_model, d.select_layers_type, d.threshold, d.num_proj_layers) == ("embedded", "number", 0.5, 10)
    docs = field_docs(SafeLoRAArgs)
    for name in ("unaligned_model", "unaligned_revision", "select_layers_type", "threshold", "num_proj_layers"):
        assert docs.get(name), name
    for override, match in [("defense.select_layers_type=all", "defense.select_layers_type='all'"),
                            ("defense.threshold=2", "defense.threshold=2"),
                            ("defense.num_proj_layers=0", "defense.num_proj_layers=0"),
                            ("defense.unaligned_model=", "defense.unaligned_model")]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["defense.name=safelora", override])


# ---------------------------------------------------------------------------------------------------------
# the defense on the tiny model
# ---------------------------------------------------------------------------------------------------------
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def aligned_pair(tok, tmp_path):
    """An "unaligned" tiny model saved to disk and an "aligned" copy whose attention weights are perturbed."""
    unaligned = tiny_model(tok, seed=0)
    unaligned.save_pretrained(tmp_path / "unaligned", safe_serialization=True)
    aligned = tiny_model(tok, seed=0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in aligned.named_parameters():
            if any(t in name for t in TARGETS):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return aligned, tmp_path / "unaligned"


def sl_config(tmp_path, name, unaligned_dir, *extra):
    return load_config(None, [
        f"train.output_dir={tmp_path / name}", "align.enabled=false", "data.task=gsm8k", "data.n_train=24",
        "data.max_length=64", "attack.harmful_ratio=0.25", "train.batch_size=4", "train.max_steps=4",
        "train.lr=0.01", "lora.dropout=0", "lora.r=4", "train.save_steps=100", "defense.name=safelora",
        f"defense.unaligned_model={unaligned_dir}", *extra,
    ])


def adapter_key(base_key, which):
    """``model.layers.0.self_attn.q_proj.weight`` -> the saved adapter's lora_A / lora_B key."""
    return f"base_model.model.{base_key.removesuffix('.weight')}.lora_{which}.weight"


# Pinned: logged loss at steps 1-4 (SafeLoRA does not touch training: plain SFT on the perturbed tiny model, r 4),
# and the cosine of each module after step 4, sorted. Re-pin only for an intended change, and say why.
PINNED_LOSSES = [8.783778, 8.791306, 8.798952, 8.766288]


def test_final_holds_projected_b_for_exactly_the_selected_modules(tmp_path, tiny_tok):
    aligned, unaligned_dir = aligned_pair(tiny_tok, tmp_path)
    aligned_weights = {k: v.clone() for k, v in aligned.state_dict().items()}
    res = train(sl_config(tmp_path, "run", unaligned_dir, "defense.num_proj_layers=3"), model=aligned,
                tokenizer=tiny_tok)
    run = res.run_dir
    before = load_file(str(run / UNPROJECTED_DIR / "adapter_model.safetensors"))
    after = load_file(str(run / "final" / "adapter_model.safetensors"))
    unaligned = load_file(str(unaligned_dir / "model.safetensors"))
    keys = [f"model.layers.{i}.self_attn.{t}.weight" for i in range(2) for t in TARGETS]
    # independent recomputation in float64 with the explicit projector
    sims, projected_b = {}, {}
    for k in keys:
        v = (aligned_weights[k] - unaligned[k]).double()
        c = v @ v.T / torch.linalg.matrix_norm(v)
        a, b = before[adapter_key(k, "A")].double(), before[adapter_key(k, "B")].double()
        dw = b @ a
        sims[k] = float(torch.nn.functional.cosine_similarity((c @ dw).reshape(1, -1), dw.reshape(1, -1)))
        projected_b[k] = c @ b
    lowest = sorted(keys, key=sims.get)[:3]
    for k in keys:
        torch.testing.assert_close(after[adapter_key(k, "A")], before[adapter_key(k, "A")], rtol=0, atol=0)
        if k in lowest:
            torch.testing.assert_close(after[adapter_key(k, "B")].double(), projected_b[k], rtol=1e-5, atol=1e-7)
            assert not torch.allclose(after[adapter_key(k, "B")], before[adapter_key(k, "B")])
        else:
            torch.testing.assert_close(after[adapter_key(k, "B")], before[adapter_key(k, "B")], rtol=0, atol=0)
    report = json.loads((run / UNPROJECTED_DIR / PROJECTION_FILE).read_text())
    assert {r["module"] for r in report["modules"] if r["projected"]} == set(lowest)
    for r in report["modules"]:
        assert r["similarity"] == pytest.approx(sims[r["module"]], abs=2e-5)
    assert res.metrics["defense/safelora_projected"] == 3.0 and res.metrics["defense/safelora_modules"] == 8.0
    assert res.metrics["defense/safelora_projection_seconds"] >= 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["loss"], 6) for r in rows] == pytest.approx(PINNED_LOSSES, abs=1e-4)
    assert sorted(sims.values()) == pytest.approx(PINNED_SIMILARITIES, abs=1e-4), sorted(sims.values())


PINNED_SIMILARITIES = [0.66076, 0.69542, 0.72166, 0.73197, 0.78152, 0.81103, 0.85224, 0.87953]


def test_threshold_mode_and_the_subspace_case_on_a_peft_model(tiny_tok):
    """``project`` on an in-memory LoRA model: a module whose update lies in span(V) keeps its B; threshold
    mode projects exactly the modules at or below the threshold."""
    from spard.config import LoraArgs
    from spard.trainer import add_lora

    model = add_lora(tiny_model(tiny_tok), LoraArgs(r=2, dropout=0.0, target_modules=["q_proj", "v_proj"]), seed=0)
    gen = torch.Generator().manual_seed(1)
    unaligned, originals = {}, {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "v_proj")) and hasattr(module, "lora_B"):
                key = name.removeprefix("base_model.model.") + ".weight"
                w = module.get_base_layer().weight
                b = module.lora_B["default"].weight
                b.copy_(torch.randn(b.shape, generator=gen))
                if key == "model.layers.0.self_attn.q_proj.weight":
                    # V's columns span B's column space with equal singular values: ΔW = B A ⊂ span(V), cos = 1
                    q, _ = torch.linalg.qr(b)
                    v = torch.zeros_like(w)
                    v[:, : q.shape[1]] = q
                else:  # a rank-1 direction: ΔW mostly outside it, so low cosines
                    out_dir, in_dir = torch.randn(w.shape[0], generator=gen), torch.randn(w.shape[1], generator=gen)
                    v = 0.05 * torch.outer(out_dir, in_dir)
                unaligned[key] = w - v
                originals[key] = b.clone()
    defense = SafeLoRA(SafeLoRAArgs(unaligned_model="unused", select_layers_type="threshold", threshold=0.2))
    stats = defense.project(model, unaligned)
    inside = "model.layers.0.self_attn.q_proj.weight"
    assert defense.similarities[inside] == 1.0 and inside not in defense.projected
    # cosines here: q0 1.0 (inside), v0 0.156, q1 0.298, v1 0.094: threshold 0.2 projects v0 and v1 only
    assert defense.projected == [k for k, c in defense.similarities.items() if c <= 0.2]
    assert len(defense.projected) == 2 and len(defense.similarities) == 4
    assert stats["safelora_projected"] == 2 and stats["safelora_cutoff"] == 0.2
    for name, module in model.named_modules():
        key = name.removeprefix("base_model.model.") + ".weight"
        if key in originals:
            b = module.lora_B["default"].weight
            if key in defense.projected:
                v = module.get_base_layer().weight - unaligned[key]
                torch.testing.assert_close(b, alignment_projector(v) @ originals[key], rtol=1e-5, atol=1e-6)
            else:
                assert torch.equal(b, originals[key]), key


def test_identical_weights_give_a_clear_error(tiny_tok):
    from spard.config import LoraArgs
    from spard.trainer import add_lora

    model = add_lora(tiny_model(tiny_tok), LoraArgs(r=2), seed=0)
    same = {k.removeprefix("base_model.model.").replace(".base_layer", ""): v
            for k, v in model.state_dict().items() if "base_layer" in k}
    with pytest.raises(ConfigError, match="no alignment direction"):
        SafeLoRA(SafeLoRAArgs()).project(model, same)
