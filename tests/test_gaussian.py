"""The Fig. 8/10 captions' Gaussian model: its reading, its decay, its backends.

q_i, k_i, v_i ~ N(0, I/d) per position, the last position repeated for v*, one head
of the decoder's attention, L1 distance against 2^-7 (collapse_sim.model, kind="gaussian").
"""

from __future__ import annotations

import mpmath
import numpy as np
import pytest

from collapse_sim import positional
from collapse_sim.backends import make_backend
from collapse_sim.families import FIRST_FREE, make_pairs
from collapse_sim.model import ConfigError, alibi_slopes, forward, gaussian_config, gaussian_draws, init_params, token_bound

LINE = 2.0**-7

SETUPS = {
    "none": dict(pe="none"),
    "rope": dict(pe="rope"),
    "sin_keys": dict(pe="sinusoidal", sin_at="keys"),
    "sin_qk": dict(pe="sinusoidal", sin_at="qk"),
    "sin_values": dict(pe="sinusoidal", sin_at="values"),
    "alibi_after": dict(pe="alibi", alibi_slope=2.0**-3),
    "alibi_before": dict(pe="alibi", alibi_slope=2.0**-3, alibi_at="before"),
    "rope_layernorm": dict(pe="rope", norm="layernorm"),
}


def _same(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))  # ±0 equal: mpmath has no -0


def _stream(n):
    """The repeat_last family of the Gaussian model: fresh ids, probe = the last id."""
    pairs = make_pairs("repeat_last", n, None)
    return pairs.runs[0].tokens, pairs.runs[0].probe


# --- (a) float64: the decay n^-1 and the crossing near n ≈ 820 --------------------------------------
@pytest.mark.parametrize("label,setup", [("no PE", SETUPS["none"]), ("RoPE", SETUPS["rope"]),
                                         ("sinusoidal on keys", SETUPS["sin_keys"])])
def test_fp64_mean_curve_decays_as_one_over_n_and_meets_the_line_near_820(label, setup):
    """3 seeds, d = 64, n ≤ 2,000, native float64 (exact to ~1e-13 here, far below the
    distances), fit over [200, 2000]: the mean L1 distance decays as n^-1 ± 0.15 and its
    fit meets 2^-7 between n = 650 and 1,050 (an independent float64 simulation up to
    n = 10,000: ≈ 819, 824, 821)."""
    from collapse_sim.experiments.captions import caption_row

    r = caption_row(label, setup, n_max=2000, seeds=(0, 1, 2))
    assert r.fit_window == (200, 2000)
    assert abs(r.exponent + 1.0) <= 0.15, r.as_dict()
    assert r.fit_crossing is not None and 650 <= r.fit_crossing <= 1050, r.as_dict()
    assert r.nonfinite == 0 and r.first_identical == (None, None, None)  # float64 keeps every pair n >= 5 apart


@pytest.mark.parametrize("label,setup", [("sinusoidal on queries and keys", dict(pe="sinusoidal", sin_at="qk")),
                                         ("ALiBi m = 2^-8 after 1/sqrt(d)", dict(pe="alibi", alibi_slope=2.0**-8))])
def test_fp64_positions_that_do_not_decay_stay_above_the_line(label, setup):
    """Sinusoidal positions on queries and keys (|PE|² = d/2 dominates q·k, so the weights
    are set by position) and ALiBi at slope 2^-8 after the scale (the weights of the last
    ~1/m positions do not shrink with n) keep the mean curve above 2^-7 up to n = 2,000,
    and decay far slower than n^-1 (independent simulation: n^-0.57 and flat)."""
    from collapse_sim.experiments.captions import caption_row

    r = caption_row(label, setup, n_max=2000, seeds=(0, 1, 2))
    assert r.first_below is None and r.exponent > -0.85, r.as_dict()


# --- (d) what is drawn and what v* is: an independent mpmath oracle --------------------------------
def _oracle(c, ids, prec=256, exact=False):
    """The last-position output for the sequence of draw ids ``ids``, written from the
    captions' reading alone at ``prec`` bits: q, k, v of id t are gaussian_draws' row t;
    position i gets the float64 sinusoidal row i (where sin_at says) or the float64 RoPE
    rotation by position i; score = q_last · k_j · fl(1/√d) − m_eff·(L−1−j); output =
    Σ softmax · v (then LayerNorm with eps if the config has it)."""
    L, d = len(ids), c.d
    q, k, v = (np.asarray(a)[list(ids)] for a in gaussian_draws(c, max(ids) + 1))
    with mpmath.workprec(prec):
        Q, K, V = ([[mpmath.mpf(float(x)) for x in row] for row in a] for a in (q, k, v))
        if c.pe == "sinusoidal":
            pe = positional.sinusoidal(L, d)
            for name, M in zip(("q", "k", "v"), (Q, K, V)):
                if name in {"keys": "k", "qk": "qk", "values": "v"}[c.sin_at]:
                    for i in range(L):
                        M[i] = [a + mpmath.mpf(float(b)) for a, b in zip(M[i], pe[i])]
        if c.pe == "rope":
            cos, sin = positional.rope_tables(np.arange(L), d)
            for M in (Q, K):
                for i in range(L):
                    row = list(M[i])
                    for p in range(d // 2):
                        x0, x1, cc, ss = row[2 * p], row[2 * p + 1], mpmath.mpf(float(cos[i, p])), mpmath.mpf(float(sin[i, p]))
                        M[i][2 * p], M[i][2 * p + 1] = x0 * cc - x1 * ss, x0 * ss + x1 * cc
        m = 0 if c.pe != "alibi" else c.alibi_slope / (np.sqrt(d) if c.alibi_at == "before" else 1.0)
        scale = mpmath.mpf(float(1 / np.sqrt(d)))
        s = [mpmath.fsum(a * b for a, b in zip(Q[-1], K[j])) * scale - mpmath.mpf(float(m)) * (L - 1 - j) for j in range(L)]
        e = [mpmath.exp(x) for x in s]
        den = mpmath.fsum(e)
        y = [mpmath.fsum(e[j] * V[j][t] for j in range(L)) / den for t in range(d)]
        if c.norm == "layernorm":
            mu = mpmath.fsum(y) / d
            var = mpmath.fsum((x - mu) ** 2 for x in y) / d
            y = [(x - mu) / mpmath.sqrt(var + mpmath.mpf(c.norm_eps)) for x in y]
        return y if exact else np.array([float(x) for x in y])


@pytest.mark.parametrize("name", list(SETUPS))
def test_v_and_v_star_are_the_drawn_sequence_and_its_last_position_repeated(name):
    """Arb balls (256 bits) of the prefix-trick outputs enclose the oracle's values for
    v = ids[:n] and v* = ids[:n] + [ids[n-1]] (rounding is monotone, so the float64
    bounds of a ball enclose the float64 rounding of any value inside it). Fails if the
    probe is not the last position repeated (planted: probe = the next id), if a
    placement, rotation or slope reading differs from the captions', or if the draws
    of a position depend on anything but (seed, id)."""
    c = gaussian_config(16, seed=5, **SETUPS[name])
    ids, probe = _stream(10)
    assert np.array_equal(ids, FIRST_FREE + np.arange(10)) and np.array_equal(probe, ids)
    be = make_backend("interval", "arb256")
    y, yp = forward(init_params(c), ids, be, probe=probe)
    lo = np.vectorize(lambda v: float(v.lower()))
    hi = np.vectorize(lambda v: float(v.upper()))
    for n in (1, 2, 7, 10):
        for got, seq in ((y[n - 1], list(ids[:n])), (yp[n - 1], list(ids[:n]) + [ids[n - 1]])):
            want = _oracle(c, seq)
            assert np.all((lo(got) <= want) & (want <= hi(got))), (name, n)


def test_draws_depend_only_on_seed_and_id():
    """A longer stream extends a shorter one (the prefix trick needs it), past the
    256-id block boundary; another seed draws other numbers; the variance is σ²."""
    c = gaussian_config(8, seed=3)
    short, long_ = gaussian_draws(c, 300), gaussian_draws(c, 700)
    for a, b in zip(short, long_):
        assert np.array_equal(a, b[:300])
    other = gaussian_draws(gaussian_config(8, seed=4), 300)
    assert not np.array_equal(short[0], other[0])
    # σ² = 1/d by default, or qkv_var: the sample variance of 3·700·8 = 16,800 draws is within
    # 5 standard errors (sd of a sample variance of n normals: σ²·sqrt(2/(n-1)))
    for var in (None, 0.25):
        z = np.concatenate(gaussian_draws(gaussian_config(8, seed=3, qkv_var=var), 700)).ravel()
        s2 = 1 / 8 if var is None else var
        assert abs(z.var() - s2) <= 5 * s2 * np.sqrt(2 / (z.size - 1))


# --- (b) emulated == op-by-op reference, bit for bit -----------------------------------------------
@pytest.mark.parametrize("name,policy", [
    ("rope", "compute=bf16,order=pairwise"),
    ("sin_qk", "compute=fp16,accumulate=fp32,order=sequential"),
    ("alibi_before", "compute=fp16,order=pairwise"),
    ("rope_layernorm", "compute=bf16,order=pairwise,mode=rz"),
    ("sin_values", "compute=e4m3fn,order=pairwise"),
])
def test_emulated_equals_reference_bit_for_bit(name, policy):
    """d = 8, n = 12 with a probe after every prefix: the Gaussian model's q, k, v enter
    both backends rounded once to the storage format and go through the same attention."""
    c = gaussian_config(8, seed=2, **SETUPS[name])
    P = init_params(c)
    ids, probe = _stream(12)
    e, r = make_backend("emulated", policy), make_backend("reference", policy)
    ye, ype = forward(P, ids, e, probe=probe)
    yr, ypr = forward(P, ids, r, probe=probe)
    assert _same(e.to_numpy(ye), r.to_numpy(yr))
    assert _same(e.to_numpy(ype), r.to_numpy(ypr))


# --- (c) the prefix trick ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["rope", "sin_qk"])
def test_prefix_trick_equals_separate_runs_emulated(name):
    """Row n-1 of one stream pass (and its probe) equals the last row of a separate
    forward of v = ids[:n] (and of v* = ids[:n] + [ids[n-1]]), bit for bit in bf16.
    Separate runs are padded to one length (tokens after position n-1 change nothing
    before it, causal attention), so one compiled forward serves every n."""
    from collapse_sim.experiments.collapse import pad_stream

    c = gaussian_config(8, seed=1, **SETUPS[name])
    P = init_params(c)
    N = 12
    ids, probe = _stream(N)
    e = make_backend("emulated", "compute=bf16,order=pairwise")
    y, yp = (e.to_numpy(a) for a in forward(P, ids, e, probe=probe))
    for n in range(1, N + 1):
        for seq, want in ((ids[:n], y[n - 1]), (np.append(ids[:n], ids[n - 1]), yp[n - 1])):
            toks, _ = pad_stream(seq, None, N + 1)
            assert _same(e.to_numpy(forward(P, toks, e))[len(seq) - 1], want), (n, len(seq))


# --- configuration and the other backends ----------------------------------------------------------
def test_every_backend_runs_and_native_agrees_with_the_oracle():
    """native bf16 and fp16 run (finite); mpmath intervals (128 bits) enclose the 256-bit
    oracle; float64 native is within a few ulps of it."""
    c = gaussian_config(16, seed=9, pe="rope")
    P = init_params(c)
    ids, probe = _stream(6)
    for fmt in ("bf16", "fp16"):
        be = make_backend("native", fmt)
        assert all(np.isfinite(be.to_numpy(a)).all() for a in forward(P, ids, be, probe=probe))
    iv = make_backend("interval", "128")
    y = forward(P, ids, iv)
    want = _oracle(c, list(ids), exact=True)
    assert all(w in v for w, v in zip(want, y[-1]))
    want = np.array([float(w) for w in want])
    n64 = make_backend("native", "fp64")
    y64 = n64.to_numpy(forward(P, ids, n64))[-1]
    # float64 error of one attention output: scores (a d-term dot, a scale, a rotation of
    # 2 products and a sum per entry), exp, a sum of n terms, a division, an n-term
    # weighted sum: a few ulps times (d + n) relative to max |v| — bound γ_{2(d+n)+8}·max|v|
    u = 2.0**-53
    k = 2 * (c.d + len(ids)) + 8
    vmax = np.max(np.abs(gaussian_draws(c, int(ids.max()) + 1)[2]))
    assert np.max(np.abs(y64 - want)) <= k * u / (1 - k * u) * vmax


def test_config_refusals_and_token_bound():
    for bad, match in ((dict(n_layers=2), "one attention layer"), (dict(n_heads=2), "one head"),
                       (dict(d_ff=8), "no MLP"), (dict(pe="learned"), "learned"), (dict(ape="scores"), "sin_at"),
                       (dict(sin_at="queries"), "sin_at"), (dict(alibi_at="inside"), "alibi_at"),
                       (dict(qkv_var=0.0), "qkv_var")):
        with pytest.raises(ConfigError, match=match):
            gaussian_config(8, **bad)
    assert token_bound(gaussian_config(8)) is None
    assert alibi_slopes(gaussian_config(16, pe="alibi")) == [2.0**-8]  # Press et al., one head
    assert alibi_slopes(gaussian_config(16, pe="alibi", alibi_slope=0.5, alibi_at="before")) == [0.125]
    with pytest.raises(ConfigError, match=">= 0"):
        forward(init_params(gaussian_config(8)), np.array([-1]), make_backend("native", "fp64"))


def test_cli_collapse_gaussian_writes_the_usual_table(tmp_path):
    """``collapse --model gaussian`` writes collapse.csv with the decoder run's columns."""
    import csv

    from collapse_sim.cli import main

    assert main(["collapse", "--model", "gaussian", "--family", "repeat_last", "--pe", "rope", "--format", "fp64",
                 "--backend", "native", "--max-len", "40", "--d", "16", "--seed", "0", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader((tmp_path / "collapse.csv").read_text().splitlines()))
    assert list(rows[0]) == ["n", "backend", "format", "dist_l1", "dist_linf", "bitwise_identical", "nonfinite", "exact_equal"]
    assert [int(r["n"]) for r in rows] == list(range(1, 41))
    c = gaussian_config(16, pe="rope", seed=0)
    ids, probe = _stream(40)
    be = make_backend("native", "fp64")
    y, yp = (be.to_numpy(a) for a in forward(init_params(c), ids, be, probe=probe))
    assert float(rows[-1]["dist_l1"]) == float(np.abs(y[-1] - yp[-1]).sum())
