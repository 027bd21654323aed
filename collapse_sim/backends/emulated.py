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

What it computes is specified in docs/semantics.md: :class:`Emulator` implements
the elementary ops (§2) and the reduction orders and dot products (§3.1, §3.2);
:class:`EmulatedBackend` the mean and norms (§4), the rounding of weights and
constants to storage (§5.1-§5.6), linear layers (§7) and the attention with its
masked columns, window and probes (§3.3, §8, §10). Known departures (§12): ``exp``
beyond float64's range under directed modes.
"""

from __future__ import annotations

import functools
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..errors import CollapseSimError
from ..formats import Format
from ..policy import Order, Policy
from ..rounding import Mode, round_to
from ._jit import JaxBackendBase


class CarrierError(CollapseSimError):
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
        fmts = self.policy.formats()
        # every reduction term is a format value or a product of two: multiples of
        # 2**(2 qmin) below 2**(2 emax + 2)
        self.bounds = (2 * min(f.min_exponent_of_quantum for f in fmts), 2 * max(f.emax for f in fmts) + 2)

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
        return reduce_sum(x, order or self.policy.order, self.policy.accumulate, out_fmt or self.policy.compute, self.mode,
                          bounds=self.bounds)

    def dot(self, a, b, out_fmt: Format | None = None, order: Order | None = None, path: str = "certified"):
        """Vector dot product over the last axis (batched over the rest).

        Products of two carrier values are exact in the carrier; each is rounded
        to ``accumulate`` (exact if that format has >= 2p bits), then reduced.
        The ``exact`` and ``blocked`` orders use the exact products (``path``: how
        their exact sums are taken, see :func:`reduce_sum`).
        """
        a, b = jnp.broadcast_arrays(jnp.asarray(a, self.dtype), jnp.asarray(b, self.dtype))
        prod = a * b
        order = order or self.policy.order
        if order.kind not in ("exact", "blocked"):
            prod = self.rnd(prod, self.policy.accumulate)
        return reduce_sum(prod, order, self.policy.accumulate, out_fmt or self.policy.compute, self.mode,
                          bounds=self.bounds, path=path)

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
    s = _round_to_odd(s, err)
    if mode is Mode.RD:  # IEEE 754 §6.3: an exact zero sum is -0 when rounding down, unless both are +0
        both_plus_zero = (a == 0) & (b == 0) & ~jnp.signbit(a) & ~jnp.signbit(b)
        s = jnp.where((s == 0) & ~both_plus_zero, -jnp.zeros_like(s), s)
    return s


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


def _rounded_add(acc: Format, mode):
    """One correctly rounded add in the accumulate format."""

    def add(u, v):
        return round_to(carrier_add(u, v, mode), acc, mode)

    return add


_PATHS = ("certified", "float64", "superacc")


def reduce_sum(x, order: Order, acc: Format, out: Format, mode, valid=None, bounds=(-1074, 1024), nonneg=False,
               path: str = "certified"):
    """Reduce the last axis. Masked-out terms must be zeros; ``valid`` (same shape)
    is needed only by ``kahan``, whose state would change on trailing zeros.
    ``bounds`` = (kmin, kmax) of the terms for the exact superaccumulator; ``nonneg``:
    no term is negative (saves the exact and blocked orders a pass).

    ``path``: how the exact and blocked orders get their exact sums (all give the
    same bits). ``"certified"``: float64 sums where :func:`certify` vouches for them,
    the superaccumulator elsewhere. ``"float64"``: the certificate only, returning
    ``(s, ok)``; where ``ok`` is false ``s`` is not the result and the caller must
    redo it (other orders are always ok). ``"superacc"``: :func:`exact_sum` only, for
    code that redoes what the certificate left open (no certificate, no branches)."""
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, not {path!r}")
    with_ok = path == "float64"
    if x.shape[-1] == 0:
        s = jnp.zeros(x.shape[:-1], x.dtype)
        return (s, jnp.ones(s.shape, bool)) if with_ok else s
    r = functools.partial(round_to, mode=mode)
    add = _rounded_add(acc, mode)
    ok = None

    def exact(x, fmt):
        if path == "superacc":
            return exact_sum(x, fmt, mode, *bounds).astype(x.dtype)
        return certified_sum(x, fmt, mode, *bounds, nonneg=nonneg, exact_fallback=not with_ok)

    if order.kind == "sequential":
        s = _sequential(x, add)
    elif order.kind == "pairwise":
        s = _pairwise(x, add)
    elif order.kind == "kahan":
        s = _kahan(x, add, valid)
    elif order.kind == "exact":
        return exact(x, out)
    elif order.kind == "blocked":
        b = order.block
        blocks = exact(_blocked(x.reshape(-1, x.shape[-1]), b, 1).reshape(*x.shape[:-1], -1, b), acc)
        if with_ok:
            blocks, ok = blocks[0], jnp.all(blocks[1], axis=-1)
        s = _sequential(blocks, add)
    else:  # pragma: no cover - Order validates kinds
        raise ValueError(order)
    s = r(s, out)
    if not with_ok:
        return s
    return s, (jnp.ones(s.shape, bool) if ok is None else ok)


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


def _kahan(x, add, valid=None):
    xs = jnp.moveaxis(x, -1, 0)
    vs = jnp.ones(xs.shape, bool) if valid is None else jnp.moveaxis(valid, -1, 0)

    def step(carry, inp):
        s, c = carry
        v, ok = inp
        y = add(v, -c)
        t = add(s, y)
        c2 = add(add(t, -s), -y)
        return (jnp.where(ok, t, s), jnp.where(ok, c2, c)), None

    (s, _), _ = lax.scan(step, (xs[0], jnp.zeros_like(xs[0])), (xs[1:], vs[1:]))
    return s


# --------------------------------------------------------------------------
# Certified rounding of exact sums from float64 evaluations.
#
# Rounding an exact sum needs the exact sum only where it lies close to a rounding
# boundary of the target format. A float64 evaluation s of a sum of k terms, in any
# order (a tree, a BLAS kernel, with or without FMA), satisfies |s - S| <= γ_k Σ|t_i|
# with γ_k = k u / (1 - k u), u = 2^-53 (Higham 2002, §3.1 and §4.2), provided no
# partial result is subnormal (XLA:CPU flushes them). If rounding both ends of an
# interval that contains S gives the same bits, every point in between rounds to
# them too (rounding is monotone), so S does. Where the check fails, the exact
# superaccumulator decides. Products of two format values are exact float64
# numbers, so the same holds for dot products evaluated by float64 matrix products.
#
# Often the float64 evaluation is exact: if every term is a multiple of 2^q and
# Σ|t| < 2^(53+q), every partial sum (in any order) is a float64 number. Then the
# interval has width zero and even an exact midpoint (common: a block of bf16
# products has far fewer than 53 significant bits) is certified.

_U64 = 2.0**-53
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


def _cell_check_applies(fmt: Format, mode) -> bool:
    return mode is Mode.RNE and fmt.subnormals and fmt.signed_zero and fmt.p < 52


def _inside_cell(s, e, r, fmt: Format):
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
    H = _pow2(jnp.maximum(E, fmt.emin) - fmt.p)
    pow2 = ((bits & jnp.uint64((1 << 52) - 1)) == 0) & (E > fmt.emin)
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


def _cond(pred, if_true, if_false):
    """``lax.cond`` under a trace; a Python branch on concrete values (eager calls then
    compile only the branch they take)."""
    if isinstance(pred, jax.core.Tracer):
        return lax.cond(pred, if_true, if_false)
    return if_true() if bool(pred) else if_false()


def _blocked(a, b: int, axis: int):
    """``a`` zero-padded along ``axis`` (the contraction axis) to whole blocks of ``b`` and
    split: x (m, k) -> (m, nb, b) for axis 1, w (k, n) -> (nb, b, n) for axis 0."""
    k = a.shape[axis]
    nb = -(-k // b)
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, nb * b - k)
    a = jnp.pad(a, pad)
    return a.reshape(a.shape[0], nb, b) if axis == 1 else a.reshape(nb, b, a.shape[1])


def _block_size(emu: "Emulator", k: int) -> int:
    return k if emu.policy.order.kind == "exact" else emu.policy.order.block


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


def certified_matmul(emu: "Emulator", x, w, extra=None, *, w_stats=None, x_norms=None, x_quanta=True, two_norm=True):
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
    absolute values formed and the exactness test made in full, as a second try.
    ``w_stats``: :func:`matmul_stats` of ``w``, when it serves many calls; ``x_norms``:
    :func:`row_norms` of ``x``, when they were computed for a larger batch of rows (then
    XLA does not fuse the row reductions with the bound, which would store the bound).

    ``extra = (j, t)`` puts the term ``t[i]`` (shape (m, n), an exact product) at
    contraction index ``j[i]`` of row ``i``, where ``x[i, j[i]]`` must be zero (an
    attention query's own key and value, which take the place of the stream's).
    Returns ``(r, ok)`` with ``ok`` of shape (m, n): where it is false, ``r`` is not
    certified and the caller must use the op-by-op result.
    """
    pol, mode = emu.policy, emu.mode
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

    fmt = pol.compute if pol.order.kind == "exact" else pol.accumulate
    A = with_extra(A)
    first = certify(S, A, terms + 3, fmt, mode, _exact_in_float64(A, quanta()) if x_quanta else None)

    def tighter():
        A = with_extra(jnp.einsum("mcb,cbn->mnc", jnp.abs(xr), jnp.abs(wr), precision=hi))
        return _merge(first, certify(S, A, terms, fmt, mode, _exact_in_float64(A, quanta())))

    r, ok = _cond(jnp.all(first[1]), lambda: first, tighter)
    if pol.order.kind == "exact":
        return r[..., 0].astype(emu.dtype), ok[..., 0]
    r = round_to(_sequential(r, _rounded_add(pol.accumulate, mode)), pol.compute, mode)
    return r.astype(emu.dtype), jnp.all(ok, axis=-1)


# --------------------------------------------------------------------------
# Exact summation: a fixed-point superaccumulator of 32-bit limbs in int64.

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


# --------------------------------------------------------------------------
# The model backend.

_BLOCK_ELEMS = 1 << 21  # elements of one (queries x keys x head-dim) block
_EXACT_SHRINK = 8  # exact and blocked orders: the superaccumulator holds ~20 int64 limbs per term


class EmulatedBackend(JaxBackendBase):
    """Model primitives of collapse_sim.model, every op rounded per the policy
    (docs/semantics.md §4-§10).

    Attention for query i over key columns 0..qpos_i (causal; a window zeroes
    the columns before ``qpos_i - w + 1``):

        s_ij = round_c(round_c(dot(q_i, k_j)) * scale) [+ alibi bias]  → softmax format
        m_i  = max_j s_ij (if max_subtract)
        e_ij = exp(s_ij - m_i) in the softmax format (masked: exact 0)
        α_ij = e_ij / Σ_j e_ij   (sum in the policy's order, accumulate format)
        out_i = Σ_j α_ij v_j     (α in the compute format; dot in the policy's order)

    Reductions run over all key columns with masked terms as exact zeros,
    which is the same (bit for bit) as running over the prefix only for every
    order (kahan skips masked terms explicitly). Queries are processed in
    blocks, so memory is O(block · N · d_h), never N × N × d_h.
    """

    kind = "emulated"

    def __init__(self, policy: "Policy | str", *, shard: bool = False):
        self.emu = Emulator(policy)
        self.policy = self.emu.policy
        self.dtype = self.emu.dtype
        self.shard = shard and jax.device_count() > 1
        self.label = f"emulated:{self.policy}" + (f":sharded{jax.device_count()}" if self.shard else "")

    def describe(self) -> dict:
        return {"backend": "emulated", "policy": str(self.policy), "carrier": str(self.dtype),
                "compiler_options": self.compiler_options()}

    def compiler_options(self) -> dict:
        """On CPU, XLA's older loop emitters instead of its MLIR fusion emitters. Measured
        on jax 0.10 (docs/backends.md): the same bits (the arithmetic is explicit), half
        the compile memory (a forward at N = 4096: 1.26 -> 0.57 GiB peak), a pairwise
        forward 1.8x faster, the certified orders as fast or faster."""
        return {"xla_cpu_use_fusion_emitters": False} if jax.default_backend() == "cpu" else {}

    # data
    def store(self, x):
        return self.emu.store(jnp.asarray(x, jnp.float64))

    def const(self, c, like):
        return jnp.broadcast_to(self.store(jnp.float64(c)), like.shape)

    def to_numpy(self, x):
        return np.asarray(x, dtype=np.float64)

    # arithmetic
    def add(self, a, b):
        a, b = jnp.broadcast_arrays(a, b)
        return self.emu.add(a, b)

    def sub(self, a, b):
        a, b = jnp.broadcast_arrays(a, b)
        return self.emu.sub(a, b)

    def mul(self, a, b):
        a, b = jnp.broadcast_arrays(a, b)
        return self.emu.mul(a, b)

    def div(self, a, b):
        return self.emu.div(a, b)

    def sqrt(self, a):
        return self.emu.sqrt(a)

    def relu(self, x):
        return jnp.maximum(x, jnp.zeros_like(x))  # exact

    def mean(self, x):
        # docs/semantics.md §4.1: ∘(∘(Σ x) ÷ d), d the exact integer (a carrier value)
        n = x.shape[-1]
        s = self.emu.sum(x)
        return self.emu.div(s, jnp.full(s.shape, float(n), self.dtype))

    def linear(self, x, w):
        return _linear(self.emu, x, w)

    def attention(self, q, k, v, qpos, kpos, scale, alibi=None, window=None, self_kv=None):
        del kpos  # keys sit at positions 0..Nk-1
        if self.shard:
            return _sharded(self.emu, q, k, v, np.asarray(qpos), scale, alibi, window, self_kv)
        if isinstance(qpos, np.ndarray) and np.all(np.diff(qpos) >= 0) and _segment_count(self.emu, qpos.size) > 1:
            return _causal_segments(self.emu, q, k, v, qpos, scale, alibi, window, self_kv)
        return _emulated_attention(self.emu, q, k, v, jnp.asarray(qpos), scale, alibi, window, self_kv)


_SEGMENTS = 8  # at most this many query segments with their own causal key length (one compiled body each)
# Queries per segment where a segment pays for itself: S segments do (S + 1) / (2 S) of the
# attention's work but compile S bodies. With run time T(N) of one unsegmented attention and
# c seconds to compile one more body, S = sqrt(T / 2c) minimises the sum. Measured on 2 cores
# (jax 0.10.2, d = 64): op by op (pairwise) T(2000) ≈ 4 s and c ≈ 2.9 s, so S ≈ N / 2400;
# certified orders (exact, blocked) T(4096) ≈ 1.1 s and c ≈ 2.3 s, so S ≈ N / 17000.
_QUERIES_PER_SEGMENT = {False: 2400, True: 17000}


def _segment_count(emu: Emulator, nq: int) -> int:
    """How many causal segments an attention over ``nq`` queries runs in (1: unsegmented)."""
    return int(min(_SEGMENTS, max(1, round(nq / _QUERIES_PER_SEGMENT[_certified(emu)]))))


def _causal_segments(emu: Emulator, q, k, v, qpos: np.ndarray, scale, alibi, window, self_kv,
                     segments: "int | None" = None):
    """Causal attention in ``segments`` runs of queries (default :func:`_segment_count`),
    each over the keys it can see.

    Query positions are static and non-decreasing, so the queries of a segment need
    keys ``0..max(qpos)`` only. Dropping the trailing (masked, exactly zero) columns
    changes no sum of any order: sequential and blocked sums add exact zeros at the
    end, pairwise trees over any power-of-two padding at least as long agree, kahan
    skips masked terms and exact sums ignore zeros (proofs/reduction_orders.md). With
    S segments it saves (S - 1) / (2 S) of the work (44% at S = 8)."""
    nq = q.shape[0]
    segments = _segment_count(emu, nq) if segments is None else segments
    bounds = np.linspace(0, nq, segments + 1).astype(int)
    certified = _certified(emu)
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if a == b:
            continue
        top = int(qpos[b - 1])
        kl = min(k.shape[0], top if self_kv is not None else top + 1)
        skv = None if self_kv is None else (self_kv[0][a:b], self_kv[1][a:b])
        seg = (emu, q[a:b], k[:kl], v[:kl], jnp.asarray(qpos[a:b]), scale, alibi, window, skv)
        if certified:
            run = functools.partial(_certified_attention, *seg)
        else:
            run = lambda seg=seg: (_op_by_op_attention(*seg), None)  # noqa: E731
        outs.append(_after(outs[-1][0] if outs else None, run, (b - a, q.shape[1]), certified))
    o = jnp.concatenate([x for x, _ in outs], axis=0)
    if not certified:
        return o
    ok = jnp.concatenate([x for _, x in outs])
    return _fill_uncertified(emu, o, ok, q, k, v, qpos, scale, alibi, window, self_kv)  # one op-by-op body for all


def _after(dep, run, shape, with_ok: bool):
    """``run()``, which gives ``(o, ok)`` (``ok`` None unless ``with_ok``), ordered after
    ``dep`` has been computed under a trace. XLA would otherwise schedule the independent
    causal segments side by side and keep every segment's key and value copies live
    at once (about 1 GiB at N = 65,536); an optimization barrier does not survive its
    passes, but a conditional on a predicate it cannot fold does. The predicate
    (``dep``'s NaN count is not negative) is always true; the other branch is never
    taken."""
    if dep is None or not isinstance(dep, jax.core.Tracer):
        return run()
    never = lambda: (jnp.zeros(shape, dep.dtype), jnp.zeros(shape[0], bool) if with_ok else None)  # noqa: E731
    return lax.cond(jnp.sum(jnp.isnan(dep), dtype=jnp.int32) >= 0, run, never)


def _sharded(emu: Emulator, q, k, v, qpos: np.ndarray, scale, alibi, window, self_kv):
    """The query axis split over every device (``jax.shard_map``), keys and values
    replicated: each query row is computed exactly as unsharded, so the bits agree.
    Test on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``."""
    from jax.sharding import Mesh, PartitionSpec as P

    ndev = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("q",))
    nq = q.shape[0]
    pad = -nq % ndev
    qp = jnp.concatenate([q, jnp.zeros((pad, q.shape[1]), q.dtype)])
    pos = jnp.asarray(np.concatenate([qpos, np.full(pad, qpos[-1] if nq else 0)]))
    kp, vp = _own_kv(q, self_kv)
    kp = jnp.concatenate([kp, jnp.zeros((pad, kp.shape[1]), kp.dtype)])
    vp = jnp.concatenate([vp, jnp.zeros((pad, vp.shape[1]), vp.dtype)])

    def local(qs, ps, kps, vps, k_, v_):
        skv = (kps, vps) if self_kv is not None else None
        return _emulated_attention(emu, qs, k_, v_, ps, scale, alibi, window, skv)

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("q"), P("q"), P("q"), P("q"), P(), P()), out_specs=P("q"))
    return f(qp, pos, kp, vp, k, v)[:nq]


def _blocks(n: int, per_row: int) -> tuple[int, int]:
    b = max(1, min(n, _BLOCK_ELEMS // max(1, per_row)))
    return b, -(-n // b)


def _pad_rows(a, nb, b):
    pad = nb * b - a.shape[0]
    return jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]).reshape(nb, b, *a.shape[1:])


def _map_rows(fn, args, b: int):
    """``fn`` over blocks of ``b`` rows of each of ``args`` (arrays of n rows, zero-padded
    to whole blocks; ``fn`` takes the tuple of blocks), by ``lax.map``; every output
    rejoined to n rows."""
    n = args[0].shape[0]
    nb = -(-n // b)
    out = lax.map(fn, tuple(_pad_rows(a, nb, b) for a in args))
    return jax.tree.map(lambda o: o.reshape(nb * b, *o.shape[2:])[:n], out)


def _certified(emu: Emulator) -> bool:
    """Whether dot products can come from float64 matrix products (:func:`certified_matmul`)."""
    return emu.policy.order.kind in ("exact", "blocked")


def _linear(emu: Emulator, x, w):
    """``x @ w``, each entry an :meth:`Emulator.dot`: from certified float64 matrix
    products in blocks of rows where the policy allows, op by op for the rows they
    leave uncertified (:func:`_fill_rows`); op by op otherwise."""
    n, din = x.shape
    dout = w.shape[1]
    wt = w.T  # (dout, din)

    def op_by_op(xb, path="certified"):
        ae, be = jnp.broadcast_arrays(xb[:, None, :], wt[None, :, :])
        return emu.dot(ae, be, path=path)

    if not _certified(emu):
        return _map_rows(lambda a: op_by_op(a[0]), (x,), _blocks(n, din * dout)[0])
    wstats = matmul_stats(emu, w)

    def block(a):
        r, ok = certified_matmul(emu, a[0], w, w_stats=wstats)
        return r, jnp.all(ok, axis=-1)

    r, ok = _map_rows(block, (x,), max(1, min(n, _BLOCK_ELEMS // (4 * dout))))
    b, _ = _blocks(n, din * dout * _EXACT_SHRINK)
    redo = functools.partial(op_by_op, path="superacc")  # where the certificate failed
    return _fill_rows(r, ok, (x,), redo, b)


def masked_softmax(emu: Emulator, s, valid, path: str = "certified"):
    """Softmax of each row of ``s`` over its ``valid`` entries, as the attention does it:
    scores rounded to the softmax format, the row maximum subtracted (if the policy
    says so), exp, the denominator reduced in the policy's order and accumulate
    format, one division, weights rounded to the compute format. Masked entries are
    exact zeros, which leave every reduction order's result unchanged.

    ``path``: how the denominator's exact sum is taken (:func:`reduce_sum`); with
    ``"float64"`` the result is ``(alpha, ok)``, ``ok`` marking the rows whose
    denominator was certified (the other rows must be redone)."""
    pol, mode = emu.policy, emu.mode
    same = pol.softmax == pol.compute  # then both roundings between them are identities
    s = jnp.asarray(s, emu.dtype)
    if not same:
        s = round_to(s, pol.softmax, mode)
    if pol.max_subtract:
        m = jnp.max(jnp.where(valid, s, jnp.asarray(-jnp.inf, emu.dtype)), axis=-1)
        s = emu.sub(s, jnp.broadcast_to(m[:, None], s.shape), pol.softmax)
    e = emu.exp(s, pol.softmax)
    e = jnp.where(valid, e, jnp.zeros_like(e))
    den = reduce_sum(e, pol.order, pol.accumulate, pol.softmax, mode, valid, emu.bounds, nonneg=True,  # exp >= 0
                     path=path)
    with_ok = path == "float64"
    if with_ok:
        den, ok = den
    alpha = emu.div(e, jnp.broadcast_to(den[:, None], e.shape), pol.softmax)
    alpha = alpha if same else round_to(alpha, pol.compute, mode)
    return (alpha, ok) if with_ok else alpha


def _emulated_attention(emu: Emulator, q, k, v, qpos, scale, alibi, window, self_kv):
    """Attention of queries ``q`` at positions ``qpos`` over keys ``0..len(k)-1``: from
    certified float64 matrix products where the policy allows (exact and blocked
    orders), op by op for every query row they leave uncertified; op by op otherwise."""
    if not _certified(emu):
        return _op_by_op_attention(emu, q, k, v, qpos, scale, alibi, window, self_kv)
    o, ok = _certified_attention(emu, q, k, v, qpos, scale, alibi, window, self_kv)
    return _fill_uncertified(emu, o, ok, q, k, v, qpos, scale, alibi, window, self_kv)


def _prepare(emu: Emulator, q, k, v, qpos, scale, alibi, window, self_kv):
    """What the op-by-op and certified attention share: keys and values with a slot for
    a query's own key and value (``self_kv``), and ``weights``, which turns raw scores
    (B, nk) of queries at positions pb into attention weights and the key mask."""
    pol, mode, dt = emu.policy, emu.mode, emu.dtype
    if self_kv is not None:
        k = jnp.concatenate([k, jnp.zeros((1, k.shape[1]), dt)])
        v = jnp.concatenate([v, jnp.zeros((1, v.shape[1]), dt)])
    nk = k.shape[0]
    cols = jnp.arange(nk)
    sc = emu.store(jnp.float64(scale))
    kp, vp = _own_kv(q, self_kv)
    bias_table = None
    if alibi is not None:  # -slope·distance for every distance, rounded once (a gather per block)
        maxd = max(nk, int(qpos.shape[0])) + 1
        bias_table = round_to(-alibi * jnp.arange(maxd, dtype=jnp.float64), pol.storage, mode).astype(dt)

    def weights(s, pb, path="certified"):
        s = emu.mul(s, jnp.broadcast_to(sc, s.shape))
        if alibi is not None:
            dist = jnp.clip(pb[:, None] - cols[None, :], 0, bias_table.shape[0] - 1)  # masked entries: any valid index
            s = emu.add(s, bias_table[dist])
        valid = cols[None, :] <= pb[:, None]
        if window is not None:
            valid = valid & (cols[None, :] > pb[:, None] - window)
        return masked_softmax(emu, s, valid, path), valid

    return k, v, kp, vp, cols, weights


def _own_kv(q, self_kv):
    """Each query's own key and value (``self_kv``), or zeros of ``q``'s shape."""
    if self_kv is None:
        return jnp.zeros_like(q), jnp.zeros_like(q)
    return self_kv


def _op_by_op_attention(emu: Emulator, q, k, v, qpos, scale, alibi, window, self_kv, path: str = "certified"):
    """Attention with every dot product and sum an :class:`Emulator` reduction, in
    blocks of query rows over all keys. ``path``: how the exact and blocked orders
    take their exact sums (:func:`reduce_sum`; ``"superacc"`` where the certificate
    already failed)."""
    pol, mode = emu.policy, emu.mode
    k, v, kp, vp, cols, weights = _prepare(emu, q, k, v, qpos, scale, alibi, window, self_kv)
    nk, dh = k.shape

    def block(args):
        qb, pb, kpb, vpb = args  # (B, dh), (B,), (B, dh), (B, dh)
        is_self = cols[None, :] == pb[:, None]  # (B, nk)
        K = jnp.broadcast_to(k[None], (qb.shape[0], nk, dh))
        if self_kv is not None:
            K = jnp.where(is_self[:, :, None], kpb[:, None, :], K)
        Q = jnp.broadcast_to(qb[:, None, :], K.shape)
        alpha, valid = weights(emu.dot(Q, K, path=path), pb, path)  # scores: (B, nk), compute format
        V = jnp.broadcast_to(v[None], K.shape)
        if self_kv is not None:
            V = jnp.where(is_self[:, :, None], vpb[:, None, :], V)
        A = jnp.broadcast_to(alpha[:, :, None], V.shape)
        prod = A * V  # exact in the carrier
        prod = jnp.swapaxes(prod, 1, 2)  # (B, dh, nk): reduce over keys
        if pol.order.kind not in ("exact", "blocked"):
            prod = round_to(prod, pol.accumulate, mode)
        vmask = jnp.broadcast_to(valid[:, None, :], prod.shape)
        return reduce_sum(prod, pol.order, pol.accumulate, pol.compute, mode, vmask, emu.bounds, path=path)

    b, _ = _blocks(q.shape[0], nk * dh * (_EXACT_SHRINK if _certified(emu) else 1))
    return _map_rows(block, (q, qpos, kp, vp), b)


def _certified_attention(emu: Emulator, q, k, v, qpos, scale, alibi, window, self_kv):
    """``(o, ok)``: attention from float64 matrix products (:func:`certified_matmul`),
    whole rows of scores at a time; ``ok`` (nq,) marks the query rows whose every dot
    product was certified. The others must be recomputed op by op."""
    k, v, kp, vp, cols, weights = _prepare(emu, q, k, v, qpos, scale, alibi, window, self_kv)
    nk = k.shape[0]
    bf = max(1, min(q.shape[0], _BLOCK_ELEMS // (4 * nk)))
    kstats, vstats = matmul_stats(emu, k.T), matmul_stats(emu, v)  # once for every block

    def block(args):
        qb, pb, kpb, vpb, qn1, qn2 = args
        is_self = cols[None, :] == pb[:, None]
        s, ok_s = certified_matmul(emu, qb, k.T, w_stats=kstats, x_norms=(qn1, qn2))
        if self_kv is not None:
            s = jnp.where(is_self, emu.dot(qb, kpb)[:, None], s)
            ok_s = ok_s | is_self
        (alpha, ok_den), _ = weights(s, pb, "float64")
        extra = None
        if self_kv is not None:
            a_self = jnp.sum(jnp.where(is_self, alpha, jnp.zeros_like(alpha)), axis=-1)  # one nonzero term
            extra = (pb, a_self[:, None] * vpb)
            alpha = jnp.where(is_self, jnp.zeros_like(alpha), alpha)
        o, ok_o = certified_matmul(emu, alpha, v, extra, w_stats=vstats, x_quanta=False, two_norm=False)
        return o, jnp.all(ok_s, axis=-1) & ok_den & jnp.all(ok_o, axis=-1)

    args = (q, qpos, kp, vp, *row_norms(emu, q))  # the query norms, too, once for every block
    return _map_rows(block, args, bf)


def _fill_uncertified(emu: Emulator, o, ok, q, k, v, qpos, scale, alibi, window, self_kv):
    """``o`` with every row that ``ok`` leaves uncertified recomputed op by op, in
    blocks of query rows over all keys (masked keys are exact zeros, which change no
    reduction order's result). The op-by-op code is compiled once per attention call,
    never per causal segment, and runs only for the blocks holding such a row."""
    nk = k.shape[0] + (self_kv is not None)
    b, _ = _blocks(o.shape[0], nk * o.shape[1] * _EXACT_SHRINK)

    def redo(qb, pb, kpb, vpb):
        skv = None if self_kv is None else (kpb, vpb)
        return _op_by_op_attention(emu, qb, k, v, pb, scale, alibi, window, skv, "superacc")

    return _fill_rows(o, ok, (q, jnp.asarray(qpos), *_own_kv(q, self_kv)), redo, b)


def _fill_rows(out, ok, args, redo, b: int):
    """``out`` (n, m) with the rows that ``ok`` (n,) leaves false replaced by ``redo``,
    which maps blocks of ``b`` rows of each of ``args`` (arrays of n rows) to (b, m)
    rows. ``redo`` runs only for the blocks holding such a row: a Python loop on
    concrete values, a ``fori_loop`` over exactly those blocks under a trace (a loop
    with a cond per block would copy ``out`` each time)."""
    n, m = out.shape
    nb = -(-n // b)
    rows = tuple(_pad_rows(a, nb, b).reshape(nb * b, *a.shape[1:]) for a in args)
    okp = jnp.concatenate([ok, jnp.ones(nb * b - n, bool)])
    outp = _pad_rows(out, nb, b).reshape(nb * b, m)

    def one(i, out):
        new = redo(*(lax.dynamic_slice_in_dim(a, i * b, b) for a in rows))
        keep = lax.dynamic_slice_in_dim(okp, i * b, b)
        old = lax.dynamic_slice_in_dim(out, i * b, b)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(keep[:, None], old, new), i * b, 0)

    if not isinstance(okp, jax.core.Tracer):
        for i in np.flatnonzero(~np.asarray(okp).reshape(nb, b).all(axis=1)):
            outp = one(int(i), outp)
        return outp[:n]

    def loop():
        need = ~jnp.all(okp.reshape(nb, b), axis=1)
        which = jnp.nonzero(need, size=nb, fill_value=0)[0]
        return lax.fori_loop(0, jnp.sum(need), lambda j, out: one(which[j], out), outp)

    return _cond(jnp.all(ok), lambda: outp, loop)[:n]
