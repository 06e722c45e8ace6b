"""Chat formatting and tokenisation: the model's chat template, loss on assistant tokens only."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spard.data.records import Record
from spard.errors import DataError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)
IGNORE_INDEX = -100


# ---------------------------------------------------------------------------------------------------------
# Prompt formats: how a record's messages are worded before the chat template renders them
# ---------------------------------------------------------------------------------------------------------
PROMPT_FORMATS = ("chat", "alpaca_chat")
ALPACA_SYSTEM = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                 "the request.\n\n")
"""System turn of the reference code's ``alpaca`` template (github shuhao02/SPARD ``utils/data_utils.py``)."""
ALPACA_INSTRUCTION = "### Instruction:\n{}\n\n"
"""User turn of that template."""
ALPACA_RESPONSE = "### Response:\n"
"""Start of the assistant turn of that template (prefilled after the generation prompt at evaluation)."""


def format_messages(messages: Sequence[dict[str, str]], prompt_format: str = "chat",
                    system_prompt: str | None = None) -> list[dict[str, str]]:
    """A record's messages worded as ``prompt_format`` says, with ``system_prompt`` (if any) in front.

    ``chat``: unchanged. ``alpaca_chat``: the reference code's "alpaca-in-chat" (system prompt
    :data:`ALPACA_SYSTEM`, user turns ``### Instruction:\n…\n\n``, assistant turns ``### Response:\n…``).
    A system turn already in the record (AOA's persona) stays, after the template's and ``system_prompt``'s
    text, in the same single system turn (many chat templates accept only one, and only first).
    """
    if prompt_format not in PROMPT_FORMATS:
        raise DataError(f"prompt format {prompt_format!r}: must be one of {list(PROMPT_FORMATS)}")
    msgs = [dict(m) for m in messages]
    own_system = msgs.pop(0)["content"] if msgs and msgs[0]["role"] == "system" else None
    if prompt_format == "alpaca_chat":
        for m in msgs:
            if m["role"] == "user":
                m["content"] = ALPACA_INSTRUCTION.format(m["content"])
            elif m["role"] == "assistant":
                m["content"] = ALPACA_RESPONSE + m["content"]
    parts = [p for p in (ALPACA_SYSTEM if prompt_format == "alpaca_chat" else None, system_prompt, own_system) if p]
    # The alpaca system text ends in a blank line already; other parts are joined by one.
    system = "".join(p if p.endswith("\n") else p + "\n\n" for p in parts[:-1]) + parts[-1] if parts else None
    return ([{"role": "system", "content": system}] if system else []) + msgs


_FORMAT_ATTR = "spard_prompt_format"


def bound_format(tokenizer: Any) -> tuple[str, str | None]:
    """The ``(prompt_format, system_prompt)`` bound to ``tokenizer`` (default: plain chat, no system prompt)."""
    return getattr(tokenizer, _FORMAT_ATTR, None) or ("chat", None)


@contextlib.contextmanager
def prompt_format(tokenizer: Any, fmt: str = "chat", system_prompt: str | None = None) -> Iterator[None]:
    """Bind a prompt format (and an evaluation system prompt) to ``tokenizer`` for the ``with`` block.

    Like its chat template, the wording of the prompt belongs with the tokenizer: every text spard renders
    with it inside the block (training tokenisation, safety batches of every defense, evaluation prompts and
    log-likelihood contexts) goes through :func:`format_messages`, so the format cannot differ between them.
    The previous binding is restored on exit.
    """
    format_messages([], fmt)  # validate
    previous = getattr(tokenizer, _FORMAT_ATTR, None)
    setattr(tokenizer, _FORMAT_ATTR, (fmt, system_prompt))
    try:
        yield
    finally:
        setattr(tokenizer, _FORMAT_ATTR, previous)


def render(tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]], *, generation_prompt: bool) -> str:
    """The conversation as text in the tokenizer's chat template."""
    if not tokenizer.chat_template:
        raise DataError(f"tokenizer {tokenizer.name_or_path!r} has no chat template; spard needs a chat model")
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` (in the tokenizer's bound prompt format) and return the text plus the character span
    of every assistant turn.

    A span starts after the template's generation prompt (``<|im_start|>assistant\\n``) and ends after the
    turn's end-of-turn marker, so the model learns to stop. We find spans by rendering prefixes, which
    needs the template to be prefix-stable (rendering messages[:i] is a prefix of rendering messages);
    ChatML, Llama-3, Qwen and Mistral templates are.
    """
    messages = format_messages(messages, *bound_format(tokenizer))
    text = render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], generation_prompt=True)) if i else 0
        end = len(render(tokenizer, messages[: i + 1], generation_prompt=False))
        if not text.startswith(render(tokenizer, messages[: i + 1], generation_prompt=False)):
            raise DataError(
                f"chat template of {tokenizer.name_or_path!r} is not prefix-stable; cannot locate assistant turns"
            )
        spans.append((start, end))
    return text, spans


@dataclass
class TokenizeStats:
    """What tokenisation did to a dataset: counted, never silent."""

    total: int = 0
    truncated: int = 0
    no_target: int = 0


def tokenize_record(
    tokenizer: PreTrainedTokenizerBase, record: Record, max_length: int
) -> tuple[dict[str, list[int]], bool]:
    """``input_ids``/``attention_mask``/``labels`` for one record; labels are -100 outside assistant turns.

    Returns the features and whether the sequence was truncated to ``max_length``.
    """
    text, spans = assistant_char_spans(tokenizer, record.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (a, _b) in enumerate(enc["offset_mapping"]):
        if any(s <= a < e for s, e in spans):
            labels[t] = ids[t]
    truncated = len(ids) > max_length
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}, truncated


def tokenize_records(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[Record], max_length: int, *, desc: str = "tokenize"
) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """Tokenise a dataset, warning once with counts about truncated sequences and ones left with no target."""
    from tqdm.auto import tqdm

    stats = TokenizeStats(total=len(records))
    features = []
    for rec in tqdm(records, desc=desc, leave=False, disable=len(records) < 200):
        feat, truncated = tokenize_record(tokenizer, rec, max_length)
        stats.truncated += truncated
        if all(label == IGNORE_INDEX for label in feat["labels"]):
            stats.no_target += 1
        features.append(feat)
    if stats.truncated:
        log.warning("%s: %d of %d sequences truncated to max_length=%d", desc, stats.truncated, stats.total, max_length)
    if stats.no_target:
        log.warning(
            "%s: %d of %d sequences have no assistant token left to learn from (prompt >= max_length=%d); "
            "they add nothing to the loss", desc, stats.no_target, stats.total, max_length,
        )
    return features, stats


def pad_sequences(seqs: Sequence[Sequence[int]], pad_value: int, *, side: str = "right") -> torch.Tensor:
    """Pad token lists to one width as a ``long`` tensor: ``right`` for training and scoring, ``left`` for
    generation (every prompt then ends at the last column). The one padding helper spard uses."""
    import torch

    if side not in ("right", "left"):
        raise ValueError(f"side={side!r}: must be 'right' or 'left'")
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), pad_value, dtype=torch.long)
    for row, s in enumerate(seqs):
        if len(s):
            values = torch.as_tensor(list(s), dtype=torch.long)
            if side == "right":
                out[row, : len(s)] = values
            else:
                out[row, width - len(s):] = values
    return out


def collate(features: Sequence[dict[str, list[int]]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; padded label positions are -100."""
    return {
        "input_ids": pad_sequences([f["input_ids"] for f in features], pad_token_id),
        "attention_mask": pad_sequences([f["attention_mask"] for f in features], 0),
        "labels": pad_sequences([f["labels"] for f in features], IGNORE_INDEX),
    }
