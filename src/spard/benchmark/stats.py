"""Paired tests between the defenses of a bench: exact McNemar and its seed-pooling stratified form.

Every cell of a bench is evaluated on the same prompts, and cells that differ only in the defense share the
attack, harmful ratio and seed (the same task and harmful examples), so two defenses are compared *paired*:
per (seed, prompt) the two verdicts (harmful or not) form a 2×2 table, and only the discordant pairs carry
information: ``b`` = harmful under A only, ``c`` = harmful under B only. Under H0 (equal ASR) each discordant
pair is A's with probability 1/2, so the exact two-sided p-value is ``min(1, 2 · P(Binom(b + c, 1/2) ≤ min(b,
c)))`` (McNemar 1947; the exact form as in ``statsmodels.stats.contingency_tables.mcnemar(exact=True)``).

With several seeds a prompt is scored once per seed, and its runs are not independent pairs (a prompt one
defense answers under seed 0 it tends to answer under seed 1). The tests therefore pool seeds *within* each
prompt: :func:`stratified_exact_test` is the exact conditional Cochran–Mantel–Haenszel test with one stratum per
prompt (its seeds are the stratum's replicates), which at one seed is the exact McNemar test above, p-value for
p-value. :func:`min_detectable_difference` says how large a difference such a comparison can find.

Per-prompt verdicts are read from each cell's ``eval/samples_<set>.jsonl`` (the ``harmful`` field, the
primary judge's verdict; samples whose judge failed are left out of both sides of their pair).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spard.benchmark.grid import Bench
from spard.benchmark.results import CellResult
from spard.rundir import EVAL_DIR, results_path

Verdicts = dict[Hashable, bool]
ALPHA = 0.05
AVERAGE = "average"
"""The column key of the test pooled over all columns (the table's average column)."""


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts ``b`` and ``c`` (1.0 when both are 0)."""
    if b < 0 or c < 0 or int(b) != b or int(c) != c:
        raise ValueError(f"mcnemar_exact: counts must be integers >= 0, got b={b}, c={c}")
    n, k = int(b + c), int(min(b, c))
    if n == 0:
        return 1.0
    # exact integer arithmetic: no underflow of 0.5**n for large n
    tail = sum(math.comb(n, i) for i in range(k + 1))
    return min(1.0, 2 * tail / 2**n)


Stratum = tuple[int, int, int]
"""One prompt: ``(n, harmful under A, harmful under B)`` over its ``n`` paired runs (one per seed)."""


def stratified_exact_test(strata: Sequence[Stratum]) -> float:
    """Two-sided exact conditional Cochran–Mantel–Haenszel p-value for paired binary outcomes, strata = prompts.

    Stratum ``(n, x_a, x_b)``: the prompt was run ``n`` times under each defense, ``x_a`` harmful under A and
    ``x_b`` under B. Under H0 (the 2n runs of a prompt are exchangeable between the defenses) and given the
    prompt's total ``m = x_a + x_b``, ``x_a`` is hypergeometric: ``P(x_a = k) = C(n, k) C(n, m - k) / C(2n, m)``.
    The statistic ``T = Σ x_a`` has the convolution of those laws; p = ``min(1, 2 · min(P(T ≤ t), P(T ≥ t)))``,
    the doubled smaller tail as in :func:`mcnemar_exact` (with ``n = 1`` everywhere the two are equal). Exact
    integer arithmetic (the weights ``C(n, k) C(n, m - k)`` are convolved as integers).
    """
    dist = [1]  # integer weights of T - (lowest possible T), convolved stratum by stratum
    total, low, t = 1, 0, 0
    for i, (n, xa, xb) in enumerate(strata):
        if min(n, xa, xb) < 0 or xa > n or xb > n or any(int(v) != v for v in (n, xa, xb)):
            raise ValueError(f"stratified_exact_test: stratum {i} = {(n, xa, xb)}: need integers 0 <= x_a, x_b <= n")
        m = xa + xb
        lo, hi = max(0, m - n), min(n, m)
        weights = [math.comb(n, k) * math.comb(n, m - k) for k in range(lo, hi + 1)]
        if len(weights) == 1:  # a prompt harmful in all or none of its runs carries no information
            low, t = low + lo, t + xa
            continue
        out = [0] * (len(dist) + len(weights) - 1)
        for j, d in enumerate(dist):
            for k, w in enumerate(weights):
                out[j + k] += d * w
        dist, total, low, t = out, total * sum(weights), low + lo, t + xa
    at = t - low
    lower, upper = sum(dist[: at + 1]), sum(dist[at:])
    return min(1.0, 2 * min(lower, upper) / total)


def prompt_strata(a: Mapping[Hashable, bool], b: Mapping[Hashable, bool]) -> list[Stratum]:
    """Per-prompt strata of :func:`stratified_exact_test` from verdicts keyed ``(seed, *prompt key)``: the keys
    both hold, grouped by everything but the seed."""
    groups: dict[Hashable, list[int]] = {}
    for key in a.keys() & b.keys():
        g = groups.setdefault(tuple(key[1:]), [0, 0, 0])  # type: ignore[index]
        g[0] += 1
        g[1] += bool(a[key])
        g[2] += bool(b[key])
    return [(n, xa, xb) for n, xa, xb in groups.values()]


def _z(q: float) -> float:
    return statistics.NormalDist().inv_cdf(q)


def min_detectable_difference(n_prompts: int, n_seeds: int, discordance: float, *, alpha: float = ALPHA,
                              power: float = 0.8, icc: float = 0.0) -> float:
    """Smallest ASR difference ``δ = p10 - p01`` a paired two-sided test at level ``alpha`` finds with ``power``.

    Connor's (1987) sample size for McNemar's test, ``N δ² = (z_{1-α/2} √ψ + z_{power} √(ψ - δ²))²`` with ``ψ``
    the share of discordant pairs, solved for ``δ`` in closed form: with ``a = z_{1-α/2}``, ``b = z_{power}`` and
    ``u = √(ψ - δ²)`` it is the quadratic ``(N + b²) u² + 2ab√ψ u + (a² - N) ψ = 0``, so
    ``u = √ψ (√(N (N - a² + b²)) - ab) / (N + b²)`` and ``δ = √(ψ - u²)``. ``N`` is the number of independent
    pairs: ``n_prompts · n_seeds`` deflated by the design effect ``1 + (n_seeds - 1) · icc`` of a prompt's seeds
    (``icc`` = correlation of a prompt's discordance across seeds: 0 = seeds as new prompts, 1 = seeds add
    nothing). Raises ValueError when no difference is detectable (it would exceed ``discordance``).
    """
    if n_prompts < 1 or n_seeds < 1 or not 0 < discordance <= 1 or not 0 <= icc <= 1 or not 0 < alpha < 1 \
            or not 0 < power < 1:
        raise ValueError(f"min_detectable_difference: n_prompts={n_prompts}, n_seeds={n_seeds} must be >= 1, "
                         f"discordance={discordance} in (0, 1], icc={icc} in [0, 1], alpha={alpha} and "
                         f"power={power} in (0, 1)")
    n = n_prompts * n_seeds / (1 + (n_seeds - 1) * icc)
    a, b = _z(1 - alpha / 2), _z(power)
    if n <= a * a:
        raise ValueError(f"min_detectable_difference: {n:.1f} effective pairs cannot reach power {power} at "
                         f"alpha {alpha} for any difference (need more than {a * a:.2f})")
    u = math.sqrt(discordance) * (math.sqrt(n * (n - a * a + b * b)) - a * b) / (n + b * b)
    delta = math.sqrt(discordance - u * u)
    if delta > discordance:  # |p10 - p01| <= p10 + p01: no difference this discordance allows reaches the power
        raise ValueError(f"min_detectable_difference: with {n:.1f} effective pairs and discordance {discordance}, "
                         f"no possible difference (at most {discordance}) reaches power {power}")
    return delta


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates when both coordinates are to be minimised (another point
    dominates one when it is no worse in both and better in one); equal points are all kept. Sorted by the
    first coordinate, so they trace the front from left to right."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(u <= x and v <= y and (u < x or v < y) for u, v in points)]
    return sorted(front, key=lambda i: points[i])


def discordant(a: Mapping[Hashable, bool], b: Mapping[Hashable, bool]) -> tuple[int, int, int]:
    """``(n_pairs, a_only, b_only)`` over the keys both hold: pairs, true under ``a`` only, under ``b`` only."""
    keys = a.keys() & b.keys()
    return len(keys), sum(a[k] and not b[k] for k in keys), sum(b[k] and not a[k] for k in keys)


@dataclass
class PairedTest:
    """One comparison of defense ``a`` with defense ``b`` on a column (or ``average``: all columns pooled)."""

    task: str
    a: str
    b: str
    column: Any
    """``(attack, ratio)`` or :data:`AVERAGE`."""
    n_pairs: int
    """(seed, prompt) pairs."""
    a_only: int
    """Pairs harmful under ``a`` but not ``b``."""
    b_only: int
    p_value: float
    """:func:`stratified_exact_test` over the prompts (seeds pooled within each)."""
    n_prompts: int = 0
    """Prompts (strata) the pairs come from."""

    @property
    def significant(self) -> bool:
        return self.n_pairs > 0 and self.p_value < ALPHA


def harm_verdicts(run_dir: Path) -> Verdicts | None:
    """Per-prompt primary-judge verdicts of a finished cell, keyed by ``(harm set, index, prompt)``; None when
    its results or samples cannot be read."""
    try:
        results = json.loads(results_path(run_dir).read_text(encoding="utf-8"))
        out: Verdicts = {}
        for name in results.get("harm") or {}:
            if name == "all":
                continue
            file = (results.get("sample_files") or {}).get(name)
            if not file:
                return None
            judge = results.get("primary_judge") or "keyword"
            for line in (Path(run_dir) / EVAL_DIR / file).read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                row = json.loads(line)
                if ((row.get(judge) or {}).get("error")) is not None:
                    continue
                out[(name, row["index"], row["prompt"])] = bool(row["harmful"])
        return out
    except (OSError, ValueError, KeyError):
        return None


def reference_labels(bench: Bench, reference: str = "sft", focus: str = "spard") -> tuple[str | None, str | None]:
    """Row labels of the first defense entries of the ``reference`` and ``focus`` plugins (None if absent)."""
    defs = bench.config.defenses
    return (next((d.label or d.name for d in defs if d.name == reference), None),
            next((d.label or d.name for d in defs if d.name == focus), None))


def comparisons(bench: Bench, reference: str = "sft", focus: str = "spard") -> list[tuple[str, str]]:
    """The pairs (a, b) of defense labels to test: every defense against ``reference`` (``a`` = the defense),
    and ``focus`` against every other defense but the reference. Defenses are matched by plugin name, the
    first of each kind (a bench may list one plugin twice with other options)."""
    ref, foc = reference_labels(bench, reference, focus)
    labels = [d.label or d.name for d in bench.config.defenses]
    pairs = [(d, ref) for d in labels if ref is not None and d != ref]
    pairs += [(foc, d) for d in labels if foc is not None and d not in (foc, ref)]
    return pairs


def paired_tests(bench: Bench, rows: list[CellResult],
                 verdicts: Callable[[Path], Verdicts | None] = harm_verdicts) -> list[PairedTest]:
    """Paired tests of :func:`comparisons`, per task, per column and pooled over all columns: the stratified
    exact test (:func:`stratified_exact_test`) with one stratum per prompt of a column, its seeds pooled.

    Pairs are (seed, prompt) within a column; the pooled test takes each cell once (a merged ratio-0 cell
    that fills two columns counts once) so no pair is counted twice. Cells that did not finish are left out
    (with their pairs).
    """
    by: dict[tuple[str, str, int], list[tuple[tuple, Verdicts]]] = {}
    for r in rows:
        if not r.ok:
            continue
        v = verdicts(r.cell.run_dir)
        if v is None:
            continue
        cols = tuple(sorted(r.cell.columns, key=repr))
        by.setdefault((r.cell.task, r.cell.defense, r.cell.seed), []).append((cols, v))

    def keyed(task: str, defense: str, column: Any) -> Verdicts:
        out: Verdicts = {}
        for seed in bench.config.seeds:
            for cols, v in by.get((task, defense, seed), []):
                if column == AVERAGE or column in cols:
                    prefix = (seed, cols) if column == AVERAGE else (seed,)
                    out.update({(*prefix, k): x for k, x in v.items()})
        return out

    tests = []
    for task in bench.tasks:
        for a, b in comparisons(bench):
            for column in [*bench.columns(), AVERAGE]:
                va, vb = keyed(task, a, column), keyed(task, b, column)
                n, a_only, b_only = discordant(va, vb)
                strata = prompt_strata(va, vb)
                tests.append(PairedTest(task, a, b, column, n, a_only, b_only, stratified_exact_test(strata),
                                        len(strata)))
    return tests
