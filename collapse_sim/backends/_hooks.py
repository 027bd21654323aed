"""Hooks the model calls that only analysis backends act on, and the array plumbing
every backend shares (numpy or jax.numpy: ``xp``)."""

from __future__ import annotations

import numpy as np


class AnalysisHooks:
    """``tap(name, x)`` lets a backend record an intermediate value; ``freeze(x)``
    lets it treat a value as a constant under differentiation (attention weights and
    norm scales, the assumptions of Thm 5.1). Both are the identity here."""

    def tap(self, name: str, x):
        return x

    def freeze(self, x):
        return x


class ArrayPlumbing(AnalysisHooks):
    """Indexing and reshaping the model asks of every backend, in the array module ``xp``
    (numpy for the object-array backends; the JAX backends set jax.numpy). No arithmetic."""

    xp = np

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
