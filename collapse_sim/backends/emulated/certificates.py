"""Certified rounding of exact sums from float64 evaluations: the fast paths.

Every function here returns what the specification returns, bit for bit, or says
where it cannot vouch for it: :func:`certified_sum` is bit-equal to
:func:`exact.exact_sum` (the ``exact`` order and the blocks of ``blocked``), and
:func:`certified_matmul` to :meth:`ops.Emulator.dot` in the ``exact`` and ``blocked``
orders of orders.py (docs/semantics.md §3.1, §3.2).

Rounding an exact sum needs the exact sum only where it lies close to a rounding
boundary of the target format. A float64 evaluation s of a sum of k terms, in any
order (a tree, a BLAS kernel, with or without FMA), satisfies |s - S| <= γ_k Σ|t_i|
with γ_k = k u / (1 - k u), u = 2^-53 (Higham 2002, §3.1 and §4.2), provided no
partial result is subnormal (XLA:CPU flushes them). If rounding both ends of an
interval that contains S gives the same bits, every point in between rounds to
them too (rounding is monotone), so S does. Where the check fails, the exact
superaccumulator decides. Products of two format values are exact float64
numbers, so the same holds for dot products evaluated by float64 matrix products.

Often the float64 evaluation is exact: if every term is a multiple of 2^q and
Σ|t| < 2^(53+q), every partial sum (in any order) is a float64 number. Then the
interval has width zero and even an exact midpoint (common: a block of bf16
products has far fewer than 53 significant bits) is certified.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ...formats import Format
from ...rounding import FormatParams, Mode, format_int, round_to
from .._rows import _cond
from .exact import _exponent, _pow2, exact_sum, lsb_exponent
from .orders import _blocked, _rounded_add, _sequential

_U64 = 2.0**-53


def _exact_in_float64(a, q):
    """Whether a sum of terms that are multiples of ``2**q``, whose absolute values sum to
    (a float64 evaluation, or a float64 upper bound) ``a``, is evaluated exactly in
    float64 in any order: ``a (1 + γ) < 2**(floor(log2 a) + 1) <= 2**(52 + q)`` keeps
    every partial sum below ``2**(53 + q)``."""
    return (_exponent(a) + 2 <= 52 + q) & jnp.isfinite(a)


def _interval_width(s, a, k: int, exact=None):
    """Half-width ``e`` of an interval around the float64 evaluation ``s`` that holds
    the exact sum (see :func:`certify`)."""
    if 2 * k * _U64 > 1:  # pragma: no cover - 2^52 terms
        raise ValueError("too many terms to certify a float64 sum")
    g = k * _U64 / (1 - k * _U64)
    e = 4 * g * a + 2.0**-51 * jnp.abs(s) + k * 2.0**-1020
    if exact is not None:
        e = jnp.where(exact, jnp.zeros_like(e), e)
    return e


def _cell_check_applies(fmt: "Format | FormatParams", mode) -> bool:
    p = fmt.cls.pmax if isinstance(fmt, FormatParams) else fmt.p  # the largest p a traced format can have
    return mode is Mode.RNE and fmt.subnormals and fmt.signed_zero and p < 52


def _inside_cell(s, e, r, fmt: "Format | FormatParams"):
    """Round to nearest: whether ``[s - e, s + e]`` lies strictly inside the rounding
    cell of ``r = round(s)``, so that every point of it rounds to ``r``.

    For ``r != 0`` (then ``s`` has ``r``'s sign), with ``E = floor(log2|r|)``: the cell
    reaches ``H = 2**(max(E, emin) - p)`` (half the spacing) away from zero, and as far
    toward zero, or half that where ``|r|`` is a power of two above ``2**emin`` (the
    spacing below is finer). ``|r|`` at the largest finite value is refused (the
    overflow threshold lies beyond it). For ``r = 0``: ``H = 2**(emin - p)`` on both
    sides, and the interval must not contain zero (the sign of a zero result is the
    sign of the exact sum). ``δ = |s| - |r|`` is exact (r is s rounded to fewer bits),
    and ``fl(δ + e) < H`` implies ``δ + e < H`` for a power of two ``H``."""
    bits = lax.bitcast_convert_type(r, jnp.uint64)
    E = _exponent(r)
    emin, p = format_int(fmt.emin, jnp.int64), format_int(fmt.p, jnp.int64)
    H = _pow2(jnp.maximum(E, emin) - p)
    pow2 = ((bits & jnp.uint64((1 << 52) - 1)) == 0) & (E > emin)
    Hdn = jnp.where(pow2, H * 0.5, H)
    delta = jnp.abs(s) - jnp.abs(r)
    nonzero = (delta + e < H) & (e - delta < Hdn) & (jnp.abs(r) < fmt.max)
    zero = (jnp.abs(s) + e < H) & (jnp.abs(s) > e)
    return jnp.where(r == 0, zero, nonzero)


def certify(s, a, k: int, fmt: Format, mode, exact=None):
    """``(r, ok)``: ``r`` is the rounding of ``s`` to ``fmt`` and ``ok`` marks where it is
    provably the rounding of the exact sum ``S``.

    ``s`` is a float64 evaluation (any order) of a sum of ``k`` terms and ``a`` one of the
    sum of their absolute values (or a float64 evaluation of an upper bound of it).
    ``a`` underestimates Σ|t| by at most a factor ``1 - γ_k``, so ``|s - S| <= 2 γ_k a``
    for ``k u <= 1/2``; the interval is widened further by ``2^-51 |s|`` (so that
    ``s ± e`` evaluated in float64 still encloses ``S``) and by ``k 2^-1020`` (terms
    flushed to zero if they were subnormal). Where ``exact`` is true (see
    :func:`_exact_in_float64`) ``s`` is ``S`` and the width is zero. An all-zero sum
    (``a == 0``) is ``+0``, as in :func:`exact_sum`.

    Round to nearest (formats with subnormals and signed zeros): one rounding and a
    test that the interval lies inside ``r``'s rounding cell (:func:`_inside_cell`).
    Other modes: both ends of the interval are rounded, and the result is certified
    where they give the same bits."""
    s = jnp.asarray(s, jnp.float64)
    a = jnp.asarray(a, jnp.float64)
    e = _interval_width(s, a, k, exact)
    zero = a == 0
    finite = jnp.isfinite(s) & jnp.isfinite(a)
    if _cell_check_applies(fmt, mode):
        r = round_to(s, fmt, mode)
        ok = _inside_cell(s, e, r, fmt)
        if exact is not None:
            ok = ok | exact
        # a zero s is certified only where it is the exact sum (or all terms are zero): +0.
        # (r then does not depend on a, so a bound computed on the fly is never stored)
        return jnp.where(s == 0, jnp.zeros_like(r), r), zero | (ok & finite)
    lo = round_to(s - e, fmt, mode)
    r = round_to(s + e, fmt, mode)
    ok = lax.bitcast_convert_type(lo, jnp.uint64) == lax.bitcast_convert_type(r, jnp.uint64)
    return jnp.where(zero, jnp.zeros_like(r), r), zero | (ok & finite)


def _merge(first, second):
    """Results of two certificates: the first where it holds, else the second."""
    (r1, ok1), (r2, ok2) = first, second
    return jnp.where(ok1, r1, r2), ok1 | ok2


def certified_sum(x, out: Format, mode, kmin: int = -1074, kmax: int = 1024, nonneg: bool = False,
                  exact_fallback: bool = True):
    """:func:`exact_sum`'s result (bit for bit, where every term is inside the bounds),
    from a float64 sum wherever :func:`certify` vouches for it. Three stages, each run
    only if the one before left some element of the batch uncertified: the interval
    from γ_k; then with exactness (the terms' lowest set bits, a pass over them); then
    the superaccumulator. ``nonneg``: no term is negative (then Σ|t| is the sum).

    Without ``exact_fallback`` the third stage is left out and ``(r, ok)`` returned:
    where ``ok`` is false, ``r`` is not certified (callers that redo such sums in
    another way keep the superaccumulator out of their compiled code)."""
    x64 = jnp.asarray(x).astype(jnp.float64)
    k = x.shape[-1]
    s = jnp.sum(x64, axis=-1)
    a = s if nonneg else jnp.sum(jnp.abs(x64), axis=-1)
    first = certify(s, a, k, out, mode)

    def with_exactness():
        return _merge(first, certify(s, a, k, out, mode, _exact_in_float64(a, jnp.min(lsb_exponent(x64), axis=-1))))

    r, ok = _cond(jnp.all(first[1]), lambda: first, with_exactness)
    if not exact_fallback:
        return r.astype(x.dtype), ok
    r = _cond(jnp.all(ok), lambda: r, lambda: jnp.where(ok, r, exact_sum(x64, out, mode, kmin, kmax)))
    return r.astype(x.dtype)


def _block_size(emu: "Emulator", k: int) -> int:
    return k if emu.order.kind == "exact" else emu.order.block


def matmul_stats(emu: "Emulator", w):
    """What :func:`certified_matmul` needs of its right operand ``w`` (k, n), computed
    once for many left operands: per column, the lowest set bit, and per block of the
    contraction axis the 2-norm and the largest magnitude."""
    w = jnp.asarray(w).astype(jnp.float64)
    wr = _blocked(w, _block_size(emu, w.shape[0]), 0)
    return (jnp.min(lsb_exponent(w), axis=0), jnp.sqrt(jnp.sum(wr * wr, axis=1)).T, jnp.max(jnp.abs(wr), axis=1).T)


def row_norms(emu: "Emulator", x, two_norm: bool = True):
    """Per row of ``x`` (m, k) and block of the contraction axis: the 1-norm and (if
    ``two_norm``) the 2-norm, each (m, nb), for :func:`certified_matmul`."""
    x = jnp.asarray(x).astype(jnp.float64)
    xb = _blocked(x, _block_size(emu, x.shape[1]), 1)
    return jnp.sum(jnp.abs(xb), axis=-1), (jnp.sqrt(jnp.sum(xb * xb, axis=-1)) if two_norm else None)


def certified_matmul(emu: "Emulator", x, w, extra=None, *, w_stats=None, x_norms=None, x_quanta=True, two_norm=True,
                     tighter=True):
    """``x @ w`` (x: (m, k), w: (k, n)) in the policy's ``exact`` or ``blocked(b)`` order,
    from float64 matrix products, and where it is certified.

    ``exact``: one float64 product per entry, certified to round like the exact dot
    product to ``compute``. ``blocked(b)``: the contraction axis in blocks of ``b``,
    each block's dot certified to round like its exact value to ``accumulate``, block
    results added left to right in ``accumulate`` (rounded adds), then rounded to
    ``compute``: the same arithmetic as :meth:`Emulator.dot`.

    The certificate first bounds Σ|t| by the lesser of ‖x_i‖₁‖w_j‖∞ (Hölder) and, if
    ``two_norm``, ‖x_i‖₂‖w_j‖₂ (Cauchy–Schwarz; leave it off where x is large and the
    first is tight, as for attention weights), with γ_{k+3} covering their float64
    evaluation; the
    exactness test (every product is a multiple of 2^(lowest bit of its row of x +
    lowest bit of its column of w)) reads x's bits only if ``x_quanta`` (leave it off
    for a large x). Only if that leaves some entry uncertified is the product of
    absolute values formed and the exactness test made in full, as a second try
    (``tighter``; without it, a caller that redoes the open rows elsewhere keeps that
    stage out of its compiled code and runs it there: :func:`attention._linear`).
    ``w_stats``: :func:`matmul_stats` of ``w``, when it serves many calls; ``x_norms``:
    :func:`row_norms` of ``x``, when they were computed for a larger batch of rows (then
    XLA does not fuse the row reductions with the bound, which would store the bound).

    ``extra = (j, t)`` puts the term ``t[i]`` (shape (m, n), an exact product) at
    contraction index ``j[i]`` of row ``i``, where ``x[i, j[i]]`` must be zero (an
    attention query's own key and value, which take the place of the stream's).
    Returns ``(r, ok)`` with ``ok`` of shape (m, n): where it is false, ``r`` is not
    certified and the caller must use the op-by-op result.
    """
    mode = emu.mode
    x = jnp.asarray(x).astype(jnp.float64)
    w = jnp.asarray(w).astype(jnp.float64)
    b = _block_size(emu, x.shape[1])
    xr, wr = _blocked(x, b, 1), _blocked(w, b, 0)
    nb = xr.shape[1]
    qw, w2, wi = matmul_stats(emu, w) if w_stats is None else w_stats
    hi = lax.Precision.HIGHEST
    if nb == 1:  # a plain matrix product (the einsum's layout would cost a transposing copy)
        S = jnp.matmul(x, w, precision=hi)[..., None]
    else:
        S = jnp.einsum("mcb,cbn->mnc", xr, wr, precision=hi)  # (m, n, nb) block sums
    x1, x2 = row_norms(emu, x, two_norm) if x_norms is None else x_norms
    A = x1[:, None, :] * wi[None]
    if two_norm:
        A = jnp.minimum(A, x2[:, None, :] * w2[None])
    terms = b
    qt = None
    if extra is not None:
        j, t = extra
        at = (jnp.arange(nb)[None, :] == (j // b)[:, None])[:, None, :]  # (m, 1, nb)
        t = jnp.asarray(t).astype(jnp.float64)
        qt = lsb_exponent(t)[..., None]
        t = t[:, :, None]
        S = S + jnp.where(at, t, 0.0)
        terms = b + 1

    def with_extra(A):
        return A if extra is None else A + jnp.where(at, jnp.abs(t), 0.0)

    def quanta():
        q = (jnp.min(lsb_exponent(x), axis=1)[:, None] + qw[None, :])[..., None]
        return q if qt is None else jnp.minimum(q, qt)

    fmt = emu.compute if emu.order.kind == "exact" else emu.accumulate
    A = with_extra(A)
    first = certify(S, A, terms + 3, fmt, mode, _exact_in_float64(A, quanta()) if x_quanta else None)

    def second():
        A = with_extra(jnp.einsum("mcb,cbn->mnc", jnp.abs(xr), jnp.abs(wr), precision=hi))
        return _merge(first, certify(S, A, terms, fmt, mode, _exact_in_float64(A, quanta())))

    r, ok = _cond(jnp.all(first[1]), lambda: first, second) if tighter else first
    if emu.order.kind == "exact":
        return r[..., 0].astype(emu.dtype), ok[..., 0]
    r = round_to(_sequential(r, _rounded_add(emu.accumulate, mode)), emu.compute, mode)
    return r.astype(emu.dtype), jnp.all(ok, axis=-1)
