"""The emulated forward under stochastic rounding (docs/semantics.md §2, §12): reproducible
from the seed, draws that never repeat across the iterations of a loop traced once (the layer
scan, the row blocks), every output a value of the format and within the op-count bound of
the round-to-nearest forward, and no more compiled programs than that forward."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_sim import compilation, model
from collapse_sim.backends.emulated import EmulatedBackend, Emulator
from collapse_sim.backends.emulated import attention
from collapse_sim.formats import parse
from collapse_sim.model import ModelConfig, forward, init_params
from collapse_sim.policy import StochasticRoundingError
from collapse_sim.rounding import round_to
from collapse_sim.backends.inputs import AttentionInputs
from collapse_sim.theory.statement import forward_ops, gamma

P = 18  # a format of 18 bits: gamma_k(2u) of the forward's op count stays far below 1 (bf16's would not)
FMT = f"(p={P},emax=127)"
SR = f"compute={FMT},order=sequential,mode=sr(8,seed={{}})"  # r = 8: 2(p + r) + 1 <= 53 (§2)
RNE = f"compute={FMT},order=sequential"
CONFIG = ModelConfig(d=4, n_layers=2, vocab=4, norm="none", pe="none", value_proj=False, seed=3)
TOKENS = np.array([1, 2, 3, 0, 1, 2, 1])  # N = 7: a shape no other test of this file runs
BF16_SR = "compute=bf16,order=sequential,mode=sr(8,seed=1)"


@pytest.fixture(scope="module")
def runs():
    """The RNE forward, then the sr forward (seed 1, twice on separate backends, and seed 2),
    with the programs each compiled."""
    params = init_params(CONFIG)

    def run(policy):
        before = compilation.snapshot()
        y = np.asarray(forward(params, TOKENS, EmulatedBackend(policy)))
        return y, compilation.snapshot().since(before).compiled

    return {"rne": run(RNE), "sr1": run(SR.format(1)), "sr1b": run(SR.format(1)), "sr2": run(SR.format(2))}


def test_same_seed_same_bits_other_seed_other_bits(runs):
    y1, y1b, y2 = runs["sr1"][0], runs["sr1b"][0], runs["sr2"][0]
    assert np.array_equal(y1, y1b)
    assert not np.array_equal(y1, y2)


def test_values_of_the_format_within_the_op_count_bound(runs):
    """Each sr rounding is within 1 ulp (2u relative) of the exact value, each RNE rounding
    within u: k = forward_ops(N, d, L) error terms of relative size 2u and u against the
    largest |output| (theory.statement.forward_ops) bound the gap between the two forwards."""
    y_rne, y_sr = runs["rne"][0], runs["sr1"][0]
    fmt = parse(FMT)
    assert np.array_equal(np.asarray(round_to(jnp.asarray(y_sr), fmt, "rne")), y_sr)  # format values round to themselves
    u = 2.0 ** -P
    k = forward_ops(len(TOKENS), CONFIG.d, CONFIG.n_layers)
    bound = (gamma(k, 2 * u) + gamma(k, u)) * np.max(np.abs(y_rne))
    gap = np.max(np.abs(y_sr - y_rne))
    assert 0 < gap <= bound, (gap, bound)


def test_no_more_programs_than_round_to_nearest(runs):
    """The seed's key is the program's argument: another seed compiles nothing."""
    assert runs["sr1"][1] <= runs["rne"][1]
    assert runs["sr1b"][1] == runs["sr2"][1] == 0


def test_layers_draw_afresh(monkeypatch):
    """Each layer of the scan (one traced body) rounds the same values, 1 + 2^-8 (a bf16 tie:
    up or down with probability 1/2), and records its outcome in the carry (exactly, in the
    float64 carrier: 2·xp + r); with the layer index folded in, the two layers' outcomes differ
    somewhere among 64 roundings (all equal with probability 2^-64)."""

    def layer(c, W, p, x, xp, pos, B, pe=None, pe_p=None, merged=False):
        return x, 2 * xp + B.add(x, W.wq)

    monkeypatch.setattr(model, "_layer", layer)
    B = EmulatedBackend(BF16_SR)
    x, w = jnp.ones((8, 8)), jnp.full((8, 8), 2.0 ** -8)
    W = model.Weights((model.LayerWeights(w, w),) * 2)
    run = jax.jit(lambda key: model._scan_layers(ModelConfig(d=8, n_layers=2), W, x,
                                                 jnp.zeros_like(x), np.arange(8), B.bind(key), None, None)[1])
    k = (np.asarray(run(np.uint64(1))) - 3) / 2.0 ** -7  # 2·r1 + r2 = 3 + (2·up1 + up2)·2^-7
    assert np.isin(k, [0, 1, 2, 3]).all()
    up1, up2 = k >= 2, k % 2 == 1
    assert up1.any() and not up1.all()
    assert (up1 != up2).any()


def test_row_blocks_draw_afresh(monkeypatch):
    """A linear layer in blocks of one row (lax.map, one traced body): four equal rows whose
    64 dot products each round 1 + 2^-8 to bf16 take different draws in every block."""
    monkeypatch.setattr(attention, "_BLOCK_ELEMS", 2 * 64)  # d_in · d_out: one row per block
    emu = Emulator(BF16_SR)
    x = jnp.tile(jnp.array([1.0, 2.0 ** -8]), (4, 1))
    out = np.asarray(jax.jit(lambda w: attention._linear(emu.fresh(), x, w))(jnp.ones((2, 64))))
    assert np.isin(out, [1.0, 1.0 + 2.0 ** -7]).all()
    assert all((out[i] != out[0]).any() for i in range(1, 4))


def test_attention_row_blocks_draw_afresh(monkeypatch):
    """The attention op by op in blocks of one query row: four equal queries at the same
    position (so every rounding of their rows is of the same values) give different rows."""
    nk, dh = 4, 16
    monkeypatch.setattr(attention, "_BLOCK_ELEMS", nk * dh)  # keys · d_h: one query row per block
    emu = Emulator(BF16_SR)
    rng = np.random.default_rng(0)
    q = jnp.tile(jnp.asarray(rng.standard_normal(dh)), (4, 1))
    k, v = (jnp.asarray(rng.standard_normal((nk, dh))) for _ in range(2))
    q, k, v = (round_to(a, parse("bf16"), "rne") for a in (q, k, v))  # bf16 values
    run = jax.jit(lambda q, k, v: attention._emulated_attention(
        emu.fresh(), AttentionInputs(q, k, v, jnp.full(4, nk - 1), 0.25)))
    out = np.asarray(run(q, k, v))
    assert np.array_equal(np.asarray(round_to(jnp.asarray(out), parse("bf16"), "rne")), out)
    assert all((out[i] != out[0]).any() for i in range(1, 4))


def test_refusals():
    """A block kernel and the shared program (formats as data) refuse sr in one sentence."""
    with pytest.raises(StochasticRoundingError, match="naive kernel"):
        EmulatedBackend(BF16_SR + ",kernel=online(4)")
    with pytest.raises(StochasticRoundingError, match="specialised"):
        EmulatedBackend(BF16_SR, shared=True)


def test_tapped_forwards_refuse_stochastic_rounding():
    """compiled_taps (explain-native, theory traces) traces a backend as it is, not on the fresh
    emulator per trace that the stochastic forward needs: refused in one sentence."""
    from collapse_sim.theory.trace import compiled_taps

    P = init_params(ModelConfig(d=4, n_layers=1, vocab=4, seed=1))
    with pytest.raises(StochasticRoundingError, match="tapped forwards run in a deterministic mode"):
        compiled_taps(P, np.array([1, 2, 3]), EmulatedBackend("compute=bf16,mode=sr(8,seed=1)"))
