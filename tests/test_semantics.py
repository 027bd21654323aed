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


def _rows(fmt, d: int, rng) -> np.ndarray:
    """Rows of format values: k ones and d - k zeros for k = 1..15 and d - 1 (means
    k/d: one of them tells ÷ d from ÷ fl(d) apart in every format), and Gaussian values
    rounded to the format."""
    ks = [*range(1, min(d, 16)), d - 1]
    ones = (np.arange(d)[None, :] < np.array(ks)[:, None]).astype(np.float64)
    gauss = np.array([[fraction_round(float(x), fmt, "rne") for x in rng.standard_normal(d)]])
    return np.concatenate([ones, ones * fmt.min_normal, gauss])  # k·2^emin / d: subnormal means


_FORMATS = builtin_formats()


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


@pytest.mark.parametrize("mode", ["rne", "rz", "ru", "rd"])
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
