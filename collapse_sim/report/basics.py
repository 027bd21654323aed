"""The report's opening sections: the number formats, hard rounding cases, reduction orders.

Each writes its lines only; :func:`inputs` names what decides them, the key under which
``reproduce`` stores a section's lines."""

from __future__ import annotations

import numpy as np


def section_formats(lines: list[str]) -> None:
    from ..formats import table_rows

    lines += ["## Formats", "", "| name | p | emin | emax | u = 2^-p | max | min subnormal | overflow |",
              "|---|---|---|---|---|---|---|---|"]
    for r in table_rows():
        lines.append(f"| {r['name']} | {r['p']} | {r['emin']} | {r['emax']} | {r['u']:.3g} | {r['max']:.6g} | "
                     f"{r['min_subnormal']:.6g} | {r['overflow']} |")
    unsigned = [r["name"] for r in table_rows() if not r["signed"]]
    zeroless = [r["name"] for r in table_rows() if not r["zero"]]
    if unsigned or zeroless:
        lines += ["", "Unsigned (a negative value rounds to NaN, so no policy takes them): "
                  f"{', '.join(unsigned) or 'none'}; without zero (0 rounds to NaN, smaller values to the "
                  f"min subnormal column's value): {', '.join(zeroless) or 'none'}."]
    lines.append("")


def ml_dtypes_cast_f64(x: float, fmt: str) -> float:
    """What the installed ml_dtypes makes of the float64 ``x`` cast to ``fmt``
    (bf16, fp16 via numpy, e4m3fn). Recorded beside ``round_to``, never used as an oracle:
    ml_dtypes <= 0.6 casts float64 -> bfloat16 through float32 (two roundings), 0.7 rounds once."""
    import ml_dtypes

    dt = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "e4m3fn": ml_dtypes.float8_e4m3fn}[fmt]
    with np.errstate(over="ignore", invalid="ignore"):
        return float(np.float64(x).astype(dt))


#: The report's hard rounding cases: (label, float64 input, format, correctly rounded RNE result).
ROUNDING_CASES = [
    ("1+2^-8+2^-40 (f64)", 1 + 2.0**-8 + 2.0**-40, "bf16", "1.0078125"),
    ("65519", 65519.0, "fp16", "65504"),
    ("65520", 65520.0, "fp16", "inf"),
    ("464", 464.0, "e4m3fn", "448"),
    ("465", 465.0, "e4m3fn", "nan"),
    ("exp(6.84375)", float(np.exp(6.84375)), "bf16", "940"),
]


def _same_value(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)


def section_rounding(lines: list[str]) -> None:
    import jax.numpy as jnp
    import ml_dtypes

    from ..rounding import round_to

    ver = ml_dtypes.__version__
    lines += ["## Rounding: known hard cases", "",
              "`round_to` works on bit patterns with integer operations, so it is exact for float32 and",
              "float64 inputs and keeps subnormals that XLA:CPU arithmetic would flush.",
              f"The last column is what the installed ml_dtypes ({ver}) gives for the same float64 cast; it is",
              "recorded, not used as an oracle.", "",
              f"| input | format | round_to (RNE) | expected | ml_dtypes {ver} cast from f64 |", "|---|---|---|---|---|"]
    differ = []
    for label, x, fmt, exp in ROUNDING_CASES:
        got = float(round_to(jnp.float64(x), fmt))
        ml = ml_dtypes_cast_f64(x, fmt)
        ok = "ok" if _same_value(got, float(exp)) else "MISMATCH"
        if not _same_value(ml, float(exp)):
            differ.append(label)
        lines.append(f"| {label} | {fmt} | {got:g} ({ok}) | {exp} | {ml:g} |")
    if differ:
        lines += ["", f"ml_dtypes {ver} differs from the correctly rounded result on: {', '.join(differ)} "
                  "(versions up to 0.6 cast float64 to bfloat16 through float32, rounding twice)."]
    else:
        lines += ["", f"ml_dtypes {ver} agrees with the correctly rounded result on every row "
                  "(versions up to 0.6 did not: they cast float64 to bfloat16 through float32, rounding twice)."]
    lines.append("")


#: The policies of the reduction-order table.
SUM_POLICIES = ("compute=bf16,order=sequential", "compute=bf16,order=pairwise", "compute=bf16,order=kahan",
                "compute=bf16,order=blocked(32)", "compute=bf16,order=exact",
                "compute=bf16,accumulate=fp32,order=sequential", "compute=fp16,order=sequential")


def section_sums(lines: list[str]) -> None:
    import jax
    import jax.numpy as jnp

    from ..backends.emulated import Emulator

    lines += ["## Reduction order: a bf16 sum of 10,000 ones", "",
              "| policy | result |", "|---|---|"]
    ones = jnp.ones(10_000)
    for pol in SUM_POLICIES:  # one compiled program per sum (its ops run eagerly would compile ~20 each)
        lines.append(f"| `{pol}` | {float(jax.jit(Emulator(pol).sum)(ones)):g} |")
    lines += ["", "A sequential running sum stalls where the spacing of the format exceeds 2 "
              "(256 in bf16, 2048 in fp16): `256 + 1` is a tie and rounds to even.", ""]


def inputs(name: str) -> dict:
    """What decides the lines of section ``name`` ("rounding" or "sums"): its cases, and for
    rounding the installed ml_dtypes (its casts are printed beside ours)."""
    import ml_dtypes

    if name == "rounding":
        return {"cases": ROUNDING_CASES, "ml_dtypes": ml_dtypes.__version__}
    return {"policies": SUM_POLICIES, "n": 10_000}
