"""Every formal statement of the paper as a bound beside the quantity it bounds.

``STATEMENTS`` maps a short name to a :class:`Statement`; ``check(case)`` builds one
instance from a :class:`Case` (a seed, a length, an optional edge case) and returns
:class:`Check` rows, each an observed quantity and the bound it must not exceed.
Observed quantities that depend on rounding are measured in the mpmath reference
at high precision, with a slack of γ_K at that precision; bounds evaluated in
float64 are widened by γ_K of float64 (K = the length of the longest chain of
operations, 64·(n + d)·L as in the backend cross-checks).

| name | statement | module |
|---|---|---|
| ``b1`` | Lemma B.1: weights ≤ e^{M−m}/n; gap > 0, = closed form, ≤ e^{2(M−m)}/(n(n+1)) | softmax |
| ``b2`` | Lemma B.2: δ ≤ 2k e^{M−m}/n (first k differ); δ ≤ 2 tanh(w/4) (band width w) | softmax |
| ``b4`` | Prop. B.4: δ_n = L = 2(e−1)/(e+1) for even n, L + C/(n² − tanh²½) for odd n | softmax |
| ``thm42`` | Thm 4.2/B.3: ‖y_n − y*_{n+1}‖₂ ≤ explicit layer-wise bound | collapse |
| ``thm51`` | Thm 5.1/B.5: ‖∂y_n/∂v_i‖₂ ≤ C [Π(Λ̄/β₁ + I)]_{n,i} (frozen weights and norms) | oversquash |
| ``b6`` | Lemma B.6: eigenvalues = diagonal (ρ = 1); multiplicity of 1 = #{i: Λ_ii = 1}, so simple iff Λ_ii < 1 for i ≥ 2 | oversquash |
| ``b7`` | Lemma B.7: products of row-stochastic lower-triangular matrices stay so | oversquash |
| ``b8`` | Prop. B.8: (n−1)(¾)^L − ½(n−1)(n−2)(⅔)^L ≤ Σ_{i≥2}[(½(Λ+I))^L]_{n,i} ≤ (n−1)(¾)^L, exact rationals | oversquash |
| ``b9`` | Prop. B.9: one layer, no positions: same count ratios, same output | counting |
"""

from __future__ import annotations

from ..errors import CollapseSimError
from . import checks
from .statement import EDGES, Case, Check, Statement, forward_ops, gamma

__all__ = ["EDGES", "STATEMENTS", "Case", "Check", "Statement", "check", "forward_ops", "gamma"]

STATEMENTS: dict[str, Statement] = {s.name: s for s in checks.ALL}


def check(name: str, case: Case) -> list[Check]:
    if name not in STATEMENTS:
        raise CollapseSimError(f"unknown statement {name!r}; use one of {', '.join(STATEMENTS)}")
    return STATEMENTS[name].check(case)
