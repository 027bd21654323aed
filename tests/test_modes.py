"""Round to nearest with ties away from zero (rna) and toward zero (rnz), and round to odd
(ro), through the whole stack: the reference's rounding, the emulated ops and sums in
every order, policies, and a full forward pass (emulated == reference, bit for bit).

``round_to`` itself is checked against the MPFR and rational oracles by the harness of
tests/test_rounding.py (``DET_MODES`` holds these modes), and traced formats against
static ones by tests/test_traced_formats.py.
"""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import mpmath.libmp as mlib
import numpy as np
import pytest
from hypothesis import given

from collapse_sim.backends import make_backend
from collapse_sim.backends.emulated import Emulator
from collapse_sim.backends.reference.arith import RefArith
from collapse_sim.formats import parse
from collapse_sim.model import ModelConfig, forward, init_params
from collapse_sim.policy import Order, Policy, PolicyError
from collapse_sim.rounding import Mode, RoundingError, round_to
from oracles import format_values, fraction_round, mp_op
from test_policy_ops import _eq, _py_sum, op_case
from test_rounding import _test_points

NEW = ["rna", "rnz", "ro"]


def test_mode_names_aliases_and_error():
    assert [Mode.parse(m) for m in ("rna", "ties-away", "RNZ", "ties_zero", "ro", "odd")] == \
        [Mode.RNA, Mode.RNA, Mode.RNZ, Mode.RNZ, Mode.RO, Mode.RO]
    with pytest.raises(RoundingError, match="rne, rna, rnz, rz, ru, rd, ro, sr"):
        Mode.parse("ties")
    assert Mode.RNA.nearest and Mode.RNZ.nearest and not Mode.RO.nearest
    assert Mode.RO.overflows_away(False) is False and Mode.RNZ.overflows_away(True) is True


@pytest.mark.parametrize("mode", NEW)
def test_policy_strings(mode):
    p = Policy.parse(f"compute=bf16,order=pairwise,mode={mode}")
    assert p.mode is Mode(mode) and Policy.parse(str(p)) == p and f"mode={mode}" in str(p)
    assert Policy.parse("compute=bf16,mode=odd").mode is Mode.RO
    with pytest.raises(PolicyError, match="unknown rounding mode 'nearest_even'"):
        Policy.parse("compute=bf16,mode=nearest_even")


# --- the definitions, value by value ---------------------------------------------------

_U = 2.0**-7  # bf16's spacing in [1, 2)


@pytest.mark.parametrize("x,fmt,rna,rnz,ro", [
    (1 + _U / 2, "bf16", 1 + _U, 1.0, 1 + _U),  # a tie above an even value
    (1 + 3 * _U / 2, "bf16", 1 + 2 * _U, 1 + _U, 1 + _U),  # a tie above an odd value
    (1 + _U / 4, "bf16", 1.0, 1.0, 1 + _U),  # inexact: ro takes the odd neighbour
    (1 + _U / 2 + 2.0**-40, "bf16", 1 + _U, 1 + _U, 1 + _U),  # just past a tie
    (1 + _U / 2 - 2.0**-40, "bf16", 1.0, 1.0, 1 + _U),
    (1 + _U, "bf16", 1 + _U, 1 + _U, 1 + _U),  # exact values stay, even or odd
    (1.5, "bf16", 1.5, 1.5, 1.5),
    (-(1 + _U / 2), "bf16", -(1 + _U), -1.0, -(1 + _U)),  # symmetric in the sign
    (2.0**-134, "bf16", 2.0**-133, 0.0, 2.0**-133),  # half the smallest subnormal
    (2.0**-140, "bf16", 0.0, 0.0, 2.0**-133),  # ro never gives 0 from a nonzero value
    (-(2.0**-149), "bf16", -0.0, -0.0, -(2.0**-133)),  # a zero keeps the sign
    (-0.0, "bf16", -0.0, -0.0, -0.0),
    (65520.0, "fp16", math.inf, 65504.0, 65504.0),  # the tie above the largest value: rnz keeps it
    (65521.0, "fp16", math.inf, math.inf, 65504.0),
    (-1e300, "fp16", -math.inf, -math.inf, -65504.0),  # ro never overflows
    (math.inf, "fp16", math.inf, math.inf, math.inf),  # an infinity stays one
    (464.0, "e4m3fn", math.nan, 448.0, 448.0),  # 448 is even here: the tie goes up (rna) to 480: NaN
    (1e9, "e4m3fn", math.nan, math.nan, 448.0),
    (7.0, "e2m1fn", 6.0, 6.0, 6.0),  # no inf, no NaN: overflow saturates
    (0.25, "e2m1fn", 0.5, 0.0, 0.5),  # a tie at half the smallest subnormal 0.5
])
def test_known_values(x, fmt, rna, rnz, ro):
    """Expectations written out from the definitions, for float64 and (where exact) float32."""
    for mode, want in zip(NEW, (rna, rnz, ro)):
        in_f32 = math.isinf(x) or (abs(x) < 2.0**128 and float(np.float32(x)) == x)
        dts = (jnp.float64, jnp.float32) if in_f32 else (jnp.float64,)
        for dt in dts:
            got = float(round_to(jnp.asarray(x, dt), fmt, mode))
            assert _eq(got, want), (x, fmt, mode, dt, got, want)
        ref = mlib.to_float(RefArith(parse(fmt), Mode(mode)).round(mlib.from_float(x)))
        assert ref == want or (math.isnan(ref) and math.isnan(want)), (x, fmt, mode, ref, want)  # no -0 in mpmath


@pytest.mark.parametrize("name", ["e4m3fn", "e5m2", "e2m1fn", "e4m3b11fnuz", "p=3,emax=3,subnormals=false"])
@pytest.mark.parametrize("mode", NEW)
def test_reference_rounding_against_fractions(name, mode):
    """RefArith.round on every value, midpoint and neighbour of small formats (both signs)."""
    fmt = parse(name)
    pts, _ = _test_points(fmt)
    ref = RefArith(fmt, Mode(mode))
    got = np.array([mlib.to_float(ref.round(mlib.from_float(float(x)))) for x in pts])
    want = np.array([fraction_round(float(x), fmt, mode) for x in pts])
    ok = (got == want) | (np.isnan(got) & np.isnan(want))  # mpmath has no -0
    assert ok.all(), list(zip(pts[~ok][:5], got[~ok][:5], want[~ok][:5]))


# --- emulated ops ----------------------------------------------------------------------

@pytest.mark.parametrize("mode", NEW)
def test_ops_on_every_pair_of_a_small_format(mode):
    """+ − × ÷ of every pair of values of p = 3 (subnormals, both signs, the largest
    value: overflow) and √ of every value, against mpmath and exact rationals."""
    fmt = parse("p=3,emax=3")
    vals = [float(v) for v in format_values(fmt)]
    vals = np.array(vals + [-v for v in vals[1:]])
    a, b = (jnp.asarray(v) for v in np.meshgrid(vals, vals, indexing="ij"))
    emu = Emulator(Policy.uniform(fmt, mode=Mode(mode)))
    A, B = a.astype(emu.dtype), b.astype(emu.dtype)
    got = jax.jit(lambda A, B: (emu.add(A, B), emu.sub(A, B), emu.mul(A, B), emu.div(A, B), emu.sqrt(A[:, 0])))(A, B)
    for op, g in zip(("add", "sub", "mul", "div"), got):
        g = np.asarray(g, np.float64)
        for i, x in enumerate(vals):
            for j, y in enumerate(vals):
                if op == "div" and y == 0:
                    continue
                want = mp_op(op, float(x), float(y), fmt, mode)
                assert _eq(g[i, j], want), (op, mode, x, y, g[i, j], want)
    g = np.asarray(got[4], np.float64)
    for i, x in enumerate(vals):
        want = mp_op("sqrt", float(x), None, fmt, mode) if x >= 0 else math.nan
        assert _eq(g[i], want) or (x == 0 and g[i] == want), ("sqrt", mode, x, g[i], want)


@pytest.mark.parametrize("policy,a,b,want", [
    ("compute=bf16,mode=ro", 1.0, 2.0**-60, 1 + 2.0**-7),  # the carrier sum is 1: TwoSum must say it is inexact
    ("compute=bf16,mode=ro", 1.0, -(2.0**-60), 1 - 2.0**-8),
    ("compute=bf16,mode=ro", 1.0, -1.0, 0.0),  # an exact zero: +0
    ("compute=fp16,mode=ro", 2048.0, 2.0**-24, 2050.0),  # float32 carrier; fp16's spacing at 2048 is 2
    ("compute=bf16,mode=rna", 1.0, 2.0**-8, 1 + 2.0**-7),  # exact ties
    ("compute=bf16,mode=rnz", 1.0, 2.0**-8, 1.0),
    ("compute=bf16,mode=rnz", -1.0 - 2.0**-7, -(2.0**-8), -1.0 - 2.0**-7),
])
def test_add_known(policy, a, b, want):
    emu = Emulator(policy)
    got = float(emu.add(jnp.asarray(a, emu.dtype), jnp.asarray(b, emu.dtype)))
    assert _eq(got, want), (policy, a, b, got, want)


@given(op_case(tuple(NEW)))
def test_ops_bit_exact_against_mpmath_new_modes(case):
    """Random formats (p = 2..25), ops and operands (adversarial sums near midpoints)."""
    fmt, op, a, b, mode = case
    emu = Emulator(Policy.uniform(fmt, mode=Mode(mode)))
    fn = {"add": emu.add, "sub": emu.sub, "mul": emu.mul, "div": emu.div,
          "sqrt": lambda x, y: emu.sqrt(x), "exp": lambda x, y: emu.exp(x)}[op]
    got = fn(jnp.asarray(a, emu.dtype), jnp.asarray(b, emu.dtype))
    want = mp_op(op, a, None if op in ("sqrt", "exp") else b, fmt, mode)
    assert _eq(got, want), (fmt, op, a, b, mode, float(got), want)


def test_exp_round_to_odd_beyond_float64():
    """e^a is never a format value for a != 0: round to odd gives the largest finite value
    above the range and the smallest subnormal below it, also where float64 itself over-
    or underflows (float64's exp gives inf beyond 709.78 and 0 below -745)."""
    for name in ("bf16", "fp16"):
        fmt = parse(name)
        emu = Emulator(Policy.uniform(fmt, mode=Mode.RO))
        a = jnp.asarray([720.0, 100.0, -800.0, -720.0, -100.0, 0.0, -np.inf, np.inf, np.nan], emu.dtype)
        got = np.asarray(emu.exp(a), np.float64)
        want = [fmt.max, fmt.max, fmt.min_subnormal, fmt.min_subnormal, fmt.min_subnormal, 1.0, 0.0, np.inf, np.nan]
        assert _eq(got, want), (name, got, want)
        ref = RefArith(fmt, Mode.RO)
        for x, w in zip(np.asarray(a)[:6], want):
            assert mlib.to_float(ref.exp(mlib.from_float(float(x)))) == w, (name, x)


@pytest.mark.parametrize("fn", ["exp", "exp2", "ln"])
@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_exp_and_ln_on_every_input(name, fn):
    """exp and exp2 of every finite value (both signs), ln of every value from 0 to +inf and
    of a few negative ones, against mpmath: e^a, 2^a or ln a is evaluated once per input at
    240 bits and rounded in each mode by exact rationals. exp runs in the new modes and the
    directed ones (tests/test_policy_ops.py checks it in rne), exp2 and ln in every mode. The
    tiny arguments, whose e^a float64 rounds to 1, are the hard cases for exp in the modes that
    are not round to nearest; for exp2 the integers, whose 2^a is exact (a format value,
    subnormal or past the range); for ln the values next to 1, whose ln is tiny, and ln 1 = 0,
    its one exact value. The reference's RefArith is checked on every 16th input."""
    fmt = parse(name)
    vals = [float(v) for v in format_values(fmt)]
    if fn == "ln":
        xs = np.array(vals + [np.inf, -1.0, -fmt.max, -np.inf, np.nan])
    else:
        xs = np.array(vals + [-v for v in vals[1:]])
        xs = xs[np.abs(xs) < 200]
    exact = [_sticky(float(x), fn) for x in xs]
    for mode in NEW + ["rz", "ru", "rd"] + (["rne"] if fn != "exp" else []):
        emu = Emulator(Policy.uniform(fmt, mode=Mode(mode)))
        got = np.asarray(jax.jit(getattr(emu, fn))(jnp.asarray(xs, emu.dtype)), np.float64)
        want = np.array([fraction_round(v, fmt, mode) for v in exact])
        bad = (got.view(np.uint64) != want.view(np.uint64)) & ~(np.isnan(got) & np.isnan(want))
        assert not bad.any(), (mode, list(zip(xs[bad][:5], got[bad][:5], want[bad][:5])))
        ref = getattr(RefArith(fmt, Mode(mode)), fn)
        sub = np.r_[0:len(xs):16, len(xs) - 5:len(xs)] if fn == "ln" else slice(None, None, 16)
        got_ref = np.array([mlib.to_float(ref(mlib.from_float(float(x)))) for x in xs[sub]])
        assert _eq(got_ref, want[sub]), mode


def _sticky(x: float, fn: str) -> "Fraction | float":
    """e^x, 2^x or ln x truncated toward zero at 240 bits, nudged strictly inside the
    truncation interval (away from zero) when inexact: a value that rounds to p <= 25 bits
    in every mode as the true value does. The exact cases are returned exactly (2^x of an
    integer x, e^0 = 1, ln 1 = 0) and ln's special ones as floats (ln 0 = -inf, ln(+inf) =
    +inf, NaN for x < 0)."""
    if fn == "exp2" and x == math.floor(x):
        return Fraction(2) ** int(x)
    if fn == "ln" and not 0 < x < math.inf:
        return {0.0: -math.inf, math.inf: math.inf}.get(x, math.nan)
    if x == (1.0 if fn == "ln" else 0.0):
        return Fraction(0 if fn == "ln" else 1)
    a = mlib.from_float(x)
    if fn == "exp2":
        a = mlib.mpf_mul(a, mlib.mpf_ln2(300), 300)  # x·ln 2 to 300 bits: 2^x to ~2^-290 relative
    r = mlib.mpf_log(a, 240, "d") if fn == "ln" else mlib.mpf_exp(a, 240, "d")
    p, q = mlib.to_rational(r)
    v = Fraction(int(p), int(q))
    return v + (1 if v > 0 else -1) * Fraction(2) ** (math.floor(math.log2(abs(v))) - 250)


# --- sums ------------------------------------------------------------------------------

_ORDERS = [Order("sequential"), Order("pairwise"), Order("kahan"), Order("exact"), Order("blocked", 3)]


@pytest.mark.parametrize("mode", NEW)
def test_sums_in_every_order(mode):
    """Rows built to sit on, just past and just short of bf16 ties and values (one term
    far below the others), summed in every order, against the orders written again with
    exact rationals. Each order's emulated sum compiles once per mode."""
    fmt = parse("bf16")
    acc = parse("p=12,emax=127")
    t = 2.0**-60
    rows = [[1.0, 2.0**-8, t, 0.0], [1.0, 2.0**-8, -t, 0.0], [1.0, 2.0**-8, 0.0, 0.0], [-1.0, -(2.0**-8), t, t],
            [1.0, 3 * 2.0**-8, 0.0, 0.0], [1.0, t, t, t], [1.0, -t, 0.0, 0.0], [2.0**-126, 2.0**-133, -t * 2.0**-73, 0.0],
            [0.0, 0.0, fmt.max, 2.0**119], [2.0**-120, -(2.0**-120), t, 0.0], [1.0, -1.0, 0.0, 0.0], [0.5, 0.25, 0.125, 2.0**-11]]
    x = jnp.asarray(rows, jnp.float64)
    for order in _ORDERS:
        emu = Emulator(Policy(fmt, fmt, acc, fmt, order, mode=Mode(mode)))
        got = np.asarray(jax.jit(emu.sum)(x.astype(emu.dtype)), np.float64)
        for row, g in zip(rows, got):
            want = _py_sum(row, order, acc, fmt, mode)
            assert _eq(g, want), (mode, order, row, g, want)


@pytest.mark.parametrize("mode", NEW)
def test_dot_exact_and_blocked(mode):
    """Dot products (exact products) in the exact and blocked orders: certified float64 sums
    or the superaccumulator, against exact rationals."""
    rng = np.random.default_rng(2)
    for policy in ("compute=bf16,order=exact", "compute=bf16,accumulate=(p=10,emax=127),order=blocked(4)"):
        emu = Emulator(f"{policy},mode={mode}")
        a = emu.store(rng.standard_normal((6, 16)) * 2.0 ** rng.integers(-30, 30, (6, 16)))
        b = emu.store(rng.standard_normal((16, 3)))
        c = np.asarray(jax.jit(emu.matmul)(a, b), np.float64)
        for i in range(6):
            for j in range(3):
                prods = [Fraction(float(a[i, k])) * Fraction(float(b[k, j])) for k in range(16)]
                if emu.order.kind == "exact":
                    want = fraction_round(sum(prods, Fraction(0)), emu.compute, mode)
                else:
                    blocks = [fraction_round(sum(prods[k:k + 4], Fraction(0)), emu.accumulate, mode) for k in range(0, 16, 4)]
                    want = _py_sum(blocks, Order("sequential"), emu.accumulate, emu.compute, mode)
                assert _eq(c[i, j], want) or (c[i, j] == 0 == want), (policy, i, j, c[i, j], want)


# --- a full forward pass ---------------------------------------------------------------

@pytest.mark.parametrize("policy,shared", [("compute=bf16,order=pairwise,mode=rna", False),
                                           ("compute=fp16,accumulate=fp32,order=pairwise,mode=rnz", False),
                                           ("compute=(p=6,emax=20),order=sequential,mode=ro", True)])
def test_forward_emulated_equals_reference(policy, shared):
    """L = 2, d = 8, n = 10: the emulated forward (one compile; for ro the shared program,
    its formats traced) equals the mpmath reference bit for bit (±0 aside: mpmath has no -0)."""
    from collapse_sim.backends.emulated import EmulatedBackend

    c = ModelConfig(d=8, n_layers=2, vocab=4, seed=5, pe="rope", norm="rmsnorm")
    P = init_params(c)
    toks = np.array([1, 2, 3, 0, 1, 1, 2, 3, 3, 1])
    e, r = EmulatedBackend(policy, shared=shared), make_backend("reference", policy)
    ye, yr = e.to_numpy(forward(P, toks, e)), r.to_numpy(forward(P, toks, r))
    assert np.all((ye == yr) | (np.isnan(ye) & np.isnan(yr))), (ye, yr)
