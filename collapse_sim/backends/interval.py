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
The constants are the float64 ones of docs/semantics.md §5 (``float(scale)``,
``float(eps)``, numpy's tables, float64 ALiBi products), taken exactly: the model
enclosed is §11's, with no rounding.
"""

from __future__ import annotations

import contextlib
import threading

import mpmath
import numpy as np
from mpmath.ctx_iv import MPIntervalContext

from .inputs import AttentionInputs
from .reference.backend import ObjectArrayBackend


_FLINT_PREC = threading.RLock()


@contextlib.contextmanager
def flint_precision(flint, prec: int):
    """python-flint's working precision at ``prec`` bits in the block, restored after it. The
    precision is one setting of the whole process, not of a thread (the report runs the reference
    on a thread of its own): one block at a time holds it."""
    with _FLINT_PREC:
        ctx = flint.ctx
        old = ctx.prec
        ctx.prec = prec
        try:
            yield
        finally:
            ctx.prec = old


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
        return self._each_row(x, lambda r: self._sum(r) / x.shape[-1])

    def linear(self, x, w):
        return self._matmul(x, w, lambda a, b: self._sum(p * q for p, q in zip(a, b)))

    def attention(self, inputs: AttentionInputs):
        q, k, v, qpos, scale = inputs.q, inputs.k, inputs.v, inputs.qpos, inputs.scale
        alibi, window, self_kv = inputs.alibi, inputs.window, inputs.self_kv
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
        self._relu = np.frompyfunc(self._relu1, 1, 1)
        self._mid = np.frompyfunc(lambda x: float(x.mid()), 1, 1)
        self._zero = flint.arb(0)
        self._stored: dict = {}
        self._mats: dict = {}
        self._recent: dict = {}

    def describe(self) -> dict:
        return {"backend": "interval", "engine": "arb (python-flint)", "flint": self.flint.__version__, "prec": self.prec}

    def run(self, fn, config, arrays, tokens, probe):
        with flint_precision(self.flint, self.prec):
            return super().run(fn, config, arrays, tokens, probe)

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
                hit.flags.writeable = False  # shared by every forward on this backend
                self._stored[key] = hit
                if hit.ndim == 2:
                    self._mats[id(hit)] = (hit, None)
        return hit

    def to_numpy(self, x):
        return np.asarray(self._mid(np.asarray(x, dtype=object)), dtype=np.float64).reshape(np.shape(x))

    def concat_cols(self, xs):
        return xs[0] if len(xs) == 1 else super().concat_cols(xs)

    def cols(self, x, sl):
        if range(*sl.indices(x.shape[1])) == range(x.shape[1]):
            return x  # every column (one head): the array itself, so its arb matrix is reused
        return x[:, sl]

    def take(self, table, idx):
        return self._own(super().take(table, idx))

    # arithmetic: products as arb matrices. A stored weight keeps its matrix for the
    # backend's life; an array this backend made (read-only, so its matrix cannot go
    # stale) keeps it while it is one of the last few (``_recent``): q, k and v go from
    # their projection into the attention without a second conversion.
    _RECENT = 16

    def _own(self, out, m=None):
        if out.ndim == 2:
            out.flags.writeable = False
            self._recent[id(out)] = (out, m)
            if len(self._recent) > self._RECENT:
                del self._recent[next(iter(self._recent))]
        return out

    def _cached(self, a):
        """(cache, entry) when ``a`` is a stored weight or a recent array of this backend."""
        for cache in (self._mats, self._recent):
            hit = cache.get(id(a))
            if hit is not None and hit[0] is a:
                return cache, hit
        return None

    def _mat(self, a):
        found = self._cached(a)
        if found is None:
            return self._convert(a)
        cache, (_, m) = found
        if m is None:
            m = self._convert(a)
            cache[id(a)] = (a, m)
        return m

    def _convert(self, a):
        a = np.asarray(a, dtype=object)
        return self.flint.arb_mat(a.shape[0], a.shape[1], a.ravel().tolist())

    def _arr(self, m):
        return self._own(np.fromiter(m.entries(), dtype=object, count=m.nrows() * m.ncols()).reshape(m.nrows(), m.ncols()), m)

    def add(self, a, b):
        if self._cached(a) and self._cached(b) and np.shape(a) == np.shape(b):  # e.g. a residual
            return self._arr(self._mat(a) + self._mat(b))
        return self._add(a, b)

    def _matmul(self, a, b):
        return self._arr(self._mat(a) * self._mat(b))

    def _rowsum(self, x):
        ones = self.flint.arb_mat(x.shape[-1], 1, [1] * x.shape[-1])
        return np.array((self._mat(x) * ones).entries(), dtype=object)

    def mean(self, x):
        return self._div(self._rowsum(x), self._num(float(x.shape[-1])))

    def linear(self, x, w):
        return self._matmul(x, w)

    def attention(self, inputs: AttentionInputs):
        """Softmax attention on balls, scores and weighted values as arb matrix products.
        No shift before ``exp``: arb exponents are unbounded, so exp cannot overflow or
        underflow, and the exact softmax is what is enclosed."""
        q, k, v, qpos, scale = inputs.q, inputs.k, inputs.v, inputs.qpos, inputs.scale
        alibi, window, self_kv = inputs.alibi, inputs.window, inputs.self_kv
        arb, zero = self.flint.arb, self._zero
        sc = arb(float(scale))
        nq, dh = q.shape
        nk = k.shape[0]
        qpos = np.asarray(qpos)
        kT, V = self._mat(k).transpose(), self._mat(v)
        out = np.empty((nq, dh), dtype=object)
        rows = max(1, self._QBLOCK // max(1, nk))
        for r0 in range(0, nq, rows):
            r1 = min(nq, r0 + rows)
            S = ((self._mat(q if (r0, r1) == (0, nq) else q[r0:r1]) * kT) * sc).entries()
            A = [zero] * ((r1 - r0) * nk)
            own = []
            for b, i in enumerate(range(r0, r1)):
                p = int(qpos[i])
                js = range(0 if window is None else max(0, p - window + 1), p + 1)
                s = S[b * nk + js.start: b * nk + min(p + 1, nk)]
                if self_kv is not None:  # the probe's own key at column p (= nk for the last row)
                    s = s[:p - js.start] + [self._sum(x * y for x, y in zip(q[i], self_kv[0][i])) * sc]
                if alibi is not None:
                    s = [x + arb(float(-alibi * (p - j))) for x, j in zip(s, js)]
                e = [x.exp() for x in s]
                den = sum(e)
                w = [x / den for x in e]
                if self_kv is not None:
                    own.append(w.pop())
                A[b * nk + js.start: b * nk + js.start + len(w)] = w
            O = self._arr(self.flint.arb_mat(r1 - r0, nk, A) * V)
            if self_kv is not None:
                O = self._add(O, self._mul(np.array(own, dtype=object)[:, None], np.asarray(self_kv[1][r0:r1])))
            if (r0, r1) == (0, nq):
                return O  # one block: O itself (its matrix stays known)
            out[r0:r1] = O
        return out
