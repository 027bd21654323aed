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
    def store(self, x):
        x = np.asarray(x, dtype=np.float64)
        out = np.empty(x.shape, dtype=object)
        for idx, v in np.ndenumerate(x):
            out[idx] = self.ctx.mpf(float(v))
        return out

    def const(self, c, like):
        out = np.empty(np.shape(like), dtype=object)
        out.fill(self.ctx.mpf(float(c)))
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
        s = self.ctx.mpf(0)
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
        out[idx] = any(x.b < y.a or y.b < x.a for x, y in zip(a[idx], b[idx]))
    return out


def widths(a) -> np.ndarray:
    out = np.empty(np.shape(a), dtype=np.float64)
    for idx, v in np.ndenumerate(np.asarray(a, dtype=object)):
        out[idx] = float(v.delta)
    return out


del mpmath
