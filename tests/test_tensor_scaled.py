"""Per-tensor scaled operands (docs/semantics.md §13.2.1): ``operands=scaled(ELEMENT,tensor)``,
one float32 scale per operand tensor from its amax, activation rows with the running amax of
their prefix (probes after the stream's rows), a weight matrix with its own, the attention's
keys and values per query row over its columns 0..p_i, the weights P with the static amax 1.
The quantisation against the exact-rational oracle of §13.2 (tests/test_scaled_operands.py)
given the tensor's amax; full forwards emulated == reference bit for bit (L = 2, d = 8 and 9,
probes); the prefix trick against separate runs."""

from __future__ import annotations

from fractions import Fraction

import jax
import jax.numpy as jnp
import mpmath.libmp as mlib
import numpy as np
import pytest

from collapse_sim.backends import make_backend
from collapse_sim.backends.emulated.backend import EmulatedBackend
from collapse_sim.model import ModelConfig, forward, init_params
from collapse_sim.mx import P_AMAX, ScaledFormat, scaled_values
from collapse_sim.policy import Policy
from oracles import fraction_round
from test_mx_operands import _same
from test_scaled_operands import FP32, _past_top, oracle_tile

ROLE = "storage=bf16,compute=fp32,accumulate=fp32,operands=scaled(e4m3fn,tensor)"


# --------------------------------------------------------------------------- the oracle


def _amax(rows) -> float:
    """max |x| over ``rows`` (floats), exactly: NaN if one is NaN, inf if one is infinite."""
    vals = [abs(float(x)) for r in rows for x in r]
    return np.nan if any(np.isnan(vals)) else max(vals)


def oracle_rows(x: np.ndarray, fmt: ScaledFormat, compute, stream=None) -> np.ndarray:
    """§13.2.1 on activation rows ``x`` (n, m): row t with the amax of rows 0..t (with ``stream``:
    ``x`` holds probes, row t with the amax of the stream's rows 0..t and its own)."""
    out = []
    for t, row in enumerate(x):
        before = x[:t + 1] if stream is None else [*stream[:t + 1], row]
        out.append(oracle_tile(list(row), fmt, compute, _amax(before)))
    return np.array(out)


def oracle_tensor(x: np.ndarray, fmt: ScaledFormat, compute, amax=None) -> np.ndarray:
    """§13.2.1 on a whole tensor: one scale from all of ``x`` (or from ``amax``)."""
    return np.array(oracle_tile(list(np.ravel(x)), fmt, compute, amax)).reshape(np.shape(x))


def _tensors(fmt: ScaledFormat, C, rng) -> dict[str, np.ndarray]:
    """Tensors of compute values (5 rows of 7): random magnitudes over C's range and moderate ones
    (the running amax grows from row to row); a zero tensor, and zero rows before nonzero ones
    (s = 1, then a scale); a subnormal amax (its scale is a float32 subnormal or underflows to 0);
    amaxes whose float32 scale rounds down, so that amax / s rounds past max_E (each row's largest
    value larger than the rows' before); a NaN and an infinity in a middle row."""
    lo, hi = C.min_exponent_of_quantum, C.emax
    shape = (5, 7)
    past = []
    while len(past) < shape[0]:
        a = fraction_round(Fraction(rng.uniform(1, 2) * 2.0 ** rng.integers(-10, 10)), C, "rne")
        if _past_top([a], fmt) and a not in past:
            past.append(a)
    top = np.sort(past)
    small = rng.standard_normal(shape) * top[:, None] / 4
    small[:, 3] = top * np.array([1, -1, 1, -1, 1])
    cases = {
        "wide": rng.standard_normal(shape) * 2.0 ** rng.integers(lo, hi - 1, shape),
        "moderate": rng.standard_normal(shape) * 2.0 ** rng.integers(-8, 8, shape),
        "zero": np.zeros(shape),
        "zero rows first": np.where(np.arange(5)[:, None] < 2, 0.0, rng.standard_normal(shape)),
        "subnormal amax": rng.standard_normal(shape) * 2.0**lo * rng.integers(1, 64, shape),
        "past max_E": small,
        "nan": np.where((np.arange(5)[:, None] == 2) & (np.arange(7) == 4), np.nan, rng.standard_normal(shape)),
        "inf": np.where((np.arange(5)[:, None] == 3) & (np.arange(7) == 0), -np.inf, rng.standard_normal(shape)),
    }
    rnd = np.vectorize(lambda t: t if not np.isfinite(t) else fraction_round(Fraction(t), C, "rne"))
    return {k: rnd(v) for k, v in cases.items()}


def _objects(a: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return np.frompyfunc(lambda t: mlib.from_float(float(t)), 1, 1)(a)


@pytest.mark.parametrize("policy", [
    "storage=bf16,compute=fp32,operands=scaled(e4m3fn,tensor)",
    "storage=bf16,compute=bf16,operands=scaled(e5m2,tensor,3)",  # a margin; bf16 rounds the dequantised values
    "compute=fp16,operands=scaled(e2m1fn,tensor)",  # fp16's subnormal amaxes scale into fp32's normals
])
def test_tensor_scaled_values_equal_the_exact_rational_oracle(policy):
    """A whole tensor (a weight matrix: ``scaled_values`` and each backend's ``operand`` without an
    amax), activation rows with their running amax (``prefix_amax``), probes after stream rows, and
    the weights P with the static amax 1 equal the oracle bit for bit on :func:`_tensors`; the
    defining cases are there: a zero tensor stays zero, a row before a NaN or an infinity stays
    finite and every row from it on is NaN, the rounded-down scales put amax / s past max_E."""
    e, r = make_backend("emulated", policy), make_backend("reference", policy)
    fmt, C = e.policy.operands, e.policy.compute
    cases = _tensors(fmt, C, np.random.default_rng(17))
    emu_rows = jax.jit(lambda v, s: e.emu.operand(v, -1, e.emu.prefix_amax(v, s)))
    emu_whole = jax.jit(lambda v: e.emu.operand(v, 0))
    for name, x in cases.items():
        want = oracle_tensor(x, fmt, C)
        assert _same(np.asarray(jax.jit(lambda v: scaled_values(v, fmt, C))(x)), want), name
        assert _same(np.asarray(emu_whole(x)), want), name
        assert _same(r.to_numpy(r.operand(_objects(x), 0)), want), name
        want = oracle_rows(x, fmt, C)
        assert _same(np.asarray(emu_rows(x, None)), want), name
        assert _same(r.to_numpy(r.operand(_objects(x), -1, r._prefix_amax(_objects(x)))), want), name
        stream = cases["moderate"]
        want = oracle_rows(x, fmt, C, stream)
        assert _same(np.asarray(emu_rows(x, stream)), want), name
        assert _same(r.to_numpy(r.operand(_objects(x), -1, r._prefix_amax(_objects(x), _objects(stream)))), want)
    rows = oracle_rows(cases["nan"], fmt, C)
    assert np.isfinite(rows[:2]).all() and np.isnan(rows[2:]).all()
    rows = oracle_rows(cases["inf"], fmt, C)
    assert np.isfinite(rows[:3]).all() and np.isnan(rows[3:]).all()
    assert (oracle_tensor(cases["zero"], fmt, C) == 0).all()
    if C.emin <= -126:  # fp32's and bf16's subnormal amaxes give a subnormal (or underflowed) float32 scale
        assert _amax(cases["subnormal amax"]) * 2**fmt.margin / fmt.element.max < 2.0**-126
    past = cases["past max_E"]
    assert all(_past_top(list(past[: t + 1].ravel()), fmt) for t in range(5))
    # P: weights in [0, 1] and one just above 1 (a narrow accumulate), with the static amax 1
    P = np.array([[1.0, 0.5, 0.3, 1 / 3, 2.0**-20, 0.0, 1 + 2.0**-9]])
    P = np.vectorize(lambda t: fraction_round(Fraction(t), C, "rne"))(P)
    want = oracle_tensor(P, fmt, C, P_AMAX)
    assert _same(np.asarray(jax.jit(lambda v: e.emu.operand(v, -1, P_AMAX))(P)), want)
    assert _same(r.to_numpy(r.operand(_objects(P), -1, P_AMAX)), want)


def test_per_tensor_scales_differ_from_tiles_and_from_each_row_alone():
    """The running amax is the prefix's, not the row's own nor the whole tensor's: a row whose
    own amax is below an earlier row's is quantised with the earlier (coarser) scale, and an
    earlier row is not touched by a later, larger one."""
    e = make_backend("emulated", ROLE)
    fmt, C = e.policy.operands, e.policy.compute
    x = np.array([[1.0, 0.3, -0.7], [100.0, 1.1, 0.0], [0.3, 0.7, 1.0]])
    x = np.vectorize(lambda t: fraction_round(Fraction(t), C, "rne"))(x)
    got = np.asarray(jax.jit(lambda v: e.emu.operand(v, -1, e.emu.prefix_amax(v)))(x))
    assert _same(got[0], oracle_tile(list(x[0]), fmt, C))  # row 0: its own amax
    assert _same(got[2], oracle_tile(list(x[2]), fmt, C, 100.0))  # row 2: row 1's amax
    assert not _same(got[2], oracle_tile(list(x[2]), fmt, C))
    assert Policy.parse(ROLE).operands.token() == "scaled(e4m3fn,tensor)"


# --------------------------------------------------------------------------- full forwards

#: L = 2 with probes: d = 8 in two heads of 4 (RoPE, an output projection, an MLP) and d = 9 in
#: one head (sinusoidal, a window of 6, an MLP): every dot of §13.2.1's table, per head, and keys
#: masked by the window inside the amax.
CONFIGS = {8: ModelConfig(d=8, n_layers=2, n_heads=2, d_ff=8, out_proj=True, vocab=4, seed=3, pe="rope"),
           9: ModelConfig(d=9, n_layers=2, d_ff=5, vocab=5, seed=4, pe="sinusoidal", window=6)}
N = 12


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def runs(request):
    """Both backends' stream and probe outputs of one forward over N tokens."""
    c = CONFIGS[request.param]
    P = init_params(c)
    # the probes one token, the one of the smallest embedding amax, absent from the stream: a
    # probe's scales then come from the stream's rows before it (§13.2.1), not from its own
    low = int(np.argmin(np.max(np.abs(P["embed"]), axis=1)))
    toks = np.random.default_rng(N + c.d).choice([t for t in range(c.vocab) if t != low], N)
    toks[5] = toks[4]  # a repeated token
    probe = np.full(N, low)
    out = {}
    # at d = 9 the emulated backend is the shared program (formats as data), whose backend has no
    # policy to read the role from; at d = 8 the specialised one (each compiles in ~10-20 s)
    emulated = EmulatedBackend(ROLE, shared=True) if c.d == 9 else make_backend("emulated", ROLE)
    backends = {"emulated": emulated, "reference": make_backend("reference", ROLE)}
    for kind, b in backends.items():
        y, yp = forward(P, toks, b, probe=probe)
        out[kind] = (b.to_numpy(y), b.to_numpy(yp))
    return c, P, toks, probe, out


def test_emulated_equals_reference_with_tensor_scales(runs):
    """Stream and probe outputs of both backends, bit for bit (at d = 9 the emulated backend's
    shared program); the role changes the outputs, and differs from tiles of the same element."""
    c, P, toks, probe, out = runs
    (y, yp), (yr, ypr) = out["emulated"], out["reference"]
    assert _same(y, yr) and _same(yp, ypr)
    assert np.isfinite(y).all() and np.isfinite(yp).all()
    for other in (ROLE.rsplit(",operands=", 1)[0], ROLE.replace("tensor", "4")):
        o = make_backend("reference", other)
        assert not _same(y[:6], o.to_numpy(forward(P, toks[:6], o)))


def test_prefix_trick_equals_separate_runs_with_tensor_scales(runs):
    """Row n of the one forward equals the last row of a separate forward over t_0..t_n, and its
    probe row that of t_0..t_n, π_n (the reference, equal to the emulated backend by the test
    above), at n = 4 and n = N − 1."""
    c, P, toks, probe, out = runs
    y, yp = out["emulated"]
    r = make_backend("reference", ROLE)
    for n in (4, N - 1):
        assert _same(y[n], r.to_numpy(forward(P, toks[:n + 1], r))[-1]), n
        assert _same(yp[n], r.to_numpy(forward(P, np.concatenate([toks[:n + 1], probe[n:n + 1]]), r))[-1]), n


@pytest.mark.parametrize("probes", [False, True])
def test_keys_and_values_per_query_row_equal_the_oracle(probes):
    """The emulated attention's keys and values of a block of query rows (positions 4..7, and a
    probe's own key and value at its position with ``probes``), each row's over its columns
    0..p_i with their amax, equal the oracle on those columns, with the block's rows in one group
    (the largest key and value at column 0: quantised once) and in two (a larger key and value at
    column 5: rows 4 and 5..7)."""
    from collapse_sim.backends.emulated.attention import _tensor_scaled_rows

    e = make_backend("emulated", ROLE)
    fmt, C = e.policy.operands, e.policy.compute
    rng = np.random.default_rng(5)
    rnd = np.vectorize(lambda t: fraction_round(Fraction(t), C, "rne"))
    pb = np.arange(4, 8)
    for big in (0, 5):
        k, v = rnd(rng.standard_normal((9, 3))), rnd(rng.standard_normal((9, 3)))
        k[big, 1], v[big, 2] = 9.5, -7.25
        own = (rnd(rng.standard_normal((4, 3))), rnd(rng.standard_normal((4, 3)))) if probes else None
        kpb, vpb = own if probes else (np.zeros((4, 3)), np.zeros((4, 3)))
        f = jax.jit(lambda k, v, kpb, vpb: _tensor_scaled_rows(
            e.emu, lambda K, V: (K, V), k, v, jnp.arange(9), own, jnp.asarray(pb), kpb, vpb,
            (e.emu.prefix_amax(k), e.emu.prefix_amax(v)), (jnp.zeros((4, 9, 3)),) * 2))
        K, V = (np.asarray(a) for a in f(k, v, kpb, vpb))
        for i, p in enumerate(pb):
            for X, x, o in ((K, k, kpb), (V, v, vpb)):
                cols = np.concatenate([x[:p], o[i:i + 1]]) if probes else x[:p + 1]
                assert _same(X[i, :p + 1], oracle_tensor(cols, fmt, C)), (big, i)


def test_collapse_estimate_counts_the_operands_role():
    """The estimate printed before a collapse run scales the emulated arithmetic by the role's measured
    cost (per-tensor scales above tiles, MX blocks at the cost of none), and the compile by its
    measured compile cost (every role above none)."""
    from collapse_sim.experiments import estimate
    from collapse_sim.families import make_pairs

    c = CONFIGS[8]
    pairs = make_pairs("ones", 20, c.vocab)
    base = estimate.seconds(c, pairs, "emulated", "pairwise")
    by_role = {r: estimate.seconds(c, pairs, "emulated", "pairwise", operands=Policy.parse(f"compute=fp32,operands={r}").operands)
               for r in ("scaled(e4m3fn,tensor)", "scaled(e4m3fn,128)", "mx(e4m3fn,32)")}
    tensor, tiles, mx = by_role.values()
    u4 = 4 * 2.0**-53  # two float64 products each side, associated differently
    assert tensor.arithmetic / base.arithmetic == pytest.approx(estimate.ROLE_COST["tensor"], rel=u4, abs=0)
    assert mx.arithmetic / base.arithmetic == pytest.approx(estimate.ROLE_COST["mx"], rel=u4, abs=0)
    assert tensor.arithmetic > tiles.arithmetic > base.arithmetic
    for role, e in zip(("tensor", "tiles", "mx"), by_role.values()):
        assert e.compile / base.compile == pytest.approx(estimate.ROLE_COMPILE[role], rel=u4, abs=0), role
        assert e.compile > base.compile and e.programs == base.programs
    assert estimate.seconds(c, pairs, "native", operands=Policy.parse("compute=fp32,operands=mx(e4m3fn,32)").operands) \
        == estimate.seconds(c, pairs, "native")
