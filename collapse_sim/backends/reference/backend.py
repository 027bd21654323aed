"""ReferenceBackend: the model primitives in mpmath, in the emulated backend's exact
order: the mean and norms (docs/semantics.md §4), the constants (§5), linear layers (§7),
attention with masked columns, windows and probes (§3.3, §8, §10).
"""

from __future__ import annotations

import jax
import mpmath.libmp as mlib
import numpy as np

from ...mx import P_AMAX, ScaledFormat, is_per_tensor, mx_round, prefix_amax, scaled_values, tensor_amax
from ...policy import BLOCK_KERNELS, Policy, PolicyError, weights_token
from .._hooks import ArrayPlumbing
from ..inputs import AttentionInputs
from .arith import RefArith, Reference, ref_sum, times_log2e, to_float
from .constants import ExactConstants


class ObjectArrayBackend(ArrayPlumbing):
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

    def _each_row(self, x, f):
        """``f`` of every row (last axis) of the object array ``x``."""
        out = np.empty(x.shape[:-1], dtype=object)
        for i in np.ndindex(*x.shape[:-1]):
            out[i] = f(x[i])
        return out

    def _matmul(self, x, w, dot):
        """``x @ w`` (x: (n, k), w: (k, m)), each entry ``dot(row of x, column of w)``."""
        out = np.empty((x.shape[0], w.shape[1]), dtype=object)
        for i in range(x.shape[0]):
            for j in range(w.shape[1]):
                out[i, j] = dot(x[i], w[:, j])
        return out


def _objects(rows: list) -> np.ndarray:
    """A 2-d object array of the mpf tuples ``rows[i][j]`` (``np.array`` would unpack the tuples)."""
    out = np.empty((len(rows), len(rows[0]) if rows else 0), dtype=object)
    for i, r in enumerate(rows):
        for j, x in enumerate(r):
            out[i, j] = x
    return out


def _relu(v):
    """max(v, 0), exact (docs/semantics.md §2): NaN stays NaN, +inf stays +inf (both have a
    zero mantissa in mpmath's tuples, like the zero they are not)."""
    if v in (mlib.fnan, mlib.finf):
        return v
    return v if (v[1] != 0 and not v[0]) else mlib.fzero



_scaled_jit = jax.jit(scaled_values, static_argnums=(1, 2, 3))


def _scaled(x: np.ndarray, fmt: ScaledFormat, compute, axis: int, amax=None) -> np.ndarray:
    """:func:`collapse_sim.mx.scaled_values` on float64 ``x`` (numpy), compiled once per shape
    bucket: the axis is padded with zeros to a power of two (trailing zeros raise no tile's
    largest magnitude and quantise to 0, so the values before them are unchanged), so the
    reference's rows of every length p + 1 share a few programs. Per tensor (§13.2.1) the amax
    (``amax``, or all of ``x``'s: :func:`collapse_sim.mx.tensor_amax`) goes to the program
    beside ``x``, both padded so on every axis."""
    if fmt.per_tensor:
        a = np.broadcast_to(tensor_amax(x) if amax is None else np.asarray(amax, np.float64), x.shape)
        pad = [(0, _bucket(n) - n) for n in x.shape]
        with jax.enable_x64(True):
            out = np.asarray(_scaled_jit(np.pad(x, pad), fmt, compute, 0, np.pad(a, pad)), np.float64)
        return out[tuple(slice(0, n) for n in x.shape)]
    axis = axis % x.ndim
    n = x.shape[axis]
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, _bucket(n) - n)
    with jax.enable_x64(True):
        out = np.asarray(_scaled_jit(np.pad(x, pad), fmt, compute, axis), np.float64)
    return np.take(out, np.arange(n), axis=axis)


def _bucket(n: int) -> int:
    """The power of two at or above ``n`` (1 for 0): :func:`_scaled`'s padded length."""
    return 1 << max(n - 1, 0).bit_length()


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
        # the operands are compute values or stored ones (weights, a first layer's input), quantised through float64
        held = (self.policy.compute, self.policy.storage)
        wide = [f for f in held if not (f.p <= 53 and f.emax <= 1023 and f.min_exponent_of_quantum >= -1074)]
        if self.policy.operands is not None and wide:
            raise PolicyError(f"operands={weights_token(self.policy.operands)} quantises compute and stored values "
                              f"through float64 (collapse_sim.mx), which does not hold every value of {wide[0].name}; "
                              "use compute and storage formats within float64 with the operands role")
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
        return self._each_row(x, lambda r: self.ref.compute.div(self.ref.sum(list(r)), n))

    def linear(self, x, w, stream_rows=None):
        return self._matmul(self.operand(x, -1, self._prefix_amax(x, stream_rows)), self.operand(w, 0),
                            lambda a, b: self.ref.dot(list(a), list(b)))

    @property
    def needs_stream_rows(self) -> bool:
        """Whether a probe's linear layers and attention take the stream's rows (``stream_rows``):
        under per-tensor scaled operands (docs/semantics.md §13.2.1)."""
        return is_per_tensor(self.policy.operands)

    def _prefix_amax(self, x, stream_rows=None):
        """Under per-tensor scales (§13.2.1) the amax of each activation row of ``x`` (after the
        ``stream_rows`` for probes): :func:`collapse_sim.mx.prefix_amax` on the float64 values;
        None otherwise."""
        if not self.needs_stream_rows:
            return None
        return prefix_amax(to_float(x), None if stream_rows is None else to_float(stream_rows))

    def operand(self, x, axis: int = -1, amax=None):
        """``x`` (an object array of compute values) as an operand of a dot product under the
        policy's operands role (docs/semantics.md §13.1): MX blocks along ``axis`` (the
        contraction axis) by :func:`collapse_sim.mx.mx_round` on the float64 values (exact:
        the constructor checked that compute and storage lie within float64), values of compute again
        (§13.1); or float32-scaled tiles (§13.2) by :func:`collapse_sim.mx.scaled_values`, the
        emulated backend's function, on the same float64 values, per tensor (§13.2.1) with the
        amax ``amax`` (broadcastable to ``x``), or all of ``x``'s; ``x`` itself without the role.
        The one place the reference quantises operands."""
        if self.policy.operands is None:
            return x
        if isinstance(self.policy.operands, ScaledFormat):  # §13.2: the one rule, through float64
            q = _scaled(np.asarray(to_float(x), np.float64), self.policy.operands, self.policy.compute, axis, amax)
        else:
            q = mx_round(to_float(x), self.policy.operands, axis=axis)
        with np.errstate(invalid="ignore"):  # a NaN tile's values: mpmath's NaN
            return np.frompyfunc(lambda v: mlib.from_float(float(v)), 1, 1)(q)

    def attention(self, inputs: AttentionInputs, adaptive=None, stream_rows=None):
        q, k, v, qpos, scale = inputs.q, inputs.k, inputs.v, inputs.qpos, inputs.scale
        alibi, window, self_kv = inputs.alibi, inputs.window, inputs.self_kv
        ref, pol = self.ref, self.ref.policy
        c, smx = ref.compute, ref.softmax
        kern = pol.kernel
        if adaptive is not None and (why := kern.why_not_adaptive()) is not None:
            raise PolicyError(why)
        if kern.base2 and self.exact_constants:
            raise PolicyError(f"the :exact reference has no exact counterpart of the {kern.kind} kernel's folded "
                              "constants (§8.8.1); drop :exact or use the online kernel")
        st = ref.storage
        fold = lambda x: st.round(times_log2e(x, st.work))  # noqa: E731  §8.8.1: ∘_S(x·log2 e)
        sc = fold(scale) if kern.base2 else self._scalar(scale)  # §5.2
        bias = self._exact.get(("alibi", float(alibi))) if (alibi is not None and self._exact) else None
        nq, dh = q.shape
        # §13.1: the scores' operands, along d_h; per tensor (§13.2.1) each query with the amax of the
        # queries up to it (after the stream's for probes), the keys per row below
        per_tensor = self.needs_stream_rows
        q = self.operand(q, -1, self._prefix_amax(q, stream_rows))
        if not per_tensor:
            k = self.operand(k)
            if self_kv is not None:
                self_kv = (self.operand(self_kv[0]), self_kv[1])
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
            if per_tensor:  # §13.2.1: the row's keys with the amax of its columns 0..p_i
                keys = list(self.operand(_objects([list(r) for r in keys]), -1))
            qi, sci, v_descale = q[i], sc, None
            if kern.fp8 is not None:  # §8.8.2 1-2: quantised inputs, the descales folded into the scale
                (qi,), s_q = self._fp8_quantise([q[i]])
                keys, s_k = self._fp8_quantise(keys)
                vals, v_descale = self._fp8_quantise(vals)
                sci = ref.accumulate.mul(sc, ref.accumulate.mul(s_q, s_k))
            s = []
            for j in range(pi + 1):
                sij = c.mul(ref.dot(list(qi), list(keys[j])), sci)
                if alibi is not None:
                    if kern.base2:
                        b = fold(float(-alibi * (pi - j)))
                    else:
                        b = bias(pi - j) if bias is not None else st.from_float(float(-alibi * (pi - j)))
                    sij = c.add(sij, b)  # §5.6, §8.1
                s.append(smx.round(sij))
            if pol.kernel.kind in BLOCK_KERNELS:
                out[i] = self._online_row(s, valid, vals, dh, v_descale)
                continue
            alpha = self._softmax_row(s, valid)
            if adaptive is not None:
                beta = self._adaptive_beta(alpha, valid, *adaptive)
                alpha = self._softmax_row([smx.mul(x, beta) for x in s], valid)
            if pol.operands is not None:  # §13.1: the row's weights and its prefix's values in key blocks
                alpha = list(self.operand(_objects([alpha]), -1, P_AMAX if per_tensor else None)[0])
                vals = self.operand(_objects([list(r) for r in vals]), 0)
            for d in range(dh):
                out[i, d] = self._masked_dot(alpha, [vals[j][d] for j in range(pi + 1)], valid)
        return out

    def _softmax_row(self, s, valid):
        """The weights (compute format) of one row's scores ``s`` (softmax format) over its
        columns, the visible ones ``valid`` (docs/semantics.md §8.3)."""
        ref, pol, smx = self.ref, self.ref.policy, self.ref.softmax
        if pol.max_subtract:
            m = None
            for x, ok in zip(s, valid):
                if ok:
                    m = x if m is None else smx.max(m, x)
            s = [smx.sub(x, m) for x in s]
        e = [smx.exp(x) if ok else mlib.fzero for x, ok in zip(s, valid)]
        den = ref_sum(e if pol.order.kind != "kahan" else [x for x, ok in zip(e, valid) if ok] or [mlib.fzero],
                      pol.order, ref.accumulate, smx)
        return [ref.compute.round(smx.div(x, den)) for x in e]

    def _masked_dot(self, a, b, valid):
        """dot(a, b) → compute over a row's columns in their places (§3.2, §3.3): kahan
        skips the masked ones."""
        if self.ref.policy.order.kind == "kahan":
            a, b = [x for x, ok in zip(a, valid) if ok], [x for x, ok in zip(b, valid) if ok]
        return self.ref.dot(a, b)

    def _adaptive_beta(self, alpha, valid, poly, threshold):
        """Adaptive temperature's β of one row (docs/semantics.md §8.7) from its weights
        ``alpha``: the entropy H = −dot(α, ln α) in the compute format (0·ln 0 = 0), Horner's
        rule for the polynomial ``poly`` (float64 coefficients, highest power first) rounded
        to storage, β = max(poly(H), 1) where H > ``threshold``, else 1."""
        c, st = self.ref.compute, self.ref.storage
        lam = [c.ln(a) if ok and a[1] != 0 else mlib.fzero for a, ok in zip(alpha, valid)]  # a[1] = 0: 0, NaN
        H = mlib.mpf_neg(self._masked_dot(alpha, lam, valid))
        coef = [st.from_float(x) for x in poly]
        P = coef[0]
        for x in coef[1:]:
            P = c.add(c.mul(P, H), x)
        if H != mlib.fnan and mlib.mpf_gt(H, mlib.from_float(threshold)):
            return c.max(P, mlib.fone)
        return mlib.fone

    def _fp8_quantise(self, rows):
        """``rows`` (a list of vectors: a query, or the keys or values of columns 0..p) quantised
        as flash3fp8's caller does (docs/semantics.md §8.8.2 1): ``(quantised rows, s)`` with
        s = ∘_A(amax / 448) (1 where amax = 0) and each entry ∘_E(∘_A(x ÷ s))."""
        acc, E = self.ref.accumulate, RefArith(self.policy.kernel.fp8, self.policy.mode)
        amax = mlib.fzero
        for row in rows:
            for x in row:
                amax = E.max(amax, mlib.mpf_abs(x))  # exact, NaN if any entry is NaN
        s = mlib.fone if amax == mlib.fzero else acc.div(amax, mlib.from_float(E.fmt.max))
        return [[E.round(acc.div(x, s)) for x in row] for row in rows], s

    def _online_row(self, s, valid, vals, dh, v_descale=None):
        """One query's output under a block kernel (docs/semantics.md §8.8), from its scores
        ``s`` (softmax format) over columns 0..p, the visible ones ``valid``: ``online(b)``;
        ``flash2(b)`` takes exp2 for exp and rounds the probability tile to storage (§8.8.1);
        ``flash3fp8(b)`` (values already quantised, ``v_descale`` their scale) offsets the
        exponentials by 2^8, rounds the tile to e4m3fn, visits the blocks last first and ends
        with o · (1/l · s_V) (§8.8.2)."""
        ref, pol = self.ref, self.ref.policy
        c, smx, acc = ref.compute, ref.softmax, ref.accumulate
        kern = pol.kernel
        exp = smx.exp2 if kern.base2 else smx.exp
        tile = RefArith(kern.fp8, pol.mode) if kern.fp8 is not None else (ref.storage if kern.base2 else c)
        offset = mlib.from_int(kern.max_offset)
        kahan = pol.order.kind == "kahan"  # kahan sums skip masked terms (§3.3)
        m = l = o = None
        starts = range(0, len(s), kern.block)
        for start in (reversed(starts) if kern.reverse else starts):
            cols = [j for j in range(start, min(start + kern.block, len(s)))]
            seen = [j for j in cols if valid[j]]
            if not seen:
                continue  # a block the query does not see
            mb = s[seen[0]]
            for j in seen[1:]:
                mb = smx.max(mb, s[j])
            if m is None and mb == mlib.fninf:
                continue  # every visible score -inf before any finite maximum: the block changes nothing (§8.8)
            m_new = mb if m is None else smx.max(m, mb)
            r = None if m is None else exp(smx.sub(m, m_new))
            shift = smx.sub(m_new, offset) if kern.max_offset else m_new
            e = [exp(smx.sub(s[j], shift)) if valid[j] else mlib.fzero for j in cols]
            P = [tile.round(x) for x in e]
            use = [t for t, j in enumerate(cols) if valid[j]] if kahan else list(range(len(cols)))
            den = ref_sum([e[t] for t in use], pol.order, acc, acc)
            pv = [ref.dot([P[t] for t in use], [vals[cols[t]][d] for t in use], out_role="accumulate") for d in range(dh)]
            if m is None:
                l, o = den, pv
            else:
                l = acc.add(acc.mul(l, r), den)
                o = [acc.add(acc.mul(od, r), x) for od, x in zip(o, pv)]
            m = m_new
        if m is None:  # no finite score at all: 0/0, as the emulated backend's empty state gives
            return [mlib.fnan] * dh
        if v_descale is None:
            return [c.round(acc.div(od, l)) for od in o]
        f = acc.mul(acc.div(mlib.fone, l), v_descale)  # §8.8.2 6
        return [c.round(acc.mul(od, f)) for od in o]
