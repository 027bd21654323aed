"""How emulated attention is laid out over queries: causal segments and sharding.
Neither changes a bit of the result, ±0 aside (docs/semantics.md §3.3, proofs/reduction_orders.md):
a negative-zero sum can stay −0 in a segment where the full row gives +0, and the number of
segments depends on N.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .attention import (_certified_attention, _certified_scores, _emulated_attention, _fill_uncertified, _own_kv,
                        _terms, _uncertified_attention, key_chunk)
from ..inputs import AttentionInputs
from .ops import Emulator

_SEGMENTS = 8  # at most this many query segments with their own causal key length (one compiled body each)
# Queries per segment where a segment pays for itself: S segments do (S + 1) / (2 S) of the
# attention's work but compile S bodies. With run time T(N) of one unsegmented attention and
# c seconds to compile one more body, S = sqrt(T / 2c) minimises the sum. Measured on 2 cores
# (jax 0.10.2, d = 64): op by op (pairwise) T(2000) ≈ 4 s and c ≈ 2.9 s, so S ≈ N / 2400;
# certified orders (exact, blocked) T(4096) ≈ 1.1 s and c ≈ 2.3 s, so S ≈ N / 8400.
_QUERIES_PER_SEGMENT = {False: 2400, True: 8400}


def _segment_count(emu: Emulator, nq: int, dh: int) -> int:
    """How many causal segments an attention over ``nq`` queries of width ``dh`` runs in (1: unsegmented;
    always where its keys run in chunks, :func:`~.attention.key_chunk`, which skip the masked ones per block)."""
    if key_chunk(emu, nq):
        return 1
    return int(min(_SEGMENTS, max(1, round(nq / _QUERIES_PER_SEGMENT[_certified_scores(emu, nq * (nq + 1) * dh)]))))


def _segments_of(emu: Emulator, qpos: np.ndarray, dh: int) -> int:
    """:func:`_segment_count` for queries at the static positions ``qpos``, counted by their distinct
    positions: a forward's stream and its probes as rows of one call (model._rows, positions
    0, 1, 1, 2, ...) run in as many segments as the stream alone, so the program holds as many
    copies of the attention as a forward without probes."""
    return _segment_count(emu, int(np.unique(qpos).size), dh)


def _causal_segments(emu: Emulator, a: AttentionInputs, segments: "int | None" = None):
    """Causal attention in ``segments`` runs of queries (default :func:`_segments_of`),
    each over the keys it can see (``a.qpos``: a numpy array, read on the host).

    Query positions are static and non-decreasing, so the queries of a segment need
    keys ``0..max(qpos)`` only. Dropping the trailing (masked, exactly zero) columns
    changes no sum of any order: sequential and blocked sums add exact zeros at the
    end, pairwise trees over any power-of-two padding at least as long agree, kahan
    skips masked terms and exact sums ignore zeros (proofs/reduction_orders.md). With
    S segments it saves (S - 1) / (2 S) of the work (44% at S = 8)."""
    nq, dh = a.q.shape
    segments = _segments_of(emu, np.asarray(a.qpos), dh) if segments is None else segments
    bounds = np.linspace(0, nq, segments + 1).astype(int)
    certified = _certified_scores(emu, _terms(a.q, a.k))
    outs = []
    for r0, r1 in zip(bounds[:-1], bounds[1:]):
        if r0 == r1:
            continue
        top = int(a.qpos[r1 - 1])
        seg = a.query_rows(r0, r1, keys=min(a.k.shape[0], top if a.self_kv is not None else top + 1))
        seg = dataclasses.replace(seg, qpos=jnp.asarray(seg.qpos))
        if certified:
            run = functools.partial(_certified_attention, emu, seg)
        else:
            run = lambda seg=seg: (_uncertified_attention(emu, seg), None)  # noqa: E731
        outs.append(_after(outs[-1][0] if outs else None, run, (r1 - r0, dh), certified))
    o = jnp.concatenate([x for x, _ in outs], axis=0)
    if not certified:
        return o
    ok = jnp.concatenate([x for _, x in outs])
    return _fill_uncertified(emu, o, ok, a)  # one op-by-op body for all


def _after(dep, run, shape, with_ok: bool):
    """``run()``, which gives ``(o, ok)`` (``ok`` None unless ``with_ok``), ordered after
    ``dep`` has been computed under a trace. XLA would otherwise schedule the independent
    causal segments side by side and keep every segment's key and value copies live
    at once (about 1 GiB at N = 65,536); an optimization barrier does not survive its
    passes, but a conditional on a predicate it cannot fold does. The predicate
    (``dep``'s NaN count is not negative) is always true; the other branch is never
    taken."""
    if dep is None or not isinstance(dep, jax.core.Tracer):
        return run()
    never = lambda: (jnp.zeros(shape, dep.dtype), jnp.zeros(shape[0], bool) if with_ok else None)  # noqa: E731
    return lax.cond(jnp.sum(jnp.isnan(dep), dtype=jnp.int32) >= 0, run, never)


def _sharded(emu: Emulator, a: AttentionInputs):
    """The query axis split over every device (``jax.shard_map``), keys and values
    replicated: each query row is computed exactly as unsharded, so the bits agree
    (``a.qpos``: a numpy array).
    Test on CPU with ``XLA_FLAGS=--xla_force_host_platform_device_count=4``."""
    from jax.sharding import Mesh, PartitionSpec as P

    ndev = jax.device_count()
    mesh = Mesh(np.array(jax.devices()), ("q",))
    q, qpos = a.q, np.asarray(a.qpos)
    nq = q.shape[0]
    pad = -nq % ndev
    qp = jnp.concatenate([q, jnp.zeros((pad, q.shape[1]), q.dtype)])
    pos = jnp.asarray(np.concatenate([qpos, np.full(pad, qpos[-1] if nq else 0)]))
    kp, vp = _own_kv(a)
    kp = jnp.concatenate([kp, jnp.zeros((pad, kp.shape[1]), kp.dtype)])
    vp = jnp.concatenate([vp, jnp.zeros((pad, vp.shape[1]), vp.dtype)])

    def local(qs, ps, kps, vps, k_, v_):
        skv = (kps, vps) if a.self_kv is not None else None
        return _emulated_attention(emu, dataclasses.replace(a, q=qs, k=k_, v=v_, qpos=ps, self_kv=skv))

    f = jax.shard_map(local, mesh=mesh, in_specs=(P("q"), P("q"), P("q"), P("q"), P(), P()), out_specs=P("q"))
    return f(qp, pos, kp, vp, a.k, a.v)[:nq]
