"""Remedies as model options (docs/semantics.md §8.7): p-RoPE, Scalable-Softmax, a sink token.

Each is defined op by op in the semantics, so the emulated backend must equal the op-by-op
reference bit for bit with probes, and the prefix trick must hold (row n − 1 of one pass is
the last row of a separate forward over the prefix); the limiting cases are exact
identities (p-RoPE at fraction 0 and 1 is no positions and RoPE; Scalable-Softmax's factor
is s·ln n, a sink row is the first row of the token table)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from collapse_sim import enable_x64, positional
from collapse_sim.backends import make_backend
from collapse_sim.backends.inputs import AttentionInputs
from collapse_sim.model import ConfigError, ModelConfig, forward, gaussian_config, init_params, ssmax_factors

enable_x64()

SETUPS = {
    "p-rope": dict(pe="rope", rope_fraction=0.5, n_heads=2),
    "ssmax-window": dict(pe="rope", ssmax=0.7, window=3),
    "sink-sinusoidal": dict(pe="sinusoidal", sink=True, d_ff=8, n_layers=2),
    "sink-learned-ssmax": dict(pe="learned", sink=True, ssmax=1.3, max_len=16),
}
GAUSS = {"gauss-sink-ssmax-rope": dict(pe="rope", sink=True, ssmax=1.0),
         "gauss-sink-keys": dict(pe="sinusoidal", sink=True)}


def _model(name):
    if name in GAUSS:
        return init_params(gaussian_config(8, seed=4, **GAUSS[name])), np.arange(9)
    return init_params(ModelConfig(d=8, vocab=5, seed=3, **SETUPS[name])), np.array([1, 2, 3, 1, 4, 0, 2, 2, 3])


def _same(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return bool(np.all((a == b) | (np.isnan(a) & np.isnan(b))))  # ±0 equal: mpmath has no -0


@pytest.mark.parametrize("name", [*SETUPS, *GAUSS])
def test_emulated_equals_reference_and_prefix_trick(name):
    """Bit for bit in bf16 (pairwise) with a probe after every prefix; a row and a probe
    equal the last row of a separate forward over that prefix (and probe), padded to the
    stream's length so that one compiled forward serves every separate run (tokens after a
    row change nothing before it: the causal mask, docs/semantics.md §10)."""
    P, toks = _model(name)
    probe = np.roll(toks, 1)
    e, r = make_backend("emulated", "compute=bf16,order=pairwise"), make_backend("reference", "compute=bf16,order=pairwise")
    ye, ype = (e.to_numpy(a) for a in forward(P, toks, e, probe=probe))
    yr, ypr = (r.to_numpy(a) for a in forward(P, toks, r, probe=probe))
    assert ye.shape == (toks.size, 8) and _same(ye, yr) and _same(ype, ypr)
    for n in (1, 5):
        assert _same(e.to_numpy(forward(P, toks, e))[n - 1], ye[n - 1])
        assert _same(e.to_numpy(forward(P, np.concatenate([toks[:n], probe[n - 1:n], toks[n + 1:]]), e))[n], ype[n - 1])


def test_p_rope_limits_are_no_positions_and_rope():
    """fraction 0 rotates nothing (cos 1, sin 0 are exact, ∘(x·1 − y·0) = x): the outputs of
    pe='none'; fraction 1 is RoPE. In between, exactly ⌊f·d_h/2⌋ pairs rotate."""
    toks = np.array([1, 2, 3, 1, 4, 0, 2])
    e = make_backend("emulated", "compute=bf16,order=pairwise")

    def run(**kw):
        return e.to_numpy(forward(init_params(ModelConfig(d=8, vocab=5, seed=3, **kw)), toks, e))

    assert _same(run(pe="rope", rope_fraction=0.0), run(pe="none"))
    assert _same(run(pe="rope", rope_fraction=1.0), run(pe="rope"))
    assert not _same(run(pe="rope", rope_fraction=0.5), run(pe="rope"))
    assert [positional.rope_pairs(100, f) for f in (0.0, 0.29, 0.5, 1.0)] == [0, 14, 25, 50]
    assert positional.rope_pairs(200, 0.29) == 29  # the decimal 0.29, not the float64 below it
    cos, sin = positional.rope_tables(np.arange(5), 8, fraction=0.5)
    assert np.all(cos[:, 2:] == 1) and np.all(sin[:, 2:] == 0) and np.array_equal(cos[:, :2], positional.rope_tables(np.arange(5), 8)[0][:, :2])


def test_ssmax_factor_and_scores():
    """The factor is s·ln n with n the keys a query sees (capped by the window), and in
    float64 the attention weights are softmax(s·ln n · q·k/√d_h): checked against numpy."""
    c = ModelConfig(d=4, vocab=3, pe="none", ssmax=0.5, window=4)
    assert np.array_equal(ssmax_factors(c, np.arange(6)), 0.5 * np.log([1.0, 2, 3, 4, 4, 4]))
    # one head, no norms, no projections: y_i = Σ_j softmax_j(c_i q_i·k_j/√d) v_j, q = k = v = embedding
    c = ModelConfig(d=4, vocab=3, pe="none", ssmax=0.5, norm="none", value_proj=False, qk_std=1.0, seed=5)
    P = init_params(c)
    toks = np.array([0, 1, 2, 2, 1])
    y = np.asarray(forward(P, toks, make_backend("native", "fp64")))
    X = P["embed"][toks]
    Q, K = X @ P["l0.wq"], X @ P["l0.wk"]
    want = np.empty_like(X)
    s_abs = 0.0  # the largest |score| the roundings of a score are relative to: c_i·Σ_k |q_ik||k_jk| / √d
    for i in range(toks.size):
        c = 0.5 * np.log(i + 1)
        s = c * (Q[i] @ K[: i + 1].T) / 2.0
        s_abs = max(s_abs, float(np.max(c * (np.abs(Q[i]) @ np.abs(K[: i + 1]).T) / 2.0)))
        a = np.exp(s - s.max())
        want[i] = (a / a.sum()) @ X[: i + 1] + X[i]
    # Each side is within e·max|x| of the exact value, e = 2·γ_{3d+3}·s_abs + γ_{2n+5}: a score takes
    # 3d + 3 roundings (q and k projections, the SSMax factor, the dot, the scale), each relative to
    # s_abs, and enters a weight through exp (×2 for the normalisation); a weight's exp, the sum of n
    # and the division, then the weighted sum of n values and the residual add 2n + 5 more.
    from collapse_sim.theory import gamma

    u, d, n = 2.0**-53, 4, toks.size
    e = 2 * gamma(3 * d + 3, u) * s_abs + gamma(2 * n + 5, u)
    assert np.max(np.abs(y - want)) <= 2 * e * np.max(np.abs(X))


def test_sink_is_row_zero_of_the_token_table():
    """With a sink, row i is the output for the sink followed by t_0..t_i: the same as a
    model without sink fed the sink's embedding as an extra first token."""
    c = ModelConfig(d=8, vocab=5, seed=3, pe="rope", sink=True)
    P = init_params(c)
    plain = ModelConfig(d=8, vocab=6, seed=3, pe="rope")
    arrays = {k: v for k, v in P.arrays.items() if k != "sink"}
    arrays["embed"] = np.concatenate([P["sink"][None], P["embed"]])
    from collapse_sim.model import Params

    Q = Params(plain, arrays)
    toks = np.array([1, 2, 3, 1, 4])
    e = make_backend("emulated", "compute=bf16,order=pairwise")
    assert _same(e.to_numpy(forward(P, toks, e)), e.to_numpy(forward(Q, np.append(0, toks + 1), e))[1:])
    # the sink leaves every other weight's draw as it was
    P0 = init_params(ModelConfig(d=8, vocab=5, seed=3, pe="rope"))
    assert all(np.array_equal(P0[k], P[k]) for k in P0.arrays)


@pytest.mark.parametrize("kw,fragment", [
    (dict(pe="none", rope_fraction=0.5), "rope_fraction applies to pe='rope'"),
    (dict(pe="rope", rope_fraction=1.5), "rope_fraction must lie in [0, 1]"),
    (dict(ssmax=0.0), "must be > 0"),
    (dict(ssmax=-1.0), "must be > 0"),
])
def test_bad_remedy_options(kw, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(d=8, **kw)


def test_theory_refuses_what_it_does_not_model():
    """Traces of a sink model and Thm 4.2's bound under Scalable-Softmax are refused in one
    sentence instead of computed wrong; p-RoPE rotating no pair meets Thm 4.2's hypothesis."""
    from collapse_sim.theory.collapse import collapse_bound, thm42_hypothesis
    from collapse_sim.theory.trace import trace

    toks = np.array([1, 2, 3])
    with pytest.raises(ConfigError, match="sink"):
        trace(init_params(ModelConfig(d=8, vocab=5, sink=True)), toks)
    with pytest.raises(ConfigError, match="Scalable-Softmax"):
        collapse_bound(init_params(ModelConfig(d=8, vocab=5, pe="none", ssmax=1.0)), toks)
    assert thm42_hypothesis(ModelConfig(d=8, pe="rope", rope_fraction=0.2, norm="none")) is None  # ⌊0.2·4⌋ = 0 pairs
    assert "RoPE" in thm42_hypothesis(ModelConfig(d=8, pe="rope", rope_fraction=0.5))


def test_gaussian_sink_draw_and_the_collapse_flags(tmp_path):
    """The Gaussian model's sink is σ·z, z from default_rng([seed, 0, 1]) (§8.7), and leaves every
    id's draws as they were; collapse's --rope-fraction, --ssmax, --sink and --adaptive-temperature
    reach the model."""
    import json

    from collapse_sim.cli import main
    from collapse_sim.model import forward_arrays, gaussian_draws, sink_draws

    c = gaussian_config(8, seed=6, sink=True)
    z = np.random.default_rng([6, 0, 1]).standard_normal((3, 8)) * np.sqrt(1 / 8)
    assert all(np.array_equal(a, b) for a, b in zip(sink_draws(c), z))
    arrays = forward_arrays(init_params(c), 4, 4)
    plain = gaussian_draws(gaussian_config(8, seed=6), 256)
    assert all(np.array_equal(arrays[k][0], s) and np.array_equal(arrays[k][1:], p)
               for k, s, p in zip(("gauss.q", "gauss.k", "gauss.v"), z, plain))
    out = tmp_path / "c"
    assert main(["collapse", "--family", "repeat_last", "--pe", "rope", "--rope-fraction", "0.5", "--ssmax", "1",
                 "--sink", "--adaptive-temperature", "--format", "bf16", "--backend", "native", "--max-len", "8",
                 "--d", "8", "--out", str(out)]) == 0
    cfg = json.loads((out / "collapse.json").read_text())["config"]
    assert (cfg["rope_fraction"], cfg["ssmax"], cfg["sink"], cfg["adaptive_temperature"]) == (0.5, 1.0, True, True)


# --- adaptive temperature (docs/semantics.md §8.7) ------------------------------------------

def test_adaptive_temperature_emulated_equals_reference_with_probes():
    """A full forward (L = 2, d = 8, N = 12, bf16, pairwise) with a probe after every prefix:
    the emulated backend equals the op-by-op reference bit for bit."""
    P = init_params(ModelConfig(d=8, vocab=5, seed=3, n_layers=2, pe="rope", adaptive_temperature=True))
    toks = np.array([1, 2, 3, 1, 4, 0, 2, 2, 3, 1, 0, 4])
    probe = np.roll(toks, 1)
    e, r = make_backend("emulated", "compute=bf16,order=pairwise"), make_backend("reference", "compute=bf16,order=pairwise")
    ye, ype = (e.to_numpy(a) for a in forward(P, toks, e, probe=probe))
    yr, ypr = (r.to_numpy(a) for a in forward(P, toks, r, probe=probe))
    assert ye.shape == (12, 8) and np.all(np.isfinite(ye)) and _same(ye, yr) and _same(ype, ypr)


def _attend(B, q, k, v, adaptive: bool, window=None):
    """The attention primitive of backend B on float64 q, k, v (rows at positions 0..n-1),
    with adaptive temperature's constants or without: the output rows, in B's arrays (under
    jit for the JAX backends, compiled once per backend, setting and shape)."""
    n, dh = q.shape
    if B.kind == "reference":
        return _attention(B, adaptive, window, n, dh, B.store(q), B.store(k), B.store(v))
    return _jitted(B, adaptive, window, n, dh)(B.store(q), B.store(k), B.store(v))


def _attention(B, adaptive, window, n, dh, q, k, v):
    from collapse_sim.model import ADAPTIVE_TEMPERATURE

    kw = {"adaptive": ADAPTIVE_TEMPERATURE} if adaptive else {}
    return B.attention(AttentionInputs(q, k, v, np.arange(n), scale=1 / np.sqrt(dh), window=window), **kw)


@functools.lru_cache(maxsize=None)
def _jitted(B, adaptive, window, n, dh):
    import jax

    return jax.jit(functools.partial(_attention, B, adaptive, window, n, dh))


def _one_row(scores):
    """q, k, v (n x 4) whose last query's scores are ``scores`` exactly (q·k = 2·s, scale 1/2)
    and whose values are one-hot, so that the last output row is that query's weights."""
    n = len(scores)
    q, k = np.zeros((n, 4)), np.zeros((n, 4))
    q[:, 0], k[:, 0] = 1.0, 2.0 * np.asarray(scores, np.float64)
    return q, k, np.eye(n, 4)


@pytest.mark.parametrize("policy,window", [("compute=bf16,softmax=fp32,order=kahan", 5),
                                           ("compute=bf16,order=exact", None)])
def test_adaptive_temperature_attention_paths(policy, window, certified_everywhere):
    """The attention primitive alone, on random q, k, v (n = 12): emulated == reference bit for
    bit where the softmax format differs from the compute format and kahan skips the window's
    masked columns, and in the exact order with the certified float64 path forced everywhere
    (adaptive temperature must not take that path, which does not define it). The option
    changes the reference's result, so an emulated path that dropped it would differ. With the
    window, the plain softmax agrees too: kahan's sum starts at the first visible exp as it is,
    not rounded to the accumulator (§3.1, §3.3; the emulated sum once rounded it there)."""
    rng = np.random.default_rng(7)
    q, k, v = (rng.standard_normal((12, 4)) for _ in range(3))
    e, r = make_backend("emulated", policy), make_backend("reference", policy)
    want, plain = (r.to_numpy(_attend(r, q, k, v, on, window)) for on in (True, False))
    assert not _same(want, plain)
    assert _same(e.to_numpy(_attend(e, q, k, v, True, window)), want)
    if window is not None:
        assert _same(e.to_numpy(_attend(e, q, k, v, False, window)), plain)


def test_adaptive_temperature_example():
    """The scores (0, 0, 0, 1): the softmax's entropy H = 1.268 > 1/2 and the polynomial gives
    β = poly(H) = 1.631. At 256 bits the β the reference applied (read off its output as
    ln(w'_3 / w'_0), the two scores differing by exactly 1) equals the polynomial of the entropy
    computed independently by mpmath at 512 bits, within the bound derived below; native
    float64 gives the oracle's sharpened weights within the same bound at u = 2^-53; in bf16
    the sharpened largest weight (0.63) exceeds the plain softmax's (0.475) on the emulated
    backend and the reference alike. Scores (0, 0, 0, 5) (H = 0.12 <= 1/2) and (0, 0, 0, 2.5)
    (H = 0.71 > 1/2, but poly(H) = 0.71 < 1: β = 1) keep the plain softmax's weights bit for bit."""
    import mpmath

    from collapse_sim.model import ADAPTIVE_TEMPERATURE
    from collapse_sim.theory import gamma

    # the paper's listing: poly_fit = jnp.array([-0.037, 0.481, -2.3, 4.917, -1.791]), entropy > 0.5
    poly, threshold = [-0.037, 0.481, -2.3, 4.917, -1.791], 0.5
    assert ADAPTIVE_TEMPERATURE == (tuple(poly), threshold)
    s, n = [0.0, 0.0, 0.0, 1.0], 4
    with mpmath.workprec(512):  # the oracle: the definition in exact-real arithmetic, float64 coefficients
        ex = [mpmath.exp(x) for x in s]
        w = [x / mpmath.fsum(ex) for x in ex]
        H = -mpmath.fsum(x * mpmath.log(x) for x in w)
        beta = mpmath.fsum(mpmath.mpf(c) * H ** (len(poly) - 1 - i) for i, c in enumerate(poly))  # highest power first
        ex2 = [mpmath.exp(beta * x) for x in s]
        w2 = [x / mpmath.fsum(ex2) for x in ex2]
    assert H > threshold and beta > 1 and max(w2) > max(w)

    def bound(u):
        """|β̂ − β| and the relative error of a sharpened weight, for a backend whose every op is
        correctly rounded with unit roundoff u (first order, each γ_k covering its own O(u²)):
        the first softmax's weights are off by γ_{n+1} relative (exp, n − 1 adds, the division),
        so ln w by as much absolutely, and ln, the product and the n − 1 adds of the entropy add
        γ_{n+1}·H: |Ĥ − H| <= e_H = γ_{2n+2}·(2H + 1). Horner's rule over the 4 + 1 coefficients
        adds γ_8·Σ|c_k|Ĥ^k (Higham, Accuracy and Stability, (5.3)) and the polynomial's slope
        carries e_H: e_β = γ_8·Σ|c_k|Ĥ^k + Σ k|c_k|Ĥ^(k−1)·e_H, Ĥ taken as H + e_H; max(·, 1)
        is 1-Lipschitz. Scores times β̂ move by max|s|·(e_β + u·β) each, which moves a weight by
        twice that relatively, and the second softmax adds γ_{n+2} (the subtraction too)."""
        Hh = float(H) + gamma(2 * n + 2, u) * (2 * float(H) + 1)
        e_h = gamma(2 * n + 2, u) * (2 * float(H) + 1)
        deg = len(poly) - 1
        e_b = (gamma(2 * deg, u) * sum(abs(c) * Hh ** (deg - i) for i, c in enumerate(poly))
               + sum((deg - i) * abs(c) * Hh ** (deg - i - 1) for i, c in enumerate(poly[:-1])) * e_h)
        return e_b, 2 * max(map(abs, s)) * (e_b + u * float(beta)) + gamma(n + 2, u)

    # 256 bits: the β the reference applied, ln(w'_3 / w'_0) = ŝ'_3 − ŝ'_0 = β̂ up to the two exps
    # and the two divisions (the subtraction of the maximum is exact here): γ_4
    r = make_backend("reference", "256")
    out = _attend(r, *_one_row(s), True)[-1]
    u = 2.0**-256
    with mpmath.workprec(512):
        seen = mpmath.log(mpmath.mp.make_mpf(out[3]) / mpmath.mp.make_mpf(out[0]))
        assert abs(seen - beta) <= bound(u)[0] + gamma(4, u)
    # native float64: the sharpened weights
    nat = make_backend("native", "fp64")
    got = np.asarray(_attend(nat, *_one_row(s), True))[-1]
    e_w = bound(2.0**-53)[1]
    assert all(abs(g - float(x)) <= e_w * float(x) for g, x in zip(got, w2)), (got, w2, e_w)
    # bf16: sharper where β > 1, the plain softmax's bits where β = 1
    for B in (make_backend("emulated", "compute=bf16,order=pairwise"), make_backend("reference", "compute=bf16,order=pairwise")):
        def weights(scores, adaptive):
            return B.to_numpy(_attend(B, *_one_row(scores), adaptive))[-1]

        sharp, plain = weights(s, True), weights(s, False)
        assert sharp.max() > plain.max() and sharp.argmax() == plain.argmax() == 3, (B.label, sharp, plain)
        for low in ([0.0, 0.0, 0.0, 5.0], [0.0, 0.0, 0.0, 2.5]):
            assert _same(weights(low, True), weights(low, False)), (B.label, low)


def test_adaptive_temperature_refusals():
    """What does not define adaptive temperature refuses it in one sentence: theory traces and
    so Thm 4.2's bound (they read the attention as one softmax of the scores), the interval
    backends (no attention with it), and the online and flash2 kernels on both backends that
    have them (they never hold a row's weights at once). A non-bool option is refused too."""
    from collapse_sim.policy import PolicyError
    from collapse_sim.theory.collapse import collapse_bound
    from collapse_sim.theory.trace import trace

    P = init_params(ModelConfig(d=8, vocab=5, pe="none", adaptive_temperature=True))
    toks = np.array([1, 2, 3])
    with pytest.raises(ConfigError, match="theory traces .* adaptive temperature"):
        trace(P, toks)
    with pytest.raises(ConfigError, match="adaptive temperature"):
        collapse_bound(P, toks)
    with pytest.raises(ConfigError, match="interval:mp64 does not define adaptive temperature"):
        forward(P, toks, make_backend("interval", "64"))
    from collapse_sim.model import ADAPTIVE_TEMPERATURE

    for kind in ("emulated", "reference"):  # the model refuses before any work; the backends' attention too
        be = make_backend(kind, "compute=bf16,kernel=online(2)")
        with pytest.raises(ConfigError, match="online kernel never holds.*use kernel=naive"):
            forward(P, toks, be)
        with pytest.raises(PolicyError, match="online kernel never holds.*use kernel=naive"):
            be.attention(AttentionInputs(*(be.store(np.ones((2, 2))) for _ in range(3)), np.arange(2), 1.0),
                         adaptive=ADAPTIVE_TEMPERATURE)
    with pytest.raises(ConfigError, match="adaptive_temperature must be True or False"):
        ModelConfig(adaptive_temperature=1)
