"""Correctly rounded scalar arithmetic in mpmath: the reference's ops (docs/semantics.md §2)
and reduction orders, accumulator models and dot products (§3.1, §3.2, §3.4), on mpmath
mpf tuples.

Every elementary op is evaluated exactly (+ − ×) or at ``2p + 64`` bits truncated,
with a sticky bit when the truncation lost something (÷ √ exp exp2 ln: the result is then
round-to-odd, which rounds on to ``p`` bits exactly as the exact value would), and is
then rounded to the format with integer arithmetic, including its exponent range
(gradual underflow, overflow policy).
"""

from __future__ import annotations

import mpmath.libmp as mlib
import numpy as np

from ...formats import Format
from ...policy import Order, Policy, StochasticRoundingError
from ...rounding import Mode, Stochastic

# mpmath has no signed zero: the reference's zeros are all +0, and comparisons
# with the other backends treat -0 and +0 as equal.
_NZERO = mlib.fzero


def wide_format(prec: int, name: str | None = None) -> Format:
    """A format of ``prec`` bits with an exponent range no computation here reaches."""
    return Format(name or f"mp{prec}", prec, -(2**40), 2**40)


class RefArith:
    """Correctly rounded scalar arithmetic in one format, on mpmath mpf tuples."""

    def __init__(self, fmt: Format, mode: Mode = Mode.RNE):
        if mode is Mode.SR or isinstance(mode, Stochastic):
            raise StochasticRoundingError(f"the reference backend rounds deterministically and does not run {mode.value}; "
                                          "run it in the emulated backend (collapse --backend emulated; from Python, "
                                          "make_backend('emulated', policy) or round_to(..., key=...))")
        self.fmt = fmt
        self.mode = mode
        self.work = 2 * fmt.p + 64

    # -- rounding of an exact (or round-to-odd) value ---------------------
    def round(self, v):
        """Round an mpf tuple (exact value) to the format."""
        fmt, mode = self.fmt, self.mode
        if v in (mlib.fnan,):
            return mlib.fnan
        if v in (mlib.finf, mlib.fninf):
            neg = v == mlib.fninf
            big = {"inf": mlib.finf, "nan": mlib.fnan, "saturate": self._max()}[fmt.overflow]
            return mlib.mpf_neg(big) if (neg and big != mlib.fnan) else big
        sign, man, exp, bc = v
        if man == 0:
            return mlib.fzero if (sign == 0 or not fmt.signed_zero) else _NZERO
        e = exp + bc - 1
        qexp = (max(e, fmt.emin) if fmt.subnormals else e) - fmt.p + 1
        d = qexp - exp
        if d <= 0:
            q, qexp = man, exp  # already on the format's grid
        else:
            q = man >> d
            rem = man - (q << d)
            inexact = rem != 0
            half = 1 << (d - 1)
            if mode is Mode.RNE:
                up = rem > half or (rem == half and q & 1)
            elif mode is Mode.RNA:
                up = rem >= half
            elif mode is Mode.RNZ:
                up = rem > half
            elif mode is Mode.RO:
                up = inexact and not q & 1
            elif mode is Mode.RZ:
                up = False
            elif mode is Mode.RU:
                up = inexact and not sign
            else:
                up = inexact and bool(sign)
            q += int(up)
        over = _gt(q, qexp, fmt.top_significand, fmt.emax - fmt.p + 1)
        if over:
            away = mode.overflows_away(bool(sign))
            big = {"inf": mlib.finf, "nan": mlib.fnan, "saturate": self._max()}[fmt.overflow] if away else self._max()
            return mlib.mpf_neg(big) if (sign and big != mlib.fnan) else big
        if not fmt.subnormals and q != 0 and _gt(1, fmt.emin, q, qexp):
            q = 0
        if q == 0:
            return _NZERO if (sign and fmt.signed_zero) else mlib.fzero
        return mlib.from_man_exp(-q if sign else q, qexp)

    def _max(self):
        return mlib.from_man_exp(self.fmt.top_significand, self.fmt.emax - self.fmt.p + 1)

    def _sticky(self, r, exact: bool):
        """``r`` (truncated to ``work`` bits) with a sticky bit below its ``work``-th bit when
        the truncation lost something. mpmath strips trailing zeros, so the bit goes below
        the working precision, not below ``r``'s last set bit (``e^(2^-100)`` truncates to 1,
        whose next bit would otherwise make it 1.5)."""
        if exact or r[1] == 0:
            return r
        sign, man, exp, bc = r
        shift = max(self.work + 1 - bc, 1)
        m = (man << shift) | 1
        return mlib.from_man_exp(-m if sign else m, exp - shift)

    # -- elementary ops -----------------------------------------------------
    def from_float(self, x: float):
        return self.round(mlib.from_float(float(x)))

    def add(self, a, b):
        if self._special(a, b):
            return self.round(mlib.mpf_add(a, b, 53))
        r = mlib.mpf_add(a, b, 0)  # exact
        if r == mlib.fzero:
            return self._zero_sum(a, b)
        return self.round(r)

    def sub(self, a, b):
        return self.add(a, mlib.mpf_neg(b))

    def mul(self, a, b):
        if self._special(a, b):
            return self.round(mlib.mpf_mul(a, b, 53))
        r = mlib.mpf_mul(a, b, 0)
        if r == mlib.fzero:
            neg = _is_neg(a) != _is_neg(b)
            return _NZERO if (neg and self.fmt.signed_zero) else mlib.fzero
        return self.round(r)

    def div(self, a, b):
        if self._special(a, b) or b in (mlib.fzero, _NZERO):
            return self.round(mlib.mpf_div(a, b, 53)) if b[1] != 0 or self._special(a, b) else self._div0(a, b)
        if a[1] == 0:
            neg = _is_neg(a) != _is_neg(b)
            return _NZERO if (neg and self.fmt.signed_zero) else mlib.fzero
        r = mlib.mpf_div(a, b, self.work, "d")
        return self.round(self._sticky(r, mlib.mpf_mul(r, b, 0) == a))

    def _div0(self, a, b):
        if a[1] == 0 or a == mlib.fnan:
            return mlib.fnan
        neg = _is_neg(a) != _is_neg(b)
        return self.round(mlib.fninf if neg else mlib.finf)

    def sqrt(self, a):
        if a[1] == 0 or self._special(a, a):
            return a if a != mlib.fninf else mlib.fnan
        if a[0]:
            return mlib.fnan
        r = mlib.mpf_sqrt(a, self.work, "d")
        return self.round(self._sticky(r, mlib.mpf_mul(r, r, 0) == a))

    def exp(self, a):
        return self._exp_base(a, base2=False)

    def exp2(self, a):
        """``∘(2^a)``: exact for an integer ``a``; otherwise ``2^a`` is irrational and is
        taken as ``2^n · e^(f·ln 2)`` (``a = n + f``, ``0 < f < 1``) at ``2p + 64`` bits,
        ``f·ln 2`` with 32 guard bits, truncated with a sticky bit like :meth:`exp`."""
        return self._exp_base(a, base2=True)

    def _exp_base(self, a, base2: bool):
        if a == mlib.fninf:
            return mlib.fzero
        if self._special(a, a):
            return self.round(a)
        if a[1] == 0:
            return self.round(mlib.fone)
        # Arguments whose exp surely overflows or underflows the format: a stand-in on the
        # same side of the range, rounded in the policy's mode like the true value would be
        # (RZ keeps the largest finite value, RU the smallest subnormal), without
        # evaluating exp of a huge argument. ln 2 < 0.7, so e^a > 2^(a/0.7) for a > 0 and
        # e^a < 2^(a/0.7) for a < 0; 2^a needs no factor.
        fmt = self.fmt
        num = 10 if base2 else 7
        if mlib.mpf_gt(a, mlib.from_rational(num * (fmt.emax + 2), 10, 64, "u")):
            return self.round(mlib.from_man_exp(1, fmt.emax + 2))
        if mlib.mpf_lt(a, mlib.from_rational(num * (fmt.emin - fmt.p - 2), 10, 64, "d")):
            return self.round(mlib.from_man_exp(1, fmt.emin - fmt.p - 2))
        if not base2:
            return self.round(self._sticky(mlib.mpf_exp(a, self.work, "d"), False))
        n = int(mlib.to_int(a, "f"))  # floor
        f = mlib.mpf_sub(a, mlib.from_int(n), 0)  # exact, 0 <= f < 1
        if f == mlib.fzero:
            return self.round(mlib.from_man_exp(1, n))
        g = self.work + 32
        r = mlib.mpf_exp(mlib.mpf_mul(f, mlib.mpf_ln2(g), g), self.work, "d")
        return self.round(self._sticky(mlib.mpf_shift(r, n), False))

    def ln(self, a):
        """``∘(ln a)`` (docs/semantics.md §2): ``ln 1 = 0`` exactly; for any other finite
        ``a > 0`` the logarithm is irrational and is taken at ``2p + 64`` bits, truncated with
        a sticky bit like :meth:`exp`. ``ln 0 = -inf`` and ``ln(+inf) = +inf`` (then rounded:
        the format's overflow value), NaN for ``a < 0`` and NaN."""
        if a == mlib.finf:
            return self.round(a)
        if a[1] == 0 and a not in (mlib.fnan, mlib.fninf):  # a zero
            return self.round(mlib.fninf)
        if a[1] == 0 or a[0]:  # NaN, -inf, a < 0
            return mlib.fnan
        if a == mlib.fone:
            return mlib.fzero
        return self.round(self._sticky(mlib.mpf_log(a, self.work, "d"), False))

    def max(self, a, b):
        if a == mlib.fnan or b == mlib.fnan:
            return mlib.fnan
        return a if mlib.mpf_ge(a, b) else b

    def _special(self, a, b):
        return a in (mlib.finf, mlib.fninf, mlib.fnan) or b in (mlib.finf, mlib.fninf, mlib.fnan)

    def _zero_sum(self, a, b):
        if self.mode is Mode.RD:
            return mlib.fzero if (a == mlib.fzero and b == mlib.fzero) else (_NZERO if self.fmt.signed_zero else mlib.fzero)
        if a == _NZERO and b == _NZERO and self.fmt.signed_zero:
            return _NZERO
        return mlib.fzero


def times_log2e(x: float, prec: int):
    """``x·log2(e)`` for a float64 ``x``, rounded to odd at ``prec`` bits (an mpf tuple): the
    flash2 kernel's folded constants (docs/semantics.md §8.8.1). Its rounding to any format of
    at most ``prec - 2`` bits, in any mode, is that of the exact product (round to odd keeps
    the side of every coarser rounding boundary); the product is irrational for ``x != 0``."""
    a = mlib.from_float(float(x))
    if a[1] == 0:
        return mlib.fzero
    g = prec + 64
    r = mlib.mpf_mul(a, mlib.mpf_div(mlib.fone, mlib.mpf_ln2(g), g), prec, "d")  # toward zero
    sign, man, exp, bc = r
    shift = max(prec - bc, 0)  # mpmath strips trailing zeros: the last bit is the prec-th
    m = (man << shift) | 1
    return mlib.from_man_exp(-m if sign else m, exp - shift)


def _is_neg(v) -> bool:
    return bool(v[0])


def _gt(m1: int, e1: int, m2: int, e2: int) -> bool:
    """m1 * 2**e1 > m2 * 2**e2 for non-negative integers."""
    if m1 == 0 or m2 == 0:
        return m1 > 0 and m2 == 0
    t1, t2 = m1.bit_length() + e1, m2.bit_length() + e2  # magnitudes in [2^(t-1), 2^t)
    if t1 != t2:
        return t1 > t2
    e = min(e1, e2)
    return (m1 << (e1 - e)) > (m2 << (e2 - e))


# --------------------------------------------------------------------------
# Reductions in the orders of collapse_sim.policy.Order.


def ref_sum(terms: list, order: Order, acc: RefArith, out: RefArith, exact_prods: list | None = None):
    """Sum ``terms`` (format values, or exact values for the orders with exact products,
    :attr:`Order.exact_products`) in ``order`` (docs/semantics.md §3.1, §3.4)."""
    if not terms:
        return mlib.fzero
    if order.kind == "sequential":
        s = terms[0]
        for t in terms[1:]:
            s = acc.add(s, t)
    elif order.kind == "pairwise":
        size = 1
        while size < len(terms):
            size *= 2
        level = list(terms) + [mlib.fzero] * (size - len(terms))
        while len(level) > 1:
            level = [acc.add(level[i], level[i + 1]) for i in range(0, len(level), 2)]
        s = level[0]
    elif order.kind == "kahan":
        s, c = terms[0], mlib.fzero
        for t in terms[1:]:
            y = acc.sub(t, c)
            tt = acc.add(s, y)
            c = acc.sub(acc.sub(tt, s), y)
            s = tt
    elif order.kind == "exact":
        return out.round(_exact_total(terms))
    elif order.kind == "blocked":
        b = order.block
        blocks = [acc.round(_exact_total(terms[i:i + b])) for i in range(0, len(terms), b)]
        s = blocks[0]
        for t in blocks[1:]:
            s = acc.add(s, t)
    elif order.kind == "tcfma":
        s = _tcfma(terms, order.block, order.bits, RefArith(acc.fmt, order.rounding))
    elif order.kind == "promote":
        short = RefArith(order.chunk_format(acc.fmt), order.rounding)
        s = mlib.fzero
        for i in range(0, len(terms), order.block):
            c = mlib.fzero
            for t in terms[i:i + order.block]:
                c = short.add(c, t)
            s = acc.add(s, c)
    else:  # pragma: no cover
        raise ValueError(order)
    return out.round(s)


def _tcfma(terms, k: int, t: int, step: RefArith):
    """The ``tcfma(k,t,r)`` running sum (docs/semantics.md §3.4.1): per block of ``k`` terms,
    the running sum and the block aligned to their largest exponent E, truncated toward zero
    below 2^(E - t), added exactly and rounded by ``step`` (the accumulate format in r)."""
    s = mlib.fzero
    for i in range(0, len(terms), k):
        block = terms[i:i + k]
        if all(x == mlib.fzero for x in block):
            continue  # a block of zeros leaves the sum as it is
        group = [s, *block]
        if any(x in (mlib.finf, mlib.fninf, mlib.fnan) for x in group):
            s = step.round(_exact_total(group))
            continue
        E = max(x[2] + x[3] - 1 for x in group if x != mlib.fzero)
        q = E - t
        total = mlib.fzero
        for sign, man, exp, _ in (x for x in group if x != mlib.fzero):
            if exp < q:
                man, exp = man >> (q - exp), q  # toward zero: the magnitude's bits below 2^q dropped
            total = mlib.mpf_add(total, mlib.from_man_exp(-man if sign else man, exp), 0)
        s = step.round(total)
    return s


def _exact_total(terms):
    if any(t in (mlib.finf, mlib.fninf, mlib.fnan) for t in terms):
        s = mlib.fzero
        for t in terms:
            s = mlib.mpf_add(s, t, 53)
        return s
    s = mlib.fzero
    for t in terms:
        s = mlib.mpf_add(s, t, 0)
    return s


class Reference:
    """Arithmetic of a :class:`Policy` in mpmath, op for op like the emulator.

    ``Reference(policy)`` follows the policy's formats and exponent ranges;
    ``Reference.at_precision(256)`` is a high-precision oracle with an
    unreachable exponent range.
    """

    def __init__(self, policy: "Policy | str"):
        self.policy = Policy.parse(policy)
        m = self.policy.mode
        self.storage = RefArith(self.policy.storage, m)
        self.compute = RefArith(self.policy.compute, m)
        self.accumulate = RefArith(self.policy.accumulate, m)
        self.softmax = RefArith(self.policy.softmax, m)

    @classmethod
    def at_precision(cls, prec: int, order: "Order | str" = "pairwise") -> "Reference":
        return cls(Policy.uniform(wide_format(prec), order))

    def arith(self, role: str = "compute") -> RefArith:
        return getattr(self, role)

    def store(self, x) -> np.ndarray:
        """A float array → object array of mpf tuples in the storage format."""
        x = np.asarray(x, dtype=np.float64)
        out = np.empty(x.shape, dtype=object)
        for idx, v in np.ndenumerate(x):
            out[idx] = self.storage.from_float(v)
        return out

    def sum(self, terms, order: Order | None = None, out_role: str = "compute"):
        return ref_sum(list(terms), order or self.policy.order, self.accumulate, self.arith(out_role))

    def dot(self, a, b, order: Order | None = None, out_role: str = "compute"):
        order = order or self.policy.order
        prods = [mlib.mpf_mul(x, y, 0) for x, y in zip(a, b)]
        if not order.exact_products:
            prods = [self.accumulate.round(p) for p in prods]
        return ref_sum(prods, order, self.accumulate, self.arith(out_role))


def to_float(a) -> np.ndarray:
    """Object array of mpf tuples → float64 array (exact for formats within float64)."""
    a = np.asarray(a, dtype=object)
    out = np.empty(a.shape, dtype=np.float64)
    for idx, v in np.ndenumerate(a):
        out[idx] = mlib.to_float(v)
    return out
