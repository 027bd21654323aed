"""What a number is: binary floating-point formats.

A :class:`Format` is described by its precision ``p`` (significand bits,
hidden bit included), the exponent of its smallest normal number ``emin``,
the exponent of its largest binade ``emax``, whether it has subnormals, what
happens on overflow, (for formats such as fp8 e4m3fn that give up the top
encodings to NaN) the largest finite value, and its domain: whether it has a
negative zero, negative numbers (``signed``) and a zero (``has_zero``).

Every finite positive value of a format is ``m * 2**(e - p + 1)`` with integer
``2**(p-1) <= m < 2**p`` and ``emin <= e <= emax`` (normals), or
``0 < m < 2**(p-1)`` with ``e = emin`` (subnormals); a signed format also holds
their negatives, a format with zero also 0.

>>> parse("bf16").unit_roundoff == 2.0**-8
True
>>> parse("p=5,emax=15").p
5
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import Literal

from .errors import CollapseSimError, require_text

Overflow = Literal["inf", "saturate", "nan"]
_OVERFLOWS = ("inf", "saturate", "nan")


class FormatError(CollapseSimError):
    """A format name or description that cannot be understood."""


@dataclasses.dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    Attributes:
      name: short name used in tables and policy strings.
      p: precision in bits, hidden bit included (bf16: 8, fp16: 11).
      emin: exponent of the smallest normal number (``2**emin``).
      emax: exponent of the largest binade.
      subnormals: whether values below ``2**emin`` are gradual (True) or
        flushed to signed zero (False).
      overflow: what a result beyond the largest finite value becomes:
        ``"inf"`` (IEEE 754), ``"saturate"`` (the largest finite value) or
        ``"nan"`` (as in fp8 e4m3fn, which has no infinity).
      max_significand: largest integer significand in the top binade; ``None``
        means ``2**p - 1`` (IEEE). e4m3fn uses 14 (``0b1110``): 448.
      signed_zero: False for the ``fnuz`` formats, whose only zero is +0 (and for
        every format without negative numbers or without zero).
      signed: False for an unsigned format (e5m3fnu, e8m0fnu): no negative
        numbers; a negative input rounds to NaN (docs/semantics.md §1).
      has_zero: False for a format without zero (e8m0fnu): 0 rounds to NaN and
        a value below the smallest positive one rounds to it, in every mode.
      description: a few words for the formats table.
    """

    name: str = dataclasses.field(compare=False)
    p: int
    emin: int
    emax: int
    subnormals: bool = True
    overflow: Overflow = "inf"
    max_significand: int | None = None
    signed_zero: bool = True
    signed: bool = True
    has_zero: bool = True
    description: str = dataclasses.field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.p, int) or self.p < 1:
            raise FormatError(f"format {self.name!r}: precision p must be an integer >= 1, got {self.p!r}")
        if self.emax < self.emin:
            raise FormatError(f"format {self.name!r}: emax ({self.emax}) must be >= emin ({self.emin})")
        if self.overflow not in _OVERFLOWS:
            raise FormatError(f"format {self.name!r}: overflow must be one of {_OVERFLOWS}, got {self.overflow!r}")
        ms = self.max_significand
        if ms is not None and not (2 ** (self.p - 1) <= ms <= 2**self.p - 1):
            raise FormatError(f"format {self.name!r}: max_significand (maxsig) must lie in [2^(p-1), 2^p - 1] = "
                              f"[{2 ** (self.p - 1)}, {2**self.p - 1}], got {ms}")
        if self.signed_zero and not (self.signed and self.has_zero):
            what = "unsigned" if not self.signed else "without zero"
            raise FormatError(f"format {self.name!r} is {what}, so it has no -0: give signed_zero=False")

    # --- properties -------------------------------------------------------
    @property
    def top_significand(self) -> int:
        return self.max_significand if self.max_significand is not None else 2**self.p - 1

    @property
    def unit_roundoff(self) -> float:
        """u = 2^-p: the relative error bound of round-to-nearest."""
        return 2.0**-self.p

    @property
    def eps(self) -> float:
        """Machine epsilon 2^(1-p): the gap between 1 and the next number."""
        return 2.0 ** (1 - self.p)

    @property
    def max_exact(self) -> Fraction:
        return Fraction(self.top_significand) * Fraction(2) ** (self.emax - self.p + 1)

    @property
    def max(self) -> float:
        """Largest finite value (inf if it exceeds the float64 range)."""
        return _to_float(self.max_exact)

    @property
    def min_normal(self) -> float:
        return _to_float(Fraction(2) ** self.emin)

    @property
    def min_subnormal(self) -> float:
        """Smallest positive value (the smallest normal when subnormals are off; a format
        without zero rounds every smaller positive value to it)."""
        if not self.subnormals:
            return self.min_normal
        return _to_float(Fraction(2) ** (self.emin - self.p + 1))

    @property
    def min_exponent_of_quantum(self) -> int:
        """Exponent of the finest spacing the format has: 2^(emin-p+1)."""
        return self.emin - self.p + 1 if self.subnormals else self.emin

    def ulp(self, x: float | Fraction) -> Fraction:
        """Spacing of the format at ``x``: 2^(max(e, emin) - p + 1), e = floor(log2|x|)."""
        x = Fraction(x)
        if x == 0:
            return Fraction(2) ** (self.emin - self.p + 1)
        e = floor_log2(abs(x))
        return Fraction(2) ** (max(e, self.emin) - self.p + 1)

    def spec(self) -> str:
        """A string that :func:`parse` turns back into this format."""
        parts = [f"p={self.p}", f"emin={self.emin}", f"emax={self.emax}"]
        if not self.subnormals:
            parts.append("subnormals=false")
        if self.overflow != "inf":
            parts.append(f"overflow={self.overflow}")
        if self.max_significand is not None:
            parts.append(f"maxsig={self.max_significand}")
        if not self.signed:
            parts.append("signed=false")
        if not self.has_zero:
            parts.append("zero=false")
        if not self.signed_zero and self.signed and self.has_zero:  # otherwise implied
            parts.append("signed_zero=false")
        return ",".join(parts)

    def why_not_arithmetic(self) -> str | None:
        """Why the model's arithmetic cannot run in this format (None if it can): its
        values and their differences need both signs and zero."""
        if not self.signed:
            return f"{self.name} is unsigned (a negative value rounds to NaN)"
        if not self.has_zero:
            return f"{self.name} has no zero (0 rounds to NaN)"
        return None

    def __str__(self) -> str:
        return self.name


def floor_log2(x: Fraction) -> int:
    """floor(log2(x)) for a positive rational, exactly."""
    n, d = x.numerator, x.denominator
    e = n.bit_length() - d.bit_length()
    # now 2^(e-1) < n/d < 2^(e+1)
    if (n << max(-e, 0)) < (d << max(e, 0)):
        e -= 1
    return e


def _to_float(x: Fraction) -> float:
    try:
        return float(x)
    except OverflowError:
        return math.inf


def _ieee(name: str, p: int, ebits: int, description: str, **kw) -> Format:
    bias = 2 ** (ebits - 1) - 1
    return Format(name, p, 1 - bias, bias, description=description, **kw)


BUILTINS: dict[str, Format] = {}


def register(fmt: Format, *aliases: str) -> Format:
    """Add a format (and aliases) to the registry used by :func:`parse`."""
    for key in (fmt.name, *aliases):
        BUILTINS[key.lower()] = fmt
    return fmt


register(_ieee("fp64", 53, 11, "IEEE binary64"), "float64", "f64", "double")
register(_ieee("fp32", 24, 8, "IEEE binary32"), "float32", "f32", "single")
register(Format("tf32", 11, -126, 127, description="NVIDIA TensorFloat-32 (fp32 range, fp16 precision)"))
register(_ieee("fp16", 11, 5, "IEEE binary16"), "float16", "f16", "half")
register(Format("bf16", 8, -126, 127, description="bfloat16 (fp32 range, 8-bit precision)"), "bfloat16")
register(
    Format("e4m3fn", 4, -6, 8, overflow="nan", max_significand=14,
           description="fp8 OCP E4M3: no inf, NaN on overflow, max 448"),
    "fp8_e4m3fn", "float8_e4m3fn", "fp8",
)
register(_ieee("e4m3", 4, 4, "fp8 E4M3, IEEE-style (inf, max 240)"), "fp8_e4m3", "float8_e4m3")
register(_ieee("e5m2", 3, 5, "fp8 OCP E5M2, IEEE-style"), "fp8_e5m2", "float8_e5m2")
register(
    Format("e4m3fnuz", 4, -7, 7, overflow="nan", signed_zero=False,
           description="fp8 E4M3 FNUZ (bias 8, no -0, NaN on overflow)"),
    "float8_e4m3fnuz",
)
register(
    Format("e5m2fnuz", 3, -15, 15, overflow="nan", signed_zero=False,
           description="fp8 E5M2 FNUZ (bias 16, no -0, NaN on overflow)"),
    "float8_e5m2fnuz",
)
register(Format("e3m4", 5, -2, 3, description="fp8 E3M4, IEEE-style"), "float8_e3m4")
register(Format("e2m3fn", 4, 0, 2, overflow="saturate", description="fp6 OCP MX E2M3 (finite only)"),
         "fp6_e2m3", "float6_e2m3fn")
register(Format("e3m2fn", 3, -2, 4, overflow="saturate", description="fp6 OCP MX E3M2 (finite only)"),
         "fp6_e3m2", "float6_e3m2fn")
register(Format("e2m1fn", 2, 0, 2, overflow="saturate", description="fp4 OCP MX E2M1 (finite only)"),
         "fp4", "fp4_e2m1", "float4_e2m1fn")

register(
    Format("e4m3b11fnuz", 4, -10, 4, overflow="nan", signed_zero=False,
           description="fp8 E4M3 B11 FNUZ (bias 11, no -0, NaN on overflow, max 30)"),
    "float8_e4m3b11fnuz",
)
register(
    Format("e5m3fnu", 4, -14, 16, overflow="nan", max_significand=14, signed=False, signed_zero=False,
           description="fp8 E5M3 FNU: unsigned (negative -> NaN), NaN on overflow, max 114688"),
    "float8_e5m3fnu",
)
register(
    Format("e8m0fnu", 1, -127, 127, subnormals=False, overflow="nan", signed=False, has_zero=False,
           signed_zero=False,
           description="OCP MX E8M0 scale: 2^-127..2^127, unsigned, no zero (0 -> NaN), NaN on overflow"),
    "float8_e8m0fnu", "e8m0",
)

#: The ml_dtypes / numpy dtype name holding each built-in format exactly, if any.
NUMPY_DTYPES: dict[str, str] = {
    "fp64": "float64", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
    "e4m3fn": "float8_e4m3fn", "e4m3": "float8_e4m3", "e5m2": "float8_e5m2",
    "e4m3fnuz": "float8_e4m3fnuz", "e5m2fnuz": "float8_e5m2fnuz", "e3m4": "float8_e3m4",
    "e2m3fn": "float6_e2m3fn", "e3m2fn": "float6_e3m2fn", "e2m1fn": "float4_e2m1fn",
    "e4m3b11fnuz": "float8_e4m3b11fnuz", "e5m3fnu": "float8_e5m3fnu", "e8m0fnu": "float8_e8m0fnu",
}

_BOOL = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
DESCRIPTION_KEYS = ("p", "emin", "emax", "subnormals", "overflow", "maxsig", "signed_zero", "signed", "zero", "name")


def split_top_level(text: str, what: str, error: type = FormatError) -> list[str]:
    """``text`` split at the commas outside parentheses, each part stripped.

    Unbalanced parentheses raise ``error`` (a one-sentence message about ``what``)."""
    depth, parts, start = 0, [], 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise error(f"{what} {text!r} has a ')' without its '('; write a custom format as (p=5,emax=15)")
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    if depth:
        raise error(f"{what} {text!r} has a '(' without its ')'; write a custom format as (p=5,emax=15)")
    parts.append(text[start:].strip())
    return parts


def _unparen(text: str) -> str:
    """``(p=5,emax=15)`` -> ``p=5,emax=15``: one pair of parentheses enclosing the whole text removed."""
    t = text.strip()
    if not (t.startswith("(") and t.endswith(")")):
        return t
    depth = 0
    for i, ch in enumerate(t):
        depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth == 0 and i < len(t) - 1:  # "(a),(b)": the first '(' closes before the end
            return t
    return t[1:-1].strip()


def parse(spec: str | Format) -> Format:
    """A format from a name (``bf16``, ``fp8_e4m3fn``) or a description.

    A description is comma-separated ``key=value`` pairs: ``p`` (required),
    ``emax`` (default ``2**(w-1)-1`` style: 15 needs ``emax=15``), ``emin``
    (default ``1 - emax``), ``subnormals`` (true/false), ``overflow``
    (inf/saturate/nan), ``maxsig`` (largest top-binade significand),
    ``signed_zero``, ``signed`` (false: no negative numbers), ``zero`` (false: no
    zero; both imply ``signed_zero=false``) and ``name``. It may be written in parentheses,
    ``(p=5,emax=15)``, the spelling lists and policies need.

    A description must be one whose properties float64 can state: u = 2^-p,
    the largest value and the smallest subnormal must be nonzero, finite
    float64 numbers (so p <= 1074, emax <= 1023, emin - p + 1 >= -1074).

    >>> parse("p=5,emax=15").emin
    -14
    >>> parse("(p=5,emax=15)") == parse("p=5,emax=15")
    True
    """
    if isinstance(spec, Format):
        return spec
    require_text(spec, FormatError, "a format", "a name such as 'bf16' or a description such as 'p=5,emax=15'")
    text = _unparen(spec)
    key = text.lower()
    if key in BUILTINS:
        return BUILTINS[key]
    if "=" not in text:
        known = ", ".join(sorted({f.name for f in BUILTINS.values()}))
        raise FormatError(f"unknown format {text!r}; known formats are {known}, or give 'p=P,emax=E[,emin=..]'")
    fields: dict[str, str] = {}
    for part in split_top_level(text, "format description"):
        if "=" not in part or "(" in part:
            raise FormatError(f"format description {text!r}: expected key=value, got {part!r}; "
                              "a list of formats puts each description in parentheses: 'bf16,(p=5,emax=15)'")
        k, v = (s.strip() for s in part.split("=", 1))
        k = k.lower()
        if k not in DESCRIPTION_KEYS:
            raise FormatError(f"format description {text!r}: unknown key {k!r} (keys: {', '.join(DESCRIPTION_KEYS)})")
        fields[k] = v

    def _int(k: str) -> int:
        try:
            return int(fields[k])
        except ValueError:
            raise FormatError(f"format description {text!r}: {k} must be an integer, got {fields[k]!r}") from None

    def _bool(k: str) -> bool:
        v = fields[k].lower()
        if v not in _BOOL:
            raise FormatError(f"format description {text!r}: {k} must be true or false, got {fields[k]!r}")
        return _BOOL[v]

    if "p" not in fields:
        raise FormatError(f"format description {text!r} needs a precision p=..., as in 'p=5,emax=15'")
    if "emax" not in fields:
        raise FormatError(f"format description {text!r} needs an exponent range emax=..., as in 'p=5,emax=15'")
    p, emax = _int("p"), _int("emax")
    emin = _int("emin") if "emin" in fields else 1 - emax
    signed = _bool("signed") if "signed" in fields else True
    has_zero = _bool("zero") if "zero" in fields else True
    overflow = fields.get("overflow", "inf").lower()
    if overflow not in _OVERFLOWS:
        raise FormatError(f"format description {text!r}: overflow must be one of {', '.join(_OVERFLOWS)}, got {overflow!r}")
    fmt = Format(
        name=fields.get("name", text),
        p=p,
        emin=emin,
        emax=emax,
        subnormals=_bool("subnormals") if "subnormals" in fields else True,
        overflow=overflow,  # type: ignore[arg-type]
        max_significand=_int("maxsig") if "maxsig" in fields else None,
        signed_zero=_bool("signed_zero") if "signed_zero" in fields else signed and has_zero,
        signed=signed,
        has_zero=has_zero,
        description="custom",
    )
    _check_describable(fmt, text)
    if "name" in fields:
        return fmt
    for known in BUILTINS.values():  # the same numbers as a built-in: that format
        if known == fmt:
            return known
    return dataclasses.replace(fmt, name=fmt.spec())


#: float64's limits, which bound the formats a description may give: every property
#: of the formats table (u, eps, max, min_normal, min_subnormal) must be a nonzero finite float64.
F64_MIN_EXP = -1074  # the smallest float64 subnormal is 2^-1074
F64_MAX_EXP = 1023  # the largest float64 binade


def _check_describable(fmt: Format, text: str) -> None:
    """Refuse a described format whose properties float64 cannot state (u = 0, max = inf, ...)."""
    if fmt.p > -F64_MIN_EXP:
        raise FormatError(f"format {text!r}: p={fmt.p} is too large, its unit roundoff 2^-{fmt.p} is below the "
                          f"smallest float64 (2^{F64_MIN_EXP}); use p <= {-F64_MIN_EXP}")
    if math.isinf(fmt.max):
        top = F64_MAX_EXP if not math.isinf(dataclasses.replace(fmt, emin=min(fmt.emin, F64_MAX_EXP),
                                                                emax=F64_MAX_EXP).max) else F64_MAX_EXP - 1
        raise FormatError(f"format {text!r}: emax={fmt.emax} is too large, its largest value overflows float64; "
                          f"use emax <= {top}")
    q = fmt.min_exponent_of_quantum
    if q < F64_MIN_EXP:
        what = "smallest subnormal" if fmt.subnormals else "smallest normal"
        raise FormatError(f"format {text!r}: its {what} 2^{q} is below the smallest float64 (2^{F64_MIN_EXP}); "
                          f"use emin >= {F64_MIN_EXP + (fmt.p - 1 if fmt.subnormals else 0)}"
                          + (" or subnormals=false" if fmt.subnormals else ""))


def parse_list(text: str) -> list[Format]:
    """Formats from a comma-separated list: ``"bf16,fp16,(p=5,emax=15)"``.

    Names are written as they are; a custom description goes in parentheses.
    One description alone may go without them: ``"p=5,emax=15"`` is one format.
    """
    if not isinstance(text, str) or not text.strip():
        raise FormatError(f"empty format list {text!r}; give formats separated by commas, e.g. 'bf16,fp16,(p=5,emax=15)'")
    parts = split_top_level(text, "format list")
    if all("=" in p and not p.startswith("(") for p in parts):
        return [parse(text)]  # one description alone, without parentheses
    if any(not p for p in parts):
        raise FormatError(f"format list {text!r} has an empty item; separate formats by single commas, "
                          "e.g. 'bf16,fp16'")
    bare = [p for p in parts if "=" in p and not p.startswith("(")]
    if bare:
        fixed, run = [], []
        for p in parts:  # group consecutive bare key=value items into one parenthesized description
            if "=" in p and not p.startswith("("):
                run.append(p)
                continue
            if run:
                fixed.append("(" + ",".join(run) + ")")
                run = []
            fixed.append(p)
        if run:
            fixed.append("(" + ",".join(run) + ")")
        raise FormatError(f"format list {text!r}: in a list each custom format goes in parentheses, "
                          f"write {','.join(fixed)!r}")
    return [parse(p) for p in parts]


def format_token(f: Format) -> str:
    """How ``f`` is written inside a list or a policy: a built-in's name, or a custom
    format's description in parentheses (``(p=5,emin=-14,emax=15)``)."""
    return f.name if BUILTINS.get(f.name.lower()) == f else f"({f.spec()})"


def builtin_formats() -> list[Format]:
    """The registered formats, each once, widest first."""
    seen: dict[str, Format] = {}
    for f in BUILTINS.values():
        seen.setdefault(f.name, f)
    return sorted(seen.values(), key=lambda f: (-f.p, -f.emax, f.name))


def table_rows(formats: "list[Format] | None" = None) -> list[dict[str, object]]:
    """One row per format (default: the built-ins) with its properties (for ``collapse-sim formats``)."""
    rows = []
    for f in builtin_formats() if formats is None else formats:
        rows.append({
            "name": f.name, "p": f.p, "emin": f.emin, "emax": f.emax,
            "subnormals": f.subnormals, "overflow": f.overflow, "signed": f.signed, "zero": f.has_zero,
            "u": f.unit_roundoff, "eps": f.eps, "max": f.max,
            "min_normal": f.min_normal, "min_subnormal": f.min_subnormal,
            "description": f.description,
        })
    return rows
