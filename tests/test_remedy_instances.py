"""Remedies on the instances their papers print, measured through the model's own code path.

Scalable-Softmax (Nakanishi, arXiv 2501.19399, Fig. 1): every score −2 but one +3. With
the factor s·ln n on the scores the largest weight is

    w(n) = e^(3 s ln n) / (e^(3 s ln n) + (n − 1)·e^(−2 s ln n)) = 1 / (1 + (n − 1)·n^(−5s)),

which tends to 1 when 5s > 1 (s = 0.43) and to 0 when 5s < 1 (s = 0.1). Here q = 1 at
every position, k = +3 at key 0 and −2 elsewhere, v one-hot on key 0, d = 1: the
attention output of the query at position n − 1 is the weight of key 0, measured after
the model's Scalable-Softmax step (``model._queries_keys``) and the backend's attention.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from collapse_sim import enable_x64
from collapse_sim.backends import make_backend
from collapse_sim.formats import parse as parse_format
from collapse_sim.model import ModelConfig, _queries_keys
from collapse_sim.backends.inputs import AttentionInputs
from collapse_sim.theory import gamma

enable_x64()

N = 256
U64 = 2.0**-53


def _weights(backend, s: float, n: int = N) -> np.ndarray:
    """The largest weight at every n = 1..``n`` (row n − 1), through the model's SSMax step."""
    pos = np.arange(n)
    k = np.full((n, 1), -2.0)
    k[0] = 3.0
    v = np.zeros((n, 1))
    v[0] = 1.0
    q, k, v = _queries_keys(ModelConfig(d=1, vocab=2, pe="none", ssmax=s), backend, *(backend.store(x) for x in
                                                                                  (np.ones((n, 1)), k, v)), pos)
    return np.asarray(backend.to_numpy(backend.attention(AttentionInputs(q, k, v, pos, scale=1.0))), np.float64)[:, 0]


def ssmax_weight(n: np.ndarray, s: float) -> np.ndarray:
    """Fig. 1's closed form 1 / (1 + (n − 1)·n^(−5s))."""
    return 1 / (1 + (n - 1) * n ** (-5 * s))


def weight_bound(n: np.ndarray, s: float, u: float) -> np.ndarray:
    """|ŵ − w| for one format of unit roundoff ``u`` everywhere (pairwise sums), from the ops:

    the factor c = s·ln n is a float64 log and product (2 roundings of U64), rounded to the
    format (1); q·c is exact (q = 1); the scores ∘(3c) (1) and ∘(−2c) (exact); the max
    subtraction ∘(−2c − ∘(3c)) (1): so the gap g = 5c enters the exps as g(1 + φ),
    |φ| ≤ φ_max = (1 + u)^3 (1 + U64)^2 − 1. Each other key's exp is e^(−g(1+φ))(1 + δ),
    so x = (n − 1)e^(−g) becomes xρ, ρ ∈ [e^(−gφ_max)(1 − u), e^(gφ_max)(1 + u)]; 1/(1 + xρ)
    differs from w = 1/(1 + x) by a factor within 1 ± ε₁, ε₁ = max(1/ρ_min − 1, 1 − 1/ρ_max).
    The pairwise sum of n terms and its rounding (γ_{⌈log2 n⌉+1}) and the division (u) follow;
    the weighted value sum is exact (one non-zero term times 1). Hence
    |ŵ − w| ≤ w·((1 + ε₁)(1 + u)/(1 − γ_{⌈log2 n⌉+1}) − 1)."""
    w = ssmax_weight(n, s)
    g = 5 * s * np.log(n)
    phi = (1 + u) ** 3 * (1 + U64) ** 2 - 1
    rho_min, rho_max = np.exp(-g * phi) * (1 - u), np.exp(g * phi) * (1 + u)
    eps1 = np.maximum(1 / rho_min - 1, 1 - 1 / rho_max)
    gam = np.array([gamma(math.ceil(math.log2(k)) + 1, u) for k in n])
    return w * ((1 + eps1) * (1 + u) / (1 - gam) - 1)


@pytest.mark.parametrize("spec", ["fp64", "bf16"])
@pytest.mark.parametrize("s, limit", [(0.43, 1.0), (0.1, 0.0)])
def test_ssmax_fig1_largest_weight(spec, s, limit):
    """The measured largest weight is Fig. 1's closed form within the bound derived from the
    ops (:func:`weight_bound`; observed ≤ bound at every n ≥ 2), in float64 and in bf16, and it
    moves toward the limit the closed form has (1 for 5s > 1, 0 for 5s < 1)."""
    backend = make_backend("native", "fp64") if spec == "fp64" else make_backend("emulated", "bf16")
    u = U64 if spec == "fp64" else 2.0 ** -parse_format(spec).p
    w_hat = _weights(backend, s)
    n = np.arange(2, N + 1, dtype=np.float64)
    err = np.abs(w_hat[1:] - ssmax_weight(n, s))
    bound = weight_bound(n, s, u)
    assert np.all(err <= bound), (float(np.max(err / bound)), int(n[np.argmax(err / bound)]))
    # toward the limit: the weight at n = N is nearer it than at n = 2, in the format as in the closed form
    assert abs(w_hat[-1] - limit) < abs(w_hat[1] - limit)
