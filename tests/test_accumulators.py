"""The accumulator models (docs/semantics.md §3.4) against an exact-rational implementation
written from that text alone: random and adversarial dot products and sums, bit for bit, on
the emulated backend (Emulator.dot / .sum) and the reference (Reference.dot / ref_sum)."""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import mpmath.libmp as mlib
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from collapse_sim.backends.emulated import CarrierError, Emulator, orders
from collapse_sim.backends.reference.arith import Reference, ref_sum
from collapse_sim.formats import Format, parse
from collapse_sim.policy import Order, Policy
from collapse_sim.rounding import Mode
from oracles import fraction_round

N = 12  # terms per row: every row of a test has this length (one compiled program per policy)


# --- the oracle: docs/semantics.md §3.4, written again with exact rationals ---------------

def _is_special(v) -> bool:
    return isinstance(v, float) and (math.isnan(v) or math.isinf(v))


def _ieee_sum(values) -> float:
    """The IEEE sum of values of which one at least is an infinity or NaN."""
    specials = [v for v in values if _is_special(v)]
    if any(math.isnan(v) for v in specials) or (math.inf in specials and -math.inf in specials):
        return math.nan
    return specials[0]


def _value(v):
    """A rounded result as the oracle keeps it: exact rationals, specials as floats."""
    return v if _is_special(v) else Fraction(v)


def _floor_log2(a: Fraction) -> int:
    e = a.numerator.bit_length() - a.denominator.bit_length()
    return e if a >= Fraction(2) ** e else e - 1


def tcfma_oracle(terms, k: int, t: int, r: str, acc: Format, out: Format, mode: str) -> float:
    """§3.4.1: blocks of k; a block of zeros is skipped; specials give their IEEE sum; else
    the running sum and the block truncated toward zero to multiples of 2^(E - t), E the
    largest exponent among them, added exactly, rounded to A in r. Then ∘_out in mode."""
    s = Fraction(0)
    for i in range(0, len(terms), k):
        block = terms[i:i + k]
        if all(x == 0 for x in block):
            continue
        y = [s, *block]
        if any(_is_special(v) for v in y):
            s = _value(fraction_round(_ieee_sum(y), acc, r))
            continue
        E = max(_floor_log2(abs(v)) for v in y if v != 0)
        Q = Fraction(2) ** (E - t)
        S = sum((math.floor(abs(v) / Q) * Q * (1 if v > 0 else -1) for v in y), Fraction(0))
        s = _value(fraction_round(S, acc, r))
    return fraction_round(s, out, mode)


def short_format(b: int, acc: Format) -> Format:
    """§3.4.2's P: b bits, A's range and rules, the largest b-bit value not above A's."""
    sig = math.floor(acc.max_exact / Fraction(2) ** (acc.emax - b + 1))
    return Format(f"P{b}", b, acc.emin, acc.emax, subnormals=acc.subnormals, overflow=acc.overflow,
                  max_significand=None if sig == 2**b - 1 else sig, signed_zero=acc.signed_zero)


def _add(a, b, fmt: Format, mode: str):
    if _is_special(a) or _is_special(b):
        return _value(fraction_round(_ieee_sum([a, b]), fmt, mode))
    return _value(fraction_round(Fraction(a) + Fraction(b), fmt, mode))


def promote_oracle(terms, b: int, nc: int, r: str, acc: Format, out: Format, mode: str) -> float:
    """§3.4.2: chunks of Nc; c = ∘_P^r(c + x) from c = 0; s = ∘_A(s + c) from s = 0 in the
    policy's mode. Then ∘_out in mode."""
    P = short_format(b, acc)
    s = Fraction(0)
    for i in range(0, len(terms), nc):
        c = Fraction(0)
        for x in terms[i:i + nc]:
            c = _add(c, x, P, r)
        s = _add(s, c, acc, mode)
    return fraction_round(s, out, mode)


def oracle(policy: Policy, terms) -> float:
    o, m = policy.order, policy.mode.value
    if o.kind == "tcfma":
        return tcfma_oracle(terms, o.block, o.bits, o.rounding.value, policy.accumulate, policy.compute, m)
    return promote_oracle(terms, o.bits, o.block, o.rounding.value, policy.accumulate, policy.compute, m)


def _exact(v):
    return v if _is_special(v) else Fraction(v)


def _products(a, b):
    """The exact products of two float rows (IEEE specials for inf and NaN)."""
    out = []
    for x, y in zip(a, b):
        if _is_special(float(x)) or _is_special(float(y)):
            with np.errstate(invalid="ignore"):
                out.append(float(np.float64(x) * np.float64(y)))
        else:
            out.append(Fraction(float(x)) * Fraction(float(y)))
    return out


# --- the rows: random and adversarial ------------------------------------------------------

def _pad(row):
    row = [float(v) for v in row][:N]
    return row + [0.0] * (N - len(row))


def adversarial_rows(policy: Policy) -> list[list[float]]:
    """Intended products (each the left factor, the right one 1), built from the policy's
    parameters; the storage format then rounds them (the oracle sees the stored values)."""
    A, o = policy.accumulate, policy.order
    pA, big = A.p, float(A.max_exact)
    tiny = 2.0**A.emin  # smallest normal of A
    rows = [
        [2.0**20, 1.0, -2.0**20, 0.125, 3.0, -3.0],  # cancellation
        [1.0, 1.0, 2.0 ** (1 - pA)],  # 2 + ulp/2: a tie of A's rounding (if kept)
        [1.0, 1.0, 3 * 2.0 ** (1 - pA)],  # 2 + 3 ulp/2: a tie, odd below
        [1.0, -1.0, 2.0**-30, -(2.0**-31)],  # what is left after cancellation
        [big, big, -big],  # overflow of A (rz: its largest value; rne: the overflow value)
        [-big, -big * 0.75, 1.0],
        [tiny * 1.5, 3 * 2.0 ** (A.emin - pA - 1), 2.0 ** (A.emin - pA - 3)],  # subnormal terms
        [2.0 ** (A.emin - pA - 2), 2.0 ** (A.emin - pA - 2)],  # below A's smallest subnormal
        [math.inf, 1.0], [math.inf, -math.inf, 1.0], [math.nan, 2.0], [-math.inf, 5.0, 7.0],
    ]
    if o.kind == "tcfma":
        k, t = o.block, o.bits
        q = 2.0**-t
        rows += [
            [1.0, 1.5 * q, -0.5 * q, 0.75 * q, 1.25 * q],  # the alignment boundary 2^(E - t) at E = 0
            [1.0] + [0.0] * (k - 1) + [8.0, 8 * 1.5 * q, -8 * q * 0.5, q],  # a larger E drops s's low bits
            [1.0] + [0.0] * (k - 1) + [-(2.0**-1), 3 * q / 8],  # s sets E; a term below Q contributes 0
            [2.0**10, 2.0 ** (9 - t) * 1.5, -(2.0 ** (8 - t)), 2.0 ** (10 - t) * 0.75],  # exponents > t apart
            [2.0**10, -(2.0 ** (10 - t - 5))],  # a negative term below Q truncates to 0, not -Q
            [0.0] * k + [1.0, q] + [0.0] * k + [q],  # blocks of zeros in place
            [1.0 + q] + [0.0] * (2 * k) + [2.0**-3],  # s keeps t + 1 bits after a skipped block
            [3.0] * (k + 1) + [1.0 + 2.0 ** (1 - pA)] * k,  # carries out of the aligned sum
            [1.0 + q] * k + [0.0] * k,  # a carry puts s's last bit below its own 2^(E - t): a skipped block keeps it
        ]
    else:
        b, nc = o.bits, o.block
        rows += [
            [1.0, 2.0**-b],  # 1 + ulp/2 of the short accumulator: a tie in P
            [1.0, 3 * 2.0**-b],
            [2.0**b] + [1.0] * (nc - 1) + [1.0] * nc,  # swamping inside a chunk, kept across chunks
            [1.0] * nc + [2.0**pA] + [0.0] * (nc - 1) + [1.0],  # promotion: 2^pA + 1 is a tie in A
            [2.0 ** (A.emin - 1) * 1.5, 2.0 ** (A.emin - b - 2), -(2.0 ** (A.emin - b - 1))],  # P's subnormals
            [big, big * 0.5] + [0.0] * (nc - 2) + [big],  # overflow in P, then in A
            [big, 2.0 ** (A.emax - pA - 1)],  # above A's largest value: P overflows where b > p_A
            [0.0] * nc + [1.0, 2.0**-b] + [0.0] * nc,  # chunks of zeros in place
            [1.0 - 2.0 ** (-b - 1), 2.0 ** (-b - 2)] * nc,  # just below a power of two
        ]
    return [_pad(r) for r in rows]


def random_rows(rng, n_rows: int, spread: int):
    """Random factors: signs, exponents over ``2 spread`` binades, a few zeros."""
    def draw():
        v = rng.standard_normal((n_rows, N)) * 2.0 ** rng.integers(-spread, spread + 1, (n_rows, N))
        return np.where(rng.random((n_rows, N)) < 0.1, 0.0, v)
    return draw(), draw()


# --- the two backends -------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _emulated(policy: Policy):
    emu = Emulator(policy)
    return emu, jax.jit(lambda a, b: (emu.dot(a, b), emu.sum(a)))


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y  # ±0 equal: the reference has no -0


def check_rows(policy: Policy, a, b, emulated=None) -> int:
    """Emulated and reference dot products and sums of each row against the oracle, bit for
    bit; returns how many rows had a nonzero result. ``emulated``: ``(emu, run)`` in place of
    the cached jitted pair."""
    emu, run = _emulated(policy) if emulated is None else emulated
    a = np.asarray(emu.store(np.asarray(a, np.float64)), np.float64)
    b = np.asarray(emu.store(np.asarray(b, np.float64)), np.float64)
    dots, sums = (np.asarray(v, np.float64) for v in run(a, b))
    ref = Reference(policy)
    nonzero = 0
    for i in range(a.shape[0]):
        ra, rb = list(ref.store(a[i])), list(ref.store(b[i]))
        want_dot = oracle(policy, _products(a[i], b[i]))
        want_sum = oracle(policy, [_exact(float(v)) for v in a[i]])
        got = {"emulated dot": float(dots[i]), "reference dot": mlib.to_float(ref.dot(ra, rb)),
               "emulated sum": float(sums[i]),
               "reference sum": mlib.to_float(ref_sum(ra, policy.order, ref.accumulate, ref.compute))}
        for what, v in got.items():
            want = want_dot if "dot" in what else want_sum
            assert _same(v, want), f"{policy.order}, row {i} ({a[i].tolist()} x {b[i].tolist()}): {what} {v!r}, oracle {want!r}"
        nonzero += want_dot != 0
    return nonzero


TCFMA = [
    "storage=fp32,compute=fp32,accumulate=fp32,order=tcfma(4,23,rz)",  # tcfma-v100's parameters
    "storage=fp32,compute=fp32,accumulate=fp32,order=tcfma(4,23,rne),mode=rd",
    "storage=bf16,compute=bf16,accumulate=fp32,order=tcfma(4,24,rz)",
    "compute=(p=6,emax=15),accumulate=(p=9,emax=15),order=tcfma(3,5,rne),mode=ru",  # t < p_A - 1
]
PROMOTE = [
    "storage=fp32,compute=fp32,accumulate=fp32,order=promote(14,4)",
    "storage=fp32,compute=fp32,accumulate=fp32,order=promote(14,4,rne),mode=rd",
    "storage=e4m3fn,compute=fp32,accumulate=fp32,order=promote(14,4)",
    "compute=bf16,accumulate=bf16,order=promote(10,3,rne)",  # b > p_A: P's largest value is A's
    "compute=(p=6,emax=15),accumulate=(p=9,emax=15),order=promote(5,3)",
]


@pytest.mark.parametrize("policy", TCFMA + PROMOTE)
def test_accumulator_equals_exact_rational_oracle(policy):
    """Adversarial rows (cancellation, alignment boundaries, ties at the final rounding,
    subnormal terms, overflow of A, terms more than t binades apart, zeros in place, inf and
    NaN) and random rows with exact products of up to 2p bits, on both backends."""
    pol = Policy.parse(policy)
    rng = np.random.default_rng(17)
    adv = np.asarray(adversarial_rows(pol))
    ra, rb = random_rows(rng, 40, 12)
    a = np.concatenate([adv, ra])
    b = np.concatenate([np.ones_like(adv), rb])
    assert check_rows(pol, a, b) >= len(a) // 2


@given(data=st.data(), which=st.sampled_from([TCFMA[0], PROMOTE[0]]))
def test_accumulator_random_factors(data, which):
    """Hypothesis rows: factors m·2^e with few-bit significands (so sums sit on ties and
    alignment boundaries) and exponents close together or far apart."""
    def factor():
        return st.builds(lambda m, e: m * 2.0**e, st.integers(-15, 15), st.integers(-30, 30))

    a = data.draw(st.lists(factor(), min_size=N, max_size=N))
    b = data.draw(st.lists(factor(), min_size=N, max_size=N))
    check_rows(Policy.parse(which), [a], [b])


def test_tcfma_v100_examples():
    """The V100 test suite's cases (docs/semantics.md §3.4.1) under tcfma-v100: 1·1 − (1 − 2^-24)
    gives 2^-23 (no guard digit), 1 + four products 2^-25... each below 2^(E - 23) adds
    nothing, and 1 + 2^-22 + 2^-23 + four ones gives 5 (rz after normalisation)."""
    pol = Policy.parse("storage=fp32,compute=fp32,accumulate=fp32,order=tcfma-v100")
    emu, run = _emulated(pol)
    rows = [[-(1 - 2.0**-24), 1.0], [1.0, 2.0**-25, 2.0**-25, 2.0**-25, 2.0**-25],
            [1 + 2.0**-22 + 2.0**-23, 1.0, 1.0, 1.0, 1.0]]
    # the accumulator c first: s = c after a block [c, 0, 0, 0], then the four products
    a = np.asarray([_pad([r[0], 0.0, 0.0, 0.0, *r[1:]]) for r in rows])
    got = np.asarray(run(a, np.ones_like(a))[0], np.float64)
    assert got.tolist() == [2.0**-23, 1.0, 5.0]


def test_emulated_limits_refused():
    """Beyond float64's exact arithmetic the emulated backend refuses in one sentence."""
    with pytest.raises(CarrierError, match="t \\+ ceil"):
        Emulator("compute=bf16,accumulate=fp32,order=tcfma(4,50,rz)")
    with pytest.raises(CarrierError, match="b <= 51"):
        Emulator("compute=bf16,accumulate=fp32,order=promote(52,4)")
    with pytest.raises(CarrierError, match="b <= 51"):  # an order given to one sum
        Emulator("compute=bf16").sum(np.ones(4), order=Order.parse("promote(52,4)"))
    Emulator("compute=bf16,accumulate=fp32,order=tcfma(1,51,rz)")  # the limits themselves
    Emulator("compute=bf16,accumulate=fp32,order=promote(51,4)")


@pytest.mark.parametrize("policy", [TCFMA[2], PROMOTE[0], PROMOTE[3]])
def test_shared_program_equals_specialised(policy):
    """With the formats traced (the shared program, docs/semantics.md §12.1; promote's short
    format then traced too) the models give the specialised emulator's bits."""
    pol = Policy.parse(policy)
    emu, run = _emulated(pol)
    shared = Emulator(pol, shared=True)
    traced = jax.jit(lambda data, a, b: (shared.bind(data).dot(a, b), shared.bind(data).sum(a)))
    adv = np.asarray(adversarial_rows(pol))
    ra, rb = random_rows(np.random.default_rng(3), 20, 12)
    a = np.asarray(emu.store(np.concatenate([adv, ra])), np.float64)
    b = np.asarray(emu.store(np.concatenate([np.ones_like(adv), rb])), np.float64)
    for want, got in zip(run(a, b), traced(shared.data(), a, b)):
        want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
        assert np.all((want == got) | (np.isnan(want) & np.isnan(got))), policy


@pytest.mark.parametrize("policy,d", [("storage=bf16,compute=fp32,accumulate=fp32,order=tcfma(4,12,rz)", 8),
                                      ("storage=e4m3fn,compute=fp32,accumulate=fp32,order=promote(14,4)", 9)])
def test_forward_emulated_equals_reference(policy, d, monkeypatch):
    """Full forwards (L = 2, N = 12, a probe after every prefix) under each model: every dot
    product and sum of the model (scores, weighted values, projections, MLP, norms' sums,
    softmax denominator) on both backends, bit for bit. d = 8 for one model and d = 9 (an odd
    width: blocks and chunks end short, the mean divides by the exact 9, §4.1) for the other:
    each case compiles its own forward (~20 s), so the two widths are not both run for both.
    t = 12 < p_A - 1 with fp32 products (48 bits): the truncation, the exactness of the
    products and the skipped blocks of masked columns all show in the bits. Nc = 4 < N, so
    promotion happens in the attention's sums over keys. Every bound promote is given from the
    factors is checked, at run time, to hold the terms it bounds."""
    from collapse_sim.model import ModelConfig
    from test_model import assert_emulated_equals_reference

    monkeypatch.setattr(orders, "PROMOTE_FAST_MIN_TERMS", 1)
    loose = []  # per promote sum given bounds: whether they bound its actual terms (read at run time)
    if "promote" in policy:
        from collapse_sim.backends.emulated import ops

        def checked(x, order, acc, mode, terms=None):
            if terms is not None:
                real = orders.term_bounds(x)
                ok = (terms.low <= real.low) & (terms.top >= real.top) & (real.ok | ~terms.ok)
                jax.debug.callback(lambda v: loose.append(bool(v)), ok)
            return orders._promote(x, order, acc, mode, terms)

        monkeypatch.setattr(ops, "_promote", checked)
    assert_emulated_equals_reference(ModelConfig(d=d, n_layers=2, vocab=4, seed=3, d_ff=2 * d), policy)
    assert ("promote" not in policy) or (loose and all(loose)), loose  # the factors' bounds hold every product


# --- promote's bit-level short accumulator (orders._chunk_sums_fast) ----------------------

#: (order, accumulate format): both roundings, b from 2 to 51, P's largest value below and at A's
#: (b > p_A: bf16), a format of few bits whose range the terms' bound reaches.
FAST = [("promote(14,128)", "fp32"), ("promote(14,128,rne)", "fp32"), ("promote(5,7)", "bf16"),
        ("promote(5,7,rne)", "fp32"), ("promote(10,3,rne)", "bf16"), ("promote(24,64)", "fp32"),
        ("promote(51,4,rne)", "fp32"), ("promote(2,5,rne)", "(p=6,emax=15)"), ("promote(2,6)", "(p=6,emax=15)")]


def _fast_terms(order: Order, acc: Format, lanes: int, rng) -> np.ndarray:
    """(Nc, lanes) terms that pass the check (multiples of P's quantum 2^q, at most 2^e): random
    ones of up to b + 3 bits over the whole allowed range and over a few binades, then lanes
    built on P's roundings: ties and near-ties of b bits, sums just below a power of two,
    cancellation to zero and to P's subnormals, terms at the bound 2^e, binade crossings."""
    nc, b = order.block, order.bits
    q, e = orders._fast_limits(order, acc, nc)
    m = rng.integers(-(2 ** (b + 3)), 2 ** (b + 3), (nc, lanes)).astype(np.float64)
    wide = m * 2.0 ** rng.integers(q, e - b - 2, (nc, lanes))
    near = m * 2.0 ** rng.integers(-b - 6, -b + 2, (nc, lanes))  # sums of similar size: many roundings
    x = np.where(np.arange(lanes) % 2 == 0, wide, near)
    x = np.where(rng.random((nc, lanes)) < 0.1, 0.0, x)  # zeros in place

    u = 2.0 ** (1 - b)  # P's spacing above 1
    special = [
        [1.0, u / 2], [1.0, 3 * u / 2], [1.0, -u / 4], [1.0, u / 2, u / 2], [-1.0, -u / 2, u / 4],  # ties, near-ties
        [2.0 - u, u / 2], [2.0 - u, u / 4, u / 4], [-(2.0 - u), -(u / 2)],  # up to the next binade
        [1.0, -(2.0**-60)], [2.0, -(2.0**-40), 2.0**-41],  # just below a power of two (rz steps down)
        [3.0, -3.0, 2.0**-30], [2.0**20, 1.0, -(2.0**20)], [1.0, -1.0],  # cancellation, to +0
        [2.0**q, 3 * 2.0**q, -(2.0**q)], [2.0 ** (acc.emin - 1), 2.0 ** (acc.emin - 1), 2.0**q],  # P's subnormals
        [2.0 ** (acc.emin) - 2.0**q, 2.0**q], [2.0**acc.emin, -(2.0**q)],  # across 2^emin, both ways
        [2.0**e] * nc, [-(2.0**e)] * nc, [2.0**e, -(2.0**e), 2.0**e],  # the bound itself
        [2.0**e, 2.0 ** (e - b - 3), 2.0 ** (e - b - 3)],
    ]
    for j, col in enumerate(special):  # each alone (zeros after it) and repeated through the chunk
        for k, full in enumerate([col + [0.0] * nc, col * nc]):
            full = np.round(np.asarray(full[:nc]) / 2.0**q) * 2.0**q  # onto P's quantum (small formats)
            x[:, 2 * j + k] = np.clip(full, -(2.0**e), 2.0**e)
    return x


@pytest.mark.parametrize("spec,acc", FAST)
def test_promote_bit_level_equals_scan(spec, acc):
    """The bit-level short accumulator gives the scan's chunk sums (round_to of round-to-odd
    adds, which the oracle tests above check) bit for bit on terms that pass its check:
    random terms over the whole allowed range and lanes of ties, binade crossings,
    cancellation, P's subnormals and the magnitude bound."""
    order, A = Order.parse(spec), parse(acc)
    short = order.chunk_format(A)
    x = _fast_terms(order, A, 4096, np.random.default_rng(5))
    assert bool(orders._fits(orders.term_bounds(x), *orders._fast_limits(order, A, order.block)))
    want = np.asarray(jax.jit(lambda v: orders._chunk_sums(v, order, short))(x))
    got = np.asarray(jax.jit(lambda v: orders._chunk_sums_fast(v, order.bits, order.rounding))(x))
    diff = np.flatnonzero(want.view(np.uint64) != got.view(np.uint64))
    assert diff.size == 0, f"{spec} on {acc}: lane {diff[0]} {x[:, diff[0]].tolist()}: {got[diff[0]]!r}, scan {want[diff[0]]!r}"
    assert np.any(want != 0) and np.any((want != 0) & (np.abs(want) < 2.0**A.emin))  # P's subnormals reached


def test_promote_bit_level_check_refuses():
    """The check fails on a term below or off P's quantum 2^q, above the bound 2^e, inf, NaN,
    and a float64 subnormal (XLA:CPU reads it as 0 in arithmetic); formats without subnormals,
    zero or negative values have no bit-level path."""
    order, A = Order.parse("promote(14,128)"), parse("fp32")
    q, e = orders._fast_limits(order, A, 128)
    ok = [0.0, -0.0, 2.0**q, -(2.0**q), 2.0**e, 2.0**-100 + 2.0**q]
    assert bool(orders._fits(orders.term_bounds(np.asarray(ok)), q, e))
    for bad in [2.0 ** (q - 1), 2.0**-100 + 2.0 ** (q - 1), 3 * 2.0 ** (q - 1), 2.0**e * (1 + 2.0**-52), -(2.0 ** (e + 1)),
                math.inf, -math.inf, math.nan, 5e-324]:
        assert not bool(orders._fits(orders.term_bounds(np.asarray(ok + [bad])), q, e)), bad
    no_zero, no_subnormals = parse("e8m0fnu"), parse("(p=6,emax=15,subnormals=false)")
    assert not (no_zero.has_zero or no_zero.signed) and not no_subnormals.subnormals
    assert orders._fast_limits(order, no_zero, 128) is None and orders._fast_limits(order, no_subnormals, 128) is None
    assert orders._fast_limits(order, parse("e4m3fn"), 128) is not None  # e4m3fn has subnormals, zero and signs


#: Entries for the bounds' oracle: zeros of both signs, powers of two, float32 and float64 values of
#: every binade, float64 subnormals, and the specials.
_ENTRIES = st.one_of(st.sampled_from([0.0, -0.0, 1.0, -2.0**-1022, 2.0**1023, 5e-324, math.inf, -math.inf, math.nan]),
                     st.floats(width=32, allow_nan=False, allow_infinity=False),
                     st.floats(allow_nan=False, allow_infinity=False))


def _bounds_oracle(values):
    """(low, top, ok) of orders.TermBounds' definition with exact rationals: the largest l with every nonzero
    value a multiple of 2^l, the least t with every |value| <= 2^t, ok: none special or a float64
    subnormal; None for low and top with no nonzero value."""
    ok = all(math.isfinite(v) and (v == 0 or abs(v) >= 2.0**-1022) for v in values)
    nz = [abs(Fraction(v)) for v in values if math.isfinite(v) and v != 0]
    if not nz:
        return None, None, ok
    low = min(_floor_log2(Fraction(x.numerator & -x.numerator, x.denominator)) for x in nz)
    top = max(_ceil_log2(x) for x in nz)
    return low, top, ok


def _ceil_log2(a: Fraction) -> int:
    e = _floor_log2(a)
    return e if a == Fraction(2) ** e else e + 1


_term_bounds = jax.jit(orders.term_bounds)


@given(st.lists(_ENTRIES, min_size=6, max_size=6), st.lists(_ENTRIES, min_size=6, max_size=6))
def test_term_bounds_against_exact_rationals(a, b):
    """term_bounds reads, from the bit patterns, the exact (low, top, ok) of its entries; the bounds
    product_bounds derives from two factors' bound every nonzero product of theirs (exact
    rationals), and ok needs both factors' (0·inf is NaN)."""
    a, b = np.asarray(a), np.asarray(b)
    for x in (a, b):
        low, top, ok = _bounds_oracle(x.tolist())
        got = _term_bounds(x)
        assert bool(got.ok) == ok, x
        if not ok:  # low and top say nothing then (TermBounds): [0, 0, inf] has no finite nonzero term
            continue
        if low is None:
            assert int(got.low) >= 1000 and int(got.top) <= -1000, x  # above and below every limit
        else:
            assert (int(got.low), int(got.top)) == (low, top), x
    pb = orders.product_bounds(_term_bounds(a), _term_bounds(b))
    if bool(pb.ok):
        for x in a:
            for y in b:
                z = Fraction(x) * Fraction(y)
                if z:
                    assert (z / Fraction(2) ** int(pb.low)).denominator == 1 and abs(z) <= Fraction(2) ** int(pb.top)
    else:
        assert not (_term_bounds(a).ok and _term_bounds(b).ok)


def _count_paths(monkeypatch):
    """Counts of each path of promote's chunk sums taken (eager calls branch in Python)."""
    taken = {"fast": 0, "scan": 0}
    fast, scan = orders._chunk_sums_fast, orders._chunk_sums

    def counted(name, fn):
        def run(*args):
            taken[name] += 1
            return fn(*args)
        return run

    monkeypatch.setattr(orders, "_chunk_sums_fast", counted("fast", fast))
    monkeypatch.setattr(orders, "_chunk_sums", counted("scan", scan))
    return taken


@pytest.mark.parametrize("policy", PROMOTE)
def test_promote_bit_level_equals_oracle(policy, monkeypatch):
    """With the threshold lowered to one term, each row alone (eager calls: the check decides
    per call) takes the bit-level path where its terms pass the check and the scan where they
    do not (specials, overflow of P, terms below P's quantum): the oracle's bits either way."""
    monkeypatch.setattr(orders, "PROMOTE_FAST_MIN_TERMS", 1)
    taken = _count_paths(monkeypatch)
    pol = Policy.parse(policy)
    emu = Emulator(pol)
    pair = (emu, lambda a, b: (emu.dot(a, b), emu.sum(a)))
    adv = np.asarray(adversarial_rows(pol))
    ra, rb = random_rows(np.random.default_rng(23), 8, 12)
    a, b = np.concatenate([adv, ra]), np.concatenate([np.ones_like(adv), rb])
    for i in range(len(a)):
        check_rows(pol, a[i:i + 1], b[i:i + 1], emulated=pair)
    assert taken["fast"] >= len(a) // 2 and taken["scan"] >= 4, taken  # both paths, each many times (of 2 per row)


@pytest.mark.parametrize("spec", ["promote(14,128)", "promote(14,128,rne)"])
def test_promote_bit_level_at_scale(spec, monkeypatch):
    """A sum of 2^20 terms (the default threshold) under fp32 takes the bit-level path (the
    scan only where a term fails the check) and gives the scan's bits: the chunk sums of
    products of e4m3fn-like and fp32 values, and 2^20 terms with one NaN, which takes the scan."""
    order, A = Order.parse(spec), parse("fp32")
    rng = np.random.default_rng(9)
    rows, n = 2**20 // 512, 512
    assert rows * n >= orders.PROMOTE_FAST_MIN_TERMS
    f32 = lambda v: np.asarray(v, np.float32).astype(np.float64)  # noqa: E731
    x = f32(rng.standard_normal((rows, n)) * 2.0 ** rng.integers(-8, 8, (rows, n))) * f32(rng.standard_normal((rows, n)))
    x[:, ::7] = 0.0
    x[0, :2] = [2.0**20, -(2.0**20)]
    y = x.copy()
    y[1, 3] = math.nan
    taken = _count_paths(monkeypatch)
    fast = [np.asarray(orders._promote(jax.numpy.asarray(v), order, A, Mode.RNE)) for v in (x, y)]
    assert taken == {"fast": 1, "scan": 1}, taken
    monkeypatch.setattr(orders, "PROMOTE_FAST_MIN_TERMS", 2**62)
    scan = [np.asarray(orders._promote(jax.numpy.asarray(v), order, A, Mode.RNE)) for v in (x, y)]
    assert taken == {"fast": 1, "scan": 3}, taken
    for f, s in zip(fast, scan):
        assert np.array_equal(f.view(np.uint64), s.view(np.uint64))
    assert math.isnan(fast[1][1]) and not np.isnan(fast[1][np.arange(rows) != 1]).any()
    for i in (0, 2, rows - 1):  # and the oracle's running sum (before the final rounding: to A itself)
        want = promote_oracle([Fraction(v) for v in x[i]], order.bits, order.block, order.rounding.value, A, A, "rne")
        assert fast[0][i] == want, i
