"""Plain JAX dtypes: what the compiler and hardware do.

On XLA:CPU, bf16/fp16 ops are computed in float32 and rounded at the end of
fused regions, sums and dots accumulate in float32, subnormals are flushed,
and ``a / broadcast(b)`` may become ``a * (1/b)``. This backend answers "what
does this stack do", not "what does the format do" (that is ``emulated``).
It follows the model's op order but none of the rounding rules of
docs/semantics.md (§12).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import require_x64
from ..errors import CollapseSimError
from ..formats import NUMPY_DTYPES, parse as parse_format
from ._jit import JaxBackendBase
from ._rows import _map_rows
from .inputs import AttentionInputs

_QBLOCK_ELEMS = 1 << 24


class NativeBackend(JaxBackendBase):
    kind = "native"

    def __init__(self, dtype: str):
        fmt = parse_format(dtype)
        name = NUMPY_DTYPES.get(fmt.name)
        if name is None:
            raise CollapseSimError(f"format {fmt.name} has no native JAX dtype; run it on the emulated or reference backend")
        if not (fmt.signed and fmt.has_zero):  # as a policy refuses it (a model needs negatives and zero)
            raise CollapseSimError(f"format {fmt.name} has no {'negative values' if not fmt.signed else 'zero'}, so a "
                                   "model cannot run in it; use it with round_to, or pick a signed format with a zero")
        if name == "float64":
            require_x64("the native float64 backend")
        self.fmt = fmt
        self.dtype = jnp.dtype(name)
        self.label = f"native:{fmt.name}"

    def describe(self) -> dict:
        return {"backend": "native", "dtype": str(self.dtype), "device": str(jax.devices()[0])}

    # data
    def store(self, x):
        if isinstance(x, np.ndarray) or np.isscalar(x):
            x = np.asarray(x, np.float64)
        return jnp.asarray(x).astype(self.dtype)

    def const(self, c, like):
        return jnp.full(like.shape, c, dtype=jnp.float64).astype(self.dtype)

    def to_numpy(self, x):
        return np.asarray(jnp.asarray(x).astype(jnp.float32 if self.dtype != jnp.float64 else jnp.float64), np.float64)

    # arithmetic
    add = staticmethod(jnp.add)
    sub = staticmethod(jnp.subtract)
    mul = staticmethod(jnp.multiply)
    div = staticmethod(jnp.divide)
    sqrt = staticmethod(jnp.sqrt)

    def relu(self, x):
        return jnp.maximum(x, jnp.zeros_like(x))

    def mean(self, x):
        return jnp.mean(x, axis=-1)

    def linear(self, x, w):
        return x @ w

    def attention(self, inputs: AttentionInputs, adaptive=None):
        return _native_attention(inputs, self.dtype, self.div, adaptive)


def _softmax(s, div):
    """``jax.nn.softmax`` over the last axis (the same ops: exp(s − max) ÷ sum), with its one
    division through ``div``, so a subclass can change how the division is compiled."""
    e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
    return div(e, jnp.broadcast_to(jnp.sum(e, axis=-1, keepdims=True), e.shape))


def _adaptive_softmax(s, valid, div, poly, threshold):
    """Adaptive temperature (docs/semantics.md §8.7) in the scores' dtype, by plain jnp ops:
    the softmax ``a`` of the masked scores ``s``, its entropy H = −Σ a·ln a (0·ln 0 = 0),
    β = max(poly(H), 1) by Horner's rule where H > ``threshold`` (else 1), the softmax of s·β."""
    a = _softmax(s, div)
    H = -jnp.sum(jnp.where(valid & (a > 0), a * jnp.log(jnp.where(a > 0, a, jnp.ones_like(a))), jnp.zeros_like(a)),
                 axis=-1, keepdims=True)
    P = jnp.zeros_like(H)
    for c in poly:
        P = P * H + jnp.asarray(c, s.dtype)
    one = jnp.ones_like(H)
    return _softmax(s * jnp.where(H > threshold, jnp.maximum(P, one), one), div)


def _native_attention(a: AttentionInputs, dtype, div=jnp.divide, adaptive=None):
    q, k, v, qpos, alibi, window, self_kv = a.q, a.k, a.v, jnp.asarray(a.qpos), a.alibi, a.window, a.self_kv
    nk = k.shape[0]
    if self_kv is not None:
        k = jnp.concatenate([k, jnp.zeros((1, k.shape[1]), k.dtype)])
        v = jnp.concatenate([v, jnp.zeros((1, v.shape[1]), v.dtype)])
        nk += 1
    cols = jnp.arange(nk)
    sc = jnp.asarray(a.scale, jnp.float64).astype(dtype) if jax.config.jax_enable_x64 else jnp.asarray(a.scale, dtype)

    def block(args):
        qb, pb, kpb, vpb = args
        s = (qb @ k.T) * sc
        if self_kv is not None:
            s_self = jnp.sum(qb * kpb, axis=-1) * sc
            s = jnp.where(cols[None, :] == pb[:, None], s_self[:, None], s)
        if alibi is not None:
            s = s + (-alibi * (pb[:, None] - cols[None, :]).astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)).astype(dtype)
        valid = cols[None, :] <= pb[:, None]
        if window is not None:
            valid = valid & (cols[None, :] > pb[:, None] - window)
        s = jnp.where(valid, s, jnp.asarray(-jnp.inf, dtype))
        a = _softmax(s, div) if adaptive is None else _adaptive_softmax(s, valid, div, *adaptive)
        if self_kv is None:
            return a @ v
        is_self = cols[None, :] == pb[:, None]
        a_self = jnp.sum(jnp.where(is_self, a, jnp.zeros_like(a)), axis=-1)
        return jnp.where(is_self, jnp.zeros_like(a), a) @ v + a_self[:, None] * vpb

    nq = q.shape[0]
    bq = max(1, min(nq, _QBLOCK_ELEMS // max(1, nk)))
    kp = self_kv[0] if self_kv is not None else jnp.zeros_like(q)
    vp = self_kv[1] if self_kv is not None else jnp.zeros_like(q)
    return _map_rows(block, (q, qpos, kp, vp), bq)
