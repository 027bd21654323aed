"""Elementary operations of a precision policy, each rounded right after.

Every op is computed in a wider *carrier* float (carrier.py) and rounded to the
policy's format with :func:`collapse_sim.rounding.round_to`, so + − × ÷ √ are
*correctly rounded* in the target format, in every mode of
:class:`collapse_sim.rounding.Mode` but plain ``sr``; stochastic rounding with ``r`` bits,
a policy's ``sr(r,seed=s)`` (:class:`collapse_sim.rounding.Stochastic`), runs in a float64
carrier for ``2(p + r) + 1 <= 53`` (docs/semantics.md §2 says why), every rounding with
draws of its own (:meth:`Emulator.draws`: a splitmix64 hash of its draw scope's word and
each element's index, :func:`collapse_sim.rounding.hash_draws`). ``exp`` (and
``exp2`` and ``ln``) is always evaluated in float64 and then rounded: correct except within ~2^-50 relative of
a midpoint (nearest modes) or a format value other than 1 (directed modes, round to
odd); none is known for p <= 16, the tests check every bf16 and fp16 input in every
mode. Outside the nearest modes the float64 value is marked inexact first
(:func:`_inexact_exp`), which keeps ``exp`` correct next to 1 (``a`` tiny) and where
float64 over- or underflows.

Division is always done on operands of the same shape behind an
optimisation barrier: XLA otherwise rewrites ``a / broadcast(b)`` into
``a * (1/b)``, which rounds twice.

What it computes is specified in docs/semantics.md: :class:`Emulator` implements
the elementary ops (§2) and, with :func:`reduce_sum`, the reduction orders and dot
products (§3.1, §3.2): the orders of orders.py, their exact sums taken by the
certificates (certificates.py) or the superaccumulator (exact.py), which agree bit for bit.
"""

from __future__ import annotations

import contextlib
import copy

import jax
import jax.numpy as jnp
from jax import lax

from ... import require_x64
from ...formats import Format
from ...mx import ScaledFormat, is_per_tensor, mx_values, prefix_amax, scaled_values
from ...policy import Order, Policy, StochasticRoundingError
from ...rounding import FormatClass, Mode, Stochastic, hash_draws, pow2 as _pow2, round_to, split_word
from .carrier import CarrierError, carrier_add, carrier_for
from .certificates import certified_sum
from .exact import exact_sum
from .orders import (_blocked, _kahan, _pairwise, _promote, _rounded_add, _sequential, _tcfma, check_emulable,
                     product_bounds, term_bounds, to_tree_width)


#: The formats one shared program emulates, with the formats as data (a jit argument, not
#: part of the compiled code): p <= 25 (a float64 carrier holds 2p + 2 bits), every quantum
#: >= 2^-149 and largest binade <= 2^127 (fp32's range: bf16, fp16, tf32, the fp8/fp6/fp4
#: formats, fp32 itself), with subnormals and signed zeros. Its exact sums' bounds are the
#: class's: terms are multiples of 2^-298 below 2^256.
SHARED_CLASS = FormatClass("float64", pmax=25, qmin=-149, emax=127)


def shared_class_refusal(policy: Policy) -> "str | None":
    """Why the shared program cannot emulate ``policy`` (None if it can)."""
    for f in policy.formats():
        why = SHARED_CLASS.why_not(f)
        if why is not None:
            return why
    return None


class Emulator:
    """The ops of one policy. Hashable (on what its compiled code depends on), so it can be
    a static jit argument.

    ``shared=False``: the policy's formats are static, the carrier the narrowest that
    emulates them (carrier.py). ``shared=True``: the formats are data, :class:`FormatParams`
    of :data:`SHARED_CLASS` (``data()``), the carrier float64; inside a compiled program,
    :meth:`bind` gives the emulator of the traced formats. Two shared emulators whose
    policies differ only in their formats are equal: they share compiled code.
    """

    def __init__(self, policy: "Policy | str", *, shared: bool = False):
        self.policy = pol = Policy.parse(policy)
        require_x64("the emulated backend")
        self.order, self.mode, self.max_subtract, self.kernel = pol.order, pol.mode, pol.max_subtract, pol.kernel
        self.operands = pol.operands  # the MX blocks of the dot products' operands (§13.1), or None
        check_emulable(self.order)
        self.softmax_is_compute = pol.softmax == pol.compute  # then rounding between them is the identity
        fmts = pol.formats()
        self.stochastic = isinstance(self.mode, Stochastic)
        if self.stochastic:
            _check_stochastic(pol)
        self._seed = self.mode.seed if self.stochastic else None  # the seed s (traced: the program's argument)
        self._word = None  # the innermost draw scope's word (:meth:`stream`); None in the top scope (split(s, 0))
        self.roundings = 0  # roundings and scopes drawn in the innermost scope (stochastic rounding: the next one's n)
        self.shared = shared
        if shared:
            why = shared_class_refusal(pol)
            if why is not None:
                raise CarrierError(f"policy {pol} has no shared program: {why}; use Emulator(policy) (formats static)")
            self.dtype = jnp.dtype(SHARED_CLASS.dtype)
            self.roles = tuple(SHARED_CLASS.params(f) for f in fmts)
            qmin, emax = SHARED_CLASS.qmin, SHARED_CLASS.emax
            self.key = ("shared", SHARED_CLASS, str(self.order), self.mode, self.max_subtract, self.softmax_is_compute,
                        self.kernel, self.operands)
        else:
            self.dtype = jnp.dtype(jnp.float64 if self.stochastic else carrier_for(*fmts))
            self.roles = fmts
            qmin, emax = min(f.min_exponent_of_quantum for f in fmts), max(f.emax for f in fmts)
            self.key = ("policy", pol)
        self.storage, self.compute, self.accumulate, self.softmax = self.roles
        # every reduction term is a format value or a product of two: multiples of
        # 2**(2 qmin) below 2**(2 emax + 2)
        self.bounds = (2 * qmin, 2 * emax + 2)

    def data(self):
        """The formats a compiled program takes as an argument (None when they are static)."""
        return self.roles if self.shared else None

    def bind(self, roles) -> "Emulator":
        """This shared emulator with the formats ``roles`` (traced :class:`FormatParams`:
        storage, compute, accumulate, softmax), for use inside the compiled program."""
        if not self.shared:
            raise ValueError("only a shared emulator takes its formats as data")
        emu = copy.copy(self)
        emu.policy = None  # the formats are the traced ones; order, mode, max_subtract, kernel stay
        emu.roles = tuple(roles)
        emu.storage, emu.compute, emu.accumulate, emu.softmax = emu.roles
        return emu

    def __hash__(self) -> int:
        return hash(self.key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Emulator) and other.key == self.key

    def __repr__(self) -> str:
        return f"Emulator({self.policy}{', shared=True' if self.shared else ''})"

    def host_key(self) -> str:
        """What :meth:`__eq__` compares (``key``) as text, the same in every process: the key
        of a host call that takes this emulator as a static argument (backends/_host.py)."""
        return f"Emulator{self.key!r}"

    # --- rounding --------------------------------------------------------
    def _scope_word(self):
        """The innermost draw scope's word; in the top scope ``split(s, 0)``, made where it is
        used (inside the compiled forward from its traced seed) and never kept, so that no
        traced word outlives its trace."""
        return split_word(self._seed, 0) if self._word is None else self._word

    def draws(self, shape):
        """Stochastic rounding's draws for the next rounding of an array of ``shape``
        (docs/semantics.md §2; None in the other modes): it takes slot n of the innermost draw
        scope, of word W (n counts that scope's roundings and scopes from 0), and element j
        draws the top r bits of ``split(split(W, n), j)`` (:func:`collapse_sim.rounding.hash_draws`)."""
        if not self.stochastic:
            return None
        w = split_word(self._scope_word(), self.roundings)
        self.roundings += 1
        return hash_draws(w, shape, self.mode.bits)

    def fresh(self, seed=None) -> "Emulator":
        """This emulator with its draws back at the start (a new computation's first rounding
        takes slot 0 of the top scope, of word ``split(s, 0)``): the emulated forward takes one
        per trace. ``seed``: the seed s as the compiled forward's argument (a traced uint64
        scalar); default the policy's."""
        emu = copy.copy(self)
        emu.roundings = 0
        if self.stochastic:
            emu._seed, emu._word = (self.mode.seed if seed is None else seed), None
        return emu

    @contextlib.contextmanager
    def stream(self, i):
        """A draw scope for iteration ``i`` (an integer, traced inside a loop body) of a loop
        (docs/semantics.md §2): the scope takes slot n of the enclosing scope, of word W, and its
        word is ``split(split(W, n), i)``; inside it the slots count from 0 again. A loop body
        traced once thus draws afresh in every iteration. Nothing happens in the deterministic
        modes (their bits do not depend on scopes)."""
        if not self.stochastic:
            yield self
            return
        outer, n = self._word, self.roundings
        self._word, self.roundings = split_word(split_word(self._scope_word(), n), i), 0
        try:
            yield self
        finally:
            self._word, self.roundings = outer, n + 1

    def _round(self, x, fmt):
        """One rounding of ``x`` to ``fmt`` in the policy's mode (its own draws)."""
        return round_to(x, fmt, self.mode, draws=self.draws(jnp.shape(x)))

    def rnd(self, x, fmt: Format | None = None):
        """Round ``x`` (carried in the carrier dtype) to ``fmt`` (default: compute)."""
        return self._round(jnp.asarray(x, self.dtype), self.compute if fmt is None else fmt)

    def store(self, x):
        """Bring external data (any float array) in: one rounding to the storage format."""
        x = jnp.asarray(x)
        if x.dtype != jnp.float64:
            x = x.astype(jnp.float64) if jax.config.jax_enable_x64 else x
        return self._round(x, self.storage).astype(self.dtype)

    def operand(self, x, axis: int = -1, amax=None):
        """``x`` (compute values) as an operand of a dot product under the policy's operands role
        (docs/semantics.md §13.1): MX blocks along ``axis`` (the contraction axis), dequantised
        (exact in float64, :func:`collapse_sim.mx.mx_values`): values of compute again (§13.1
        says why), so exact in the carrier; or float32-scaled tiles along ``axis``, dequantised
        and rounded to compute (§13.2, :func:`collapse_sim.mx.scaled_values`), or one float32
        scale per tensor (§13.2.1) from ``amax`` (broadcastable to ``x``: :meth:`prefix_amax`'s
        for activation rows, a row's keys' or values' own, 1 for the weights P), from all of
        ``x`` without it (a weight matrix); ``x`` itself without the role. The one place the
        emulated backend quantises operands: the linear layers, the attention's entry (q, k)
        and its weighted values (P, V) call it."""
        if self.operands is None:
            return x
        if isinstance(self.operands, ScaledFormat):  # §13.2: float32 scales, then rounded to compute
            return scaled_values(jnp.asarray(x, jnp.float64), self.operands, self.compute, axis,
                                 amax).astype(self.dtype)
        return mx_values(jnp.asarray(x, jnp.float64), self.operands, axis).astype(self.dtype)

    @property
    def per_tensor(self) -> bool:
        """Whether the operands role scales each operand tensor as one (§13.2.1)."""
        return is_per_tensor(self.operands)

    def prefix_amax(self, x, stream_rows=None):
        """Under per-tensor scales (§13.2.1) the amax of each activation row of ``x`` (rows in
        position order; probes after the ``stream_rows``): :func:`collapse_sim.mx.prefix_amax`;
        None otherwise (tiles and MX blocks take their scales from their own values)."""
        return prefix_amax(jnp.asarray(x, jnp.float64), stream_rows, jnp) if self.per_tensor else None

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
        a = jnp.asarray(a, jnp.float64)
        wide = jnp.exp(a)
        if not self.mode.nearest:  # a nearest mode needs no mark: e^a is never a midpoint either
            wide = _inexact_exp(wide, a)
        return self._round(wide, self.compute if fmt is None else fmt).astype(self.dtype)

    def exp2(self, a, fmt=None):
        """``∘_F(2^a)`` (docs/semantics.md §2), like :meth:`exp`: float64 then one rounding.
        ``jnp.exp2`` is ``exp(a·ln 2)`` in XLA (about 100 float64 ulps off at |a| = 150, and
        2^n of an integer n inexact), so ``a`` is split exactly into ``n + f`` (n the nearest
        integer, |f| <= 1/2): ``2^f = exp(f·ln 2)`` in float64 (~2 ulps), marked inexact for
        the modes that are not round to nearest when ``f != 0`` (2^f is then irrational) as
        :meth:`exp` marks its value, then scaled by 2^n exactly. An integer ``a`` thus gives
        2^a exactly; past float64's range (inf, or 0 where XLA flushes) the value is marked
        inexact too, so every mode rounds it as the true 2^a."""
        a = jnp.asarray(a, jnp.float64)
        fin = jnp.isfinite(a)
        n = jnp.where(fin, jnp.round(a), jnp.zeros_like(a))
        f = jnp.where(fin, a - n, jnp.zeros_like(a))  # exact: a and n are within 1/2
        y = jnp.exp(f * jnp.float64(_LN2))
        if not self.mode.nearest:
            y = _inexact_exp(y, f)
        # times 2^n in two products by exact powers of two: y·2^h1 (h1 = n clipped to [-1021, 1023]) is a
        # normal float64 (y lies in [2^-1/2, 2^1/2]), exact; the second factor rounds once, to 0 or inf where
        # the first clip left a remainder (|n| past float64's range), and XLA flushes float64 subnormals
        h = jnp.clip(n, -2200, 2200).astype(jnp.int64)
        h1 = jnp.clip(h, -1021, 1023)
        wide = y * _pow2(h1) * _pow2(jnp.clip(h - h1, -1022, 1023))
        wide = jnp.where(fin, wide, jnp.where(a > 0, jnp.inf, jnp.where(a < 0, 0.0, a)))  # +inf, -inf (0), NaN
        if not self.mode.nearest:  # beyond float64's range: inf -> the largest float64, 0 -> the smallest
            wide = _inexact_exp(wide, a, fin & ((wide == 0) | jnp.isinf(wide)))
        return self._round(wide, self.compute if fmt is None else fmt).astype(self.dtype)

    def ln(self, a, fmt=None):
        """``∘_F(ln a)`` (docs/semantics.md §2), like :meth:`exp`: float64's ``log``, then one
        rounding. ``ln a`` of a finite ``a > 0`` other than 1 is irrational (e^r is irrational
        for every rational r != 0, Lindemann-Weierstrass), never a format value, so for the
        modes that are not round to nearest the float64 value is marked inexact as
        :meth:`exp` marks its own (float64's ``log`` of a format value of p <= 25 bits is never
        1, where that mark picks a side by the sign of ``a``). ``ln 1 = 0`` exactly,
        ``ln 0 = -inf``, ``ln(+inf) = +inf``, ``ln a`` of ``a < 0`` is NaN, each then rounded
        to the format (an infinity to its overflow value)."""
        a = jnp.asarray(a, jnp.float64)
        wide = jnp.log(a)
        if not self.mode.nearest:
            wide = _inexact_exp(wide, a, jnp.isfinite(a) & (a > 0) & (a != 1))
        return self._round(wide, self.compute if fmt is None else fmt).astype(self.dtype)

    # --- reductions --------------------------------------------------------
    def sum(self, x, axis: int = -1, out_fmt: Format | None = None, order: Order | None = None,
            path: str = "certified"):
        """Sum along ``axis`` in the policy's order, accumulating in ``accumulate``,
        then rounding once to ``out_fmt`` (default: compute). ``path``: see :func:`reduce_sum`."""
        x = jnp.moveaxis(jnp.asarray(x, self.dtype), axis, -1)
        return reduce_sum(x, order or self.order, self.accumulate, self.compute if out_fmt is None else out_fmt,
                          self.mode, bounds=self.bounds, path=path, draws=self.draws)

    def dot(self, a, b, out_fmt: Format | None = None, order: Order | None = None, path: str = "certified",
            factors=None):
        """Vector dot product over the last axis (batched over the rest).

        Products of two carrier values are exact in the carrier; each is rounded
        to ``accumulate`` (exact if that format has >= 2p bits), then reduced.
        The ``exact``, ``blocked``, ``tcfma`` and ``promote`` orders use the exact products
        (``path``: how the exact and blocked orders take their exact sums, see :func:`reduce_sum`).

        ``factors``: two sequences of arrays whose entries include every entry of ``a`` and of
        ``b`` (zeros aside), e.g. the keys a broadcast ``b`` was made of; ``promote`` bounds its
        terms from them (:func:`~.orders.product_bounds`) instead of reading every product.
        Default: ``a`` and ``b`` as given, before broadcasting (:meth:`product_terms`).
        """
        order = order or self.order
        terms = self.product_terms(order, *(((a,), (b,)) if factors is None else factors))
        a, b = jnp.broadcast_arrays(jnp.asarray(a, self.dtype), jnp.asarray(b, self.dtype))
        if self.pads_products(order):
            a, b = to_tree_width(a), to_tree_width(b)
        prod = a * b
        if not order.exact_products:
            prod = self.rnd(prod, self.accumulate)
        return reduce_sum(prod, order, self.accumulate, self.compute if out_fmt is None else out_fmt, self.mode,
                          bounds=self.bounds, path=path, draws=self.draws, terms=terms)

    def pads_products(self, order: Order) -> bool:
        """Whether a dot product in ``order`` pads its factors to the pairwise tree's width
        (:func:`~.orders.to_tree_width`) before it multiplies them. The padding's products, +0 × +0
        rounded, are the +0 terms the tree pads with itself: the same bits. XLA:CPU then computes the
        products in a loop of its own, where a pad at the root of their fusion made it ~2× slower
        (the weighted values of an emulated bf16 forward at N = 1,536: benchmarks/README.md).
        Only under round to nearest-even: in the other modes an add reads its terms several times
        (round to odd, ``carrier_add``; the general rounding path), and once the products fuse into
        the tree's first level XLA computes each product as often (measured ~20 % slower under RD at
        N = 1,536); stochastic rounding draws one draw per product (their count would change)."""
        return order.kind == "pairwise" and self.mode is Mode.RNE

    def bounds_products(self, order: Order) -> bool:
        """Whether :meth:`product_terms` bounds products under ``order``."""
        return order.kind == "promote" and self.dtype == jnp.float64

    def product_terms(self, order: Order, fa, fb):
        """:class:`~.orders.TermBounds` of the products of entries of the arrays ``fa`` with entries
        of the arrays ``fb`` (:func:`~.orders.product_bounds`), for the ``promote`` order in a
        float64 carrier (its products exact: no overflow, no underflow); else None (the sum reads
        its terms where it needs them)."""
        if not self.bounds_products(order):
            return None
        return product_bounds(term_bounds(*fa), term_bounds(*fb))

    def matmul(self, a, b, out_fmt=None, order=None):
        """``a @ b`` for a: (..., m, k), b: (k, n), each entry a :meth:`dot`."""
        a = jnp.asarray(a, self.dtype)
        bt = jnp.swapaxes(jnp.asarray(b, self.dtype), -1, -2)
        ae, be = jnp.broadcast_arrays(a[..., :, None, :], bt.reshape((1,) * (a.ndim - 1) + bt.shape))
        return self.dot(ae, be, out_fmt, order)


#: The orders whose every add is one rounding, and so one stochastic rounding under ``sr(r)``.
STOCHASTIC_ORDERS = ("sequential", "pairwise")


def _check_stochastic(policy: Policy) -> None:
    """Refuse, in one sentence, what the emulator does not run under stochastic rounding:
    an order other than sequential or pairwise (their sums round once or carry state: exact,
    blocked, kahan, tcfma, promote), and r beyond the float64 carrier (docs/semantics.md §2:
    2(p + r) + 1 <= 53, so that a carried quotient or root keeps its first p + r bits)."""
    mode = policy.mode
    if policy.order.kind not in STOCHASTIC_ORDERS:
        raise StochasticRoundingError(f"under {mode} the emulator sums in the sequential or pairwise order (each add "
                                      f"one stochastic rounding), not {policy.order}")
    p = max(f.p for f in policy.formats())
    if 2 * (p + mode.bits) + 1 > 53:
        raise CarrierError(f"{mode} with a format of p={p} needs r <= {26 - p} in the float64 carrier "
                           "(2(p + r) + 1 <= 53, docs/semantics.md §2); use fewer random bits")


_LN2 = 0.6931471805599453  # the float64 nearest ln 2




def _inexact_exp(wide, a, inexact=None):
    """The float64 ``wide = exp(a)`` marked inexact, for the modes that are not round to
    nearest: ``e^a`` of a finite ``a != 0`` is irrational (Lindemann-Weierstrass), never a
    format value, so ``wide`` is moved by at most one float64 ulp to a float64 with its last
    bit set, on the side of ``wide`` where ``e^a`` lies when float64 rounded it to 1 (then
    the side is ``a``'s sign), above it otherwise. It then stays between the same two format
    values as ``e^a`` unless ``e^a`` lies within float64's exp error plus one ulp of one
    other than 1. An overflow to inf becomes the largest float64 and an underflow to 0 the
    smallest float64 subnormal, so the directed modes and round to odd give the format's
    largest finite value, or its smallest subnormal, where the exact ``e^a`` calls for it.
    ``inexact``: which entries to mark (default: finite ``a != 0``)."""
    bits = lax.bitcast_convert_type(wide, jnp.uint64)
    one = bits == jnp.uint64(0x3FF0000000000000)
    marked = jnp.where(one & (a < 0), bits - jnp.uint64(1), bits | jnp.uint64(1))  # 1 - 2^-53 or (last bit) 1
    marked = jnp.where(jnp.isinf(wide), jnp.uint64(0x7FEFFFFFFFFFFFFF), marked)
    if inexact is None:
        inexact = jnp.isfinite(a) & (a != 0)
    return lax.bitcast_convert_type(jnp.where(inexact, marked, bits), jnp.float64)


_PATHS = ("certified", "float64", "superacc")


def reduce_sum(x, order: Order, acc: Format, out: Format, mode, valid=None, bounds=(-1074, 1024), nonneg=False,
               path: str = "certified", draws=None, terms=None):
    """Reduce the last axis. Masked-out terms must be zeros; ``valid`` (same shape)
    is needed only by ``kahan``, whose state would change on trailing zeros.
    ``bounds`` = (kmin, kmax) of the terms for the exact superaccumulator; ``nonneg``:
    no term is negative (saves the exact and blocked orders a pass).

    ``path``: how the exact and blocked orders get their exact sums (all give the
    same bits). ``"certified"``: float64 sums where :func:`certify` vouches for them,
    the superaccumulator elsewhere. ``"float64"``: the certificate only, returning
    ``(s, ok)``; where ``ok`` is false ``s`` is not the result and the caller must
    redo it (other orders are always ok). ``"superacc"``: :func:`exact_sum` only, for
    code that redoes what the certificate left open (no certificate, no branches).

    ``draws``: under stochastic rounding, ``draws(shape)`` gives the draws of one rounding
    (:meth:`Emulator.draws`): one call per pairwise level, one stacked array for the
    sequential order's adds, one for the final rounding.

    ``terms``: :class:`~.orders.TermBounds` of ``x``'s entries where the caller knows them
    (``promote`` reads them from ``x`` otherwise)."""
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, not {path!r}")
    with_ok = path == "float64"
    if x.shape[-1] == 0:
        s = jnp.zeros(x.shape[:-1], x.dtype)
        return (s, jnp.ones(s.shape, bool)) if with_ok else s
    stochastic = isinstance(mode, Stochastic)
    if stochastic and (draws is None or order.kind not in STOCHASTIC_ORDERS):
        raise StochasticRoundingError(f"reduce_sum under {mode} takes the sequential or pairwise order and its draws")
    draws = draws if stochastic else (lambda shape: None)
    add = _rounded_add(acc, mode)
    ok = None

    def exact(x, fmt):
        if path == "superacc":
            return exact_sum(x, fmt, mode, *bounds).astype(x.dtype)
        return certified_sum(x, fmt, mode, *bounds, nonneg=nonneg, exact_fallback=not with_ok)

    if order.kind == "sequential":
        s = _sequential(x, add, draws((x.shape[-1] - 1, *x.shape[:-1])) if stochastic else None)
    elif order.kind == "pairwise":
        s = _pairwise(x, lambda u, v: add(u, v, draws(u.shape)))
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
    elif order.kind in ("tcfma", "promote"):  # in float64 whatever the carrier (orders.py)
        x64 = x.astype(jnp.float64)
        s = _tcfma(x64, order, acc) if order.kind == "tcfma" else _promote(x64, order, acc, mode, terms)
        s = s.astype(x.dtype)
    else:  # pragma: no cover - Order validates kinds
        raise ValueError(order)
    s = round_to(s, out, mode, draws=draws(s.shape))
    if not with_ok:
        return s
    return s, (jnp.ones(s.shape, bool) if ok is None else ok)
