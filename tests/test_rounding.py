"""round_to against independent oracles, exhaustively for the small formats."""

from __future__ import annotations

import functools
import math
import re
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from collapse_sim.formats import parse
from collapse_sim.rounding import Mode, round_to
from oracles import format_values, fraction_round, mpfr_round

DET_MODES = ["rne", "rz", "ru", "rd", "rna", "rnz", "ro"]
#: ml_dtypes 0.7's other formats: bias 11 without -0, unsigned, and unsigned without zero (p = 1)
DOMAIN = ["e4m3b11fnuz", "e5m3fnu", "e8m0fnu"]
EXHAUSTIVE = ["bf16", "fp16", "e4m3fn", "e5m2", *DOMAIN]


@functools.lru_cache(maxsize=None)
def _test_points(fmt):
    """Values, midpoints, and the inputs one ulp of f32 / f64 either side of each midpoint.

    Returns (f64 points, f32 points) including both signs; f32 points are those
    exactly representable in float32. A format without zero gets 0 as a value here (the
    midpoint below its smallest value and the points around it), and every format the
    smallest float32 and float64 (far below its range).
    """
    vals = ([] if fmt.has_zero else [Fraction(0)]) + format_values(fmt)
    # one more value past the top: 2^(emax+1) closes the last interval (overflow set)
    vals_ext = vals + [Fraction(2) ** (fmt.emax + 1)]
    pts = set(float(v) for v in vals) | {2.0**-149, 5e-324}
    mids = [(a + b) / 2 for a, b in zip(vals_ext[:-1], vals_ext[1:])]
    mids.append(Fraction(fmt.max_exact) + (Fraction(2) ** (fmt.emax - fmt.p + 1)) / 2)
    for m in mids:
        fm = float(m)
        assert Fraction(fm) == m
        pts.add(fm)
        pts.add(math.nextafter(fm, math.inf))
        pts.add(math.nextafter(fm, -math.inf))
        f32 = np.float32(fm)
        pts.add(float(np.nextafter(f32, np.float32(np.inf))))
        pts.add(float(np.nextafter(f32, np.float32(-np.inf))))
    for v in vals[:4] + vals[-4:]:
        pts.add(math.nextafter(float(v), math.inf))
        pts.add(math.nextafter(float(v), -math.inf))
    pos = sorted(p for p in pts if p >= 0)
    allp = np.array(pos + [-p for p in pos], dtype=np.float64)
    f32_ok = allp.astype(np.float32).astype(np.float64) == allp
    return allp, allp[f32_ok]


def _same(a, b):
    """Bitwise equality of float arrays, NaNs of any payload counted equal."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both_nan = np.isnan(a) & np.isnan(b)
    eq = (a.view(np.uint64) == b.view(np.uint64)) | both_nan
    return eq


def _oracle_table(pts, fmt, mode, oracle):
    """``lookup(xs)``: the oracle's roundings of ``xs``, float64 numbers among ``pts``, each
    computed once: the f32 test points are f64 test points too (the same values)."""
    table = dict(zip(pts.view(np.uint64).tolist(), (oracle(float(x), fmt, mode) for x in pts)))
    return lambda xs: np.array([table[b] for b in np.asarray(xs, np.float64).view(np.uint64).tolist()])


@pytest.mark.parametrize("name", EXHAUSTIVE)
@pytest.mark.parametrize("mode", DET_MODES)
def test_exhaustive_against_mpfr(name, mode):
    fmt = parse(name)
    p64, p32 = _test_points(fmt)
    lookup = _oracle_table(p64, fmt, mode, mpfr_round)
    expected = lookup(p64)
    got64 = np.asarray(round_to(jnp.asarray(p64), fmt, mode))
    ok = _same(got64, expected)
    assert ok.all(), f"f64 inputs: {p64[~ok][:5]} -> {got64[~ok][:5]}, expected {expected[~ok][:5]}"
    exp32 = lookup(p32)
    got32 = np.asarray(round_to(jnp.asarray(p32, dtype=jnp.float32), fmt, mode)).astype(np.float64)
    ok = _same(got32, exp32)
    assert ok.all(), f"f32 inputs: {p32[~ok][:5]} -> {got32[~ok][:5]}, expected {exp32[~ok][:5]}"


FAST = EXHAUSTIVE + ["e4m3", "e4m3fnuz", "e5m2fnuz", "e3m4", "e2m3fn", "e3m2fn", "e2m1fn",
                     "p=3,emax=3,subnormals=false", "p=6,emin=-4,emax=5,overflow=saturate"]
_F32_TINY = 2.0**-126  # float32's smallest normal


_CHUNK = 2**15  # the general path's program runs on blocks of this many points


@functools.lru_cache(maxsize=None)
def _general_program(fmt_or_cls, dtype):
    """``_round_general`` in every deterministic mode, one program (a third of the compile time
    of seven): for a :class:`FormatClass` one program serves every member (the format passed
    as data), else one per format."""
    from collapse_sim.rounding import FormatClass, _round_general

    modes = [Mode(m) for m in DET_MODES]
    if isinstance(fmt_or_cls, FormatClass):
        return jax.jit(lambda x, fp: jnp.stack([_round_general(x, None, fp, m) for m in modes]))
    return jax.jit(lambda x, fp: jnp.stack([_round_general(x, None, fmt_or_cls, m) for m in modes]))


def _general_all_modes(x, fmt, dtype):
    """``_round_general(x, fmt, mode)`` for every deterministic mode (rows), in blocks of
    ``_CHUNK``; with the format as data where the carrier's class takes it (one compile for
    all of them), else as constants."""
    from collapse_sim.rounding import FormatClass

    flags = {f: getattr(fmt, f) for f in ("subnormals", "signed_zero", "signed", "has_zero")}
    cls = (FormatClass(**flags) if dtype == jnp.float64
           else FormatClass("float32", pmax=22, qmin=-125, emax=126, **flags))
    fp, key = (cls.params(fmt), cls) if cls.why_not(fmt) is None else (None, fmt)
    program = _general_program(key, dtype)
    n = len(x)
    blocks = np.concatenate([x, np.zeros(-n % _CHUNK)]).reshape(-1, _CHUNK)
    return np.concatenate([np.asarray(program(jnp.asarray(b, dtype), fp)).astype(np.float64) for b in blocks],
                          axis=1)[:, :n]


def _fast_all_modes(fmt, dtype):
    modes = [Mode(m) for m in DET_MODES]
    return jax.jit(lambda x: jnp.stack([round_to(x, fmt, m) for m in modes]))


@pytest.mark.parametrize("name", ["bf16", "fp16", "e4m3fn", "p=4,emax=6,overflow=saturate", "e5m2fnuz"])
def test_nearest_even_takes_the_short_branch(name, monkeypatch):
    """RNE to a format with negative numbers and a signed zero takes the fast path's short branch
    (``rounding._round_rne``: ``reduce_precision`` and three compares), a program of fewer operations
    than the branch every mode shares; the fnuz formats (one zero) keep the shared branch.
    test_fast_path_equals_general and test_exhaustive_against_mpfr check its bits."""
    from collapse_sim import rounding

    fmt = parse(name)

    def ops():  # the fast path traced afresh (round_to's jitted program would come from jit's cache)
        return str(jax.make_jaxpr(lambda v: rounding._round_fast(v, fmt, Mode.RNE))(jnp.zeros(3))).count(" = ")

    short = ops()
    monkeypatch.setattr(rounding, "_short_rne", lambda f: False)
    shared = ops()
    monkeypatch.undo()
    assert (short < shared) == rounding._short_rne(fmt) == fmt.signed_zero, (short, shared)
    # NaN of either sign and any payload gives the canonical NaN (the bit tests take any NaN as equal)
    for dt, u in ((jnp.float64, np.uint64), (jnp.float32, np.uint32)):
        nans = np.array([np.nan, -np.nan, np.nan], dt)
        nans.view(u)[2] |= 1  # a payload
        got = np.asarray(round_to(jnp.asarray(nans), fmt, "rne")).view(u)
        assert (got == np.array(np.nan, dt).view(u)).all(), (dt, got)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_formats_whose_tiny_rounding_constant_overflows_the_carrier(dtype):
    """A format whose subnormal quantum 2^q is so large that RNE's constant 1.5·2^(q + pc - 1)
    (rounding._magic) is beyond the carrier rounds its tiny values on the general path (below
    2^emin, +0 included), as MPFR does; from float64 it traced to an OverflowError before."""
    fmt = parse("p=2,emin=120,emax=125" if dtype == jnp.float32 else "p=3,emin=1000,emax=1010")
    lo = 2.0**fmt.emin
    x = np.array([0.0, -0.0, lo, -lo, lo * 0.75, lo * 0.25, lo * 0.5, lo * 0.375, 2 * lo], np.float64)
    got = np.asarray(round_to(jnp.asarray(x, dtype), fmt, "rne")).astype(np.float64)
    want = np.array([float(mpfr_round(v, fmt, "rne")) for v in x])
    assert _same(got, want).all() and (np.signbit(got) == np.signbit(want)).all(), (got, want)
    if dtype == jnp.float32:  # a format class cannot take it as data either (its C is traced)
        from collapse_sim.rounding import FormatClass

        cls = FormatClass("float32", pmax=22, qmin=-125, emax=126)
        assert "too large" in cls.why_not(fmt)
        assert cls.why_not(parse("p=2,emin=100,emax=125")) is None


@pytest.mark.parametrize("name", FAST)
def test_fast_path_equals_general(name):
    """``round_to`` takes the fast path (``_round_fast``: no per-element shift counts, no bit
    length) wherever ``fast_path_applies``, in every deterministic mode, and gives the bits of
    ``_round_general`` on every test point (values, midpoints and their neighbours, both signs,
    the overflow boundaries) plus ±inf and NaN, from float64 and float32 (the general path with
    the format as data where a class takes it: one compile serves every format). Where the format's
    subnormals are carrier subnormals (bf16 from float32) the program holds a ``cond``: arrays
    with such values take the general path, the others (the normal-range points) the fast one,
    checked both ways. From float32, formats that ``test_exhaustive_against_mpfr`` does not
    cover are checked against the oracle too (MPFR; exact rationals without subnormals)."""
    from collapse_sim.rounding import _Carrier, _tiny_fast_ok, fast_path_applies

    fmt = parse(name)
    p64, p32 = _test_points(fmt)
    specials = [np.inf, -np.inf, np.nan]
    lo = 2.0**fmt.emin
    for pts, dt in ((p64, jnp.float64), (p32, jnp.float32)):
        c = _Carrier(dt)
        applies = fast_path_applies(fmt, dt)
        assert applies == (dt == jnp.float64 or lo >= _F32_TINY)  # e8m0fnu's 2^-127 is a float32 subnormal
        tiny_ok = applies and _tiny_fast_ok(fmt, c)
        assert tiny_ok == (applies and fmt.min_exponent_of_quantum > c.emin)  # bf16 from float32: no
        for mode in DET_MODES:
            program = str(jax.make_jaxpr(lambda v, m=mode: round_to(v, fmt, m))(jnp.zeros(3, dt)))
            general, cond = re.search(r"= clz ", program), re.search(r"= cond\[", program)  # clz: the bit length
            assert (general is None) == tiny_ok and (cond is not None) == (applies and not tiny_ok), (mode, dt)
        if not applies:
            continue
        x = np.concatenate([pts, specials])
        normal = x[~((np.abs(x) < lo) & (x != 0))]
        fast_program = _fast_all_modes(fmt, dt)
        got = None
        for sample in (x, normal) if not tiny_ok else (x,):
            fast = np.asarray(fast_program(jnp.asarray(sample, dt))).astype(np.float64)
            general = _general_all_modes(sample, fmt, dt)
            got = fast[:, : len(pts)] if got is None else got
            for i, mode in enumerate(DET_MODES):
                ok = _same(fast[i], general[i])
                assert ok.all(), (f"{dt.__name__} {mode}: {sample[~ok][:5]} -> {fast[i][~ok][:5]}, "
                                  f"general {general[i][~ok][:5]}")
        if dt == jnp.float32 and name not in EXHAUSTIVE:
            for i, mode in enumerate(DET_MODES):
                want = _oracle_table(pts, fmt, mode, mpfr_round if fmt.subnormals else fraction_round)(pts)
                ok = _same(got[i], want)
                assert ok.all(), f"{mode}: {pts[~ok][:5]} -> {got[i][~ok][:5]}, expected {want[~ok][:5]}"


@pytest.mark.parametrize("name", ["e4m3", "e4m3fnuz", "e5m2fnuz", "e3m4", "e2m3fn", "e3m2fn", "e2m1fn",
                                  "tf32", "p=3,emax=3,subnormals=false", "p=6,emin=-4,emax=5,overflow=saturate"])
@pytest.mark.parametrize("mode", DET_MODES)
def test_other_formats_against_fractions(name, mode):
    fmt = parse(name)
    if (fmt.emax - fmt.emin) * 2**fmt.p > 50_000:  # tf32: every value is too many; the neighbourhood of the extremes and 1 suffices
        p64 = np.array([1 + k * 2.0**-13 for k in range(-40, 40)] + [fmt.max * (1 + t) for t in (0, 2**-12, 2**-11, 2**-10)]
                       + [fmt.min_subnormal * t for t in (0.25, 0.5, 0.75, 1, 1.5, 2.5)])
        p64 = np.concatenate([p64, -p64])
    else:
        p64, _ = _test_points(fmt)
    expected = np.array([fraction_round(float(x), fmt, mode) for x in p64])
    got = np.asarray(round_to(jnp.asarray(p64), fmt, mode))
    ok = _same(got, expected)
    assert ok.all(), f"{p64[~ok][:5]} -> {got[~ok][:5]}, expected {expected[~ok][:5]}"


def test_mpfr_and_fraction_oracles_agree():
    """On a sample of fp16's test points and on every test point of e5m2 (whose values,
    midpoints and their neighbours the fp16 sample happens to miss: it holds no midpoint),
    and of the unsigned formats (e8m0fnu: p = 1, no zero)."""
    p16, _ = _test_points(parse("fp16"))
    small = [(parse(n), _test_points(parse(n))[0]) for n in ("e5m2", "e5m3fnu", "e8m0fnu")]
    for fmt, pts in ((parse("fp16"), p16[:: max(1, len(p16) // 3000)]), *small):
        for mode in DET_MODES:
            for x in pts:
                a, b = mpfr_round(float(x), fmt, mode), fraction_round(float(x), fmt, mode)
                assert _same([a], [b]).all(), (fmt.name, x, mode, a, b)


@pytest.mark.parametrize(
    "x,dtype,fmt,mode,expected",
    [
        (1 + 2.0**-8 + 2.0**-40, jnp.float64, "bf16", "rne", 1.0078125),  # ml_dtypes <= 0.6 gives 1.0 (double rounding)
        (65519.0, jnp.float32, "fp16", "rne", 65504.0),
        (65520.0, jnp.float32, "fp16", "rne", math.inf),
        (65520.0, jnp.float32, "p=11,emax=15,overflow=saturate", "rne", 65504.0),
        (464.0, jnp.float32, "e4m3fn", "rne", 448.0),
        (465.0, jnp.float32, "e4m3fn", "rne", math.nan),
        (465.0, jnp.float32, "p=4,emin=-6,emax=8,maxsig=14,overflow=saturate", "rne", 448.0),
        (-65520.0, jnp.float32, "fp16", "rz", -65504.0),
        (1e9, jnp.float64, "fp16", "rd", 65504.0),
        (1e9, jnp.float64, "fp16", "ru", math.inf),
        (-1e9, jnp.float64, "fp16", "rd", -math.inf),
        (math.inf, jnp.float32, "e4m3fn", "rne", math.nan),
        (math.inf, jnp.float32, "e2m1fn", "rne", 6.0),
        (2.0**-134, jnp.float32, "bf16", "rne", 0.0),  # half the smallest subnormal ties to 0
        (1.5 * 2.0**-134, jnp.float32, "bf16", "rne", 2.0**-133),
        (2.0**-149, jnp.float32, "bf16", "ru", 2.0**-133),
        (-(2.0**-149), jnp.float32, "bf16", "rd", -(2.0**-133)),
        (-(2.0**-149), jnp.float32, "bf16", "ru", -0.0),
        (-(2.0**-30), jnp.float64, "e4m3fnuz", "rne", 0.0),  # no negative zero
        (31.0, jnp.float32, "e4m3b11fnuz", "rne", math.nan),  # above max 30 (tie to 32): NaN
        (-31.0, jnp.float32, "e4m3b11fnuz", "rz", -30.0),
        (-(2.0**-20), jnp.float32, "e4m3b11fnuz", "rne", 0.0),
        (-0.0, jnp.float32, "e5m3fnu", "rne", 0.0),  # unsigned: -0 is +0
        (-(2.0**-40), jnp.float64, "e5m3fnu", "ru", math.nan),  # negative: NaN, although RU would give -0
        (-math.inf, jnp.float32, "e5m3fnu", "rne", math.nan),
        (118784.0, jnp.float32, "e5m3fnu", "rne", 114688.0),  # the tie above max (significand 14, even)
        (118784.0, jnp.float32, "e5m3fnu", "rna", math.nan),
        (3.0, jnp.float64, "e8m0fnu", "rne", 4.0),  # p = 1: the significand is 1, odd, so a tie goes up
        (1.5, jnp.float32, "e8m0fnu", "rne", 2.0),
        (5.0, jnp.float32, "e8m0fnu", "rne", 4.0),
        (3.0, jnp.float32, "e8m0fnu", "rnz", 2.0),
        (3.0, jnp.float32, "e8m0fnu", "ro", 2.0),  # p = 1: round to odd truncates
        (0.0, jnp.float32, "e8m0fnu", "rne", math.nan),  # no zero
        (-0.0, jnp.float64, "e8m0fnu", "ru", math.nan),
        (2.0**-149, jnp.float32, "e8m0fnu", "rz", 2.0**-127),  # below the smallest value: it, in every mode
        (5e-324, jnp.float64, "e8m0fnu", "rd", 2.0**-127),
        (1.5 * 2.0**127, jnp.float64, "e8m0fnu", "rne", math.nan),  # overflow
        (1.5 * 2.0**127, jnp.float64, "e8m0fnu", "rd", 2.0**127),
        # quantum 2^-126, float32's smallest normal: half of it is a float32 subnormal, which
        # XLA:CPU flushes in float arithmetic, so these take the general path (the fast one gave 0)
        (1.5 * 2.0**-127, jnp.float32, "p=3,emin=-124,emax=10", "rne", 2.0**-126),
        (2.0**-127, jnp.float32, "p=3,emin=-124,emax=10", "rna", 2.0**-126),
        (2.0**-127, jnp.float32, "p=3,emin=-124,emax=10", "rne", 0.0),
    ],
)
def test_known_hard_cases(x, dtype, fmt, mode, expected):
    got = float(round_to(jnp.asarray(x, dtype=dtype), fmt, mode))
    assert _same([got], [expected]).all(), (got, expected)


def test_bf16_exp_midpoint_needs_f64_carrier():
    import mpmath

    x = 6.84375
    with mpmath.workprec(200):
        man, exp = mpmath.exp(mpmath.mpf(x)).man_exp
    exact = Fraction(int(man)) * Fraction(2) ** int(exp)
    assert fraction_round(exact, parse("bf16"), "rne") == 940.0
    assert float(round_to(jnp.exp(jnp.float64(x)), "bf16")) == 940.0
    # why it is hard: exp(x) lies within one float32 ulp of the bf16 midpoint 938, so an
    # f32 exp with an error of one ulp may land on either side; an f64 carrier cannot
    assert abs(exact - 938) < Fraction(2) ** (9 - 23)


def test_cpfloat_overflow_and_underflow_sets():
    """The boundary sets of CPFloat's tests, for every mode and both signs."""
    for name in ["bf16", "fp16", "e4m3fn", "e5m2", "e4m3"]:
        fmt = parse(name)
        b = float(fmt.max_exact + Fraction(2) ** (fmt.emax - fmt.p + 1) / 2)  # RNE overflow threshold
        xmin = fmt.min_subnormal
        pts = [math.nextafter(fmt.max, math.inf), math.nextafter(b, 0), b, math.nextafter(b, math.inf),
               xmin / 2, math.nextafter(xmin / 2, 0), math.nextafter(xmin / 2, 1), math.nextafter(xmin, 0),
               xmin, math.nextafter(xmin, 1)]
        pts = np.array(pts + [-p for p in pts])
        for mode in DET_MODES:
            expected = np.array([fraction_round(float(x), fmt, mode) for x in pts])
            got = np.asarray(round_to(jnp.asarray(pts), fmt, mode))
            assert _same(got, expected).all(), (name, mode, pts, got, expected)
        # explicit expectations, not only oracle agreement
        r = np.asarray(round_to(jnp.asarray([math.nextafter(b, 0), b], jnp.float64), fmt, "rne"))
        assert r[0] == fmt.max
        if fmt.top_significand % 2 == 0:  # e4m3fn: the tie at b goes to the even max, 448
            assert r[1] == fmt.max
        else:
            assert (np.isinf(r[1]) if fmt.overflow == "inf" else np.isnan(r[1]) if fmt.overflow == "nan" else r[1] == fmt.max)
        r = np.asarray(round_to(jnp.asarray([xmin / 2, math.nextafter(xmin / 2, 1)], jnp.float64), fmt, "rne"))
        assert r[0] == 0.0 and r[1] == xmin


@pytest.mark.parametrize("name", ["bf16", "fp16", "e4m3fn"])
def test_stochastic_rounding_frequencies(name):
    """P(round up) = (x - RD x)/ulp; observed frequency within 5 binomial sigmas."""
    fmt = parse(name)
    n = 20000
    key = jax.random.key(1234)
    for frac in [Fraction(1, 8), Fraction(1, 2), Fraction(13, 16), Fraction(1, 64)]:
        for base in [Fraction(1), Fraction(3, 2), fmt.min_subnormal and Fraction(fmt.min_subnormal) * 3]:
            ulp = fmt.ulp(base)
            x = float(base + frac * ulp)
            key, sub = jax.random.split(key)
            r = np.asarray(round_to(jnp.full((n,), x), fmt, "sr", key=sub))
            lo, hi = float(base), float(base + ulp)
            assert set(np.unique(r)) <= {lo, hi}
            f = float(frac)
            freq = np.mean(r == hi)
            sigma = math.sqrt(f * (1 - f) / n)
            assert abs(freq - f) <= 5 * sigma, (name, x, freq, f)
    # exact values are never moved
    r = np.asarray(round_to(jnp.full((1000,), 1.5), fmt, "sr", key=key))
    assert (r == 1.5).all()


@pytest.mark.parametrize("name", ["e5m3fnu", "e8m0fnu"])
def test_stochastic_rounding_domain(name):
    """Stochastic rounding obeys §1 steps 1 and 6 on every draw: a negative input gives NaN
    (-0 gives +0 with zero, NaN without), below e8m0fnu's 2^-127 every draw gives 2^-127; and
    between two values the frequency of the upper one is (x - RD x)/ulp within 5 binomial
    sigmas (e8m0fnu: p = 1, so ulp(2^k) = 2^k)."""
    fmt = parse(name)
    n = 20000
    s = fmt.min_subnormal
    x = jnp.asarray([-1.0, -s / 4, -0.0, 0.0, s / 3, s / 2], jnp.float64)
    r = np.asarray(round_to(jnp.tile(x, 100), fmt, "sr", key=jax.random.key(3))).reshape(100, -1)
    zero = 0.0 if fmt.has_zero else math.nan
    below = [0.0, s] if fmt.has_zero else [s]
    assert np.isnan(r[:, :2]).all() and _same(r[:, 2:4], np.full((100, 2), zero)).all()
    assert set(np.unique(r[:, 4:])) <= set(below) and (fmt.has_zero or (r[:, 4:] == s).all())
    lo = 2.0 ** (fmt.emax - 2)
    ulp = float(fmt.ulp(lo))
    for frac in (0.25, 0.5, 0.875):
        got = np.asarray(round_to(jnp.full((n,), lo + frac * ulp), fmt, "sr", key=jax.random.key(int(frac * 8))))
        assert set(np.unique(got)) <= {lo, lo + ulp}
        freq, sigma = np.mean(got == lo + ulp), math.sqrt(frac * (1 - frac) / n)
        assert abs(freq - frac) <= 5 * sigma, (name, frac, freq)


@pytest.mark.parametrize("name", DOMAIN)
def test_traced_domain_formats_against_mpfr(name):
    """The traced path (FormatClass with the format's subnormals, signed zero, sign and zero
    flags) on every test point from float64, in RNE (its fast path), RD and RO, against MPFR;
    a class whose flags differ refuses the format."""
    from collapse_sim.rounding import FormatClass, RoundingError

    fmt = parse(name)
    cls = FormatClass(subnormals=fmt.subnormals, signed_zero=fmt.signed_zero, signed=fmt.signed, has_zero=fmt.has_zero)
    p64, _ = _test_points(fmt)
    x = jnp.asarray(np.concatenate([p64, [np.inf, -np.inf, np.nan]]))
    for mode in ("rne", "rd", "ro"):
        lookup = _oracle_table(p64, fmt, mode, mpfr_round)
        want = np.concatenate([lookup(p64), [mpfr_round(v, fmt, mode) for v in (math.inf, -math.inf, math.nan)]])
        got = np.asarray(round_to(x, cls.params(fmt), mode))
        ok = _same(got, want)
        assert ok.all(), (name, mode, np.asarray(x)[~ok][:5], got[~ok][:5], want[~ok][:5])
    with pytest.raises(RoundingError, match="is not of the format class"):
        FormatClass().params(fmt)


def test_traced_formats_take_the_fast_path():
    """A traced format rounds by the fast path in every deterministic mode (no bit length in
    the program), and a class whose quantum may reach the carrier's smallest normal (half of
    it a carrier subnormal, which XLA:CPU flushes in arithmetic) is refused."""
    from collapse_sim.rounding import FormatClass, RoundingError

    fp = FormatClass().params("bf16")
    for mode in DET_MODES:
        program = str(jax.make_jaxpr(lambda v, m=mode: round_to(v, fp, m))(jnp.zeros(3)))
        assert re.search(r"= clz ", program) is None, mode
    with pytest.raises(RoundingError, match=r"qmin > -126"):
        FormatClass("float32", pmax=11, qmin=-126, emax=15)
    FormatClass("float32", pmax=11, qmin=-125, emax=15)


def test_stochastic_needs_key():
    with pytest.raises(ValueError, match="PRNG key"):
        round_to(jnp.float32(1.0), "bf16", "sr")


def test_jit_and_eager_agree():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(4096) * 10.0 ** np.random.default_rng(1).integers(-45, 38, 4096), jnp.float32)
    for mode in DET_MODES:
        eager = round_to(x, "bf16", mode)
        jitted = jax.jit(lambda v, m=mode: round_to(v, "bf16", m))(x)
        assert (np.asarray(eager).view(np.uint32) == np.asarray(jitted).view(np.uint32)).all()


@given(
    x=st.floats(allow_nan=False, allow_infinity=True, width=64),
    p=st.integers(1, 25),
    emax=st.integers(1, 127),
    mode=st.sampled_from(DET_MODES),
    domain=st.sampled_from(["", ",signed=false", ",zero=false", ",signed=false,zero=false,subnormals=false"]),
)
@example(x=1 + 2.0**-8 + 2.0**-40, p=8, emax=127, mode="rne", domain="")
@example(x=5e-324, p=2, emax=1, mode="ru", domain="")
@example(x=-1.7976931348623157e308, p=25, emax=127, mode="rz", domain="")
@example(x=-(2.0**-30), p=5, emax=7, mode="rz", domain=",zero=false")  # signed without zero: -s
@example(x=2.0**-11, p=5, emax=7, mode="rne", domain=",zero=false")  # subnormal s = 2^-10, R = 0 -> s
@example(x=3 * 2.0**-8, p=1, emax=7, mode="rne", domain="")  # p = 1 with "subnormals": quantum 2^emin below it
def test_random_custom_formats_against_fractions(x, p, emax, mode, domain):
    """Random formats (p = 1..25, with or without sign, zero) and values against the rational oracle."""
    fmt = parse(f"p={p},emax={emax}{domain}")
    got = float(round_to(jnp.float64(x), fmt, mode))
    assert _same([got], [fraction_round(x, fmt, mode)]).all()


@given(x=st.floats(allow_nan=False, allow_infinity=False, width=32), mode=st.sampled_from(DET_MODES))
def test_f32_inputs_bf16_match_ml_dtypes_from_f32(x, mode):
    """ml_dtypes is right from float32 (one rounding) for RNE: an extra sanity check."""
    got = float(round_to(jnp.float32(x), "bf16", mode))
    assert _same([got], [fraction_round(float(np.float32(x)), parse("bf16"), mode)]).all()
    if mode == "rne":
        import ml_dtypes

        assert _same([got], [float(np.float32(x).astype(ml_dtypes.bfloat16))]).all()


def test_mode_parse():
    assert Mode.parse("nearest") is Mode.RNE
    with pytest.raises(ValueError, match="unknown rounding mode"):
        Mode.parse("banana")



def test_e8m0fnu_rounding_down_is_the_mx_scale():
    """§1 step 6 with RD to e8m0fnu is the OCP MX scale rule (docs/semantics.md §13) where both
    are defined: for amax in the range, collapse_sim.mx's scale 2^e equals
    round_to(amax · 2^-emax_elem, "e8m0fnu", "rd"), the clamp at 2^-127 included; above it
    the scale is NaN while RD gives 2^127 (why mx.py computes the exponent itself)."""
    from collapse_sim.mx import MX_FORMATS, mx_quantize

    rng = np.random.default_rng(5)
    amax = np.concatenate([rng.uniform(1, 2, 200) * 2.0 ** rng.integers(-1000, 1000, 200),
                           [2.0**-135, 2.0**-127, 1.5 * 2.0**-127, 2.0**-126, 2.0**127, 1.99 * 2.0**135]])
    for name in ("mxfp8_e4m3", "mxfp4_e2m1", "mxint8"):
        m = MX_FORMATS[name]
        e = mx_quantize(amax[:, None], m, axis=-1).scale_exp[:, 0]
        rd = np.asarray(round_to(np.ldexp(amax, -m.emax_elem), "e8m0fnu", "rd"))  # the product is exact here
        inside = amax < 2.0 ** (128 + m.emax_elem)
        assert inside.sum() > 50 and (~inside).sum() > 50 and (e[inside] == -127).sum() > 20
        assert _same(rd[inside], np.ldexp(1.0, e[inside].astype(int))).all(), name
        assert np.isnan(e[~inside]).all() and (rd[~inside] == 2.0**127).all(), name
