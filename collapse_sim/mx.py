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
is the element rounding: ``round`` (half to even) at the element's quantum, which
:func:`collapse_sim.rounding.round_to` to the element format equals (tests/test_mx.py
checks it against the exact-rational oracle; it is written with ``frexp``, ``ldexp`` and
``round`` alone so that jax.numpy runs it inside a compiled forward as cheaply as numpy).

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

Scaled fp8 (docs/semantics.md §13.2) is the other block-scaled kind: tiles with a float32
scale ``∘_fp32(amax · 2^margin / max_elem)`` each (:class:`ScaledFormat`, :func:`scaled_values`);
its scale-and-cast rule (:func:`amax_scale`, :func:`scale_cast`) is also flash3fp8's (§8.8.2).
"""

from __future__ import annotations

import dataclasses
import operator

import numpy as np

from .errors import CollapseSimError
from .formats import Format, parse

SCALE_FORMAT = parse("e8m0fnu")
SCALE_EMIN, SCALE_EMAX = SCALE_FORMAT.emin, SCALE_FORMAT.emax  # E8M0: 2^-127 .. 2^127, code 255 = NaN
INT8_EXP = -6  # MXINT8 element step 2^-6
INT8_QUANTUM = 2.0**INT8_EXP
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


def _round_elements(x, fmt: MXFormat, xp=np):
    """``∘_elem(x)``: nearest, ties to even, saturating at the element's largest magnitude, for
    ``|x| < 2^(emax_elem + 1)``. The element's quantum at ``x`` is ``2^(max(⌊log2|x|⌋, emin) − p + 1)``
    (its subnormals below ``2^emin``; ``2^−6`` for INT8), so the rounding is ``xp.round`` (half to
    even) of ``x`` over that power of two, both scalings exact in float64."""
    top = fmt.max_element
    x = xp.clip(x, -top, top)  # beyond the largest value: saturate (clip, then round: the same)
    if fmt.element is None:
        q = xp.full(x.shape, INT8_EXP, dtype=xp.int32)
    else:  # x = 0 (and a float64 subnormal, far below every element): the element's smallest quantum
        q = xp.maximum(_floor_log2(x, xp), fmt.element.emin) - (fmt.element.p - 1)
    return xp.round(x * _pow2(-q, xp)) * _pow2(q, xp)


def _floor_log2(x, xp):
    """``⌊log2|x|⌋`` of normal float64 values (numpy or jax.numpy); −1023 or less for 0 and subnormals."""
    if xp is np:
        return np.frexp(x)[1] - 1  # |x| = m·2^e, m in [1/2, 1)
    from .rounding import float64_exponent

    return float64_exponent(x)


def _pow2(k, xp):
    """``2^k`` as float64, exactly, for integers ``-1022 <= k <= 1023`` (numpy or jax.numpy)."""
    if xp is np:
        return np.ldexp(1.0, k)
    from .rounding import pow2

    return pow2(k)


def _tile_len(n: int, block: int) -> int:
    """The tile length along an axis of ``n`` values: ``block``, or ``n`` where it is shorter."""
    return min(block, max(n, 1))


def _tiles(v, block: int, xp):
    """``v`` (..., n) as tiles (..., nb, k) of ``block`` consecutive values along its last axis,
    the last tile padded with zeros (which raise no block's largest magnitude); one tile of n
    where n < block (no padding up to a tile longer than the axis)."""
    n = v.shape[-1]
    k = _tile_len(n, block)
    nb = -(-n // k)
    pad = xp.zeros(v.shape[:-1] + (nb * k - n,), dtype=xp.float64)
    return xp.concatenate([v, pad], axis=-1).reshape(v.shape[:-1] + (nb, k))


def _quantize_blocks(v, fmt: MXFormat, xp=np):
    """The rule of the module docstring on float64 values ``v`` (numpy or jax.numpy: ``xp``)
    blocked along their last axis: ``(e, bad, P)``, the scale exponents (..., n_blocks) as
    integers, where a block has no scale (``bad``: NaN or infinite values, ``e > 127``) and
    the element values (``v``'s shape, NaN in a bad block). The last block may be short."""
    padded = _tiles(v, fmt.block, xp)
    amax = xp.max(xp.abs(padded), axis=-1)  # NaN if the block holds a NaN, inf if an infinity
    special = ~xp.isfinite(amax)
    e = xp.where(amax == 0, SCALE_EMIN,
                 xp.maximum(_floor_log2(xp.where(special, 1.0, amax), xp) - fmt.emax_elem, SCALE_EMIN))
    bad = special | (e > SCALE_EMAX)
    scaled = padded * _pow2(-xp.where(bad, 0, e), xp)[..., None]  # exact: a power of two in range
    P = xp.where(bad[..., None], xp.nan, _round_elements(xp.where(bad[..., None], 0.0, scaled), fmt, xp))
    return e, bad, P.reshape(v.shape[:-1] + (-1,))[..., :v.shape[-1]]


def _along(x, axis: int, what: str = "mx_quantize"):
    """``x`` (numpy or jax) with the blocked ``axis`` moved last, and that axis as an index >= 0."""
    axis = _count(axis, "axis")
    if x.ndim == 0:
        raise MXError(f"{what} takes an array with at least one axis to block along")
    if not -x.ndim <= axis < x.ndim:
        raise MXError(f"axis {axis} is out of range for an array of {x.ndim} dimension(s)")
    return axis % x.ndim


def mx_quantize(x, fmt: "str | MXFormat", *, axis: int = -1, block: int | None = None) -> MXBlocks:
    """Quantise float64 values ``x`` to MX blocks of ``block`` consecutive elements along
    ``axis`` (the module docstring's rule)."""
    fmt = mx_format(fmt, block)
    raw = np.asarray(x)
    if not (np.issubdtype(raw.dtype, np.floating) or np.issubdtype(raw.dtype, np.integer)
            or raw.dtype == np.bool_):
        raise MXError(f"mx_quantize takes real numbers, got an array of dtype {raw.dtype}")
    x = raw.astype(np.float64)
    axis = _along(x, axis)
    with np.errstate(invalid="ignore"):
        e, bad, P = _quantize_blocks(np.moveaxis(x, axis, -1), fmt)
    return MXBlocks(fmt, axis, np.where(bad, np.nan, e.astype(np.float64)), np.moveaxis(P, -1, axis))


def mx_values(x, fmt: MXFormat, axis: int = -1):
    """The values of ``x`` (a float64 jax array, traceable) through MX quantisation and back,
    in blocks of ``fmt.block`` along ``axis``: :func:`mx_round`'s values, computed by the same
    rule in jax.numpy (one rule, two array modules; tests/test_mx_operands.py checks both
    against the exact-rational oracle)."""
    import jax.numpy as jnp

    axis = _along(x, axis, "mx_values")
    v = jnp.moveaxis(jnp.asarray(x, jnp.float64), axis, -1)
    e, bad, P = _quantize_blocks(v, fmt, jnp)
    k = _tile_len(v.shape[-1], fmt.block)
    e, bad = (jnp.repeat(a, k, axis=-1)[..., : v.shape[-1]] for a in (e, bad))
    return jnp.moveaxis(jnp.where(bad, jnp.nan, P * _pow2(jnp.where(bad, 0, e), jnp)), -1, axis)


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


# --------------------------------------------------------------------------- scaled fp8 (float32 scales)

#: The format of a scaled operand's scale (docs/semantics.md §13.2): float32, as FP8 recipes keep it.
FP32 = parse("fp32")
#: The elements a scaled operand may have (docs/semantics.md §13.2): the float elements of MX.
SCALED_ELEMENTS = ("e4m3fn", "e5m2", "e2m3fn", "e3m2fn", "e2m1fn")
#: The widest compute format (significand bits) whose values a scaled operand divides in float64
#: with one correct rounding (:func:`scale_cast`; docs/semantics.md §13.2).
SCALED_MAX_P = 25


@dataclasses.dataclass(frozen=True)
class ScaledFormat:
    """Scaled fp8 (docs/semantics.md §13.2): tiles of ``block`` consecutive values along the
    contraction axis, each with its own float32 scale ``∘_fp32(amax · 2^margin / max_elem)``,
    the elements ``element`` values, saturating; or, with ``block=None``, one such scale per
    tensor (§13.2.1: the amax of the whole operand tensor, of its rows up to the row computed
    for an activation). ``element`` is the format as named (its overflow rule is replaced by
    saturation in :attr:`saturating`)."""

    element: Format
    block: int | None = 128
    margin: int = 0

    def __post_init__(self) -> None:
        if self.block is not None:
            object.__setattr__(self, "block", _count(self.block, "the tile length k"))
            if self.block < 1:
                raise MXError(f"a scaled tile holds at least one element, got k={self.block}")
        object.__setattr__(self, "margin", _count(self.margin, "the margin"))
        if not 0 <= self.margin <= 64:
            raise MXError(f"the margin of a scaled operand is an integer from 0 to 64, got {self.margin}")
        if not any(self.element == parse(n) for n in SCALED_ELEMENTS):
            raise MXError(f"{self.element.name!r} is not a scaled element format; use one of "
                          f"{', '.join(SCALED_ELEMENTS)}")

    @property
    def per_tensor(self) -> bool:
        """Whether the scale is one per tensor (§13.2.1) rather than one per tile of ``block``."""
        return self.block is None

    @property
    def saturating(self) -> Format:
        """The element format with saturating overflow (the ``satfinite`` conversion)."""
        return dataclasses.replace(self.element, overflow="saturate")

    def token(self) -> str:
        """How a policy string writes it: ``scaled(ELEMENT,k|tensor)`` or ``scaled(ELEMENT,k|tensor,margin)``."""
        k = "tensor" if self.per_tensor else self.block
        return f"scaled({self.element.name},{k}{f',{self.margin}' if self.margin else ''})"


def is_per_tensor(operands) -> bool:
    """Whether an operands role (an :class:`MXFormat`, a :class:`ScaledFormat` or None) scales each
    operand tensor as one (docs/semantics.md §13.2.1); a probe then needs the stream's rows."""
    return isinstance(operands, ScaledFormat) and operands.per_tensor


def scaled_for_element(element: str, block: "int | None" = 128, margin: int = 0) -> ScaledFormat:
    """The scaled format with element ``element`` (a name of one of :data:`SCALED_ELEMENTS`);
    ``block=None``: per-tensor scales."""
    try:
        f = parse(str(element).strip().lower())
    except CollapseSimError:
        raise MXError(f"{element!r} is not a scaled element format; use one of {', '.join(SCALED_ELEMENTS)}") from None
    return ScaledFormat(f, block, margin)


def amax_scale(amax, elem: Format, scale_fmt, mode="rne", margin: int = 0):
    """The scale of docs/semantics.md §8.8.2 and §13.2 (jax.numpy, traceable): ``s =
    ∘_F(amax · 2^margin / max_E)`` in ``mode`` (F = ``scale_fmt``, E = ``elem``), and ``s = 1``
    where ``amax = 0``. The quotient is taken in float64 and rounded once to F (one correct
    rounding for F of p <= 25 bits: see :func:`scale_cast`)."""
    import jax.numpy as jnp

    from .rounding import round_to

    amax = jnp.asarray(amax, jnp.float64)
    s = round_to(_div(amax * 2.0**margin, elem.max), scale_fmt, mode)  # 2^margin: exact, margin <= 64
    return jnp.where(amax == 0, jnp.ones_like(s), s)


def _div(a, b):
    """``a / b`` in float64, elementwise, one IEEE division: the divisor behind an optimisation
    barrier, so that XLA cannot rewrite a division by a constant or a broadcast into a product
    by its (rounded) reciprocal."""
    import jax.numpy as jnp
    from jax import lax

    a, b = jnp.broadcast_arrays(jnp.asarray(a, jnp.float64), jnp.asarray(b, jnp.float64))
    return lax.div(a, lax.optimization_barrier(b))


def scale_cast(x, s, elem: Format, scale_fmt, mode="rne"):
    """The cast of docs/semantics.md §8.8.2 and §13.2 (jax.numpy, traceable): ``ê = ∘_E(∘_F(x /
    s))`` in ``mode``, E = ``elem`` with its own overflow rule (a saturating element: the
    ``satfinite`` conversion), F = ``scale_fmt``. ``x / s`` is taken in float64 and rounded once to
    F: for values of at most 26 bits an inexact quotient lies at least 2^-52 relative from every
    26-bit value (|a/b − c| = |a − bc|/b with a − bc a nonzero multiple of the quanta), so
    float64's rounding never lands on a value of F nor crosses a midpoint of one: a correct
    rounding in every deterministic mode, F of p <= 25 bits."""
    from .rounding import round_to

    return round_to(round_to(_div(x, s), scale_fmt, mode), elem, mode)


def scaled_values(x, fmt: ScaledFormat, compute, axis: int = -1, amax=None):
    """The values of ``x`` (float64 values of ``compute``; a jax array, traceable) as scaled
    operands (docs/semantics.md §13.2): tiles of ``fmt.block`` along ``axis`` (the last may be
    short), each with the float32 scale of :func:`amax_scale` (2^-149, float32's smallest, where
    it underflows to 0) and the elements of :func:`scale_cast`, ties to even, saturating, then
    dequantised ``∘_C(ê · s)`` to ``compute`` (a :class:`Format` or traced
    :class:`collapse_sim.rounding.FormatParams`), ties to even. ``ê · s`` is exact in float64
    (at most 4 + 24 bits, within float64's range). A tile holding a NaN or an infinity, or whose
    scale overflows float32, gives NaN for each of its values.

    Per-tensor scales (``fmt.block`` None, §13.2.1): the same rule with one scale from ``amax``
    (float64, broadcastable to ``x``: the largest magnitude each value's tensor has, e.g.
    :func:`prefix_amax`'s; NaN or inf where it holds a NaN or an infinity), or, without
    ``amax``, from all of ``x`` (:func:`tensor_amax`); ``axis`` is then not used. ``amax`` is
    refused with tiles, whose scales come from the tiles themselves."""
    import jax.numpy as jnp

    v = jnp.asarray(x, jnp.float64)
    if fmt.per_tensor:
        a = tensor_amax(v, jnp) if amax is None else jnp.asarray(amax, jnp.float64)
        return _scale_and_cast(v, jnp.broadcast_to(a, v.shape), fmt, compute)
    if amax is not None:
        raise MXError(f"{fmt.token()} takes its scales from its tiles of {fmt.block}, not from a given amax")
    axis = _along(v, axis, "scaled_values")
    v = jnp.moveaxis(v, axis, -1)
    padded = _tiles(v, fmt.block, jnp)
    out = _scale_and_cast(padded, jnp.max(jnp.abs(padded), axis=-1, keepdims=True), fmt, compute)
    return jnp.moveaxis(out.reshape(v.shape[:-1] + (-1,))[..., :v.shape[-1]], -1, axis)


def _scale_and_cast(x, amax, fmt: ScaledFormat, compute):
    """§13.2's steps on float64 values ``x`` whose scale comes from ``amax`` (broadcastable to
    ``x``; a tile's or a tensor's largest magnitude, NaN or inf where it holds a NaN or an
    infinity): the float32 scale (1 for amax = 0, 2^-149 where it underflows), the saturating
    cast, the dequantised value rounded to ``compute``; NaN where amax is not finite or the
    scale overflows."""
    import jax.numpy as jnp

    from .rounding import round_to

    s = amax_scale(jnp.where(jnp.isfinite(amax), amax, 0.0), fmt.saturating, FP32, "rne", fmt.margin)
    s = jnp.maximum(s, 2.0**FP32.min_exponent_of_quantum)  # an underflowed scale: float32's smallest
    bad = ~jnp.isfinite(amax) | jnp.isinf(s)
    s = jnp.where(bad, 1.0, s)
    e = scale_cast(x, s, fmt.saturating, FP32, "rne")
    return jnp.where(bad, jnp.nan, round_to(e * s, compute, "rne"))


#: The amax of the attention weights P as a per-tensor operand (docs/semantics.md §13.2.1): the
#: bound of their range [0, 1], static, not measured.
P_AMAX = 1.0


def tensor_amax(x, xp=np):
    """The largest magnitude of all of ``x`` (numpy or jax.numpy: ``xp``), exactly; NaN if it
    holds a NaN, inf if an infinity (and no NaN): a per-tensor scale's amax (§13.2.1)."""
    return xp.max(xp.abs(x)) if x.size else xp.zeros((), xp.float64)


def prefix_amax(x, stream_rows=None, xp=np):
    """Each row's per-tensor amax of activation rows ``x`` (n, ...) in position order
    (docs/semantics.md §13.2.1): row t's is the largest magnitude of rows 0..t, a running
    maximum over the rows; shape (n, 1, ...) to broadcast against ``x``. With ``stream_rows``
    (n, ...): ``x``'s rows are the probes, row n after the stream's rows 0..n, and its amax is
    that of the stream's rows 0..n and its own row. NaN propagates (a row holding a NaN makes every
    later row's amax NaN), as the running maximum of numpy and of ``lax.cummax`` do."""
    def rows(a):
        return xp.max(xp.abs(a).reshape(a.shape[0], -1), axis=1)

    def running(a):
        if xp is np:
            return np.maximum.accumulate(a)
        from jax import lax

        return lax.cummax(a, axis=0)

    a = running(rows(x)) if stream_rows is None else xp.maximum(running(rows(stream_rows)), rows(x))
    return a.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
