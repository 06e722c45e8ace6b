"""SafeGrad's alignment loss: the token-level KL divergence between the frozen base model (LoRA adapter off) and
the current model on the assistant tokens of safety examples, from live base logits or from a per-example cache
of the base distributions (exact, or top-k plus the tail mass).

Pure tensor functions and the model passes they need; :mod:`spard.defenses.safegrad` is the trainer glue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spard.args import check_choice
from spard.data.chat import IGNORE_INDEX, collate

if TYPE_CHECKING:
    from peft import PeftModel

__all__ = ["KL_DIRECTIONS", "token_kl", "alignment_kl", "alignment_kl_sum", "BaseTokens", "base_token_kl",
           "base_tokens", "assistant_logits", "packing_matches_padding", "cached_alignment_kl_sum"]

KL_DIRECTIONS = ("forward", "reverse")


class _TokenKL(torch.autograd.Function):
    """Per-token KL with a hand-written gradient with respect to the current logits.

    Autograd through ``log_softmax`` leaves a rounding residue (``p * (Σp − 1)``) in the gradient even when
    the two distributions are bitwise equal; since the surgery is scale-invariant, that noise would act as
    a random projection direction at step 1, when the adapter is still the identity. The closed forms below
    are exactly zero there: forward KL(q ‖ p) → ``p − q``; reverse KL(p ‖ q) → ``p ⊙ (log p − log q − KL)``.
    """

    @staticmethod
    def forward(ctx: Any, logits: Tensor, base_logits: Tensor, reverse: bool) -> Tensor:
        dtype = torch.promote_types(logits.dtype, torch.float32)  # fp32 at least; fp64 stays fp64
        log_p = F.log_softmax(logits.to(dtype), dim=-1)
        log_q = F.log_softmax(base_logits.to(dtype), dim=-1)
        p, diff = log_p.exp(), log_p - log_q
        if reverse:
            kl = (p * diff).sum(-1)
            ctx.save_for_backward(p, diff, kl)
        else:
            q = log_q.exp()
            kl = -(q * diff).sum(-1)
            ctx.save_for_backward(p, q)
        ctx.reverse, ctx.dtype = reverse, logits.dtype
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: Tensor) -> tuple[Tensor, None, None]:
        if ctx.reverse:
            p, diff, kl = ctx.saved_tensors
            grad = p * (diff - kl.unsqueeze(-1))
        else:
            p, q = ctx.saved_tensors
            grad = p - q
        return (grad_kl.unsqueeze(-1) * grad).to(ctx.dtype), None, None


def token_kl(logits: Tensor, base_logits: Tensor, direction: str = "forward") -> Tensor:
    """Per-token KL divergence between next-token distributions, computed in (at least) fp32.

    ``logits`` (current model, differentiable) and ``base_logits`` (treated as constant) have shape
    ``(..., vocab)``; returns shape ``(...)``. ``forward`` is KL(p_base ‖ p_θ), ``reverse`` is KL(p_θ ‖ p_base).
    """
    check_choice("kl_direction", direction, KL_DIRECTIONS)
    return _TokenKL.apply(logits, base_logits.detach(), direction == "reverse")


@dataclass
class BaseTokens:
    """The base model's next-token distributions at a run of assistant positions (rows in batch order).

    Exact: ``scores`` are the logits ``[T, V]`` (fp32 at least), kept unnormalised so that :func:`token_kl`
    normalises them exactly as it normalises the current logits: an identical current model then gives a
    bitwise-zero KL. Top-k: ``scores`` ``[T, k]`` are the k largest log-probabilities, ``ids`` ``[T, k]`` their
    vocabulary ids and ``log_tail`` ``[T]`` the log of the mass of all other tokens."""

    scores: Tensor
    ids: Tensor | None = None
    log_tail: Tensor | None = None

    @classmethod
    def from_logits(cls, logits: Tensor, topk: int | None = None) -> BaseTokens:
        """From base logits ``[T, V]``: exact (the logits, fp32 at least), or (``topk`` < V) the top-k
        log-probabilities and the tail."""
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if topk is None or topk >= logits.shape[-1]:
            return cls(logits)
        log_q = F.log_softmax(logits, dim=-1)
        top, ids = log_q.topk(topk, dim=-1)
        # tail mass in log space (never 1 - sum(top), which cancels catastrophically when the tail is tiny)
        log_tail = log_q.scatter(-1, ids, float("-inf")).logsumexp(-1)
        return cls(top, ids, log_tail.clamp(min=_LOG_FLOOR))

    @classmethod
    def cat(cls, parts: list[BaseTokens]) -> BaseTokens:
        if parts[0].ids is None:
            return cls(torch.cat([p.scores for p in parts]))
        return cls(torch.cat([p.scores for p in parts]), torch.cat([p.ids for p in parts]),  # type: ignore[misc]
                   torch.cat([p.log_tail for p in parts]))  # type: ignore[misc]

    def to(self, device: torch.device | str) -> BaseTokens:
        return BaseTokens(*(None if t is None else t.to(device) for t in (self.scores, self.ids, self.log_tail)))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.scores, self.ids, self.log_tail) if t is not None)


_LOG_FLOOR = -1e4
"""Floor of a cached log tail mass: a tail that underflows to 0 must not make 0 · (−inf) = NaN in the KL."""


def base_token_kl(logits: Tensor, base: BaseTokens, direction: str = "forward") -> Tensor:
    """Per-token KL between cached base distributions and the current ``logits`` ``[T, V]`` (differentiable).

    Exact base: :func:`token_kl` on the cached logits. Top-k base: the KL between the two
    distributions coarse-grained to k + 1 outcomes (the base's k likeliest tokens, and everything else as one
    bucket), for the current model ``[log p_top, log(1 − Σ p_top)]``; by the log-sum inequality it is at
    most the exact KL, and it equals it when each distribution's tail is proportional to the other's.
    """
    if base.ids is None:
        return token_kl(logits, base.scores, direction)
    assert base.log_tail is not None
    log_p = F.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    top_p = log_p.gather(-1, base.ids)
    tail_p = log_p.scatter(-1, base.ids, float("-inf")).logsumexp(-1).clamp(min=_LOG_FLOOR)
    current = torch.cat([top_p, tail_p.unsqueeze(-1)], dim=-1)
    reference = torch.cat([base.scores, base.log_tail.unsqueeze(-1)], dim=-1)
    return token_kl(current, reference, direction)


def base_tokens(model: PeftModel, examples: list[dict[str, list[int]]], pad_id: int | None,
                topk: int | None = None, *, packed: bool = False) -> list[BaseTokens]:
    """The base model's (adapter off) distributions at the assistant positions of each of ``examples``, forwarded
    as one batch (padded, or ``packed``) exactly as :func:`cached_alignment_kl_sum` forwards them: computed for the
    batch a step will draw, the cache then matches that step's current logits bitwise while the adapter is the
    identity."""
    with torch.no_grad(), model.disable_adapter():
        logits, counts = assistant_logits(model, examples, pad_id, packed=packed)
    return [BaseTokens.from_logits(chunk, topk) for chunk in logits.split(counts)]


def assistant_logits(model: PeftModel, examples: list[dict[str, list[int]]], pad_id: int | None, *,
                     packed: bool = False) -> tuple[Tensor, list[int]]:
    """Logits ``[ΣT_i, V]`` at the positions predicting each example's assistant tokens (rows in example order)
    and the counts ``T_i``, the examples forwarded together in one pass.

    Padded (default): one right-padded batch with its attention mask. ``packed``: one row holding the examples
    back to back, position ids restarting at 0 for each and no attention mask, so no compute goes to padding;
    transformers then builds a mask that keeps each example to itself, which not every model's attention does
    (:func:`packing_matches_padding` checks a model). The output head runs only where an assistant token is
    predicted (``logits_to_keep``): the vocabulary projection is a large share of a small model's pass, and the
    prompt positions carry no KL term.
    """
    device = model.device
    if packed:
        ids: list[int] = []
        positions: list[int] = []
        keep: list[Tensor] = []
        counts: list[int] = []
        for example in examples:
            # logits at position t predict token t + 1; offset by where this example starts in the row
            targets = (torch.tensor(example["labels"][1:]) != IGNORE_INDEX).nonzero().squeeze(-1)
            keep.append(targets + len(ids))
            counts.append(len(targets))
            positions.extend(range(len(example["input_ids"])))
            ids.extend(example["input_ids"])
        out = model(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([positions], device=device),
                    logits_to_keep=torch.cat(keep).to(device), use_cache=False)
        return out.logits[0], counts
    batch = collate(examples, 0 if pad_id is None else pad_id)
    mask = batch["labels"][:, 1:].to(device) != IGNORE_INDEX  # logits at position t predict token t + 1
    keep_at = mask.any(0).nonzero().squeeze(-1)
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                logits_to_keep=keep_at, use_cache=False)
    return out.logits[mask[:, keep_at]], mask.sum(1).tolist()


def packing_matches_padding(model: PeftModel, examples: list[dict[str, list[int]]], pad_id: int | None,
                            max_tv: float | None = None) -> tuple[bool, float]:
    """Whether ``model`` keeps packed examples apart: the largest total-variation distance between the packed and
    the padded next-token distributions of ``examples`` (no gradient), and whether it is at most ``max_tv``.

    The default bound is 1e-3 for fp32/fp64 logits and 5e-2 for lower precision (bf16/fp16 under autocast): float
    rounding of the two layouts stays far below it (fp32: ~1e-8 on the tiny test model), while a model whose
    attention lets a packed example see the one before it moves the distributions by more.
    """
    with torch.no_grad():
        padded, counts = assistant_logits(model, examples, pad_id)
        packed, packed_counts = assistant_logits(model, examples, pad_id, packed=True)
    if counts != packed_counts:
        return False, float("inf")
    if not sum(counts):
        return True, 0.0
    if max_tv is None:
        max_tv = 1e-3 if padded.dtype in (torch.float32, torch.float64) else 5e-2
    tv = 0.5 * (packed.float().softmax(-1) - padded.float().softmax(-1)).abs().sum(-1).max()
    return bool(tv <= max_tv), float(tv)


def alignment_kl_sum(model: PeftModel, batch: dict[str, Tensor], direction: str = "forward") -> tuple[Tensor, int]:
    """Sum over assistant tokens of the KL between the base (adapter off) and current model, and the token count.

    The base pass runs under ``torch.no_grad()`` with ``model.disable_adapter()``; the current pass keeps its
    graph, so the sum can be differentiated. A token counts when it is a label (not -100): the logits at
    position ``t`` are the prediction of token ``t + 1``.
    """
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    n_tokens = int(mask.sum())
    with torch.no_grad(), model.disable_adapter():
        base = model(**inputs, use_cache=False).logits[:, :-1][mask]
    current = model(**inputs, use_cache=False).logits[:, :-1][mask]
    return token_kl(current, base, direction).sum(), n_tokens


def cached_alignment_kl_sum(model: PeftModel, examples: list[dict[str, list[int]]], bases: list[BaseTokens],
                            pad_id: int | None, direction: str = "forward", *, packed: bool = False
                            ) -> tuple[Tensor, int]:
    """:func:`alignment_kl_sum` from cached base distributions (:func:`base_tokens`): only the current model runs.

    The examples are forwarded in one pass (padded, or ``packed``), as :func:`base_tokens` forwards them. When the
    cache was computed on this very batch in the same layout, current and base logits are bitwise equal at an
    identity adapter (LoRA B = 0: the first step), so the KL and its gradient are exactly zero, as without the
    cache (the surgery is scale-invariant: a rounding residue there would act as a projection direction).
    Anywhere else, batches of other composition differ from the cache by float rounding only.
    """
    if not examples:
        raise ValueError("cached_alignment_kl_sum: no examples")
    logits, counts = assistant_logits(model, examples, pad_id, packed=packed)
    cached = [b.scores.shape[0] for b in bases]
    if cached != counts:
        raise ValueError(f"cached base distributions for {cached} tokens, the examples have {counts}")
    base = BaseTokens.cat(bases).to(logits.device)
    return base_token_kl(logits, base, direction).sum(), int(sum(counts))


def alignment_kl(model: PeftModel, batch: dict[str, Tensor], direction: str = "forward") -> Tensor:
    """Mean per-token KL over the assistant tokens of ``batch`` (the SafeGrad alignment loss)."""
    total, n = alignment_kl_sum(model, batch, direction)
    return total / max(n, 1)
