"""Relevance-diversity DPP: relevance scores and greedy MAP inference.

The kernel is ``L = diag(q) S diag(q) + RIDGE * I`` with ``S_ij = cos(e_i, e_j)`` and quality
``q_i = relevance(e_i)``. Greedy MAP inference adds, one at a time, the item with the largest marginal gain
``d_i^2 = det(L_{Y+i}) / det(L_Y)`` (the conditional variance of item ``i`` given the selected set ``Y``).

Three implementations, one selection rule:

* :func:`greedy_map` is the production one: the incremental-Cholesky algorithm of Chen, Zhang & Zhou
  (NeurIPS 2018) in *factored* form. Off the diagonal ``L = B B^T`` with ``B = diag(q) F``, so the Cholesky
  entries of every unselected item are ``c_t[i] = b_i . v_t`` for a vector ``v_t`` in feature space
  (induction on the recursion ``c_t[i] = (L[i, j_t] - sum_s c_s[i] c_s[j_t]) / d_{j_t}``). Keeping the
  ``k x d`` matrix ``V`` instead of the ``k x N`` Cholesky rows makes each step one ``N x d`` mat-vec
  (``B @ v_t``) plus ``O(N + t d)`` work: O(N d k) time, O(N d + k d) memory, the N x N kernel never built.
* :func:`greedy_map_full_kernel` is Chen et al.'s published algorithm on an explicit kernel (``k x N``
  Cholesky buffer, kernel rows read from memory). The benchmark uses it as the full-kernel baseline.
* :func:`greedy_map_naive` is the brute-force reference: explicit log-determinants of every candidate set.

Stopping rule (all three): every ``d_i^2`` is at least ``RIDGE`` because ``L - RIDGE*I`` is PSD, so the
ridge says nothing about an item's value. The rule therefore looks at the *net gain* ``d_i^2 - RIDGE``, the
variance an item adds through the similarity kernel, and stops when the best net gain is below ``eps``.
With the default ``eps = RIDGE = 1e-6``:

* zero-quality items have net gain exactly 0 and are never picked (all-zero quality returns ``[]``);
* an exact duplicate (or a sign flip) of a selected item with equal quality has net gain
  ``RIDGE * q^2 / (q^2 + RIDGE) < RIDGE``, so it is never picked, however many picks are left;
* once the selection spans the feature space (``k > rank``; for real embeddings the rank is usually the
  embedding dim), every remaining item lies in the span and its net gain is only about ``RIDGE * |a|^2``
  (``a`` = its quality-scaled coefficients in the selected items). Items with ``|a| > 1`` still pass
  ``eps = RIDGE``, so greedy may go on with picks chosen by the ridge rather than by similarity before it
  stops (random unit features, d=384, N=100k: ~740 picks). Pass ``eps`` well above ``RIDGE * |a|^2``
  (e.g. ``1e-3``) to stop at the rank; callers that need ``k <= d`` meaningful picks are unaffected.

``eps <= 0`` disables the rule: the result then always has ``min(k, N)`` items (ties broken by lowest index).
``k == 0`` returns ``[]``, ``k < 0`` raises ``ValueError``, ``k > N`` is capped at ``N``. The float64
recursion keeps the ridge-scale margins above (~1e-12 absolute) well clear of rounding error (~1e-16).
"""

from __future__ import annotations

import logging
import math
import operator

import torch

logger = logging.getLogger(__name__)

RIDGE = 1e-6
"""Diagonal ridge added to the DPP kernel so every principal minor is positive definite."""


def _check_matrix(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor [rows, dim], got {getattr(x, 'shape', type(x))}")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or infinite values")


def _unit_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A copy of ``x`` with L2-normalised rows (defensive: callers should pass unit rows); zero rows stay zero.

    Normalises the fresh copy in place, so peak memory is one ``[N, d]`` buffer, not two.
    """
    out = x.to(dtype=dtype, copy=True)
    return out.div_(torch.linalg.vector_norm(out, dim=1, keepdim=True).clamp_min_(1e-12))


def relevance(pool_emb: torch.Tensor, ref_emb: torch.Tensor, beta: float = 4.0, chunk: int = 4096) -> torch.Tensor:
    """Quality score of each pool row: ``q_i = |max_j cos(e_i, r_j)| ** beta``.

    As the SPARD reference (``utils/data_selector.py``: ``torch.pow(max_j cos, power)``, no clamp): the DPP
    kernel's minors depend on ``q_i^2`` only, so the reference's value for an integer ``beta`` is this one;
    the absolute value keeps a negative best cosine defined for any ``beta`` (the reference gives NaN there).

    Rows of both inputs are L2-normalised here (a no-op for unit rows), so ``cos`` is exact whatever the
    caller passes. Pool rows are processed ``chunk`` at a time so only a ``chunk x M`` similarity block
    is ever in memory. ``beta`` sharpens relevance: large values favour only the closest pool items,
    ``beta = 0`` gives every item quality 1 (pure diversity). Returns a float tensor of shape ``[N]``
    (at least float32) with values in ``[0, 1]``.
    """
    _check_matrix(pool_emb, "pool_emb")
    _check_matrix(ref_emb, "ref_emb")
    if pool_emb.shape[1] != ref_emb.shape[1]:
        raise ValueError(f"pool_emb has dim {pool_emb.shape[1]} but ref_emb has dim {ref_emb.shape[1]}")
    if ref_emb.shape[0] == 0:
        raise ValueError("ref_emb has no rows: relevance needs at least one reference embedding")
    if not beta >= 0 or math.isinf(beta):
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    dtype = torch.promote_types(torch.promote_types(pool_emb.dtype, ref_emb.dtype), torch.float32)
    ref_t = _unit_rows(ref_emb, dtype).T.contiguous()
    best = torch.empty(pool_emb.shape[0], dtype=dtype, device=pool_emb.device)
    for start in range(0, pool_emb.shape[0], chunk):
        block = _unit_rows(pool_emb[start : start + chunk], dtype)
        best[start : start + chunk] = (block @ ref_t).amax(dim=1)
    # Clamp the top: rounding can push a cosine of identical rows a hair above 1.
    return best.abs_().clamp_(max=1.0).pow_(beta)


def _check_k(k: int, n: int) -> int:
    """Validate ``k`` and cap it at ``n`` (logged): the number of picks the greedy loop may make."""
    if isinstance(k, bool):
        raise ValueError(f"k must be an integer, got {k!r}")
    k = operator.index(k)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if k > n:
        logger.info("greedy DPP: k=%d exceeds the %d candidates; returning at most %d", k, n, n)
    return min(k, n)


def _check_inputs(features: torch.Tensor, quality: torch.Tensor, k: int) -> int:
    _check_matrix(features, "features")
    if not isinstance(quality, torch.Tensor) or quality.ndim != 1 or quality.shape[0] != features.shape[0]:
        raise ValueError(
            f"quality must be a 1-D tensor with one entry per feature row ({features.shape[0]}), "
            f"got {getattr(quality, 'shape', type(quality))}"
        )
    if not bool(torch.isfinite(quality).all()) or bool((quality < 0).any()):
        raise ValueError("quality must be finite and >= 0")
    return _check_k(k, features.shape[0])


def _stop_reason(best_gain: float, eps: float, ridge: float) -> str | None:
    """Why greedy inference must stop before taking an item of marginal gain ``best_gain``, or None."""
    if not best_gain > 0.0:
        # True gains are >= ridge > 0; a non-positive value means rounding broke the recursion.
        return f"numerical breakdown: best marginal gain d^2={best_gain:.3g} is not positive"
    if eps > 0 and best_gain - ridge < eps:
        return (
            f"best marginal gain d^2={best_gain:.6g} exceeds the ridge {ridge:g} by {best_gain - ridge:.3g} < "
            f"eps={eps:g}: every remaining item has ~zero quality or duplicates / lies in the span of the selection"
        )
    return None


def _log_stop(selected: int, k: int, reason: str) -> None:
    logger.info("greedy DPP stopped after %d of %d picks: %s", selected, k, reason)


def dpp_kernel(features: torch.Tensor, quality: torch.Tensor, ridge: float = RIDGE) -> torch.Tensor:
    """The full float64 kernel ``diag(q) S diag(q) + ridge*I`` (N x N: references and small inputs only)."""
    f = _unit_rows(features, torch.float64)
    q = quality.to(torch.float64)
    kernel = q[:, None] * (f @ f.T) * q[None, :]
    kernel.diagonal().add_(ridge)
    return kernel


def greedy_map(features: torch.Tensor, quality: torch.Tensor, k: int, eps: float = 1e-6) -> list[int]:
    """Greedy MAP inference for the DPP with kernel ``diag(q) S diag(q) + RIDGE*I``, ``S = F F^T``.

    ``features`` are ``[N, d]`` embeddings (L2-normalised here; an all-zero row is an item of zero
    similarity and never picked), ``quality`` is ``[N]`` and non-negative. Returns up to ``k`` indices in
    selection order: fewer when ``k > N`` or when the best net gain ``d^2 - RIDGE`` drops below ``eps``
    (the reason is logged; see the module docstring for what that means for duplicates, zero quality and
    ``k > rank``). Ties go to the lowest index.

    Chen et al.'s incremental Cholesky in factored form (module docstring): per step one ``[N, d]`` by
    ``[d]`` mat-vec and ``O(N + t d)`` extra work, float64 throughout, memory ``O(N d + k d)``.
    """
    k = _check_inputs(features, quality, k)
    if k == 0:
        return []
    # B = diag(q) F, so L = B B^T + ridge*I; zero-quality and all-zero rows become zero rows of B.
    b = _unit_rows(features, torch.float64).mul_(quality.to(device=features.device, dtype=torch.float64)[:, None])
    gains = torch.linalg.vector_norm(b, dim=1).square_().add_(RIDGE)  # d^2_i = L_ii; no [N, d] temporary
    v = torch.empty((k, b.shape[1]), dtype=torch.float64, device=b.device)
    col = torch.empty_like(gains)
    selected: list[int] = []
    j = int(torch.argmax(gains))
    for t in range(k):
        best = float(gains[j])
        reason = _stop_reason(best, eps, RIDGE)
        if reason is not None:
            _log_stop(t, k, reason)
            break
        selected.append(j)
        if t == k - 1:
            break
        b_j = b[j]
        # c_s[j] = b_j . v_s for s < t (j was unselected when each v_s was made); v_t orthogonalises b_j.
        v_prev = v[:t]
        v_t = (b_j - (v_prev @ b_j) @ v_prev) / math.sqrt(best)
        v[t] = v_t
        torch.mv(b, v_t, out=col)  # col_i = b_i . v_t = c_t[i], the new Cholesky entry of item i
        gains.addcmul_(col, col, value=-1.0)  # one fused pass: few passes over N matter on 2 cores
        gains[j] = -math.inf
        j = int(torch.argmax(gains))
    return selected


def greedy_map_full_kernel(kernel: torch.Tensor, k: int, eps: float = 1e-6, ridge: float = RIDGE) -> list[int]:
    """Chen, Zhang & Zhou's fast greedy MAP on an explicit ``[N, N]`` kernel (their reference ``dpp()``).

    Same selection and stopping rule as :func:`greedy_map` (``ridge`` must be the ridge already on the
    kernel's diagonal), but it reads kernel rows from memory and keeps the ``[k, N]`` Cholesky buffer:
    O(N k^2) time, O(N^2) memory for the kernel. Kept as the full-kernel baseline of the benchmark and as
    a second, independent reference in the tests.
    """
    _check_matrix(kernel, "kernel")
    if kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be square, got {tuple(kernel.shape)}")
    k = _check_k(k, kernel.shape[0])
    if k == 0:
        return []
    kern = kernel.to(torch.float64)
    chol = torch.zeros((k, kern.shape[0]), dtype=torch.float64, device=kern.device)
    gains = kern.diagonal().clone()
    selected: list[int] = []
    j = int(torch.argmax(gains))
    for t in range(k):
        best = float(gains[j])
        reason = _stop_reason(best, eps, ridge)
        if reason is not None:
            _log_stop(t, k, reason)
            break
        selected.append(j)
        if t == k - 1:
            break
        e = (kern[j] - chol[:t, j] @ chol[:t]) / math.sqrt(best)
        chol[t] = e
        gains.sub_(e.square())
        gains[j] = -math.inf
        j = int(torch.argmax(gains))
    return selected


def greedy_map_naive(features: torch.Tensor, quality: torch.Tensor, k: int, eps: float = 1e-6) -> list[int]:
    """Reference implementation: brute-force greedy MAP with explicit determinants (tests, benchmark).

    Builds the full kernel and, at every step, evaluates ``slogdet`` of ``L_{Y+i}`` for every candidate
    ``i``; takes the best (lowest index on ties) while its gain ``det(L_{Y+i}) / det(L_Y)`` exceeds
    ``RIDGE + eps`` (same rule as :func:`greedy_map`). O(k N k^3) time: small inputs only.
    """
    k = _check_inputs(features, quality, k)
    kernel = dpp_kernel(features, quality)
    n = kernel.shape[0]
    selected: list[int] = []
    logdet = 0.0
    while len(selected) < k:
        taken = set(selected)
        cand = torch.tensor([i for i in range(n) if i not in taken], dtype=torch.long)
        sets = torch.cat([torch.tensor(selected, dtype=torch.long).expand(len(cand), -1), cand[:, None]], dim=1)
        _, logdets = torch.linalg.slogdet(kernel[sets[:, :, None], sets[:, None, :]])
        best = int(torch.argmax(logdets))
        reason = _stop_reason(math.exp(float(logdets[best]) - logdet), eps, RIDGE)
        if reason is not None:
            _log_stop(len(selected), k, reason)
            break
        selected.append(int(cand[best]))
        logdet = float(logdets[best])
    return selected
