"""Wilson intervals against known values; harm rates, error handling and category breakdowns."""

from __future__ import annotations

import pytest

from spard.evaluate.judges import JudgeResult
from spard.evaluate.metrics import accuracy, harm_metrics, rate, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17,
        # Table I, method 3 (Wilson score, no continuity correction): 81/263, 15/148, 0/20, 1/29.
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
        # Symmetric cases: 0/n and n/n mirror each other; 5/10 is centred on 0.5.
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (5, 10, 0.2366, 0.7634),
    ],
)
def test_wilson_known_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_edge_cases():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(50, 100, z=2.576)  # 99 % is wider than 95 %
    lo95, hi95 = wilson_interval(50, 100)
    assert lo < lo95 < 0.5 < hi95 < hi
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_rate_and_accuracy():
    assert rate(3, 4)["value"] == 0.75 and rate(3, 4)["k"] == 3 and rate(3, 4)["n"] == 4
    assert rate(0, 0)["value"] is None
    assert accuracy([True, False, True, True]) == rate(3, 4)


def _r(harmful=False, refused=False, degenerate=False, error=None):
    return JudgeResult(harmful, None, "", degenerate=degenerate, refused=refused, error=error)


def test_harm_metrics_counts_errors_separately():
    results = [_r(harmful=True), _r(harmful=True), _r(refused=True), _r(degenerate=True), _r(error="timeout")]
    m = harm_metrics(results)
    assert m["n"] == 5 and m["n_judged"] == 4
    assert (m["asr"]["k"], m["asr"]["n"]) == (2, 4)  # the error is not counted as safe
    assert m["refusal_rate"]["k"] == 1 and m["degenerate_rate"]["k"] == 1
    assert (m["error_rate"]["k"], m["error_rate"]["n"]) == (1, 5)
    assert m["asr"]["ci95"] == pytest.approx(list(wilson_interval(2, 4)), abs=1e-6)
    assert "by_category" not in m


def test_harm_metrics_by_category():
    results = [_r(harmful=True), _r(), _r(harmful=True), _r(harmful=True)]
    m = harm_metrics(results, ["weapons", "weapons", "fraud", None])
    assert set(m["by_category"]) == {"weapons", "fraud"}
    assert m["by_category"]["weapons"]["asr"]["value"] == 0.5
    assert m["by_category"]["fraud"]["asr"]["value"] == 1.0
    assert m["asr"]["k"] == 3
    with pytest.raises(ValueError):
        harm_metrics(results, ["a"])
