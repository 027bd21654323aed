"""Hooks the model calls that only analysis backends act on."""

from __future__ import annotations


class AnalysisHooks:
    """``tap(name, x)`` lets a backend record an intermediate value; ``freeze(x)``
    lets it treat a value as a constant under differentiation (attention weights and
    norm scales, the assumptions of Thm 5.1). Both are the identity here."""

    def tap(self, name: str, x):
        return x

    def freeze(self, x):
        return x
