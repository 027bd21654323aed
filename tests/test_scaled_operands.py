"""The scaled operands role (docs/semantics.md §13.2): both operands of the projections, the
MLP, the scores and the weighted values in tiles of k along the contraction axis, each with a
float32 scale from its largest magnitude. The quantisation against an exact-rational oracle
written from §13.2 (random and extreme tiles); the policy grammar; full forwards emulated ==
reference bit for bit; the prefix trick against separate runs; the command line."""

from __future__ import annotations

from fractions import Fraction

import jax
import mpmath.libmp as mlib
import numpy as np
import pytest

from collapse_sim.backends import make_backend
from collapse_sim.formats import parse
from collapse_sim.model import ModelConfig, forward, init_params
from collapse_sim.mx import ScaledFormat, scaled_for_element, scaled_values
from collapse_sim.policy import Policy, PolicyError
from oracles import fraction_round
from test_mx_operands import _same
from test_mx_weights import test_bad_roles_are_refused_in_one_sentence as refused_in_one_sentence

ROLE = "storage=bf16,compute=fp32,accumulate=fp32,operands=scaled(e4m3fn,32)"
FP32 = parse("fp32")


# --------------------------------------------------------------------------- the oracle


def oracle_tile(xs: list[float], fmt: ScaledFormat, compute, amax=None) -> list[float]:
    """§13.2 on one tile, in exact rationals: s = ∘_fp32(amax · 2^margin / max_E) (1 for a zero
    tile, 2^-149 where it rounds to 0, NaN values where it overflows or the tile holds a NaN or
    an infinity), ê = ∘_E(∘_fp32(x / s)) with |·| > max_E giving ±max_E, value ∘_C(ê · s);
    every rounding to nearest, ties to even. ``amax`` (a float, §13.2.1's per-tensor scales):
    the amax of the tensor holding ``xs`` in place of theirs (NaN or inf: NaN values)."""
    if not all(np.isfinite(xs)) or (amax is not None and not np.isfinite(amax)):
        return [np.nan] * len(xs)
    E = fmt.element
    amax = max(abs(Fraction(x)) for x in xs) if amax is None else Fraction(amax)
    if amax == 0:
        s = Fraction(1)
    else:
        s32 = fraction_round(amax * 2**fmt.margin / Fraction(E.max), FP32, "rne")
        if np.isinf(s32):
            return [np.nan] * len(xs)
        s = Fraction(s32) if s32 != 0 else Fraction(1, 2**149)
    out = []
    for x in xs:
        q = Fraction(fraction_round(Fraction(x) / s, FP32, "rne"))
        top = Fraction(E.max)
        e = top if q > top else -top if q < -top else Fraction(fraction_round(q, E, "rne"))
        out.append(fraction_round(e * s, compute, "rne"))
    return out


def oracle(x: np.ndarray, fmt: ScaledFormat, compute, axis: int) -> np.ndarray:
    """§13.2's Q(x) along ``axis``: tiles of k, the last short."""
    v = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    out = np.empty_like(v)
    k = fmt.block
    for idx in np.ndindex(*v.shape[:-1]):
        row = list(v[idx])
        out[idx] = sum((oracle_tile(row[i:i + k], fmt, compute) for i in range(0, len(row), k)), [])
    return np.moveaxis(out, -1, axis)


def _past_top(xs, fmt: ScaledFormat) -> bool:
    """Whether the tile's scale is rounded down, so that amax / s exceeds max_E / 2^margin in
    exact arithmetic (max_E itself without a margin)."""
    amax = max(abs(Fraction(x)) for x in xs)
    s = Fraction(fraction_round(amax * 2**fmt.margin / Fraction(fmt.element.max), FP32, "rne"))
    return amax * 2**fmt.margin / s > fmt.element.max


def _tiles(fmt: ScaledFormat, compute, rng) -> np.ndarray:
    """Rows of compute values (tiles of fmt.block, the row 2.5 tiles long): random magnitudes
    over compute's range, both signs; a zero tile; one huge value among small ones; a subnormal
    amax (fp32's, whose scale underflows to 0 or to a subnormal); amaxes whose scale rounds down,
    so that amax / s rounds past max_E; a NaN and an infinity."""
    k = fmt.block
    n = 2 * k + k // 2
    lo, hi = compute.min_exponent_of_quantum, compute.emax
    rows = [rng.standard_normal(n) * 2.0 ** rng.integers(lo, hi - 1, n) for _ in range(4)]
    rows.append(rng.standard_normal(n) * 2.0 ** rng.integers(-8, 8, n))
    z = rng.standard_normal(n)
    z[:k] = 0.0
    rows.append(z)
    h = rng.standard_normal(n) * 2.0**-20
    h[3], h[k + 1] = 2.0 ** (hi - 1), -(2.0 ** (hi // 2))
    rows.append(h)
    rows.append(rng.standard_normal(n) * 2.0**lo * rng.integers(1, 64, n))  # subnormal amax
    past = []  # amaxes whose float32 scale is below amax / max_E: x / s rounds past max_E
    while len(past) < n:
        a = fraction_round(Fraction(rng.uniform(1, 2) * 2.0 ** rng.integers(-10, 10)), compute, "rne")
        if _past_top([a], fmt):
            past.append(-a if len(past) % 2 else a)
    rows.append(np.array(past))
    rows.append(np.where(np.arange(n) == k + 2, np.nan, 1.0))
    rows.append(np.where(np.arange(n) == 1, -np.inf, 1.0))
    x = np.array(rows)
    return np.vectorize(lambda t: t if not np.isfinite(t) else fraction_round(Fraction(t), compute, "rne"))(x)


@pytest.mark.parametrize("policy", [
    "storage=bf16,compute=fp32,operands=scaled(e4m3fn,8)",
    "storage=bf16,compute=bf16,operands=scaled(e5m2,8,3)",  # a margin; bf16 rounds the dequantised values
    "compute=fp16,operands=scaled(e2m1fn,5)",  # fp16's range: its subnormal amaxes scale into fp32's normals
])
def test_scaled_values_equal_the_exact_rational_oracle(policy):
    """``scaled_values`` (compiled) and each backend's one quantisation of operands
    (``Emulator.operand``, ``ReferenceBackend.operand``) equal the oracle along either axis on
    the tiles of :func:`_tiles`; the tiles rounding past max_E are there and saturate; a zero
    tile stays zero; a tile with a NaN or an infinity is NaN; the rounding to compute acts."""
    e, r = make_backend("emulated", policy), make_backend("reference", policy)
    fmt, C = e.policy.operands, e.policy.compute
    x = _tiles(fmt, C, np.random.default_rng(11))
    k = fmt.block
    assert _past_top(x[-3][:k], fmt)
    for axis, a in ((1, x), (0, x.T)):
        want = oracle(a, fmt, C, axis)
        got = np.asarray(jax.jit(lambda v: scaled_values(v, fmt, C, axis))(a))
        assert _same(got, want), (axis, a[~((got == want) | np.isnan(want))][:4])
        assert _same(np.asarray(jax.jit(lambda v: e.emu.operand(v, axis))(a)), want)
        with np.errstate(invalid="ignore"):
            objs = np.frompyfunc(lambda t: mlib.from_float(float(t)), 1, 1)(a)  # the compute values, as they are
        assert _same(r.to_numpy(r.operand(objs, axis)), want)
    want = oracle(x, fmt, C, 1)
    assert (want[5, :k] == 0).all() and np.isnan(want[-2, k:2 * k]).all() and np.isnan(want[-1, :k]).all()
    assert np.isfinite(want[-2, :k]).all() and np.isfinite(want[-1, k:]).all()


def test_saturation_and_the_rounding_to_compute_matter():
    """Three defining choices of §13.2, seen on single tiles: a float32 scale rounded down puts
    amax / s past 448 (the element is 448, the value 448·s < amax); a subnormal scale puts x / s
    far past it, where the saturating cast gives 448 (not e4m3fn's NaN); and the dequantised ê·s
    (up to 28 bits) is rounded to compute."""
    fmt = scaled_for_element("e4m3fn", 4)
    a = next(float(np.float32(1 + i * 2.0**-23)) for i in range(1, 10**6) if _past_top([1 + i * 2.0**-23], fmt))
    s = float(np.float32(a / 448))
    assert a / s > 448 and oracle_tile([a], fmt, FP32) == [fraction_round(Fraction(448) * Fraction(s), FP32, "rne")]
    # a subnormal scale: 667·2^-149 / 448 rounds to s = 2^-149, x / s = 667 is past e4m3fn's NaN; saturated: 448
    tiny = [667 * 2.0**-149, -(2.0**-149), 0.0, 3 * 2.0**-149]
    want = [448 * 2.0**-149, -(2.0**-149), 0.0, 3 * 2.0**-149]
    assert oracle_tile(tiny, fmt, FP32) == want
    assert _same(np.asarray(jax.jit(lambda v: scaled_values(v, fmt, FP32))(np.array([tiny, [a, 1, 2, 3]]))),
                 [want, oracle_tile([a, 1, 2, 3], fmt, FP32)])
    bf16 = parse("bf16")
    x = [1.0, 0.3, -0.7, 0.01]
    exact = oracle_tile(x, fmt, parse("fp64"))  # ê·s, exact in float64
    assert oracle_tile(x, fmt, bf16) == [fraction_round(Fraction(v), bf16, "rne") for v in exact] != exact


# --------------------------------------------------------------------------- the policy grammar


@pytest.mark.parametrize("text,token", [
    (ROLE, "scaled(e4m3fn,32)"),
    ("compute=bf16,operands= Scaled( E5M2 , 128 , 2 ),order=kahan", "scaled(e5m2,128,2)"),
    ("compute=bf16,weights=mx(e4m3fn,16),operands=scaled(e4m3fn,1,0)", "scaled(e4m3fn,1)"),
    ("compute=bf16,operands=scaled( E4M3FN , Tensor ,2)", "scaled(e4m3fn,tensor,2)"),  # §13.2.1
])
def test_scaled_role_round_trip(text, token):
    p = Policy.parse(text)
    assert isinstance(p.operands, ScaledFormat)
    s = str(p)
    assert s.endswith(f",operands={token}")
    q = Policy.parse(s)
    assert q == p and hash(q) == hash(p) and str(q) == s
    assert q != Policy.parse(s.replace(token, token.replace("scaled", "mx").split(",")[0] + ",32)"))


@pytest.mark.parametrize("text,words", [
    ("compute=bf16,operands=scaled(e4m3fn,tensors)", ["the tile length k must be an integer, or tensor", "'tensors'"]),
    ("compute=bf16,operands=scaled(e4m3fn)", ["operands=scaled(e4m3fn) is not a scaled spec", "scaled(ELEMENT,k)"]),
    ("compute=bf16,operands=scaled(int8,4)", ["'int8' is not a scaled element format", "e4m3fn, e5m2"]),
    ("compute=bf16,operands=scaled(e4m3fn,0)", ["at least one element", "k=0"]),
    ("compute=bf16,operands=scaled(e4m3fn,4,-1)", ["margin", "from 0 to 64", "-1"]),
    ("compute=bf16,operands=scaled(e4m3fn,x)", ["the tile length k must be an integer", "'x'"]),
    ("compute=bf16,operands=scaled(e4m3fn,4,x)", ["the margin must be an integer", "'x'"]),
    ("compute=bf16,operands=scaled(e4m3fn,4,1,1)", ["is not a scaled spec"]),
    ("compute=bf16,kernel=online(8),operands=scaled(e4m3fn,8)", ["operands=scaled(e4m3fn,8) is defined under the "
                                                                 "naive kernel only", "use kernel=naive"]),
    ("compute=bf16,operands=e4m3fn", ["operands=e4m3fn is not an operand quantisation",
                                     "scaled(ELEMENT,k|tensor[,margin])"]),
])
def test_bad_scaled_roles_are_refused_in_one_sentence(text, words):
    refused_in_one_sentence(text, words)


def test_native_and_wide_reference_refuse_the_scaled_role():
    """The native backend does not quantise operands; the reference divides in float64, one
    correct rounding for compute formats of at most 25 bits: a wider one is refused."""
    import types

    from collapse_sim.experiments.paper import format_backend

    from collapse_sim.policy import Policy

    P = init_params(ModelConfig(d=8, vocab=4, seed=3))
    be = make_backend("native", "bf16")
    be.policy = Policy.parse(ROLE)  # as the report hands a native run a weights role
    with pytest.raises(PolicyError, match=r"does not quantise the dot products' operands \(operands=scaled"):
        forward(P, np.array([1, 2]), be)
    assert format_backend(types.SimpleNamespace(backend="native"), ROLE).kind == "emulated"  # the report's choice
    with pytest.raises(PolicyError, match=r"at most 25 bits .* not fp64's 53"):
        make_backend("reference", "compute=fp64,operands=scaled(e4m3fn,8)")
    with pytest.raises(PolicyError, match=r"at most 25 bits .* not p=30,emin=-126,emax=127's 30"):  # stored weights are divided too
        make_backend("emulated", "storage=(p=30,emax=127),compute=bf16,operands=scaled(e4m3fn,8)")


# --------------------------------------------------------------------------- full forwards

#: L = 2, d = 8, N = 40 with probes, tiles of 32: one short tile along d and d_h, and a row's last
#: key tile full (n = 31) or short (the others).
CONFIG = ModelConfig(d=8, n_layers=2, vocab=4, seed=3, pe="rope")
N = 40


@pytest.fixture(scope="module")
def emulated_run():
    toks = np.random.default_rng(N).integers(0, CONFIG.vocab, N)
    probe = np.roll(toks, -1)
    e = make_backend("emulated", ROLE)
    y, yp = forward(init_params(CONFIG), toks, e, probe=probe)
    return toks, probe, e.to_numpy(y), e.to_numpy(yp)


def test_emulated_equals_reference_with_scaled_operands(emulated_run):
    """Stream and probe outputs of both backends, bit for bit; the role changes the outputs, and
    differs from MX blocks of the same length."""
    toks, probe, y, yp = emulated_run
    P = init_params(CONFIG)
    r = make_backend("reference", ROLE)
    yr, ypr = forward(P, toks, r, probe=probe)
    assert _same(y, r.to_numpy(yr)) and _same(yp, r.to_numpy(ypr))
    for other in (ROLE.rsplit(",operands=", 1)[0], ROLE.replace("scaled(", "mx(")):
        o = make_backend("reference", other)
        assert not _same(y[:8], o.to_numpy(forward(P, toks[:8], o)))


def test_prefix_trick_equals_separate_runs_with_scaled_operands(emulated_run):
    """Row n of the one emulated forward equals the last row of a separate forward over t_0..t_n
    (the reference, equal to the emulated backend by the test above), and its probe row that of
    t_0..t_n, π_n: at n = 32, the first row whose last key tile is short (one column), and at
    n = 39."""
    toks, probe, y, yp = emulated_run
    P = init_params(CONFIG)
    r = make_backend("reference", ROLE)
    for n in (32, 39):
        assert _same(y[n], r.to_numpy(forward(P, toks[:n + 1], r))[-1]), n
        assert _same(yp[n], r.to_numpy(forward(P, np.concatenate([toks[:n + 1], probe[n:n + 1]]), r))[-1]), n


def test_collapse_policy_runs_with_the_scaled_role(tmp_path):
    """``collapse --policy`` on a tiny case (the reference backend: no compile) records the role
    in the table's format column and the run's JSON."""
    import json

    from collapse_sim.cli import main

    out = tmp_path / "c"
    args = ["collapse", "--family", "repeat_last", "--max-len", "4", "--d", "8", "--backend", "reference"]
    assert main([*args, "--policy", ROLE, "--out", str(out)]) == 0
    table = (out / "collapse.csv").read_text().splitlines()
    assert len(table) == 5 and all(",operands=scaled(e4m3fn,32)" in row for row in table[1:])
    assert json.loads((out / "collapse.json").read_text())["backends"][0]["policy"] == str(Policy.parse(ROLE))
