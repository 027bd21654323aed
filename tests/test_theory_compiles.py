"""How many XLA programs the theory's commands compile (issue 16: a handful, not one per
op or per instance). Programs are counted as the CLI counts them (collapse_sim.compilation):
compiled or loaded from the persistent cache, either way a program the process had to build."""

from __future__ import annotations

import numpy as np

from collapse_sim.compilation import snapshot


def _programs(before) -> int:
    c = snapshot().since(before)
    return c.compiled + c.cache_hits


def test_thm42_instances_compile_nothing():
    """thm42 on random instances (each its own architecture) compiles no program at all: the
    float64 trace runs in numpy and the observed distance in the mpmath reference. Compiled
    traces cost one program per instance (20 for ``theorem thm42 --instances 20``)."""
    from collapse_sim.experiments.theorems import draw_cases
    from collapse_sim.theory import STATEMENTS

    cases = draw_cases(7, 6, 6)  # the plain draw, every edge case, a plain draw: 6 architectures
    before = snapshot()
    rows = [c for case in cases for c in STATEMENTS["thm42"].check(case)]
    assert _programs(before) == 0
    assert rows and all(c.holds for c in rows)


def test_trace_equals_the_compiled_native_pass_to_rounding():
    """The numpy trace and the model's compiled float64 pass (the native backend) agree to
    float64 rounding: each lies within γ_K(2^-53)·max|y| of the exact pass (K = 64(n + d)L,
    the slack every bound read from a trace is widened by), so they differ by at most twice
    that. The attention matrices are causal, windowed and row-stochastic to rounding (the
    row sums: n divisions by one rounded sum of the same n exps, then an n-term sum)."""
    from collapse_sim.backends import make_backend
    from collapse_sim.model import ModelConfig, forward, init_params
    from collapse_sim.theory import forward_ops, gamma
    from collapse_sim.theory.trace import trace

    toks = np.random.default_rng(3).integers(0, 8, 12)
    for pe in ("rope", "alibi"):  # RoPE's tables, ALiBi's slopes; two heads, a window, an MLP, two layers
        P = init_params(ModelConfig(d=8, n_layers=2, n_heads=2, d_ff=8, vocab=8, pe=pe, window=5, seed=4))
        B = make_backend("native", "fp64")
        y = B.to_numpy(forward(P, toks, B))
        tr = trace(P, toks)
        tol = 2 * gamma(forward_ops(toks.size, 8, 2), 2.0**-53) * np.max(np.abs(y))
        assert np.max(np.abs(tr.y - y)) <= tol, pe
        for (layer, h), A in tr.attn.items():  # row-stochastic, causal, windowed: the model's masks
            assert np.all(np.triu(A, 1) == 0) and np.all(np.tril(A, -5) == 0), (pe, layer, h)
            assert np.max(np.abs(A.sum(axis=1) - 1)) <= gamma(2 * toks.size + 2, 2.0**-53), (pe, layer, h)


def test_oversquash_profile_compiles_one_program_per_jacobian():
    """The over-squashing profile compiles exactly one program per Jacobian (one per format,
    frozen, and the full fp64 model) and nothing else: no trace, no eager cast or zeros."""
    from collapse_sim.experiments.oversquash import oversquash_profile
    from collapse_sim.model import ModelConfig, init_params

    P = init_params(ModelConfig(d=4, n_layers=1, vocab=5, pe="none", seed=61))
    toks = np.array([0, 3, 1, 4, 2, 2, 3])  # a length no other test uses: every program is new here
    before = snapshot()
    r = oversquash_profile(P, toks, ("fp64",))
    assert _programs(before) == 2
    assert sorted(r.profiles) == ["fp64 (frozen)", "fp64 (full model)"] and r.bound.shape == (7,)


def test_scaling_sweep_compiles_one_emulated_forward():
    """Every format of the scaling sweep runs in the emulated backend's shared program: a
    second sweep at the same shape over other p compiles nothing (the automatic choice
    compiled the specialised program for the first p and the shared one for the second)."""
    from collapse_sim.theory import scaling as sc

    P = sc.scaling_model()
    first = sc.scaling_sweep(P, "zero_ones", [10], 9)
    before = snapshot()
    more = sc.scaling_sweep(P, "zero_ones", [4, 5], 9)
    assert _programs(before) == 0
    assert first.ps == [10] and more.ps == [4, 5] and len(more.measured) == 2
    # a range past the shared program's class (emax >= 128) takes the specialised program
    wide = sc.scaling_sweep(P, "zero_ones", [4], 9, emax=200)
    assert wide.measured == more.measured[:1]  # no over/underflow at these sizes: the range does not matter
