"""The operands role (docs/semantics.md §13.1): both operands of the projections, the MLP, the
scores and the weighted values in OCP MX blocks along the contraction axis. The quantisation
against the exact-rational MX oracle of tests/test_mx.py (random and extreme blocks, E8M0's
extremes, the rounding to compute after it); the policy grammar; full forwards emulated ==
reference bit for bit; the prefix trick against separate runs (the values' last key block is
the row's own); the refusals."""

from __future__ import annotations

from fractions import Fraction

import jax
import numpy as np
import pytest

from collapse_sim.backends import make_backend
from collapse_sim.model import ModelConfig, forward, init_params
from collapse_sim.mx import MX_FORMATS, MXFormat, mx_format, mx_values
from collapse_sim.backends.inputs import AttentionInputs
from collapse_sim.policy import Policy, PolicyError
from oracles import fraction_round
from test_mx import EMAX_ELEM, element_values, oracle_block
from test_mx_weights import test_bad_roles_are_refused_in_one_sentence as refused_in_one_sentence

ROLE = "storage=bf16,compute=fp32,accumulate=fp32,operands=mx(e4m3fn,32)"


def _same(a, b) -> bool:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))  # ±0 equal: the reference has no -0


def _oracle(x: np.ndarray, name: str, k: int, axis: int, compute=None) -> np.ndarray:
    """§13.1's Q(x) along ``axis`` from the exact-rational oracle: blocks of ``k`` (the last
    short), then (with ``compute``) each value rounded to it, ties to even."""
    v = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    out = np.empty_like(v)
    for idx in np.ndindex(*v.shape[:-1]):
        row = v[idx]
        out[idx] = np.concatenate([oracle_block(list(row[i:i + k]), name) for i in range(0, row.size, k)])
    if compute is not None:
        out = np.vectorize(lambda t: t if np.isnan(t) else fraction_round(Fraction(t), compute, "rne"))(out)
    return np.moveaxis(out, -1, axis)


# --------------------------------------------------------------------------- the quantisation


def _extreme_blocks(name: str, k: int, shifts) -> np.ndarray:
    """Blocks of ``k`` (rows): every element value and midpoint of neighbours, times the
    block's scale 2^s, beside the largest element times 2^s (which sets the scale)."""
    vals = sorted(element_values(name))
    top = float(vals[-1])
    mids = [float((a + b) / 2) for a, b in zip(vals, vals[1:])]
    xs = np.array([float(v) for v in vals] + mids)
    xs = np.concatenate([xs, -xs])
    rows = []
    for s in shifts:
        for i in range(0, xs.size, k - 1):
            chunk = list(xs[i:i + k - 1] * 2.0**s)
            rows.append([top * 2.0**s] + chunk + [0.0] * (k - 1 - len(chunk)))
    return np.array(rows)


@pytest.mark.parametrize("name", list(MX_FORMATS))
def test_mx_values_equal_the_oracle_at_e8m0_extremes(name):
    """The jax.numpy rule the forward runs (``mx_values``, compiled) equals the exact-rational
    oracle on every element value and tie at shared exponents from E8M0's smallest, 2^-127,
    to its largest, 2^127 (``s = 127 - emax_elem``), on blocks past it (NaN), blocks holding a
    NaN or an infinity, and random blocks along either axis with a short last block."""
    k = 16
    emax = EMAX_ELEM[name]
    x = _extreme_blocks(name, k, (-127, -126, -20, 0, 33, 127 - emax))
    x = np.concatenate([x, [[2.0**(128 + emax)] + [1.0] * (k - 1)], [[np.nan] + [1.0] * (k - 1)],
                        [[np.inf] + [1.0] * (k - 1)], np.zeros((1, k))])
    fmt = mx_format(name, k)
    got = np.asarray(jax.jit(lambda a: mx_values(a, fmt, 1))(x))
    assert _same(got, _oracle(x, name, k, 1))
    assert np.isnan(got[-4:-1]).all() and (got[-1] == 0).all()
    rng = np.random.default_rng(1)
    r = rng.standard_normal((21, 6)) * 2.0 ** rng.integers(-140, 100, (21, 6))
    fmt5 = mx_format(name, 5)  # 21 along axis 0: four blocks of 5 and one of 1
    assert _same(np.asarray(jax.jit(lambda a: mx_values(a, fmt5, 0))(r)), _oracle(r, name, 5, 0))


@pytest.mark.parametrize("policy,name,k", [
    ("compute=fp32,operands=mx(e4m3fn,8)", "mxfp8_e4m3", 8),
    ("storage=bf16,compute=bf16,operands=mx(e2m1fn,4)", "mxfp4_e2m1", 4),
    ("compute=fp16,operands=mx(e5m2,8)", "mxfp8_e5m2", 8),
    ("compute=(p=5,emax=15),operands=mx(int8,3)", "mxint8", 3),  # compute narrower than the element:
    ("compute=e5m2,operands=mx(e4m3fn,8)", "mxfp8_e4m3", 8),  # the rounding to it matters
])
def test_the_backends_operand_is_q_of_section_13_1(policy, name, k):
    """``Emulator.operand`` and ``ReferenceBackend.operand``, each backend's one quantisation of
    operands, are §13.1's Q(x) = mx_round(x) on compute values along either axis: random values
    over the compute format's whole range (subnormals included), blocks whose scale clamps at
    2^-127. And Q(x) is a value of compute, as §13.1 proves (the oracle rounded to compute is the
    oracle), also where compute has fewer significand bits than the element (the last two
    cases: 5 bits against int8's 7, e5m2's 3 against e4m3's 4)."""
    e, r = make_backend("emulated", policy), make_backend("reference", policy)
    C = e.policy.compute
    rng = np.random.default_rng(7)
    lo = C.min_exponent_of_quantum
    x = rng.standard_normal((9, 2 * k + 1)) * 2.0 ** rng.integers(lo, C.emax - 1, (9, 2 * k + 1))
    x[0] = rng.standard_normal(2 * k + 1) * 2.0**lo  # a row of subnormals and zeros
    x = np.asarray(e.store(x), np.float64)  # compute values (storage is within compute here)
    for axis in (0, 1):
        want = _oracle(x, name, k, axis)
        assert _same(_oracle(x, name, k, axis, C), want)
        got = np.asarray(jax.jit(lambda a: e.emu.operand(a, axis))(x))
        assert _same(got, want), (axis, x[~((got == want) | np.isnan(want))][:4])
        assert _same(r.to_numpy(r.operand(r.ref.store(x), axis)), want)


# --------------------------------------------------------------------------- the policy grammar


@pytest.mark.parametrize("text,element,k", [
    ("storage=bf16,compute=fp32,accumulate=fp32,operands=mx(e4m3fn,32)", "mxfp8_e4m3", 32),
    ("compute=bf16,operands=mx(e2m1fn)", "mxfp4_e2m1", 32),
    ("compute=bf16,weights=mx(e5m2,16),operands= MX( int8 , 8 ),order=kahan", "mxint8", 8),
])
def test_operands_role_round_trip(text, element, k):
    p = Policy.parse(text)
    assert isinstance(p.operands, MXFormat) and p.operands == mx_format(element, k)
    s = str(p)
    elem = "int8" if element == "mxint8" else MX_FORMATS[element].element.name
    assert s.endswith(f",operands=mx({elem},{k})")
    q = Policy.parse(s)
    assert q == p and hash(q) == hash(p) and str(q) == s
    assert Policy.parse(s.split(",operands=")[0]) != p and "operands" not in str(Policy.parse("compute=bf16"))


@pytest.mark.parametrize("text,words", [
    ("compute=bf16,operands=scaled(e4m3fn,tensor,65)", ["margin", "from 0 to 64", "65"]),  # §13.2.1
    ("compute=bf16,operands=e4m3fn", ["operands=e4m3fn is not an operand quantisation", "operands=mx(e4m3fn,32)"]),
    ("compute=bf16,operands=mx(e4m3)", ["'e4m3' is not an MX element format"]),
    ("compute=bf16,operands=mx(e2m1fn,0)", ["at least one element", "block=0"]),
    ("compute=bf16,operands=mx(e2m1fn,2,2)", ["operands=mx(e2m1fn,2,2) is not an MX spec"]),
    ("compute=bf16,kernel=online(8),operands=mx(e4m3fn)", ["naive kernel only", "use kernel=naive"]),
    ("compute=bf16,kernel=flash3fp8(8),operands=mx(e4m3fn)", ["naive kernel only"]),
    ("compute=mx(e4m3fn)", ["weights role only", "operands=mx(e4m3fn)"]),
    ("compute=bf16,operand=mx(e4m3fn)", ["unknown key 'operand'", "operands"]),
])
def test_bad_operands_roles_are_refused_in_one_sentence(text, words):
    """One sentence, a PolicyError (a CollapseSimError, a ValueError), naming ``words``: the
    weights role's check (tests/test_mx_weights.py) on the operands role's spellings."""
    refused_in_one_sentence(text, words)


def test_native_and_wide_reference_refuse_the_role():
    """The native backend cannot quantise operands (handed the policy, as the report's toy
    native runs hand it a weights role, it refuses; the report runs such a policy emulated at
    every size); the reference quantises compute and stored values through float64, so a
    compute or storage format beyond it is refused (a wide stored weight would otherwise be
    rounded twice). Each in one sentence, before any work."""
    import types

    from collapse_sim.experiments.paper import format_backend
    from collapse_sim.policy import Policy

    P = init_params(ModelConfig(d=8, vocab=4, seed=3))
    be = make_backend("native", "bf16")
    be.policy = Policy.parse(ROLE)
    with pytest.raises(PolicyError, match="the native backend does not quantise the dot products' operands"):
        forward(P, np.array([1, 2]), be)
    assert format_backend(types.SimpleNamespace(backend="native"), ROLE).kind == "emulated"
    with pytest.raises(PolicyError, match=r"does not hold every value of p=60"):
        make_backend("reference", "compute=(p=60,emax=100),operands=mx(e4m3fn)")
    with pytest.raises(PolicyError, match=r"does not hold every value of p=64"):
        make_backend("reference", "storage=(p=64,emax=127),compute=bf16,operands=mx(e4m3fn,4)")


# --------------------------------------------------------------------------- full forwards

#: L = 2, d = 8: e4m3 in blocks of 32 (one short block along d and d_h; N = 40, so a row's last
#: key block is full or short), e2m1 in blocks of 4 (two per row, four along d_ff = 16, three
#: along the keys) with two heads, a window and ALiBi (masked columns in the values' blocks) and
#: adaptive temperature (P is the second softmax's weights; its entropy dot is not quantised).
CASES = {
    "e4m3-k32-N40": (ModelConfig(d=8, n_layers=2, vocab=4, seed=3, pe="rope"), ROLE, 40),
    "e2m1-k4-N12": (ModelConfig(d=8, n_layers=2, n_heads=2, vocab=4, seed=5, pe="alibi", window=6, d_ff=16,
                                adaptive_temperature=True),
                    "storage=bf16,compute=bf16,accumulate=fp32,operands=mx(e2m1fn,4)", 12),
}


@pytest.fixture(scope="module", params=list(CASES))
def emulated_run(request):
    """(config, policy, tokens, probe, emulated outputs and probe outputs) of one case."""
    config, policy, n = CASES[request.param]
    toks = np.random.default_rng(n).integers(0, config.vocab, n)
    probe = np.roll(toks, -1)
    e = make_backend("emulated", policy)
    y, yp = forward(init_params(config), toks, e, probe=probe)
    return config, policy, toks, probe, e.to_numpy(y), e.to_numpy(yp)


def test_emulated_equals_reference_with_mx_operands(emulated_run):
    """Stream and probe outputs of both backends, bit for bit; the role changes the outputs."""
    config, policy, toks, probe, y, yp = emulated_run
    P = init_params(config)
    r = make_backend("reference", policy)
    yr, ypr = forward(P, toks, r, probe=probe)
    assert _same(y, r.to_numpy(yr)) and _same(yp, r.to_numpy(ypr))
    without = make_backend("reference", policy.rsplit(",operands=", 1)[0])
    assert not _same(y, without.to_numpy(forward(P, toks, without)))


def test_prefix_trick_equals_separate_runs_with_mx_operands(emulated_run):
    """Row n of the one emulated forward equals the last row of a separate forward over
    t_0..t_n, and its probe row that of t_0..t_n, π_n (the reference, equal to the emulated
    backend by the test above, runs the short forwards without a compile each), for every n of
    the short case and, in the long one, the lengths around the key block of 32."""
    config, policy, toks, probe, y, yp = emulated_run
    P = init_params(config)
    r = make_backend("reference", policy)
    ns = range(len(toks)) if len(toks) <= 12 else (31, 32, 39)
    for n in ns:
        sep = r.to_numpy(forward(P, toks[:n + 1], r))
        assert _same(y[n], sep[-1]), n
        sep_p = r.to_numpy(forward(P, np.concatenate([toks[:n + 1], probe[n:n + 1]]), r))
        assert _same(yp[n], sep_p[-1]), n


def test_causal_segments_equal_full_attention_with_mx_operands(certified_everywhere):
    """Queries in three causal segments, each over only the keys it can see (as long streams
    run), give the bits of every query over all keys: a row's values' blocks are its prefix's.
    With probes, a window and ALiBi; the blocked order with its certified path forced on at
    every size, which the role must leave for the op-by-op weighted values."""
    import jax.numpy as jnp

    from collapse_sim.backends.emulated import _causal_segments, _emulated_attention

    e = make_backend("emulated", "compute=bf16,accumulate=fp32,order=blocked(3),operands=mx(e2m1fn,4)")
    rng = np.random.default_rng(4)
    n, dh = 21, 4
    q, k, v, kp, vp = (e.store(rng.standard_normal((n, dh)) * 2.0 ** rng.integers(-6, 6, (n, 1))) for _ in range(5))
    v = e.store(rng.standard_normal((n, dh)) * 4.0 ** (np.arange(n) % 4)[:, None])  # the last of a block is largest, and
    pos = np.arange(n)  # FP4 loses the rest: a segment ending inside a block (7, 14 of 21) must not take in its later keys
    # (without probes, window and ALiBi the segments' bookkeeping is the role's too: tests/test_model.py)
    for qpos, skv, alibi, window in ((pos + 1, (kp, vp), 0.25, 5),):
        full = jax.jit(lambda q, k, v, skv: _emulated_attention(
            e.emu, AttentionInputs(q, k, v, jnp.asarray(qpos), 0.5, alibi, window, skv)))
        seg = jax.jit(lambda q, k, v, skv: _causal_segments(
            e.emu, AttentionInputs(q, k, v, qpos, 0.5, alibi, window, skv), segments=3))
        assert _same(full(q, k, v, skv), seg(q, k, v, skv))


# --------------------------------------------------------------------------- the command line


def test_collapse_policy_runs_end_to_end_and_records_the_role(tmp_path, capsys):
    """``collapse --policy`` (the reference backend: no compile) writes a table whose backend and
    format name the policy, role included; bad combinations are one sentence, exit 2."""
    import csv
    import json

    from collapse_sim.cli import main

    out = tmp_path / "c"
    assert main(["collapse", "--family", "repeat_last", "--max-len", "4", "--d", "8", "--backend", "reference",
                 "--policy", ROLE, "--out", str(out)]) == 0
    with open(out / "collapse.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["format"].endswith(",operands=mx(e4m3fn,32)") for r in rows)
    assert rows[0]["backend"] == f"reference:{Policy.parse(ROLE)}"
    assert json.loads((out / "collapse.json").read_text())["backends"][0]["policy"] == str(Policy.parse(ROLE))
    for extra, msg in ((["--backend", "native"], "--policy runs on the emulated or reference backend"),
                       (["--format", "bf16"], "drop --format, --order and --kernel"),
                       (["--order", "kahan"], "drop --format, --order and --kernel")):
        capsys.readouterr()
        assert main(["collapse", "--family", "ones", "--max-len", "4", "--policy", ROLE, *extra,
                     "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and "\n" not in err, err
    assert main(["collapse", "--family", "ones", "--max-len", "4", "--policy", "compute=bf16,operands=mx(e4m3)",
                 "--out", str(tmp_path / "y")]) == 2
    assert "'e4m3' is not an MX element format" in capsys.readouterr().err
