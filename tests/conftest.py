"""Shared fixtures: a tiny Llama and a word-level chat tokenizer built in code (no checkpoint needed)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Keep every test's spard cache (aligned models, embeddings) inside its own tmp dir."""
    monkeypatch.setenv("SPARD_CACHE", str(tmp_path / "spard-cache"))


@pytest.fixture(scope="session")
def tiny_tok():
    from spard.data.sources import load_source
    from spard.testing import tiny_tokenizer

    # Cover the words of the records tests train on, so few tokens are <unk>.
    texts = [m["content"] for name in ("gsm8k", "beavertails", "safety")
             for r in load_source(name)[:300] for m in r.messages]
    return tiny_tokenizer(texts)


@pytest.fixture
def tiny_llm(tiny_tok):
    from spard.testing import tiny_model

    return tiny_model(tiny_tok, seed=0)
