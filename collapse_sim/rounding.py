"""How a value becomes a number: ``round_to(x, fmt, mode)``.

(One module of ~850 lines on purpose: every mode's rounding, its fast paths, the traced
formats' path and the format domains are one definition, docs/semantics.md §1, and must
be read and changed together.)

The rounding is specified by ``_round_general``: integer operations on the IEEE bit
pattern of the input (bit length, per-element shifts, remainders), every mode, every
format. Every mode has a fast path with the same bits (``_round_fast``, no data-dependent
branch and no per-element shift count), used when the format's normal range lies inside
the carrier's and its subnormals are normal carrier numbers (bf16 from float64, fp16 and
fp8 from either): in the normal range the quantum is fixed by the input's exponent, so one
add to the bit pattern (which the mode decides; ``lax.reduce_precision`` for
round-to-nearest-even) and a truncation round it, a carry into the exponent field being
the next binade; below it, an exact scaling by a power of two and a floor give the integer
significand (round-to-nearest-even: a magic-constant add behind an optimisation barrier);
then the format's overflow rule. bf16 from float32 takes the fast path only for arrays with
no element below bf16's normal range. This matters: XLA:CPU flushes subnormal floats in
arithmetic (``jnp.float32(1e-40) * 2 == 0`` under jit), so any scheme that scales by
powers of two would lose the subnormals of bf16 (which are float32 subnormals) or of
float64 inputs (the fast path's scalings only ever meet carrier normals, or inputs whose
flush to zero changes no result: ``_tiny_fast_ok``). Integer operations are also immune to
the compiler's floating-point rewrites, so jit and eager agree bit for bit. Stochastic
rounding ``sr(r)`` from float64 takes the fast path too: the draw is the add, and below the
normal range it is added to the scaled value's floor (the float64 subnormals it would flush
all round down anyway).

The result has the dtype of the input (float32 or float64) and is exactly a
value of ``fmt`` (or ±inf / NaN per the format's overflow policy), carried in
that dtype. Inputs are taken as exact values: an f64 input is rounded once,
never through float32 (``ml_dtypes`` up to 0.6 casts float64 → bfloat16 through float32).

Semantics (IEEE 754 where it speaks):

* The value is rounded to ``p`` significant bits at the spacing
  ``2**(max(e, emin) - p + 1)`` (gradual underflow). With
  ``subnormals=False`` the spacing is ``2**(e - p + 1)`` and a nonzero result
  below ``2**emin`` becomes a zero of the same sign (flush to zero).
* The modes (docs/semantics.md §1 defines each): ``rne``, ``rna``, ``rnz`` round to
  nearest with ties to even, away from zero, toward zero; ``rz``, ``ru``, ``rd`` are
  directed; ``ro`` (round to odd) keeps an exact value and gives an inexact one the
  neighbour whose last significand bit is 1; ``sr`` is stochastic.
* A rounded magnitude (rounded with an unbounded exponent) above the format's largest
  finite value overflows: if the mode carries overflow away from zero (the three
  nearest modes, RU for positive, RD for negative, a stochastic round up) the result
  is the format's overflow value (inf, NaN, or the largest finite value when
  saturating); otherwise (RZ, RO, RU for negative, RD for positive) it is the largest
  finite value, as IEEE 754 §7.4 prescribes for RZ. Round to odd never turns a finite
  value into an infinity, whatever the parity of the largest value (IEEE 754-2019 has
  no round to odd; this is CPFloat's choice).
* NaN stays NaN; ±inf becomes ±inf, NaN (``overflow="nan"``) or ±max
  (``"saturate"``).
* An unsigned format (``signed=False``) turns every negative input into NaN (−0 into
  +0); a format without zero (``has_zero=False``) turns ±0 into NaN and every rounded
  magnitude below its smallest positive value into that value, in every mode.
* Stochastic rounding with ``r`` random bits (``sr(r)``, docs/semantics.md §1): the
  first ``r`` bits of the discarded part, ``t = floor(frac * 2**r)``, plus an ``r``-bit
  random integer ``u``; the magnitude rounds up iff ``t + u >= 2**r`` (it carries), so
  ``P(up) = t / 2**r``. ``sr`` draws as many bits as the input type is wide (32 from
  float32, 64 from float64), which makes ``P(up) = (x - RZ(x)) / ulp`` exactly wherever
  the discarded part has at most that many bits. The draws come from a ``jax.random`` key
  or are given (``draws=``), so that every draw can be enumerated. The emulated backend
  gives draws from a counter-based hash (:func:`hash_draws`, splitmix64; docs/semantics.md §2),
  a few integer ops per element that compile like any other elementwise op.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .elementwise import replay
from .errors import CollapseSimError
from .formats import Format, parse


class RoundingError(CollapseSimError):
    """A rounding mode, PRNG key or input that ``round_to`` cannot use."""


class Mode(str, enum.Enum):
    RNE = "rne"  # round to nearest, ties to even
    RNA = "rna"  # round to nearest, ties away from zero
    RNZ = "rnz"  # round to nearest, ties toward zero
    RZ = "rz"  # toward zero
    RU = "ru"  # toward +inf
    RD = "rd"  # toward -inf
    RO = "ro"  # to odd: an inexact value goes to the neighbour whose last significand bit is 1
    SR = "sr"  # stochastic

    @classmethod
    def parse(cls, m: "str | Mode") -> "Mode":
        if isinstance(m, Mode):
            return m
        aliases = {"nearest": "rne", "rn": "rne", "even": "rne", "ties_even": "rne", "ties_away": "rna",
                   "ties_zero": "rnz", "zero": "rz", "up": "ru", "down": "rd", "odd": "ro", "stochastic": "sr"}
        key = str(m).lower().replace("-", "_")
        key = aliases.get(key, key)
        try:
            return cls(key)
        except ValueError:
            names = ", ".join(v.value for v in cls)
            raise RoundingError(f"unknown rounding mode {m!r}; use one of {names}") from None

    @property
    def nearest(self) -> bool:
        """A round-to-nearest mode (the three differ only at midpoints)."""
        return self in (Mode.RNE, Mode.RNA, Mode.RNZ)

    def overflows_away(self, negative):
        """Whether a finite value beyond the largest finite one goes to the format's
        overflow value (inf, NaN or, saturating, the largest finite value) rather than to
        the largest finite value: always for the nearest modes (IEEE 754-2019 §7.4; a
        value overflows when its rounding with an unbounded exponent exceeds the largest),
        for RU above and RD below zero, never for RZ and RO. ``negative`` is a bool or a
        bool array (the answer has its shape). SR decides per value, by its draw."""
        if self.nearest:
            return negative == negative
        if self is Mode.RU:
            return negative == False  # noqa: E712 - a bool or an array
        if self is Mode.RD:
            return negative == True  # noqa: E712
        if self in (Mode.RZ, Mode.RO):
            return negative != negative
        raise ValueError("stochastic rounding overflows by its draw, value by value")


#: The most random bits ``sr(r)`` takes: a draw is held in an unsigned integer as wide as
#: the carrier (64 bits from float64 inputs; from float32 inputs, 32).
SR_MAX_BITS = 64
_SR_RE = re.compile(r"\s*(?:sr|stochastic)\s*\(\s*(-?\d+)\s*(?:,\s*seed\s*=\s*(-?\d+)\s*)?\)\s*", re.IGNORECASE)
_SR_FORM = "sr(r) or sr(r,seed=s) with integers 1 <= r <= 64 and s >= 0, e.g. sr(8,seed=1)"


@dataclasses.dataclass(frozen=True)
class Stochastic:
    """Stochastic rounding with ``bits`` random bits per rounding (docs/semantics.md §1),
    as a policy's mode: ``sr(r)`` or ``sr(r,seed=s)``. ``seed`` seeds the draws of a whole
    emulated computation (docs/semantics.md §2); :func:`round_to` itself takes a key or the
    draws. It stands where a :class:`Mode` stands: ``value`` is its spelling, and like the
    directed modes it is not a nearest mode (+ and - are carried rounded to odd)."""

    bits: int
    seed: int = 0

    def __post_init__(self) -> None:
        for name, v, lo, hi in (("r", self.bits, 1, SR_MAX_BITS), ("seed", self.seed, 0, 2**32 - 1)):
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise RoundingError(f"stochastic rounding's {name} must be an integer in [{lo}, {hi}], got {v!r}; "
                                    f"write {_SR_FORM}")

    nearest = False

    @property
    def value(self) -> str:
        return f"sr({self.bits},seed={self.seed})"

    def __str__(self) -> str:
        return self.value


def parse_mode(m: "str | Mode | Stochastic") -> "Mode | Stochastic":
    """A rounding mode: a :class:`Mode` (``sr`` too: as many random bits as the input is wide)
    or, for ``sr(r)`` and ``sr(r,seed=s)``, a :class:`Stochastic`."""
    if isinstance(m, (Mode, Stochastic)):
        return m
    text = str(m)
    if "(" in text:
        hit = _SR_RE.fullmatch(text)
        if hit is None:
            raise RoundingError(f"unknown rounding mode {m!r}; stochastic rounding with r random bits is {_SR_FORM}")
        return Stochastic(int(hit.group(1)), int(hit.group(2) or 0))
    return Mode.parse(text)


class _Carrier:
    """Bit layout of a float dtype."""

    def __init__(self, dtype):
        self.dtype = jnp.dtype(dtype)
        if self.dtype == jnp.float32:
            self.width, self.pc, self.bias = 32, 24, 127
            self.u, self.i = jnp.uint32, jnp.int32
        elif self.dtype == jnp.float64:
            self.width, self.pc, self.bias = 64, 53, 1023
            self.u, self.i = jnp.uint64, jnp.int64
        else:
            raise TypeError(f"round_to takes float32 or float64 arrays, got {self.dtype}")
        self.emin = 1 - self.bias
        self.exponent_bits = self.width - self.pc
        self.qmin = self.emin - self.pc + 1  # exponent of the smallest subnormal
        self.emax = self.bias

    def pattern_of_pow2(self, k, valid):
        """Bit pattern (magnitude) of 2**k for integer arrays k within range."""
        U = self.u
        normal = k >= self.emin
        e_field = jnp.where(normal, k + self.bias, 0).astype(U)
        sub_shift = jnp.clip(k - self.qmin, 0, self.width - 1).astype(U)
        pat = jnp.where(normal, e_field << (self.pc - 1), U(1) << sub_shift)
        return jnp.where(valid, pat, U(0))

    def pattern_of_value(self, significand: int, exponent: int) -> int | None:
        """Host-side: magnitude pattern of significand * 2**exponent, or None if out of range."""
        from fractions import Fraction

        v = Fraction(significand) * Fraction(2) ** exponent
        if v == 0:
            return 0
        n = v.numerator.bit_length() - v.denominator.bit_length()
        e = n if Fraction(2) ** n <= v else n - 1
        if e > self.emax:
            return None
        if e < self.emin:
            m = v / Fraction(2) ** self.qmin
            if m.denominator != 1:
                return None
            return int(m)
        m = v / Fraction(2) ** (e - self.pc + 1)
        if m.denominator != 1:
            return None
        return ((e + self.bias) << (self.pc - 1)) | (int(m) - (1 << (self.pc - 1)))


def _bitlen(c: _Carrier, m):
    return c.width - lax.clz(m).astype(c.i)


_OVERFLOW_CODES = {"inf": 0, "nan": 1, "saturate": 2}
#: What a format class fixes about the structure of the rounding (a static flag each, shared by its formats)
_CLASS_FLAGS = ("subnormals", "signed_zero", "signed", "has_zero")


@dataclasses.dataclass(frozen=True)
class FormatClass:
    """What one compiled program fixes about the formats it rounds to (static under jit);
    the rest of a format, :class:`FormatParams`, is data.

    A program that rounds to a format of this class holds the same code for every one:
    the formats' precision ``p``, exponent range, largest significand and overflow rule
    are traced values. Fixed are the narrowest carrier dtype of the inputs, whether the
    formats have subnormals, signed zeros, negative numbers and a zero (gradual underflow
    or a flush, one zero or two, the domain: the structure of the rounding), and bounds
    the whole class keeps to: ``p <= pmax``, every quantum ``>= 2**qmin`` (the smallest
    subnormal, or the smallest normal without subnormals) and largest binade ``<= 2**emax``. The bounds make the fast
    round-to-nearest path valid for every member (the format's normal range inside the
    carrier's, its subnormals carrier normals), and they bound the exact sums' terms.
    """

    dtype: str = "float64"
    pmax: int = 25
    qmin: int = -149
    emax: int = 127
    subnormals: bool = True
    signed_zero: bool = True
    signed: bool = True
    has_zero: bool = True

    def __post_init__(self) -> None:
        c = _Carrier(self.dtype)
        if not (1 <= self.pmax < c.pc - 1 and self.qmin > c.emin and self.emax < c.emax):
            raise RoundingError(f"format class {self}: needs 1 <= pmax < {c.pc - 1}, qmin > {c.emin} and emax < {c.emax} "
                                f"for {self.dtype}")

    def why_not(self, fmt: Format) -> "str | None":
        """Why ``fmt`` is not a member (None if it is)."""
        if any(getattr(fmt, f) != getattr(self, f) for f in _CLASS_FLAGS):
            return (f"{fmt.name} has {', '.join(f'{f}={getattr(fmt, f)}' for f in _CLASS_FLAGS)}; the class has "
                    f"{', '.join(f'{f}={getattr(self, f)}' for f in _CLASS_FLAGS)}")
        if fmt.p > self.pmax:
            return f"{fmt.name} has p={fmt.p} > {self.pmax}"
        if fmt.min_exponent_of_quantum < self.qmin or fmt.emax > self.emax:
            return f"{fmt.name}'s exponent range [2^{fmt.min_exponent_of_quantum}, 2^{fmt.emax}] leaves [2^{self.qmin}, 2^{self.emax}]"
        c = _Carrier(self.dtype)
        if fmt.subnormals and not _magic_finite(c, fmt.min_exponent_of_quantum):
            return (f"{fmt.name}'s subnormal quantum 2^{fmt.min_exponent_of_quantum} is too large for a {c.dtype} "
                    f"carrier (its rounding needs 2^{fmt.min_exponent_of_quantum + c.pc - 1} finite)")
        return None

    def params(self, fmt: "Format | str") -> "FormatParams":
        """``fmt``'s numbers as arrays (to pass to a compiled program as an argument)."""
        fmt = parse(fmt)
        why = self.why_not(fmt)
        if why is not None:
            raise RoundingError(f"format {fmt.name} is not of the format class {self}: {why}")
        code = _OVERFLOW_CODES[fmt.overflow]
        return FormatParams(*(np.int32(v) for v in (fmt.p, fmt.emin, fmt.emax, fmt.top_significand, code)), cls=self)


@jax.tree_util.register_pytree_node_class
class FormatParams:
    """A format of a :class:`FormatClass` as data: ``p``, ``emin``, ``emax``, ``top``
    (the largest significand) and ``overflow`` (0 inf, 1 NaN, 2 saturate) are int32
    scalars, traced under jit; the class is the static part. :func:`round_to` takes it
    in place of a :class:`Format` and gives the same bits (build it with
    :meth:`FormatClass.params`)."""

    def __init__(self, p, emin, emax, top, overflow, *, cls: FormatClass):
        self.p, self.emin, self.emax, self.top, self.overflow = p, emin, emax, top, overflow
        self.cls = cls

    def tree_flatten(self):
        return (self.p, self.emin, self.emax, self.top, self.overflow), self.cls

    @classmethod
    def tree_unflatten(cls, fc, leaves):
        return cls(*leaves, cls=fc)

    def __getattr__(self, name: str):
        """The flags (``subnormals``, ``signed_zero``, ``signed``, ``has_zero``) are the class's."""
        if name in _CLASS_FLAGS:
            return getattr(self.cls, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def max(self):
        """The largest finite value, a float64 scalar."""
        c = _Carrier(jnp.float64)
        return lax.bitcast_convert_type(_max_pattern(c, self), jnp.float64)

    def __repr__(self) -> str:
        return f"FormatParams({self.cls})"


def float64_exponent(x):
    """``⌊log2|x|⌋`` of normal float64 values, from their bits (traceable); −1023 for zeros and
    subnormals (which lie below 2^−1022 = 2^(−1023 + 1))."""
    bits = lax.bitcast_convert_type(jnp.asarray(x, jnp.float64), jnp.uint64)
    return ((bits >> jnp.uint64(52)) & jnp.uint64(0x7FF)).astype(jnp.int64) - 1023


def pow2(k):
    """``2^k`` as float64, exactly, for integer arrays ``k`` in [−1022, 1023], built from its
    bits (the biased exponent field; traceable)."""
    return lax.bitcast_convert_type((jnp.asarray(k) + 1023).astype(jnp.uint64) << jnp.uint64(52), jnp.float64)


def format_int(v, dtype):
    """A format's integer parameter (``p``, ``emin``, ...) as an integer of ``dtype``, for
    arithmetic with other integers of that type: a traced one converted, a Python int kept."""
    return v if isinstance(v, int) else jnp.asarray(v).astype(dtype)


def _int(c: "_Carrier", v):
    return format_int(v, c.i)


def _max_pattern(c: "_Carrier", fmt: FormatParams):
    """Magnitude pattern of a traced format's largest value, top * 2**(emax - p + 1): its
    exponent field, and the significand below the hidden bit shifted to the top of the fraction."""
    U = c.u
    p, top = (_int(c, v).astype(U) for v in (fmt.p, fmt.top))
    e_field = (_int(c, fmt.emax) + c.bias).astype(U) << U(c.pc - 1)
    return e_field | ((top - (U(1) << (p - U(1)))) << (U(c.pc) - p))


def _tiny_pattern(c: "_Carrier", fmt: "Format | FormatParams"):
    """Magnitude pattern of 2**emin, the smallest normal value (a carrier normal)."""
    if isinstance(fmt, Format):
        return c.u(c.pattern_of_value(1, fmt.emin))
    return (_int(c, fmt.emin) + c.bias).astype(c.u) << c.u(c.pc - 1)


def _smallest_pattern(c: "_Carrier", fmt: "Format | FormatParams"):
    """Magnitude pattern of the smallest positive value: 2**(emin - p + 1) with subnormals,
    2**emin without."""
    if not fmt.subnormals:
        return _tiny_pattern(c, fmt)
    if isinstance(fmt, Format):
        pat = c.pattern_of_value(1, fmt.min_exponent_of_quantum)
        if pat is None:
            raise RoundingError(f"format {fmt.name} has no zero and its smallest value 2^{fmt.min_exponent_of_quantum} "
                                f"is below {c.dtype}'s smallest; round from float64")
        return c.u(pat)
    q = _int(c, fmt.emin) - _int(c, fmt.p) + 1  # a carrier normal: the class keeps qmin >= the carrier's emin
    return (q + c.bias).astype(c.u) << c.u(c.pc - 1)


def _domain(c: "_Carrier", fmt: "Format | FormatParams", pat, mag, neg, lim: "_Limits"):
    """The rounded magnitude ``pat`` of an input of magnitude ``mag`` after the rules of
    formats without negative numbers or without zero (docs/semantics.md §1): no zero,
    ±0 gives NaN and a magnitude below the smallest value (0 included) gives the smallest;
    unsigned, a negative input (−0 aside) gives NaN."""
    if not fmt.has_zero:
        smallest = _smallest_pattern(c, fmt)
        pat = jnp.where(mag == 0, lim.nan, jnp.where(pat < smallest, smallest, pat))
    if not fmt.signed:
        pat = jnp.where(neg & (mag != 0), lim.nan, pat)
    return pat


class _Limits:
    """The format's top end as carrier magnitude patterns: largest finite value,
    canonical NaN, the value an overflow becomes, and the overflow test."""

    def __init__(self, c: "_Carrier", fmt: "Format | FormatParams"):
        U = c.u
        self.inf = U((2 * c.bias + 1) << (c.pc - 1))
        self.nan = self.inf | (U(1) << U(c.pc - 2))
        if isinstance(fmt, FormatParams):  # the class keeps the largest value inside the carrier
            self.beyond_carrier = False
            self.xmax = _max_pattern(c, fmt)
            code = _int(c, fmt.overflow)
            self.overflow = jnp.where(code == 0, self.inf, jnp.where(code == 1, self.nan, self.xmax))
            return
        xmax_pat = c.pattern_of_value(fmt.top_significand, fmt.emax - fmt.p + 1)
        self.beyond_carrier = xmax_pat is None  # only the carrier's inf overflows
        self.xmax = self.inf if self.beyond_carrier else U(xmax_pat)
        self.overflow = {"inf": self.inf, "nan": self.nan, "saturate": self.xmax}[fmt.overflow]

    def over(self, pat):
        return pat >= self.inf if self.beyond_carrier else pat > self.xmax


def _signed(c: "_Carrier", fmt: "Format | FormatParams", pat, neg, lim: _Limits, dtype):
    """Attach the sign (NaN stays positive-canonical; no -0 in unsigned-zero formats)."""
    sign_bit = c.u(1) << c.u(c.width - 1)
    out_neg = neg & ~(pat >= lim.nan)
    if not fmt.signed_zero:
        out_neg = out_neg & (pat != 0)
    return lax.bitcast_convert_type(pat | jnp.where(out_neg, sign_bit, c.u(0)), dtype)


def fast_path_applies(fmt: Format, dtype) -> bool:
    """Whether rounding to ``fmt`` from ``dtype`` has the fast path (:func:`_round_fast`) in the
    format's normal range: that range lies inside the carrier's normal range and p < the
    carrier's (then every mode but ``sr`` takes it, below the normal range too where
    :func:`_tiny_fast_ok`; ``sr`` needs :func:`_sr_fast_applies`)."""
    c = _Carrier(dtype)
    return fmt.p < c.pc and fmt.emin >= c.emin and c.pattern_of_value(1, fmt.emin) is not None


def _tiny_fast_ok(fmt: "Format | FormatClass", c: "_Carrier") -> bool:
    """Whether the fast path may round below the format's normal range with carrier floats.
    XLA:CPU flushes carrier subnormals in arithmetic (inputs and results), so: with subnormals,
    the format's quantum 2^q (q = emin - p + 1) must be at least twice the carrier's smallest
    normal (a carrier subnormal input then reads as 0, which is its rounding in the nearest
    modes; the others compare patterns), 2^-q a carrier normal and RNE's constant
    C = 1.5·2^(q + pc - 1) finite (:func:`_magic`); without subnormals, 2^emin above the carrier's
    smallest normal (a carrier subnormal input then flushes to zero in every mode). A
    :class:`FormatClass` keeps this for all its members (``qmin``, :meth:`FormatClass.why_not`)."""
    if isinstance(fmt, FormatClass):
        return fmt.qmin > c.emin
    if not fmt.subnormals:
        return fmt.emin > c.emin
    q = fmt.emin - fmt.p + 1
    return c.emin < q <= -c.emin and _magic_finite(c, q)


def _pow2_carrier(c: "_Carrier", k):
    """2^k in the carrier's float type, for a normal 2^k: a constant for a Python int, built
    from the exponent field for a traced one."""
    if isinstance(k, int):
        return jnp.asarray(2.0**k, c.dtype)
    return lax.bitcast_convert_type((_int(c, k) + c.bias).astype(c.u) << c.u(c.pc - 1), c.dtype)


def _round_normal(c: "_Carrier", fmt: "Format | FormatParams", mode: Mode, x, mag, neg, draws, bits):
    """``mag`` (a magnitude pattern) rounded to p significant bits at its own exponent: the
    rounding of the format's normal range. The quantum is fixed by the input's exponent, so
    the low D = pc - p bits of the pattern are dropped after an add that decides the mode:
    nothing (rz, ro), 2^D - 1 (rounding away: ru above zero, rd below), 2^(D-1) (rna),
    2^(D-1) - 1 (rnz), 2^(D-1) - 1 plus the kept significand's last bit (rne; p = 1 keeps
    the hidden bit, odd), or the draw shifted to the top of the dropped bits (sr); a carry
    into the exponent field is the next binade. Round to odd sets the kept significand's
    last bit where anything was dropped (with p = 1 that bit is the hidden one: a truncation).
    RNE with a static p > 1 is ``lax.reduce_precision`` at the carrier's exponent width, the
    same rounding in one op. ±inf stays ±inf; NaN patterns are for the caller to replace."""
    U = c.u
    static = isinstance(fmt, Format)
    if mode is Mode.RNE and static and fmt.p > 1:
        r = lax.reduce_precision(x, exponent_bits=c.exponent_bits, mantissa_bits=fmt.p - 1)
        return lax.bitcast_convert_type(r, U) & ~(U(1) << U(c.width - 1))
    p = fmt.p if static else jnp.asarray(_int(c, fmt.p)).astype(U)
    D = U(c.pc) - U(p) if static else U(c.pc) - p
    p1 = fmt.p == 1 if static else p == U(1)
    half = U(1) << (D - U(1))
    if mode is Mode.RNE:
        add = half - U(1) + jnp.where(p1, U(1), (mag >> D) & U(1))
    elif mode is Mode.RNA:
        add = half
    elif mode is Mode.RNZ:
        add = half - U(1)
    elif mode in (Mode.RU, Mode.RD):
        add = jnp.where(mode.overflows_away(neg), (U(1) << D) - U(1), U(0))
    elif mode is Mode.SR:
        add = draws << (D - U(bits))
    else:  # rz, ro
        add = U(0)
    pat = ((mag + add) >> D) << D
    if mode is Mode.RO and not (static and fmt.p == 1):
        inexact = pat != mag
        pat = pat | ((inexact if static else inexact & ~p1).astype(U) << D)
    return pat


def _round_tiny(c: "_Carrier", fmt: "Format | FormatParams", mode: Mode, x, mag, neg, draws, bits):
    """``mag`` (below the format's normal range, which has subnormals) rounded to a multiple of
    the quantum 2^q (q = emin - p + 1), as a magnitude pattern. RNE: ``(x + C) - C`` with
    C = 1.5·2^(q + pc - 1), whose binade has spacing 2^q (ties to even), behind an
    optimisation barrier. The others: y = |x|·2^-q is exact (a carrier normal times a power of
    two, below 2^(p-1)), its floor f the truncated significand; rna / rnz compare y - f with
    1/2; rz is f·2^q; the directed modes and ro compare f·2^q's pattern with the input's
    (inexact where they differ: a carrier subnormal input, read as 0, is inexact too), then
    add 1 (rounding away) or set f's last bit (ro). sr: floor(|x|·2^(bits - q)) = N·2^bits + t
    plus the draw, shifted right by ``bits``, is N (float64 subnormal inputs, flushed, have
    t = 0 and N = 0 anyway: ``_sr_fast_applies``). See :func:`_tiny_fast_ok`."""
    U = c.u
    if mode is Mode.RNE:
        C = _magic(c, fmt, x.dtype)
        small = lax.optimization_barrier(x + C) - C
        return lax.bitcast_convert_type(small, U) & ~(U(1) << U(c.width - 1))
    q = fmt.emin - fmt.p + 1 if isinstance(fmt, Format) else _int(c, fmt.emin) - _int(c, fmt.p) + 1
    ax = lax.bitcast_convert_type(mag, x.dtype)
    if mode is Mode.SR:
        n = (jnp.floor(ax * _pow2_carrier(c, bits - q)).astype(U) + draws) >> U(bits)
    else:
        y = ax * _pow2_carrier(c, -q)
        f = jnp.floor(y)
        if mode.nearest:
            n = f + ((y - f >= 0.5) if mode is Mode.RNA else (y - f > 0.5)).astype(x.dtype)
        else:
            trunc = lax.bitcast_convert_type(f * _pow2_carrier(c, q), U)
            if mode is Mode.RZ:
                return trunc
            inexact = trunc != mag
            fi = f.astype(U)
            n = fi | inexact.astype(U) if mode is Mode.RO else fi + (inexact & mode.overflows_away(neg)).astype(U)
    return lax.bitcast_convert_type(n.astype(x.dtype) * _pow2_carrier(c, q), U)


def _short_rne(fmt: "Format | FormatParams") -> bool:
    """Whether rounding to nearest-even to ``fmt`` takes :func:`_round_rne`: a static format with
    p > 1 and a signed zero, so also negative numbers and a zero (bf16, fp16, fp32, tf32, the OCP fp8,
    fp6 and fp4 formats, custom formats; not the fnuz ones), whatever its overflow rule and subnormals."""
    return isinstance(fmt, Format) and fmt.p > 1 and fmt.signed_zero


def _round_rne(c: "_Carrier", fmt: Format, x, xbits, mag, sign_bit, tiny: bool):
    """:func:`_round_fast` to nearest-even for :func:`_short_rne`'s formats, in ~25 % fewer operations
    than its shared branch, the same bits (tests/test_rounding.py): ``reduce_precision`` at the
    carrier's exponent width rounds the significand (and keeps ±inf and NaN); a result beyond the
    largest finite value (an overflow, or ±inf) becomes the format's overflow value with x's sign (NaN
    unsigned); below 2^emin, with subnormals, the result is :func:`_round_tiny`'s with x's sign,
    without, a rounded magnitude below 2^emin a zero of x's sign; a NaN becomes the canonical NaN.
    (``reduce_precision`` at the format's own exponent width does the overflow itself, in fewer
    instructions still, but its exponent logic ran ~15 % slower on XLA:CPU.)"""
    U = c.u
    lim = _Limits(c, fmt)
    sign = xbits & sign_bit
    r = lax.bitcast_convert_type(lax.reduce_precision(x, exponent_bits=c.exponent_bits, mantissa_bits=fmt.p - 1), U)
    rmag = r & ~sign_bit
    out = jnp.where(lim.over(rmag), lim.nan if fmt.overflow == "nan" else sign | lim.overflow, r)
    if not fmt.subnormals:
        out = jnp.where(rmag < _tiny_pattern(c, fmt), sign, out)
    elif tiny:
        small = _round_tiny(c, fmt, Mode.RNE, x, mag, None, None, None)
        out = jnp.where(mag < _tiny_pattern(c, fmt), small | sign, out)
    return lax.bitcast_convert_type(jnp.where(mag > lim.inf, lim.nan, out), x.dtype)


def _round_fast(x, fmt: "Format | FormatParams", mode: Mode, draws=None, bits: "int | None" = None, tiny: bool = True):
    """Every mode's rounding without data-dependent branches or per-element shift counts,
    equal bit for bit to :func:`_round_general` (tests/test_rounding.py, tests/test_sr.py).
    RNE to most formats is :func:`_round_rne` (:func:`_short_rne`). Otherwise the normal range by
    :func:`_round_normal`; below it, with subnormals, by
    :func:`_round_tiny` (``tiny=False``: the caller knows no element lies there but zeros,
    which the normal-range rounding keeps); without subnormals, a rounded magnitude below
    2^emin flushes to a zero of x's sign. Then the overflow rule (the overflow value where the
    mode carries overflow away from zero, for sr where the draw rounded up; else the largest
    finite value), ±inf and NaN, the domain and the sign, as the general path.
    For ``sr``, ``draws`` are the ``bits``-bit random integers."""
    c = _Carrier(x.dtype)
    U = c.u
    sign_bit = U(1) << U(c.width - 1)
    xbits = lax.bitcast_convert_type(x, U)
    neg = (xbits & sign_bit) != 0
    mag = xbits & ~sign_bit
    if mode is Mode.RNE and _short_rne(fmt):
        return _round_rne(c, fmt, x, xbits, mag, sign_bit, tiny)
    normal = _round_normal(c, fmt, mode, x, mag, neg, draws, bits)
    tiny_pat = _tiny_pattern(c, fmt)
    if not fmt.subnormals:
        pat = jnp.where(normal < tiny_pat, U(0), normal)
    elif tiny:
        pat = jnp.where(mag < tiny_pat, _round_tiny(c, fmt, mode, x, mag, neg, draws, bits), normal)
    else:
        pat = normal
    lim = _Limits(c, fmt)  # only the normal range overflows: below it a result is at most 2^emin
    over = lim.over(pat)
    if mode.nearest:  # every nearest mode carries overflow away; ±inf lands here too
        return _signed(c, fmt, _domain(c, fmt, jnp.where(mag > lim.inf, lim.nan, jnp.where(over, lim.overflow, pat)),
                                      mag, neg, lim), neg, lim, x.dtype)
    if mode in (Mode.RZ, Mode.RO):
        pat = jnp.where(over, lim.xmax, pat)
    else:
        away = normal > mag if mode is Mode.SR else mode.overflows_away(neg)
        pat = jnp.where(over, jnp.where(away, lim.overflow, lim.xmax), pat)
    pat = jnp.where(mag >= lim.inf, jnp.where(mag == lim.inf, lim.overflow, lim.nan), pat)
    return _signed(c, fmt, _domain(c, fmt, pat, mag, neg, lim), neg, lim, x.dtype)


def _sr_fast_applies(fmt: Format, dtype, bits: int) -> bool:
    """Whether ``sr(bits)`` to ``fmt`` from ``dtype`` has the fast path: a float64 input; the
    format's normal range inside float64's, with subnormals that :func:`_tiny_fast_ok` takes;
    ``bits`` within the 53 - p discarded bits of a normal input; and ``2^(q - bits)`` (q the
    quantum's exponent below the normal range) a float64 normal, so that a float64 subnormal
    input, which XLA may flush to 0, has t = 0 and rounds to 0 whatever the draw."""
    c = _Carrier(dtype)
    return (c.width == 64 and fast_path_applies(fmt, dtype) and fmt.subnormals and _tiny_fast_ok(fmt, c)
            and bits <= c.pc - fmt.p and fmt.emin - fmt.p + 1 - bits >= c.emin)


def _magic_finite(c: "_Carrier", q: int) -> bool:
    """Whether :func:`_magic`'s C = 1.5·2^(q + pc - 1) for a format of quantum 2^q is finite in the carrier."""
    return q + c.pc - 1 <= c.emax


def _magic(c: "_Carrier", fmt: "Format | FormatParams", dtype):
    """C = 1.5 * 2**(q + pc - 1), q = emin - p + 1: the binade of C has spacing 2**q, so
    ``(x + C) - C`` rounds a tiny x to a multiple of the format's quantum, ties to even."""
    if isinstance(fmt, Format):
        return jnp.asarray(1.5 * 2.0 ** (fmt.emin - fmt.p + 1 + c.pc - 1), dtype)
    e = _int(c, fmt.emin) - _int(c, fmt.p) + c.pc  # q + pc - 1
    pat = ((e + c.bias).astype(c.u) << c.u(c.pc - 1)) | (c.u(1) << c.u(c.pc - 2))
    return lax.bitcast_convert_type(pat, dtype)


def _sr_draws(x, key, draws, bits: "int | None"):
    """The ``bits``-bit random integers of a stochastic rounding of ``x`` (None for the
    other modes): the given ``draws`` (broadcast to ``x``'s shape), or the top ``bits``
    bits of one random word per element drawn from ``key``."""
    if bits is None:
        return None
    c = _Carrier(x.dtype)
    if draws is not None:
        return jnp.broadcast_to(jnp.asarray(draws).astype(c.u), x.shape)
    return jax.random.bits(key, x.shape, dtype=c.u) >> c.u(c.width - bits)


#: splitmix64's increment: the odd integer nearest 2^64 / φ (docs/semantics.md §2)
SPLITMIX_G = 0x9E3779B97F4A7C15
_MIX_MUL = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)  # splitmix64's output function's multipliers


def _need_uint64(what: str) -> None:
    if not jax.config.jax_enable_x64:
        raise RoundingError(f"{what} works on 64-bit words, which JAX holds only with float64 on; "
                            "call collapse_sim.enable_x64() first")


def split_word(w, k, top_bits: int = 64):
    """splitmix64's ``k``-th output from the state ``w``: ``mix(w + (k + 1)·G)`` modulo 2^64
    (docs/semantics.md §2), as uint64. ``w``: a word (an integer or a uint64 array, traced or
    not); ``k >= 0``: a Python int (folded into a constant) or an integer array (traced inside
    a loop body), broadcast against ``w``. ``top_bits``: only the top ``top_bits`` bits are
    right (the others are for the caller to drop): mix's last step, ``z ^ (z >> 31)``, leaves
    the top 31 bits as they are, so it is skipped for ``top_bits <= 31``."""
    _need_uint64("split_word")
    u = jnp.uint64
    if isinstance(k, int):
        inc = u((k + 1) * SPLITMIX_G % 2**64)
    else:
        inc = (jnp.asarray(k).astype(u) + u(1)) * u(SPLITMIX_G)
    z = jnp.asarray(w, u) + inc
    z = (z ^ (z >> u(30))) * u(_MIX_MUL[0])
    z = (z ^ (z >> u(27))) * u(_MIX_MUL[1])
    return z if top_bits <= 31 else z ^ (z >> u(31))


def hash_draws(word, shape, bits: int):
    """The ``bits``-bit draws of one stochastic rounding of an array of ``shape`` whose slot
    word is ``word`` (docs/semantics.md §2): the element of row-major index ``j`` draws the top
    ``bits`` bits of ``split_word(word, j)``, as uint64. Elementwise integer ops on ``lax.iota``:
    no per-element PRNG, so they compile like the rounding they feed."""
    _need_uint64("hash_draws")
    if not 1 <= bits <= SR_MAX_BITS:
        raise RoundingError(f"stochastic rounding takes 1 to {SR_MAX_BITS} random bits, got {bits}")
    shape = tuple(shape)
    j = lax.iota(jnp.uint64, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    return split_word(word, j, bits) >> jnp.uint64(64 - bits)


@partial(jax.jit, static_argnames=("mode", "bits"))
def _round_traced(x, key, draws, fmt: FormatParams, mode: Mode, bits: "int | None"):
    """Rounding to a traced format: every member of its class has the fast path in every
    deterministic mode (the class's bounds, :meth:`FormatClass.__post_init__`)."""
    if mode is Mode.SR:
        return _round_general(x, _sr_draws(x, key, draws, bits), fmt, mode, bits)
    leaves, tree = jax.tree.flatten(fmt)
    return replay(lambda v, *ls: _round_fast(v, jax.tree.unflatten(tree, ls), mode), ("fast", tree, mode), x, *leaves)


@partial(jax.jit, static_argnames=("fmt", "mode", "bits"))
def _round_impl(x, key, draws, fmt: Format, mode: Mode, bits: "int | None"):
    if mode is Mode.SR:
        if _sr_fast_applies(fmt, x.dtype, bits):
            return _round_fast(x, fmt, mode, _sr_draws(x, key, draws, bits), bits)
        return _round_general(x, _sr_draws(x, key, draws, bits), fmt, mode, bits)
    if not fast_path_applies(fmt, x.dtype):
        return replay(lambda v: _round_general(v, None, fmt, mode), ("general", fmt, mode), x)
    c = _Carrier(x.dtype)
    if _tiny_fast_ok(fmt, c):
        return replay(lambda v: _round_fast(v, fmt, mode), ("fast", fmt, mode), x)
    # values below the format's normal range that carrier floats cannot round (bf16 from
    # float32: its subnormals are float32 subnormals): arrays holding any take the general path
    mag = lax.bitcast_convert_type(x, c.u) & ~(c.u(1) << c.u(c.width - 1))
    tiny = (mag < _tiny_pattern(c, fmt)) & (mag != 0)
    return lax.cond(jnp.any(tiny), lambda v: _round_general(v, None, fmt, mode),
                    lambda v: _round_fast(v, fmt, mode, tiny=False), x)


def _round_general(x, draws, fmt: "Format | FormatParams", mode: Mode, sr_bits: "int | None" = None):
    """Every mode's rounding on the bit pattern; ``draws``: stochastic rounding's random
    integers in [0, 2**sr_bits), one per element (None for the other modes)."""
    c = _Carrier(x.dtype)
    U, I = c.u, c.i
    W = c.width
    bits = lax.bitcast_convert_type(x, U)
    sign_bit = U(1) << U(W - 1)
    neg = (bits & sign_bit) != 0
    mag = bits & ~sign_bit
    frac_mask = (U(1) << U(c.pc - 1)) - U(1)
    E = (mag >> U(c.pc - 1)).astype(I)
    frac = mag & frac_mask
    is_special = E == (2 * c.bias + 1)  # inf or nan
    is_nan = is_special & (frac != 0)
    is_inf = is_special & (frac == 0)
    sub = E == 0
    m = jnp.where(sub, frac, frac | (U(1) << U(c.pc - 1)))  # integer significand
    k = jnp.where(sub, c.qmin, E - c.bias - (c.pc - 1))  # value = m * 2**k
    e = k + _bitlen(c, m) - 1  # floor(log2|x|) for m != 0

    p = _int(c, fmt.p)
    if fmt.subnormals:
        qexp = jnp.maximum(e, _int(c, fmt.emin)) - p + 1
    else:
        qexp = e - p + 1
    d = jnp.maximum(qexp - k, 0)  # bits of m to drop
    dc = jnp.minimum(d, W - 1).astype(U)
    drop_all = d >= W
    q = jnp.where(drop_all, U(0), m >> dc)
    rem = jnp.where(drop_all, m, m - (q << dc))
    # comparison of rem with half = 2**(d-1): rem < 2**pc <= 2**(W-2), so for d >= W it is below half
    half = jnp.where((d >= 1) & ~drop_all, U(1) << (jnp.maximum(dc, U(1)) - U(1)), U(0))
    above_half = jnp.where(drop_all, False, (d >= 1) & (rem > half))
    at_half = jnp.where(drop_all, False, (d >= 1) & (rem == half))
    inexact = rem != 0

    odd = (q & U(1)) == 1
    if mode is Mode.RNE:
        up = above_half | (at_half & odd)
    elif mode is Mode.RNA:
        up = above_half | at_half
    elif mode is Mode.RNZ:
        up = above_half
    elif mode is Mode.RO:  # q is the truncation; an even one moves to its odd neighbour
        up = inexact & ~odd
    elif mode is Mode.RZ:
        up = jnp.zeros_like(inexact)
    elif mode is Mode.RU:
        up = inexact & ~neg
    elif mode is Mode.RD:
        up = inexact & neg
    else:  # stochastic with `bits` random bits: t = floor(frac * 2**bits), frac = rem / 2**d; up iff t + draw carries
        r = sr_bits
        t = jnp.where(d >= r, jnp.where(d - r >= W, U(0), rem >> jnp.clip(d - r, 0, W - 1).astype(U)),
                      rem << jnp.clip(r - d, 0, W - 1).astype(U))  # rem < 2**d, so < 2**r <= 2**W
        half = U(1) << U(r - 1)
        need = (half - t) + half  # 2**r - t, modulo 2**W (for r = W and t > 0 it is in [1, 2**W))
        up = (t != 0) & (draws >= need)

    # Result magnitude pattern.
    shallow = d <= c.pc - 1  # rounding only touches fraction bits of the pattern
    ds = jnp.minimum(d, c.pc - 1).astype(U)
    pat_shallow = ((mag >> ds) + up.astype(U)) << ds
    pat_deep = jnp.where(up, c.pattern_of_pow2(qexp, True), U(0))
    pat = jnp.where(shallow, pat_shallow, pat_deep)

    # Overflow.
    lim = _Limits(c, fmt)
    over = lim.over(pat)
    # Overflow goes to the overflow value when the mode carries it away from zero.
    away = up if mode is Mode.SR else mode.overflows_away(neg)  # stochastic: when it rounded up in magnitude
    pat = jnp.where(over, jnp.where(away, lim.overflow, lim.xmax), pat)

    # Flush to zero without subnormals.
    if not fmt.subnormals and (isinstance(fmt, FormatParams) or c.pattern_of_value(1, fmt.emin) is not None):
        pat = jnp.where(pat < _tiny_pattern(c, fmt), U(0), pat)

    # Specials.
    pat = jnp.where(is_inf, lim.overflow, pat)
    pat = jnp.where(is_nan, lim.nan, pat)
    pat = _domain(c, fmt, pat, mag, neg, lim)
    return _signed(c, fmt, pat, neg, lim, x.dtype)


def _check_key(key, draws, mode: Mode):
    """The PRNG key for ``_round_impl`` (None where it draws nothing): a given key must be
    a ``jax.random`` key; stochastic rounding needs a key or the draws, not both."""
    if mode is not Mode.SR:
        if draws is not None:
            raise RoundingError(f"draws are the random integers of stochastic rounding; mode {mode.value} takes none")
        return None
    if (key is None) == (draws is None):
        raise RoundingError("stochastic rounding needs an explicit PRNG key or the draws, one of them: "
                            "round_to(x, fmt, 'sr', key=jax.random.key(0)) or round_to(x, fmt, 'sr(4)', draws=...)")
    if key is None:
        return None
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
    raw = dtype == jnp.uint32 and getattr(key, "shape", None) == (2,)  # a jax.random.PRNGKey
    if not ((typed and isinstance(key, jax.Array)) or raw):
        raise RoundingError(f"key must be a jax.random key such as jax.random.key(42), got {key!r}")
    return key


def _check_draws(draws, bits: int, width: int):
    """``draws`` as given to :func:`round_to`: integers in [0, 2**bits) (checked where they are
    concrete; traced draws are trusted)."""
    if bits > width:
        raise RoundingError(f"stochastic rounding from float{width} takes at most {width} random bits, got sr({bits}); "
                            "round from float64")
    if draws is None or isinstance(draws, jax.core.Tracer):
        return draws
    d = np.asarray(draws)
    if not np.issubdtype(d.dtype, np.integer):
        raise RoundingError(f"draws must be integers in [0, 2^{bits}), got dtype {d.dtype}")
    if d.size and (d.min() < 0 or int(d.max()) >> bits):
        raise RoundingError(f"draws must be integers in [0, 2^{bits}) for sr({bits}), got values in [{d.min()}, {d.max()}]")
    return d


def round_to(x, fmt: "Format | str | FormatParams", mode: "Mode | Stochastic | str" = Mode.RNE, *, key=None,
             draws=None):
    """Round every element of ``x`` to ``fmt``.

    Returns an array whose values are values of ``fmt``, of the input's dtype:
    float32 or float64 (other float dtypes are widened to float32 exactly).
    Python floats and numpy float64 are float64 values, and are rounded as such
    even when JAX float64 is off (then the work runs under a scoped
    ``jax.enable_x64(True)`` and the result is a float64 array): an input is
    never cut to float32 on the way in.
    ``mode`` is one of ``rne`` (default), ``rna``, ``rnz``, ``rz``, ``ru``, ``rd``,
    ``ro``, ``sr`` (:class:`Mode`), or ``sr(r)`` (:class:`Stochastic`: ``r`` random bits;
    plain ``sr`` draws as many bits as the input type is wide: 32 or 64). Stochastic rounding
    needs a ``jax.random`` key, or ``draws``: the random integers themselves, in [0, 2**r),
    broadcast to ``x``'s shape (element ``i`` rounds up iff ``t_i + draws_i >= 2**r``,
    docs/semantics.md §1). ``fmt`` may be a :class:`FormatParams`
    (a format as data, the same bits): one compiled program then serves every format of
    its class.

    >>> import jax.numpy as jnp
    >>> float(round_to(jnp.float32(1 + 2**-8 + 2**-20), "bf16"))
    1.0078125
    >>> float(round_to(1 + 2**-8 + 2**-40, "bf16"))  # a float64 value, with or without x64
    1.0078125
    """
    traced = isinstance(fmt, FormatParams)
    fmt = fmt if traced else parse(fmt)
    mode = parse_mode(mode)
    bits = mode.bits if isinstance(mode, Stochastic) else None
    mode = Mode.SR if isinstance(mode, Stochastic) else mode
    key = _check_key(key, draws, mode)
    impl = _round_traced if traced else _round_impl
    if not isinstance(x, jax.Array):  # python and numpy values keep their own dtype (float -> float64)
        try:
            x = np.asarray(x)
        except (TypeError, ValueError) as e:
            raise RoundingError(f"round_to takes floating-point values, got {type(x).__name__}: {e}") from None
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise RoundingError(f"round_to takes floating-point values, got dtype {x.dtype}; convert with .astype(float)")
    if x.dtype == np.float64 and not jax.config.jax_enable_x64:
        with jax.enable_x64(True):  # round the float64 value itself, not its float32 cut
            bits = 64 if mode is Mode.SR and bits is None else bits
            return impl(jnp.asarray(x, dtype=jnp.float64), key, _check_draws(draws, bits, 64) if bits else None,
                        fmt, mode, bits)
    x = jnp.asarray(x)
    if x.dtype not in (jnp.float32, jnp.float64):
        x = x.astype(jnp.float32)
    if traced and jnp.dtype(x.dtype).itemsize < jnp.dtype(fmt.cls.dtype).itemsize:
        raise RoundingError(f"{fmt} is rounded to from {fmt.cls.dtype} or wider, got {x.dtype}; widen the input")
    width = 8 * jnp.dtype(x.dtype).itemsize
    if mode is Mode.SR:
        bits = width if bits is None else bits
        draws = _check_draws(draws, bits, width)
    return impl(x, key, draws, fmt, mode, bits)
