"""Tiny models built in code, for tests and benchmarks that must not need a real checkpoint.

``tiny_tokenizer`` is a word-level tokenizer with a ChatML chat template (the same template shape as
SmolLM2); ``tiny_model`` is a 2-layer Llama with hidden size 32. Both are deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
_WORD = re.compile(r"\w+|[^\w\s]")

# A small vocabulary that covers the words tests use; anything else maps to <unk>.
DEFAULT_WORDS = """
system user assistant you are a helpful the of and to in is it that for on with as this be at by i
how do make can what why when where who which tell me please help write explain give list steps
bomb weapon hack steal kill poison drug attack harm illegal dangerous sorry cannot can't won't will
not no yes sure here answer question math number sum total apples has have had buy buys sells cost
costs dollars each more less than times plus minus equals there were left many much does did
science sun earth water plant plants animal light heat energy which choice option best true false
""".split()


def tiny_tokenizer(extra_texts: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``DEFAULT_WORDS``, digits, punctuation and the words of ``extra_texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = set(DEFAULT_WORDS) | set("0123456789") | set(".,?!:;'\"()-#$%*/+=")
    for text in extra_texts:
        words.update(_WORD.findall(text.lower()))
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for w in sorted(words):
        vocab.setdefault(w, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = None
    from tokenizers import normalizers

    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    backend.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = CHATML_TEMPLATE
    tok.padding_side = "right"
    return tok


def tiny_model(tokenizer: PreTrainedTokenizerFast, *, seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama sized for ``tokenizer``; same seed, same weights."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def assert_same_adapter(dir_a: str | Path, dir_b: str | Path, *, rtol: float = 0.0, atol: float = 1e-7) -> None:
    """Assert two saved LoRA adapters hold the same tensors (same names, values within tolerance)."""
    from safetensors.torch import load_file

    a = load_file(str(Path(dir_a) / "adapter_model.safetensors"))
    b = load_file(str(Path(dir_b) / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0, (sorted(a), sorted(b))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=atol, msg=k)


def save_tiny_chat_model(directory: str | Path, tokenizer: PreTrainedTokenizerFast, *, seed: int = 0) -> Path:
    """Save :func:`tiny_model` and ``tokenizer`` as a local checkpoint (what ``model.name_or_path`` accepts),
    so tests can drive the jobs and the CLI exactly as a user with their own model would."""
    directory = Path(directory)
    tiny_model(tokenizer, seed=seed).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


TINY_RUN_OVERRIDES = (
    "data.task=openbookqa", "data.n_train=16", "data.max_length=64", "attack.harmful_ratio=0.25",
    "train.batch_size=8", "train.max_steps=2", "align.n_safety=8", "align.n_benign=8", "align.max_length=64",
    "eval.tasks=[openbookqa]", "eval.task_limit=2", "eval.harm_limit=3", "eval.harm_max_new_tokens=4",
    "eval.progress=false",
)
"""Overrides that size a run for the tiny model (seconds on a CPU)."""
