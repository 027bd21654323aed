"""The paper-reproduction helpers: Fig. 9's δ for every n, the softmax in a format,
stream padding, crossings and decay fits."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from collapse_sim.backends import make_backend
from collapse_sim.experiments.collapse import pair_outputs
from collapse_sim.experiments.paper import decay_fit, first_below, tv_all_n, tv_in_format
from collapse_sim.families import make_pairs
from collapse_sim.model import ModelConfig, init_params

U64 = 2.0**-53


def gamma(k: int, u: float = U64) -> float:
    return k * u / (1 - k * u)


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), N=st.integers(1, 300), k=st.integers(1, 60))
def test_tv_all_n_matches_mpmath(seed, N, k):
    """δ(n) for every n from one cumulative pass equals Σ|softmax − softmax*| at 200 bits,
    within float64's error: cumulative sums of n terms (γ_n), a quotient and a difference per
    term, summed (γ_(n+3) on a total of at most 2, twice)."""
    rng = np.random.default_rng(seed)
    x = rng.random(N)
    xs = x.copy()
    xs[:k] += rng.uniform(0, 0.1, min(k, N))
    ns, tv = tv_all_n(x, xs, k)
    assert ns.tolist() == list(range(1, N + 1))
    mp = mpmath.MPContext()
    mp.prec = 200
    for n in sorted({1, N, (N + 1) // 2, min(k, N)}):
        e = [mp.exp(mp.mpf(v)) for v in x[:n]]
        es = [mp.exp(mp.mpf(v)) for v in xs[:n]]
        S, Ss = mp.fsum(e), mp.fsum(es)
        exact = mp.fsum(abs(a / S - b / Ss) for a, b in zip(e, es))
        assert abs(float(exact) - tv[n - 1]) <= 4 * gamma(n + 3)


@pytest.mark.parametrize("fmt", ["bf16", "fp16", "e4m3fn"])
def test_softmax_in_format_rows_equal_unpadded(fmt):
    """A row of the masked batch (prefix n of a long vector) is the softmax of x[:n] alone,
    bit for bit: masked entries are exact zeros and change no reduction."""
    rng = np.random.default_rng(1)
    N = 300
    x = rng.random(N)
    xs = x.copy()
    xs[:20] += rng.uniform(0, 0.1, 20)
    ns = np.array([1, 7, 64, 65, 255, 300])
    d_batch, same_batch = tv_in_format(fmt, np.broadcast_to(x, (ns.size, N)), np.broadcast_to(xs, (ns.size, N)), ns)
    for i, n in enumerate(ns):
        d1, s1 = tv_in_format(fmt, x[None, :n], xs[None, :n], np.array([n]))
        assert (d1[0] == d_batch[i]) or (np.isnan(d1[0]) and np.isnan(d_batch[i]))
        assert s1[0] == same_batch[i]


def test_softmax_in_format_overflow_is_reported_not_hidden():
    """e4m3fn has no infinity: a denominator above 448 is NaN, and δ says so."""
    x = np.zeros(1000)
    d, _ = tv_in_format("e4m3fn", x[None], x[None], np.array([1000]))
    assert np.isnan(d[0])
    d, _ = tv_in_format("bf16", x[None], x[None], np.array([1000]))
    assert d[0] == 0.0


@pytest.mark.parametrize("family", ["repeat_last", "first_copy"])  # v vs v*, and pairs that differ in their first token
@pytest.mark.parametrize("policy", ["bf16", "compute=fp16,accumulate=fp32,order=sequential"])
def test_bucket_padding_is_bit_identical(family, policy):
    """Padding a stream with trailing tokens changes no earlier output in the emulated backend."""
    P = init_params(ModelConfig(d=8, n_layers=2, n_heads=2, vocab=8, pe="rope", seed=3))
    be = make_backend("emulated", policy)
    pairs = make_pairs(family, 37, 8, seed=2)
    A0, B0 = pair_outputs(P, pairs, be)
    A1, B1 = pair_outputs(P, pairs, be, bucket=16)
    assert np.array_equal(A0, A1) and np.array_equal(B0, B1)


def test_first_below_and_decay_fit():
    ns = np.arange(1, 2001)
    d = 3.0 / ns
    assert first_below(ns, d, 2.0**-7) == 385  # 3/n < 1/128 ⇔ n > 384
    assert first_below(ns, d, 1e-9) is None
    assert first_below(ns, np.where(ns < 5, 0.0, 1.0), 0.5) is None  # n < 5 is not read
    fit = decay_fit(ns, d)
    assert fit.slope == pytest.approx(-1.0, abs=1e-9) and fit.const == pytest.approx(3.0, rel=1e-9)
    assert fit.reaches(2.0**-7) == pytest.approx(384.0, rel=1e-9)
    flat = decay_fit(ns, np.full(ns.size, 2.0))
    assert flat.reaches(2.0**-7) is None


def test_identical_share_counts_finite_identical_pairs_from_n_min():
    from collapse_sim.experiments.collapse import CollapseResult

    ns = np.arange(1, 9)
    ident = np.array([1, 1, 0, 1, 1, 0, 1, 1], bool)
    nonfinite = np.array([0, 0, 0, 0, 1, 0, 0, 0], bool)  # a NaN pair never counts as identical
    r = CollapseResult("emulated", "bf16", ns, ns * 0.0, ns * 0.0, ident, nonfinite, 1.0, 0.0)
    assert r.identical_share() == 5 / 8
    assert r.identical_share(4) == 3 / 5  # n = 4..8: identical and finite at 4, 7, 8
    assert r.identical_share(9) == 0.0
    assert r.first_identical(3) == 4 and r.collapsed_from() == 7


def test_equal_sweeps_of_two_sections_run_once(monkeypatch):
    """Two sections that sweep the same model, family, length and backends (Fig. 10's sinusoidal
    setups are Fig. 8's) measure it once: the second call runs no sweep and records the same
    distances under its own experiment name."""
    import dataclasses

    from collapse_sim.experiments import paper

    calls = []
    real = paper.collapse_sweep
    monkeypatch.setattr(paper, "collapse_sweep", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    ctx = paper.Context(dataclasses.replace(paper.TINY, ref_n=8))
    params = paper.report_model(d=8, pe="sinusoidal", ape="scores")
    first = paper.run_backends(ctx, params, "repeat_last", 12, ("bf16",), tag="A")
    n_first = len(calls)
    assert n_first == 3  # bf16, float64 and the reference
    second = paper.run_backends(ctx, params, "repeat_last", 12, ("bf16",), tag="B")
    assert len(calls) == n_first
    assert set(first) == set(second) and all(second[k] is first[k] for k in first)
    rows = {t: [{k: v for k, v in r.items() if k != "experiment"} for r in ctx.csv_rows if r["experiment"] == t]
            for t in "AB"}
    assert rows["A"] == rows["B"] and len(rows["A"]) == 12 + 12 + 8
    paper.run_backends(ctx, params, "repeat_last", 13, ("bf16",), tag="C")  # another length is another sweep ...
    assert len(calls) == n_first + 2  # ... but for the reference, which stops at ref_n = 8 either way


def test_short_sweeps_of_one_model_share_one_program():
    """The report pads the streams of sweeps up to n = SHORT to a multiple of SHORT (``bucket_for``):
    families whose streams differ in length (``first_copy``, n + 1 tokens; ``sum_ones``, 2n + 1) then
    run one compiled emulated forward, with the bits of their streams unpadded."""
    from collapse_sim.compilation import snapshot
    from collapse_sim.experiments import paper
    from collapse_sim.pairing import collapse_sweep

    n = 100
    assert paper.bucket_for(n) == paper.SHORT and paper.bucket_for(paper.SHORT + 1) == paper.BUCKET
    P = init_params(ModelConfig(d=4, n_layers=1, vocab=6, pe="rope", seed=3))
    be = make_backend("emulated", "compute=bf16,order=pairwise")
    collapse_sweep(P, "first_copy", n, be, "bf16", bucket=paper.bucket_for(n))
    t0 = snapshot()
    padded = collapse_sweep(P, "sum_ones", n, be, "bf16", bucket=paper.bucket_for(n), keep_outputs=True)
    assert snapshot().since(t0).compiled == 0
    plain = collapse_sweep(P, "sum_ones", n, be, "bf16", keep_outputs=True)
    for a, b in zip(padded.outputs, plain.outputs):
        assert np.array_equal(a.view(np.uint64), b.view(np.uint64))
