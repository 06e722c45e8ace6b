"""Batched chat generation for evaluation: left padding, length-sorted batches, greedy by default.

Prompts are rendered with the tokenizer's chat template (``add_generation_prompt=True``), tokenised
without extra special tokens (the template already has them), sorted by token length so that each
batch wastes little padding, and left-padded by hand: the tokenizer's ``padding_side`` is never
touched, so callers sharing the tokenizer (training code) see no change. Results come back in the
caller's order. Generation stops at the model's EOS token(s) and the tokenizer's EOS token, and
optionally once the reply matches a regular expression (``stop_pattern``; GSM8K stops after its
``#### N`` line, as lm-evaluation-harness stops on ``until`` strings), the reply then ending at the match.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from spard.data.chat import ALPACA_RESPONSE, bound_format, format_messages, pad_sequences
from spard.data.records import with_system_prompt  # noqa: F401  (evaluation's prompt helper)
from spard.errors import SpardError

Prompt = Sequence[dict[str, str]] | str


def render_prompt(tokenizer: Any, prompt: Prompt) -> str:
    """The text the model sees for ``prompt``: a message list (or a bare string as one user turn)
    through the chat template with the assistant generation prompt appended, worded in the prompt format
    bound to the tokenizer (:func:`spard.data.chat.prompt_format`).

    A tokenizer without a chat template gets bare strings verbatim (base models); a message list
    then is an error, since there is no faithful way to render roles without a template.
    """
    if isinstance(prompt, str):
        if not getattr(tokenizer, "chat_template", None):
            return prompt
        prompt = [{"role": "user", "content": prompt}]
    if not getattr(tokenizer, "chat_template", None):
        raise SpardError("tokenizer has no chat template; pass prompts as plain strings for a base model")
    fmt, system_prompt = bound_format(tokenizer)
    text = tokenizer.apply_chat_template(format_messages(prompt, fmt, system_prompt), add_generation_prompt=True,
                                         tokenize=False)
    # alpaca_chat trains assistant turns as "### Response:\n<answer>": prefill that start, as the reference does
    return text + ALPACA_RESPONSE if fmt == "alpaca_chat" else text


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of each rendered prompt (no padding, no added special tokens)."""
    texts = [render_prompt(tokenizer, p) for p in prompts]
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (the pad positions are masked, so any id works)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise SpardError("tokenizer has neither a pad nor an EOS token; cannot batch prompts")
    return int(pid)


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """All ids that end a reply: the model's generation-config EOS (may be a list) and the tokenizer's."""
    ids: list[int] = []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (cfg_eos, tokenizer.eos_token_id):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


def left_pad(batch: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into ``(input_ids, attention_mask)``."""
    input_ids = pad_sequences(batch, pad_id, side="left")
    mask = pad_sequences([[1] * len(ids) for ids in batch], 0, side="left")
    return input_ids.to(device), mask.to(device)


def _trim(ids: list[int], stop: set[int]) -> list[int]:
    """New tokens up to (not including) the first stop token."""
    out = []
    for t in ids:
        if t in stop:
            break
        out.append(t)
    return out


class _PatternStop(StoppingCriteria):
    """A stopping criterion: a row is done once its decoded new text matches ``pattern``.

    transformers calls it after each step with the whole (prompt + new) ids and expects one bool per row.
    """

    def __init__(self, tokenizer: Any, pattern: re.Pattern[str], prompt_len: int) -> None:
        self.tokenizer, self.pattern, self.prompt_len = tokenizer, pattern, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_len:], skip_special_tokens=True)
        return torch.tensor([self.pattern.search(t) is not None for t in texts], device=input_ids.device)


class _FinishedRowsProgress(StoppingCriteria):
    """Never stops anything: after each decoding step it advances a progress bar by the rows that have just
    emitted an end-of-sequence token, so the bar moves per finished prompt rather than once per batch."""

    def __init__(self, bar: Any, eos_ids: Sequence[int], rows: int) -> None:
        self.bar = bar
        self.eos = torch.tensor(sorted(eos_ids), dtype=torch.long)
        self.done = torch.zeros(rows, dtype=torch.bool)
        self.counted = 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        finished = self.done | torch.isin(input_ids[:, -1].cpu(), self.eos)
        new = int((finished & ~self.done).sum())
        if new:
            self.bar.update(new)
            self.counted += new
        self.done = finished
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _cut_at_pattern(tokenizer: Any, ids: list[int], pattern: re.Pattern[str]) -> list[int]:
    """The shortest prefix of ``ids`` whose text matches ``pattern`` (all of ``ids`` if none does).

    The criterion fires on the step that completes a match; trimming here makes the reply the same
    whether the row stopped itself or ran on inside a batch.
    """
    if pattern.search(tokenizer.decode(ids, skip_special_tokens=True)) is None:
        return ids
    for k in range(1, len(ids) + 1):
        if pattern.search(tokenizer.decode(ids[:k], skip_special_tokens=True)):
            return ids[:k]
    return ids


def generate_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
    stop_pattern: str | None = None,
) -> list[list[int]]:
    """Generate for each prompt and return the new token ids (EOS and padding removed), in input order.

    ``temperature == 0`` is greedy decoding (deterministic); ``temperature > 0`` samples with
    ``top_p`` from a generator seeded with ``seed`` inside a forked RNG, so the caller's global RNG
    state is untouched. Sampled outputs depend on how prompts are batched (they share one RNG stream).
    ``stop_pattern`` (a regex) also ends a reply at the end of its first match.
    """
    from tqdm.auto import tqdm

    if max_new_tokens < 1:
        raise SpardError(f"max_new_tokens={max_new_tokens}: must be >= 1")
    if batch_size < 1:
        raise SpardError(f"batch_size={batch_size}: must be >= 1")
    if temperature < 0:
        raise SpardError(f"temperature={temperature}: must be >= 0")
    if not prompts:
        return []
    pattern = re.compile(stop_pattern) if stop_pattern else None

    encoded = encode_prompts(tokenizer, prompts)
    pad_id = pad_token_id(tokenizer)
    eos_ids = eos_token_ids(model, tokenizer)
    device = model_device(model)
    sampling = temperature > 0
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=sampling,
        # When sampling, explicit values: unset (None) fields are filled from the model's own generation
        # config (chat checkpoints often ship temperature 0.6 / top_p 0.9 / top_k 50); top_k=0 disables
        # top-k. Greedy decoding ignores all three (do_sample=False is explicit).
        temperature=temperature if sampling else None,
        top_p=top_p if sampling else None,
        top_k=0 if sampling else None,
        num_beams=1,
        pad_token_id=pad_id,
        eos_token_id=eos_ids or None,
        bos_token_id=getattr(tokenizer, "bos_token_id", None),
    )

    # Longest first: the memory peak shows up in the first batch, and equal lengths share batches.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]), reverse=True)
    results: list[list[int] | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode():
            torch.manual_seed(seed)
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            bar = tqdm(total=len(order), desc=desc, unit="prompt", disable=not progress, file=sys.stderr, leave=False)
            stop = set(eos_ids)
            for idx in batches:
                # transformers derives position ids from the attention mask (cumsum), so a left-padded
                # row gets the same positions as when run alone; tests check batched == unbatched.
                input_ids, mask = left_pad([encoded[i] for i in idx], pad_id, device)
                width = input_ids.shape[1]
                progress_rows = _FinishedRowsProgress(bar, eos_ids, len(idx))
                criteria = StoppingCriteriaList([progress_rows, *([_PatternStop(tokenizer, pattern, width)]
                                                                 if pattern else [])])
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    generation_config=gen_config,
                    stopping_criteria=criteria,
                )
                new = out[:, width:].tolist()
                for row, i in enumerate(idx):
                    ids = _trim(new[row], stop)
                    results[i] = _cut_at_pattern(tokenizer, ids, pattern) if pattern else ids
                bar.update(len(idx) - progress_rows.counted)  # rows that ran to max_new_tokens or a stop pattern
            bar.close()
    finally:
        model.train(was_training)
    return [r if r is not None else [] for r in results]


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    progress: bool = True,
    desc: str = "generate",
    stop_pattern: str | None = None,
) -> list[str]:
    """Generate a reply to each prompt (chat message lists, or strings taken as one user turn).

    Batched with left padding, greedy unless ``temperature > 0``; returns only the decoded new tokens
    (special tokens skipped), in the order of ``prompts``. See :func:`generate_ids`.
    """
    ids = generate_ids(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
        temperature=temperature, top_p=top_p, seed=seed, progress=progress, desc=desc, stop_pattern=stop_pattern,
    )
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
