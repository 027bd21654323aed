"""Over-squashing: Theorem 5.1 / B.5 (path-sum bound on ‖∂y_n/∂v_i^(0)‖), Lemmas B.6
and B.7 (row-stochastic triangular matrices: the eigenvalue 1 is simple iff Λ_ii < 1
for every i ≥ 2), Prop. B.8 (deep stacks see the first token: the tail beyond it is
at most (n − 1)(3/4)^L, sharp as L → ∞).

Thm 5.1 in the form this package proves (proofs/thm51_oversquashing.md), for the
model with attention weights and norm scales held constant (assumptions (i), (ii)):

    ‖∂y_n/∂v_i^(0)‖₂ ≤ C · [Ā^(L-1) ⋯ Ā^(0)]_{n,i}
    Ā^(ℓ)_{jk} = Σ_h α^(ℓ,h)_{jk} ‖W_v^h W_o^h‖₂ ‖g₁‖_∞ / β₁^(ℓ) + δ_{jk}
    C          = (‖g₃‖_∞/σ₃(n)) Π_ℓ (σ_ψ^(ℓ) ‖g₂‖_∞/β₂^(ℓ) + 1)

with β the smallest norm scale σ over the rows (σ₃(n): the last row's final-norm scale) (β = 1 and g = 1 without norms),
σ_ψ = ‖W_1‖₂‖W_2‖₂ (ReLU is 1-Lipschitz; σ_ψ/β₂ + 1 → 1 without an MLP), and the
paper's one-head, no-projection case ‖W_v W_o‖ = 1. A product of L matrices sums over
paths with L − 1 intermediate indices. ``VARIANTS`` evaluates the other readings.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..model import Params
from .trace import Trace, gain_max as _gmax, jacobian, spectral_norm as _spec, trace


def _beta(tr: Trace, name: str) -> float:
    return float(np.min(tr.sigma[name])) if name in tr.sigma else 1.0


def layer_factors(params: Params, tr: Trace):
    """Per layer: (Λ̄ = Σ_h α^h ‖W_v^h W_o^h‖ ‖g₁‖_∞ (N×N), β₁, mlp factor σ_ψ‖g₂‖_∞/β₂ + 1),
    and the final factor ‖g₃‖_∞/β₃."""
    c = params.config
    out = []
    for l in range(c.n_layers):
        p = f"l{l}."
        lam = np.zeros_like(tr.attn[l, 0])
        for h in range(c.n_heads):
            sl = slice(h * c.dh, (h + 1) * c.dh)
            Wv = params[p + "wv"][:, sl] if c.value_proj else np.eye(c.d)[:, sl]
            Wo = params[p + "wo"][sl, :] if c.out_proj else np.eye(c.d)[sl, :]
            lam = lam + tr.attn[l, h] * _spec(Wv @ Wo)
        lam = lam * _gmax(params, p + "n1")
        mlp = 1.0
        if c.d_ff:
            mlp = _spec(params[p + "w1"]) * _spec(params[p + "w2"]) * _gmax(params, p + "n2") / _beta(tr, p + "n2") + 1
        out.append((lam, _beta(tr, p + "n1"), mlp))
    final = _gmax(params, "n3") / (float(tr.sigma["n3"][-1]) if "n3" in tr.sigma else 1.0)  # y_n reads row n only
    return out, final


def _paths(mats) -> np.ndarray:
    """[M_{L-1} ⋯ M_0]: entry (n, i) sums over paths i ≤ k_1 ≤ … ≤ k_{L-1} ≤ n."""
    P = np.eye(mats[0].shape[0])
    for M in mats:
        P = M @ P
    return P


def path_sum_bound(params: Params, tokens, tr: Trace | None = None, variant: str = "consistent") -> np.ndarray:
    """Bound on ‖∂y_n/∂v_i^(0)‖₂ for the last token n and every i (array of n)."""
    tr = tr or trace(params, tokens)
    layers, final = layer_factors(params, tr)
    I = np.eye(len(tr.tokens))
    C = final * np.prod([m for _, _, m in layers])
    if variant == "consistent":
        P = _paths([lam / b1 + I for lam, b1, _ in layers])
    elif variant == "beta1-in-C":  # ᾱ = α + δ, 1/β₁ once in C beside 1/β₃
        P = _paths([lam + I for lam, _, _ in layers]) / layers[0][1]
    elif variant == "no-beta1":  # ᾱ = α + δ, β₁ nowhere
        P = _paths([lam + I for lam, _, _ in layers])
    elif variant == "extra-index":  # L intermediate indices: one factor too many
        P = _paths([layers[0][0] / layers[0][1] + I] + [lam / b1 + I for lam, b1, _ in layers])
    elif variant == "missing-index":  # L − 2 intermediate indices: one layer's factor dropped
        P = _paths([lam / b1 + I for lam, b1, _ in layers[1:]]) if len(layers) > 1 else I
    else:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    return C * P[-1]


VARIANTS = ("consistent", "beta1-in-C", "no-beta1", "extra-index", "missing-index")


def sensitivity(params: Params, tokens, *, frozen: bool = True, dtype: str = "fp64") -> np.ndarray:
    """‖∂y_n/∂v_i^(0)‖₂ (spectral norm of the d×d block) for every i, by jax autodiff
    (natively in ``dtype``)."""
    J = jacobian(params, tokens, frozen=frozen, dtype=dtype)
    return np.array([np.linalg.norm(Ji, 2) for Ji in J])


# -- Lemmas B.6, B.7 (exact, on rationals) -------------------------------------

def random_stochastic_lower(n: int, rng, *, min_nonzeros: int = 1, denom: int = 16) -> list[list[Fraction]]:
    """A random row-stochastic lower-triangular matrix with rational entries; each row
    i has at least ``min(min_nonzeros, i+1)`` non-zeros."""
    A = []
    for i in range(n):
        k = int(rng.integers(min(min_nonzeros, i + 1), i + 2))
        cols = sorted(rng.choice(i + 1, size=k, replace=False).tolist())
        w = [int(v) for v in rng.integers(1, denom + 1, size=k)]
        tot = sum(w)
        row = [Fraction(0)] * n
        for j, wj in zip(cols, w):
            row[j] = Fraction(wj, tot)
        A.append(row)
    return A


def matmul_exact(A, B):
    n, m, p = len(A), len(B), len(B[0])
    return [[sum((A[i][k] * B[k][j] for k in range(m)), Fraction(0)) for j in range(p)] for i in range(n)]


def is_stochastic_lower(A) -> bool:
    """Row sums exactly 1, entries ≥ 0, zero above the diagonal."""
    n = len(A)
    return all(sum(A[i]) == 1 and all(v >= 0 for v in A[i]) and all(A[i][j] == 0 for j in range(i + 1, n))
               for i in range(n))


def char_poly(A) -> list[Fraction]:
    """Coefficients of det(tI − A) = t^n + c_1 t^{n-1} + … + c_n, exactly, by
    Faddeev–LeVerrier (uses no triangular structure)."""
    n = len(A)
    coeffs = [Fraction(1)]
    M = [[Fraction(0)] * n for _ in range(n)]
    for k in range(1, n + 1):
        M = matmul_exact(A, M)
        for i in range(n):
            M[i][i] += coeffs[-1]
        AM = matmul_exact(A, M)
        coeffs.append(-sum(AM[i][i] for i in range(n)) / k)
    return coeffs


def root_multiplicity(coeffs, root: Fraction) -> int:
    """How many times (t − root) divides the polynomial (exact synthetic division)."""
    mult, poly = 0, list(coeffs)
    while len(poly) > 1:
        out = [poly[0]]
        for a in poly[1:]:
            out.append(a + root * out[-1])
        if out[-1] != 0:
            break
        poly = out[:-1]
        mult += 1
    return mult


def diagonal_poly(A) -> list[Fraction]:
    """Coefficients of Π_i (t − A_ii), exactly: the characteristic polynomial of a
    triangular matrix (what ``char_poly`` must equal when A is triangular)."""
    poly = [Fraction(1)]
    for i in range(len(A)):
        poly = [a - A[i][i] * b for a, b in zip(poly + [Fraction(0)], [Fraction(0)] + poly)]
    return poly


# -- Prop. B.8 -----------------------------------------------------------------

def b8_matrix(n: int) -> list[list[Fraction]]:
    """M = ½(Λ + I) for uniform causal attention Λ_ij = 1/i (j ≤ i, 1-based), exactly."""
    return [[(Fraction(1, 2 * (i + 1)) if j <= i else Fraction(0)) + (Fraction(1, 2) if j == i else 0)
             for j in range(n)] for i in range(n)]


def b8_tails(n: int, depth: int) -> list[Fraction]:
    """Σ_{i≥2} [M^L]_{n,i} = 1 − [M^L]_{n,1} for L = 0..depth, exactly: row n of M^L as
    integers over D^L, with D = 2·lcm(1..n) so that D·M is an integer matrix."""
    from math import lcm

    D = 2 * lcm(*range(1, n + 1))
    K = [[int(v * D) for v in row] for row in b8_matrix(n)]
    r = [0] * (n - 1) + [1]
    out = [Fraction(sum(r[1:]))]
    for L in range(1, depth + 1):
        r = [sum(r[i] * K[i][j] for i in range(j, n)) for j in range(n)]
        out.append(Fraction(sum(r[1:]), D**L))
    return out


def b8_tail_bound(n: int, L: int) -> Fraction:
    """Σ_{i≥2} [M^L]_{n,i} ≤ (n − 1)(3/4)^L (proofs/stochastic_matrices.md): f(i) = i − 1
    satisfies M f = ¾ f, and 1_{i≥2} ≤ f(i)."""
    return (n - 1) * Fraction(3, 4) ** L


def b8_tail_lower(n: int, L: int) -> Fraction:
    """Σ_{i≥2} [M^L]_{n,i} ≥ (n − 1)(3/4)^L − ½(n − 1)(n − 2)(2/3)^L: h(i) = (i − 1)(i − 2)
    satisfies M h = ⅔ h, and f(i) − 1 ≤ h(i)/2 for i ≥ 2. So tail/bound → 1."""
    return b8_tail_bound(n, L) - Fraction((n - 1) * (n - 2), 2) * Fraction(2, 3) ** L
