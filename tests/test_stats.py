"""Intervals over seeds: Student t quantiles, coverage, and the comparison's per-point summary."""

from __future__ import annotations

import dataclasses
import random

import pytest

from epd.compare import summarize
from epd.config import CompareConfig, RunConfig, SLOConfig
from epd.stats import mean_ci, t_quantile


@pytest.mark.parametrize(
    "p,df,want",
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 10, 2.2281), (0.975, 30, 2.0423)]
    + [(0.95, 5, 2.0150), (0.995, 3, 5.8409)],
)
def test_t_quantiles_match_the_tables(p, df, want):
    assert t_quantile(p, df) == pytest.approx(want, abs=1e-4)
    assert t_quantile(1 - p, df) == pytest.approx(-want, abs=1e-4)


@pytest.mark.parametrize("n,level", [(3, 0.95), (5, 0.9), (12, 0.95)])
def test_intervals_cover_the_mean_as_often_as_their_level(n, level):
    rng = random.Random(n)
    trials = 3000
    hits = 0
    for _ in range(trials):
        ci = mean_ci([rng.gauss(10.0, 2.0) for _ in range(n)], level)
        hits += ci.lo <= 10.0 <= ci.hi
    assert abs(hits / trials - level) < 0.02


def test_interval_edges():
    assert mean_ci([]) is None and mean_ci([None, None]) is None
    one = mean_ci([0.7, None])
    assert (one.mean, one.lo, one.hi, one.n) == (0.7, 0.7, 0.7, 1)
    clipped = mean_ci([1.0, 0.9, 1.0], within=(0.0, 1.0))
    assert clipped.hi == 1.0 and clipped.lo < clipped.mean < 1.0
    with pytest.raises(ValueError, match="0 < p < 1"):
        t_quantile(1.0, 3)


def test_summary_gives_points_with_intervals_and_goodput_per_seed():
    cfg = dataclasses.replace(RunConfig(), compare=CompareConfig(ci_level=0.95), slo=SLOConfig(attainment_target=0.9))
    curves = {0: (1.0, 0.95, 0.5), 1: (1.0, 0.8, 0.4), 2: (0.85, 0.7, 0.2)}  # seed -> attainment at 1, 2, 3 req/s
    attain = {(rate, seed): a for seed, curve in curves.items() for rate, a in zip((1.0, 2.0, 3.0), curve)}
    rows = [
        {"deployment": "epd", "layout": "1E1P1D", "source": "engine", "rate": r, "seed": s, "slo_attainment": a}
        | {"ttft_p50": 0.1 * r + 0.01 * s, "num_finished": 10, "num_requests": 10}
        for (r, s), a in attain.items()
    ]
    out = summarize(cfg, rows)
    by_rate = {p["rate"]: p for p in out["points"]}
    assert by_rate[2.0]["runs"] == 3 and by_rate[2.0]["num_requests"] == 30
    assert by_rate[2.0]["slo_attainment"]["mean"] == pytest.approx(0.8166667, abs=1e-6)
    assert by_rate[2.0]["ttft_p50"]["mean"] == pytest.approx(0.21)
    assert by_rate[2.0]["tpot_p50"] is None  # no run reported it
    g = out["goodput_ci"]["epd/engine"]
    assert g["per_seed"][0] == pytest.approx(2.0 + (0.95 - 0.9) / (0.95 - 0.5))
    assert g["per_seed"][1] == pytest.approx(1.0 + (1.0 - 0.9) / (1.0 - 0.8)) and g["per_seed"][2] is None
    assert g["n"] == 2 and g["mean"] == pytest.approx((g["per_seed"][0] + g["per_seed"][1]) / 2)
    # the headline goodput comes from the mean attainment curve: 0.95 at 1 req/s, 0.817 at 2
    assert out["goodput"]["epd/engine"] == pytest.approx(1.0 + (0.95 - 0.9) / (0.95 - 0.8166667), abs=1e-5)


def test_batch_deadlines_follow_each_instances_typical_batch_time():
    from epd.engine.deadlines import BatchDeadlines

    d = BatchDeadlines(factor=10.0, floor_s=1.0, smoothing=0.5)
    d.submitted("p0", 0.0)
    d.submitted("p0", 0.05)  # a second batch behind the first: the clock stays on the oldest
    assert d.overdue("p0", "PrefillBatch", 0.9) is None  # the floor holds before any history
    assert d.overdue("p0", "PrefillBatch", 1.5) == (1.5, 1.0)
    d.replied("p0", "PrefillBatch", 0.4, more_in_flight=True)  # took 0.4 s; the next one is timed from now
    assert d.typical[("p0", "PrefillBatch")] == 0.4 and d.head_since["p0"] == 0.4
    assert d.bound("p0", "PrefillBatch") == 4.0 and d.bound("p0", "DecodeBatch") == 1.0
    d.replied("p0", "PrefillBatch", 0.6, more_in_flight=False)  # took 0.2 s: smoothed to 0.3
    assert d.typical[("p0", "PrefillBatch")] == pytest.approx(0.3) and "p0" not in d.head_since
    assert d.overdue("p0", "PrefillBatch", 100.0) is None  # nothing in flight
    d.forget("p0")
    assert d.bound("p0", "PrefillBatch") == 1.0
    assert not BatchDeadlines(10.0, 0.0).enabled
