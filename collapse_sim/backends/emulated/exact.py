"""Exact summation: a fixed-point superaccumulator of 32-bit limbs in int64 (the
``exact`` order of docs/semantics.md §3.1: one rounding of the exact sum), and the
float64 bit-pattern helpers it shares with the certificates.

The superaccumulator runs on the host, in numpy, called from compiled code by a host
call (:func:`collapse_sim.backends._host.host_call`, which the persistent compilation
cache can hold); only the final rounding to the format is compiled. Inlined into
XLA it was ~800 lines of HLO per call site, and the exact and blocked forwards hold
dozens of call sites (each certified sum's fallback and the op-by-op redo of what the
certificates leave open), which made their compiles 2-5x those of the other orders
while the code runs only where a certificate fails.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ...formats import Format
from .._host import host_call
from ...rounding import float64_exponent as _exponent, pow2 as _pow2, round_to  # noqa: F401 (re-exported)
_NO_BITS = 4096  # lowest-set-bit exponent given to zeros: above every real one


def _odd_significand(x64):
    """``(m, k)`` with ``|x| = m * 2**k`` and ``m`` odd (``m = 0`` for zeros), from the
    bits of finite float64 values."""
    bits = lax.bitcast_convert_type(x64, jnp.uint64)
    E = ((bits >> jnp.uint64(52)) & jnp.uint64(0x7FF)).astype(jnp.int64)
    frac = bits & jnp.uint64((1 << 52) - 1)
    m = jnp.where(E == 0, frac, frac | jnp.uint64(1 << 52))
    k = jnp.where(E == 0, -1074, E - 1075)  # |x| = m * 2**k, k in [-1074, 971]
    tz = jnp.where(m == 0, 0, 63 - lax.clz(m & (~m + jnp.uint64(1))).astype(jnp.int64))
    return m >> tz.astype(jnp.uint64), k + tz


def lsb_exponent(x):
    """The exponent of the lowest set bit of each float64 value: x is a multiple of
    2**lsb_exponent(x). Zeros get 4096."""
    m, k = _odd_significand(jnp.asarray(x, jnp.float64))
    return jnp.where(m == 0, _NO_BITS, k)




_LIMB = 32
_U = np.uint64


_EXACT_CHUNK = 4096  # terms per pass of the superaccumulator along the sum
_EXACT_TABLE = 1 << 22  # terms per pass in all (each pass holds a few int64 arrays of this size)


def exact_sum(x, out: Format, mode, kmin: int = -1074, kmax: int = 1024, chunk: int = _EXACT_CHUNK,
              table: int = _EXACT_TABLE):
    """Correctly rounded sum of the last axis of ``x`` (exact, then one rounding to ``out``).

    Each float64 term ``m * 2**k`` (53-bit integer m) is split into 32-bit limbs
    of a fixed-point integer spanning every float64 exponent; limbs are summed in
    int64 (exact for < 2**31 terms), carries are propagated, and the top 64
    bits plus a sticky bit give a float64 that rounds to ``out`` exactly as the
    exact sum would (the sticky bit sits below >= 33 kept bits, p + 2 <= 27).
    Non-finite terms give the plain float sum (inf or NaN). Long sums are taken in
    chunks of ``chunk`` terms (limb sums of chunks add exactly) and large batches a
    few sums at a time, so each pass holds at most ``table`` terms.

    ``kmin``/``kmax`` bound the terms (every term is a multiple of ``2**kmin``
    and below ``2**kmax`` in magnitude); narrower bounds mean fewer limbs. A
    term outside them makes the result NaN, never a silently wrong number.

    The limb arithmetic runs on the host (:func:`sticky_sum`, numpy) through
    a host call (:func:`collapse_sim.backends._host.host_call`); ``out`` may be a traced
    format (the shared program).
    """
    dtype = x.dtype
    x64 = jnp.asarray(x).astype(jnp.float64)
    val = host_call(_host_sticky_sum, (kmin, kmax, chunk, table), jax.ShapeDtypeStruct(x64.shape[:-1], jnp.float64),
                    x64, vmap_method="expand_dims")
    return round_to(val, out, mode).astype(dtype)


def _host_sticky_sum(kmin: int, kmax: int, chunk: int, table: int, x):
    """:func:`sticky_sum` with its static arguments first (:func:`host_call`'s order)."""
    return sticky_sum(x, kmin, kmax, chunk, table)


def _bit_length(v):
    """Bits of each non-negative integer ``v < 2**53`` (0 for 0), exactly (float64 holds them)."""
    return np.frexp(np.asarray(v).astype(np.float64))[1].astype(np.int64)


def _host_odd_significand(x64):
    """:func:`_odd_significand` in numpy."""
    bits = np.ascontiguousarray(x64, np.float64).view(_U)
    E = ((bits >> _U(52)) & _U(0x7FF)).astype(np.int64)
    frac = bits & _U((1 << 52) - 1)
    m = np.where(E == 0, frac, frac | _U(1 << 52))
    k = np.where(E == 0, -1074, E - 1075)
    tz = np.maximum(_bit_length(m & (~m + _U(1))) - 1, 0)  # the lowest set bit is a power of 2 <= 2**52
    return m >> tz.astype(_U), k + tz


def _limb_sums(x2, kmin: int, kmax: int, kbase: int, nlimbs: int):
    """The limb sums (rows, nlimbs) int64 of the rows of ``x2`` (rows, n), exact, and
    whether a row has a term outside the bounds."""
    rows, n = x2.shape
    neg = np.signbit(x2)
    m, k = _host_odd_significand(x2)  # m odd: then k >= kmin is the condition
    nz = m != 0
    outside = np.any(nz & ((k < kmin) | (k + _bit_length(m) > kmax)), axis=-1)
    off = np.where(nz, k, kmin) - kbase
    j = np.clip(off // _LIMB, 0, nlimbs - 3)  # clipped terms are outside: their row's result is NaN
    rsh = (off % _LIMB).astype(_U)
    mask = _U(0xFFFFFFFF)
    lo = (m & mask) << rsh  # < 2**64, spans limbs j, j+1
    hi = (m >> _U(32)) << rsh  # < 2**53, spans limbs j+1, j+2
    sgn = np.where(neg, -1, 1)
    base = (np.arange(rows) * nlimbs)[:, None] + j
    A = np.zeros(rows * nlimbs, np.int64)
    for t, c in enumerate(((lo & mask), (lo >> _U(32)) + (hi & mask), hi >> _U(32))):
        # |term| < 2**33 and < 2**20 terms per row and limb: float64 counts stay exact (< 2**53)
        w = (c.astype(np.int64) * sgn).astype(np.float64)
        A += np.bincount((base + t).ravel(), weights=w.ravel(), minlength=rows * nlimbs).astype(np.int64)
    return A.reshape(rows, nlimbs), outside


def sticky_sum(x, kmin: int = -1074, kmax: int = 1024, chunk: int = _EXACT_CHUNK, table: int = _EXACT_TABLE):
    """The exact sum of the last axis of ``x`` (numpy float64), as a float64 that rounds
    to any format of precision p <= 31 as the exact sum does: at least 33 of its leading
    bits and a sticky bit (round to odd); an exact sum of magnitude >= 2^1024 gives the
    largest float64 of its sign (inexact, beyond every such format's largest value, so
    each mode overflows or saturates as the exact sum would). Rows with a non-finite term give their float sum;
    rows with a term outside ``[2**kmin, 2**kmax)`` give NaN (see :func:`exact_sum`)."""
    x64 = np.asarray(x, np.float64)
    batch, n = x64.shape[:-1], x64.shape[-1]
    rows = int(np.prod(batch, dtype=np.int64))
    if n == 0:
        return np.zeros(batch, np.float64)
    x2 = x64.reshape(rows, n)
    kbase = kmin - _LIMB  # one zero limb below everything
    nlimbs = (kmax - kbase) // _LIMB + 4  # + room for carries of up to 2**63 terms
    A = np.zeros((rows, nlimbs), np.int64)
    outside = np.zeros(rows, bool)
    width = max(1, min(n, chunk, 1 << 20))
    rb = max(1, table // width)
    for r0 in range(0, rows, rb):
        for c0 in range(0, n, width):
            a, o = _limb_sums(x2[r0:r0 + rb, c0:c0 + width], kmin, kmax, kbase, nlimbs)
            A[r0:r0 + rb] += a
            outside[r0:r0 + rb] |= o

    def normalise(A):
        for L in range(nlimbs - 1):
            carry = A[:, L] >> _LIMB
            A[:, L] -= carry << _LIMB
            A[:, L + 1] += carry
        return A

    A = normalise(A)
    top_neg = A[:, -1] < 0
    A = normalise(np.where(top_neg[:, None], -A, A))  # magnitude, limbs in [0, 2^32)
    nz = A != 0
    idx = np.arange(nlimbs)[None, :]
    h = np.max(np.where(nz, idx, 0), axis=-1)  # highest nonzero limb (0 if all zero)
    r = np.arange(rows)
    top = A[r, h].astype(_U)
    nxt = np.where(h >= 1, A[r, np.maximum(h - 1, 0)], 0).astype(_U)
    sticky = np.any(nz & (idx < (h - 1)[:, None]), axis=-1)
    W = (top << _U(32)) | nxt
    blen = np.where(top > 0, 32 + _bit_length(top), _bit_length(nxt))
    s = np.maximum(blen - 52, 0)
    su = s.astype(_U)
    kept = W >> su
    sticky = sticky | ((W & ((_U(1) << su) - _U(1))) != 0)
    approx_int = (kept << _U(1)) | sticky.astype(_U)  # <= 53 bits: exact in float64
    scale = s - 1 + _LIMB * (h - 1) + kbase
    half = scale // 2
    with np.errstate(over="ignore"):
        val = np.ldexp(np.ldexp(approx_int.astype(np.float64), half), scale - half)
    val = np.where(top_neg, -val, val)
    val = np.where(np.isinf(val), np.copysign(np.finfo(np.float64).max, val), val)  # |exact sum| >= 2^1024
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.all(np.isfinite(x2), axis=-1)
        val = np.where(finite, val, np.sum(x2, axis=-1))
    val = np.where(outside & finite, np.nan, val)
    return val.reshape(batch)


