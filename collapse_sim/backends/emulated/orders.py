"""The reduction orders: the specification of every emulated sum (docs/semantics.md §3.1,
§3.4).

``sequential`` (left to right), ``pairwise`` (a tree over a power-of-two padding),
``kahan`` (compensated) and the split of the ``blocked`` order into blocks, each add
one correctly rounded add in the accumulate format. The ``exact`` order and the blocks'
exact sums are :func:`exact.exact_sum`; :func:`ops.reduce_sum` puts them together.
The accumulator models ``tcfma`` and ``promote`` (§3.4) run in float64 whatever the
carrier (:func:`_tcfma`, :func:`_promote`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from ...formats import Format, floor_log2
from ...policy import Order
from ...rounding import FormatParams, Mode, round_to
from .._rows import _computed_once, _cond
from .carrier import CarrierError, carrier_add
from .exact import _exponent, _pow2


def _rounded_add(acc: Format, mode):
    """One correctly rounded add in the accumulate format (``draws``: stochastic rounding's)."""

    def add(u, v, draws=None):
        return round_to(carrier_add(u, v, mode), acc, mode, draws=draws)

    return add


def _sequential(x, add, draws=None):
    """Left to right; ``draws`` (stochastic rounding): one array of draws per add, stacked
    along the first axis."""
    xs = jnp.moveaxis(x, -1, 0)

    def step(s, v):
        return add(s, *v), None

    s, _ = lax.scan(step, xs[0], (xs[1:],) if draws is None else (xs[1:], draws))
    return s


def tree_width(n: int) -> int:
    """The width of the pairwise tree over ``n`` terms: the next power of two (the terms past ``n`` are zeros)."""
    return 1 << max(0, (n - 1).bit_length())


def to_tree_width(x, axis: int = -1):
    """``x`` padded with zeros (False for a mask) along ``axis`` to :func:`tree_width` of its length
    (an empty axis stays empty: an empty sum is 0 without a tree)."""
    n = x.shape[axis]
    if n == 0:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, tree_width(n) - n)
    return jnp.pad(x, pad)


def _pairwise(x, add):
    x = to_tree_width(x)
    while x.shape[-1] > 1:
        x = add(x[..., 0::2], x[..., 1::2])
    return x[..., 0]


def _kahan(x, add, valid=None):
    """Compensated summation of the ``valid`` terms only (masked terms must be zeros): the
    first valid term starts the sum as it is (not rounded to the accumulator), as §3.1's
    ``s = x_0`` over the unmasked terms (§3.3); with none, the sum is 0."""
    xs = jnp.moveaxis(x, -1, 0)
    vs = jnp.ones(xs.shape, bool) if valid is None else jnp.moveaxis(valid, -1, 0)

    def step(carry, inp):
        s, c, started = carry
        v, ok = inp
        y = add(v, -c)
        t = add(s, y)
        c2 = add(add(t, -s), -y)
        return (jnp.where(ok, jnp.where(started, t, v), s), jnp.where(ok & started, c2, c), started | ok), None

    (s, _, _), _ = lax.scan(step, (xs[0], jnp.zeros_like(xs[0]), vs[0]), (xs[1:], vs[1:]))
    return s


def _blocked(a, b: int, axis: int):
    """``a`` zero-padded along ``axis`` (the contraction axis) to whole blocks of ``b`` and
    split: x (m, k) -> (m, nb, b) for axis 1, w (k, n) -> (nb, b, n) for axis 0."""
    k = a.shape[axis]
    nb = -(-k // b)
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, nb * b - k)
    a = jnp.pad(a, pad)
    return a.reshape(a.shape[0], nb, b) if axis == 1 else a.reshape(nb, b, a.shape[1])


def _by_blocks(x, size: int):
    """The last axis of ``x`` zero-padded to whole blocks of ``size`` (zeros in place, §3.3)
    and split, the blocks first: (..., n) -> (nb, ..., size). A block longer than the row is
    the row: its trailing zeros would change neither accumulator model (§3.4) but cost memory."""
    n = x.shape[-1]
    size = max(1, min(size, n))
    nb = -(-n // size)
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * size - n)])
    return jnp.moveaxis(x.reshape(*x.shape[:-1], nb, size), -2, 0)


#: tcfma's scan over its steps runs this many steps per loop iteration (``lax.scan``'s ``unroll``:
#: the same steps, the same bits): XLA:CPU then fuses two steps' elementwise work into one loop and
#: runs half the iterations. Measured on 2 shared cores (benchmarks/README.md): the emulated forward
#: at d = 64, N = 1,024, L = 1 under tcfma(4,24,rz) 2.05-2.24 CPU s -> 1.27-1.31 s, compile 3.0-3.5 s
#: -> 4.1-4.7 s; four steps ran in 1.38 s but compiled in 8.3 s. promote's scans stay one step per
#: iteration: two ran its forward 10% faster at N = 1,024 but 20% slower at N = 4,096 (one run each).
TCFMA_UNROLL = 2

#: A tcfma sum of at most this many steps runs them as straight-line code on static slices of the
#: terms (no loop): XLA:CPU then fuses every step into one loop over the rows, reading the terms where
#: they lie, instead of transposing them into (steps, rows, k) first. The 64-term dot products (the
#: scores and the linear layers at d_h = d = 64) have 16. Measured (benchmarks/README.md, CPU seconds,
#: the forward's XLA options): the scores of 8 query rows at N = 4,096 (32,768 rows of 64 terms)
#: 5.2-6.7 ms against 15-18 ms as a scan, compile 1.0-1.2 s against 0.3-0.8 s; 64 steps compiled in 4.3 s.
#: Only where the accumulate format is static (the specialised program): in the shared program each
#: step's rounding is the general one, on traced parameters, and 16 inline copies of it per dot product
#: site made the forward's compile 2-3x that of the scan (N = 4,096, d = 64, L = 2: 9.0-11.3 s against
#: 4.1-4.8 s) for ~20-35 % more run time at the lengths that program serves (N <= SHARED_MAX_N).
TCFMA_STRAIGHT_STEPS = 16


def check_emulable(order: Order) -> None:
    """Refuse, in one sentence, an accumulator model that float64 cannot run exactly
    (docs/semantics.md §12): tcfma's truncated terms must add exactly (t + ceil(log2(k+1))
    <= 52), promote's round-to-odd adds need two spare bits (b <= 51)."""
    if order.kind == "tcfma" and order.bits + order.block.bit_length() > 52:
        raise CarrierError(f"order {order} needs t + ceil(log2(k+1)) <= 52 to be emulated in float64 "
                           f"(here {order.bits + order.block.bit_length()}); use the reference backend")
    if order.kind == "promote" and order.bits > 51:
        raise CarrierError(f"order {order} needs b <= 51 to be emulated in float64; use the reference backend")


def _tcfma(x, order: Order, acc):
    """The running sum of ``tcfma(k,t,r)`` (docs/semantics.md §3.4.1) over the last axis of
    ``x`` (float64), before the final rounding. Each step: the running sum and the block's
    terms scaled by 2^(t - E) (exact: powers of two on normal float64 numbers), truncated to
    integers, added (exact, in any order: fewer than 2^53 in all), scaled back and rounded
    once in r.

    ``E`` is the exponent of the largest magnitude among them (the exponent is monotone in the
    magnitude, and a zero's, -1023, is below every other). With an infinity among them E is
    1024 and the scale 2^(t - 1024) at most 1: the finite values stay finite, so the sum is the
    IEEE sum of the specials (NaN for a NaN or both infinities, else that infinity), as §3.4.1
    rule 2 asks, and the rounding takes it from there. A NaN makes the largest magnitude NaN
    (XLA's maximum propagates it), so its block is never skipped as a block of zeros.

    Up to :data:`TCFMA_STRAIGHT_STEPS` steps in a static accumulate format run as straight-line
    code on static slices of ``x``, their sum held in memory (:func:`_rows._computed_once`:
    XLA:CPU otherwise fused the steps into each consumer of the sum, the scores' softmax maximum
    and exponentials, and ran them twice); longer sums, and every sum in a traced format (the
    shared program), scan over the blocks (:func:`_by_blocks`), a step's terms reduced over the
    block's axis, which ran faster there than slices of it. The same steps either way: the same bits."""
    k, t = order.block, order.bits
    check_emulable(order)

    def step(s, block):  # block: (..., k), or a list of k arrays (..., ), the block's terms
        if isinstance(block, list):
            big = functools.reduce(jnp.maximum, [jnp.abs(w) for w in block])
            terms = lambda f: functools.reduce(jnp.add, [jnp.trunc(w * f) for w in block])  # noqa: E731
        else:
            big = jnp.max(jnp.abs(block), axis=-1)
            terms = lambda f: jnp.sum(jnp.trunc(block * f[..., None]), axis=-1)  # noqa: E731
        up = jnp.clip(t - _exponent(jnp.maximum(big, jnp.abs(s))), -1022, 1023)
        S = (jnp.trunc(s * _pow2(up)) + terms(_pow2(up))) * _pow2(-up)
        S = jnp.where(S == 0, jnp.zeros_like(S), S)  # +0
        return jnp.where(big == 0, s, round_to(S, acc, order.rounding)), None  # a block of zeros is skipped

    n = x.shape[-1]
    steps = -(-n // k)
    s = jnp.zeros(x.shape[:-1], jnp.float64)
    if steps <= TCFMA_STRAIGHT_STEPS and isinstance(acc, Format):  # traced formats: the scan (see the constant)
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, steps * k - n)])  # the short last block: zeros
        for j in range(steps):
            s, _ = step(s, [x[..., i] for i in range(j * k, j * k + k)])

        return _computed_once(s)  # else XLA fuses the steps into each consumer of the sum, and runs them again
    s, _ = lax.scan(step, s, _by_blocks(x, k), unroll=TCFMA_UNROLL)
    return s


def _short_format(order: Order, acc: "Format | FormatParams"):
    """``promote``'s short accumulator format (:meth:`Order.chunk_format`), also for a
    traced accumulate format (its class widened to hold b bits and finer quanta)."""
    if isinstance(acc, Format):
        return order.chunk_format(acc)
    b = order.bits
    p, top = (jnp.asarray(v).astype(jnp.int64) for v in (acc.p, acc.top))
    top_b = jnp.where(b >= p, top << jnp.maximum(b - p, 0), top >> jnp.maximum(p - b, 0))
    cls = dataclasses.replace(acc.cls, pmax=max(acc.cls.pmax, b), qmin=acc.cls.qmin - b + 1)
    return FormatParams(jnp.int32(b), acc.emin, acc.emax, top_b, acc.overflow, cls=cls)


#: A ``promote`` sum of at least this many terms in all (every row's, zeros in place included) runs
#: its short accumulator by :func:`_chunk_sums_fast` where :func:`_fits` holds (the terms' bounds,
#: from the dot product's factors or one pass over the terms; :func:`_chunk_sums` otherwise, chosen
#: by a conditional): smaller sums
#: keep the one path, whose program compiles once instead of twice. In the emulated forward at d = 64
#: (blocks of up to 2^21 products, attention._BLOCK_ELEMS) the attention's dot products reach it from
#: N = 128 and the linear layers' (N·64·64 products) from N = 256; the softmax's denominators (N terms
#: for each of a block's query rows) stay below it.
PROMOTE_FAST_MIN_TERMS = 1 << 20


def _chunk_sums(flat, order: Order, short):
    """Every chunk's short sum (§3.4.2's ``c``), all chunks at once: ``flat`` (Nc, chunks) holds
    term j of every chunk in row j. Each add is made round to odd at 53 bits
    (:func:`carrier_add`'s TwoSum), which rounds on to b <= 51 bits as the exact sum does,
    whatever the terms' widths (exact products); then :func:`round_to` ``short``."""

    def term(c, v):
        m = Mode.RO if order.rounding.nearest else order.rounding
        return round_to(carrier_add(c, v, m), short, order.rounding), None

    c, _ = lax.scan(term, jnp.zeros(flat.shape[1], jnp.float64), flat)
    return c


def _fast_limits(order: Order, acc: Format, nc: int):
    """``(q, e)`` for :func:`_fits` (chunks of ``nc`` terms, a static accumulate
    format ``acc``), or None where the bit-level accumulator cannot serve ``acc``.

    ``2^q`` is the short format P's quantum (q = emin - b + 1) and ``2^e`` a bound on the
    terms' magnitudes that keeps every partial sum inside P's range: with ``m = max|x| <= 2^e``
    and a = 1 + 2^-b, a rounding in P's normal range moves a value by at most half its spacing,
    |∘(y)| <= a|y| (rz: <= |y|; below the normal range the sums are exact, see
    :func:`_chunk_sums_fast`), so the exact sums y_k = c_(k-1) + x_k obey
    |y_k| <= m (1 + a + ... + a^(k-1)) <= nc · a^nc · m, with nc <= 2^ceil(log2 nc) and
    a^nc <= exp(nc 2^-b) < 2^(1.5 nc 2^-b) <= 2^ceil(3 nc / 2^(b+1)). ``e`` is floor(log2) of
    P's largest finite value less those two exponents, so no |y_k| passes P's largest value
    (a P value): no rounding reaches overflow (rounding is monotone). P must have subnormals
    (a sum below 2^emin is then exact, not flushed), zero and negative values (no rule of §1
    for formats without them comes into play), r must be rz or rne, and 2^q must be a normal
    float64 (XLA:CPU flushes float64 subnormals; the accumulate formats the carrier admits have
    quanta far above 2^-1000)."""
    if not (acc.subnormals and acc.has_zero and acc.signed) or order.rounding not in (Mode.RZ, Mode.RNE):
        return None
    b = order.bits
    q = acc.emin - b + 1
    e = floor_log2(order.chunk_format(acc).max_exact) - (nc - 1).bit_length() - -(-3 * nc // 2 ** (b + 1))
    if q < -1000 or e < q or e > 1023:  # 2^e a float64
        return None
    return q, e


class TermBounds(NamedTuple):
    """What :func:`_chunk_sums_fast` needs to know of a sum's terms, as int32 / bool scalars:
    every nonzero term is a multiple of ``2^low`` and at most ``2^top`` in magnitude, and
    ``ok``: none is inf, NaN or a float64 subnormal (which XLA:CPU reads as 0 in arithmetic).
    For no nonzero term, ``low`` and ``top`` are far above and below any limit. Where ``ok`` is
    false they say nothing (a special's or a subnormal's exponent enters them): read them only
    where ``ok`` holds, as every caller does."""

    low: jax.Array
    top: jax.Array
    ok: jax.Array


_NO_TERM = 1 << 14  # beyond every float64 exponent, and twice it fits int32


def term_bounds(*items) -> TermBounds:
    """:class:`TermBounds` of the entries of every array among ``items`` and of every
    :class:`TermBounds` among them (bounds known already, e.g. of a loop's invariant operand),
    read from the arrays' float64 bit patterns: exact for float32 and float64 entries. A normal
    float64 with biased exponent E and significand S (53 bits) is S·2^(E-1075): a multiple of
    2^(E-1075+tz(S)) (tz: trailing zeros), and at most 2^(E-1023) if S is 2^52 (a power of two),
    else below 2^(E-1022)."""
    U, I = jnp.uint64, jnp.int32
    lows, tops, oks = [], [], []
    for x in items:
        if isinstance(x, TermBounds):
            lows.append(x.low), tops.append(x.top), oks.append(x.ok)
            continue
        mag = lax.bitcast_convert_type(jnp.asarray(x, jnp.float64), U) & U(2**63 - 1)
        E = (mag >> U(52)).astype(I)
        frac = mag & U(2**52 - 1)
        sig = frac | U(2**52)
        tz = lax.population_count((sig & (~sig + U(1))) - U(1)).astype(I)
        nz = mag != U(0)
        lows.append(jnp.min(jnp.where(nz, E - 1075 + tz, _NO_TERM), initial=_NO_TERM))
        tops.append(jnp.max(jnp.where(nz, E - 1023 + (frac != U(0)).astype(I), -_NO_TERM), initial=-_NO_TERM))
        oks.append(jnp.all((E != 2047) & ((E != 0) | ~nz)))
    return TermBounds(functools.reduce(jnp.minimum, lows), functools.reduce(jnp.maximum, tops),
                      functools.reduce(jnp.logical_and, oks))


def product_bounds(a: TermBounds, b: TermBounds) -> TermBounds:
    """:class:`TermBounds` of the products x·y of entries x, y that ``a`` and ``b`` bound, each
    exact or rounded to a format with no overflow (a rounding of a multiple of 2^l stays one, and
    a value at most 2^t rounds to at most 2^t): :meth:`Emulator.dot` bounds its products from its
    factors, O(N·d) entries for O(N²·d) products. A zero factor gives a zero product, but 0·inf and
    0·NaN are NaN: ``ok`` needs both factors' ``ok``."""
    return TermBounds(a.low + b.low, a.top + b.top, a.ok & b.ok)


def _fits(tb: TermBounds, q: int, e: int):
    """Whether terms with bounds ``tb`` may take :func:`_chunk_sums_fast`: every one a multiple of
    2^q (zeros included) and at most 2^e in magnitude (:func:`_fast_limits`), none inf, NaN or a
    float64 subnormal."""
    return tb.ok & (tb.low >= q) & (tb.top <= e)


def _chunk_sums_fast(flat, b: int, r: Mode):
    """:func:`_chunk_sums` on terms that pass :func:`_fits`, the same bits, from the
    float64 pattern of each sum instead of :func:`carrier_add` and :func:`round_to`.

    Every c and term is a multiple of 2^q (q = P's emin - b + 1), so is the exact sum
    y = c + v, and |y| stays at most P's largest value (:func:`_fast_limits`). TwoSum gives
    s = fl(y) (round to nearest, 53 bits) and err = y - s exactly (no overflow; err is a
    multiple of 2^q, a normal float64 or 0). Two cases:

    * |y| < 2^emin (P's subnormals, and 0): y = k·2^q with |k| < 2^(b-1) is a float64 (b <= 51),
      so s = y, err = 0; P holds y exactly (its rounding is y), and y has no bit below
      2^(E-b+1) at its exponent E < emin: clearing or rounding those bits keeps it.
    * 2^E <= |y| < 2^(E+1), E >= emin (P's normal range, no overflow): ∘_P(y) is y rounded
      to b bits at its own exponent. Truncated to 53 bits, y is s where err is 0 or has s's
      sign (|s| <= |y|), else the float64 one below s toward zero (|s| > |y|, s within half
      a float64 spacing; the pattern's decrement, which also steps from 2^(E+1) down into y's
      binade). rz: that truncation with its low 53 - b bits cleared is y truncated to b bits
      (the truncation is at most y, and keeps y's bits down to 2^(E-52)). rne: the truncation
      with its last bit set where err != 0 is y rounded to odd at 53 bits, in y's binade
      (not a power of two when inexact), and its nearest-even rounding to b <= 51 bits equals
      y's (Boldo & Melquiond 2008: two bits to spare; :func:`carrier_add` rests on the same),
      here ``lax.reduce_precision``, which :func:`round_to` takes for rne in the normal range.

    c starts at +0 and is never -0 (a zero sum of nonzero values is +0 under round to
    nearest; a zero term leaves c), so no signed-zero rule comes into play."""
    U = jnp.uint64
    keep = U(~((1 << (53 - b)) - 1) & (2**64 - 1))

    # carrier_add(c, v, Mode.RO)'s TwoSum and round to odd, written out for finite terms: through
    # carrier_add (its sign split and finiteness test) the promote recipe's forward at N = 4,096 ran
    # 2.6-2.9x its baseline's CPU seconds against 2.1x (2026-12-03, quiet machine).
    def term(c, v):
        s = c + v
        bb = s - c
        err = (c - (s - bb)) + (v - bb)
        sb, eb = lax.bitcast_convert_type(s, U), lax.bitcast_convert_type(err, U)
        inexact = (eb << U(1)) != U(0)
        sb = sb - (((sb ^ eb) >> U(63)) & inexact.astype(U))  # err opposite to s: one step toward zero
        if r is Mode.RZ:
            return lax.bitcast_convert_type(sb & keep, jnp.float64), None
        ro = lax.bitcast_convert_type(sb | inexact.astype(U), jnp.float64)
        return lax.reduce_precision(ro, exponent_bits=11, mantissa_bits=b - 1), None

    c, _ = lax.scan(term, jnp.zeros(flat.shape[1], jnp.float64), flat)
    return c


def _promote(x, order: Order, acc, mode, terms: TermBounds | None = None):
    """The running sum of ``promote(b,Nc,r)`` (docs/semantics.md §3.4.2) over the last axis of
    ``x`` (float64), before the final rounding: every chunk's short sum (all chunks at once,
    term by term: :func:`_chunk_sums`, or for a static accumulate format and at least
    :data:`PROMOTE_FAST_MIN_TERMS` terms :func:`_chunk_sums_fast` where the terms allow it),
    then the chunk sums added into ``acc`` in ``mode``. Each add is made round to odd at 53
    bits (:func:`carrier_add`'s TwoSum), which rounds on to b <= 51 bits as the exact sum
    does, whatever the terms' widths (exact products). ``terms``: bounds of the terms known
    without reading them (:func:`product_bounds`), else they are read (:func:`term_bounds`)."""
    check_emulable(order)
    short = _short_format(order, acc)

    # Both scans carry one flat axis: over the (nc, ...) carry of the batched shape, XLA:CPU ran the
    # same steps 3.5x slower (the terms of 32,768 rows of 64 terms: 41.8 ms against 12.1 ms per call).
    x2 = x.reshape(-1, x.shape[-1])
    chunks = jnp.moveaxis(_by_blocks(x2, order.block), -1, 0)  # (Nc, nc, rows)
    Nc, nc, rows = chunks.shape
    flat = chunks.reshape(Nc, nc * rows)
    lim = None
    if isinstance(acc, Format) and x.size >= PROMOTE_FAST_MIN_TERMS:
        lim = _fast_limits(order, acc, Nc)
    if lim is None:
        c = _chunk_sums(flat, order, short)
    else:  # a pass over the terms reads them as they lie: on the transposed chunks the forward ran ~10% slower
        fits = _fits(term_bounds(x2) if terms is None else terms, *lim)
        c = _cond(fits, lambda: _chunk_sums_fast(flat, order.bits, order.rounding),
                  lambda: _chunk_sums(flat, order, short))

    def promote(s, cv):
        return round_to(carrier_add(s, cv, Mode.RO if mode.nearest else mode), acc, mode), None

    s, _ = lax.scan(promote, jnp.zeros(rows, jnp.float64), c.reshape(nc, rows))
    return s.reshape(x.shape[:-1])
