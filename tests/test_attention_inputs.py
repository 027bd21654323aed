"""AttentionInputs, the attention boundary (collapse_sim/backends/inputs.py): a pytree whose
leaves are the arrays and whose scale, ALiBi slope and window stay static under jit."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from collapse_sim.backends.inputs import AttentionInputs


def _inputs(n: int = 3, dh: int = 2, probes: bool = False, **static) -> AttentionInputs:
    q, k, v, kp, vp = (np.arange(n * dh, dtype=np.float64).reshape(n, dh) + i for i in range(5))
    return AttentionInputs(q, k, v, np.arange(n) + probes, **{"scale": 0.5, **static},
                           self_kv=(kp, vp) if probes else None)


def test_arrays_are_leaves_and_numbers_are_static():
    """The leaves are q, k, v, qpos and the probes' own k, v (none without probes); the scale,
    slope and window are in the tree structure, so a jitted function of the inputs compiles once
    per (shapes, scale, slope, window) and again when one of those numbers changes."""
    a, p = _inputs(), _inputs(probes=True, alibi=0.25, window=2)
    assert [x is y for x, y in zip(jax.tree.leaves(a), (a.q, a.k, a.v, a.qpos))] == [True] * 4
    assert len(jax.tree.leaves(a)) == 4
    assert [x is y for x, y in zip(jax.tree.leaves(p), (p.q, p.k, p.v, p.qpos, *p.self_kv))] == [True] * 6
    assert jax.tree.unflatten(jax.tree.structure(p), jax.tree.leaves(p)) == p
    for s in (a, p):
        leaves = jax.tree.leaves(dataclasses.replace(s, scale=0.25, alibi=0.5, window=3))
        assert len(leaves) == len(jax.tree.leaves(s))  # the numbers are no leaves
        assert jax.tree.structure(dataclasses.replace(s, scale=0.25)) != jax.tree.structure(s)

    f = jax.jit(lambda x: x.q * x.scale + (0 if x.alibi is None else x.alibi))
    f(a), f(dataclasses.replace(a, q=a.q + 1.0))  # new values, same shapes and numbers
    assert f._cache_size() == 1
    got = f(dataclasses.replace(a, scale=0.25, alibi=1.0))
    assert f._cache_size() == 2 and np.array_equal(np.asarray(got), a.q * 0.25 + 1.0)


def test_query_rows_keep_each_row_with_its_position_and_own_key_value():
    """``query_rows(r0, r1, keys)``: rows r0:r1 of q, qpos and the probes' own k, v; the first
    ``keys`` keys and values; the numbers unchanged."""
    p = _inputs(n=5, probes=True, alibi=0.25, window=2)
    s = p.query_rows(1, 3, keys=2)
    assert np.array_equal(s.q, p.q[1:3]) and np.array_equal(s.qpos, p.qpos[1:3])
    assert np.array_equal(s.self_kv[0], p.self_kv[0][1:3]) and np.array_equal(s.self_kv[1], p.self_kv[1][1:3])
    assert np.array_equal(s.k, p.k[:2]) and np.array_equal(s.v, p.v[:2])
    assert (s.scale, s.alibi, s.window) == (p.scale, p.alibi, p.window)
    assert _inputs().query_rows(0, 2).self_kv is None and _inputs().query_rows(0, 2).k.shape == (3, 2)
    assert jnp.asarray(s.qpos).dtype.kind == "i"
