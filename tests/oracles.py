"""Independent rounding oracles: MPFR (via gmpy2) and exact rationals.

Neither shares code with collapse_sim.rounding: the MPFR oracle lets MPFR do
the rounding (precision p, exponent range set so that subnormals are exact
with ``subnormalize``); the rational oracle does it with Python integers.
The overflow rule is written here again, straight from IEEE 754 §7.4, and the rules
of unsigned formats and formats without zero from docs/semantics.md §1 (steps 1 and 6).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import gmpy2

from collapse_sim.formats import Format

_MPFR_MODES = {
    "rne": gmpy2.RoundToNearest,
    "rz": gmpy2.RoundToZero,
    "ru": gmpy2.RoundUp,
    "rd": gmpy2.RoundDown,
}


def _overflow(value: Fraction | float, negative: bool, fmt: Format, mode: str) -> float:
    xmax = float(fmt.max_exact)
    # IEEE 754-2019 §7.4: the nearest modes carry every overflow to the overflow value, the
    # directed ones only away from zero; round to odd keeps the largest finite value (CPFloat)
    away = mode in ("rne", "rna", "rnz") or (mode == "ru" and not negative) or (mode == "rd" and negative)
    if away:
        big = {"inf": math.inf, "nan": math.nan, "saturate": xmax}[fmt.overflow]
    else:
        big = xmax
    return -big if negative else big


def _outside(zero: bool, negative: bool, fmt: Format) -> bool:
    """§1 step 1: an unsigned format takes no negative value (−0 is a zero), a format
    without zero no zero: NaN, in every mode."""
    return (not fmt.signed and negative and not zero) or (not fmt.has_zero and zero)


def _special(x: float, fmt: Format) -> float:
    if math.isnan(x) or _outside(False, x < 0, fmt):
        return math.nan
    big = {"inf": math.inf, "nan": math.nan, "saturate": float(fmt.max_exact)}[fmt.overflow]
    return -big if x < 0 else big


def _fix_zero(r: float, negative: bool, fmt: Format) -> float:
    """A zero result's sign; without zero (§1 step 6), every result below the smallest
    positive value s is s."""
    if not fmt.has_zero:
        s = 2.0**fmt.min_exponent_of_quantum
        if abs(r) < s:
            return -s if negative else s
        return r
    if r == 0:
        return -0.0 if (negative and fmt.signed_zero) else 0.0
    return r


@functools.lru_cache(maxsize=None)
def _context(p: int, emin: int, emax: int, rnd):
    return gmpy2.context(
        precision=p,
        emin=emin - p + 2,  # MPFR exponents are one more than IEEE's; subnormal floor
        emax=emax + 8,  # room above the format: overflow is decided below, per IEEE 754
        subnormalize=True,
        round=rnd,
    )


def _mpfr(x: float, p: int, emin: int, emax: int, rnd):
    """``x`` rounded by MPFR to ``p`` bits, IEEE exponent range [emin, emax] with subnormals
    of that precision (quantum 2^(emin - p + 1)), and MPFR's inexact flag (one context per
    setting, made once: the oracle runs for hundreds of thousands of points). The context's own
    ``plus`` rounds in that context: ~13x faster than entering it with ``with`` per point, and
    the same numbers and flags (checked on 10^5 random floats of every exponent, 4 formats, 5 modes)."""
    c = _context(p, emin, emax, rnd)
    c.clear_flags()
    r = c.plus(x)
    return r, c.inexact


@functools.lru_cache(maxsize=None)
def _largest(fmt: Format):
    """The format's largest finite value as an MPFR number (exact: it has p bits)."""
    big = gmpy2.mpfr(gmpy2.mpq(fmt.max_exact.numerator, fmt.max_exact.denominator), fmt.p + 2)
    assert Fraction(*(int(t) for t in big.as_integer_ratio())) == fmt.max_exact
    return big


def _grid_integer(r, qexp: int):
    """``|r| / 2**qexp`` for an MPFR number ``r`` on that grid, as an integer."""
    m, e = abs(r).as_mantissa_exp()  # |r| = m * 2**e
    if e >= qexp:
        return m << (e - qexp)
    assert m & ((1 << (qexp - e)) - 1) == 0, (r, qexp)
    return m >> (qexp - e)


def _quantum_exponent(r, p: int, emin: int) -> int:
    """The exponent of the spacing at MPFR number ``r`` of a p-bit format with gradual
    underflow (MPFR's exponent is one more than floor(log2 |r|))."""
    return (max(gmpy2.get_exp(r) - 1, emin) if r != 0 else emin) - p + 1


def _mpfr_derived(x: float, fmt: Format, mode: str):
    """The modes MPFR lacks (gmpy2 has no MPFR_RNDNA), from the ones it has.
    Ties: x is a midpoint exactly when MPFR rounds it to p + 1 bits (quantum halved) exactly
    with an odd last bit; a midpoint goes away from zero (rna) or toward it (rnz), every other
    x as MPFR's round to nearest. Round to odd: MPFR's truncation, moved to its odd
    neighbour away from zero when MPFR reports it inexact and its last bit is 0."""
    if mode in ("rna", "rnz"):
        r1, inexact = _mpfr(x, fmt.p + 1, fmt.emin, fmt.emax, gmpy2.RoundToZero)
        tie = not inexact and r1 != 0 and _grid_integer(r1, _quantum_exponent(r1, fmt.p + 1, fmt.emin)) % 2 == 1
        if tie:
            return _mpfr(x, fmt.p, fmt.emin, fmt.emax, gmpy2.RoundAwayZero if mode == "rna" else gmpy2.RoundToZero)[0]
        return _mpfr(x, fmt.p, fmt.emin, fmt.emax, gmpy2.RoundToNearest)[0]
    assert mode == "ro", mode
    r, inexact = _mpfr(x, fmt.p, fmt.emin, fmt.emax, gmpy2.RoundToZero)
    if not inexact:
        return r
    qexp = _quantum_exponent(r, fmt.p, fmt.emin)
    n = _grid_integer(r, qexp)
    if n % 2 == 0:
        n += 1
    return gmpy2.mpfr(math.copysign(math.ldexp(int(n), qexp), x))  # exact: n < 2^(p+1), 2^qexp a float64


def mpfr_round(x: float, fmt: Format, mode: str) -> float:
    """Round the exact value of the Python float ``x`` to ``fmt`` with MPFR."""
    if math.isnan(x) or math.isinf(x):
        return _special(x, fmt)
    # without zero every result below 2^emin ends as the smallest value, flushed or not
    assert fmt.subnormals or not fmt.has_zero, "MPFR oracle covers formats with gradual underflow"
    negative = math.copysign(1.0, x) < 0
    if _outside(x == 0, negative, fmt):
        return math.nan
    if not fmt.has_zero and abs(x) < 2.0**fmt.min_exponent_of_quantum:
        # below the smallest value s every mode gives s (§1 step 6); not left to MPFR, which at
        # precision 1 keeps 2^-129 under emin = -126 (gmpy2 2.3.2, MPFR 4.2.2; precision 2 underflows)
        return _fix_zero(0.0, negative, fmt)
    if mode in _MPFR_MODES:
        r = _mpfr(x, fmt.p, fmt.emin, fmt.emax, _MPFR_MODES[mode])[0]
    else:
        r = _mpfr_derived(x, fmt, mode)
    if gmpy2.is_infinite(r) or abs(r) > _largest(fmt):  # an exact comparison
        return _overflow(r, negative, fmt, mode)
    return _fix_zero(float(r), negative, fmt)


def fraction_round(x: Fraction | float, fmt: Format, mode: str, negative_zero: bool = False) -> float:
    """Round an exact rational to ``fmt`` with integer arithmetic, in any deterministic mode
    (docs/semantics.md §1, written again)."""
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return _special(x, fmt)
        negative = math.copysign(1.0, x) < 0
        x = Fraction(x)
    else:
        negative = x < 0 or (x == 0 and negative_zero)
    if _outside(x == 0, negative, fmt):
        return math.nan
    a = abs(x)
    if a == 0:
        return _fix_zero(0.0, negative, fmt)
    num, den = a.numerator, a.denominator  # integers throughout: a = num / den
    # e = floor(log2 a): the bit lengths leave e or e - 1; a >= 2^e iff num >= den * 2^e
    e = num.bit_length() - den.bit_length()
    if (num << max(-e, 0)) < (den << max(e, 0)):
        e -= 1
    qe = (max(e, fmt.emin) if fmt.subnormals else e) - fmt.p + 1
    # a / 2^qe = lo + rem / div with 0 <= rem < div
    lo, rem = divmod(num << max(-qe, 0), div := den << max(qe, 0))
    if rem == 0:
        n = lo
    elif mode == "rne":
        n = lo + 1 if (2 * rem > div or (2 * rem == div and lo % 2 == 1)) else lo
    elif mode == "rz":
        n = lo
    elif mode == "ru":
        n = lo if negative else lo + 1
    elif mode == "rd":
        n = lo + 1 if negative else lo
    elif mode == "rna":  # nearest, a tie away from zero
        n = lo + 1 if 2 * rem >= div else lo
    elif mode == "rnz":  # nearest, a tie toward zero
        n = lo + 1 if 2 * rem > div else lo
    elif mode == "ro":  # inexact: of lo and lo + 1, the odd one
        n = lo if lo % 2 == 1 else lo + 1
    else:
        raise ValueError(mode)
    # the result is n * 2^qe; the largest value is top * 2^mq
    top, mq = fmt.top_significand, fmt.emax - fmt.p + 1
    if (n << max(qe - mq, 0)) > (top << max(mq - qe, 0)):
        return _overflow(Fraction(n) * Fraction(2) ** qe, negative, fmt, mode)
    if not fmt.subnormals and qe < fmt.emin and 0 < n < (1 << (fmt.emin - qe)):
        n = 0
    out = math.ldexp(n, qe) if qe >= -1074 else float(Fraction(n) * Fraction(2) ** qe)  # exact
    out = -out if negative else out
    return _fix_zero(out, negative, fmt)


def format_values(fmt: Format) -> list[Fraction]:
    """Every non-negative finite value of ``fmt``, ascending, from its definition."""
    vals = [Fraction(0)] if fmt.has_zero else []
    q0 = fmt.emin - fmt.p + 1
    if fmt.subnormals:
        vals += [Fraction(m) * Fraction(2) ** q0 for m in range(1, 2 ** (fmt.p - 1))]
    for e in range(fmt.emin, fmt.emax + 1):
        top = fmt.top_significand if e == fmt.emax else 2**fmt.p - 1
        vals += [Fraction(m) * Fraction(2) ** (e - fmt.p + 1) for m in range(2 ** (fmt.p - 1), top + 1)]
    return vals


# --- op-by-op oracle: mpmath for the value, exact rationals for the rounding ---

import mpmath.libmp as _mlib

_WORK = 240  # bits; far more than 2p + 2 for every p the emulator takes


def _mpf(x: Fraction):
    return _mlib.from_rational(x.numerator, x.denominator, _WORK + 64, "n")


def _frac(v) -> Fraction:
    p, q = _mlib.to_rational(v)
    return Fraction(int(p), int(q))


def _sticky(r: Fraction, exact: bool) -> Fraction:
    """r is the value truncated toward zero at _WORK bits; push it strictly inside the
    interval to the next _WORK-bit number when the truncation lost something."""
    if exact or r == 0:
        return r
    e = abs(r).numerator.bit_length() - abs(r).denominator.bit_length() + 1
    tiny = Fraction(2) ** (e - _WORK - 4)
    return r + tiny if r > 0 else r - tiny


def mp_op(op: str, a: float, b: float | None, fmt: Format, mode: str) -> float:
    """One elementary op computed by mpmath, rounded once to fmt (with its exponent range)."""
    fa = Fraction(a)
    fb = Fraction(b) if b is not None else None
    if op == "add":
        v = _frac(_mlib.mpf_add(_mpf(fa), _mpf(fb), 0))  # prec 0: exact
    elif op == "sub":
        v = _frac(_mlib.mpf_sub(_mpf(fa), _mpf(fb), 0))
    elif op == "mul":
        v = _frac(_mlib.mpf_mul(_mpf(fa), _mpf(fb), 0))
    elif op == "div":
        r = _frac(_mlib.mpf_div(_mpf(fa), _mpf(fb), _WORK, "d"))
        v = _sticky(r, r * fb == fa)
    elif op == "sqrt":
        r = _frac(_mlib.mpf_sqrt(_mpf(fa), _WORK, "d"))
        v = _sticky(r, r * r == fa)
    elif op == "exp":
        r = _frac(_mlib.mpf_exp(_mpf(fa), _WORK, "d"))
        v = _sticky(r, fa == 0)
    else:
        raise ValueError(op)
    neg_zero = v == 0 and _neg_zero_result(op, a, b, mode)
    return fraction_round(v, fmt, mode, negative_zero=neg_zero)


def _neg_zero_result(op, a, b, mode):
    sa = math.copysign(1, a) < 0
    if op in ("sqrt", "exp"):
        return sa and op == "sqrt"
    sb = math.copysign(1, b) < 0
    if op in ("mul", "div"):
        return sa != sb
    if op == "sub":
        sb = not sb
    if a == 0 and b == 0:
        return sa and sb if mode != "rd" else (sa or sb)
    return mode == "rd"  # exact cancellation x + (-x): +0, except -0 when rounding down
