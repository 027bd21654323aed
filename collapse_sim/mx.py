"""Block-scaled formats of the OCP Microscaling (MX) specification v1.0.

An MX block is ``k`` elements (``k = 32`` by default) that share one scale
``X = 2^e``, an E8M0 number (``e = −127..127``; the code 255 is NaN). What a
block of real values ``V_0..V_{k−1}`` becomes (docs/semantics.md §13):

    e   = ⌊log2 max_i |V_i|⌋ − emax_elem       (emax_elem: the element format's largest exponent)
    e   = max(e, −127)                          (E8M0's smallest scale; the spec's clamp)
    P_i = ∘_elem(V_i / 2^e)                     round to nearest, ties to even, magnitudes above
                                                the element's largest value saturate to it
    value_i = 2^e · P_i

The scale is a value of the built-in format ``e8m0fnu``, whose range this module
takes. For a finite block with ``0 < amax < 2^(128 + emax_elem)`` it is
``round_to(amax · 2^−emax_elem, "e8m0fnu", "rd")`` (rounding down with p = 1 is
``2^⌊log2⌋``, and below 2^−127 a format without zero gives its smallest value:
the clamp; tests/test_rounding.py checks the two agree), but not outside: above
the range RD gives 2^127 where a block has a NaN scale, an all-zero block's 0
rounds to NaN where it has 2^−127, and ``amax · 2^−emax_elem`` can underflow in
float64. So the exponent is computed here, from ``frexp``, and those cases apart.

``V_i / 2^e`` is exact in float64 (a power-of-two scale of a float64 value that
cannot overflow: |V_i / 2^e| < 2^(emax_elem+1)), except that it can underflow for
values far below the block's largest, which round to 0 either way; so the one rounding
is the element rounding, done by :func:`collapse_sim.rounding.round_to`.

Where the spec leaves the choice to the implementation, this module decides, and
docs/semantics.md §13 says so: an all-zero block gets ``e = −127`` and zero elements;
a block holding a NaN or an infinity has a NaN scale and NaN values; a block whose
``e`` would exceed 127 (float64 inputs of magnitude ≥ 2^(128 + emax_elem)) has a NaN
scale and NaN values. A last block shorter than ``k`` (the axis length not a multiple
of ``k``) is a block of its own.

Elements: FP8 E4M3 (``e4m3fn``, emax 8), FP8 E5M2 (``e5m2``, emax 15), FP6 E2M3
(``e2m3fn``, emax 2), FP6 E3M2 (``e3m2fn``, emax 4), FP4 E2M1 (``e2m1fn``, emax 2),
and INT8: two's complement with an implicit scale 2^-6 (emax 0), values k·2^-6 for
|k| ≤ 127 (the symmetric range; the code −128 is not produced).
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np

from .errors import CollapseSimError
from .formats import Format, parse
from .rounding import round_to

SCALE_FORMAT = parse("e8m0fnu")
SCALE_EMIN, SCALE_EMAX = SCALE_FORMAT.emin, SCALE_FORMAT.emax  # E8M0: 2^-127 .. 2^127, code 255 = NaN
INT8_QUANTUM = 2.0**-6  # MXINT8 element step
INT8_MAX = 127  # largest |k| of an MXINT8 element k·2^-6


class MXError(CollapseSimError):
    """An MX format, block size or axis that cannot be used."""


@dataclasses.dataclass(frozen=True)
class MXFormat:
    """An MX format: the element format (a :class:`Format`, or None for INT8), its largest
    exponent ``emax_elem`` and the block size ``k``."""

    name: str
    element: Format | None
    emax_elem: int
    block: int = 32

    def __post_init__(self) -> None:
        object.__setattr__(self, "block", _count(self.block, "block"))
        if self.block < 1:
            raise MXError(f"an MX block holds at least one element, got block={self.block}")

    @property
    def max_element(self) -> float:
        return INT8_MAX * INT8_QUANTUM if self.element is None else self.element.max


def _count(v, what: str) -> int:
    """``v`` as a Python int (numpy integers too), refusing bools, floats and strings."""
    if isinstance(v, (bool, np.bool_)):
        raise MXError(f"{what} must be an integer, got {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise MXError(f"{what} must be an integer, got {v!r} ({type(v).__name__})") from None


def _fp(name: str, element: str) -> MXFormat:
    f = parse(element)
    return MXFormat(name, f, f.emax)


MX_FORMATS: dict[str, MXFormat] = {m.name: m for m in (
    _fp("mxfp8_e4m3", "e4m3fn"), _fp("mxfp8_e5m2", "e5m2"), _fp("mxfp6_e2m3", "e2m3fn"),
    _fp("mxfp6_e3m2", "e3m2fn"), _fp("mxfp4_e2m1", "e2m1fn"), MXFormat("mxint8", None, 0))}


def mx_format(spec: "str | MXFormat", block: int | None = None) -> MXFormat:
    """``"mxfp8_e4m3"`` etc. (:data:`MX_FORMATS`), with the block size ``block`` if given."""
    if isinstance(spec, MXFormat):
        m = spec
    else:
        m = MX_FORMATS.get(str(spec).lower())
        if m is None:
            raise MXError(f"unknown MX format {spec!r}; use one of {', '.join(MX_FORMATS)}")
    return m if block is None else dataclasses.replace(m, block=block)


@dataclasses.dataclass(frozen=True)
class MXBlocks:
    """Quantised data: ``scale_exp`` (one per block, float64 holding an integer or NaN) and
    ``elements`` (the element values P_i, float64), blocked along ``axis`` of the input."""

    fmt: MXFormat
    axis: int
    scale_exp: np.ndarray  # (..., n_blocks) with the blocked axis last
    elements: np.ndarray  # the input's shape

    def dequantize(self) -> np.ndarray:
        """``2^e · P_i`` for every element (exact in float64)."""
        el = np.moveaxis(self.elements, self.axis, -1)
        e = np.repeat(self.scale_exp, min(self.fmt.block, max(el.shape[-1], 1)), axis=-1)[..., : el.shape[-1]]
        with np.errstate(invalid="ignore"):
            out = np.where(np.isnan(e), np.nan, np.ldexp(el, np.nan_to_num(e).astype(np.int64)))
        return np.moveaxis(out, -1, self.axis)


def _round_elements(x: np.ndarray, fmt: MXFormat) -> np.ndarray:
    """``∘_elem(x)``: nearest, ties to even, saturating at the element's largest magnitude."""
    top = fmt.max_element
    x = np.clip(x, -top, top)  # beyond the largest value: saturate (clip, then round: the same)
    if fmt.element is None:
        return np.round(x / INT8_QUANTUM) * INT8_QUANTUM  # numpy rounds half to even; x / 2^-6 exact
    return np.asarray(round_to(x, fmt.element), dtype=np.float64)


def mx_quantize(x, fmt: "str | MXFormat", *, axis: int = -1, block: int | None = None) -> MXBlocks:
    """Quantise float64 values ``x`` to MX blocks of ``block`` consecutive elements along
    ``axis`` (the module docstring's rule)."""
    fmt = mx_format(fmt, block)
    axis = _count(axis, "axis")
    raw = np.asarray(x)
    if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)
            or raw.dtype == np.bool_):
        raise MXError(f"mx_quantize takes real numbers, got an array of dtype {raw.dtype}")
    x = raw.astype(np.float64)
    if x.ndim == 0:
        raise MXError("mx_quantize takes an array with at least one axis to block along")
    if not -x.ndim <= axis < x.ndim:
        raise MXError(f"axis {axis} is out of range for an array of {x.ndim} dimension(s)")
    axis %= x.ndim
    v = np.moveaxis(x, axis, -1)
    k, n = min(fmt.block, max(v.shape[-1], 1)), v.shape[-1]  # one block longer than the axis: no padding to it
    nb = -(-n // k)
    padded = np.concatenate([v, np.zeros(v.shape[:-1] + (nb * k - n,))], axis=-1).reshape(v.shape[:-1] + (nb, k))
    with np.errstate(invalid="ignore"):
        amax = np.max(np.abs(padded), axis=-1)  # NaN if the block holds a NaN, inf if an infinity
    special = ~np.isfinite(amax)
    _, e2 = np.frexp(np.where(special | (amax == 0), 1.0, amax))  # amax = m·2^e2, m in [1/2, 1): ⌊log2⌋ = e2 − 1
    e = np.where(amax == 0, SCALE_EMIN, np.maximum(e2 - 1 - fmt.emax_elem, SCALE_EMIN))
    bad = special | (e > SCALE_EMAX)
    scaled = np.ldexp(padded, -np.where(bad, 0, e)[..., None])
    P = np.where(bad[..., None], np.nan, _round_elements(np.where(bad[..., None], 0.0, scaled), fmt))
    elements = np.moveaxis(P.reshape(v.shape[:-1] + (nb * k,))[..., :n], -1, axis)
    return MXBlocks(fmt, axis, np.where(bad, np.nan, e.astype(np.float64)), elements)


def mx_round(x, fmt: "str | MXFormat", *, axis: int = -1, block: int | None = None) -> np.ndarray:
    """``x`` through MX quantisation and back: the values an MX tensor holds (float64)."""
    return mx_quantize(x, fmt, axis=axis, block=block).dequantize()


def mx_element_name(fmt: MXFormat) -> str:
    """How a policy names ``fmt``'s element: the element format's name, or ``int8``."""
    return "int8" if fmt.element is None else fmt.element.name


def mx_for_element(element: str, block: int = 32) -> MXFormat:
    """The MX format whose element is ``element`` (``e4m3fn``, ``e5m2``, ``e2m3fn``, ``e3m2fn``,
    ``e2m1fn`` or another name of one of those formats, or ``int8``), with blocks of ``block``:
    what a policy's ``weights=mx(ELEMENT,k)`` names (docs/semantics.md §5.1)."""
    name = str(element).strip().lower()
    try:
        f = None if name == "int8" else parse(name)
    except CollapseSimError:
        f = False  # no format of that name: matches no element
    for m in MX_FORMATS.values():
        if m.element == f:  # None (int8) or the element format, whatever its name
            return mx_format(m, block)
    names = ", ".join(mx_element_name(m) for m in MX_FORMATS.values())
    raise MXError(f"{element!r} is not an MX element format; use one of {names}")
