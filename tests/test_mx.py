"""MX block-scaled formats (collapse_sim.mx) against an exact-rational reading of the OCP MX
v1.0 specification written here from the bit layouts, independently of collapse_sim's
Format and rounding code: every element value of every element format, at scales that
include E8M0's extremes, midpoints (ties to even), values a float64 ulp off them, values
that saturate, random blocks, and the implementation-defined cases docs/semantics.md §13
fixes (zero, NaN, infinite blocks, scales beyond E8M0)."""

from __future__ import annotations

import bisect
import functools
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from collapse_sim.mx import MX_FORMATS, MXError, mx_quantize, mx_round

# (exponent bits, mantissa bits, bias, whether the top code is special) from the OCP specs:
# E4M3: only S.1111.111 is NaN; E5M2: exponent 31 is inf/NaN; FP6/FP4: no special codes.
LAYOUT = {"mxfp8_e4m3": (4, 3, 7, "e4m3"), "mxfp8_e5m2": (5, 2, 15, "ieee"), "mxfp6_e2m3": (2, 3, 1, None),
          "mxfp6_e3m2": (3, 2, 3, None), "mxfp4_e2m1": (2, 1, 1, None)}
EMAX_ELEM = {"mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxfp6_e2m3": 2, "mxfp6_e3m2": 4, "mxfp4_e2m1": 2, "mxint8": 0}
ML_DTYPES = {"mxfp8_e4m3": ml_dtypes.float8_e4m3fn, "mxfp8_e5m2": ml_dtypes.float8_e5m2,
             "mxfp6_e2m3": ml_dtypes.float6_e2m3fn, "mxfp6_e3m2": ml_dtypes.float6_e3m2fn,
             "mxfp4_e2m1": ml_dtypes.float4_e2m1fn}


@functools.lru_cache(maxsize=None)
def element_values(name: str) -> dict[Fraction, int]:
    """Every finite non-negative element value -> the last bit of its code (for ties to even)."""
    if name == "mxint8":
        return {Fraction(k, 64): k & 1 for k in range(128)}
    eb, mb, bias, special = LAYOUT[name]
    out = {}
    for E in range(2**eb):
        for m in range(2**mb):
            if special == "ieee" and E == 2**eb - 1 or special == "e4m3" and E == 2**eb - 1 and m == 2**mb - 1:
                continue
            v = Fraction(m, 2**mb) * Fraction(2) ** (1 - bias) if E == 0 else (1 + Fraction(m, 2**mb)) * Fraction(2) ** (E - bias)
            out[v] = m & 1
    return out


def oracle_element(v: Fraction, name: str) -> Fraction:
    """Nearest element value, ties to the even code, saturating at the largest."""
    vals = element_values(name)
    ordered = _sorted_values(name)
    a = min(abs(v), ordered[-1])
    i = bisect.bisect_left(ordered, a)
    near = ordered[max(i - 1, 0): i + 1]  # the neighbours of a (a itself when it is a value)
    best = min(near, key=lambda w: (abs(w - a), vals[w]))
    return best if v >= 0 else -best


@functools.lru_cache(maxsize=None)
def _sorted_values(name: str) -> list[Fraction]:
    return sorted(element_values(name))


def floor_log2(a: Fraction) -> int:
    t = a.numerator.bit_length() - a.denominator.bit_length()
    while Fraction(2) ** t > a:
        t -= 1
    while Fraction(2) ** (t + 1) <= a:
        t += 1
    return t


def oracle_block(block: list[float], name: str) -> list[float]:
    """One block of float64 values through the specification, exactly."""
    if any(not np.isfinite(b) for b in block):
        return [np.nan] * len(block)
    V = [Fraction(b) for b in block]
    amax = max(abs(v) for v in V)
    e = -127 if amax == 0 else max(floor_log2(amax) - EMAX_ELEM[name], -127)
    if e > 127:
        return [np.nan] * len(block)
    X = Fraction(2) ** e
    return [float(X * oracle_element(v / X, name)) for v in V]


def check(x: np.ndarray, name: str, block: int = 32):
    """x (1-d) in blocks of ``block``: mx_round equals the oracle bit for bit (NaN where NaN)."""
    got = mx_round(x, name, block=block)
    want = np.concatenate([oracle_block(list(x[i:i + block]), name) for i in range(0, x.size, block)])
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all(), (name, x[~same][:5], got[~same][:5], want[~same][:5])


@pytest.mark.parametrize("name", list(MX_FORMATS))
def test_every_element_value_midpoint_and_neighbour_at_extreme_scales(name):
    """Each block holds the largest element value times 2^s (so the shared exponent is s)
    and then, all times 2^s: every element value, every midpoint of neighbours (a tie), each
    midpoint a float64 ulp above and below, values between the largest element and the next
    power of two (they saturate), both signs; s includes −127, −126 and 127 − emax_elem."""
    vals = sorted(element_values(name))
    top = vals[-1]
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    xs = [float(v) for v in vals] + [float(m) for m in mids]
    xs += [np.nextafter(float(m), np.inf) for m in mids] + [np.nextafter(float(m), -np.inf) for m in mids]
    xs += [float(top + (2 ** (floor_log2(top) + 1) - top) * f) for f in (Fraction(1, 3), Fraction(1, 2), Fraction(99, 100))]
    xs = np.array(xs + [-v for v in xs])
    emax = EMAX_ELEM[name]
    for s in (-127, -126, -60, -1, 0, 1, 64, 127 - emax):
        blocks = []
        for i in range(0, xs.size, 31):  # 31 values + the block's largest
            blocks += [float(top) * 2.0**s] + list(xs[i:i + 31] * 2.0**s)
            blocks += [0.0] * (-len(blocks) % 32)
        check(np.array(blocks), name)


@pytest.mark.parametrize("name", list(MX_FORMATS))
def test_random_blocks_and_block_sizes(name):
    """Random signs, significands and exponents spread over 2^-150..2^150 (so scales clamp at
    −127 and exceed 127), blocks of 32, 8, 1 and a last partial block."""
    rng = np.random.default_rng([7, len(name)])
    for k, n in ((32, 32 * 20 + 5), (8, 203), (1, 40)):
        centre = rng.integers(-150, 150, size=-(-n // k)).repeat(k)[:n]
        x = rng.standard_normal(n) * 2.0 ** (centre + rng.integers(-12, 3, n))
        x[rng.random(n) < 0.05] = 0.0
        check(x, name, k)


def test_special_blocks_and_axes():
    """All-zero blocks scale at 2^-127 with zero elements; a NaN or infinity makes its block
    NaN (scale and values), other blocks untouched; blocks run along any axis."""
    x = np.zeros((3, 64))
    x[1, 5], x[2, 40] = np.nan, -np.inf
    x[2, 3] = 1.5
    q = mx_quantize(x, "mxfp8_e4m3")
    assert q.scale_exp[0].tolist() == [-127, -127] and np.isnan(q.scale_exp[1, 0]) and q.scale_exp[1, 1] == -127
    assert q.scale_exp[2, 0] == 0 - 8 and np.isnan(q.scale_exp[2, 1])
    out = q.dequantize()
    assert out[2, 3] == 1.5 and np.isnan(out[1, :32]).all() and (out[1, 32:] == 0).all() and np.isnan(out[2, 32:]).all()
    rng = np.random.default_rng(3)
    y = rng.standard_normal((40, 5))
    assert np.array_equal(mx_round(y, "mxfp4_e2m1", axis=0, block=8), mx_round(y.T, "mxfp4_e2m1", axis=-1, block=8).T)


def test_value_sets_match_ml_dtypes_and_e8m0():
    """The element value sets written here equal ml_dtypes' (every code of each dtype), and
    E8M0's codes 0..254 are 2^(c − 127), code 255 NaN."""
    for name, dt in ML_DTYPES.items():
        bits = np.dtype(dt).itemsize * 8 if name.startswith("mxfp8") else int(name[4])
        codes = np.arange(2**bits, dtype=np.uint8).view(dt).astype(np.float64)
        finite = {Fraction(float(v)) for v in codes[np.isfinite(codes)]}
        assert finite == set(element_values(name)) | {-v for v in element_values(name)}, name
    e8m0 = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    assert e8m0[:255].tolist() == [2.0 ** (c - 127) for c in range(255)] and np.isnan(e8m0[255])


def test_bad_inputs():
    with pytest.raises(MXError, match="unknown MX format"):
        mx_round(np.ones(4), "mxfp5")
    with pytest.raises(MXError, match="at least one element"):
        mx_round(np.ones(4), "mxfp4_e2m1", block=0)
    with pytest.raises(MXError, match="axis 2 is out of range"):
        mx_round(np.ones((2, 2)), "mxint8", axis=2)
    with pytest.raises(MXError, match="at least one axis"):
        mx_round(np.float64(1.0), "mxint8")
    for bad in (True, 2.5, "8"):
        with pytest.raises(MXError, match="block must be an integer"):
            mx_round(np.ones(4), "mxint8", block=bad)
    with pytest.raises(MXError, match="axis must be an integer"):
        mx_round(np.ones(4), "mxint8", axis=1.5)
    for bad in (np.ones(4) * 1j, np.array(["a", "b"])):
        with pytest.raises(MXError, match="takes real numbers"):
            mx_round(bad, "mxint8")
    # numpy integers are integers; a block longer than the axis is one block, not padded to its size
    assert np.array_equal(mx_round(np.arange(4.0), "mxfp4_e2m1", block=np.int64(10**9)), mx_round(np.arange(4.0), "mxfp4_e2m1", block=4))
