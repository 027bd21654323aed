"""The attention boundary: what one attention call takes, as one typed value.

Every backend's ``attention(inputs, ...)`` and every emulated attention helper take an
:class:`AttentionInputs` (docs/semantics.md §3.3, §8). It is a JAX pytree: the arrays are
its leaves, and the numbers that are Python constants of the compiled program (the scale,
the ALiBi slope, the window) are its static aux data, so they stay static under a trace and
a program compiles once per (policy, shape) as before.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

Array = Any  # a JAX or numpy array, or a numpy array of mpmath numbers (reference backends)


@dataclasses.dataclass(frozen=True)
class AttentionInputs:
    """One causal attention call: queries at positions ``qpos`` over the keys at positions
    ``0..n_k − 1``, query i seeing the key columns ``j <= qpos[i]`` (and ``j > qpos[i] − window``
    with a window).

    Leaves (arrays):

    * ``q``: (n_q, d_h), the queries (after RoPE and any query factor);
    * ``k``, ``v``: (n_k, d_h), the stream's keys and values;
    * ``qpos``: (n_q,) integers, each query's position (a numpy array where the positions are
      static: the emulated backend's causal segments read them on the host);
    * ``self_kv``: None, or every query's own ``(k_p, v_p)``, each (n_q, d_h): query i's own key
      and value stand in column ``qpos[i]`` (the stream's keys there are not a probe's; a stream
      row's own are the stream's, where a forward's probes are rows of the stream's call,
      model._rows).

    Static (Python numbers, the compiled program's constants):

    * ``scale``: the scores' factor (1/√d_h in the model);
    * ``alibi``: None, or the ALiBi slope m (the bias ``−m·(i − j)`` is added to the scaled score);
    * ``window``: None, or the sliding window's width w."""

    q: Array
    k: Array
    v: Array
    qpos: Array
    scale: float
    alibi: float | None = None
    window: int | None = None
    self_kv: tuple[Array, Array] | None = None

    def query_rows(self, a: int, b: int, keys: int | None = None) -> "AttentionInputs":
        """The same call for query rows ``a:b`` (their positions and own keys and values), over
        the first ``keys`` keys (default all)."""
        kl = self.k.shape[0] if keys is None else keys
        skv = None if self.self_kv is None else (self.self_kv[0][a:b], self.self_kv[1][a:b])
        return dataclasses.replace(self, q=self.q[a:b], k=self.k[:kl], v=self.v[:kl], qpos=self.qpos[a:b],
                                   self_kv=skv)


jax.tree_util.register_dataclass(AttentionInputs, data_fields=["q", "k", "v", "qpos", "self_kv"],
                                 meta_fields=["scale", "alibi", "window"])
