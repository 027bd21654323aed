"""Format constants against ml_dtypes' own tables and bit patterns, and the CLI."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from packaging.version import Version

from collapse_sim.cli import main
from collapse_sim.formats import NUMPY_DTYPES, FormatError, builtin_formats, parse
from collapse_sim.rounding import round_to
from oracles import format_values, mpfr_round
from test_rounding import _test_points


@pytest.mark.parametrize("name", sorted(NUMPY_DTYPES))
def test_constants_match_ml_dtypes(name):
    fmt = parse(name)
    dt = np.dtype(getattr(ml_dtypes, NUMPY_DTYPES[name], None) or NUMPY_DTYPES[name])
    fi = ml_dtypes.finfo(dt) if dt.kind == "V" or "float8" in str(dt) or "float6" in str(dt) or "float4" in str(dt) or "bfloat" in str(dt) else np.finfo(dt)
    assert float(fi.max) == fmt.max
    assert float(fi.smallest_normal) == fmt.min_normal
    assert float(fi.smallest_subnormal) == fmt.min_subnormal
    assert float(fi.eps) == fmt.eps


NARROW = [n for n in sorted(NUMPY_DTYPES) if n not in ("fp32", "fp64")]


@pytest.mark.parametrize("name", NARROW)
def test_value_set_matches_every_bit_pattern(name):
    """The finite values of the format, from its definition (with their negatives if it is
    signed, without zero if it has none), are exactly ml_dtypes' decoded patterns."""
    fmt = parse(name)
    dt = np.dtype(getattr(ml_dtypes, NUMPY_DTYPES[name], None) or NUMPY_DTYPES[name])
    nbits = dt.itemsize * 8
    # ml_dtypes stores sub-byte types in one byte; only low bits are meaningful
    width = {"e2m3fn": 6, "e3m2fn": 6, "e2m1fn": 4}.get(name, nbits)
    pats = np.arange(2**width, dtype=np.uint16 if nbits == 16 else np.uint8)
    with np.errstate(invalid="ignore"):
        vals = pats.view(dt).astype(np.float64)
    finite = np.unique(vals[np.isfinite(vals)])
    positive = [float(v) for v in format_values(fmt)]
    expected = np.unique([*positive, *(-v for v in positive if fmt.signed)])
    assert np.array_equal(finite, expected), (finite[:4], expected[:4])
    if not fmt.signed_zero:
        assert not np.any((vals == 0) & np.signbit(vals))


@pytest.mark.parametrize("src", [np.float32, np.float64])
@pytest.mark.parametrize("name", NARROW)
def test_rne_matches_ml_dtypes_cast(name, src):
    """Where ml_dtypes rounds once it must agree with round_to (RNE): from float32 inputs,
    and from float64 inputs since ml_dtypes 0.7.0 (up to 0.6 its float64 -> bfloat16 cast
    rounds twice, through float32). Random values over the range and beyond, and the
    exhaustive harness's points (values, midpoints, their neighbours, both signs)."""
    if src is np.float64 and Version(ml_dtypes.__version__) < Version("0.7.0"):
        pytest.skip(f"ml_dtypes {ml_dtypes.__version__} casts float64 through float32 (two roundings)")
    fmt = parse(name)
    dt = np.dtype(getattr(ml_dtypes, NUMPY_DTYPES[name], None) or NUMPY_DTYPES[name])
    rng = np.random.default_rng(0)
    x = rng.standard_normal(20000) * 2.0 ** rng.integers(fmt.emin - fmt.p - 2, fmt.emax + 3, 20000)
    p64, p32 = _test_points(fmt)
    x = np.concatenate([np.clip(x, -3e38, 3e38), p64 if src is np.float64 else p32]).astype(src)
    ours = np.asarray(round_to(jnp.asarray(x), fmt)).astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        theirs = x.astype(dt).astype(np.float64)
    same = (ours == theirs) | (np.isnan(ours) & np.isnan(theirs))
    assert same.all(), (x[~same][:5], ours[~same][:5], theirs[~same][:5])


def test_round_to_float64_input_rounds_once():
    """What the project relies on: round_to rounds a float64 value once (MPFR agrees), whatever ml_dtypes does."""
    x = 1 + 2.0**-8 + 2.0**-40
    assert float(round_to(jnp.float64(x), "bf16")) == 1.0078125 == mpfr_round(x, parse("bf16"), "rne")


def test_ml_dtypes_float64_cast_per_version():
    """A fact about ml_dtypes, stated for the versions it holds for: up to 0.6 the float64 -> bfloat16
    cast goes through float32 and rounds twice (1 + 2^-8 + 2^-40 -> 1.0); from 0.7.0 it rounds once.
    A release that changes this again fails here, on purpose, when the suite runs against new releases."""
    x = 1 + 2.0**-8 + 2.0**-40
    got = float(np.float64(x).astype(ml_dtypes.bfloat16))
    double_rounds = Version(ml_dtypes.__version__) < Version("0.7.0")
    assert got == (1.0 if double_rounds else 1.0078125), (ml_dtypes.__version__, got)


def test_report_rounding_table_says_what_installed_ml_dtypes_does():
    """The report's ml_dtypes column is measured on the installed version and names it, and its closing
    sentence names the rows where ml_dtypes departs from the correctly rounded value (none, or only those)."""
    from collapse_sim.report.basics import ROUNDING_CASES, section_rounding

    lines: list[str] = []
    section_rounding(lines)
    text = "\n".join(lines)
    assert f"ml_dtypes {ml_dtypes.__version__} cast from f64" in text
    rows = [ln.split("|")[1:-1] for ln in lines if ln.startswith("| ") and ("(ok)" in ln or "(MISMATCH)" in ln)]
    assert len(rows) == len(ROUNDING_CASES) and all("(ok)" in r[2] for r in rows), rows
    differ = []
    dtypes = {"bf16": ml_dtypes.bfloat16, "fp16": np.float16, "e4m3fn": ml_dtypes.float8_e4m3fn}
    for (label, x, fmt, exp), row in zip(ROUNDING_CASES, rows):
        with np.errstate(over="ignore", invalid="ignore"):
            ml = float(np.float64(x).astype(dtypes[fmt]))
        assert row[4].strip() == f"{ml:g}", (label, row)
        if not (ml == float(exp) or (ml != ml and exp == "nan")):
            differ.append(label)
    closing = next(ln for ln in lines if ln.startswith(f"ml_dtypes {ml_dtypes.__version__} "))
    if differ:
        assert "differs" in closing and all(label in closing for label in differ), closing
    else:
        assert "agrees with the correctly rounded result on every row" in closing, closing


def test_properties():
    bf16 = parse("bf16")
    assert bf16.unit_roundoff == 2.0**-8 and bf16.eps == 2.0**-7
    assert bf16.ulp(1.0) == Fraction(1, 128) and bf16.ulp(0.0) == Fraction(2) ** -133
    assert parse("fp16").max == 65504.0 and parse("e4m3fn").max == 448.0
    assert parse("p=11,emax=15") == parse("fp16")
    for f in builtin_formats():
        assert parse(f.spec()) == f
    assert parse("e8m0").spec() == "p=1,emin=-127,emax=127,subnormals=false,overflow=nan,signed=false,zero=false"
    assert parse("float8_e5m3fnu") == parse("p=4,emin=-14,emax=16,overflow=nan,maxsig=14,signed=false")
    assert parse("p=4,emax=7,zero=false").signed_zero is False  # no zero, no -0


@pytest.mark.parametrize("bad, match", [("p=4,emax=7,signed=false,signed_zero=true", "is unsigned, so it has no -0"),
                                        ("p=4,emax=7,zero=false,signed_zero=true", "is without zero, so it has no -0"),
                                        ("p=4,emax=7,signed=maybe", "signed must be true or false")])
def test_bad_domain_descriptions(bad, match):
    with pytest.raises(FormatError, match=match):
        parse(bad)


@pytest.mark.parametrize("bad", ["bf17", "p=0,emax=3", "p=3", "p=x,emax=2", "p=3,emax=2,emin=5", "p=3,emax=2,colour=red", ""])
def test_bad_formats(bad):
    with pytest.raises(FormatError):
        parse(bad)


def test_cli_formats_table(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    assert "bf16" in out and "e4m3fn" in out and "448" in out


def test_cli_bad_format_one_sentence():
    r = subprocess.run([sys.executable, "-m", "collapse_sim.cli", "formats", "bf17"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and "unknown format 'bf17'" in r.stderr
    assert "Traceback" not in r.stderr


def test_cli_round(capsys):
    assert main(["round", "65520", "65519", "-f", "fp16"]) == 0
    assert capsys.readouterr().out.split() == ["65520", "->", "inf", "65519", "->", "65504.0"]


@pytest.mark.parametrize("policy, role", [("e8m0fnu", "storage"), ("compute=bf16,softmax=e5m3fnu", "softmax"),
                                          ("compute=bf16,accumulate=(p=8,emax=127,zero=false)", "accumulate")])
def test_policy_refuses_formats_without_negatives_or_zero(policy, role):
    """A policy's formats hold differences (s − max in the softmax, residuals): one sentence
    names the format, why, and the role; e4m3b11fnuz (signed, with zero) is taken."""
    from collapse_sim.policy import Policy, PolicyError

    with pytest.raises(PolicyError, match=f"cannot be a policy's {role} format") as e:
        Policy.parse(policy)
    assert str(e.value).count(". ") == 0 and "\n" not in str(e.value)
    assert Policy.parse("e4m3b11fnuz").compute == parse("float8_e4m3b11fnuz")
