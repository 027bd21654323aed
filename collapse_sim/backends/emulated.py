"""Elementary operations of a precision policy, each rounded right after.

Every op is computed in a wider *carrier* float and rounded to the policy's
format with :func:`collapse_sim.rounding.round_to`. The carrier is float32 if
every format of the policy has ``p <= 11`` and float64 if ``p <= 25``. With
at least ``2p + 2`` carrier bits the double rounding (carrier, then format)
equals one correct rounding for + − × ÷ √ (Figueroa 1995), so these ops are
*correctly rounded* in the target format. ``exp`` is always evaluated in
float64 and then rounded: correct except within ~2^-50 relative of a
midpoint (none is known for p <= 16; the tests check every bf16 and fp16
input). The carrier must also hold every product and quotient of two
format values as a *normal* number, because XLA:CPU flushes subnormal floats
in arithmetic; the check is made when the emulator is built.

Division is always done on operands of the same shape behind an
optimisation barrier: XLA otherwise rewrites ``a / broadcast(b)`` into
``a * (1/b)``, which rounds twice.

The emulated backend needs JAX float64 (``collapse_sim.enable_x64()``).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
from jax import lax

from ..formats import Format, parse as parse_format
from ..policy import Order, Policy
from ..rounding import Mode, round_to


class CarrierError(ValueError):
    """A format the emulated backend cannot carry exactly."""


def _fits(fmt: Format, pc: int, emin_c: int, emax_c: int) -> bool:
    if 2 * fmt.p + 2 > pc:
        return False
    lo = Fraction(2) ** (fmt.emin - fmt.p + 1 if fmt.subnormals else fmt.emin)
    hi = fmt.max_exact
    # products and quotients of two format values must be normal carrier numbers
    return lo * lo >= Fraction(2) ** emin_c and lo / hi >= Fraction(2) ** emin_c and hi * hi < Fraction(2) ** (emax_c + 1) and hi / lo < Fraction(2) ** (emax_c + 1)


def carrier_for(*fmts: Format):
    """The narrowest carrier dtype (float32 or float64) that emulates all ``fmts`` exactly."""
    if all(_fits(f, 24, -126, 127) for f in fmts):
        return jnp.float32
    for f in fmts:
        if not _fits(f, 53, -1022, 1023):
            why = (f"p={f.p} > 25" if f.p > 25 else "its exponent range is too wide for a float64 carrier")
            raise CarrierError(
                f"format {f.name} cannot be emulated exactly ({why}); use the reference backend (mpmath) for it"
            )
    return jnp.float64


def require_x64() -> None:
    if not jax.config.jax_enable_x64:
        raise RuntimeError("the emulated backend needs JAX float64: call collapse_sim.enable_x64() at program start")


class Emulator:
    """The ops of one policy. Immutable and hashable, so it can be a static jit argument."""

    def __init__(self, policy: "Policy | str"):
        self.policy = Policy.parse(policy)
        require_x64()
        self.dtype = jnp.dtype(carrier_for(*self.policy.formats()))
        self.mode = self.policy.mode

    def __hash__(self) -> int:
        return hash(self.policy)

    def __eq__(self, other) -> bool:
        return isinstance(other, Emulator) and other.policy == self.policy

    def __repr__(self) -> str:
        return f"Emulator({self.policy})"

    # --- rounding --------------------------------------------------------
    def rnd(self, x, fmt: Format | None = None):
        """Round ``x`` (carried in the carrier dtype) to ``fmt`` (default: compute)."""
        return round_to(jnp.asarray(x, self.dtype), fmt or self.policy.compute, self.mode)

    def store(self, x):
        """Bring external data (any float array) in: one rounding to the storage format."""
        x = jnp.asarray(x)
        if x.dtype != jnp.float64:
            x = x.astype(jnp.float64) if jax.config.jax_enable_x64 else x
        return round_to(x, self.policy.storage, self.mode).astype(self.dtype)

    # --- elementary ops ----------------------------------------------------
    def add(self, a, b, fmt=None):
        return self.rnd(carrier_add(a, b, self.mode), fmt)

    def sub(self, a, b, fmt=None):
        return self.rnd(carrier_add(a, -b, self.mode), fmt)

    def mul(self, a, b, fmt=None):
        return self.rnd(a * b, fmt)

    def div(self, a, b, fmt=None):
        a, b = jnp.broadcast_arrays(jnp.asarray(a, self.dtype), jnp.asarray(b, self.dtype))
        return self.rnd(lax.div(a, lax.optimization_barrier(b)), fmt)

    def sqrt(self, a, fmt=None):
        return self.rnd(jnp.sqrt(a), fmt)

    def exp(self, a, fmt=None):
        wide = jnp.exp(jnp.asarray(a, jnp.float64))
        return round_to(wide, fmt or self.policy.compute, self.mode).astype(self.dtype)

    def max(self, a, axis=-1):
        return jnp.max(a, axis=axis)  # exact

    def neg(self, a):
        return -a  # exact

    # --- reductions --------------------------------------------------------
    def sum(self, x, axis: int = -1, out_fmt: Format | None = None, order: Order | None = None):
        """Sum along ``axis`` in the policy's order, accumulating in ``accumulate``,
        then rounding once to ``out_fmt`` (default: compute)."""
        x = jnp.moveaxis(jnp.asarray(x, self.dtype), axis, -1)
        return reduce_sum(x, order or self.policy.order, self.policy.accumulate, out_fmt or self.policy.compute, self.mode)

    def dot(self, a, b, out_fmt: Format | None = None, order: Order | None = None):
        """Vector dot product over the last axis (batched over the rest).

        Products of two carrier values are exact in the carrier; each is rounded
        to ``accumulate`` (exact if that format has >= 2p bits), then reduced.
        The ``exact`` and ``blocked`` orders use the exact products.
        """
        a, b = jnp.broadcast_arrays(jnp.asarray(a, self.dtype), jnp.asarray(b, self.dtype))
        prod = a * b
        order = order or self.policy.order
        if order.kind not in ("exact", "blocked"):
            prod = self.rnd(prod, self.policy.accumulate)
        return reduce_sum(prod, order, self.policy.accumulate, out_fmt or self.policy.compute, self.mode)

    def matmul(self, a, b, out_fmt=None, order=None):
        """``a @ b`` for a: (..., m, k), b: (k, n), each entry a :meth:`dot`."""
        a = jnp.asarray(a, self.dtype)
        bt = jnp.swapaxes(jnp.asarray(b, self.dtype), -1, -2)
        ae, be = jnp.broadcast_arrays(a[..., :, None, :], bt.reshape((1,) * (a.ndim - 1) + bt.shape))
        return self.dot(ae, be, out_fmt, order)


def carrier_add(a, b, mode):
    """``a + b`` in the carrier, in a form whose rounding to any format with
    ``p <= pc - 2`` in ``mode`` equals the correct rounding of the exact sum.

    Round-to-nearest: the plain carrier sum (innocuous double rounding).
    Directed modes: the carrier sum can hide that the exact sum lies just off a
    format value (a large, b tiny), so the sum is made *round-to-odd*: the error
    term of TwoSum (exact, no FMA needed) says whether the carrier rounded, and
    the last carrier bit is then forced to 1 (Boldo & Melquiond, 2008).
    Products of two format values are exact in the carrier, and for ÷ and √ a
    non-representable exact result is too far from every format value for the
    carrier's rounding to cross one, so only + and − need this.
    """
    s = a + b
    if mode is Mode.RNE:
        return s
    bb = s - a
    err = (a - (s - bb)) + (b - bb)
    return _round_to_odd(s, err)


def _round_to_odd(s, err):
    uint = jnp.uint32 if s.dtype == jnp.float32 else jnp.uint64
    bits = lax.bitcast_convert_type(s, uint)
    sign = bits & ~(~uint(0) >> uint(1))
    mag = bits & (~uint(0) >> uint(1))
    inexact = (err != 0) & jnp.isfinite(s)
    toward_zero = jnp.signbit(err) != jnp.signbit(s)
    rz = jnp.where(inexact & toward_zero, mag - uint(1), mag)
    mag = jnp.where(inexact, rz | uint(1), mag)
    return lax.bitcast_convert_type(mag | sign, s.dtype)


# --------------------------------------------------------------------------
# Reductions over the last axis.


def reduce_sum(x, order: Order, acc: Format, out: Format, mode):
    if x.shape[-1] == 0:
        return jnp.zeros(x.shape[:-1], x.dtype)
    r = functools.partial(round_to, mode=mode)

    def add(u, v):  # one correctly rounded add in the accumulate format
        return r(carrier_add(u, v, mode), acc)

    if order.kind == "sequential":
        s = _sequential(x, add)
    elif order.kind == "pairwise":
        s = _pairwise(x, add)
    elif order.kind == "kahan":
        s = _kahan(x, add)
    elif order.kind == "exact":
        return exact_sum(x, out, mode)
    elif order.kind == "blocked":
        n = x.shape[-1]
        b = order.block
        nb = -(-n // b)
        xp = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], nb * b - n), x.dtype)], axis=-1)
        blocks = exact_sum(xp.reshape(*x.shape[:-1], nb, b), acc, mode)
        s = _sequential(blocks, add)
    else:  # pragma: no cover - Order validates kinds
        raise ValueError(order)
    return r(s, out)


def _sequential(x, add):
    xs = jnp.moveaxis(x, -1, 0)

    def step(s, v):
        return add(s, v), None

    s, _ = lax.scan(step, xs[0], xs[1:])
    return s


def _pairwise(x, add):
    n = x.shape[-1]
    size = 1 << max(0, (n - 1).bit_length())
    if size != n:
        x = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], size - n), x.dtype)], axis=-1)
    while x.shape[-1] > 1:
        x = add(x[..., 0::2], x[..., 1::2])
    return x[..., 0]


def _kahan(x, add):
    xs = jnp.moveaxis(x, -1, 0)

    def step(carry, v):
        s, c = carry
        y = add(v, -c)
        t = add(s, y)
        c = add(add(t, -s), -y)
        return (t, c), None

    (s, _), _ = lax.scan(step, (xs[0], jnp.zeros_like(xs[0])), xs[1:])
    return s


# --------------------------------------------------------------------------
# Exact summation: a fixed-point superaccumulator of 32-bit limbs in int64.

_LIMB = 32


def exact_sum(x, out: Format, mode):
    """Correctly rounded sum of the last axis of ``x`` (exact, then one rounding to ``out``).

    Each float64 term ``m * 2**k`` (53-bit integer m) is split into 32-bit limbs
    of a fixed-point integer spanning every float64 exponent; limbs are summed in
    int64 (exact for < 2**31 terms), carries are propagated, and the top 64
    bits plus a sticky bit give a float64 that rounds to ``out`` exactly as the
    exact sum would (the sticky bit sits below >= 33 kept bits, p + 2 <= 27).
    Non-finite terms give the plain float sum (inf or NaN).
    """
    dtype = x.dtype
    x64 = x.astype(jnp.float64)
    bits = lax.bitcast_convert_type(x64, jnp.uint64)
    neg = (bits >> jnp.uint64(63)) != 0
    E = ((bits >> jnp.uint64(52)) & jnp.uint64(0x7FF)).astype(jnp.int64)
    frac = bits & jnp.uint64((1 << 52) - 1)
    m = jnp.where(E == 0, frac, frac | jnp.uint64(1 << 52))
    k = jnp.where(E == 0, -1074, E - 1075)  # value = m * 2**k, k in [-1074, 971]
    off = k + 1074 + _LIMB  # one zero limb below everything
    j = off // _LIMB
    rsh = (off % _LIMB).astype(jnp.uint64)
    ml = m & jnp.uint64(0xFFFFFFFF)
    mh = m >> jnp.uint64(32)
    lo = ml << rsh  # < 2**64, spans limbs j, j+1
    hi = mh << rsh  # < 2**53, spans limbs j+1, j+2
    mask = jnp.uint64(0xFFFFFFFF)
    c0 = (lo & mask).astype(jnp.int64)
    c1 = ((lo >> jnp.uint64(32)) + (hi & mask)).astype(jnp.int64)
    c2 = (hi >> jnp.uint64(32)).astype(jnp.int64)
    sgn = jnp.where(neg, -1, 1).astype(jnp.int64)
    c0, c1, c2 = c0 * sgn, c1 * sgn, c2 * sgn
    nlimbs = (971 + 1074 + 53) // _LIMB + 4
    limbs = []
    for L in range(nlimbs):
        v = jnp.where(j == L, c0, 0) + jnp.where(j + 1 == L, c1, 0) + jnp.where(j + 2 == L, c2, 0)
        limbs.append(jnp.sum(v, axis=-1))
    # carry propagation (arithmetic shifts floor toward -inf)
    for L in range(nlimbs - 1):
        carry = limbs[L] >> _LIMB
        limbs[L] = limbs[L] - (carry << _LIMB)
        limbs[L + 1] = limbs[L + 1] + carry
    top_neg = limbs[-1] < 0
    # negate a negative total: -(sum) with limbs in [0, 2^32) after renormalising
    limbs = [jnp.where(top_neg, -v, v) for v in limbs]
    for L in range(nlimbs - 1):
        carry = limbs[L] >> _LIMB
        limbs[L] = limbs[L] - (carry << _LIMB)
        limbs[L + 1] = limbs[L + 1] + carry
    A = jnp.stack(limbs, axis=-1)  # (..., nlimbs), all in [0, 2^32)
    nz = A != 0
    idx = jnp.arange(nlimbs).reshape((1,) * (A.ndim - 1) + (nlimbs,))
    h = jnp.max(jnp.where(nz, idx, 0), axis=-1)  # highest nonzero limb (0 if all zero)
    hm1 = jnp.maximum(h - 1, 0)
    top = jnp.take_along_axis(A, h[..., None], axis=-1)[..., 0].astype(jnp.uint64)
    nxt = jnp.take_along_axis(A, hm1[..., None], axis=-1)[..., 0].astype(jnp.uint64)
    nxt = jnp.where(h >= 1, nxt, jnp.uint64(0))
    sticky = jnp.any(nz & (idx < (h - 1)[..., None]), axis=-1)
    W = (top << jnp.uint64(32)) | nxt
    blen = 64 - lax.clz(W).astype(jnp.int64)
    s = jnp.maximum(blen - 52, 0)
    su = s.astype(jnp.uint64)
    kept = W >> su
    sticky = sticky | ((W & ((jnp.uint64(1) << su) - jnp.uint64(1))) != 0)
    approx_int = (kept << jnp.uint64(1)) | sticky.astype(jnp.uint64)  # <= 53 bits: exact in float64
    scale = s - 1 + _LIMB * (h - 1) - 1074 - _LIMB
    val = approx_int.astype(jnp.float64)
    half1 = scale // 2
    val = val * _pow2(half1) * _pow2(scale - half1)
    val = jnp.where(top_neg, -val, val)
    finite = jnp.all(jnp.isfinite(x64), axis=-1)
    val = jnp.where(finite, val, jnp.sum(x64, axis=-1))
    return round_to(val, out, mode).astype(dtype)


def _pow2(k):
    """2.0**k as float64 for integer arrays k in [-1022, 1023], built from bits."""
    return lax.bitcast_convert_type(((k + 1023).astype(jnp.uint64)) << jnp.uint64(52), jnp.float64)
