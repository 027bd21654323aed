"""Stochastic rounding with r random bits (docs/semantics.md §1): round_to against an exact
rational oracle written from the spec, for every draw of small r; the emulated ops under
an ``sr(r)`` policy; and a sum of ones whose mean and bias the definition predicts."""

from __future__ import annotations

import functools
import math
import os
from fractions import Fraction

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest

from collapse_sim.formats import parse
from collapse_sim.rounding import RoundingError, Stochastic, parse_mode, round_to
from oracles import _fix_zero, _outside, _special, format_values
from test_rounding import _same, _test_points

FORMATS = ["bf16", "fp16", "e4m3fn", "e5m2"]


@functools.lru_cache(maxsize=None)
def _top(fmt):
    """The overflow value, the largest value and its significand and quantum exponent."""
    xmax = float(fmt.max_exact)
    return {"inf": math.inf, "nan": math.nan, "saturate": xmax}[fmt.overflow], xmax, fmt.top_significand, fmt.emax - fmt.p + 1


def sr_parts(x: float, fmt):
    """docs/semantics.md §1 for ``sr(r)``, written again with integers (x = num / 2^k): the
    results when the draw does not carry and when it does, and the discarded part as
    F / 2^D, so that t = floor(F * 2^(r - D)) and the draw u carries iff t + u >= 2^r."""
    if math.isnan(x) or math.isinf(x):
        s = _special(x, fmt)
        return s, s, 0, 0
    negative = math.copysign(1.0, x) < 0
    if _outside(x == 0, negative, fmt):
        return math.nan, math.nan, 0, 0
    if x == 0:
        z = _fix_zero(0.0, negative, fmt)
        return z, z, 0, 0
    big, xmax, top, mq = _top(fmt)
    num, den = abs(x).as_integer_ratio()
    k = den.bit_length() - 1  # |x| = num / 2^k
    e = num.bit_length() - 1 - k  # floor(log2 |x|)
    qe = (max(e, fmt.emin) if fmt.subnormals else e) - fmt.p + 1  # the quantum 2^qe
    D = k + qe  # |x| / 2^qe = num / 2^D = n + F / 2^D
    n, F = (num >> D, num & ((1 << D) - 1)) if D > 0 else (num << -D, 0)
    out = []
    for N in (n, n + 1):
        if (N << max(qe - mq, 0)) > (top << max(mq - qe, 0)):  # step 3: the overflow value if the draw carried, else max
            v = big if N > n else xmax
        elif not fmt.subnormals and qe < fmt.emin and N < (1 << (fmt.emin - qe)):
            v = 0.0  # step 4
        else:
            v = math.ldexp(N, qe)
        out.append(_fix_zero(-v if negative else v, negative, fmt))
    return out[0], out[1], F, max(D, 0)


#: Formats of more values than this (bf16, fp16) are checked on a sample of their binades
#: (every binade where the rule meets its edges: subnormals, the smallest normals, the
#: overflow threshold; every SAMPLE-th elsewhere, where §1's steps are the same up to the
#: scaling by 2^e), except under the ``thorough`` hypothesis profile, which checks every
#: point. bf16 has ~10^6 points, and this oracle is pure Python.
VALUES, SAMPLE = 4096, 8


def _binades_checked(fmt):
    """A predicate on |x| (an array): whether x's binade is among those checked."""
    if len(format_values(fmt)) <= VALUES or os.environ.get("HYPOTHESIS_PROFILE") == "thorough":
        return lambda a: np.ones(a.shape, bool)

    def keep(a):
        with np.errstate(divide="ignore"):
            e = np.floor(np.log2(np.where(a > 0, a, 1.0))).astype(np.int64)
        e = np.where(np.isfinite(a), e, fmt.emax + 1)
        return (e <= fmt.emin + 2) | (e >= fmt.emax - 1) | (e % SAMPLE == 0) | (a == 0) | ~np.isfinite(a)

    return keep


@functools.lru_cache(maxsize=None)
def _points(name):
    """The rounding harness's points (values, midpoints and their float64/float32 neighbours,
    both signs, plus ±inf and NaN) and every quarter point between neighbouring values with
    its float64 and float32 neighbours: every t of r <= 3 (0 to 7) and the edges around it;
    in the binades :func:`_binades_checked` keeps."""
    fmt = parse(name)
    p64, _ = _test_points(fmt)
    vals = format_values(fmt) + [Fraction(2) ** (fmt.emax + 1)]
    keep = _binades_checked(fmt)
    p64 = p64[keep(np.abs(p64))]
    extra = set()
    for a, b in zip(vals[:-1], vals[1:]):
        if not keep(np.array([float(a)]))[0]:
            continue
        for v in (float(a + (b - a) / 4), float(a + (b - a) * 3 / 4)):
            f = np.float32(v)
            extra.update((v, math.nextafter(v, math.inf), math.nextafter(v, -math.inf),
                          float(np.nextafter(f, np.float32(np.inf))), float(np.nextafter(f, np.float32(-np.inf)))))
    extra = np.array(sorted(extra), np.float64)
    pos = np.unique(np.concatenate([p64[p64 > 0], extra, [np.inf]]))
    table = [sr_parts(x, fmt) for x in pos.tolist()]  # a negative point's results are their negations (§1 step 5)
    flip = [(-d, -u, F, D) for d, u, F, D in table]
    pts = np.concatenate([pos, -pos, [0.0, -0.0, np.nan]])
    down, up, F, D = zip(*(table + flip + [sr_parts(x, fmt) for x in (0.0, -0.0, math.nan)]))
    for i in range(0, len(pos), 997):  # the symmetry the table uses, on a sample of the points
        assert _same(np.array(flip[i][:2]), np.array(sr_parts(-pos[i], fmt)[:2])).all() and flip[i][2:] == sr_parts(-pos[i], fmt)[2:]
    return fmt, pts, np.array(down), np.array(up), F, D


@functools.lru_cache(maxsize=None)
def _t(name, r):
    """t = floor(frac * 2^r) of every point, as uint64 (r <= 64)."""
    *_, F, D = _points(name)
    return np.array([f >> (d - r) if d >= r else f << (r - d) for f, d in zip(F, D)], np.uint64)


def _check(name, r, draws_of, label):
    """round_to from float64 and from float32 (the points float32 holds) with each of the
    draw arrays ``draws_of(t, width)`` against the oracle: up iff t + u >= 2^r."""
    fmt, pts, down, up, _, _ = _points(name)
    f32 = (pts.astype(np.float32).astype(np.float64) == pts) | np.isnan(pts)
    for dtype, width, sel in ((jnp.float64, 64, np.ones(pts.shape, bool)), (jnp.float32, 32, f32)):
        rr = width if r == "full" else r
        if rr > width:
            continue
        t = _t(name, rr)[sel]
        x = jnp.asarray(pts[sel], dtype)
        for u in draws_of(t, rr):
            u = np.asarray(u, np.uint64)
            carry = (t > 0) & (u >= (np.uint64(2**rr - 1) - t + np.uint64(1)))  # t + u >= 2^r, in uint64
            want = np.where(carry, up[sel], down[sel])
            got = np.asarray(round_to(x, fmt, f"sr({rr})", draws=u.astype(np.uint64 if width == 64 else np.uint32)))
            ok = _same(got.astype(np.float64), want)
            assert ok.all(), (name, r, label, dtype.__name__, pts[sel][~ok][:4], got[~ok][:4], want[~ok][:4])


@pytest.mark.parametrize("name", FORMATS)
def test_sr_against_the_oracle(name):
    """r = 1, 2, 3: every draw u in [0, 2^r), the same for every point. r = 8, 23 and
    ``full`` (as many bits as the input is wide, plain ``sr``): for each point the draws 0,
    2^r - 1, the last that does not carry (2^r - t - 1) and the first that does (2^r - t)."""
    for r in (1, 2, 3):
        _check(name, r, lambda t, r: [np.full(t.shape, u, np.uint64) for u in range(2**r)], "every draw")

    def edges(t, r):
        top = np.uint64(2**r - 1)  # 2^r - 1, in uint64 for r = 64
        return [np.zeros_like(t), np.full_like(t, top), np.where(t > 0, top - t, top), np.where(t > 0, top - t + 1, 0)]

    for r in (8, 23, "full"):
        _check(name, r, edges, "edges")


def test_plain_sr_is_full_width_from_the_key():
    """``sr`` with a key is ``sr(W)`` (W = 64 from float64, 32 from float32) with the key's
    random words as the draws: the mapping round_to documents."""
    fmt, pts, *_ = _points("e5m2")
    key = jax.random.key(7)
    for dtype, u in ((jnp.float64, jnp.uint64), (jnp.float32, jnp.uint32)):
        x = jnp.asarray(pts, dtype)
        words = jax.random.bits(key, x.shape, dtype=u)
        w = 8 * jnp.dtype(dtype).itemsize
        assert _same(round_to(x, fmt, "sr", key=key), round_to(x, fmt, f"sr({w})", draws=words)).all()
        four = round_to(x, fmt, "sr(4)", key=key)
        assert _same(four, round_to(x, fmt, "sr(4)", draws=words >> u(w - 4))).all()


def test_bad_draws_and_modes_are_refused():
    x = jnp.asarray([1.0, 1.5])
    for kw, msg in [({"draws": np.array([0, 4])}, r"draws must be integers in \[0, 2\^2\) for sr\(2\)"),
                    ({"draws": np.array([0.5, 1.0])}, "got dtype float64"),
                    ({}, "needs an explicit PRNG key or the draws"),
                    ({"draws": np.array([0, 1]), "key": jax.random.key(0)}, "one of them")]:
        with pytest.raises(RoundingError, match=msg):
            round_to(x, "bf16", "sr(2)", **kw)
    with pytest.raises(RoundingError, match="takes none"):
        round_to(x, "bf16", "rne", draws=np.array([0, 1]))
    with pytest.raises(RoundingError, match="at most 32 random bits"):
        round_to(x.astype(jnp.float32), "bf16", "sr(33)", draws=np.array([0, 1]))
    for bad in ("sr(0)", "sr(65)", "sr(4,seed=-1)", "sr(x)", "sr(4"):
        with pytest.raises(RoundingError, match=r"sr\(r\)"):
            parse_mode(bad)
    assert parse_mode("SR(4, seed=3)") == Stochastic(4, 3) and parse_mode("sr(4)").value == "sr(4,seed=0)"


# --- stochastic rounding as a policy mode of the emulated ops --------------------------


def _sum_of_ones_law(n: int, r: int):
    """The exact law of a sequential bf16 sum of ``n`` ones under ``sr(r)``, from the oracle
    above: from s, the add gives s + 1's down or up result, up with probability t / 2^r.
    Returns the mean, the variance (Fractions) and the support."""
    fmt = parse("bf16")
    law = {0.0: 1}  # value -> numerator over 2^(r * steps)
    for _ in range(n):
        nxt: dict = {}
        for s, w in law.items():
            down, up, F, D = sr_parts(s + 1.0, fmt)
            t = F >> (D - r) if D >= r else F << (r - D)
            for v, c in ((down, (1 << r) - t), (up, t)):
                if c:
                    nxt[v] = nxt.get(v, 0) + w * c
        law = nxt
    den = 1 << (r * n)
    mean = sum(Fraction(w * Fraction(v)) for v, w in law.items()) / den
    var = sum(w * (Fraction(v) - mean) ** 2 for v, w in law.items()) / den
    return mean, var, sorted(law)


def _bernstein(var, spread, m: int, delta: float) -> float:
    """The epsilon of Bernstein's inequality for the mean of ``m`` independent copies of X
    with variance ``var`` and |X - E X| <= ``spread``: P(|mean - E X| >= eps) <=
    2 exp(-m eps^2 / (2 var + 2 spread eps / 3)) = delta, solved for eps."""
    L = math.log(2 / delta)
    a, b, c = m, -2 * spread * L / 3, -2 * float(var) * L
    return (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)


@pytest.mark.parametrize("r", [1, 2, 8])
def test_sequential_sum_of_ones_under_sr(r):
    """A sequential bf16 sum of n = 1024 ones: RNE stalls at 256; under sr(r) each add of 1 to
    s in [2^k, 2^(k+1)) (k >= 8) has frac = 2^(7-k), so t = 2^(7-k+r) while k <= 7 + r
    (unbiased) and 0 beyond: the sum stalls at 2^(8+r). The exact law of the sum (computed
    from the definition) has mean n for r = 8 and below n for r = 1, 2; the mean over m seeds'
    rows lies within Bernstein's eps of it (failure probability 1e-9), and farther than eps
    from n when the definition predicts a bias."""
    from collapse_sim.backends.emulated.ops import Emulator

    n, m = 1024, 2048
    ones = jnp.ones((m, n))
    assert (np.asarray(Emulator("compute=bf16,order=sequential").sum(ones[:2])) == 256).all()
    mean, var, support = _sum_of_ones_law(n, r)
    got = np.asarray(Emulator(f"compute=bf16,order=sequential,mode=sr({r},seed=5)").sum(ones))
    assert set(np.unique(got)) <= set(support)
    spread = max(abs(Fraction(v) - mean) for v in support)
    eps = _bernstein(var, float(spread), m, 1e-9)
    assert abs(got.mean() - float(mean)) <= eps, (r, got.mean(), float(mean), eps)
    if r == 8:
        assert mean == n  # every add unbiased below 2^16
    else:
        assert mean < n - 2 * eps and got.max() <= 2 ** (8 + r), (r, float(mean), eps)


def _rz53(q: Fraction) -> float:
    """The float64 next to the exact q > 0 toward zero: its first p + r <= 52 bits are q's,
    so it has q's truncations (and q's results under sr(r), whatever the draw)."""
    x = float(q)
    return math.nextafter(x, 0.0) if Fraction(x) > q else x


def _sqrt_rz53(a: Fraction) -> float:
    k = 200  # floor(sqrt(a) * 2^k) by integers, then toward zero to float64
    s = math.isqrt(a.numerator * 4**k // a.denominator)
    return _rz53(Fraction(s, 2**k))


def _exp_rz53(x: float) -> float:
    """e^x (x != 0 is never a float64's logarithm: e^x is irrational) to 300 bits, then toward zero."""
    with mpmath.workprec(300):
        v = mpmath.exp(mpmath.mpf(x))
        return _rz53(Fraction(*(int(c) for c in mpmath.libmp.to_rational(v._mpf_)))) if x != 0 else 1.0


def test_emulated_ops_under_sr_against_the_oracle():
    """The emulated + - * / sqrt exp under compute=bf16,mode=sr(4,seed=2) on random bf16 operands
    and on sums -2^k + 2^(k-60) that float64 rounds onto a value (the carrier's round to odd):
    each result is the oracle's rounding of the exact result with the draws docs/semantics.md
    §2 names, written again with plain integers (test_sr_draws.Scopes): rounding n = 0, 1, 2, ...
    takes slot n of the top scope, element j the top 4 bits of split(split(split(2, 0), n), j)."""
    from test_sr_draws import Scopes

    from collapse_sim.backends.emulated.ops import Emulator

    fmt = parse("bf16")
    rng = np.random.default_rng(3)
    k = rng.integers(-20, 20, 400).astype(float)  # -2^k + 2^(k-60): the float64 sum rounds to -2^k, a value
    a = np.concatenate([np.asarray(round_to(rng.uniform(0.5, 4, 4000) * rng.choice([-1, 1], 4000), fmt)), -(2**k)])
    b = np.concatenate([np.asarray(round_to(rng.uniform(0.5, 4, 4000), fmt)), 2 ** (k - 60)])
    emu = Emulator("compute=bf16,order=sequential,mode=sr(4,seed=2)")
    scopes = Scopes(2)
    exact = {"add": lambda x, y: _rz53(abs(Fraction(x) + Fraction(y))) * (1 if x + y >= 0 else -1),
             "sub": lambda x, y: _rz53(abs(Fraction(x) - Fraction(y))) * (1 if x - y >= 0 else -1),
             "mul": lambda x, y: _rz53(abs(Fraction(x) * Fraction(y))) * (1 if x * y >= 0 else -1),
             "div": lambda x, y: _rz53(abs(Fraction(x) / Fraction(y))) * (1 if x / y >= 0 else -1),
             "sqrt": lambda x, y: _sqrt_rz53(Fraction(y)),
             "exp": lambda x, y: _exp_rz53(x)}
    for op, f in exact.items():
        unary = {"sqrt": b, "exp": a}.get(op)
        got = np.asarray(getattr(emu, op)(jnp.asarray(unary)) if unary is not None else getattr(emu, op)(jnp.asarray(a), jnp.asarray(b)))
        u = scopes.draws(a.size, 4)  # rounding n: slot n of the top scope
        want = []
        for x, y, ui in zip(a, b, u):
            down, up, F, D = sr_parts(f(float(x), float(y)), fmt)
            t = F >> (D - 4) if D >= 4 else F << (4 - D)
            want.append(up if t + int(ui) >= 16 else down)
        ok = _same(got, np.array(want))
        assert ok.all(), (op, a[~ok][:3], b[~ok][:3], got[~ok][:3], np.array(want)[~ok][:3])
    assert emu.roundings == 6


def test_traced_formats_take_the_same_draws():
    """A format as data (FormatParams, one program for the class) rounds under sr(r) with
    given draws to the same bits as the static format: every point of e5m2 and e4m3fn, r = 3,
    every draw."""
    from collapse_sim.rounding import FormatClass

    for name in ("e5m2", "e4m3fn"):
        fmt, pts, *_ = _points(name)
        x = jnp.asarray(pts)
        for u in range(8):
            d = np.full(pts.shape, u, np.uint64)
            assert _same(round_to(x, FormatClass().params(fmt), "sr(3)", draws=d), round_to(x, fmt, "sr(3)", draws=d)).all()
