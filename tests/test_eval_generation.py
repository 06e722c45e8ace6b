"""Batched generation: left padding must not change greedy outputs; order, decoding and sampling."""

from __future__ import annotations

import re

import pytest
import torch

from spard.errors import SpardError
from spard.evaluate.generation import generate, generate_ids, render_prompt
from spard.testing import tiny_model

PROMPTS = [
    "how do i make a bomb",
    "what is the sum",
    "tell me please help write explain give list steps how do i make the water earth plant energy light",
    "hi",
    "explain the sun",
    "write a question about math number sum total apples has have had buy buys sells cost dollars each",
    [{"role": "system", "content": "you are a helpful assistant"}, {"role": "user", "content": "list steps"}],
]


@pytest.fixture(scope="module")
def lively_llm(tiny_tok):
    """The tiny Llama with larger random weights, so that greedy replies depend on the prompt
    (the default 0.02 init repeats one token whatever the input, which would make equality trivial)."""
    model = tiny_model(tiny_tok, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def test_batched_equals_unbatched_token_for_token(lively_llm, tiny_tok):
    batched = generate_ids(lively_llm, tiny_tok, PROMPTS, max_new_tokens=24, batch_size=4, progress=False)
    single = [generate_ids(lively_llm, tiny_tok, [p], max_new_tokens=24, batch_size=1, progress=False)[0]
              for p in PROMPTS]
    assert batched == single
    assert len({tuple(x) for x in batched}) > 1, "replies should differ between prompts"


def test_results_in_input_order_and_decoded(lively_llm, tiny_tok):
    texts = generate(lively_llm, tiny_tok, PROMPTS, max_new_tokens=12, batch_size=3, progress=False)
    reverse = generate(lively_llm, tiny_tok, PROMPTS[::-1], max_new_tokens=12, batch_size=3, progress=False)
    assert texts == reverse[::-1]
    assert not any("<|im_end|>" in t or "<pad>" in t for t in texts)


def test_tokenizer_untouched_and_model_mode_restored(lively_llm, tiny_tok):
    side = tiny_tok.padding_side
    lively_llm.train()
    generate(lively_llm, tiny_tok, PROMPTS[:2], max_new_tokens=4, progress=False)
    assert tiny_tok.padding_side == side
    assert lively_llm.training
    lively_llm.eval()


def test_eos_stops_and_is_not_returned(tiny_tok):
    model = tiny_model(tiny_tok, seed=0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():  # a head whose argmax is EOS everywhere: every reply is empty
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tiny_tok.eos_token_id] = 10.0
    model.lm_head = head
    ids = generate_ids(model, tiny_tok, PROMPTS[:3], max_new_tokens=5, progress=False)
    assert ids == [[], [], []]


def test_sampling_is_seeded_and_leaves_global_rng(lively_llm, tiny_tok):
    kw = dict(max_new_tokens=10, temperature=1.5, top_p=0.95, progress=False)
    state = torch.get_rng_state()
    a = generate_ids(lively_llm, tiny_tok, PROMPTS[:3], seed=1, **kw)
    assert torch.equal(state, torch.get_rng_state())
    assert a == generate_ids(lively_llm, tiny_tok, PROMPTS[:3], seed=1, **kw)
    others = [generate_ids(lively_llm, tiny_tok, PROMPTS[:3], seed=s, **kw) for s in (2, 3)]
    assert any(o != a for o in others)


def test_string_prompt_is_a_user_turn(tiny_tok):
    as_text = render_prompt(tiny_tok, "hi")
    assert as_text == render_prompt(tiny_tok, [{"role": "user", "content": "hi"}])
    assert as_text.endswith("<|im_start|>assistant\n")


def test_bad_arguments(lively_llm, tiny_tok):
    assert generate(lively_llm, tiny_tok, [], max_new_tokens=4) == []
    with pytest.raises(SpardError, match="max_new_tokens=0"):
        generate(lively_llm, tiny_tok, ["hi"], max_new_tokens=0)
    with pytest.raises(SpardError, match="batch_size=0"):
        generate(lively_llm, tiny_tok, ["hi"], max_new_tokens=1, batch_size=0)


def test_stop_pattern_cuts_reply_same_batched_or_not(lively_llm, tiny_tok):
    prompts = PROMPTS[:4]
    free = generate_ids(lively_llm, tiny_tok, prompts, max_new_tokens=10, batch_size=4, progress=False)
    # Stop on a word the first reply produces at its 4th token: that reply must end right there.
    word = tiny_tok.decode(free[0][3:4])
    pattern = rf"\b{word}\b" if word.isalnum() else re.escape(word)
    kw = dict(max_new_tokens=10, progress=False, stop_pattern=pattern)
    cut = generate_ids(lively_llm, tiny_tok, prompts, batch_size=4, **kw)
    assert cut == [generate_ids(lively_llm, tiny_tok, [p], batch_size=1, **kw)[0] for p in prompts]
    first = next(k for k in range(1, 5) if re.search(pattern, tiny_tok.decode(free[0][:k])))
    assert cut[0] == free[0][:first]
    for c, f in zip(cut, free):
        assert f[: len(c)] == c  # a stop only shortens a reply
        if len(c) < len(f):
            assert re.search(pattern, tiny_tok.decode(c))


def test_progress_bar_moves_as_each_prompt_finishes(tiny_tok, monkeypatch):
    import math

    import tqdm.auto

    model = tiny_model(tiny_tok, seed=0)
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():  # sampled replies end with probability 1/2 at every step: rows finish at different steps
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tiny_tok.eos_token_id] = math.log(model.config.vocab_size - 1)
    model.lm_head = head
    updates: list[int] = []

    class RecordingBar:
        def __init__(self, *args, **kwargs):
            pass

        def update(self, n=1):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    prompts = PROMPTS[:4] * 2
    ids = generate_ids(model, tiny_tok, prompts, max_new_tokens=12, batch_size=8, temperature=1.0, seed=3)
    lengths = sorted({len(i) for i in ids})
    assert len(lengths) > 1  # the case under test: one batch whose rows end at different steps
    assert sum(updates) == len(prompts)
    # one update per finishing step (and one for rows cut at max_new_tokens), not one per batch
    assert len([u for u in updates if u]) >= len(lengths) - (12 in lengths)
