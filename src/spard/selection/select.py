"""Choose the safety examples to mix into a fine-tuning run: relevant to the task, and diverse.

Every pool record and task record is embedded by its prompt (first user turn) only. ``method`` picks how:

* ``"dpp"``: quality ``q = relevance(pool, task)`` and greedy MAP inference of the DPP with kernel
  ``diag(q) S diag(q)`` (:mod:`spard.selection.dpp`): relevant items first, near-duplicates pushed back;
  like the SPARD reference it always returns ``k`` items (``min(k, pool)``): greedy never stops early
  (``eps=0``), so once the pool adds no new direction it goes on with the largest ridge-level gains;
* ``"relevance_topk"``: the ``k`` most relevant pool items (the DPP without its diversity term);
* ``"random"``: a uniform sample seeded by ``seed`` (the DPP without either term).

The two baselines exist so the DPP's value can be measured at equal ``k``.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import random
from collections.abc import Sequence

import torch

from spard.data.records import Record
from spard.errors import DataError
from spard.selection.dpp import greedy_map, relevance
from spard.selection.embed import Embedder, cached_embed

logger = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("dpp", "random", "relevance_topk")


def prompts_of(records: Sequence[Record], what: str) -> list[str]:
    """The first user turn of each record; ``what`` names the collection in errors."""
    out = []
    for i, record in enumerate(records):
        try:
            out.append(record.prompt)
        except StopIteration:
            raise DataError(f"{what} record #{i} (source {record.source!r}) has no user turn to embed") from None
    return out


def embed_prompts(
    records: Sequence[Record], embedder: Embedder, *, what: str, cache_dir: str | os.PathLike[str] | None = None
) -> torch.Tensor:
    """Embeddings of the records' prompts, through :func:`cached_embed` when ``cache_dir`` is given."""
    texts = prompts_of(records, what)
    emb = embedder(texts) if cache_dir is None else cached_embed(embedder, texts, cache_dir)
    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(texts):
        raise ValueError(f"embedder returned {getattr(emb, 'shape', type(emb))} for {len(texts)} {what} prompts")
    return emb


def target_k(n_task: int, fraction: float) -> int:
    """``ceil(fraction * n_task)``, rounded first so float noise (``0.07 * 100 = 7.000000000000001``) cannot add one."""
    if not fraction >= 0 or math.isinf(fraction):
        raise ValueError(f"fraction must be a finite number >= 0, got {fraction!r}")
    return math.ceil(round(fraction * n_task, 9))


def select_indices(
    pool_emb: torch.Tensor,
    task_emb: torch.Tensor,
    k: int,
    *,
    beta: float = 4.0,
    method: str = "dpp",
    seed: int = 0,
    eps: float = 0.0,
) -> list[int]:
    """Indices of ``k`` pool rows chosen by ``method`` (see the module docstring), in selection order.

    ``"dpp"`` returns ``k`` items, as the reference's greedy loop does (it clamps gains at its ridge and
    never stops); ``eps > 0`` turns on :func:`spard.selection.dpp.greedy_map`'s early stop, which returns
    fewer when the remaining pool adds no relevant, non-redundant direction. ``k`` above the pool size is
    capped at the pool size.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = pool_emb.shape[0]
    k = min(k, n)
    if method == "random":
        return random.Random(seed).sample(range(n), k)
    quality = relevance(pool_emb, task_emb, beta=beta)
    if method == "relevance_topk":
        return torch.argsort(quality, descending=True, stable=True)[:k].tolist()
    return greedy_map(pool_emb, quality, k, eps=eps)


def selection_stats(
    pool_emb: torch.Tensor, task_emb: torch.Tensor, indices: Sequence[int], beta: float = 4.0
) -> dict[str, float]:
    """How relevant and how diverse a selection is.

    ``mean_relevance``: mean ``q`` (relevance with ``beta``) of the selected rows; ``mean_task_cos``: mean
    of ``|max cos to a task prompt|`` (``beta = 1``); ``mean_pairwise_cos`` / ``max_pairwise_cos``:
    over distinct pairs of selected rows (1.0 max means an exact duplicate). NaN where undefined.
    """
    idx = torch.as_tensor(list(indices), dtype=torch.long)
    chosen = pool_emb[idx]
    nan = float("nan")
    stats = {"n_selected": float(len(idx)), "mean_relevance": nan, "mean_task_cos": nan}
    stats |= {"mean_pairwise_cos": nan, "max_pairwise_cos": nan}
    if len(idx) == 0:
        return stats
    stats["mean_relevance"] = float(relevance(chosen, task_emb, beta=beta).mean())
    stats["mean_task_cos"] = float(relevance(chosen, task_emb, beta=1.0).mean())
    if len(idx) > 1:
        unit = torch.nn.functional.normalize(chosen.to(torch.float64), dim=1)
        upper = torch.triu_indices(len(idx), len(idx), offset=1)
        pairs = (unit @ unit.T)[upper[0], upper[1]]
        stats["mean_pairwise_cos"] = float(pairs.mean())
        stats["max_pairwise_cos"] = float(pairs.max())
    return stats


def select_safety_subset(
    pool: Sequence[Record],
    task_records: Sequence[Record],
    *,
    k: int | None = None,
    fraction: float = 0.03,
    beta: float = 4.0,
    embedder: Embedder,
    method: str = "dpp",
    seed: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    pool_emb: torch.Tensor | None = None,
    task_emb: torch.Tensor | None = None,
    eps: float = 0.0,
) -> list[Record]:
    """Pick safety records from ``pool`` for fine-tuning on ``task_records``; chosen records in selection order.

    Embeds every pool and task prompt with ``embedder`` (cached as safetensors under ``cache_dir`` if
    given), sets ``k = ceil(fraction * len(task_records))`` unless ``k`` is given, caps it at the pool size,
    and selects with ``method`` (``"dpp"``, ``"random"`` or ``"relevance_topk"``); every method returns ``k``
    records unless ``eps > 0`` turns on the DPP's early stop (then fewer when the pool runs out of relevant,
    non-redundant items: warned with the counts). Selection statistics (:func:`selection_stats`) are logged at
    INFO. ``pool_emb`` / ``task_emb``, when given, are the embeddings of the pool's / the task's prompts (row i =
    record i), e.g. from a cache shared between runs; then ``embedder`` is not called for them.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not pool:
        raise DataError("the safety pool is empty: nothing to select from")
    if not task_records:
        raise DataError("no task records: relevance needs task prompts to compare the pool against")
    if k is None:
        k = target_k(len(task_records), fraction)
    elif isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    k = int(k)
    if k > len(pool):
        logger.warning("k=%d exceeds the safety pool (%d records); selecting all of it", k, len(pool))
        k = len(pool)
    if pool_emb is None:
        pool_emb = embed_prompts(pool, embedder, what="pool", cache_dir=cache_dir)
    if task_emb is None:
        task_emb = embed_prompts(task_records, embedder, what="task", cache_dir=cache_dir)
    for what, emb, n in (("pool", pool_emb, len(pool)), ("task", task_emb, len(task_records))):
        if emb.ndim != 2 or emb.shape[0] != n:
            raise ValueError(f"{what} embeddings have shape {tuple(emb.shape)}, expected [{n}, d]")
    if pool_emb.shape[1] != task_emb.shape[1]:
        raise ValueError(f"pool embeddings have dim {pool_emb.shape[1]} but task embeddings {task_emb.shape[1]}")
    indices = select_indices(pool_emb, task_emb, k, beta=beta, method=method, seed=seed, eps=eps)
    if len(indices) < k:
        logger.warning(
            "DPP selected %d of the %d requested records (early stop, eps=%g): the rest of the pool adds no "
            "relevant direction that is not a duplicate of / in the span of the selection (embedding dim %d)",
            len(indices),
            k,
            eps,
            pool_emb.shape[1],
        )
    stats = selection_stats(pool_emb, task_emb, indices, beta=beta)
    logger.info("safety selection (%s, beta=%g): %s", method, beta, {n: round(v, 4) for n, v in stats.items()})
    return [pool[i] for i in indices]
