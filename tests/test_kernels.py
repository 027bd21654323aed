"""The attention kernels of a policy (docs/semantics.md §8.8): ``online(b)`` runs the
keys in blocks with a running maximum, denominator and output; ``flash2(b)`` is its
FlashAttention-2 recipe (base-2 scores, exp2, the probability tile in storage, §8.8.1);
``flash3fp8(b)`` FlashAttention-3's FP8 recipe (Q, K, V and the tile in e4m3fn with one scale
per head, exponentials offset by 2^8, the blocks last first, §8.8.2)."""

from __future__ import annotations

import dataclasses
import math
import re
from fractions import Fraction

import mpmath
import numpy as np
import pytest

from collapse_sim.backends import make_backend
from collapse_sim.backends.reference import ReferenceBackend
from collapse_sim.backends.reference.arith import times_log2e
from collapse_sim.formats import parse
from collapse_sim.model import ModelConfig, forward, init_params
from collapse_sim.policy import FP8_TILE, Kernel, Policy, PolicyError
from collapse_sim.backends.inputs import AttentionInputs
from collapse_sim.theory import forward_ops, gamma
from oracles import fraction_round
from test_model import TOKS, _same, assert_emulated_equals_reference  # N = 12: only b = 2, 3, 4, 6 divide it


@pytest.mark.parametrize("cfg, policy", [
    (dict(pe="rope", n_heads=2), "compute=bf16,order=pairwise,kernel=online(5)"),
    (dict(pe="alibi", window=6), "compute=fp16,accumulate=fp32,softmax=fp32,order=kahan,mode=rd,kernel=online(7)"),
    (dict(pe="sinusoidal"), "compute=(p=5,emax=15),accumulate=(p=9,emax=30),order=exact,kernel=online(5)"),
    (dict(pe="rope", n_heads=2), "compute=bf16,order=pairwise,kernel=flash2(5)"),
    (dict(pe="alibi", window=6), "storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32,kernel=flash2(7)"),
    (dict(pe="alibi", window=6), "storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32,kernel=flash3fp8(5)"),
    (dict(pe="rope", n_heads=2), "compute=bf16,order=pairwise,kernel=flash3fp8(7)"),
], ids=["bf16-pairwise-b5", "fp16-fp32acc-kahan-rd-window-alibi-b7", "custom-exact-b5", "flash2-bf16-pairwise-b5",
        "flash2-bf16-storage-fp32-window-alibi-b7", "flash3fp8-bf16-storage-fp32-window-alibi-b5",
        "flash3fp8-bf16-pairwise-b7"])
def test_online_kernel_emulated_equals_reference(cfg, policy):
    """Full forwards (L = 2, d = 8, N = 12, with probes) under the online, flash2 and flash3fp8
    kernels: the emulated backend gives the mpmath reference's bits, with blocks that do not
    divide N. The fp32 cases are the realistic kernels: fp32 arithmetic, the tile cast to bf16
    (flash2) or Q, K, V and the tile to e4m3fn (flash3fp8), with the folded ALiBi biases and a
    window (blocks skipped); flash3fp8 in bf16 rounds its scales, l and o to bf16 too."""
    assert_emulated_equals_reference(ModelConfig(d=8, n_layers=2, vocab=4, seed=5, **cfg), policy)


def test_online_kernel_differs_from_naive_in_low_precision():
    """The kernel is not a relabelling: in bf16 with a block of 2 the running rescales
    move some output bits away from the naive softmax's (and the naive policy's program
    is not reused for the online one)."""
    c = ModelConfig(d=8, n_layers=1, vocab=4, seed=5)
    P = init_params(c)
    naive = make_backend("emulated", "compute=bf16,order=sequential")
    online = make_backend("emulated", "compute=bf16,order=sequential,kernel=online(2)")
    a, b = naive.to_numpy(forward(P, TOKS, naive)), online.to_numpy(forward(P, TOKS, online))
    assert not _same(a, b)


@pytest.mark.parametrize("kernel", [Kernel("online", 3), Kernel("flash2", 3)], ids=str)
def test_online_kernel_agrees_with_naive_at_256_bits(kernel):
    """In 256-bit arithmetic the online (flash2) kernel and the naive softmax are the same function
    up to rounding: each output is within the two evaluations' error bounds of the exact
    value, γ_k(2^-256)·max|y| each with k an op count of the longest chain (§8.8: per block
    a max, two exps, a sum and a dot of ≤ N terms, a product and an add; N/b + 1 blocks,
    and the model's other ops, generously 64(N + d) per layer as in the theory checks). For
    flash2 the folded scale is σ_64·log2 e to 2^-256 relative (§8.8.1), so its base-2 scores
    are the naive kernel's natural ones times log2 e up to a few more such roundings."""
    c = ModelConfig(d=8, n_layers=2, vocab=4, seed=5, pe="rope")
    P = init_params(c)
    naive = ReferenceBackend("256")
    online = ReferenceBackend(dataclasses.replace(naive.ref.policy, kernel=kernel))
    a, b = (np.asarray(forward(P, TOKS, be)).ravel() for be in (naive, online))  # mpf values, not float64s
    N, d = TOKS.size, c.d
    k = forward_ops(N, d, c.n_layers)
    with mpmath.workprec(600):
        ma, mb = [mpmath.mpf(x) for x in a], [mpmath.mpf(x) for x in b]
        diff = max(abs(x - y) for x, y in zip(ma, mb))
        tol = 2 * gamma(k, mpmath.mpf(2) ** -256) * max(abs(x) for x in ma)
        assert 0 < diff <= tol, (diff, tol)  # 0 < : two different evaluations, each rounded


def test_kernel_grammar():
    p = Policy.parse("compute=bf16,kernel=online(64)")
    assert p.kernel == Kernel("online", 64) and str(p).endswith(",kernel=online(64)")
    assert Policy.parse(str(p)) == p
    assert "kernel" not in str(Policy.parse("bf16"))  # the naive kernel leaves the policy's name as it was
    f = Policy.parse("storage=bf16,compute=fp32,kernel=flash2(64)")
    assert f.kernel == Kernel.parse("flash2(64)") == Kernel("flash2", 64) and str(f.kernel) == "flash2(64)"
    assert Policy.parse(str(f)) == f and str(f).endswith(",kernel=flash2(64)")
    g = Policy.parse("storage=bf16,compute=fp32,kernel=flash3fp8(64)")
    assert g.kernel == Kernel.parse("flash3fp8(64)") == Kernel("flash3fp8", 64) and str(g.kernel) == "flash3fp8(64)"
    assert Policy.parse(str(g)) == g and str(g).endswith(",kernel=flash3fp8(64)")
    for bad, says in [("online", "block size: online"), ("online(0)", ">= 1"), ("flash", "unknown attention kernel"),
                      ("flash2", "block size: flash2"), ("flash2(0)", "flash2 kernel needs a key block size >= 1"),
                      ("flash3(64)", "flash3fp8"), ("flash3fp8", "block size: flash3fp8"),
                      ("flash3fp8(0)", "flash3fp8 kernel needs a key block size >= 1")]:
        with pytest.raises(PolicyError, match=says) as err:
            Policy.parse(f"compute=bf16,kernel={bad}")
        assert not re.search(r"[.!?]\s+[A-Z]", str(err.value))  # one sentence
    for k in ("online(4)", "flash2(4)", "flash3fp8(4)"):
        with pytest.raises(PolicyError, match="max_subtract=true"):
            Policy.parse(f"compute=bf16,max_subtract=false,kernel={k}")


def test_kernel_refused_where_it_cannot_run(tmp_path):
    """Native formats run what XLA does, so a kernel other than naive is refused for them
    (fp64 always runs natively), in one sentence, before anything is written."""
    from collapse_sim.backends import backend_for_format
    from collapse_sim.cli import main
    from collapse_sim.errors import CollapseSimError

    with pytest.raises(CollapseSimError, match="drop it from the formats"):
        backend_for_format("emulated", "fp64", kernel="online(4)")
    with pytest.raises(CollapseSimError, match="emulated or reference backend"):
        backend_for_format("native", "bf16", kernel="online(4)")
    assert backend_for_format("emulated", "bf16", kernel="online(4)").emu.kernel == Kernel("online", 4)
    out = tmp_path / "never"
    assert main(["collapse", "--family", "repeat_last", "--format", "bf16,fp64", "--kernel", "online(4)",
                 "--max-len", "8", "--out", str(out)]) == 2
    assert not out.exists()


U_BF16 = 2.0 ** -8  # unit roundoff of the storage format the tile is cast to
U_FP32 = 2.0 ** -24


def _flash2_attention(storage: str, b: int, q, k, v):
    """The flash2(b) attention (reference) of queries at positions 0..N-1 over N keys, fp32
    arithmetic, the tile rounded to ``storage``, with the scale fl64(ln 2): its folded
    constant is ∘_S(fl64(ln 2)·log2 e) = 1 in bf16 and in fp32 alike, so two storage formats
    differ in the tile's rounding and nothing else."""
    pol = f"storage={storage},compute=fp32,accumulate=fp32,softmax=fp32,kernel=flash2({b})"
    be = ReferenceBackend(pol)
    st = be.ref.storage
    assert mpmath.mpf(st.round(times_log2e(math.log(2), st.work))) == 1
    pos = np.arange(q.shape[0])
    return be.to_numpy(be.attention(AttentionInputs(*(be.ref.store(x) for x in (q, k, v)), pos, math.log(2))))


def test_flash2_tile_in_bf16_moves_each_weight_by_one_rounding():
    """FlashAttention-2 casts its probability tile P to bf16 for P·V while its running sum l
    adds the fp32 tile. With fp32 arithmetic everywhere else, flash2 with P in bf16 (o_b) and
    the same kernel with P in fp32 (o_f, the online recipe in base 2) share every score,
    exp2, r and l; only the products P·V differ. Write w_j = R_j·e_j/l for the fp32 run's
    weights (R_j the product of the later blocks' r) and W[c] = Σ_j w_j·|v_j[c]|. Each term of
    o passes through K = 1 + ⌈log2 b⌉ + 2·nb roundings in fp32 (its product, the block's
    pairwise sum, a product and an add per later block) and the division through one more,
    so o_X[c] = Σ_j w^X_j·v_j[c]·(1 + θ_j), |θ_j| <= γ_{K+1}(2^-24), with w^b_j = w_j·∘_bf16(e_j)/e_j,
    |∘_bf16(e_j)/e_j − 1| <= u' = u/(1 + u), u = 2^-8 (every e_j here is normal). Hence

        |o_b − o_f|[c] <= Σ_j R_j·|∘_bf16(e_j) − e_j|·|v_j[c]|/l + (2 + u')·γ_{K+1}·W[c]
                       <= (u' + (2 + u')·γ_{K+1})·W[c],

    and W[c] <= o_f(|v|)[c] / (1 − γ_{K+1}), o_f(|v|) the fp32 run on |v| (same weights).
    Checked for random values, and for v = I (N = d_h), where o[c] is the weight of key c
    itself and the bound holds weight by weight (a tile truncated to bf16, relative error up
    to 2u, fails it); observed > the fp32 part alone (the tile's rounding is what moves o).
    Rows of ones show the weights do not sum to 1: o_f(1) = Σ_j w_j·(1+θ_j) with
    l = Σ_j R_j e_j (1 + φ_j), |φ_j| <= γ_{K'}, K' = ⌈log2 b⌉ + 2·nb = K − 1, so
    |o_f(1) − 1| <= γ_{2K}; the bf16 tile's row sum misses 1 by far more."""
    rng = np.random.default_rng(3)
    n, b = 24, 7  # d_h = n, so that v = I fits
    bf16 = ReferenceBackend("bf16")  # bf16 inputs: the same values in both storage formats
    q, k, v = (bf16.to_numpy(bf16.ref.store(rng.standard_normal((n, n)) * s)) for s in (0.5, 0.5, 1.0))
    nb = -(-n // b)
    K = 1 + math.ceil(math.log2(b)) + 2 * nb
    g = gamma(K + 1, U_FP32)
    up = U_BF16 / (1 + U_BF16)
    for vals in (v, np.eye(n)):
        ob, of = _flash2_attention("bf16", b, q, k, vals), _flash2_attention("fp32", b, q, k, vals)
        W = _flash2_attention("fp32", b, q, k, np.abs(vals)) / (1 - g)
        diff = np.abs(ob - of)
        assert np.all(diff <= (up + (2 + up) * g) * W), float(np.max(diff[W > 0] / W[W > 0]))
        assert np.max(diff[W > 0] / W[W > 0]) > 10 * (2 + up) * g  # the tile's rounding, not fp32 noise, moves o
    ones = np.ones((n, n))
    sb, sf = _flash2_attention("bf16", b, q, k, ones)[:, 0], _flash2_attention("fp32", b, q, k, ones)[:, 0]
    g1 = gamma(2 * K, U_FP32)
    assert np.all(np.abs(sf - 1) <= g1), float(np.max(np.abs(sf - 1)))
    assert np.max(np.abs(sb - 1)) > 10 * g1, float(np.max(np.abs(sb - 1)))  # Σ_j ∘_bf16(P_j)/l != 1


U_E4M3 = 2.0 ** -4  # unit roundoff of e4m3fn (p = 4)
HALF_SUB_E4M3 = 2.0 ** -10  # half the smallest subnormal of e4m3fn: the largest rounding error below 2^-6


def _dequantised(x):
    """What flash3fp8's quantisation makes of ``x`` (one head's query, or the keys or values of a
    prefix; §8.8.2 1), from an exact rational rounding (tests/oracles.py), not from the backends:
    s·∘_E(x/s) with s = amax/448 exact, and s."""
    s = max(Fraction(abs(float(y))) for y in np.ravel(x)) / 448
    deq = np.vectorize(lambda y: s * Fraction(fraction_round(Fraction(float(y)) / s, FP8_TILE, "rne")), otypes=[object])
    return deq(x), s


def test_flash3fp8_agrees_with_naive_at_256_bits_within_the_fp8_bound():
    """At 256 bits the flash3fp8 attention (b = 5, N = 12 queries and keys, d_h = 8) differs from
    the naive softmax by the e4m3fn quantisation of Q, K, V and P alone; every other op is
    rounded to 2^-256 (the slack γ_k(2^-256)·max|o| twice, k = 64(N + d_h) as in the online
    kernels' test). Per row i, with s_X = amax/448 and x̃ = s_X·∘_E(x/s_X) the dequantised
    inputs, |x̃ − x| <= Δx = u|x| + s_X·η (u = 2^-4; η = 2^-10, half the smallest subnormal,
    for values below 2^-6).

    Sharp part (the tile). The kernel's output is o = Σ_j R_j P_j ṽ_j / l, l = Σ_j R_j e_j, with
    P_j = ∘_E(e_j), |P_j − e_j| <= u·e_j + η, and R_j e_j / l = ŵ_j, the softmax of the
    scores σ·q̃·k̃ (exactly computable from the oracle's q̃, k̃): so |o − Σ_j ŵ_j ṽ_j| <=
    Σ_j (u·ŵ_j + η·R_j/l)·|ṽ_j|, and R_j/l <= 2^-8 because the key with the largest score has
    R·e = 2^8 exactly (the offset of §8.8.2 4), and no rounding error (it is left out).
    Observed <= bound, and some entry exceeds half of it (the bound halved fails).

    Whole bound (Q, K, V and P from u and η only). The score of key j moves by at most
    E_j = σ·Σ_c (Δq_c|k_j[c]| + |q_c|Δk_j[c] + Δq_cΔk_j[c]), so with the exact weights α_j,
    Z± = Σ_k α_k e^(±E_k): ŵ_j ∈ [α_j e^(−E_j)/Z+, α_j e^(E_j)/Z−], and
    |o − o_naive| <= Σ_j (u·ŵ_j^max + η/2^8 + |ŵ_j − α_j|^max)(|v_j| + Δv_j) + α_j·Δv_j."""
    rng = np.random.default_rng(3)
    n, dh, b = 12, 8, 5
    u, eta = U_E4M3, HALF_SUB_E4M3
    q, k, v = (rng.standard_normal((n, dh)) * s for s in (1.5, 1.5, 1.0))
    sigma = 1 / np.sqrt(dh)
    naive = ReferenceBackend("256")
    fp8 = ReferenceBackend(dataclasses.replace(naive.ref.policy, kernel=Kernel("flash3fp8", b)))
    pos = np.arange(n)
    a, o = (be.attention(AttentionInputs(*(be.ref.store(x) for x in (q, k, v)), pos, sigma)) for be in (naive, fp8))
    sharp, whole = [], []
    with mpmath.workprec(600):
        mp = lambda x: mpmath.mpf(x.numerator) / x.denominator if isinstance(x, Fraction) else mpmath.mpf(x)  # noqa: E731
        a, o = np.vectorize(mp, otypes=[object])(a), np.vectorize(mp, otypes=[object])(o)
        slack = 2 * gamma(forward_ops(n, dh), mpmath.mpf(2) ** -256) * max(abs(x) for x in a.ravel())

        def softmax(x):
            e = [mpmath.exp(y - max(x)) for y in x]
            return [y / mpmath.fsum(e) for y in e]

        for i in range(n):
            (qt, sq), (kt, sk), (vt, sv) = _dequantised(q[i]), _dequantised(k[:i + 1]), _dequantised(v[:i + 1])
            st = [sigma * mpmath.fsum(mp(qt[c]) * mp(kt[j, c]) for c in range(dh)) for j in range(i + 1)]
            w, top = softmax(st), int(np.argmax([float(x) for x in st]))
            alpha = softmax([sigma * mpmath.fsum(mp(q[i, c]) * mp(k[j, c]) for c in range(dh)) for j in range(i + 1)])
            dq = [u * abs(mp(x)) + mp(sq) * eta for x in q[i]]
            E = [sigma * mpmath.fsum(dq[c] * abs(mp(k[j, c])) + abs(mp(q[i, c])) * dk + dq[c] * dk
                                     for c, dk in enumerate(u * abs(mp(x)) + mp(sk) * eta for x in k[j]))
                 for j in range(i + 1)]
            zp = mpmath.fsum(al * mpmath.exp(e) for al, e in zip(alpha, E))
            zm = mpmath.fsum(al * mpmath.exp(-e) for al, e in zip(alpha, E))
            for c in range(dh):
                tile = mpmath.fsum((u * w[j] + eta / 256) * abs(mp(vt[j, c])) for j in range(i + 1) if j != top) + slack
                sharp.append((abs(o[i, c] - mpmath.fsum(w[j] * mp(vt[j, c]) for j in range(i + 1))), tile))
                bound = slack
                for j in range(i + 1):
                    hi, lo = alpha[j] * mpmath.exp(E[j]) / zm, alpha[j] * mpmath.exp(-E[j]) / zp
                    dv = u * abs(mp(v[j, c])) + mp(sv) * eta
                    bound += (u * hi + eta / 256 + max(hi - alpha[j], alpha[j] - lo)) * (abs(mp(v[j, c])) + dv)
                    bound += alpha[j] * dv
                whole.append((abs(o[i, c] - a[i, c]), bound))
    for pairs in (sharp, whole):
        assert all(d <= bd for d, bd in pairs), max(float(d / bd) for d, bd in pairs)
    assert max(float(d / bd) for d, bd in sharp) > 0.5  # the tile's bound is sharp: halved, it fails
    assert max(float(d / bd) for d, bd in whole) > 0.01  # the quantisation moves o: the check is not vacuous


def _flash3fp8_last_row(keys, values, b):
    """The flash3fp8(b) output (reference, fp32 arithmetic, bf16 storage) of the query (1, 0) at the
    last position over ``keys`` and ``values`` (N, 2), scale fl64(1/√2)."""
    be = ReferenceBackend(f"storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32,kernel=flash3fp8({b})")
    n = len(keys)
    q = np.array([[1.0, 0.0]])
    return be.to_numpy(be.attention(AttentionInputs(*(be.ref.store(x) for x in (q, keys, values)), np.array([n - 1]),
                                                   1 / np.sqrt(2))))[0]


def test_flash3fp8_tile_underflow_loses_values_after_the_maximum():
    """FlashAttention-3's FP8 tile: e = 2^(s − m' + 8) against the running maximum m' of the blocks
    visited so far (last block first), and P = ∘_e4m3fn(e) is 0 for every e <= 2^-10, half the
    smallest subnormal (§8.8.2): a key scoring more than 18 below m' (base 2) adds its e to l
    but nothing to o. One key of score σ2·10·1 (the sink; k = (10, 0), v = (1, −1)) and eleven of
    score −σ2·10 (k = (−10, 0)), σ2 = ∘_bf16(log2(e)/√2) ≈ 1.02: 20.4 apart, blocks of 4, N = 12.
    Sink last (column 11, in the first block visited): every other tile entry is 0, and the
    output equals, bit for bit, the one with their values set to 0 (|v| <= 1 keeps every scale).
    Sink first (column 0, in the last block visited): the keys of the other blocks were cast
    against their own maximum (P = 256), and after the rescale r = 2^-20.4 in fp32 their values
    still move the output; only the sink's block mates (columns 1-3) are lost."""
    rng = np.random.default_rng(0)
    n, b = 12, 4
    others = rng.uniform(-1, 1, (n, 2))
    for sink in (n - 1, 0):
        keys = np.tile([-10.0, 0.0], (n, 1))
        keys[sink] = [10.0, 0.0]
        values = others.copy()
        values[sink] = [1.0, -1.0]
        out = _flash3fp8_last_row(keys, values, b)
        lost = [j for j in range(n) if j != sink and (sink == n - 1 or j // b == sink // b)]
        kept = [j for j in range(n) if j != sink and j not in lost]
        zeroed = values.copy()
        zeroed[lost] = 0.0
        assert _same(out, _flash3fp8_last_row(keys, zeroed, b)), (sink, lost)
        if kept:
            moved = values.copy()
            moved[kept] = -values[kept]
            assert not _same(out, _flash3fp8_last_row(keys, moved, b)), (sink, kept)


@pytest.mark.parametrize("kernel", ["flash2(4)", "flash3fp8(64)"])
def test_kernel_cli_and_backend_for_format(kernel, tmp_path):
    """``collapse --kernel flash2(b)`` and ``--kernel flash3fp8(b)`` run end to end (reference
    bf16, a short stream) and backend_for_format passes the kernel through."""
    from collapse_sim.backends import backend_for_format
    from collapse_sim.cli import main

    assert backend_for_format("reference", "bf16", kernel=kernel).policy.kernel == Kernel.parse(kernel)
    out = tmp_path / "run"
    assert main(["collapse", "--family", "repeat_last", "--format", "bf16", "--backend", "reference",
                 "--kernel", kernel, "--max-len", "6", "--out", str(out)]) == 0
    assert kernel in (out / "collapse.json").read_text()


def test_block_of_minus_infinity_scores_changes_nothing():
    """§8.8: a block whose visible scores are all -inf before any finite maximum changes
    nothing, on both backends (here the first key scores -inf in p = 5, emax = 15:
    200·(-400) overflows), and a block wider than the keys is one block. The reference
    gave NaN for row 1 before blocks of -inf were skipped. flash3fp8 visits the -inf block
    last, as a later term, and its empty row 0 is NaN through its epilogue 0·(1/0); it runs
    with fp32 accumulate and softmax, as the kernel does (with M = p = 5, ∘_M(m − 8) rounds
    the tie 296 to 288 and the offset exponential 2^16 overflows M)."""
    import jax.numpy as jnp

    from collapse_sim.backends.emulated import _emulated_attention

    for kern in ("online(1)", "flash2(1)", "flash3fp8(1)", "online(1000)"):
        wide = ",accumulate=fp32,softmax=fp32" if kern.startswith("flash3fp8") else ""
        pol = f"compute=(p=5,emax=15){wide},kernel={kern}"
        e, r = make_backend("emulated", pol), make_backend("reference", pol)
        q, k, v = ([[200.0], [200.0]], [[-400.0], [1.0]], [[1.0], [2.0]])
        got = np.asarray(_emulated_attention(e.emu, AttentionInputs(*(e.store(np.array(a)) for a in (q, k, v)),
                                                                 jnp.arange(2), 1.0)), np.float64)
        want = r.to_numpy(r.attention(AttentionInputs(*(r.store(np.array(a)) for a in (q, k, v)), np.arange(2), 1.0)))
        # row 0 sees only the -inf score: no finite maximum, 0/0 on both; row 1 skips it
        assert np.isnan(want[0]).all() and np.isfinite(want[1]).all() and _same(got, want), (kern, got, want)


@pytest.mark.parametrize("kern", ["naive", "online(2)", "flash3fp8(2)"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_later_value_never_reaches_an_earlier_row(kern, bad):
    """§3.3 and §10: row i depends on positions 0..i only; a later key's product is an exact
    zero in place, whatever its value holds. A NaN or inf value at the last position leaves
    every earlier row finite and equal on both backends (the emulated weighted sum once took
    0·NaN = NaN from columns past the row's position)."""
    import jax.numpy as jnp

    from collapse_sim.backends.emulated import _emulated_attention

    pol = f"storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32,kernel={kern}"
    e, r = make_backend("emulated", pol), make_backend("reference", pol)
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((6, 2)) for _ in range(3))
    v[-1, 0] = bad
    got = np.asarray(_emulated_attention(e.emu, AttentionInputs(*(e.store(a) for a in (q, k, v)), jnp.arange(6), 0.5)),
                     np.float64)
    want = r.to_numpy(r.attention(AttentionInputs(*(r.store(a) for a in (q, k, v)), np.arange(6), 0.5)))
    assert np.isfinite(want[:-1]).all() and _same(got, want), (got, want)


@pytest.mark.parametrize("probes", [False, True], ids=["stream", "probes"])
def test_flash3fp8_rows_sharing_scales_and_not_give_the_reference_bits(probes, monkeypatch):
    """§8.8.2 1: each row's K and V scales come from its own prefix. The emulated kernel runs a
    block of query rows in groups that share both amaxes (the stream's keys and values quantised
    once per group); here blocks of 2 rows over keys whose running amax grows at positions 3 and 7
    (and, with probes, at some probes' own keys), so some blocks are one group and some two, and
    every row gives the reference's bits."""
    import jax.numpy as jnp

    from collapse_sim.backends.emulated import _emulated_attention
    from collapse_sim.backends.emulated import attention as emulated_attention

    n, dh = 12, 4
    rng = np.random.default_rng(3)
    q, k, v = (rng.uniform(-1, 1, (n, dh)) for _ in range(3))
    k[3, 1], v[3, 2], k[7, 0], v[7, 3] = 3.0, -5.0, -9.0, 17.0  # the running amaxes step at rows 3 and 7
    skv = None
    if probes:
        kp, vp = (rng.uniform(-1, 1, (n, dh)) for _ in range(2))
        kp[4, 2], vp[9, 1] = 40.0, -60.0  # a probe above its prefix's amax: a group of one row
        skv = (kp, vp)
    monkeypatch.setattr(emulated_attention, "_BLOCK_ELEMS", 2 * (n + probes) * dh)  # 2 query rows per block
    pol = "storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32,kernel=flash3fp8(5)"
    e, r = make_backend("emulated", pol), make_backend("reference", pol)
    pos = np.arange(n) + probes  # a probe after the stream's rows 0..n
    amax_k = np.maximum.accumulate(np.abs(e.to_numpy(e.store(k))).max(axis=1))
    groups = [len(set(amax_k[pos[i:i + 2] - probes])) for i in range(0, n, 2)]
    assert 1 in groups and 2 in groups, groups  # blocks of one group and of two

    def inputs(be, p):
        st = lambda a: be.store(np.array(a))  # noqa: E731
        return AttentionInputs(st(q), st(k), st(v), p, 0.5, self_kv=None if skv is None else (st(skv[0]), st(skv[1])))

    got = np.asarray(_emulated_attention(e.emu, inputs(e, jnp.asarray(pos))), np.float64)
    want = r.to_numpy(r.attention(inputs(r, pos)))
    assert np.isfinite(want).all() and _same(got, want), (got, want)
