"""The carrier: the wider float every emulated op is computed in before its rounding
(docs/semantics.md §2).

The carrier is float32 if every format of the policy has ``p <= 11`` and float64 if
``p <= 25``. With at least ``2p + 2`` carrier bits the double rounding (carrier, then
format) equals one correct rounding for + − × ÷ √ (Figueroa 1995). The carrier must
also hold every product and quotient of two format values as a *normal* number,
because XLA:CPU flushes subnormal floats in arithmetic; :func:`carrier_for` checks
both. :func:`carrier_add` makes + and − correct under the directed modes too.
"""

from __future__ import annotations

from fractions import Fraction

import jax.numpy as jnp
from jax import lax

from ...errors import CollapseSimError
from ...formats import Format
from ...rounding import Mode


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


def carrier_add(a, b, mode):
    """``a + b`` in the carrier, in a form whose rounding to any format with
    ``p <= pc - 2`` in ``mode`` equals the correct rounding of the exact sum.

    Round to nearest (ties to even, away or toward zero): the plain carrier sum. If it
    is inexact, the last bit of the smaller addend lies below the carrier's last bit of
    the sum, so (a p-bit number) the addend is below a quarter of the format's spacing
    there (``2p + 2 <= pc``): the exact sum and
    the carrier sum both lie within a quarter spacing of the larger addend, a format
    value, and neither is a midpoint; every nearest mode rounds both to that value.
    (Figueroa 1995's innocuous double rounding; the tie rule never comes into play.)
    Directed modes and round to odd: the carrier sum can hide that the exact sum lies
    just off a format value (a large, b tiny), so the sum is made *round-to-odd*: the
    error term of TwoSum (exact, no FMA needed) says whether the carrier rounded, and
    the last carrier bit is then forced to 1 (Boldo & Melquiond, 2008); rounding that
    on in RZ, RU, RD or RO gives the rounding of the exact sum.
    Products of two format values are exact in the carrier, and for ÷ and √ a
    non-representable exact result is never a format value or a midpoint and is too
    far from every one for the carrier's rounding to reach it, so only + and − need this.
    """
    s = a + b
    if mode.nearest:
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
