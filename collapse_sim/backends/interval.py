"""Interval arithmetic: certify that two exact-arithmetic representations differ.

``IntervalBackend(prec)`` runs the model with mpmath's interval context at
``prec`` bits: every value is an interval guaranteed to contain the value the
model has in *exact* real arithmetic (weights taken as the float64 numbers
given). If, for two inputs, some component's intervals are disjoint, their
exact representations differ: :func:`certify_distinct`. A pair that is
bitwise identical in bf16 but certified distinct here has collapsed because
of the format, not because the model maps both inputs to one point.

Softmax shifts scores by the maximum of their midpoints (an exact constant, so
the exact softmax is unchanged). Orders of sums do not matter for enclosures.
"""

from __future__ import annotations

import mpmath
import numpy as np
from mpmath.ctx_iv import MPIntervalContext

from .reference import ObjectArrayBackend


class IntervalBackend(ObjectArrayBackend):
    kind = "interval"

    def __init__(self, prec: "int | str" = 128):
        self.prec = int(prec)
        self.ctx = MPIntervalContext()
        self.ctx.prec = self.prec
        self.label = f"interval:mp{self.prec}"
        iv = self.ctx
        self._add = np.frompyfunc(lambda a, b: a + b, 2, 1)
        self._sub = np.frompyfunc(lambda a, b: a - b, 2, 1)
        self._mul = np.frompyfunc(lambda a, b: a * b, 2, 1)
        self._div = np.frompyfunc(lambda a, b: a / b, 2, 1)
        self._sqrt = np.frompyfunc(iv.sqrt, 1, 1)
        self._relu = np.frompyfunc(self._relu1, 1, 1)

    def describe(self) -> dict:
        return {"backend": "interval", "prec": self.prec}

    def _relu1(self, x):
        if x.a >= 0:
            return x
        if x.b <= 0:
            return self.ctx.mpf(0)
        return self.ctx.mpf([0, x.b])

    # data
    def _num(self, v: float):
        """An exact float64 value as a number of this engine."""
        return self.ctx.mpf(v)

    def store(self, x):
        x = np.asarray(x, dtype=np.float64)
        out = np.empty(x.shape, dtype=object)
        for idx, v in np.ndenumerate(x):
            out[idx] = self._num(float(v))
        return out

    def const(self, c, like):
        out = np.empty(np.shape(like), dtype=object)
        out.fill(self._num(float(c)))
        return out

    def to_numpy(self, x):
        """Midpoints as float64."""
        out = np.empty(np.shape(x), dtype=np.float64)
        for idx, v in np.ndenumerate(np.asarray(x, dtype=object)):
            out[idx] = float(v.mid)
        return out

    # arithmetic
    def relu(self, x):
        return self._relu(x)

    def _sum(self, xs):
        s = self._num(0.0)
        for x in xs:
            s = s + x
        return s

    def mean(self, x):
        out = np.empty(x.shape[:-1], dtype=object)
        for i in np.ndindex(*x.shape[:-1]):
            out[i] = self._sum(x[i]) / x.shape[-1]
        return out

    def linear(self, x, w):
        n, dout = x.shape[0], w.shape[1]
        out = np.empty((n, dout), dtype=object)
        for i in range(n):
            for j in range(dout):
                out[i, j] = self._sum(a * b for a, b in zip(x[i], w[:, j]))
        return out

    def attention(self, q, k, v, qpos, kpos, scale, alibi=None, window=None, self_kv=None):
        iv = self.ctx
        sc = iv.mpf(float(scale))
        nq, dh = q.shape
        out = np.empty((nq, dh), dtype=object)
        for i in range(nq):
            pi = int(qpos[i])
            js = [j for j in range(pi + 1) if window is None or j > pi - window]
            keys = [self_kv[0][i] if (self_kv is not None and j == pi) else k[j] for j in js]
            vals = [self_kv[1][i] if (self_kv is not None and j == pi) else v[j] for j in js]
            s = []
            for j, kk in zip(js, keys):
                sij = self._sum(a * b for a, b in zip(q[i], kk)) * sc
                if alibi is not None:
                    sij = sij + iv.mpf(float(-alibi * (pi - j)))
                s.append(sij)
            shift = max(x.mid for x in s)  # any exact constant leaves the exact softmax unchanged
            e = [iv.exp(x - shift) for x in s]
            den = self._sum(e)
            for d in range(dh):
                out[i, d] = self._sum(ei / den * vv[d] for ei, vv in zip(e, vals))
        return out


def certify_distinct(a, b) -> np.ndarray:
    """Per row: True if some component's intervals are disjoint (the exact values differ)."""
    a, b = np.asarray(a, dtype=object), np.asarray(b, dtype=object)
    out = np.zeros(a.shape[:-1], dtype=bool)
    for idx in np.ndindex(*a.shape[:-1]):
        out[idx] = any(_disjoint(x, y) for x, y in zip(a[idx], b[idx]))
    return out


def _disjoint(x, y) -> bool:
    if hasattr(x, "overlaps"):  # arb balls
        return not x.overlaps(y)
    return x.b < y.a or y.b < x.a


def widths(a) -> np.ndarray:
    out = np.empty(np.shape(a), dtype=np.float64)
    for idx, v in np.ndenumerate(np.asarray(a, dtype=object)):
        out[idx] = float(2 * v.rad()) if hasattr(v, "rad") else float(v.delta)
    return out


del mpmath


class ArbBackend(IntervalBackend):
    """The interval backend on python-flint's arb balls: the same enclosure guarantee,
    with matrix products in C (``arb_mat``) and elementwise ops at ~0.1 µs. The fast
    high-precision reference: ``make_backend("interval", "arb256")``; ``to_numpy``
    gives ball midpoints, :func:`certify_distinct` and :func:`widths` work unchanged.
    Needs the ``flint`` extra (python-flint)."""

    kind = "interval"
    _QBLOCK = 1 << 16  # query rows × keys per attention block

    def __init__(self, prec: "int | str" = 128):
        try:
            import flint
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("the arb interval engine needs python-flint (a core dependency): pip install 'python-flint>=0.9'") from None
        self.flint = flint
        self.prec = int(prec)
        self.label = f"interval:arb{self.prec}"
        self._add = np.frompyfunc(lambda a, b: a + b, 2, 1)
        self._sub = np.frompyfunc(lambda a, b: a - b, 2, 1)
        self._mul = np.frompyfunc(lambda a, b: a * b, 2, 1)
        self._div = np.frompyfunc(lambda a, b: a / b, 2, 1)
        self._sqrt = np.frompyfunc(lambda a: a.sqrt(), 1, 1)
        self._exp = np.frompyfunc(lambda a: a.exp(), 1, 1)
        self._relu = np.frompyfunc(self._relu1, 1, 1)
        self._mid = np.frompyfunc(lambda x: float(x.mid()), 1, 1)
        self._zero = flint.arb(0)
        self._stored: dict = {}
        self._mats: dict = {}

    def describe(self) -> dict:
        return {"backend": "interval", "engine": "arb (python-flint)", "flint": self.flint.__version__, "prec": self.prec}

    def run(self, fn, config, arrays, tokens, probe):
        ctx = self.flint.ctx
        old = ctx.prec
        ctx.prec = self.prec
        try:
            return super().run(fn, config, arrays, tokens, probe)
        finally:
            ctx.prec = old

    def _relu1(self, x):
        if x >= 0:
            return x
        if x <= 0:
            return self._zero
        return x.union(self._zero)  # straddles 0: a ball holding [0, upper] (and more)

    # data
    def _num(self, v: float):
        return self.flint.arb(v)

    def store(self, x):
        """float64 values as exact balls; weights are converted once per backend (cached by value)."""
        x = np.asarray(x, dtype=np.float64)
        key = (x.shape, x.tobytes())
        hit = self._stored.get(key)
        if hit is None:
            hit = super().store(x)
            if len(self._stored) < 256:
                self._stored[key] = hit
        return hit

    def to_numpy(self, x):
        return np.asarray(self._mid(np.asarray(x, dtype=object)), dtype=np.float64).reshape(np.shape(x))

    # arithmetic
    def _mat(self, a):
        hit = self._mats.get(id(a))
        if hit is not None and hit[0] is a:  # a stored weight matrix: converted once
            return hit[1]
        a2 = np.asarray(a, dtype=object)
        m = self.flint.arb_mat(a2.shape[0], a2.shape[1], list(a2.ravel()))
        if any(a is v for v in self._stored.values()):
            self._mats[id(a)] = (a, m)
        return m

    def _arr(self, m):
        return np.array(m.entries(), dtype=object).reshape(m.nrows(), m.ncols())

    def _matmul(self, a, b):
        return self._arr(self._mat(a) * self._mat(b))

    def _rowsum(self, x):
        ones = np.full((x.shape[-1], 1), self._num(1.0), dtype=object)
        return self._matmul(x, ones)[:, 0]

    def mean(self, x):
        return self._div(self._rowsum(x), self._num(float(x.shape[-1])))

    def linear(self, x, w):
        return self._matmul(x, w)

    def attention(self, q, k, v, qpos, kpos, scale, alibi=None, window=None, self_kv=None):
        arb = self.flint.arb
        sc = arb(float(scale))
        nq, dh = q.shape
        nk = k.shape[0]
        qpos = np.asarray(qpos)
        cols = np.arange(nk + (1 if self_kv is not None else 0))
        kT = self._mat(k).transpose()
        out = np.empty((nq, dh), dtype=object)
        rows = max(1, self._QBLOCK // max(1, nk))
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            pb = qpos[r0:r1]
            S = self._mul(self._arr(self._mat(q[r0:r1]) * kT), sc)  # (B, nk)
            if self_kv is not None:  # the probe's own key sits at column pb (= nk for the last row)
                s_self = self._mul(np.array([self._sum(a * b for a, b in zip(q[i], self_kv[0][i])) for i in range(r0, r1)],
                                            dtype=object), sc)
                extra = np.empty((r1 - r0, 1), dtype=object)
                extra.fill(self._zero)
                S = np.concatenate([S, extra], axis=1)
                S[np.arange(r1 - r0), pb] = s_self
            if alibi is not None:
                bias = np.array([[arb(float(-alibi * (p - j))) for j in cols] for p in pb], dtype=object)
                S = self._add(S, bias)
            valid = cols[None, :] <= pb[:, None]
            if window is not None:
                valid &= cols[None, :] > pb[:, None] - window
            # shift each row by an exact constant near its largest score (from float
            # midpoints of q and k): the exact softmax is unchanged, exp cannot overflow
            qm = self.to_numpy(q[r0:r1])
            km = self.to_numpy(np.concatenate([k, np.full((len(cols) - nk, dh), self._zero, dtype=object)]))
            approx = (qm @ km.T) * float(scale)
            if self_kv is not None:
                approx[np.arange(r1 - r0), pb] = np.sum(qm * self.to_numpy(self_kv[0][r0:r1]), axis=1) * float(scale)
            if alibi is not None:
                approx = approx - alibi * (pb[:, None] - cols[None, :])
            shift = np.max(np.where(valid, approx, -np.inf), axis=1)
            E = np.full(S.shape, self._zero, dtype=object)
            ii, jj = np.nonzero(valid)
            E[ii, jj] = self._exp(self._sub(S[ii, jj], np.array([arb(float(v)) for v in shift], dtype=object)[ii]))
            A = self._div(E, self._rowsum(E)[:, None])
            if self_kv is None:
                out[r0:r1] = self._matmul(A, v)
            else:
                a_self = A[np.arange(r1 - r0), pb]
                A[np.arange(r1 - r0), pb] = self._zero
                out[r0:r1] = self._add(self._matmul(A, np.concatenate([v, np.full((1, dh), self._zero, dtype=object)])),
                                       self._mul(a_self[:, None], np.asarray(self_kv[1][r0:r1])))
        return out
