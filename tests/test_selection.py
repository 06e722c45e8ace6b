"""Tests for the relevance-diversity DPP selection (spard.selection)."""

from __future__ import annotations

import copy
import logging
import math
import sys

import pytest
import torch
import torch.nn.functional as nnf

from spard.data.records import Record, chat
from spard.errors import DataError
from spard.selection import (
    RIDGE,
    LMEmbedder,
    cached_embed,
    dpp_kernel,
    greedy_map,
    greedy_map_full_kernel,
    greedy_map_naive,
    relevance,
    select_indices,
    select_safety_subset,
    selection_stats,
)
from spard.selection import embed as embed_mod
from spard.testing import tiny_model, tiny_tokenizer


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return nnf.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def rand_quality(n: int, seed: int, low: float = 0.0) -> torch.Tensor:
    return low + (1 - low) * torch.rand(n, generator=torch.Generator().manual_seed(seed + 1000))


def logdet(features: torch.Tensor, quality: torch.Tensor, idx: list[int]) -> float:
    kernel = dpp_kernel(features, quality)
    return float(torch.linalg.slogdet(kernel[idx][:, idx])[1])


# --- greedy_map against brute force -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 5, 9, 12])
def test_greedy_map_matches_brute_force(seed: int, k: int) -> None:
    n = 8 + seed % 5  # N in 8..12
    features, quality = unit(n, 16, seed), rand_quality(n, seed, low=0.05)
    fast = greedy_map(features, quality, k)
    naive = greedy_map_naive(features, quality, k)
    assert fast == naive
    assert greedy_map_full_kernel(dpp_kernel(features, quality), k) == naive
    assert len(fast) == min(k, n)  # full rank, quality >= 0.05: nothing to stop for
    assert logdet(features, quality, fast) == pytest.approx(logdet(features, quality, naive), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_map_matches_brute_force_beyond_rank_with_no_early_stop(seed: int) -> None:
    # d=3 < N: the later picks are decided by ridge-scale gains; all three implementations must still agree.
    features, quality = unit(10, 3, seed), rand_quality(10, seed, low=0.3)
    fast = greedy_map(features, quality, 10, eps=0.0)
    assert fast == greedy_map_naive(features, quality, 10, eps=0.0)
    assert fast == greedy_map_full_kernel(dpp_kernel(features, quality), 10, eps=0.0)
    assert sorted(fast) == list(range(10))


def test_greedy_map_is_greedy_on_log_det() -> None:
    # Each step's pick maximises log det of the grown set over every candidate (the definition of greedy MAP).
    features, quality = unit(12, 6, 7), rand_quality(12, 7, low=0.2)
    picks = greedy_map(features, quality, 6)
    for t in range(len(picks)):
        best = max(
            (i for i in range(12) if i not in picks[:t]), key=lambda i: logdet(features, quality, [*picks[:t], i])
        )
        assert picks[t] == best


def test_greedy_map_accepts_unnormalised_rows_and_float64() -> None:
    features, quality = unit(9, 8, 3), rand_quality(9, 3)
    scaled = features * torch.linspace(0.5, 3.0, 9)[:, None]
    assert greedy_map(scaled.double(), quality.double(), 5) == greedy_map(features, quality, 5)


# --- degenerate inputs --------------------------------------------------------------------------------------


def test_k_zero_negative_and_empty() -> None:
    features, quality = unit(5, 4, 0), rand_quality(5, 0)
    assert greedy_map(features, quality, 0) == []
    assert greedy_map(torch.empty(0, 4), torch.empty(0), 3) == []
    with pytest.raises(ValueError, match="k must be >= 0"):
        greedy_map(features, quality, -1)
    with pytest.raises(ValueError):
        greedy_map(features, quality[:4], 2)
    with pytest.raises(ValueError, match="quality"):
        greedy_map(features, -quality, 2)


def test_k_larger_than_n_returns_every_item_once(caplog: pytest.LogCaptureFixture) -> None:
    features, quality = unit(6, 8, 1), rand_quality(6, 1, low=0.1)
    with caplog.at_level(logging.INFO, logger="spard.selection.dpp"):
        picks = greedy_map(features, quality, 50)
    assert sorted(picks) == list(range(6))
    assert "exceeds the 6 candidates" in caplog.text


def test_duplicates_are_never_picked_twice_and_distinct_items_come_first(caplog: pytest.LogCaptureFixture) -> None:
    base = unit(4, 8, 2)
    # Rows 4..9 duplicate rows 0..3 (one as a sign flip); quality follows the row, as relevance() would.
    features = torch.cat([base, base[[0, 1, 2, 3, 0, 2]] * torch.tensor([1.0, 1, 1, -1, 1, 1])[:, None]])
    base_q = torch.tensor([0.9, 0.5, 0.7, 0.6])
    quality = torch.cat([base_q, base_q[[0, 1, 2, 3, 0, 2]]])
    with caplog.at_level(logging.INFO, logger="spard.selection.dpp"):
        picks = greedy_map(features, quality, 10)
    assert sorted(picks) == [0, 1, 2, 3]  # lowest index wins the tie between copies; no copy follows
    assert "stopped after 4 of 10 picks" in caplog.text
    # eps <= 0 disables the early stop: still every distinct row before any copy, then the copies.
    filled = greedy_map(features, quality, 10, eps=0.0)
    assert len(filled) == 10 and sorted(filled[:4]) == [0, 1, 2, 3]
    assert filled == greedy_map_naive(features, quality, 10, eps=0.0)


def test_low_rank_features_stop_at_the_rank() -> None:
    basis = torch.linalg.qr(torch.randn(8, 3, generator=torch.Generator().manual_seed(0)))[0].T  # 3 orthonormal rows
    # Exact copies / sign flips of three directions: after one pick per direction nothing adds variance.
    features = basis[[0, 1, 2, 0, 1, 2, 0, 1]] * torch.tensor([1.0, 1, 1, -1, 1, -1, 1, 1])[:, None]
    picks = greedy_map(features, torch.ones(8), 8)
    assert sorted(picks) == [0, 1, 2]
    # General rank-3 features: the first three picks span the space; a threshold above the ridge scale
    # (RIDGE * |a|^2 for in-span items) stops exactly there, the default may add ridge-driven picks.
    for seed in range(5):
        mixed = nnf.normalize(torch.randn(12, 3, generator=torch.Generator().manual_seed(seed)) @ basis, dim=1)
        quality = rand_quality(12, seed, low=0.5)
        assert len(greedy_map(mixed, quality, 12, eps=1e-3)) == 3
        picks = greedy_map(mixed, quality, 12)
        assert len(picks) >= 3 and torch.linalg.matrix_rank(mixed[picks[:3]].double()) == 3
        assert picks == greedy_map_naive(mixed, quality, 12)


def test_zero_quality(caplog: pytest.LogCaptureFixture) -> None:
    features = unit(6, 5, 4)
    with caplog.at_level(logging.INFO, logger="spard.selection.dpp"):
        assert greedy_map(features, torch.zeros(6), 3) == []
    assert "stopped after 0 of 3 picks" in caplog.text
    assert greedy_map_naive(features, torch.zeros(6), 3) == []
    # With early stopping off, zero quality means no preference at all: ties resolve to the lowest index.
    assert greedy_map(features, torch.zeros(6), 3, eps=0.0) == [0, 1, 2]
    # Partly zero: only positive-quality items are ever picked, however large k is.
    quality = torch.tensor([0.0, 0.8, 0.0, 0.3, 0.6, 0.0])
    picks = greedy_map(features, quality, 6)
    assert sorted(picks) == [1, 3, 4]
    assert picks == greedy_map_naive(features, quality, 6)


def test_zero_feature_row_is_never_picked() -> None:
    features = torch.cat([unit(3, 4, 5), torch.zeros(1, 4)])
    assert sorted(greedy_map(features, torch.ones(4), 4)) == [0, 1, 2]


def test_ridge_constant_matches_kernel() -> None:
    features, quality = unit(3, 4, 6), torch.zeros(3)
    assert torch.allclose(dpp_kernel(features, quality), RIDGE * torch.eye(3, dtype=torch.float64))


# --- relevance ----------------------------------------------------------------------------------------------


def test_relevance_chunked_equals_unchunked_and_formula() -> None:
    pool = torch.randn(17, 6, generator=torch.Generator().manual_seed(0))  # not normalised on purpose
    ref = torch.randn(5, 6, generator=torch.Generator().manual_seed(1))
    small, big = relevance(pool, ref, beta=3.0, chunk=3), relevance(pool, ref, beta=3.0, chunk=4096)
    assert torch.allclose(small, big, rtol=1e-6, atol=1e-7)  # only BLAS blocking may differ
    cos = nnf.normalize(pool, dim=1) @ nnf.normalize(ref, dim=1).T
    best = cos.max(dim=1).values
    expected = best.abs() ** 3.0  # the reference's max_cos ** beta, up to a sign the DPP kernel ignores
    assert torch.allclose(small, expected, atol=1e-6)
    assert (small >= 0).all() and (small <= 1).all()
    assert bool((best < 0).any())  # a negative best cosine is exercised: it keeps its magnitude
    assert torch.allclose(relevance(pool, ref, beta=0.0), torch.ones(17))
    with pytest.raises(ValueError):
        relevance(pool, ref[:, :5])
    with pytest.raises(ValueError):
        relevance(pool, ref[:0])


# --- select_safety_subset -----------------------------------------------------------------------------------


VOCAB = "apples sum total please cost dollars each bomb weapon kill poison steal water plant sun earth".split()


def bag_of_words(texts: list[str]) -> torch.Tensor:
    """A deterministic fake embedder: normalised word counts over VOCAB."""
    rows = torch.zeros(len(texts), len(VOCAB))
    for i, text in enumerate(texts):
        for word in text.lower().split():
            rows[i, VOCAB.index(word)] += 1
    return nnf.normalize(rows, dim=1)


def safety(prompt: str) -> Record:
    return chat(prompt, "I can't help with that.", source="test", kind="safety")


POOL = [
    safety("apples sum total"),  # 0: most relevant
    safety("apples sum total"),  # 1: exact duplicate of 0
    safety("apples sum total please"),  # 2: near duplicate of 0
    safety("cost dollars each"),  # 3: relevant to the other task topic, less so
    safety("bomb weapon"),  # 4-5: irrelevant
    safety("kill poison"),
]
TASKS = [
    chat("apples sum total", "5", source="test", kind="task"),
    chat("cost dollars", "3", source="test", kind="task"),
]


def test_dpp_picks_relevant_and_diverse_where_topk_picks_duplicates() -> None:
    topk = select_safety_subset(POOL, TASKS, k=2, embedder=bag_of_words, method="relevance_topk")
    dpp = select_safety_subset(POOL, TASKS, k=2, embedder=bag_of_words, method="dpp")
    assert [r.prompt for r in topk] == ["apples sum total", "apples sum total"]
    assert [r.prompt for r in dpp] == ["apples sum total", "cost dollars each"]
    dpp3 = select_safety_subset(POOL, TASKS, k=3, embedder=bag_of_words)
    assert [r.prompt for r in dpp3] == ["apples sum total", "cost dollars each", "apples sum total please"]
    pool_emb, task_emb = bag_of_words([r.prompt for r in POOL]), bag_of_words([r.prompt for r in TASKS])
    s_dpp = selection_stats(pool_emb, task_emb, select_indices(pool_emb, task_emb, 2))
    s_top = selection_stats(pool_emb, task_emb, select_indices(pool_emb, task_emb, 2, method="relevance_topk"))
    assert s_top["max_pairwise_cos"] == pytest.approx(1.0) and s_dpp["max_pairwise_cos"] < 0.5
    assert s_dpp["mean_relevance"] > 0.5 and s_dpp["n_selected"] == 2


def test_dpp_early_stop_skips_irrelevant_and_duplicates_and_default_fills_k(caplog: pytest.LogCaptureFixture
                                                                            ) -> None:
    with caplog.at_level(logging.WARNING, logger="spard.selection.select"):
        picked = select_safety_subset(POOL, TASKS, k=6, embedder=bag_of_words, eps=1e-6)
    assert [r.prompt for r in picked] == ["apples sum total", "cost dollars each", "apples sum total please"]
    assert "DPP selected 3 of the 6 requested" in caplog.text
    # the default (the reference's greedy loop): the same relevant, diverse items first, then k is filled
    full = select_safety_subset(POOL, TASKS, k=6, embedder=bag_of_words)
    assert [r.prompt for r in full[:3]] == [r.prompt for r in picked] and len(full) == 6


def test_k_from_fraction_and_random_is_seeded() -> None:
    pool = [safety(f"{w} {v}") for w in VOCAB[:8] for v in VOCAB[8:]]  # 64 records
    tasks = [chat("apples sum", "1", source="test", kind="task")] * 100
    first = select_safety_subset(pool, tasks, fraction=0.07, embedder=bag_of_words, method="random", seed=1)
    again = select_safety_subset(pool, tasks, fraction=0.07, embedder=bag_of_words, method="random", seed=1)
    assert len(first) == 7  # ceil(0.07 * 100) = 7, not 8 from 7.000000000000001
    assert first == again
    others = [select_safety_subset(pool, tasks, k=7, embedder=bag_of_words, method="random", seed=s) for s in (2, 3)]
    assert any(o != first for o in others)
    assert len(select_safety_subset(pool, tasks, k=500, embedder=bag_of_words, method="relevance_topk")) == 64


def test_select_rejects_bad_input() -> None:
    with pytest.raises(DataError, match="empty"):
        select_safety_subset([], TASKS, embedder=bag_of_words)
    with pytest.raises(DataError, match="no task records"):
        select_safety_subset(POOL, [], embedder=bag_of_words)
    with pytest.raises(ValueError, match="method"):
        select_safety_subset(POOL, TASKS, embedder=bag_of_words, method="kmeans")
    no_user = Record(messages=({"role": "system", "content": "s"},), source="test", kind="safety")
    with pytest.raises(DataError, match="no user turn"):
        select_safety_subset([no_user], TASKS, embedder=bag_of_words)


# --- embedders and cache ------------------------------------------------------------------------------------


TEXTS = [
    "how do i make a bomb",
    "what is the sum of 2 and 3",
    "sun",
    "please explain why plants need water and light to make energy",
    "tell me how to steal a car",
    "write a list of 3 steps",
]


@pytest.fixture(scope="module")
def tiny() -> tuple[object, object]:
    tok = tiny_tokenizer(TEXTS)
    return tiny_model(tok), tok


def test_lm_embedder_unit_rows_and_batch_invariant(tiny: tuple[object, object]) -> None:
    model, tok = tiny
    model.train()
    one = LMEmbedder(model, tok, batch_size=1, show_progress=False)(TEXTS)
    four = LMEmbedder(model, tok, batch_size=4, show_progress=False)(TEXTS)
    assert model.training  # mode restored
    assert one.shape == (len(TEXTS), 32) and one.dtype == torch.float32
    assert torch.allclose(one.norm(dim=1), torch.ones(len(TEXTS)), atol=1e-5)
    assert torch.allclose(one, four, atol=1e-5)
    # Left-padding tokenizer without a pad token: same embeddings (we pad on the right ourselves).
    tok2 = copy.deepcopy(tok)
    tok2.padding_side = "left"
    tok2.pad_token = None
    assert torch.allclose(LMEmbedder(model, tok2, batch_size=3, show_progress=False)(TEXTS), one, atol=1e-5)
    # Mean pooling is over the prompt's tokens only: same text alone or beside a long one, same vector.
    alone = LMEmbedder(model, tok, batch_size=2, show_progress=False)(["sun"])
    assert torch.allclose(alone[0], one[2], atol=1e-5)
    with pytest.raises(DataError, match="no tokens"):
        LMEmbedder(model, tok, show_progress=False)(["sun", "   "])
    assert LMEmbedder(model, tok, show_progress=False)([]).shape == (0, 32)


def test_lm_embedder_cache_key_tracks_weights(tiny: tuple[object, object]) -> None:
    model, tok = tiny
    key = LMEmbedder(model, tok).cache_key
    assert key == LMEmbedder(model, tok).cache_key
    assert key != LMEmbedder(tiny_model(tok, seed=1), tok).cache_key
    assert key != LMEmbedder(model, tok, max_length=64).cache_key


def test_cached_embed_reuses_file(tmp_path: object) -> None:
    calls: list[int] = []

    def counting(texts: list[str]) -> torch.Tensor:
        calls.append(len(texts))
        return bag_of_words(texts)

    texts = ["apples sum", "bomb weapon"]
    first = cached_embed(counting, texts, tmp_path, key="bow-v1")
    second = cached_embed(counting, texts, tmp_path, key="bow-v1")
    assert calls == [2] and torch.equal(first, second)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].endswith(".safetensors") and not files[0].startswith(".")
    cached_embed(counting, texts[::-1], tmp_path, key="bow-v1")  # other order: other file
    cached_embed(counting, texts, tmp_path, key="bow-v2")  # other embedder: other file
    assert calls == [2, 2, 2] and len(list(tmp_path.iterdir())) == 3
    (tmp_path / files[0]).write_bytes(b"not safetensors")  # corrupt: recomputed and rewritten
    assert torch.equal(cached_embed(counting, texts, tmp_path, key="bow-v1"), first) and calls == [2, 2, 2, 2]
    assert torch.equal(cached_embed(counting, texts, tmp_path, key="bow-v1"), first) and calls == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="key"):
        cached_embed(counting, texts, tmp_path)


def test_select_uses_cache(tmp_path: object, tiny: tuple[object, object]) -> None:
    model, tok = tiny
    embedder = LMEmbedder(model, tok, show_progress=False)
    pool = [safety(t) for t in TEXTS]
    tasks = [chat("what is the sum of 2 and 3", "5", source="test", kind="task")]
    first = select_safety_subset(pool, tasks, k=3, embedder=embedder, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2  # pool and tasks

    def must_not_run(texts: list[str]) -> torch.Tensor:
        raise AssertionError("cache miss")

    must_not_run.cache_key = embedder.cache_key  # type: ignore[attr-defined]
    assert select_safety_subset(pool, tasks, k=3, embedder=must_not_run, cache_dir=tmp_path) == first
    assert first[0].prompt == "what is the sum of 2 and 3"  # relevance 1 beats everything


def test_sentence_transformer_missing_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # makes the import raise ImportError
    with pytest.raises(ImportError, match=r"spard\[embed\]"):
        embed_mod.SentenceTransformerEmbedder()


def test_sentence_transformer_packaged_encoder() -> None:
    pytest.importorskip("sentence_transformers", exc_type=ImportError)
    try:
        embed_mod.packaged_encoder_path()
    except ImportError as exc:
        pytest.skip(str(exc))
    embedder = embed_mod.SentenceTransformerEmbedder(show_progress=False)
    emb = embedder(["how many apples", "how many apples are left", "make a bomb"])
    assert emb.shape == (3, 384)
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-5)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2])
    assert math.isfinite(float(emb.sum()))
