"""The report's words come from named thresholds applied to measured data: checked here on
hand-made data at the thresholds' edges, without running any experiment."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from collapse_sim.report import verdicts as v


def _fig9(*crossings):
    return SimpleNamespace(cross=[{"bf16": c} for c in crossings])


@pytest.mark.parametrize("crossings,word", [
    # the paper's 2,400-2,500 widened by SAME_READING = 25 %: [1800, 3125], both ends included (exact in binary)
    ((1800, 3125), v.REPRODUCED),
    ((2400, 2450, 2500), v.REPRODUCED),
    ((1799, 2450), v.PARTLY),
    ((2450, 3126), v.PARTLY),
    ((None, 2450), v.PARTLY),  # one seed never crosses
    ((None, None), v.NOT_REPRODUCED),
])
def test_fig9_word_at_the_edges_of_same_reading(crossings, word):
    assert v.SAME_READING == 0.25 and v.PAPER_FIG9_N == (2400, 2500)
    assert v.fig9_word(_fig9(*crossings)) == word


def test_crossing_words_at_the_edges():
    """Fig. 8's reading (≈ 500): ±25 % is the same reading, within a factor 2 partly, else not."""
    lo, hi = v.PAPER_FIG8_N, v.PAPER_FIG8_N
    assert v._word_for_crossing(375, lo, hi) == v._word_for_crossing(625, lo, hi) == v.REPRODUCED
    assert v._word_for_crossing(374, lo, hi) == v._word_for_crossing(626, lo, hi) == v.PARTLY
    assert v._word_for_crossing(250, lo, hi) == v._word_for_crossing(1000, lo, hi) == v.PARTLY
    assert v._word_for_crossing(249, lo, hi) == v._word_for_crossing(1001, lo, hi) == v.NOT_REPRODUCED
    assert v._word_for_crossing(None, lo, hi) == v.NOT_REPRODUCED


def test_separators_work_needs_the_named_gain():
    """Commas work when they multiply the float64 distance by more than SEPARATOR_GAIN (powers of two
    keep the products exact: 2^20 > 10^6 > 2^19), or lift an exactly zero distance."""
    assert v.SEPARATOR_GAIN == 1e6
    assert v.separators_work(2.0**-40, 2.0**-20)
    assert not v.separators_work(2.0**-40, 2.0**-21)
    assert v.separators_work(0.0, 2.0**-1000) and not v.separators_work(0.0, 0.0)
