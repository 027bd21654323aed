"""The mpmath reference: the same ops in the same order, at any precision.

Numbers are mpmath ``mpf`` values held in numpy object arrays. Every
elementary op is evaluated exactly (+ − ×) or at ``2p + 64`` bits truncated,
with a sticky bit when the truncation lost something (÷ √ exp: the result is
then round-to-odd, which rounds on to ``p`` bits exactly as the exact value
would), and is then rounded to the format with integer arithmetic, including
its exponent range (gradual underflow, overflow policy). At ``prec=256`` with
a huge range it is ground truth for the emulated and native backends; at the
precision and range of a format it must agree with the emulated backend bit
for bit (tests/test_model.py, tests/test_semantics.py).

mpmath has no negative zero, so signs of zeros are not modelled here.
This path is written for clarity, not speed: Python loops over mpf values.

What it computes is specified in docs/semantics.md: :class:`RefArith` the
elementary ops (§2), :func:`ref_sum` and :meth:`Reference.dot` the reduction
orders and dot products (§3.1, §3.2), :class:`ReferenceBackend` the mean and norms
(§4), the constants (§5; :class:`ExactConstants` for §5.7), linear layers (§7),
attention with masked columns, windows and probes (§3.3, §8, §10); at a precision
in bits it is the ground truth of §11.
"""

from __future__ import annotations

from fractions import Fraction

import mpmath
import mpmath.libmp as mlib
import numpy as np

from ..formats import Format
from ..policy import Order, Policy
from ..rounding import Mode
from ._hooks import AnalysisHooks

# mpmath has no signed zero: the reference's zeros are all +0, and comparisons
# with the other backends treat -0 and +0 as equal.
_NZERO = mlib.fzero


def wide_format(prec: int, name: str | None = None) -> Format:
    """A format of ``prec`` bits with an exponent range no computation here reaches."""
    return Format(name or f"mp{prec}", prec, -(2**40), 2**40)


class RefArith:
    """Correctly rounded scalar arithmetic in one format, on mpmath mpf tuples."""

    def __init__(self, fmt: Format, mode: Mode = Mode.RNE):
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
            elif mode is Mode.RZ:
                up = False
            elif mode is Mode.RU:
                up = inexact and not sign
            else:
                up = inexact and bool(sign)
            q += int(up)
        over = _gt(q, qexp, fmt.top_significand, fmt.emax - fmt.p + 1)
        if over:
            away = mode is Mode.RNE or (mode is Mode.RU and not sign) or (mode is Mode.RD and sign)
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
        if exact or r[1] == 0:
            return r
        sign, man, exp, _ = r
        m = (man << 1) | 1
        return mlib.from_man_exp(-m if sign else m, exp - 1)

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
        # e^a < 2^(a/0.7) for a < 0.
        fmt = self.fmt
        if mlib.mpf_gt(a, mlib.from_rational(7 * (fmt.emax + 2), 10, 64, "u")):
            return self.round(mlib.from_man_exp(1, fmt.emax + 2))
        if mlib.mpf_lt(a, mlib.from_rational(7 * (fmt.emin - fmt.p - 2), 10, 64, "d")):
            return self.round(mlib.from_man_exp(1, fmt.emin - fmt.p - 2))
        r = mlib.mpf_exp(a, self.work, "d")
        return self.round(self._sticky(r, False))

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
    """Sum ``terms`` (format values, or exact values for blocked/exact) in ``order``."""
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
    else:  # pragma: no cover
        raise ValueError(order)
    return out.round(s)


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
        if order.kind not in ("exact", "blocked"):
            prods = [self.accumulate.round(p) for p in prods]
        return ref_sum(prods, order, self.accumulate, self.arith(out_role))


def to_float(a) -> np.ndarray:
    """Object array of mpf tuples → float64 array (exact for formats within float64)."""
    a = np.asarray(a, dtype=object)
    out = np.empty(a.shape, dtype=np.float64)
    for idx, v in np.ndenumerate(a):
        out[idx] = mlib.to_float(v)
    return out


def to_mpf(a) -> np.ndarray:
    """Object array of mpf tuples → object array of mpmath.mpf (for printing / mpmath math)."""
    a = np.asarray(a, dtype=object)
    out = np.empty(a.shape, dtype=object)
    for idx, v in np.ndenumerate(a):
        out[idx] = mpmath.mpf(v)
    return out




class ObjectArrayBackend(AnalysisHooks):
    """Array plumbing of the Python-number backends (numpy object arrays, run eagerly).
    Subclasses set the element-wise ufuncs ``_add _sub _mul _div _sqrt``."""

    def add(self, a, b):
        return self._add(a, b)

    def sub(self, a, b):
        return self._sub(a, b)

    def mul(self, a, b):
        return self._mul(a, b)

    def div(self, a, b):
        return self._div(a, b)

    def sqrt(self, a):
        return self._sqrt(a)

    def run(self, fn, config, arrays, tokens, probe):
        return fn(config, arrays, np.asarray(tokens), None if probe is None else np.asarray(probe), self)

    def take(self, table, idx):
        return table[np.asarray(idx)]

    def col(self, v, like):
        return np.broadcast_to(v[:, None], like.shape)

    def row(self, v, like):
        return np.broadcast_to(v[None, :], like.shape)

    def cols(self, x, sl):
        return x[:, sl]

    def ncols(self, x):
        return x.shape[1]

    def concat_cols(self, xs):
        return np.concatenate(xs, axis=1)

    def interleave_cols(self, a, b):
        return np.stack([a, b], axis=-1).reshape(a.shape[0], -1)


def _relu(v):
    """max(v, 0), exact (docs/semantics.md §2): NaN stays NaN, +inf stays +inf (both have a
    zero mantissa in mpmath's tuples, like the zero they are not)."""
    if v in (mlib.fnan, mlib.finf):
        return v
    return v if (v[1] != 0 and not v[0]) else mlib.fzero


class ReferenceBackend(ObjectArrayBackend):
    """Model primitives in mpmath, in the emulated backend's exact order.

    ``ReferenceBackend("256")`` (digits only: a precision in bits) is a
    high-precision oracle with an unreachable exponent range;
    ``ReferenceBackend("compute=bf16,order=pairwise")`` follows a policy and
    must equal the emulated backend bit for bit. Arrays are numpy object arrays
    of mpf tuples. Signs of zeros are not modelled (mpmath has no -0).

    The model's constants are float64 numbers (docs/semantics.md §5): 1/√d_h as
    ``1/np.sqrt(d_h)``, ε as the float64 nearest the config's value, numpy's sin/cos
    tables, ALiBi biases as float64 products, each rounded to the storage format.
    ``exact_constants=True`` (or the spec suffix ``":exact"``: ``"256:exact"``,
    ``"bf16:exact"``) replaces each by the correct rounding to the storage format
    of its real-number definition (§5.7): what "ground truth" should mean for
    questions about the constants themselves.
    """

    kind = "reference"

    def __init__(self, spec: "str | Policy", *, exact_constants: bool = False):
        if isinstance(spec, str) and spec.strip().lower().endswith(":exact"):
            spec, exact_constants = spec.strip()[: -len(":exact")], True
        if isinstance(spec, str) and spec.strip().isdigit():
            self.ref = Reference.at_precision(int(spec))
            self.label = f"reference:mp{int(spec)}"
        else:
            self.ref = Reference(spec)
            self.label = f"reference:{self.ref.policy}"
        self.exact_constants = bool(exact_constants)
        if self.exact_constants:
            self.label += ":exact"
        self._exact: dict = {}  # float64 constant (a float, or a table's (shape, bytes)) -> its exact value
        self.policy = self.ref.policy
        c = self.ref.compute
        self._add = np.frompyfunc(c.add, 2, 1)
        self._sub = np.frompyfunc(c.sub, 2, 1)
        self._mul = np.frompyfunc(c.mul, 2, 1)
        self._div = np.frompyfunc(c.div, 2, 1)
        self._sqrt = np.frompyfunc(c.sqrt, 1, 1)

    def run(self, fn, config, arrays, tokens, probe):
        if self.exact_constants:
            n = len(tokens)
            self._exact = ExactConstants(self.ref.storage).for_run(config, arrays, n, probe is not None)
        try:
            return super().run(fn, config, arrays, tokens, probe)
        finally:
            self._exact = {}

    def describe(self) -> dict:
        return {"backend": "reference", "policy": str(self.policy), "mpmath_backend": mlib.BACKEND,
                "exact_constants": self.exact_constants}

    # data
    def store(self, x):
        if self._exact and isinstance(x, np.ndarray) and x.dtype == np.float64:
            hit = self._exact.get((x.shape, x.tobytes()))
            if hit is not None:  # a sinusoidal or RoPE table of this run (§5.4, §5.5)
                return hit
        return self.ref.store(x)

    def _scalar(self, c: float):
        """The storage value of the model's float64 constant ``c`` (§5): its exact
        counterpart under ``exact_constants``, else ``c`` rounded to storage."""
        hit = self._exact.get(float(c)) if self._exact else None
        return hit if hit is not None else self.ref.storage.from_float(float(c))

    def const(self, c, like):
        v = self._scalar(c)
        out = np.empty(np.shape(like), dtype=object)
        out.fill(v)
        return out

    def to_numpy(self, x):
        return to_float(x)

    # arithmetic
    def relu(self, x):
        return np.frompyfunc(_relu, 1, 1)(x)

    def mean(self, x):
        # docs/semantics.md §4.1: the sum divided by the exact integer d (not d rounded
        # to a format: e5m2 holds 9 as 8, e4m3fn 512 as NaN), one rounding to compute
        n = mlib.from_int(int(x.shape[-1]))
        out = np.empty(x.shape[:-1], dtype=object)
        for i in np.ndindex(*x.shape[:-1]):
            out[i] = self.ref.compute.div(self.ref.sum(list(x[i])), n)
        return out

    def linear(self, x, w):
        n, dout = x.shape[0], w.shape[1]
        out = np.empty((n, dout), dtype=object)
        for i in range(n):
            for j in range(dout):
                out[i, j] = self.ref.dot(list(x[i]), list(w[:, j]))
        return out

    def attention(self, q, k, v, qpos, kpos, scale, alibi=None, window=None, self_kv=None):
        ref, pol = self.ref, self.ref.policy
        c, smx = ref.compute, ref.softmax
        sc = self._scalar(scale)  # §5.2
        bias = self._exact.get(("alibi", float(alibi))) if (alibi is not None and self._exact) else None
        nq, dh = q.shape
        out = np.empty((nq, dh), dtype=object)
        for i in range(nq):
            pi = int(qpos[i])
            keys, vals = [], []
            for j in range(pi + 1):
                if self_kv is not None and j == pi:
                    keys.append(self_kv[0][i]); vals.append(self_kv[1][i])
                else:
                    keys.append(k[j]); vals.append(v[j])
            valid = [window is None or j > pi - window for j in range(pi + 1)]
            s = []
            for j in range(pi + 1):
                sij = c.mul(ref.dot(list(q[i]), list(keys[j])), sc)
                if alibi is not None:
                    b = bias(pi - j) if bias is not None else ref.storage.from_float(float(-alibi * (pi - j)))
                    sij = c.add(sij, b)  # §5.6, §8.1
                s.append(smx.round(sij))
            if pol.max_subtract:
                m = None
                for j in range(pi + 1):
                    if valid[j]:
                        m = s[j] if m is None else smx.max(m, s[j])
                s = [smx.sub(x, m) for x in s]
            e = [smx.exp(x) if ok else mlib.fzero for x, ok in zip(s, valid)]
            den = ref_sum(e if pol.order.kind != "kahan" else [x for x, ok in zip(e, valid) if ok] or [mlib.fzero],
                          pol.order, ref.accumulate, smx)
            alpha = [c.round(smx.div(x, den)) for x in e]
            for d in range(dh):
                col = [vals[j][d] for j in range(pi + 1)]
                if pol.order.kind == "kahan":
                    a2 = [a for a, ok in zip(alpha, valid) if ok]
                    col = [x for x, ok in zip(col, valid) if ok]
                    out[i, d] = ref.dot(a2, col)
                else:
                    out[i, d] = ref.dot(alpha, col)
        return out


class ExactConstants:
    """The model's constants as real numbers rounded once to a storage format
    (docs/semantics.md §5.7), keyed by the float64 value the model passes for each.

    * 1/√d_h: correctly rounded (a quadratic irrational or exact; evaluated at
      ``2p + 64`` bits, truncated with a sticky bit).
    * ε: the decimal number ``repr(eps)`` shows (``1e-5`` is 1/100000), correctly rounded.
    * ALiBi: −2^(−8h/H)·(i − j), sinusoidal sin/cos(t / 10000^(2i/d)), RoPE
      cos/sin(t · 10000^(−2i/d_h)): evaluated by mpmath at ``2p + 64 + log2(t_max)``
      bits and rounded once (faithful; correctly rounded unless the value lies
      within ~2^-(2p+60) relative of a rounding boundary of the format).
    """

    def __init__(self, storage: RefArith):
        self.storage = storage
        self.work = 2 * storage.fmt.p + 64

    def _round(self, value: "mpmath.mpf"):
        return self.storage.round(value._mpf_)

    def for_run(self, config, arrays, n: int, probe: bool) -> dict:
        from .. import positional
        from ..model import SINUSOIDAL

        need = n + int(probe)
        out: dict = {}
        dh = config.dh
        out[float(1 / np.sqrt(dh))] = self.inv_sqrt(dh)
        out[float(config.norm_eps)] = self.decimal(config.norm_eps)
        if config.pe == "alibi":
            for h, slope in enumerate(positional.alibi_slopes(config.n_heads), start=1):
                out[("alibi", float(slope))] = self.alibi(h, config.n_heads)
        if config.pe == "sinusoidal" and SINUSOIDAL in arrays:
            t = np.asarray(arrays[SINUSOIDAL], dtype=np.float64)
            out[(t.shape, t.tobytes())] = self.sinusoidal(need, config.d)
        if config.pe == "rope":
            for pos in [np.arange(n)] + ([np.arange(n) + 1] if probe else []):
                cos, sin = positional.rope_tables(pos, dh)
                ecos, esin = self.rope(pos, dh)
                out[(cos.shape, cos.tobytes())] = ecos
                out[(sin.shape, sin.tobytes())] = esin
        return out

    def _prec(self, largest: int) -> int:
        """Working bits for values computed from integers up to ``largest`` (positions,
        distances): their size adds to the absolute error of an angle or a product."""
        return self.work + max(1, int(largest)).bit_length()

    def inv_sqrt(self, dh: int):
        """1/√d_h = √d_h / d_h. Exact when d_h is a power of 4; otherwise irrational, and a
        quadratic irrational lies at least ~2^-(2p+2+log2 d_h) (relative) from every
        rounding boundary of a p-bit format, far more than the ~2^-(2p+62) error of this
        evaluation: the sticky bit then rounds it as the true value."""
        dhm = mlib.from_int(dh)
        r = mlib.mpf_div(mlib.mpf_sqrt(dhm, self.work + 8, "d"), dhm, self.work, "d")
        exact = mlib.mpf_mul(mlib.mpf_mul(r, r, 0), dhm, 0) == mlib.fone
        return self.storage.round(self.storage._sticky(r, exact))

    def decimal(self, c: float):
        f = Fraction(repr(float(c)))
        r = mlib.from_rational(f.numerator, f.denominator, self.work, "d")
        exact = Fraction(*mlib.to_rational(r)) == f
        return self.storage.round(self.storage._sticky(r, exact))

    def alibi(self, h: int, n_heads: int):
        """The bias −slope·dist for a distance, as a function (the attention asks per distance)."""
        work = self._prec(2**32)  # distances below 2^32
        with mpmath.workprec(work):
            slope = mpmath.power(2, mpmath.mpf(-8 * h) / n_heads)

        def bias(dist: int):
            with mpmath.workprec(work):
                return self._round(-slope * dist) if dist else mlib.fzero

        return bias

    def sinusoidal(self, n: int, d: int) -> np.ndarray:
        out = np.empty((n, d), dtype=object)
        with mpmath.workprec(self._prec(n)):
            for i in range((d + 1) // 2):
                freq = mpmath.power(10000, mpmath.mpf(2 * i) / d)
                for t in range(n):
                    ang = t / freq
                    out[t, 2 * i] = self._round(mpmath.sin(ang))
                    if 2 * i + 1 < d:
                        out[t, 2 * i + 1] = self._round(mpmath.cos(ang))
        return out

    def rope(self, positions, dh: int) -> tuple[np.ndarray, np.ndarray]:
        cos = np.empty((len(positions), dh // 2), dtype=object)
        sin = np.empty_like(cos)
        with mpmath.workprec(self._prec(max(positions, default=1))):
            for i in range(dh // 2):
                inv = mpmath.power(10000, -mpmath.mpf(2 * i) / dh)
                for r, t in enumerate(positions):
                    ang = int(t) * inv
                    cos[r, i], sin[r, i] = self._round(mpmath.cos(ang)), self._round(mpmath.sin(ang))
        return cos, sin
