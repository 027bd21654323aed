"""Remedies as model options (docs/semantics.md §8.7): p-RoPE, Scalable-Softmax, a sink token.

Each is defined op by op in the semantics, so the emulated backend must equal the op-by-op
reference bit for bit with probes, and the prefix trick must hold (row n − 1 of one pass is
the last row of a separate forward over the prefix); the limiting cases are exact
identities (p-RoPE at fraction 0 and 1 is no positions and RoPE; Scalable-Softmax's factor
is s·ln n, a sink row is the first row of the token table)."""

from __future__ import annotations

import numpy as np
import pytest

from collapse_sim import enable_x64, positional
from collapse_sim.backends import make_backend
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
    id's draws as they were; collapse's --rope-fraction, --ssmax and --sink reach the model."""
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
                 "--sink", "--format", "bf16", "--backend", "native", "--max-len", "8", "--d", "8", "--out", str(out)]) == 0
    cfg = json.loads((out / "collapse.json").read_text())["config"]
    assert (cfg["rope_fraction"], cfg["ssmax"], cfg["sink"]) == (0.5, 1.0, True)
