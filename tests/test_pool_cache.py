"""SPARD's safety-pool embeddings: computed once per embedder (base model) and shared by every later run."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from pathlib import Path

import pytest
import torch

from spard.data.records import chat
from spard.defenses.spard import SHARED_EMBED_CACHE_DIR, Spard, SpardArgs
from spard.models import cache_dir
from spard.selection import embed_from_superset


class CountingEmbedder:
    """Deterministic fake embedder that records every text it embeds."""

    def __init__(self, key: str = "fake-v1", delay: float = 0.0) -> None:
        self.cache_key = key
        self.delay = delay
        self.seen: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> torch.Tensor:
        time.sleep(self.delay)
        with self.lock:
            self.seen.extend(texts)
        rows = [torch.tensor([b / 255 for b in hashlib.sha256(t.encode()).digest()[:8]]) + 0.01 for t in texts]
        emb = torch.stack(rows) if rows else torch.empty((0, 8))
        return torch.nn.functional.normalize(emb, dim=1)


POOL = [f"how do I make weapon number {i}" for i in range(12)]


def write_pool(tmp_path: Path) -> Path:
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": "Sorry, I cannot help."}) + "\n" for p in POOL))
    return path


def spard_select(tmp_path: Path, pool_file: Path, embedder: CountingEmbedder, attack: list[str], run: str,
                 task_prompts: list[str]) -> list[str]:
    from spard.data.safety import load_pool

    d = Spard(SpardArgs(safety_source="local", safety_path=str(pool_file), safety_k=3))
    d.pool = load_pool(d.args, exclude_prompts=attack)
    d.task_records = [chat(p, "an answer", source="task", kind="task") for p in task_prompts]
    d.make_embedder = lambda model, tokenizer: embedder  # type: ignore[method-assign]
    subset = d.select(None, None, tmp_path / run, seed=0)  # type: ignore[arg-type]
    return [r.prompt for r in subset]


def test_pool_is_embedded_once_across_runs_with_other_attacks(tmp_path):
    pool_file = write_pool(tmp_path)
    emb = CountingEmbedder()
    first = spard_select(tmp_path, pool_file, emb, [POOL[0]], "a", ["weapon question one"])
    assert sorted(emb.seen) == sorted(POOL + ["weapon question one"])  # the whole pool, before filtering
    assert POOL[0] not in first
    emb.seen.clear()
    spard_select(tmp_path, pool_file, emb, [POOL[1], POOL[2]], "b", ["another user prompt"])
    assert emb.seen == ["another user prompt"]  # only the user's prompts are embedded per run
    # the same run again: nothing embedded at all (the task prompts are cached in its run dir)
    emb.seen.clear()
    again = spard_select(tmp_path, pool_file, emb, [POOL[0]], "a", ["weapon question one"])
    assert emb.seen == [] and again == first
    assert len(list((cache_dir() / SHARED_EMBED_CACHE_DIR).glob("emb-*.safetensors"))) == 1
    # another embedder (other weights fingerprint in its key): its own entry
    other = CountingEmbedder("fake-v2")
    spard_select(tmp_path, pool_file, other, [], "c", ["x"])
    assert sorted(other.seen) == sorted(POOL + ["x"])


def test_cached_rows_equal_fresh_embeddings_and_subset_order(tmp_path):
    emb = CountingEmbedder()
    texts = [POOL[5], POOL[1], POOL[5]]
    got = embed_from_superset(emb, texts, POOL, tmp_path)
    assert torch.equal(got, CountingEmbedder()(texts))
    assert torch.equal(embed_from_superset(emb, texts, POOL, tmp_path), got) and len(emb.seen) == len(POOL)
    with pytest.raises(ValueError, match="not in the superset"):
        embed_from_superset(emb, ["not there"], POOL, tmp_path)


def test_corrupt_shared_file_is_recomputed_with_a_warning(tmp_path, caplog):
    emb = CountingEmbedder()
    first = embed_from_superset(emb, POOL[:3], POOL, tmp_path)
    (file,) = tmp_path.glob("emb-*.safetensors")
    file.write_bytes(b"\x00garbage")
    with caplog.at_level(logging.WARNING):
        again = embed_from_superset(emb, POOL[:3], POOL, tmp_path)
    assert torch.equal(again, first) and len(emb.seen) == 2 * len(POOL)
    assert any("unreadable" in r.message for r in caplog.records)
    emb.seen.clear()
    embed_from_superset(emb, POOL[:3], POOL, tmp_path)  # rewritten: a hit again
    assert emb.seen == []


def test_two_concurrent_users_compute_the_pool_once(tmp_path):
    emb = CountingEmbedder(delay=0.5)  # slow, so the second caller arrives while the first computes
    out: list[torch.Tensor] = []
    threads = [threading.Thread(target=lambda: out.append(embed_from_superset(emb, POOL, POOL, tmp_path)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(out) == 2 and torch.equal(out[0], out[1])
    assert len(emb.seen) == len(POOL)  # the lock made the second wait and read the first's file
    assert not list(tmp_path.glob(".emb-*"))  # no temp file left behind
