"""The decoder on three backends: bit-exact agreement, the prefix trick, analytic facts."""

from __future__ import annotations

import jax
import mpmath
import numpy as np
import pytest

from collapse_sim.backends import make_backend
from collapse_sim.backends.inputs import AttentionInputs
from collapse_sim.compilation import snapshot
from collapse_sim.families import FamilyError, make_pairs
from collapse_sim.model import ConfigError, ModelConfig, Params, forward, init_params
from collapse_sim.theory import forward_ops, gamma
from collapse_sim.theory.collapse import reference_differences

TOKS = np.array([1, 2, 3, 0, 1, 1, 2, 3, 3, 1, 0, 2])


def _same(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))  # ±0 equal: mpmath has no -0


@pytest.mark.parametrize("cfg,policy", [
    (dict(pe="rope", n_heads=2, d_ff=16, out_proj=True), "compute=bf16,order=pairwise"),
    (dict(pe="alibi", n_heads=2, window=4, norm="rmsnorm"), "compute=(p=6,emax=20),accumulate=(p=12,emax=40),order=blocked(3)"),
    (dict(pe="sinusoidal", ape="scores"), "compute=fp16,accumulate=fp32,softmax=fp32,order=sequential"),
    (dict(pe="learned", max_len=32), "compute=bf16,order=kahan,mode=rz"),
    (dict(pe="rope", n_heads=2, d_ff=16), "compute=bf16,order=exact"),
    (dict(pe="sinusoidal", norm="rmsnorm"), "storage=bf16,compute=bf16,accumulate=fp32,order=blocked(3),mode=ru"),
])
def test_emulated_equals_reference_bit_for_bit(cfg, policy, request):
    """Full forward passes (L = 2, d = 8, n = 12) with a probe after every prefix. The
    exact order runs its certified float64 path (every stage, as at large sizes; the
    blocked cases run op by op with host exact sums, as small stages do)."""
    if "order=exact" in policy:
        request.getfixturevalue("certified_everywhere")
    assert_emulated_equals_reference(ModelConfig(d=8, n_layers=2, vocab=4, seed=3, **cfg), policy)


def assert_emulated_equals_reference(config, policy):
    """The emulated backend's and the reference's forwards of TOKS (with a probe after
    every prefix) under ``policy`` are the same numbers (±0 aside)."""
    P = init_params(config)
    probe = np.roll(TOKS, -1)
    e, r = make_backend("emulated", policy), make_backend("reference", policy)
    ye, ype = forward(P, TOKS, e, probe=probe)
    yr, ypr = forward(P, TOKS, r, probe=probe)
    assert _same(e.to_numpy(ye), r.to_numpy(yr))
    assert _same(e.to_numpy(ype), r.to_numpy(ypr))


@pytest.mark.parametrize("policy", ["compute=bf16,order=pairwise", "compute=(p=6,emax=20),order=blocked(3)",
                                    "compute=bf16,order=kahan,mode=rz"])
def test_causal_segments_equal_full_attention(policy, certified_everywhere):
    """Queries in segments over only the keys they can see give the same bits (±0 aside)
    as every query over all keys, with probes, a window and ALiBi (blocked: the certified
    segments, as at large sizes), and for the first policy also without them (the segments'
    bookkeeping does not depend on the order; each case compiles two programs)."""
    import jax.numpy as jnp

    from collapse_sim.backends.emulated import _causal_segments, _emulated_attention


    e = make_backend("emulated", policy)
    rng = np.random.default_rng(4)
    n, dh = 21, 4
    q, k, v, kp, vp = (e.store(rng.standard_normal((n, dh))) for _ in range(5))
    pos = np.arange(n)
    cases = ((pos, None, None, None), (pos + 1, (kp, vp), 0.25, 5))
    for qpos, skv, alibi, window in cases if policy == "compute=bf16,order=pairwise" else cases[1:]:
        # under jit, as the model runs them (eager calls would recompile every lax.map body)
        full = jax.jit(lambda q, k, v, skv: _emulated_attention(
            e.emu, AttentionInputs(q, k, v, jnp.asarray(qpos), 0.5, alibi, window, skv)))
        # three segments of unequal key lengths: each segment compiles its own attention body
        seg = jax.jit(lambda q, k, v, skv: _causal_segments(
            e.emu, AttentionInputs(q, k, v, qpos, 0.5, alibi, window, skv), segments=3))
        assert _same(full(q, k, v, skv), seg(q, k, v, skv))


@pytest.mark.parametrize("policy", ["compute=bf16", "storage=fp16,compute=fp16,accumulate=fp32", "compute=(p=5,emax=15)"])
def test_padded_products_give_the_plain_bits(policy, monkeypatch):
    """Under pairwise RNE the dot products' and the weighted values' factors are padded to the
    tree's width before they are multiplied (``Emulator.pads_products``, docs/backends.md): the
    padding's products are the tree's own +0 terms, so attention over 21 keys with head width 6
    (neither a power of two), probes, ALiBi and a window gives the same bits, signs of zeros
    included, as the plain formulation. The other modes and stochastic rounding keep it."""
    import jax.numpy as jnp

    from collapse_sim.backends.emulated import _emulated_attention
    from collapse_sim.backends.emulated.ops import Emulator

    e = make_backend("emulated", policy)
    assert e.emu.pads_products(e.emu.order)
    assert not any(make_backend("emulated", f"{policy},mode={m}").emu.pads_products(e.emu.order)
                   for m in ("rd", "rna", "sr(2)"))
    rng = np.random.default_rng(6)
    n, dh = 21, 6
    q, k, v, kp, vp = (e.store(rng.standard_normal((n, dh))) for _ in range(5))
    v = v.at[3].set(-0.0)  # products of -0 and of tiny values: the signs of zero sums are compared too
    def att():  # a new function each time: jit's cache does not see pads_products
        return jax.jit(lambda q, k, v, skv: _emulated_attention(
            e.emu, AttentionInputs(q, k, v, jnp.arange(n) + 1, 0.5, 0.25, 5, skv)))

    padded = np.asarray(att()(q, k, v, (kp, vp)))
    monkeypatch.setattr(Emulator, "pads_products", lambda self, order: False)
    plain = np.asarray(att()(q, k, v, (kp, vp)))
    assert np.array_equal(padded.view(np.uint8), plain.view(np.uint8))


@pytest.mark.parametrize("policy,shared", [("compute=bf16", False), ("storage=fp16,compute=fp16,accumulate=fp32", False),
                                           ("compute=(p=5,emax=15),mode=rd", False), ("compute=bf16", True)])
def test_key_chunks_give_the_unchunked_bits(policy, shared, monkeypatch):
    """The pairwise attention's keys in aligned chunks, a block of query rows visiting only the chunks
    up to its last position (and from its window's first, ``attention.key_chunk``): the same bits, signs
    of zeros included, as every block over all keys, with and without probes, ALiBi and windows, an inf
    and a NaN among the later keys and values (masked for the earlier rows), in a directed mode and in
    the shared program (formats as data). Chunks of 4 over 37 keys (tree width 64) in blocks of 4 rows."""
    import jax.numpy as jnp

    from collapse_sim.backends.emulated import _emulated_attention, attention
    from collapse_sim.backends.emulated.ops import Emulator

    emu = Emulator(policy, shared=shared)
    rng = np.random.default_rng(7)
    n, dh = 37, 6
    q, k, v, kp, vp = (jnp.asarray(emu.store(rng.standard_normal((n, dh))), emu.dtype) for _ in range(5))
    v = v.at[3].set(-0.0).at[30, 1].set(jnp.inf)
    k = k.at[33, 2].set(jnp.nan)
    # windows of 5 and 6 put a block's first visible column at each end of a chunk of 4
    cases = ((jnp.arange(n), None, None, None), (jnp.arange(n) + 1, (kp, vp), 0.25, 5),
             (jnp.arange(n), None, None, 6))

    def att(chunk, qpos, alibi, window):  # a new function each time: jit's cache does not see the patch
        monkeypatch.setattr(attention, "KEY_CHUNK", chunk)
        monkeypatch.setattr(attention, "KEY_CHUNK_ROWS", 4)

        def f(q, k, v, skv, roles):
            e = emu.bind(roles) if shared else emu
            assert (attention.key_chunk(e, n) > 0) == (chunk == 4)
            return _emulated_attention(e, AttentionInputs(q, k, v, qpos, 0.5, alibi, window, skv))

        return jax.jit(f)

    for qpos, skv, alibi, window in cases:
        args = (q, k, v, skv, emu.data())
        chunked = np.asarray(att(4, qpos, alibi, window)(*args))
        whole = np.asarray(att(1 << 30, qpos, alibi, window)(*args))
        assert np.isnan(chunked).any() == np.isnan(whole).any()
        assert np.array_equal(chunked.view(np.uint8), whole.view(np.uint8))


@pytest.mark.parametrize("cfg", [dict(pe="rope", n_heads=2), dict(pe="alibi", window=3)])
def test_forward_in_key_chunks_equals_reference(cfg, monkeypatch):
    """The forward whose attention takes its keys in chunks of 2 (12 tokens, blocks of 2 rows), with a
    probe after every prefix, against the op-by-op mpmath reference: the same numbers (a model seed of its
    own, so that no program stored by another test is the one that runs; the process's compiled forwards
    forgotten before and after, as their key does not hold the chunk size)."""
    from collapse_sim.backends import _jit
    from collapse_sim.backends.emulated import attention

    _jit._compiled.cache_clear()
    monkeypatch.setattr(attention, "KEY_CHUNK", 2)
    monkeypatch.setattr(attention, "KEY_CHUNK_ROWS", 2)
    try:
        assert_emulated_equals_reference(ModelConfig(d=8, n_layers=2, vocab=4, seed=11, **cfg), "compute=bf16")
    finally:
        _jit._compiled.cache_clear()


EAGER_CERTIFIED = "compute=bf16,order=exact"


@pytest.mark.parametrize("policy", [EAGER_CERTIFIED, "compute=bf16,accumulate=fp32,order=blocked(4)",
                                    "compute=(p=3,emax=100),accumulate=(p=7,emax=100),order=blocked(3),mode=rd"])
def test_certified_attention_equals_op_by_op(policy, monkeypatch, certified_everywhere):
    """Attention from float64 matrix products (certified) gives the op-by-op bits, with
    probes, ALiBi and a window. Some queries carry ±2^40 entries against keys with
    ±2^40 entries, whose products cancel: their blocks cannot be certified and must
    fall back to the op-by-op path."""
    import jax.numpy as jnp

    from collapse_sim.backends import emulated

    e = make_backend("emulated", policy)
    rng = np.random.default_rng(5)
    n, dh = 40, 8
    q, k, v, kp, vp = (rng.standard_normal((n, dh)) for _ in range(5))
    q[:3, :2], k[:, 0], k[:, 1] = 2.0**40, 2.0**40, -(2.0**40)
    q[3:, :2] = 0.0
    q, k, v, kp, vp = (e.store(a) for a in (q, k, v, kp, vp))
    _, ok = emulated.certified_matmul(e.emu, q, k.T)
    assert not np.asarray(ok)[:3].any() and np.asarray(ok)[3:].all()  # the fallback is exercised
    pos = np.arange(n)
    for qpos, skv, alibi, window in ((pos, None, None, None), (pos + 1, (kp, vp), 0.25, 7)):
        def att(q, k, v, qpos, skv):
            return emulated._emulated_attention(e.emu, AttentionInputs(q, k, v, qpos, 0.5, alibi, window, skv))

        # traced: a loop over the uncertified rows' blocks; eager (the blocks redone in Python, an
        # op-by-op dispatch that costs more than the compile) for one policy, which takes the
        # same Python path as the others
        got = [jax.jit(att)(q, k, v, jnp.asarray(qpos), skv)]
        if policy == EAGER_CERTIFIED:
            got.append(att(q, k, v, jnp.asarray(qpos), skv))
        with monkeypatch.context() as m:
            m.setattr(emulated.attention, "_certified", lambda emu, terms: False)
            slow = att(q, k, v, jnp.asarray(qpos), skv)
        for got in got:
            assert np.array_equal(np.asarray(got).view(np.uint64), np.asarray(slow).view(np.uint64))


def test_uncertified_rows_are_redone(monkeypatch, certified_everywhere):
    """Rows the float64 certificates leave open are redone op by op, bit for bit, in
    the attention and in linear layers, eager and jitted. Attention: with p = 3 the
    third query's weights e = (1, 1/8, ~2^-58) sum to just above the midpoint 1.125,
    which float64 returns exactly: the denominator is refused (no superaccumulator in
    the certified code) and must round up to 1.25. Linear: rows with ±2^40 products
    that cancel are refused."""
    import jax.numpy as jnp

    from collapse_sim.backends import emulated

    e = make_backend("emulated", "compute=(p=3,emax=100),order=exact")
    q, k, v = (e.store(np.array(a)[:, None]) for a in ([1.0, 1.0, 1.0], [0.0, -2.0, -40.0], [1.0, 2.0, 3.0]))
    qpos = jnp.arange(3)
    _, ok = emulated._certified_attention(e.emu, AttentionInputs(q, k, v, qpos, 1.0))
    assert np.asarray(ok).tolist() == [True, True, False]
    rng = np.random.default_rng(9)
    x, w = rng.integers(-6, 7, (40, 8)).astype(float), rng.standard_normal((8, 5))
    x[:3, :2], w[0], w[1] = 2.0**40, 2.0**40, -(2.0**40)
    x, w = e.store(x), e.store(w)
    assert not np.asarray(emulated.certified_matmul(e.emu, x[:3], w)[1]).any()

    def both():
        att = emulated._emulated_attention(e.emu, AttentionInputs(q, k, v, qpos, 1.0))
        return att, emulated._linear(e.emu, x, w)

    got = [both(), jax.jit(both)()]
    with monkeypatch.context() as m:
        m.setattr(emulated.attention, "_certified", lambda emu, terms: False)
        slow = both()
    assert float(slow[0][2, 0]) == 1.0  # from the denominator 1.25 (the refused 1.0 gives 1.25)
    for g in got:
        for a, b in zip(g, slow):
            assert np.array_equal(np.asarray(a).view(np.uint64), np.asarray(b).view(np.uint64))


def test_native_f64_close_to_reference_256():
    c = ModelConfig(d=8, n_layers=2, n_heads=2, d_ff=16, vocab=4, pe="sinusoidal", seed=5)
    P = init_params(c)
    y64 = make_backend("native", "fp64").to_numpy(forward(P, TOKS, make_backend("native", "fp64")))
    r = make_backend("reference", "256")
    y256 = r.to_numpy(forward(P, TOKS, r))
    # γ_k of float64 with the forward's op count k (theory.forward_ops), against the largest |output|
    bound = gamma(forward_ops(len(TOKS), c.d, c.n_layers), 2.0**-53) * np.max(np.abs(y256))
    assert np.max(np.abs(y64 - y256)) <= bound


def test_prefix_trick_equals_separate_runs():
    c = ModelConfig(d=8, n_layers=1, n_heads=2, vocab=4, pe="alibi", seed=7)
    P = init_params(c)
    pol = "compute=bf16,order=pairwise"
    probe = np.roll(TOKS, -1)
    r = make_backend("reference", pol)
    y_all, yp_all = forward(P, TOKS, r, probe=probe)
    for n in range(1, len(TOKS) + 1):
        y_n = forward(P, TOKS[:n], r)
        assert _same(r.to_numpy(y_n)[-1], r.to_numpy(y_all)[n - 1])
        y_probe = forward(P, np.concatenate([TOKS[:n], [probe[n - 1]]]), r)
        assert _same(r.to_numpy(y_probe)[-1], r.to_numpy(yp_all)[n - 1])
    e = make_backend("emulated", pol)
    ye, ype = forward(P, TOKS, e, probe=probe)
    for n in (5,):  # each length compiles twice (with and without the probe token): one on the emulated backend
        y_n = forward(P, TOKS[:n], e)
        assert _same(e.to_numpy(y_n)[-1], e.to_numpy(ye)[n - 1])
        y_probe = forward(P, np.concatenate([TOKS[:n], [probe[n - 1]]]), e)
        assert _same(e.to_numpy(y_probe)[-1], e.to_numpy(ype)[n - 1])


def _paper_model(**kw):
    """One head, no value/output projection, no norm, no MLP: the setting of Prop. B.9."""
    return init_params(ModelConfig(d=4, n_layers=kw.pop("n_layers", 1), vocab=4, pe="none", norm="none",
                                   value_proj=False, out_proj=False, seed=kw.pop("seed", 11), qk_std=1.0, **kw))


def test_ones_constant_without_positions():
    """1^n: every token identical, so the output is the same for every n in exact arithmetic."""
    P = _paper_model(n_layers=2)
    prec = 200
    r = make_backend("reference", str(prec))
    y = r.to_numpy(forward(P, np.ones(24, int), r))
    # each output is O(n) correctly rounded ops away from the exact (constant) value
    u = 2.0**-prec
    assert np.max(np.abs(y - y[0])) <= 24 * 40 * u * np.max(np.abs(y))
    assert np.any(y[0] != 0)


def test_prop_b9_counting_ratio_only():
    """Prop. B.9 (one layer): without positions, `10` and `1100` get the same last-token
    output; `100` does not. With two layers the statement fails: the second layer sees the
    first layer's outputs of every prefix, and `1100` has a prefix (`110`, ratio 2:1) that
    `10` lacks. The paper states it for any depth; proofs/ records the counterexample."""
    prec = 200
    r = make_backend("reference", str(prec))

    def last(P, seq):
        return r.to_numpy(forward(P, np.array(seq), r))[-1]

    P1 = _paper_model(n_layers=1)
    a, b, c = last(P1, [1, 0]), last(P1, [1, 1, 0, 0]), last(P1, [1, 0, 0])
    tol = 200 * 2.0**-prec * np.max(np.abs(a))
    assert np.max(np.abs(a - b)) <= tol
    assert np.max(np.abs(a - c)) > 1e-6
    P2 = _paper_model(n_layers=2)
    assert np.max(np.abs(last(P2, [1, 0]) - last(P2, [1, 1, 0, 0]))) > 1e-6


def test_first_copy_closed_form():
    """`0 1^n`, one layer, no PE/norm/MLP, value = the token: the distance between n and
    n+1 is ‖v0 − v1‖ · c / ((c+n)(c+n+1)) with c = exp(s0 − s1) the score ratio."""
    P = _paper_model()
    prec = 200
    r = make_backend("reference", str(prec))
    N = 40
    y = forward(P, np.array([0] + [1] * N), r)
    diff = reference_differences(y[1:-1], y[2:], prec)  # y_n − y_{n+1}, n = 1..N−1, at the reference's precision
    scale = float(np.max(np.abs(r.to_numpy(y))))
    with mpmath.workprec(300):
        E = [[mpmath.mpf(float(v)) for v in row] for row in P["embed"]]
        Wq = [[mpmath.mpf(float(v)) for v in row] for row in P["l0.wq"]]
        Wk = [[mpmath.mpf(float(v)) for v in row] for row in P["l0.wk"]]
        d = len(E[0])

        def mv(x, W):
            return [mpmath.fsum(x[i] * W[i][j] for i in range(d)) for j in range(d)]

        q1, k0, k1 = mv(E[1], Wq), mv(E[0], Wk), mv(E[1], Wk)
        s0 = mpmath.fsum(a * b for a, b in zip(q1, k0)) / mpmath.sqrt(d)
        s1 = mpmath.fsum(a * b for a, b in zip(q1, k1)) / mpmath.sqrt(d)
        c = mpmath.exp(s0 - s1)
        K = max(abs(E[0][i] - E[1][i]) for i in range(d))
        for n in range(1, N):
            predicted = K * c / ((c + n) * (c + n + 1))
            observed = max(abs(v) for v in diff[n - 1])
            # each output is within γ_k(2^-prec)·max|y| of its exact value, k = forward_ops(n + 1, d) (the
            # chain length of the theory checks); the 300-bit prediction, ~8d + 8 ops, within γ_{8d+8}(2^-300)
            tol = 2 * gamma(forward_ops(n + 1, d), 2.0**-prec) * scale + gamma(8 * d + 8, 2.0**-300) * predicted
            assert abs(observed - predicted) <= tol, (n, observed - predicted, tol)


def test_families_shapes():
    for name in ["repeat_last", "ones", "first_copy", "zero_ones", "last_copy", "count_bernoulli", "sum_ones"]:
        for sep in (None, 3):
            pr = make_pairs(name, 20, 8, sep=sep)
            assert pr.ns.tolist() == list(range(1, 21))
            for run_i, kind, idx in (pr.a, pr.b):
                run = pr.runs[run_i]
                assert idx.shape == (20,) and idx.max() < run.tokens.size
                assert kind == "y" or run.probe is not None
    with pytest.raises(FamilyError, match="unknown family"):
        make_pairs("nope", 5, 8)
    with pytest.raises(FamilyError, match=">= 1"):
        make_pairs("ones", 0, 8)


def test_save_load_roundtrip(tmp_path):
    P = init_params(ModelConfig(d=8, n_layers=2, d_ff=8, vocab=5, pe="learned", max_len=20))
    P.save(tmp_path / "m")
    Q = Params.load(tmp_path / "m")
    assert Q.config == P.config and all(np.array_equal(P[k], Q[k]) for k in P.arrays)
    bad = dict(P.arrays)
    bad["l0.wq"] = bad["l0.wq"].copy()
    bad["l0.wq"][0, 0] = np.nan
    np.savez(tmp_path / "m.npz", **bad)
    with pytest.raises(ConfigError, match="non-finite"):
        Params.load(tmp_path / "m")


def test_weights_file_written_by_name_loads_into_the_typed_weights(tmp_path):
    """The weights file format is the npz names (``embed``, ``pos``, ``l{ℓ}.wq`` ..., ``n3_g``,
    ``n3_b``): a file written by hand with exactly those names loads, and the forward's typed
    weights (model.Weights, one LayerWeights per layer) hold each array, bit for bit, in its role;
    an array no role takes is refused."""
    import dataclasses
    import json

    from collapse_sim.model import Weights, forward_arrays

    c = ModelConfig(d=4, n_layers=2, vocab=3, pe="learned", max_len=5, d_ff=2, out_proj=True)
    shapes = {"embed": (3, 4), "pos": (5, 4), "n3_g": (4,), "n3_b": (4,)}
    for layer in range(2):
        shapes.update({f"l{layer}.{n}": (4, 4) for n in ("wq", "wk", "wv", "wo")})
        shapes.update({f"l{layer}.{n}": (4,) for n in ("n1_g", "n1_b", "n2_g", "n2_b", "b2")})
        shapes.update({f"l{layer}.w1": (4, 2), f"l{layer}.b1": (2,), f"l{layer}.w2": (2, 4)})
    rng = np.random.default_rng(11)
    arrays = {k: rng.standard_normal(s) for k, s in shapes.items()}  # every array distinct
    (tmp_path / "w.json").write_text(json.dumps(dataclasses.asdict(c)))
    np.savez(tmp_path / "w.npz", **arrays)
    W = Weights.from_arrays(c, forward_arrays(Params.load(tmp_path / "w"), 3))
    got = {"embed": W.embed, "pos": W.pos, "n3_g": W.n3_g, "n3_b": W.n3_b}
    for layer, lw in enumerate(W.layers):
        got.update({f"l{layer}.{f.name}": getattr(lw, f.name) for f in dataclasses.fields(lw)})
    assert got.keys() == arrays.keys()
    for k, a in arrays.items():
        assert np.array_equal(got[k], a), k
    with pytest.raises(ConfigError, match="l2.wq"):
        Weights.from_arrays(c, {**arrays, "l2.wq": arrays["l0.wq"]})


def test_bad_config():
    with pytest.raises(ConfigError, match="positional"):
        ModelConfig(pe="xyz")
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d=10, n_heads=3)
    with pytest.raises(ConfigError, match="token ids"):
        forward(init_params(ModelConfig(d=4, vocab=3, pe="none")), np.array([5]), make_backend("reference", "53"))


@pytest.mark.parametrize("spec", ["128", "arb128"])
def test_interval_backend_encloses_and_certifies(spec):
    """Intervals (mpmath) and balls (arb) contain the 256-bit reference; v vs v* is
    certified distinct in exact arithmetic even where a low-precision format makes the
    two identical."""
    from collapse_sim.backends.interval import certify_distinct, widths

    c = ModelConfig(d=8, n_layers=2, n_heads=2, d_ff=8, vocab=6, pe="none", seed=2)
    P = init_params(c)
    toks = np.array([4, 5, 4, 4, 5, 5, 4, 5])
    iv = make_backend("interval", spec)
    y, yp = forward(P, toks, iv, probe=toks)
    r = make_backend("reference", "256")
    yr = r.to_numpy(forward(P, toks, r))
    if spec.startswith("arb"):
        lo = np.vectorize(lambda v: float(v.lower()))(y)
        hi = np.vectorize(lambda v: float(v.upper()))(y)
    else:
        lo = np.vectorize(lambda v: float(v.a))(y)
        hi = np.vectorize(lambda v: float(v.b))(y)
    assert np.all((lo <= yr) & (yr <= hi))
    assert np.max(widths(y)) < 2.0**-100
    cert = certify_distinct(y, yp)
    assert cert[1:].all()  # n >= 2: v and v* differ in exact arithmetic
    assert not cert[0]  # n = 1 without positions: [a] and [a, a] are the same point exactly
    # and identical intervals are never certified distinct
    assert not certify_distinct(y, y).any()
    # a format coarse enough to merge the pair (the reference at a policy is the emulated
    # arithmetic, bit for bit): identical outputs at lengths where exact ones differ
    e = make_backend("reference", "compute=e2m1fn,order=pairwise")  # fp4: 2 bits
    ye, ype = forward(P, toks, e, probe=toks)
    same = np.all(e.to_numpy(ye) == e.to_numpy(ype), axis=1)
    assert (same & cert).any()


@pytest.mark.parametrize("heads", [1, 2])
def test_arb_attention_encloses_reference_in_every_block_layout(monkeypatch, heads):
    """The arb attention (scores and weighted values as ball-matrix products, no shift
    before exp, query rows in blocks) encloses the 256-bit reference with ALiBi, a
    sliding window, out projections and probes, whether the queries go in one block,
    in blocks of two rows or one row at a time; and the enclosures stay tight."""
    from collapse_sim.backends.interval import ArbBackend, widths

    c = ModelConfig(d=8, n_layers=2, n_heads=heads, d_ff=8, vocab=6, pe="alibi", window=3, out_proj=True, seed=3)
    P = init_params(c)
    toks = np.random.default_rng(3).integers(0, 6, 12)
    r = make_backend("reference", "256")
    ref = [r.to_numpy(y) for y in forward(P, toks, r, probe=toks)]
    for qblock in (ArbBackend._QBLOCK, 2 * len(toks), 1):
        monkeypatch.setattr(ArbBackend, "_QBLOCK", qblock)
        be = make_backend("interval", "arb256")
        for y, yr in zip(forward(P, toks, be, probe=toks), ref):
            lo = np.vectorize(lambda v: float(v.lower()))(y)
            hi = np.vectorize(lambda v: float(v.upper()))(y)
            assert np.all((lo <= yr) & (yr <= hi)), qblock
            assert np.max(widths(y)) < 2.0**-100


def test_sharded_attention_equals_unsharded_on_four_fake_devices():
    """The emulated attention's query axis split over 4 devices (XLA's fake host
    devices, set before JAX starts, hence a subprocess) gives the same bits, probes
    included (one policy: the split is of the query axis, which no policy changes); and
    a certified attention whose uncertified rows are redone (by the host callback, on
    the devices that hold them) gives the unsharded bits too."""
    import os
    import subprocess
    import sys

    code = '''
import collapse_sim as cs
cs.enable_x64()
import jax, numpy as np
from collapse_sim.backends.emulated import EmulatedBackend
from collapse_sim.model import ModelConfig, forward, init_params
assert jax.device_count() == 4, jax.device_count()
P = init_params(ModelConfig(d=8, n_layers=2, n_heads=2, vocab=6, pe="sinusoidal", seed=1))
toks = np.random.default_rng(0).integers(0, 6, 37)
for pol in ["compute=fp16,accumulate=fp32,order=sequential"]:
    a, b = EmulatedBackend(pol), EmulatedBackend(pol, shard=True)
    assert b.shard and a.label != b.label
    for u, w in zip(forward(P, toks, a, probe=toks), forward(P, toks, b, probe=toks)):
        u, w = np.asarray(u), np.asarray(w)
        assert u.shape == w.shape and np.array_equal(u.view(np.uint64), w.view(np.uint64)), pol
from collapse_sim.backends import emulated
from collapse_sim.backends.inputs import AttentionInputs
emulated.attention.CERTIFIED_MIN_TERMS = 0
pol = "compute=(p=3,emax=100),order=exact"
a, b = EmulatedBackend(pol), EmulatedBackend(pol, shard=True)
rng = np.random.default_rng(5)
q, k, v = (rng.standard_normal((40, 8)) for _ in range(3))
q[:3, :2], q[30, :2], k[:, 0], k[:, 1] = 2.0**40, 2.0**40, 2.0**40, -(2.0**40)
q, k, v = (a.store(x) for x in (q, k, v))
_, ok = emulated._certified_attention(a.emu, AttentionInputs(q, k, v, jax.numpy.arange(40), 0.5), tighter=True)
assert np.flatnonzero(~np.asarray(ok)).tolist() == [0, 1, 2, 30], ok  # rows redone on two devices
att = lambda be: jax.jit(lambda q, k, v: be.attention(AttentionInputs(q, k, v, np.arange(40), 0.5)))(q, k, v)
u, w = np.asarray(att(a)), np.asarray(att(b))
assert np.array_equal(u.view(np.uint64), w.view(np.uint64)), pol
print("ok")
'''
    env = {**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=4".strip()}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_one_compile_per_policy_and_shape():
    """Repeated forwards at one (policy, shape) compile once: XLA's backend compiles and the
    programs loaded from the persistent cache are counted (compilation.snapshot: jax.monitoring;
    the suite shares one cache, so another test may have compiled the program first). The first
    native run at each length compiles the shape's small eager helpers (token conversion); after
    it, a new emulated policy costs exactly one compile or load per length, and repeated calls
    (other tokens, other weights of the same architecture) none."""
    cfg = ModelConfig(d=4, n_layers=1, vocab=6, pe="none", norm="none")
    weights = [init_params(ModelConfig(**{**cfg.__dict__, "seed": s})) for s in (0, 1)]
    rng = np.random.default_rng(0)
    emulated = make_backend("emulated", "compute=bf16,order=pairwise")
    for n in (8, 12):
        forward(weights[0], rng.integers(0, 6, n), make_backend("native", "fp32"))
        before = snapshot()
        forward(weights[0], rng.integers(0, 6, n), emulated)
        new = snapshot().since(before)
        assert new.compiled + new.cache_hits == 1, f"n={n}: the new (policy, shape) compiled or loaded {new}"
        before = snapshot()
        for p in weights + weights:
            forward(p, rng.integers(0, 6, n), emulated)
        new = snapshot().since(before)
        assert new.compiled + new.cache_hits == 0, f"n={n}: repeated calls compiled or loaded {new}"


def test_scanned_layers_equal_the_unrolled_loop():
    """The emulated forward runs its layers as one ``lax.scan`` over stacked weights
    (model._scan_layers): the same bits as the layers unrolled, here with three layers, a sink
    token, learned positions and probes (a stacking or carry mistake changes the output)."""
    from collapse_sim.backends._jit import run_jitted
    from collapse_sim.model import _forward_impl, _with_sink, forward_arrays, weights_role

    c = ModelConfig(d=4, n_layers=3, vocab=4, seed=7, pe="learned", max_len=16, sink=True, d_ff=4)
    P, toks = init_params(c), TOKS[:6]
    be = make_backend("emulated", "compute=bf16,order=sequential")
    scanned = forward(P, toks, be, probe=np.roll(toks, -1))
    t, pr = _with_sink(toks, np.roll(toks, -1))
    arrays = weights_role(forward_arrays(P, t.size + 1, int(max(t.max(), pr.max())) + 1), be)
    unrolled = run_jitted(be, _forward_impl, c, arrays, t, pr)
    for a, b in zip(scanned, unrolled):
        assert np.array_equal(np.asarray(a), np.asarray(b)[1:])


_FORCED = {  # model-independent paths that otherwise take sizes beyond a small test
    "certified": lambda mp, attention, schedule: mp.setattr(attention, "CERTIFIED_MIN_TERMS", 0),
    "key chunks": lambda mp, attention, schedule: (mp.setattr(attention, "KEY_CHUNK", 4),
                                                   mp.setattr(attention, "KEY_CHUNK_ROWS", 4)),
    "segments": lambda mp, attention, schedule: mp.setattr(schedule, "_QUERIES_PER_SEGMENT", {False: 4, True: 4}),
}


@pytest.mark.parametrize("cfg,policy,force,shared", [
    (dict(pe="rope", n_heads=2, d_ff=8, n_layers=2), "compute=bf16,order=pairwise", None, None),
    (dict(pe="alibi", window=5, ssmax=0.5), "compute=(p=6,emax=20),accumulate=(p=12,emax=40),order=blocked(3)",
     None, None),
    (dict(pe="sinusoidal", ape="scores", sink=True), "compute=fp16,accumulate=fp32,softmax=fp32,order=sequential",
     None, None),
    (dict(pe="learned", max_len=32, adaptive_temperature=True), "compute=bf16,order=kahan,mode=rz", None, None),
    (dict(pe="rope", rope_fraction=0.5), "compute=bf16,kernel=online(4)", None, None),
    (dict(pe="none"), "storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32,kernel=flash2(4)", None, None),
    (dict(pe="rope"), "compute=bf16,operands=mx(e4m3fn,4)", None, None),
    (dict(kind="gaussian", pe="sinusoidal", sin_at="qk", norm="none"), "compute=bf16,order=exact", None, None),
    (dict(pe="rope", n_heads=2, d_ff=8), "compute=bf16,order=exact", "certified", None),
    (dict(pe="alibi", window=6), "compute=bf16,mode=rd", "key chunks", None),
    (dict(pe="rope", d_ff=8), "storage=fp16,compute=fp16,accumulate=fp32,order=tcfma-v100", "segments", None),
    (dict(pe="sinusoidal"), "storage=e4m3fn,compute=fp32,accumulate=fp32,softmax=fp32,order=promote-h800",
     "segments", None),
    (dict(pe="rope", sink=True), "compute=fp16", None, True),
])
def test_merged_probe_rows_give_the_separate_bits(cfg, policy, force, shared, monkeypatch):
    """The emulated backend computes probes as rows of the stream's calls (model._rows,
    docs/semantics.md §10): every output bit, ±0 aside (a merged stream row has one more trailing
    masked column, §3.3), is that of the stream and the probes computed as separate calls (the path
    kept for stochastic rounding), on every kernel, several orders, the certified path, key chunks,
    causal segments and the shared program (formats as data)."""
    from collapse_sim.backends import _jit
    from collapse_sim.backends.emulated import EmulatedBackend, attention, schedule

    c = ModelConfig(d=8, vocab=4, seed=5, **cfg)
    P, probe = init_params(c), np.roll(TOKS, -1)
    if force:
        _FORCED[force](monkeypatch, attention, schedule)
    be = EmulatedBackend(policy, shared=shared)
    assert be.merges_probes
    assert (attention.key_chunk(be.emu, TOKS.size + 1) > 0) == (force == "key chunks")
    assert (schedule._segments_of(be.emu, np.arange(TOKS.size), 8) > 1) == (force == "segments")
    _jit._compiled.cache_clear()  # the compiled forwards' key holds neither the merging nor the forced paths
    try:
        merged = forward(P, TOKS, be, probe=probe)
        monkeypatch.setattr(EmulatedBackend, "merges_probes", False)
        _jit._compiled.cache_clear()
        separate = forward(P, TOKS, EmulatedBackend(policy, shared=shared), probe=probe)
    finally:
        _jit._compiled.cache_clear()
    for a, b in zip(merged, separate):
        a, b = (np.where(np.asarray(x) == 0, 0.0, np.asarray(x)).astype(np.asarray(x).dtype) for x in (a, b))
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes()
