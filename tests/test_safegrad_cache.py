"""SafeGrad's base-distribution cache: the KL and its gradient from cached base distributions (exact or top-k)
equal / bound those recomputed every step, and a cached run does no adapter-off forward per step."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from spard.alignment_kl import (
    BaseTokens,
    alignment_kl_sum,
    assistant_logits,
    base_token_kl,
    base_tokens,
    cached_alignment_kl_sum,
    packing_matches_padding,
    token_kl,
)
from spard.args import LoraArgs
from spard.config import load_config
from spard.data.build import load_safety_pool, sample
from spard.data.chat import tokenize_records
from spard.data.sources import load_source
from spard.defenses.safegrad import SafeGrad
from spard.errors import ConfigError
from spard.jobs.finetune import train
from spard.testing import assert_same_adapter
from spard.trainer import add_lora
from test_safegrad import alignment_batch, metric_rows, sg_config, sharp_tiny_model


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_exact_cache_gives_token_kl_and_its_gradient(direction):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    base = torch.randn(5, 11, generator=gen, dtype=torch.float64)
    assert BaseTokens.from_logits(base).ids is None
    assert BaseTokens.from_logits(base.to(torch.bfloat16)).scores.dtype == torch.float32  # at least fp32
    assert torch.equal(BaseTokens.from_logits(base).scores, base)  # exact: the raw logits
    got = base_token_kl(x, BaseTokens(F.log_softmax(base, -1)), direction)
    want = token_kl(x, base, direction)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g1, = torch.autograd.grad(got.sum(), x)
    g2, = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-12)


def coarse_kl_brute_force(x: torch.Tensor, base: torch.Tensor, k: int, direction: str) -> torch.Tensor:
    """Independent recomputation: build the (k+1)-outcome distributions with an explicit 0/1 partition matrix
    (the base's top-k tokens one outcome each, the rest one outcome) and take the KL from its definition."""
    p, q = x.softmax(-1), base.softmax(-1)
    out = []
    for t in range(x.shape[0]):
        top = q[t].topk(k).indices
        part = torch.zeros(x.shape[1], k + 1, dtype=x.dtype)
        part[top, torch.arange(k)] = 1
        rest = torch.ones(x.shape[1], dtype=torch.bool)
        rest[top] = False
        part[rest, k] = 1
        pc, qc = p[t] @ part, q[t] @ part
        out.append((qc * (qc.log() - pc.log())).sum() if direction == "forward" else (pc * (pc.log() - qc.log())).sum())
    return torch.stack(out)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_topk_cache_is_the_coarse_grained_kl(direction):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    base = 3 * torch.randn(6, 40, generator=gen, dtype=torch.float64)
    k = 5
    cached = BaseTokens.from_logits(base, topk=k)
    assert cached.scores.dtype == torch.float64 and cached.ids.shape == (6, k)
    got = base_token_kl(x, cached, direction)
    torch.testing.assert_close(got, coarse_kl_brute_force(x.detach(), base, k, direction), rtol=1e-9, atol=1e-12)
    assert torch.all(got <= token_kl(x, base, direction) + 1e-12)  # coarse-graining never adds divergence
    assert torch.autograd.gradcheck(lambda z: base_token_kl(z, cached, direction), (x,))
    # the tail mass is stored in log space, exactly
    torch.testing.assert_close(cached.log_tail.exp() + cached.scores.exp().sum(-1),
                               torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-12)


def test_topk_with_k_at_least_the_vocabulary_is_exact():
    base = torch.randn(3, 7)
    assert BaseTokens.from_logits(base, topk=7).ids is None and BaseTokens.from_logits(base, topk=6).ids is not None


def moved_model(tok):
    """A LoRA model one harmful SGD step away from its base, so the alignment KL is clearly non-zero."""
    model = add_lora(sharp_tiny_model(tok), LoraArgs(r=4, dropout=0.0), seed=0)
    harmful, _ = tokenize_records(tok, load_source("beavertails")[:8], 96)
    from spard.data.chat import collate

    model(**collate(harmful, tok.pad_token_id)).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1.0 * p.grad
                p.grad = None
    return model


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_cached_kl_and_gradient_equal_the_uncached_ones(tiny_tok, direction, packed):
    model = moved_model(tiny_tok)
    feats, _ = tokenize_records(tiny_tok, sample(load_safety_pool("safety"), 4, 0), 96)
    batch = alignment_batch(tiny_tok, n=4)
    params = [p for p in model.parameters() if p.requires_grad]
    kl, n = alignment_kl_sum(model, batch, direction)
    grads = torch.autograd.grad(kl, params)
    pad = tiny_tok.pad_token_id
    bases = [b for f in feats for b in base_tokens(model, [f], pad)]  # each example alone: another padding
    kl_c, n_c = cached_alignment_kl_sum(model, feats, bases, pad, direction, packed=packed)
    grads_c = torch.autograd.grad(kl_c, params)
    assert n == n_c and float(kl.detach()) > 1e-3
    assert float(kl_c.detach()) == pytest.approx(float(kl.detach()), rel=1e-5)
    # fp32 rounding only (the batch vs one example at a time): the gradient as one vector agrees to 1e-5
    flat, flat_c = torch.cat([g.reshape(-1) for g in grads]), torch.cat([g.reshape(-1) for g in grads_c])
    assert float((flat_c - flat).norm()) <= 1e-5 * float(flat.norm()) and float(flat.norm()) > 0
    # top-k: a lower bound, close when k covers most of the mass
    top = base_tokens(model, feats, pad, topk=64)
    kl_k, _ = cached_alignment_kl_sum(model, feats, top, pad, direction)
    assert float(kl_k.detach()) <= float(kl.detach()) * (1 + 1e-5)
    with pytest.raises(ValueError, match="tokens"):
        cached_alignment_kl_sum(model, feats[:2], bases[1:3], pad, direction)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_cached_kl_is_exactly_zero_at_the_identity_adapter(tiny_tok, packed):
    model = add_lora(sharp_tiny_model(tiny_tok), LoraArgs(r=4, dropout=0.1), seed=0)  # LoRA B = 0
    feats, _ = tokenize_records(tiny_tok, sample(load_safety_pool("safety"), 3, 0), 96)
    pad = tiny_tok.pad_token_id
    assert len({len(f["input_ids"]) for f in feats}) > 1  # padded, the batch has padding
    bases = base_tokens(model, feats, pad, packed=packed)  # the cache of this very batch, in the same layout
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    kl, _ = cached_alignment_kl_sum(model, feats, bases, pad, packed=packed)
    grads = torch.autograd.grad(kl, params, allow_unused=True)
    assert float(kl.detach()) == 0.0 and all(g is None or float(g.abs().max()) == 0.0 for g in grads)


def without_packed_masks(monkeypatch):
    """Make transformers build plain causal masks for packed rows, as a model whose attention ignores packing
    would: each packed example then sees the ones before it."""
    import transformers.masking_utils

    monkeypatch.setattr(transformers.masking_utils, "find_packed_sequence_indices", lambda position_ids: None)


def test_packed_forward_equals_the_padded_one_and_the_check_tells_when_it_does_not(tiny_tok, monkeypatch):
    model = moved_model(tiny_tok).eval()
    feats, _ = tokenize_records(tiny_tok, sample(load_safety_pool("safety"), 3, 0), 96)
    pad = tiny_tok.pad_token_id
    lengths = [len(f["input_ids"]) for f in feats]
    assert len(set(lengths)) > 1
    with torch.no_grad():
        padded, counts = assistant_logits(model, feats, pad)
        packed, packed_counts = assistant_logits(model, feats, pad, packed=True)
        # each example alone: no padding, no packing
        alone = torch.cat([assistant_logits(model, [f], pad)[0] for f in feats])
    assert packed_counts == counts and packed.shape == padded.shape == alone.shape
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    torch.testing.assert_close(padded, alone, rtol=0, atol=1e-5)
    same, tv = packing_matches_padding(model, feats, pad)
    assert same and tv < 1e-5

    without_packed_masks(monkeypatch)
    same, tv = packing_matches_padding(model, feats, pad)
    assert not same and tv > 1e-2  # the later examples attend to the earlier ones


def test_safegrad_packs_the_alignment_batch_only_where_the_model_allows_it(tmp_path, tiny_tok, monkeypatch, caplog):
    extra = ("lora.dropout=0", "train.max_steps=2")
    runs = {}
    for name, options in (("packed", ()), ("padded", ("defense.pack_alignment=false",))):
        runs[name] = metric_rows(train(sg_config(tmp_path, name, *extra, *options), model=sharp_tiny_model(tiny_tok),
                                       tokenizer=tiny_tok).run_dir)
    assert runs["packed"][0]["alignment_packed"] == 1.0 and "alignment_packed" not in runs["padded"][0]
    assert runs["packed"][0]["align_kl"] == 0.0  # the cache and the first step share the packed layout
    assert runs["packed"][1]["align_kl"] == pytest.approx(runs["padded"][1]["align_kl"], rel=1e-4)

    without_packed_masks(monkeypatch)
    with caplog.at_level("WARNING", logger="spard.defenses.safegrad"):
        rows = metric_rows(train(sg_config(tmp_path, "fallback", *extra), model=sharp_tiny_model(tiny_tok),
                                 tokenizer=tiny_tok).run_dir)
    assert rows[0]["alignment_packed"] == 0.0 and "does not keep packed examples apart" in caplog.text
    assert rows[1]["align_kl"] == pytest.approx(runs["padded"][1]["align_kl"], rel=1e-4)  # padded after all


def test_args_validate_the_cache_options():
    cfg = load_config(None, ["defense.name=safegrad"])
    assert cfg.defense.base_cache == "auto"
    for bad in ("defense.base_cache=sometimes", "defense.base_cache_topk=0", "defense.base_cache_max_mb=-1"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config(None, ["defense.name=safegrad", bad])


class CountBaseForwards:
    """Counts ``disable_adapter()`` entries (each is one adapter-off forward) after setup."""

    def __init__(self, monkeypatch):
        self.calls = 0
        self.armed = False
        original = SafeGrad.before_optimizer_step
        counter = self

        def step(defense, trainer):
            model = trainer.model
            if not getattr(model, "_counted", False):
                inner = model.disable_adapter

                @contextlib.contextmanager
                def counted():
                    counter.calls += 1
                    with inner():
                        yield

                model.disable_adapter = counted
                model._counted = True
            return original(defense, trainer)

        monkeypatch.setattr(SafeGrad, "before_optimizer_step", step)


@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_cached_run_does_no_base_forward_per_step(tmp_path, tiny_tok, monkeypatch, mode):
    counter = CountBaseForwards(monkeypatch)
    extra = ("lora.dropout=0", "defense.base_cache_topk=512", "train.max_steps=4")
    cached = train(sg_config(tmp_path, mode, f"defense.base_cache={mode}", *extra), model=sharp_tiny_model(tiny_tok),
                   tokenizer=tiny_tok)
    assert counter.calls == 0  # every base distribution came from the setup cache
    rows = metric_rows(cached.run_dir)
    assert rows[0]["base_cache_examples"] == 8  # 4 steps x batch 2 from a stream over 20 examples
    assert "base_cache_examples" not in rows[1]
    assert rows[0]["align_kl"] == 0.0 and rows[0]["align_projected"] == 0.0  # identity adapter: exactly 0
    assert all(r["align_kl"] > 0 for r in rows[1:])


def test_exact_cached_run_matches_the_uncached_run(tmp_path, tiny_tok, monkeypatch):
    counter = CountBaseForwards(monkeypatch)
    cached = train(sg_config(tmp_path, "exact", "defense.base_cache=exact", "lora.dropout=0"),
                   model=sharp_tiny_model(tiny_tok), tokenizer=tiny_tok)
    off = train(sg_config(tmp_path, "none", "defense.base_cache=none", "lora.dropout=0"),
                model=sharp_tiny_model(tiny_tok), tokenizer=tiny_tok)
    assert counter.calls == 6  # without the cache: one adapter-off forward per step
    rows_c, rows_o = metric_rows(cached.run_dir), metric_rows(off.run_dir)
    assert sum(r["align_projected"] for r in rows_o) >= 1  # the surgery branch ran
    assert [r["align_projected"] for r in rows_c] == [r["align_projected"] for r in rows_o]
    for rc, ro in zip(rows_c, rows_o):
        assert rc["align_kl"] == pytest.approx(ro["align_kl"], rel=1e-4, abs=1e-8)
        assert rc["align_cosine"] == pytest.approx(ro["align_cosine"], rel=1e-3, abs=1e-5)
    assert_same_adapter(cached.adapter_dir, off.adapter_dir, rtol=1e-3, atol=1e-5)
