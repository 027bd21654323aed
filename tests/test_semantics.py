"""Each choice docs/semantics.md makes, pinned against an oracle written from that page.

``Spec`` below is the specification written again with exact rationals: values are
Python floats (every value of a format up to fp64 is one), exact intermediate results
Fractions, every rounding ``fraction_round`` (tests/oracles.py, integer arithmetic),
÷ √ exp by ``mp_op`` (mpmath at 240 bits with a sticky bit, then the same rounding).
It shares no code with the backends. Each test compares the emulated and the
reference backend with it bit for bit (±0 equal: mpmath has no −0), and checks that
the alternative the page rejects gives different bits on the same data, so the test
can tell the two apart.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from collapse_sim.backends import make_backend
from collapse_sim.formats import builtin_formats
from collapse_sim.policy import Policy
from collapse_sim.backends.inputs import AttentionInputs
from collapse_sim.theory import forward_ops, gamma
from oracles import format_values, fraction_round, mp_op


def _same(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return a.shape == b.shape and bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))


class Spec:
    """docs/semantics.md §2-§3 (elementary ops, reductions) with exact rationals."""

    def __init__(self, policy):
        self.pol = Policy.parse(policy)
        self.mode = self.pol.mode.value

    def rnd(self, v, role: str = "compute") -> float:
        """One rounding of an exact value (Fraction) or a float to the role's format."""
        return fraction_round(v, getattr(self.pol, role), self.mode)

    def op(self, name: str, a: float, b: float | None = None, role: str = "compute") -> float:
        fmt = getattr(self.pol, role)
        args = (a,) if b is None else (a, b)
        if all(math.isfinite(x) for x in args) and not (name == "div" and b == 0):
            if name in ("add", "sub", "mul"):  # exact in rationals (the sign of a zero aside)
                x, y = Fraction(a), Fraction(b)
                return fraction_round(x + y if name == "add" else x - y if name == "sub" else x * y, fmt, self.mode)
            return mp_op(name, a, b, fmt, self.mode)
        with np.errstate(all="ignore"):  # IEEE 754 on the special values
            x, y = np.float64(a), np.float64(0.0 if b is None else b)
            v = {"add": x + y, "sub": x - y, "mul": x * y, "div": x / y, "sqrt": np.sqrt(x), "exp": np.exp(x)}[name]
        return fraction_round(float(v), fmt, self.mode)

    def add(self, a, b, role="compute"):
        return self.op("add", a, b, role)

    def sub(self, a, b, role="compute"):
        return self.op("sub", a, b, role)

    def mul(self, a, b, role="compute"):
        return self.op("mul", a, b, role)

    def div(self, a, b, role="compute"):
        return self.op("div", a, b, role)

    # §3 reductions -------------------------------------------------------
    @staticmethod
    def _exact(terms):
        if all(isinstance(t, Fraction) or math.isfinite(t) for t in terms):
            return sum((Fraction(t) for t in terms), Fraction(0))
        return float(np.sum(np.array([float(t) for t in terms])))

    def sum(self, terms, out: str = "compute", valid=None):
        """Terms in the policy's order, accumulating in ``accumulate``, one final rounding to
        ``out``. Terms are format values, or exact products (Fractions) for exact/blocked.
        ``valid``: kahan skips the masked terms (§3.3); other orders add them as zeros."""
        order, acc = self.pol.order, (lambda a, b: self.add(a, b, "accumulate"))
        terms = list(terms)
        if order.kind == "kahan" and valid is not None:
            terms = [t for t, ok in zip(terms, valid) if ok] or [0.0]
        if order.kind == "exact":
            return self.rnd(self._exact(terms), out)
        if order.kind == "blocked":
            b = order.block
            terms = [self.rnd(self._exact(terms[i:i + b]), "accumulate") for i in range(0, len(terms), b)]
            order_kind = "sequential"
        else:
            order_kind = order.kind
        terms = [float(t) for t in terms]
        if order_kind == "sequential":
            s = terms[0]
            for t in terms[1:]:
                s = acc(s, t)
        elif order_kind == "pairwise":
            level = terms + [0.0] * ((1 << max(0, (len(terms) - 1).bit_length())) - len(terms))
            while len(level) > 1:
                level = [acc(level[i], level[i + 1]) for i in range(0, len(level), 2)]
            s = level[0]
        else:  # kahan
            s, c = terms[0], 0.0
            for t in terms[1:]:
                y = self.sub(t, c, "accumulate")
                tt = acc(s, y)
                c = self.sub(self.sub(tt, s, "accumulate"), y, "accumulate")
                s = tt
        return self.rnd(s, out)

    def products(self, a, b):
        """§3.2: exact products, rounded to ``accumulate`` unless the order is exact or blocked."""
        prods = [Fraction(x) * Fraction(y) if math.isfinite(x) and math.isfinite(y) else x * y for x, y in zip(a, b)]
        if self.pol.order.kind in ("exact", "blocked"):
            return prods
        return [self.rnd(p, "accumulate") for p in prods]

    def dot(self, a, b, out: str = "compute", valid=None):
        return self.sum(self.products(a, b), out, valid)

    # §4 norms -------------------------------------------------------------
    def mean(self, row, divisor=None):
        """§4.1: the sum in the policy's order, rounded to compute, divided by the exact d."""
        return self.div(self.sum(row), float(len(row)) if divisor is None else divisor)

    def variance(self, row, mu):
        """§4.2: the mean of the rounded squares of the rounded deviations."""
        xc = [self.sub(x, mu) for x in row]
        return self.mean([self.mul(t, t) for t in xc])

    def norm(self, row, g, b, eps_s, kind="layernorm", order_of_ops="spec", variance="squares"):
        """§4.2 / §4.3 on one row; the keyword arguments name the alternatives the page rejects."""
        if kind == "layernorm":
            mu = self.mean(row)
            xc = [self.sub(x, mu) for x in row]
        else:
            xc = list(row)
        v = self.mean([self.mul(t, t) for t in xc]) if variance == "squares" else self.div(self.dot(xc, xc), float(len(row)))
        sig = self.op("sqrt", self.add(v, eps_s))
        if order_of_ops == "spec":  # ((x − μ) ÷ σ) · g
            y = [self.mul(self.div(t, sig), gk) for t, gk in zip(xc, g)]
        else:  # (x − μ) · g ÷ σ
            y = [self.div(self.mul(t, gk), sig) for t, gk in zip(xc, g)]
        return [self.add(t, bk) for t, bk in zip(y, b)] if kind == "layernorm" else y

    def linear(self, x, w):
        return [[self.dot(list(r), list(w[:, j])) for j in range(w.shape[1])] for r in x]

    # §8 attention -------------------------------------------------------------
    def attention(self, q, k, v, qpos, scale_s, bias=None, window=None, self_kv=None,
                  window_zeros="in_place", bias_after_scale=True, probe_key="own"):
        """§8.1-§8.4 for each query row. ``bias(dist)``: the ALiBi bias as a storage value.
        Alternatives: ``window_zeros="dropped"`` (reduce over the window's keys only),
        ``bias_after_scale=False``, ``probe_key="stream"`` (the stream's key at n+1)."""
        out = []
        for i, p in enumerate(qpos):
            cols = list(range(p + 1))
            keys = [self_kv[0][i] if (self_kv is not None and j == p and probe_key == "own") else k[j] for j in cols]
            vals = [self_kv[1][i] if (self_kv is not None and j == p and probe_key == "own") else v[j] for j in cols]
            vis = [window is None or j > p - window for j in cols]
            s = []
            for j in cols:
                t = self.dot(q[i], keys[j])
                if bias is not None and not bias_after_scale:
                    t = self.add(t, bias(p - j))
                u = self.mul(t, scale_s)
                if bias is not None and bias_after_scale:
                    u = self.add(u, bias(p - j))
                s.append(self.rnd(u, "softmax"))
            if self.pol.max_subtract:
                m = max(x for x, ok in zip(s, vis) if ok)
                s = [self.sub(x, m, "softmax") for x in s]
            e = [self.op("exp", x, role="softmax") if ok else 0.0 for x, ok in zip(s, vis)]
            keep = cols if window_zeros == "in_place" else [j for j in cols if vis[j]]
            ok = [vis[j] for j in keep]
            den = self.sum([e[j] for j in keep], "softmax", valid=ok)
            alpha = [self.rnd(self.div(e[j], den, "softmax")) for j in keep]
            out.append([self.dot(alpha, [vals[j][c] for j in keep], valid=ok) for c in range(len(q[i]))])
        return out

    def rope(self, x, positions, table, pairs="adjacent"):
        """§8.5: rotate pairs of columns by the storage tables ``table(t, i) -> (C_S, S_S)``;
        ``pairs="halves"`` pairs column i with column i + d_h/2 (the rejected convention)."""
        dh = len(x[0])
        idx = [(2 * i, 2 * i + 1) for i in range(dh // 2)] if pairs == "adjacent" else \
            [(i, i + dh // 2) for i in range(dh // 2)]
        out = []
        for row, t in zip(x, positions):
            r = [0.0] * dh
            for i, (a, b) in enumerate(idx):
                c, sn = table(t, i)
                r[a] = self.sub(self.mul(row[a], c), self.mul(row[b], sn))
                r[b] = self.add(self.mul(row[a], sn), self.mul(row[b], c))
            out.append(r)
        return out


def _rows(fmt, d: int, rng) -> np.ndarray:
    """Rows of format values: d − 1 ones and a zero, and Gaussian values rounded to the
    format. Where the format cannot hold d, also k ones for k = 1..15 and the same times
    2^emin (subnormal means: e5m2 tells ÷ 17 from ÷ 16 only there), so that some row
    tells ÷ d from ÷ fl(d) apart."""
    holds = fraction_round(float(d), fmt, "rne") == d
    ks = [d - 1] if holds else [*range(1, min(d, 16)), d - 1]
    ones = (np.arange(d)[None, :] < np.array(ks)[:, None]).astype(np.float64)
    gauss = np.array([[fraction_round(float(x), fmt, "rne") for x in rng.standard_normal(d)]])
    return np.concatenate([ones, gauss] if holds else [ones, ones * fmt.min_normal, gauss])


_FORMATS = [f for f in builtin_formats() if f.why_not_arithmetic() is None]  # a policy refuses the unsigned ones


@pytest.mark.parametrize("fmt", _FORMATS, ids=[f.name for f in _FORMATS])
def test_mean_and_variance_divide_by_exact_d(fmt):
    """§4.1: mean = RNE_c(RNE_c(Σ x) / d) with d the exact integer, at d = 9, 17, 512, which
    formats cannot all hold (e5m2 holds 9 as 8 and 17 as 16; e4m3fn has no 512: NaN), in
    every built-in format; variance = mean of RNE_c((x − μ)²) (§4.2). The reference and
    the emulated backend against the rational oracle, bit for bit (fp64: reference only;
    the emulator has no carrier for it)."""
    import jax

    spec = Spec(Policy.uniform(fmt))
    rows = [_rows(fmt, d, np.random.default_rng(d)) for d in (9, 17, 512)]
    mu = [[spec.mean(list(r)) for r in x] for x in rows]
    var = [[spec.variance(list(r), m) for r, m in zip(x, ms)] for x, ms in zip(rows, mu)]
    for x, ms in zip(rows, mu):
        d = x.shape[1]
        fl_d = spec.rnd(Fraction(d), "storage")
        if fl_d != d:  # the data tells "÷ d" from "÷ fl(d)" apart, or no sum could
            if _same([spec.mean(list(r), divisor=fl_d) for r in x], ms):
                assert all(spec.div(float(a), d) == spec.div(float(a), fl_d) for a in format_values(fmt))
    kinds = ["reference"] + (["emulated"] if fmt.name != "fp64" else [])
    for kind in kinds:
        B = make_backend(kind, Policy.uniform(fmt))

        def mean_var(xs):
            out = []
            for x in xs:
                m = B.mean(x)
                xc = B.sub(x, B.col(m, like=x))
                out.append((m, B.mean(B.mul(xc, xc))))
            return out

        got = (jax.jit(mean_var) if kind == "emulated" else mean_var)([B.store(x) for x in rows])
        for (m, v), ms, vs in zip(got, mu, var):
            assert _same(B.to_numpy(m), ms), kind
            assert _same(B.to_numpy(v), vs), kind


@pytest.mark.parametrize("mode", ["rne", "rna", "rnz", "rz", "ru", "rd", "ro"])
def test_reference_exp_rounds_out_of_range_arguments_in_the_mode(mode):
    """§2: exp is correctly rounded in every mode, also where it overflows or underflows
    the format: RZ and RD keep the largest finite value, RU the smallest subnormal. The
    reference against mpmath, for arguments beyond float64's exp range and beyond 2^20
    (where the reference skips evaluating exp)."""
    import mpmath.libmp as mlib

    from collapse_sim.backends.reference import Reference

    for name in ("bf16", "e4m3fn", "e2m1fn", "e5m2fnuz"):
        r, spec = Reference(f"compute={name},mode={mode}"), Spec(f"compute={name},mode={mode}")
        args = [8.0, 100.0, 720.0, 2.0**21, -20.0, -100.0, -800.0, -(2.0**21)]
        xs = [r.compute.from_float(a) for a in args]  # the arguments as format values
        got = [mlib.to_float(r.compute.exp(x)) for x in xs]
        assert _same(got, [spec.op("exp", mlib.to_float(x)) for x in xs]), name


def test_relu_is_max_with_zero_on_special_values():
    """§2: relu(x) = max(x, 0) exactly: NaN stays NaN, +inf stays +inf, −inf becomes 0."""
    x = np.array([[np.nan, np.inf, -np.inf, -1.5, 2.0, 0.0]])
    want = [[np.nan, np.inf, 0.0, 0.0, 2.0, 0.0]]
    for kind in ("reference", "emulated"):
        B = make_backend(kind, "bf16")
        assert _same(B.to_numpy(B.relu(B.store(x))), want), kind


# --- §5.7 exact constants ----------------------------------------------------------


def _true(f, prec: int = 700) -> Fraction:
    """A real constant as a Fraction accurate to ~2^-prec (mpmath; for rounding at 256 bits)."""
    import mpmath

    with mpmath.workprec(prec):
        return Fraction(*(int(t) for t in mpmath.mpf(f(mpmath)).as_integer_ratio()))


def test_exact_constants_are_the_real_constants_rounded_once():
    """``exact_constants``: 1/√d_h, ε, ALiBi biases, sinusoidal and RoPE tables are the real
    numbers rounded once to the storage format (256 bits here), against mpmath at 700 bits
    rounded by the rational oracle."""
    import mpmath.libmp as mlib

    from collapse_sim.backends.reference import ExactConstants, ReferenceBackend
    from collapse_sim.model import ModelConfig

    B = ReferenceBackend("256:exact")
    assert B.ref.storage.fmt.p == 256
    ec = ExactConstants(B.ref.storage)

    def val(v):
        return Fraction(*(int(t) for t in mlib.to_rational(v)))

    def rnd(x: Fraction) -> Fraction:
        """Round to nearest even at 256 bits (no exponent limit), with integers."""
        if x == 0:
            return x
        a = abs(x)
        e = a.numerator.bit_length() - a.denominator.bit_length()
        e += 1 if Fraction(2) ** (e + 1) <= a else (-1 if Fraction(2) ** e > a else 0)
        q = Fraction(2) ** (e - 255)
        m, rest = divmod(a / q, 1)
        m += rest > Fraction(1, 2) or (rest == Fraction(1, 2) and m % 2 == 1)
        return (m * q) if x > 0 else -(m * q)

    for dh in (3, 4, 6, 8, 16):
        assert val(ec.inv_sqrt(dh)) == rnd(_true(lambda m: 1 / m.sqrt(dh)))
    assert val(ec.decimal(1e-5)) == rnd(Fraction(1, 100000))
    cfg = ModelConfig(d=6, n_heads=3, pe="alibi", vocab=4)
    n = 5
    got = ec.for_run(cfg, {}, n, probe=True)
    for h, slope in enumerate(2.0 ** (-8.0 * np.arange(1, 4) / 3), start=1):
        for dist in (1, 2, 5):
            want = rnd(-dist * _true(lambda m: m.power(2, m.mpf(-8 * h) / 3)))
            assert val(got[("alibi", float(slope))](dist)) == want
    table = ec.sinusoidal(n, 5)
    for t in range(n):
        for i in range(5):
            f = (lambda m: m.sin(t / m.power(10000, m.mpf(2 * (i // 2)) / 5))) if i % 2 == 0 else \
                (lambda m: m.cos(t / m.power(10000, m.mpf(2 * (i // 2)) / 5)))
            assert val(table[t, i]) == rnd(_true(f))
    cos, sin = ec.rope(np.arange(n) + 1, 4)
    for r in range(n):
        for i in range(2):
            ang = lambda m: (r + 1) * m.power(10000, -m.mpf(2 * i) / 4)  # noqa: E731
            assert val(cos[r, i]) == rnd(_true(lambda m: m.cos(ang(m))))
            assert val(sin[r, i]) == rnd(_true(lambda m: m.sin(ang(m))))


@pytest.mark.parametrize("pe,heads,d", [("sinusoidal", 1, 6), ("rope", 2, 8), ("alibi", 3, 6)])
def test_exact_constants_reach_the_model(pe, heads, d, monkeypatch):
    """``"256:exact"``: the forward uses the exact scale, ε and the exact tables or biases of
    its positional encoding (recorded as the model asks for them), and its outputs move by
    no more than the float64 constants' own error can make them: each is within 2^-52
    relative of its real value, a few units of 2^-52 times the longest chain of ops."""
    from collapse_sim.backends.reference import ExactConstants
    from collapse_sim.model import ModelConfig, forward, init_params

    cfg = ModelConfig(d=d, n_layers=1, n_heads=heads, vocab=4, pe=pe, seed=1, d_ff=4)
    P = init_params(cfg)
    toks = np.array([1, 2, 3, 0, 1, 1])
    plain, exact = make_backend("reference", "256"), make_backend("reference", "256:exact")
    assert exact.exact_constants and exact.label.endswith(":exact")
    ec = ExactConstants(exact.ref.storage)
    used = {"scalars": [], "tables": [], "heads": set()}
    store, scalar, alibi = exact.store, exact._scalar, ExactConstants.alibi

    def alibi_recording(self, h, n_heads):
        bias = alibi(self, h, n_heads)
        return lambda dist: used["heads"].add(h) or bias(dist)

    monkeypatch.setattr(ExactConstants, "alibi", alibi_recording)
    exact.store = lambda x: used["tables"].append(store(x)) or used["tables"][-1]
    exact._scalar = lambda c: used["scalars"].append(scalar(c)) or used["scalars"][-1]
    ya, ypa = (plain.to_numpy(y) for y in forward(P, toks, plain, probe=np.roll(toks, 1)))
    yb, ypb = (plain.to_numpy(y) for y in forward(P, toks, exact, probe=np.roll(toks, 1)))
    assert ec.inv_sqrt(cfg.dh) in used["scalars"] and ec.decimal(cfg.norm_eps) in used["scalars"]

    def has(table):
        return any(t.shape == table.shape and all(a == b for a, b in zip(t.flat, table.flat)) for t in used["tables"])

    if pe == "sinusoidal":
        assert has(ec.sinusoidal(len(toks) + 1, d))
    if pe == "rope":
        for pos in (np.arange(len(toks)), np.arange(len(toks)) + 1):
            assert all(has(t) for t in ec.rope(pos, cfg.dh))
    if pe == "alibi":  # every head's bias came from its exact slope
        assert used["heads"] == set(range(1, heads + 1))
    diff = max(np.max(np.abs(ya - yb)), np.max(np.abs(ypa - ypb)))
    bound = 2 * gamma(forward_ops(len(toks), d), 2.0**-53) * max(np.max(np.abs(ya)), np.max(np.abs(ypa)))
    assert 0 < diff <= bound


# --- §4 norms, §8 attention, §8.5 RoPE: each choice against its alternatives --------


def _store(spec, a):
    """Float64 data rounded to storage (§5.1), as nested lists of floats."""
    return [[spec.rnd(float(x), "storage") for x in row] for row in np.atleast_2d(a)]


def _differs(spec_rows, alt_rows) -> bool:
    return not _same(np.array(spec_rows, dtype=np.float64), np.array(alt_rows, dtype=np.float64))


# ε = 0.1: e5m2 storage holds it as 0.09375, the p = 5 compute format as 0.1015625 (§5.3);
# the fp32 accumulator keeps a dot's products (squares of 5-bit values) exact
NORM_POLICY = "storage=e5m2,compute=(p=5,emax=15),accumulate=fp32,order=pairwise"


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm"])
def test_norm_formula_op_order_variance_and_eps(kind):
    """§4.2/§4.3 through the model's own norm (model._norm) at d = 9: ((x − μ) ÷ σ)·g + b,
    the variance a sum of rounded squares (not a dot, whose products the fp32 accumulator
    keeps exact), ε rounded to storage, the mean ÷ the exact d. Each alternative gives
    other bits on these rows."""
    from collapse_sim.model import ModelConfig, _norm

    d, eps = 9, 0.1
    cfg = ModelConfig(d=d, norm=kind, norm_eps=eps, pe="none", vocab=4)
    rng = np.random.default_rng(9)
    spec = Spec(NORM_POLICY)
    # the norm's input is a compute value (an embedding plus a position, a residual sum):
    # x = ∘(x1 + x2) of two stored arrays; variances ≈ 1 and ≈ ε
    x1, x2 = (rng.standard_normal((16, d)) * np.repeat([1.0, 0.3], 8)[:, None] for _ in range(2))
    x = [[spec.add(a, c) for a, c in zip(r1, r2)] for r1, r2 in zip(_store(spec, x1), _store(spec, x2))]
    g = _store(spec, 1 + 0.5 * rng.standard_normal(d))[0]
    b = _store(spec, 0.25 * rng.standard_normal(d))[0]
    eps_s = spec.rnd(eps, "storage")
    want = [spec.norm(r, g, b, eps_s, kind) for r in x]
    alternatives = {
        "(x-mu)*g/sigma": [spec.norm(r, g, b, eps_s, kind, order_of_ops="g_first") for r in x],
        "variance as a dot": [spec.norm(r, g, b, eps_s, kind, variance="dot") for r in x],
        "eps not rounded to storage": [spec.norm(r, g, b, spec.rnd(eps), kind) for r in x],
    }
    if kind == "layernorm":
        fl_d = spec.rnd(float(d), "storage")
        alternatives["mean / fl(d)"] = [spec.norm(r, g, b, eps_s, kind) for r in x] if fl_d == d else [
            _norm_dividing_by(spec, r, g, b, eps_s, fl_d) for r in x]
    for name, alt in alternatives.items():
        assert _differs(want, alt), name
    for backend in ("reference", "emulated"):
        B = make_backend(backend, NORM_POLICY)
        gain, bias = B.store(np.array(g)), B.store(np.array(b))
        got = B.to_numpy(_norm(cfg, gain, bias, "n1", B.add(B.store(x1), B.store(x2)), B))
        assert _same(got, want), backend


def _norm_dividing_by(spec, row, g, b, eps_s, n):
    """LayerNorm with both means divided by ``n`` (the reference's old divisor ∘_S(d))."""
    mu = spec.mean(row, divisor=n)
    xc = [spec.sub(x, mu) for x in row]
    v = spec.mean([spec.mul(t, t) for t in xc], divisor=n)
    sig = spec.op("sqrt", spec.add(v, eps_s))
    return [spec.add(spec.mul(spec.div(t, sig), gk), bk) for t, gk, bk in zip(xc, g, b)]


ATTN_POLICY = "storage=e5m2,compute=(p=5,emax=15),accumulate=(p=7,emax=30),softmax=(p=6,emax=20),order=pairwise"


@pytest.mark.parametrize("order", ["pairwise", "blocked(2)"])
def test_attention_scale_alibi_window_and_probe(order):
    """§8 through each backend's attention primitive, d_h = 3 (1/√3 inexact), ALiBi with
    H = 3 (slope 2^(-8/3), not a power of two), window 3, N = 8, stream queries and probes:
    the scale is fl64(1/√d_h) rounded to storage and applied after the dot, the bias
    ∘_S(fl64(−m·dist)) added after the scale, masked window columns stay in their places
    (so the bits depend on the absolute position, §3.3), a probe sees its own key and value
    at column n+1. Each alternative gives other bits on the same data."""
    import jax

    pol = ATTN_POLICY.replace("order=pairwise", f"order={order}")
    spec = Spec(pol)
    n, dh, w = 8, 3, 3
    slope = float(2.0 ** (-8 / 3))
    scale = float(1 / np.sqrt(dh))
    rng = np.random.default_rng(5)
    raw = [rng.standard_normal((n, dh)) * 1.5 for _ in range(5)]
    q, k, v, kp, vp = (_store(spec, a) for a in raw)

    def bias(dist):
        return spec.rnd(float(-slope * dist), "storage")

    sc = spec.rnd(scale, "storage")
    pos = list(range(n))
    want = spec.attention(q, k, v, pos, sc, bias, w)
    want_p = spec.attention(q, k, v, [p + 1 for p in pos], sc, bias, w, self_kv=(kp, vp))
    alternatives = {
        "scale not rounded to storage": spec.attention(q, k, v, pos, scale, bias, w),
        "bias before the scale": spec.attention(q, k, v, pos, sc, bias, w, bias_after_scale=False),
        "bias not rounded to storage": spec.attention(q, k, v, pos, sc, lambda t: -slope * t, w),
        "window columns dropped": spec.attention(q, k, v, pos, sc, bias, w, window_zeros="dropped"),
    }
    for name, alt in alternatives.items():
        assert _differs(want, alt), name
    stream_key = spec.attention(q, k, v, [p + 1 for p in pos[:-1]], sc, bias, w, self_kv=(kp, vp), probe_key="stream")
    assert _differs(want_p[:-1], stream_key)
    # the emulated blocked orders compile a certified path (~20 s); their equality with the
    # reference under a window is test_model.py::test_emulated_equals_reference_bit_for_bit
    for backend in ("reference", "emulated") if order == "pairwise" else ("reference",):
        B = make_backend(backend, pol)
        Q, K, V, KP, VP = (B.store(a) for a in raw)

        def both(Q, K, V, KP, VP):
            return (B.attention(AttentionInputs(Q, K, V, np.arange(n), scale, alibi=slope, window=w)),
                    B.attention(AttentionInputs(Q, K, V, np.arange(n) + 1, scale, alibi=slope, window=w,
                                                self_kv=(KP, VP))))

        o, op = (jax.jit(both) if backend == "emulated" else both)(Q, K, V, KP, VP)
        assert _same(B.to_numpy(o), want), backend
        assert _same(B.to_numpy(op), want_p), backend


ROPE_POLICY = "storage=e5m2,compute=bf16,accumulate=fp32,order=pairwise"


def test_rope_formula():
    """§5.5/§8.5 through the model's own rotation (model._rope), d_h = 8, positions 0..7
    and 1..8 (a probe's): adjacent pairs (x[2i], x[2i+1]), frequencies 10000^(−2i/d_h) as a
    float64 power, angle the float64 product t·inv, numpy cos/sin rounded to storage (e5m2
    here, far coarser than the bf16 compute), every product rounded. Pairing the halves or
    unrounded tables give other bits."""
    import jax

    from collapse_sim.model import _rope

    spec = Spec(ROPE_POLICY)
    dh, n = 8, 8
    rng = np.random.default_rng(8)
    raw = rng.standard_normal((n, dh))
    x = _store(spec, raw)

    def table(rounded=True):
        def f(t, i):
            ang = t * 10000.0 ** (-2 * i / dh)
            c, s = math.cos(ang), math.sin(ang)
            return (spec.rnd(c, "storage"), spec.rnd(s, "storage")) if rounded else (c, s)
        return f

    for pos in (list(range(n)), list(range(1, n + 1))):
        want = spec.rope(x, pos, table())
        assert _differs(want, spec.rope(x, pos, table(), pairs="halves"))
        assert _differs(want, spec.rope(x, pos, table(rounded=False)))
        for backend in ("reference", "emulated"):
            B = make_backend(backend, ROPE_POLICY)
            run = (lambda X: _rope(X, np.array(pos), B))
            got = (jax.jit(run) if backend == "emulated" else run)(B.store(raw))
            assert _same(B.to_numpy(got), want), backend


# --- the whole model (§5-§10) ----------------------------------------------------------


def spec_forward(spec: Spec, P, toks, probe):
    """§5-§10 for one layer, written from the page: sinusoidal or learned positions in the
    residual stream or the scores, norms, heads, projections, the MLP, probes."""
    c = P.config
    n = len(toks)
    st = {k: [[spec.rnd(float(x), "storage") for x in np.atleast_1d(r)] for r in np.atleast_2d(a)]
          for k, a in P.arrays.items()}
    vec = {k: v[0] for k, v in st.items() if np.ndim(P.arrays[k]) == 1}
    pe = None
    if c.pe == "sinusoidal":  # §5.4, float64 as written there
        pe = [[spec.rnd(math.sin(t / 10000.0 ** (2 * (i // 2) / c.d)) if i % 2 == 0 else
                        math.cos(t / 10000.0 ** (2 * (i // 2) / c.d)), "storage") for i in range(c.d)]
              for t in range(n + 1)]
    elif c.pe == "learned":
        pe = st["pos"][: n + 1]
    add_rows = lambda a, b: [[spec.add(x, y) for x, y in zip(r, s)] for r, s in zip(a, b)]  # noqa: E731
    x = [st["embed"][t] for t in toks]
    xp = [st["embed"][t] for t in probe]
    pe_s, pe_p = (pe[:n], pe[1:n + 1]) if pe else (None, None)
    if pe and c.ape == "residual":
        x, xp = add_rows(x, pe_s), add_rows(xp, pe_p)

    def norm(rows, name):
        if c.norm == "none":
            return rows
        g, b = vec[name + "_g"], vec.get(name + "_b")
        eps = spec.rnd(c.norm_eps, "storage")
        return [spec.norm(r, g, b, eps, c.norm) for r in rows]

    def proj(rows, name):
        key = "l0." + name
        return spec.linear(rows, np.array(st[key])) if key in st else rows

    h, hp = norm(x, "l0.n1"), norm(xp, "l0.n1")
    hqk, hqkp = (add_rows(h, pe_s), add_rows(hp, pe_p)) if (pe and c.ape == "scores") else (h, hp)
    q, k, v = proj(hqk, "wq"), proj(hqk, "wk"), proj(h, "wv")
    qp, kp, vp = proj(hqkp, "wq"), proj(hqkp, "wk"), proj(hp, "wv")
    sc = spec.rnd(float(1 / np.sqrt(c.dh)), "storage")
    heads, heads_p = [], []
    for hd in range(c.n_heads):
        cut = lambda rows: [r[hd * c.dh:(hd + 1) * c.dh] for r in rows]  # noqa: E731
        heads.append(spec.attention(cut(q), cut(k), cut(v), list(range(n)), sc, None, c.window))
        heads_p.append(spec.attention(cut(qp), cut(k), cut(v), list(range(1, n + 1)), sc, None, c.window,
                                      self_kv=(cut(kp), cut(vp))))
    cat = lambda hs: [sum((hh[i] for hh in hs), []) for i in range(n)]  # noqa: E731
    z, zp = add_rows(proj(cat(heads), "wo"), x), add_rows(proj(cat(heads_p), "wo"), xp)

    def mlp(u):
        if not c.d_ff:
            return u
        f1 = proj(norm(u, "l0.n2"), "w1")
        f = [[max(spec.add(a, b), 0.0) for a, b in zip(r, vec["l0.b1"])] for r in f1]
        f2 = proj(f, "w2")
        return add_rows([[spec.add(a, b) for a, b in zip(r, vec["l0.b2"])] for r in f2], u)

    return norm(mlp(z), "n3"), norm(mlp(zp), "n3")


FORWARD_POLICY = "storage=bf16,compute=(p=6,emax=20),accumulate=(p=9,emax=40),order=pairwise"


@pytest.mark.parametrize("cfg", [
    dict(d=6, n_heads=2, pe="sinusoidal", ape="scores", d_ff=4, out_proj=True),
    dict(d=5, pe="sinusoidal", norm="rmsnorm", window=2, value_proj=False),
    dict(d=4, pe="learned", max_len=8, d_ff=3, norm_eps=0.05),
], ids=["sinusoidal-scores-heads-mlp", "sinusoidal-residual-rmsnorm-window", "learned-mlp"])
def test_forward_equals_spec_oracle(cfg):
    """One layer, N = 6, a probe after every prefix: the emulated and reference forwards equal
    the oracle written from §5-§10, bit for bit (odd d: the last sinusoidal column a sine)."""
    from collapse_sim.model import ModelConfig, forward, init_params

    P = init_params(ModelConfig(n_layers=1, vocab=4, seed=2, **cfg))
    rng = np.random.default_rng(3)
    for name, a in P.arrays.items():  # gains 1 and biases 0 would hide where they enter
        if a.ndim == 1:
            P.arrays[name] = a + 0.3 * rng.standard_normal(a.shape)
    toks = np.array([1, 2, 3, 0, 1, 1])
    probe = np.array([2, 0, 1, 1, 3, 1])
    want, want_p = spec_forward(Spec(FORWARD_POLICY), P, toks, probe)
    for backend in ("reference", "emulated"):
        B = make_backend(backend, FORWARD_POLICY)
        y, yp = forward(P, toks, B, probe=probe)
        assert _same(B.to_numpy(y), want), backend
        assert _same(B.to_numpy(yp), want_p), backend


def test_emulated_exp_beyond_float64_range_in_directed_modes():
    """§2 asks for exp correctly rounded in every mode, also where float64's exp over- or
    underflows (RZ/RD: the largest finite value, not inf; RU: the smallest subnormal, not 0):
    the emulated exp marks float64's result inexact first (backends/emulated/ops.py)."""
    import jax.numpy as jnp

    from collapse_sim.backends.emulated import Emulator

    for mode, a in (("rz", 720.0), ("rd", 720.0), ("ru", -720.0)):
        pol = f"compute=bf16,mode={mode}"
        assert _same(float(Emulator(pol).exp(jnp.float64(a))), Spec(pol).op("exp", a)), mode
