"""Exact summation: a fixed-point superaccumulator of 32-bit limbs in int64 (the
``exact`` order of docs/semantics.md §3.1: one rounding of the exact sum), and the
float64 bit-pattern helpers it shares with the certificates.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ...formats import Format
from ...rounding import round_to

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


def _exponent(x64):
    """floor(log2|x|) of normal float64 values, from their bits; -1023 for zeros and
    subnormals (which are below 2**-1022 = 2**(-1023 + 1))."""
    bits = lax.bitcast_convert_type(jnp.asarray(x64, jnp.float64), jnp.uint64)
    return ((bits >> jnp.uint64(52)) & jnp.uint64(0x7FF)).astype(jnp.int64) - 1023


_LIMB = 32


_EXACT_CHUNK = 4096  # terms per pass of the superaccumulator (its limb table is terms x limbs int64)
_EXACT_TABLE = 1 << 22  # int64 limb-table entries per pass (32 MiB)


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
    few sums at a time, so the limb table stays below ``table`` entries.

    ``kmin``/``kmax`` bound the terms (every term is a multiple of ``2**kmin``
    and below ``2**kmax`` in magnitude); narrower bounds mean fewer limbs. A
    term outside them makes the result NaN, never a silently wrong number.
    """
    dtype = x.dtype
    x64 = x.astype(jnp.float64)
    kbase = kmin - _LIMB  # one zero limb below everything
    nlimbs = (kmax - kbase) // _LIMB + 4  # + room for carries of up to 2**63 terms

    def limbs(x64):
        """The limb sums (..., nlimbs) of the terms on the last axis, and whether any is outside the bounds."""
        neg = jnp.signbit(x64)
        # m odd (its lowest set bit is bit 0): then k >= kmin is the condition
        m, k = _odd_significand(x64)
        blen_m = 64 - lax.clz(m).astype(jnp.int64)
        outside = jnp.any((m != 0) & ((k < kmin) | (k + blen_m > kmax)), axis=-1)
        k = jnp.where(m == 0, kmin, k)
        off = k - kbase
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
        lidx = jnp.arange(nlimbs).reshape((1,) * j.ndim + (nlimbs,))
        jj = j[..., None]
        contrib = (jnp.where(jj == lidx, c0[..., None], 0) + jnp.where(jj + 1 == lidx, c1[..., None], 0)
                   + jnp.where(jj + 2 == lidx, c2[..., None], 0))
        return jnp.sum(contrib, axis=-2), outside  # (..., nlimbs) int64, exact

    n = x64.shape[-1]

    def limb_sums(x2):  # (rows, n) -> (rows, nlimbs), (rows,)
        if n <= chunk:
            return limbs(x2)
        nc = -(-n // chunk)
        chunks = jnp.moveaxis(jnp.pad(x2, ((0, 0), (0, nc * chunk - n))).reshape(x2.shape[0], nc, chunk), 1, 0)

        def add_chunk(carry, c):
            A, outside = limbs(c)
            return (carry[0] + A, carry[1] | outside), None

        zero = (jnp.zeros((x2.shape[0], nlimbs), jnp.int64), jnp.zeros(x2.shape[0], bool))
        return lax.scan(add_chunk, zero, chunks)[0]

    batch = x64.shape[:-1]
    rows = int(np.prod(batch, dtype=np.int64))
    per_row = min(n, chunk) * nlimbs  # int64 limb table entries per row and pass
    rb = max(1, table // per_row)
    x2 = x64.reshape(rows, n)
    if rows <= rb:
        A, outside = limb_sums(x2)
    else:  # many sums: a few rows at a time, so the limb table stays below `table` entries
        nr = -(-rows // rb)
        A, outside = lax.map(limb_sums, jnp.pad(x2, ((0, nr * rb - rows), (0, 0))).reshape(nr, rb, n))
        A, outside = A.reshape(nr * rb, nlimbs)[:rows], outside.reshape(nr * rb)[:rows]
    A, outside = A.reshape(*batch, nlimbs), outside.reshape(batch)

    def normalise(A):
        def step(L, A):
            carry = A[..., L] >> _LIMB
            A = A.at[..., L].add(-(carry << _LIMB))
            return A.at[..., L + 1].add(carry)

        return lax.fori_loop(0, nlimbs - 1, step, A)

    A = normalise(A)
    top_neg = A[..., -1] < 0
    A = normalise(jnp.where(top_neg[..., None], -A, A))  # magnitude, limbs in [0, 2^32)
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
    scale = s - 1 + _LIMB * (h - 1) + kbase
    val = approx_int.astype(jnp.float64)
    half1 = scale // 2
    val = val * _pow2(half1) * _pow2(scale - half1)
    val = jnp.where(top_neg, -val, val)
    finite = jnp.all(jnp.isfinite(x64), axis=-1)
    val = jnp.where(finite, val, jnp.sum(x64, axis=-1))
    val = jnp.where(outside & finite, jnp.nan, val)
    return round_to(val, out, mode).astype(dtype)


def _pow2(k):
    """2.0**k as float64 for integer arrays k in [-1022, 1023], built from bits."""
    return lax.bitcast_convert_type(((k + 1023).astype(jnp.uint64)) << jnp.uint64(52), jnp.float64)
