"""Hooks the model calls that only analysis backends act on, and the array plumbing
every backend shares (numpy or jax.numpy: ``xp``)."""

from __future__ import annotations

import contextlib

import numpy as np


class AnalysisHooks:
    """``tap(name, x)`` lets a backend record an intermediate value; ``freeze(x)``
    lets it treat a value as a constant under differentiation (attention weights and
    norm scales, the assumptions of Thm 5.1). Both are the identity here."""

    def tap(self, name: str, x):
        return x

    def freeze(self, x):
        return x

    def draw_scope(self, i):
        """A context for iteration ``i`` of the model's layer loop: stochastic rounding's draw
        scope in the emulated backend (docs/semantics.md §2); nothing here."""
        return contextlib.nullcontext()


class ArrayPlumbing(AnalysisHooks):
    """Indexing and reshaping the model asks of every backend, in the array module ``xp``
    (numpy for the object-array backends; the JAX backends set jax.numpy). No arithmetic."""

    xp = np
    policy = None  # the backends that follow a policy (emulated, reference) set theirs

    def quantize_weights(self, w, axis: int) -> np.ndarray:
        """The policy's weights role on a float64 weight array, on the host before the forward
        (docs/semantics.md §5.1: the forward's ``store`` then rounds the result to storage). A
        backend without a policy (native runs a JAX dtype; interval) has none: ``w`` itself."""
        w = np.asarray(w, dtype=np.float64)
        return w if self.policy is None else self.policy.weights_values(w, axis)

    def take(self, table, idx):
        return table[self.xp.asarray(idx)]

    def col(self, v, like):
        return self.xp.broadcast_to(v[:, None], like.shape)

    def row(self, v, like):
        return self.xp.broadcast_to(v[None, :], like.shape)

    def cols(self, x, sl):
        return x[:, sl]

    def ncols(self, x):
        return x.shape[1]

    def concat_cols(self, xs):
        return self.xp.concatenate(xs, axis=1)

    def interleave_cols(self, a, b):
        return self.xp.stack([a, b], axis=-1).reshape(a.shape[0], -1)
