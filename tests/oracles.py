"""Independent rounding oracles: MPFR (via gmpy2) and exact rationals.

Neither shares code with collapse_sim.rounding: the MPFR oracle lets MPFR do
the rounding (precision p, exponent range set so that subnormals are exact
with ``subnormalize``); the rational oracle does it with Python integers.
The overflow rule is written here again, straight from IEEE 754 §7.4.
"""

from __future__ import annotations

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
    away = mode == "rne" or (mode == "ru" and not negative) or (mode == "rd" and negative)
    if away:
        big = {"inf": math.inf, "nan": math.nan, "saturate": xmax}[fmt.overflow]
    else:
        big = xmax
    return -big if negative else big


def _special(x: float, fmt: Format) -> float:
    if math.isnan(x):
        return math.nan
    big = {"inf": math.inf, "nan": math.nan, "saturate": float(fmt.max_exact)}[fmt.overflow]
    return -big if x < 0 else big


def _fix_zero(r: float, negative: bool, fmt: Format) -> float:
    if r == 0:
        return -0.0 if (negative and fmt.signed_zero) else 0.0
    return r


def mpfr_round(x: float, fmt: Format, mode: str) -> float:
    """Round the exact value of the Python float ``x`` to ``fmt`` with MPFR."""
    if math.isnan(x) or math.isinf(x):
        return _special(x, fmt)
    assert fmt.subnormals, "MPFR oracle covers formats with gradual underflow"
    ctx = gmpy2.context(
        precision=fmt.p,
        emin=fmt.emin - fmt.p + 2,  # MPFR exponents are one more than IEEE's; subnormal floor
        emax=fmt.emax + 8,  # room above the format: overflow is decided below, per IEEE 754
        subnormalize=True,
        round=_MPFR_MODES[mode],
    )
    with gmpy2.context(ctx):
        r = gmpy2.mpfr(x)
    negative = math.copysign(1.0, x) < 0
    if gmpy2.is_infinite(r) or abs(Fraction(*(int(t) for t in r.as_integer_ratio()))) > fmt.max_exact:
        return _overflow(r, negative, fmt, mode)
    return _fix_zero(float(r), negative, fmt)


def fraction_round(x: Fraction | float, fmt: Format, mode: str, negative_zero: bool = False) -> float:
    """Round an exact rational to ``fmt`` with integer arithmetic (RNE/RZ/RU/RD)."""
    if isinstance(x, float):
        if math.isnan(x) or math.isinf(x):
            return _special(x, fmt)
        negative = math.copysign(1.0, x) < 0
        x = Fraction(x)
    else:
        negative = x < 0 or (x == 0 and negative_zero)
    a = abs(x)
    if a == 0:
        return _fix_zero(0.0, negative, fmt)
    # e = floor(log2 a)
    e = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** e > a:
        e -= 1
    while Fraction(2) ** (e + 1) <= a:
        e += 1
    qe = (max(e, fmt.emin) if fmt.subnormals else e) - fmt.p + 1
    scaled = a / Fraction(2) ** qe
    lo = scaled.numerator // scaled.denominator
    rest = scaled - lo
    if rest == 0:
        n = lo
    elif mode == "rne":
        n = lo + 1 if (rest > Fraction(1, 2) or (rest == Fraction(1, 2) and lo % 2 == 1)) else lo
    elif mode == "rz":
        n = lo
    elif mode == "ru":
        n = lo if negative else lo + 1
    elif mode == "rd":
        n = lo + 1 if negative else lo
    else:
        raise ValueError(mode)
    r = Fraction(n) * Fraction(2) ** qe
    if r > fmt.max_exact:
        return _overflow(r, negative, fmt, mode)
    if not fmt.subnormals and 0 < r < Fraction(2) ** fmt.emin:
        r = Fraction(0)
    out = float(r)
    out = -out if negative else out
    return _fix_zero(out, negative, fmt)


def format_values(fmt: Format) -> list[Fraction]:
    """Every non-negative finite value of ``fmt``, ascending, from its definition."""
    vals = [Fraction(0)]
    q0 = fmt.emin - fmt.p + 1
    if fmt.subnormals:
        vals += [Fraction(m) * Fraction(2) ** q0 for m in range(1, 2 ** (fmt.p - 1))]
    for e in range(fmt.emin, fmt.emax + 1):
        top = fmt.top_significand if e == fmt.emax else 2**fmt.p - 1
        vals += [Fraction(m) * Fraction(2) ** (e - fmt.p + 1) for m in range(2 ** (fmt.p - 1), top + 1)]
    return vals
