"""Policies and the emulated elementary ops against mpmath, op by op, bit for bit."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from collapse_sim.backends.emulated import CarrierError, Emulator, carrier_for, certified_matmul, certified_sum, certify, exact_sum
from collapse_sim.formats import parse
from collapse_sim.policy import Order, Policy, PolicyError
from collapse_sim.rounding import Mode, round_to
from oracles import _neg_zero_result, format_values, fraction_round, mp_op

MODES = ["rne", "rz", "ru", "rd", "rna", "rnz", "ro"]


def _eq(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return ((a.view(np.uint64) == b.view(np.uint64)) | (np.isnan(a) & np.isnan(b))).all()


# --- policies -------------------------------------------------------------

def test_policy_roundtrip_and_hashable():
    for text in ["bf16", "compute=bf16,accumulate=fp32,softmax=fp32,order=blocked(32)",
                 "storage=fp16,compute=fp16,order=kahan,mode=rz,max_subtract=false",
                 "compute=(p=5,emax=15),accumulate=fp32", "p=6,emax=20",
                 "storage=bf16,compute=bf16,accumulate=fp32,order=tcfma(4,24,rz)",
                 "storage=e4m3fn,compute=fp32,accumulate=fp32,order=promote(14,4)",
                 "compute=bf16,order=promote(5,3,rne),mode=rd", "compute=fp16,order=tcfma-v100"]:
        p = Policy.parse(text)
        assert Policy.parse(str(p)) == p
        assert hash(p) == hash(Policy.parse(str(p)))
    assert Policy.parse("bf16").order == Order("pairwise")


def test_accumulator_orders_parse():
    """tcfma(k,t,r) and promote(b,Nc[,r]) (docs/semantics.md §3.4): the fields, the default
    rounding of promote, the presets and the canonical spelling."""
    assert Order.parse("tcfma(4,23,rz)") == Order("tcfma", 4, 23, Mode.RZ)
    assert Order.parse(" TCFMA(8, 24, RNE) ") == Order("tcfma", 8, 24, Mode.RNE)
    assert Order.parse("promote(14,128)") == Order("promote", 128, 14, Mode.RZ) == Order("promote", 128, 14)
    assert str(Order.parse("promote(14,128)")) == "promote(14,128,rz)"
    assert Order.parse("tcfma-v100") == Order.parse("tcfma(4,23,rz)")
    assert Order.parse("promote-h800") == Order.parse("promote(14,128,rz)")
    assert [Order.parse(o).exact_products for o in ("tcfma(4,23,rz)", "promote(14,4)", "exact", "blocked(2)",
                                                    "pairwise", "sequential", "kahan")] == [True] * 4 + [False] * 3


@pytest.mark.parametrize("bad,msg", [
    ("compute=bf17", "unknown format"), ("compute=bf16,order=zigzag", "unknown reduction order"),
    ("compute=bf16,order=blocked", "block size"), ("accumulate=fp32", "needs compute"),
    ("compute=bf16,colour=red", "unknown key"), ("compute=bf16,mode=sr", "stochastic"),
    ("compute=bf16,compute=fp16", "gives compute twice"), ("bf16,mode=rz", "e.g. compute=bf16"),
    ("", "empty"),
    ("compute=bf16,order=tcfma(0,23,rz)", "tcfma order needs k >= 1, got 0"),
    ("compute=bf16,order=tcfma(4,0,rz)", "tcfma order needs t >= 1, got 0"),
    ("compute=bf16,order=promote(1,128)", "promote order needs b >= 2, got 1"),
    ("compute=bf16,order=promote(14,0)", "promote order needs Nc >= 1, got 0"),
    ("compute=bf16,order=tcfma(4,23,ru)", "rounding must be rz or rne, got 'ru'"),
    ("compute=bf16,order=promote(14,4,fast)", "rounding must be rz or rne, got 'fast'"),
    ("compute=bf16,order=tcfma(4,23)", r"write tcfma\(k,t,rz\|rne\)"),
    ("compute=bf16,order=promote", r"write promote\(b,Nc"),
    ("compute=bf16,order=tcfma-h100", "unknown reduction order"),
])
def test_policy_errors(bad, msg):
    with pytest.raises(PolicyError, match=msg):
        Policy.parse(bad)


def test_carrier_choice_and_refusal():
    assert carrier_for(parse("fp16")) == jnp.float32
    assert carrier_for(parse("e4m3fn")) == jnp.float32
    assert carrier_for(parse("bf16")) == jnp.float64  # bf16 subnormals are f32 subnormals, flushed by XLA
    assert carrier_for(parse("fp32")) == jnp.float64
    with pytest.raises(CarrierError, match="p=53 > 25"):
        Emulator("fp64")
    with pytest.raises(CarrierError, match="p=26"):
        Emulator("p=26,emax=100")


# --- elementary ops ---------------------------------------------------------

def _grid_value(draw, fmt):
    """A value of fmt: random, or one of the edge values."""
    vals = [fmt.max, fmt.min_subnormal, fmt.min_normal, 1.0, float(1 + Fraction(fmt.eps)), 0.0]
    kind = draw(st.integers(0, 3))
    if kind == 0:
        v = draw(st.sampled_from(vals))
    else:
        e = draw(st.integers(fmt.emin - fmt.p, fmt.emax))
        m = draw(st.floats(1.0, 2.0))
        v = float(round_to(jnp.float64(m * 2.0**e), fmt))
        if not math.isfinite(v):
            v = fmt.max
    return -v if draw(st.booleans()) else v


@st.composite
def op_case(draw, modes=tuple(MODES)):
    p = draw(st.integers(2, 25))
    emax = draw(st.integers(2, 60 if p > 11 else 30))
    fmt = parse(f"p={p},emax={emax}")
    op = draw(st.sampled_from(["add", "sub", "mul", "div", "sqrt", "exp"]))
    a = _grid_value(draw, fmt)
    b = _grid_value(draw, fmt)
    if op == "sqrt":
        a = abs(a)
    if op == "exp":
        a = float(round_to(jnp.float64(draw(st.floats(-2.0 * emax, 2.0 * emax))), fmt))
    if op == "div" and b == 0:
        b = 1.0
    if op in ("add", "sub") and draw(st.booleans()):
        # adversarial: b chosen so that a + b lands on or next to a midpoint
        ulp = fmt.ulp(a) if a != 0 else Fraction(fmt.min_subnormal)
        b = float(round_to(jnp.float64(float(ulp / 2 * draw(st.sampled_from([1, -1, 3, -3])))), fmt))
    return fmt, op, a, b, draw(st.sampled_from(modes))


@given(op_case())
@example((parse("bf16"), "add", 256.0, 1.0, "rne"))
@example((parse("fp16"), "mul", 65504.0, 1.0009765625, "rne"))
@example((parse("bf16"), "exp", 6.84375, 0.0, "rne"))
@example((parse("p=2,emax=2"), "div", 1.0, 3.0, "rne"))
@example((parse("p=25,emax=60"), "sqrt", 2.0, 0.0, "rd"))
def test_ops_bit_exact_against_mpmath(case):
    fmt, op, a, b, mode = case
    emu = Emulator(Policy.uniform(fmt, mode=__import__("collapse_sim").Mode.parse(mode)))
    A, B = jnp.asarray(a, emu.dtype), jnp.asarray(b, emu.dtype)
    fn = {"add": emu.add, "sub": emu.sub, "mul": emu.mul, "div": emu.div,
          "sqrt": lambda x, y: emu.sqrt(x), "exp": lambda x, y: emu.exp(x)}[op]
    got = fn(A, B)
    got_jit = jax.jit(fn)(A, B)
    expected = mp_op(op, a, None if op in ("sqrt", "exp") else b, fmt, mode)
    assert _eq(got, expected), (fmt, op, a, b, mode, float(got), expected)
    assert _eq(got, got_jit)


@pytest.mark.parametrize("name", ["bf16", "fp16"])
def test_exp_correctly_rounded_on_every_input(name):
    """exp of every finite value of the format (both signs), against mpmath."""
    fmt = parse(name)
    vals = [float(v) for v in format_values(fmt)]
    xs = np.array(vals + [-v for v in vals[1:]])
    xs = xs[np.abs(xs) < 200]  # beyond, exp under/overflows every format here: checked below
    emu = Emulator(Policy.uniform(fmt))
    got = np.asarray(jax.jit(emu.exp)(jnp.asarray(xs, emu.dtype)), np.float64)
    expected = np.array([mp_op("exp", float(x), None, fmt, "rne") for x in xs])
    bad = ~((got.view(np.uint64) == expected.view(np.uint64)) | (np.isnan(got) & np.isnan(expected)))
    assert not bad.any(), list(zip(xs[bad][:5], got[bad][:5], expected[bad][:5]))
    big = np.asarray(emu.exp(jnp.asarray([200.0, -200.0], emu.dtype)))
    assert math.isinf(big[0]) and big[1] == 0.0


def test_division_is_not_rewritten_to_reciprocal():
    emu = Emulator("fp16")
    rng = np.random.default_rng(0)
    a = round_to(jnp.asarray(rng.uniform(0.5, 2, 2000), jnp.float32), "fp16")
    b = round_to(jnp.asarray(rng.uniform(0.5, 2, 1), jnp.float32), "fp16")
    got = np.asarray(jax.jit(lambda a, b: emu.div(a, b))(a, b[0]))
    expected = np.array([mp_op("div", float(x), float(b[0]), parse("fp16"), "rne") for x in np.asarray(a)])
    assert (got.astype(np.float64) == expected).all()


# --- reductions -------------------------------------------------------------

def _py_sum(xs, order, acc, out, mode="rne"):
    """The orders of collapse_sim.policy.Order, written again with exact rationals. Partial
    sums stay floats so that zeros keep their sign: an exact zero sum of two terms is -0
    when rounding down (IEEE 754 §6.3), as the emulator's adds give it; the exact order
    and the blocks' exact sums give +0."""
    def add(a, b):  # one add rounded to acc
        if not (math.isfinite(a) and math.isfinite(b)):  # an overflowed partial sum: IEEE's inf + x
            return fraction_round(a + b, acc, mode)
        return fraction_round(Fraction(a) + Fraction(b), acc, mode, negative_zero=_neg_zero_result("add", a, b, mode))

    xs = [float(x) for x in xs]
    if order.kind == "sequential":
        s = xs[0]
        for x in xs[1:]:
            s = add(s, x)
    elif order.kind == "pairwise":
        size = 1
        while size < len(xs):
            size *= 2
        level = xs + [0.0] * (size - len(xs))
        while len(level) > 1:
            level = [add(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        s = level[0]
    elif order.kind == "kahan":
        s, c = xs[0], 0.0
        for x in xs[1:]:
            y = add(x, -c)
            t = add(s, y)
            c = add(add(t, -s), -y)
            s = t
    elif order.kind == "exact":
        return fraction_round(sum(map(Fraction, xs), Fraction(0)), out, mode)
    elif order.kind == "blocked":
        b = order.block
        blocks = [fraction_round(sum(map(Fraction, xs[i:i + b]), Fraction(0)), acc, mode) for i in range(0, len(xs), b)]
        s = blocks[0]
        for x in blocks[1:]:
            s = add(s, x)
    return fraction_round(s, out, mode)


def test_sum_of_ones_bf16():
    ones = jnp.ones(10_000)
    got = {o: float(Emulator(f"compute=bf16,order={o}").sum(ones)) for o in ["sequential", "pairwise", "exact"]}
    assert got == {"sequential": 256.0, "pairwise": 9984.0, "exact": 9984.0}
    assert float(Emulator("compute=fp16,order=sequential").sum(ones)) == 2048.0
    assert float(Emulator("compute=bf16,accumulate=fp32,order=sequential").sum(ones)) == 9984.0


@given(
    p=st.integers(2, 25),
    order=st.sampled_from([Order("sequential"), Order("pairwise"), Order("kahan"), Order("exact"),
                           Order("blocked", 3), Order("blocked", 8)]),
    n=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    spread=st.integers(0, 40),
    mode=st.sampled_from(MODES),
)
# found by the search profile: 1/8 + (-1/8) rounded down is -0 (IEEE 754 §6.3), which the oracle's
# rationals had lost
@example(p=2, order=Order("sequential"), n=2, seed=0, spread=0, mode="rd")
def test_reductions_match_rational_reference(p, order, n, seed, spread, mode):
    fmt = parse(f"p={p},emax=64")
    acc = parse(f"p={min(25, p + 3)},emax=64")
    rng = np.random.default_rng(seed)
    raw = rng.standard_normal(n) * 2.0 ** rng.integers(-spread, spread + 1, n)
    xs = np.asarray(round_to(jnp.asarray(raw), fmt))
    from collapse_sim import Mode

    emu = Emulator(Policy(fmt, fmt, acc, fmt, order, mode=Mode.parse(mode)))
    got = float(emu.sum(jnp.asarray(xs, emu.dtype)))
    expected = _py_sum(list(xs), order, acc, fmt, mode)
    assert _eq(got, expected), (list(xs), got, expected)


@pytest.mark.parametrize("order", [Order("exact"), Order("blocked", 3)])
@pytest.mark.parametrize("mode", ["rne", "rd"])
def test_reduction_paths_agree(order, mode):
    """The exact and blocked orders' three ways to their exact sums (reduce_sum's
    ``path``): the certified float64 sum with the superaccumulator behind it, the
    superaccumulator alone, and the certificate alone where it holds, against exact
    rationals. Rows 0 and 1 lie just past a rounding boundary of the output (p = 5) or
    accumulate (p = 8) format, where float64 returns the boundary itself, so the
    certificate must refuse them: for round to nearest 1 + 2^-5 + 2^-60 and
    1 + 2^-8 + 2^-60 (midpoints), for round down -1 - 2^-60 (a format value)."""
    from collapse_sim import Mode
    from collapse_sim.backends.emulated import reduce_sum

    fmt, acc = parse("p=5,emax=64"), parse("p=8,emax=64")
    emu = Emulator(Policy(fmt, fmt, acc, fmt, order, mode=Mode.parse(mode)))
    rng = np.random.default_rng(11)
    raw = rng.standard_normal((30, 24)) * 2.0 ** rng.integers(-20, 21, (30, 24))
    raw[:2] = 0.0
    if mode == "rne":
        raw[0, :3], raw[1, :3] = (1.0, 2.0**-5, 2.0**-60), (1.0, 2.0**-8, 2.0**-60)
    else:
        raw[:2, :2] = -1.0, -(2.0**-60)
    x = round_to(jnp.asarray(raw), fmt)

    @jax.jit
    def paths(x):
        red = functools.partial(reduce_sum, order=order, acc=acc, out=fmt, mode=emu.mode, bounds=emu.bounds)
        return red(x), red(x, path="superacc"), red(x, path="float64")

    cert, sup, (s64, ok) = (jax.tree.map(np.asarray, r) for r in paths(x))
    for i, row in enumerate(np.asarray(x)):
        want = _py_sum(list(row), order, acc, fmt, mode)
        assert _eq(cert[i], want) and _eq(sup[i], want), (i, cert[i], sup[i], want)
        assert not ok[i] or _eq(s64[i], want), (i, s64[i], want)
    assert not ok[0 if order.kind == "exact" else 1] and ok[2:].sum() >= 20


@given(st.lists(st.floats(-1e30, 1e30, allow_subnormal=False), min_size=1, max_size=60), st.sampled_from(MODES))
@example([2.0**60, 1.0, -(2.0**60)], "rne")
@example([1.0, 2.0**-200, -(2.0**-200)], "rz")
@example([1.0, 2.0**-300], "ru")
@example([0.5, 2.0**-40], "rne")
def test_exact_sum_is_correctly_rounded(xs, mode):
    """In one pass, and as long sums and large batches are taken: in chunks of 7 terms,
    one sum at a time (a batch of three: the terms, reversed, negated). Every sum is
    zero-padded to 64 terms (+0 terms change no exact sum), so each path compiles once
    per format and mode, and a search of thousands of examples stays fast."""
    m = __import__("collapse_sim").Mode.parse(mode)
    pad = [0.0] * (64 - len(xs))
    for fmt in (parse("bf16"), parse("fp32")):
        expected = fraction_round(sum(map(Fraction, xs), Fraction(0)), fmt, mode)
        assert _eq(float(_one_pass_exact_sum(fmt, m)(jnp.asarray(xs + pad, jnp.float64))), expected), (fmt.name, expected)
        if fmt.name != "bf16":
            continue
        rows = jnp.asarray([xs + pad, xs[::-1] + pad, [-x for x in xs] + pad], jnp.float64)
        got = np.asarray(_chunked_exact_sum(fmt, m)(rows))
        neg = fraction_round(-sum(map(Fraction, xs), Fraction(0)), fmt, mode)
        for g, want in zip(got, (expected, expected, neg)):
            assert _eq(float(g), want), (fmt.name, got, expected, neg)


@functools.lru_cache(maxsize=None)
def _one_pass_exact_sum(fmt, mode):
    return jax.jit(lambda x: exact_sum(x, fmt, mode))


@functools.lru_cache(maxsize=None)
def _chunked_exact_sum(fmt, mode):
    return jax.jit(lambda x: exact_sum(x, fmt, mode, chunk=7, table=1))


@given(st.lists(st.floats(-1e30, 1e30, allow_subnormal=False), min_size=1, max_size=60), st.sampled_from(MODES),
       st.sampled_from(["bf16", "fp16", "fp32", "p=3,emax=200"]))
@example([1.0, 2.0**-8], "rne", "bf16")  # an exact midpoint: the float64 sum cannot be certified
@example([2.0**60, 1.0, -(2.0**60)], "rne", "bf16")  # float64 loses the 1
@example([1.0, -1.0], "rd", "bf16")  # exact cancellation: +0 as exact_sum gives it
@example([0.0, -0.0], "rd", "fp32")
def test_certified_sum_equals_exact_sum(xs, mode, fmt):
    """Bit for bit (zeros' signs included), whether the float64 sum was certified or not."""
    x = jnp.asarray(xs + [0.0] * (64 - len(xs)), jnp.float64)  # one shape: one compile per (format, mode)
    got, want = _sum_both(fmt, mode)(x)
    assert _eq(got, want), xs


@functools.lru_cache(maxsize=None)
def _sum_both(fmt, mode):
    from collapse_sim import Mode

    f, m = parse(fmt), Mode.parse(mode)
    return jax.jit(lambda x: (certified_sum(x, f, m), exact_sum(x, f, m)))


def test_certify_refuses_midpoints_and_cancellation():
    """The check must fail exactly where a float64 sum cannot decide the rounding."""
    bf = parse("bf16")
    from collapse_sim import Mode

    for xs in ([1.0, 2.0**-8], [2.0**60, 1.0, -(2.0**60)], [1.0, -1.0]):
        x = jnp.asarray(xs, jnp.float64)
        _, ok = certify(jnp.sum(x), jnp.sum(jnp.abs(x)), len(xs), bf, Mode.RNE)
        assert not bool(ok), xs
    x = jnp.asarray([1.0, 2.0**-10], jnp.float64)  # a quarter ulp from 1: certified
    r, ok = certify(jnp.sum(x), jnp.sum(jnp.abs(x)), 2, bf, Mode.RNE)
    assert bool(ok) and float(r) == 1.0


@functools.lru_cache(maxsize=None)
def _cell_check(fmt):
    from collapse_sim.backends.emulated import _inside_cell

    f = parse(fmt)
    return jax.jit(lambda s, e: (lambda r: (r, _inside_cell(s, e, r, f)))(round_to(s, f)))


@given(st.sampled_from(["bf16", "fp16", "fp32", "p=3,emax=10"]), st.integers(-1, 1), st.integers(0, 7),
       st.integers(-12, 12), st.sampled_from([-1, 1]), st.integers(-3, 60), st.integers(0, 60), st.booleans())
@example("bf16", 0, 0, 0, 1, 0, 60, False)  # exactly a midpoint above 1: never certified, whatever the width
@example("bf16", 0, 0, 0, -1, 1, 60, True)  # just below 1: the cell is narrower below a power of two
@example("p=3,emax=10", -1, 0, -12, 1, 30, 40, False)  # near zero, below the smallest subnormal
def test_inside_cell_means_every_point_rounds_alike(fmt, binade, sig, ebase, sign, dj, ej, at_value):
    """Where the cell test accepts ``[s - e, s + e]``, the exact rounding (rationals) of both
    ends and of ``s`` is ``r``, bit for bit (sign of zero included): a certificate that
    accepted an interval crossing a rounding boundary would fail here. ``s`` sits at a
    format value or a midpoint, moved by ±2^-dj of the spacing; ``e`` is 2^-ej of it."""
    f = parse(fmt)
    ex = max(f.emin, min(f.emax - 1, ebase * (f.emax // 12) + binade))
    spacing = Fraction(2) ** (ex - f.p + 1)
    base = Fraction(2) ** ex + sig * spacing + (0 if at_value else spacing / 2)
    if ebase == -12 and binade == -1:  # the subnormal range and zero
        base = sig * Fraction(2) ** (f.emin - f.p + 1) / 2
    s_exact = sign * (base + Fraction(sign) * spacing * Fraction(2) ** -dj)
    s = float(s_exact)
    e = float(spacing * Fraction(2) ** -ej)
    r, ok = _cell_check(fmt)(jnp.float64(s), jnp.float64(e))
    if not bool(ok):
        return
    want = float(r)
    for point in (Fraction(s) - Fraction(e), Fraction(s), Fraction(s) + Fraction(e)):
        got = fraction_round(point, f, "rne")
        assert got == want and math.copysign(1, got) == math.copysign(1, want), (s, e, point, got, want)


def test_inside_cell_accepts_clear_cases_and_refuses_boundaries():
    check = _cell_check("bf16")
    for s, e, want in ((1 + 2.0**-10, 2.0**-40, True), (1 - 2.0**-11, 2.0**-40, True), (-(2.0**-135), 2.0**-160, True),
                       (1 + 2.0**-8, 0.0, False), (1 - 2.0**-9 - 2.0**-30, 2.0**-29, False), (2.0**-140, 2.0**-139, False)):
        assert bool(check(jnp.float64(s), jnp.float64(e))[1]) is want, (s, e)


@pytest.mark.parametrize("policy", ["compute=bf16,order=exact", "compute=bf16,accumulate=fp32,order=blocked(8)",
                                    "compute=(p=3,emax=100),order=exact", "compute=(p=3,emax=100),order=blocked(5),mode=ru",
                                    "compute=fp16,accumulate=fp32,order=blocked(16),mode=rz"])
def test_certified_matmul_equals_op_by_op_where_certified(policy):
    """Where certified_matmul says ok, its bits are Emulator.matmul's (exact superaccumulator
    and rounded adds). Rows 0-9 carry ±2^80 products that cancel, so float64 loses the
    small terms: those entries must be refused, the others certified."""
    emu = Emulator(policy)
    rng = np.random.default_rng(7)
    a, b = rng.integers(-6, 7, (20, 37)).astype(float), rng.standard_normal((37, 11))
    plant = emu.policy.compute.emax >= 80
    if plant:
        a[:10, :2], a[10:, :2], b[0], b[1] = 2.0**40, 0.0, 2.0**40, -(2.0**40)
    a, b = emu.store(a), emu.store(b)
    j = rng.integers(0, 37, 20)
    t = emu.store(rng.standard_normal((20, 11))) * emu.store(rng.standard_normal((20, 1)))  # exact products
    dot = jax.jit(jax.vmap(functools.partial(_dot_of_products, emu)))
    for extra in (None, (jnp.asarray(j), t)):
        x = a if extra is None else a.at[np.arange(20), j].set(0.0)  # the extra term takes x[i, j[i]]'s place
        r, ok = certified_matmul(emu, x, b, extra)
        terms = x[:, None, :] * b.T[None, :, :]  # (20, 11, 37) exact products
        if extra is not None:
            terms = terms.at[np.arange(20), :, j].set(t)
        want = np.asarray(dot(terms.reshape(220, 37))).reshape(20, 11)
        okn = np.asarray(ok)
        if plant:
            assert not okn[:10].any() and okn[10:].all()
        else:
            assert okn.all()
        assert _eq(np.asarray(r)[okn], want[okn])


def _dot_of_products(emu, terms):  # vmapped: its cond becomes a select, both branches run
    """Reduce exact products in the policy's order as Emulator.dot does (exact/blocked)."""
    from collapse_sim.backends.emulated import reduce_sum

    pol = emu.policy
    return reduce_sum(terms, pol.order, pol.accumulate, pol.compute, emu.mode, bounds=emu.bounds)


def test_dot_and_matmul_shapes_and_exact_order():
    emu = Emulator("compute=bf16,order=exact")
    rng = np.random.default_rng(3)
    a = emu.store(rng.standard_normal((4, 16)))
    b = emu.store(rng.standard_normal((16, 5)))
    c = emu.matmul(a, b)
    assert c.shape == (4, 5)
    for i in range(4):
        for j in range(5):
            exact = sum(Fraction(float(a[i, k])) * Fraction(float(b[k, j])) for k in range(16))
            assert float(c[i, j]) == fraction_round(exact, parse("bf16"), "rne")


def test_emulator_needs_x64():
    jax.config.update("jax_enable_x64", False)
    try:
        with pytest.raises(RuntimeError, match="enable_x64"):
            Emulator("bf16")
    finally:
        jax.config.update("jax_enable_x64", True)


@pytest.mark.parametrize("mode, expected", [("rz", 63488.0), ("rd", 63488.0), ("ro", 63488.0), ("ru", np.inf),
                                            ("rne", np.inf)])
def test_exact_sum_beyond_float64_rounds_like_the_exact_sum(mode, expected):
    """An exact sum of 2^1024 lies beyond p = 5, emax = 15 (largest value 63488): it
    overflows to inf in the nearest and upward modes and gives 63488 toward zero, downward
    and to odd. The superaccumulator must not hand round_to an infinity (it did: every
    mode gave inf)."""
    from collapse_sim.formats import parse

    got = float(exact_sum(jnp.asarray([[2.0**1023, 2.0**1023]]), parse("p=5,emax=15"), mode)[0])
    assert got == expected
    assert float(exact_sum(jnp.zeros((2, 0)), parse("bf16"), mode).sum()) == 0.0  # empty rows sum to 0
