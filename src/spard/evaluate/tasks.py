"""Utility tasks: GSM8K (generation, answer extraction as in lm-evaluation-harness) and OpenBookQA
(log-likelihood ranking of the four choices, or a generated answer letter).

A task is a small class with ``name``, ``load(split, limit, path)``, ``evaluate(model, tokenizer,
records, args) -> (metrics, samples)``; generative tasks only define ``prompt``, ``score`` and
``aggregate``. Adding SST-2 or AG News is one more class and one entry in :data:`TASKS`.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from spard.data.records import Record
from spard.data.sources import OBQA_LETTERS, load_source
from spard.errors import DataError, SpardError
from spard.evaluate.metrics import accuracy

# ---------------------------------------------------------------------------------------------------------
# GSM8K answer extraction
# ---------------------------------------------------------------------------------------------------------
# lm-evaluation-harness tasks/gsm8k/gsm8k.yaml (v3): "strict-match" takes the first "#### N";
# "flexible-extract" takes the last number-like run (group_select -1). Both then drop ",", "$" and a
# trailing "." (its regexes_to_ignore) before an exact string match with the gold answer.
GSM8K_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
GSM8K_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")


def normalise_number(text: str) -> str | None:
    """Canonical form of an extracted number: no ``,``/``$``, no trailing ``.``, and (beyond lm-eval,
    which would count "18.00" wrong against "18") no trailing zeros after a decimal point, so
    ``"1,234"`` -> ``"1234"``, ``"$18.00"`` -> ``"18"``, ``"2.50"`` -> ``"2.5"``, ``"-3.5"`` stays.
    None when no digit is left (a flexible match such as ``".."``)."""
    s = text.strip().replace(",", "").replace("$", "").rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s == "-0":
        s = "0"
    return s if any(c.isdigit() for c in s) else None


def extract_gsm8k_answer(text: str, mode: str = "strict") -> str | None:
    """The final answer in a GSM8K reply, normalised by :func:`normalise_number`; None if none.

    ``mode="strict"``: the first ``#### N`` (lm-eval strict-match). ``mode="flexible"``: the last
    number-like match anywhere (lm-eval flexible-extract), skipping matches without a digit.
    """
    if mode == "strict":
        m = GSM8K_STRICT.search(text)
        return normalise_number(m.group(1)) if m else None
    if mode == "flexible":
        for groups in reversed(GSM8K_FLEXIBLE.findall(text)):
            value = normalise_number(groups[0] or groups[1])
            if value is not None:
                return value
        return None
    raise ValueError(f"extract_gsm8k_answer: mode={mode!r} must be 'strict' or 'flexible'")


def gsm8k_gold(answer_field: str) -> str:
    """The gold number of a GSM8K ``answer`` field (its ``#### N`` line)."""
    gold = extract_gsm8k_answer(answer_field, "strict")
    if gold is None:
        raise DataError(f"GSM8K answer field has no '#### N' line: {answer_field[-80:]!r}")
    return gold


def gsm8k_is_correct(text: str, gold_answer_field: str, mode: str = "flexible") -> bool:
    """Whether the reply's extracted answer equals the gold answer (from the ``#### N`` answer field)."""
    pred = extract_gsm8k_answer(text, mode)
    return pred is not None and pred == gsm8k_gold(gold_answer_field)


# ---------------------------------------------------------------------------------------------------------
# OpenBookQA helpers
# ---------------------------------------------------------------------------------------------------------
_LETTER_PATTERNS = [
    # "The answer is B", "Answer: C", "answer is option (D)"; the letter itself must be upper case
    re.compile(r"(?i:answer)\s*(?:(?i:is)|:)?\s*(?:(?i:option)\s*)?\(?([A-D])\b"),
    re.compile(r"^\s*\(?([A-D])(?:[\).:]|\s*$)"),  # reply is/opens with the letter: "B", "B.", "(B)"
    re.compile(r"\banswer\s*([1-4])\b", re.IGNORECASE),  # "answer2" / "answer 2" numbering
    re.compile(r"\(([A-D])\)"),  # "(B)" anywhere
    re.compile(r"\b([A-D])[\.:](?:\s|$)"),  # "B." / "B:" anywhere
]


def parse_choice(text: str, choices: Sequence[str]) -> int | None:
    """Index of the choice a generated reply picks: an explicit letter (``answer is B``, a leading
    ``B.``/``(B)``), ``answerN`` numbering, or else the one choice whose text the reply contains."""
    for pattern in _LETTER_PATTERNS:
        m = pattern.search(text)
        if m:
            token = m.group(1)
            idx = int(token) - 1 if token.isdigit() else OBQA_LETTERS.index(token.upper())
            if idx < len(choices):
                return idx
    folded = text.casefold()
    hits = [i for i, c in enumerate(choices) if c.strip() and c.strip().casefold() in folded]
    return hits[0] if len(hits) == 1 else None


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def obqa_loglik_requests(record: Record, fmt: str = "cloze") -> tuple[list[dict[str, str]], list[str]]:
    """The (context messages, continuations) whose log-likelihoods rank an OpenBookQA question.

    ``cloze`` (lm-eval's openbookqa.yaml adapted to a chat model): the user turn is the bare question
    stem and each continuation is a choice's text as the start of the assistant reply (lm-eval's " "
    delimiter is dropped: the chat template already ends the context with the assistant header).
    ``letter``: the user turn lists the lettered choices and each continuation is its letter.
    """
    choices = list(record.meta["choices"])
    if fmt == "cloze":
        return _user(str(record.meta["stem"]).strip()), [c.strip() for c in choices]
    if fmt == "letter":
        return _user(record.prompt), list(OBQA_LETTERS[: len(choices)])
    raise ValueError(f"obqa format {fmt!r} must be 'cloze' or 'letter'")


# ---------------------------------------------------------------------------------------------------------
# Log-likelihood of continuations (batched forward passes)
# ---------------------------------------------------------------------------------------------------------
def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, as lm-eval does: the continuation is the tail of the
    tokenised ``context + continuation`` beyond the tokenised context (so merges at the boundary
    tokenise as the model would read them); if the context does not tokenise as a prefix, the two are
    tokenised separately. Unlike lm-eval, trailing whitespace stays in the context: it is part of the
    chat template (the newline after the assistant header), not of the answer."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return list(ctx), list(whole[len(ctx):])
    return list(ctx), list(tokenizer(continuation, add_special_tokens=False)["input_ids"])


def loglikelihoods(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[tuple[list[int], list[int]]],
    *,
    batch_size: int = 16,
    progress: bool = False,
) -> list[float]:
    """Sum of log p(continuation token | everything before it) for each (context ids, continuation ids).

    Sequences are sorted by length and right-padded into batches of ``batch_size``; log-softmax is
    taken in float32 at the continuation positions only. Results come back in input order.
    """
    import sys

    import torch
    from tqdm.auto import tqdm

    from spard.evaluate.generation import model_device, pad_token_id

    for i, (ctx, cont) in enumerate(pairs):
        if not ctx or not cont:
            raise SpardError(f"loglikelihood request {i}: empty context or continuation")
    device, pad = model_device(model), pad_token_id(tokenizer)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]), reverse=True)
    out: list[float] = [0.0] * len(pairs)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            for idx in tqdm(batches, desc="loglik", unit="batch", disable=not progress, file=sys.stderr, leave=False):
                seqs = [(pairs[i][0] + pairs[i][1])[:-1] for i in idx]  # the last token predicts nothing
                width = max(map(len, seqs))
                ids = torch.full((len(seqs), width), pad, dtype=torch.long)
                mask = torch.zeros((len(seqs), width), dtype=torch.long)
                for row, s in enumerate(seqs):
                    ids[row, : len(s)] = torch.tensor(s)
                    mask[row, : len(s)] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for row, i in enumerate(idx):
                    ctx, cont = pairs[i]
                    start = len(ctx) - 1  # logits at position t predict token t + 1
                    lp = logits[row, start:start + len(cont)].float().log_softmax(-1)
                    target = torch.tensor(cont, device=lp.device).unsqueeze(-1)
                    out[i] = float(lp.gather(-1, target).sum())
    finally:
        model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------------
class Task(ABC):
    """A utility task. Subclasses set ``name``/``source`` and implement :meth:`evaluate`."""

    name: str = ""
    source: str = ""

    def load(self, split: str = "test", limit: int | None = None, path: str | None = None) -> list[Record]:
        """The first ``limit`` records of ``split`` (packaged copy, or ``path``: a file or hub id)."""
        records = load_source(self.source, split=split, path=path, limit=limit)
        if not records:
            raise DataError(f"task {self.name}: split {split!r} has no records")
        return records

    @abstractmethod
    def evaluate(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Score the model on ``records``; returns ``(metrics, samples)``."""


class GenerativeTask(Task):
    """A task scored on generated replies: ``prompt`` -> generate -> ``score`` each -> ``aggregate``.

    ``stop_pattern`` (a regex) ends a reply once it matches, besides EOS."""

    stop_pattern: str | None = None

    def prompt(self, record: Record, args: Any) -> list[dict[str, str]]:
        return [m for m in record.messages if m["role"] != "assistant"]

    @abstractmethod
    def max_new_tokens(self, args: Any) -> int:
        """Reply length for this task."""

    @abstractmethod
    def score(self, record: Record, response: str) -> dict[str, Any]:
        """Sample fields for one reply; must include ``correct``."""

    def aggregate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        return {"n": len(samples), "accuracy": accuracy([s["correct"] for s in samples])}

    def evaluate(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from spard.evaluate.generation import generate

        prompts = [self.prompt(r, args) for r in records]
        t0 = time.perf_counter()
        responses = generate(model, tokenizer, prompts, max_new_tokens=self.max_new_tokens(args),
                             batch_size=args.batch_size, temperature=args.temperature, top_p=args.top_p,
                             seed=args.seed, progress=args.progress, desc=self.name, stop_pattern=self.stop_pattern)
        elapsed = time.perf_counter() - t0
        samples = []
        for i, (rec, msgs, resp) in enumerate(zip(records, prompts, responses)):
            samples.append({"index": i, "prompt": msgs[-1]["content"], "response": resp, **self.score(rec, resp)})
        metrics = self.aggregate(samples)
        metrics["timings"] = {"generate_s": round(elapsed, 3)}
        return metrics, samples


class GSM8K(GenerativeTask):
    """GSM8K zero-shot with chain of thought: the user turn is ``args.gsm8k_prompt`` around the question
    (by default it asks for a final ``#### <number>`` line, the format of GSM8K's own answers, so
    strict-match works before fine-tuning too). Generation stops after the first ``#### N`` line.
    Reports strict and flexible accuracy; ``accuracy`` is the flexible one."""

    name = source = "gsm8k"
    # Stop after the first complete "#### N" line: the answer is given, and small models otherwise
    # often repeat that line until max_new_tokens (lm-eval's gsm8k stops on "Question:" likewise).
    stop_pattern = r"####[^\n]*\d[^\n]*\n"

    def prompt(self, record: Record, args: Any) -> list[dict[str, str]]:
        return _user(args.gsm8k_prompt.replace("{question}", record.prompt))

    def max_new_tokens(self, args: Any) -> int:
        return args.gsm8k_max_new_tokens

    def score(self, record: Record, response: str) -> dict[str, Any]:
        gold_field = record.meta.get("answer") or record.response
        if not gold_field:
            raise DataError(f"gsm8k record has no answer field: {record.prompt[:60]!r}")
        gold = gsm8k_gold(gold_field)
        strict, flexible = extract_gsm8k_answer(response, "strict"), extract_gsm8k_answer(response, "flexible")
        return {"gold": gold, "strict": strict, "flexible": flexible,
                "correct_strict": strict == gold, "correct": flexible == gold}

    def aggregate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        flexible = accuracy([s["correct"] for s in samples])
        return {"n": len(samples), "accuracy": flexible, "flexible": flexible,
                "strict": accuracy([s["correct_strict"] for s in samples])}


class OpenBookQA(GenerativeTask):
    """OpenBookQA: ``args.obqa_mode == "loglik"`` ranks the four choices by summed log-likelihood
    (``acc``) and by log-likelihood per character of the choice text (``acc_norm``, the headline
    ``accuracy`` in the cloze format), as lm-eval;
    ``"generate"`` parses the answer letter from a reply to the lettered question (``acc``)."""

    name = source = "openbookqa"

    def max_new_tokens(self, args: Any) -> int:
        return args.obqa_max_new_tokens

    def score(self, record: Record, response: str) -> dict[str, Any]:
        gold = int(record.meta["gold"])
        pred = parse_choice(response, record.meta["choices"])
        return {"gold": OBQA_LETTERS[gold], "pred": OBQA_LETTERS[pred] if pred is not None else None,
                "correct": pred == gold}

    def aggregate(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        acc = accuracy([s["correct"] for s in samples])
        return {"n": len(samples), "mode": "generate", "accuracy": acc, "acc": acc,
                "unparsed": sum(s["pred"] is None for s in samples)}

    def evaluate(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                 ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        if args.obqa_mode == "generate":
            return super().evaluate(model, tokenizer, records, args)
        return self.evaluate_loglik(model, tokenizer, records, args)

    def evaluate_loglik(self, model: Any, tokenizer: Any, records: Sequence[Record], args: Any
                        ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from spard.evaluate.generation import render_prompt

        fmt = args.obqa_format
        pairs, spans, conts = [], [], []
        for rec in records:
            messages, continuations = obqa_loglik_requests(rec, fmt)
            context = render_prompt(tokenizer, messages)
            spans.append((len(pairs), len(continuations)))
            conts.append(continuations)
            pairs.extend(encode_pair(tokenizer, context, c) for c in continuations)
        t0 = time.perf_counter()
        lls = loglikelihoods(model, tokenizer, pairs, batch_size=args.batch_size, progress=args.progress)
        elapsed = time.perf_counter() - t0

        samples = []
        for i, (rec, (start, k), continuations) in enumerate(zip(records, spans, conts)):
            ll = lls[start:start + k]
            # acc_norm divides by the character length of the continuation (the choice text, or the
            # letter), as lm-eval's completion_len does.
            norm = [x / max(len(c), 1) for x, c in zip(ll, continuations)]
            gold = int(rec.meta["gold"])
            pred, pred_norm = max(range(k), key=ll.__getitem__), max(range(k), key=norm.__getitem__)
            samples.append({
                "index": i, "prompt": rec.meta["stem"] if fmt == "cloze" else rec.prompt,
                "continuations": continuations, "loglik": [round(x, 4) for x in ll],
                "gold": OBQA_LETTERS[gold], "pred": OBQA_LETTERS[pred], "pred_norm": OBQA_LETTERS[pred_norm],
                "correct": pred == gold, "correct_norm": pred_norm == gold,
            })
        acc, acc_norm = accuracy([s["correct"] for s in samples]), accuracy([s["correct_norm"] for s in samples])
        # The headline for cloze is acc_norm, as lm-eval reports OpenBookQA: the unnormalised sum favours the
        # shortest choice (SmolLM2-135M then scores 0-16 %, below chance). Letters are one token: acc == acc_norm.
        metrics = {"n": len(samples), "mode": "loglik", "format": fmt,
                   "accuracy": acc_norm if fmt == "cloze" else acc, "acc": acc, "acc_norm": acc_norm,
                   "timings": {"loglik_s": round(elapsed, 3)}}
        return metrics, samples


TASKS: dict[str, Task] = {t.name: t for t in (GSM8K(), OpenBookQA())}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)
