"""The (bound, measurement) pairs of ``collapse_sim.theory.STATEMENTS``, one function per
statement, each building its instance from a :class:`Case`."""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from .. import positional
from ..model import ModelConfig, Params, init_params
from . import softmax as sm
from .statement import Case, Check, Statement, forward_ops, gamma

PREC = 200  # mpmath precision of the softmax statements
REF_PREC = 256  # reference precision of the model statements
U64 = 2.0**-53
MAX_WEIGHT = 2.0  # |entries| of random weight matrices times 1/√d stay below this


def _rng(case: Case, salt: int) -> np.random.Generator:
    return np.random.default_rng([case.seed, salt])


# -- models ---------------------------------------------------------------------

def random_model(rng: np.random.Generator, *, edge: str | None = None, n_layers: int | None = None,
                 pe: str | None = None, window: bool = True, max_len: int = 64) -> Params:
    """A small decoder (d ∈ {4, 8}, L ∈ {1, 2}, 1–2 heads, any positional encoding, norm,
    window and MLP) with bounded weights: every weight-matrix entry is at most
    MAX_WEIGHT/√d in magnitude. Edges: ``equal`` zeroes W_q (uniform attention up to
    ALiBi), ``dominant`` scales W_q, W_k to the maximum, ``maxnorm`` puts every matrix
    entry at ±MAX_WEIGHT/√d."""
    d = int(rng.choice([4, 8]))
    value_proj = bool(rng.integers(2))
    out_proj = bool(rng.integers(2))
    heads = int(rng.choice([1, 2])) if (value_proj or out_proj) else 1
    pe = pe or str(rng.choice(positional.KINDS))
    cfg = ModelConfig(
        d=d, n_layers=n_layers or int(rng.integers(1, 3)), n_heads=heads, d_ff=int(rng.choice([0, 8])), vocab=6, pe=pe,
        norm=str(rng.choice(["layernorm", "rmsnorm", "none"])), window=(None if (rng.integers(3) or not window) else int(rng.integers(2, 5))),
        ape=str(rng.choice(["residual", "scores"])), value_proj=value_proj, out_proj=out_proj, max_len=max_len,
        seed=int(rng.integers(2**31)), embed_std=float(rng.uniform(0.3, 1.5)), qk_std=float(rng.uniform(0.2, 1.5)) / np.sqrt(d))
    P = init_params(cfg)
    lim = MAX_WEIGHT / np.sqrt(d)
    arrays = {}
    for k, a in P.arrays.items():
        name = k.split(".")[-1]
        if name in ("wq", "wk", "wv", "wo", "w1", "w2"):
            a = np.clip(a, -lim, lim)
            if edge == "maxnorm":
                a = lim * np.where(rng.random(a.shape) < 0.5, -1.0, 1.0)
            elif edge == "equal" and name == "wq":
                a = np.zeros_like(a)
            elif edge == "dominant" and name in ("wq", "wk"):
                a = lim * np.sign(a)
        elif name.endswith("_g"):
            a = rng.uniform(0.5, 1.5, a.shape)
        arrays[k] = a
    return Params(cfg, arrays)


def _tokens(rng, n: int, vocab: int) -> np.ndarray:
    return rng.integers(0, vocab, n)


def _chain(n: int, params: Params) -> int:
    """The forward's op count at n tokens (:func:`forward_ops`)."""
    c = params.config
    return forward_ops(n, c.d, c.n_layers)


# -- softmax statements -----------------------------------------------------------

def _logits(rng, n: int, edge: str | None) -> list[float]:
    m = float(rng.uniform(-4, 4))
    M = m + (0.0 if edge == "equal" else float(rng.uniform(0, 8)))
    x = rng.uniform(m, M, n)
    if edge == "dominant" and n > 1:
        x[rng.integers(n)] = M + 20.0
    return [float(v) for v in x]


def check_b1(case: Case) -> list[Check]:
    rng = _rng(case, 1)
    n = case.length
    x = _logits(rng, n + 1, case.edge)
    a, b, c = x[: n - 1], x[n - 1], x[n]
    direct, closed = sm.b1_gap(a, b, c, PREC)
    slack = gamma(8 * (n + 2), 2.0**-PREC)
    w = sm.b1_last_weight(a, c, PREC)
    return [
        Check("b1", "softmax(x)_n ≤ e^{M−m}/n", float(w), float(sm.b1_weight_bound(a + [c])), slack),
        Check("b1", "gap > 0: −gap ≤ −(closed form)/2", float(-direct), -float(closed) / 2),
        # the direct gap is a difference of two weights ≤ w: its rounding error is relative to w
        Check("b1", "|gap − closed form|", float(abs(direct - closed)), 0.0, 2 * slack * float(w)),
        Check("b1", "gap ≤ e^{2(M−m)}/(n(n+1))", float(direct), float(sm.b1_gap_bound(a, b, c)), slack),
    ]


def check_b2(case: Case) -> list[Check]:
    rng = _rng(case, 2)
    n = case.length
    x = _logits(rng, n, case.edge)
    k = int(rng.integers(1, n + 1))
    eta = 0.0 if case.edge == "equal" else float(rng.uniform(0, 2))
    xs = [v + (float(rng.uniform(0, eta)) if i < k else 0.0) for i, v in enumerate(x)]
    d = sm.b2_tv(x, xs, PREC)
    slack = gamma(8 * (n + 2), 2.0**-PREC)
    return [
        Check("b2", f"δ ≤ 2k e^(M−m)/n (k={k})", float(d), float(sm.b2_rate_bound(x, xs, k)), slack),
        Check("b2", "δ ≤ 2 tanh(w/4)", float(d), float(sm.b2_band_bound(x, xs)), slack),
    ]


def check_b4(case: Case) -> list[Check]:
    n = case.length
    direct, closed = sm.b4_tv(n, PREC), sm.b4_closed_form(n, PREC)
    # both are ≤ 2 with relative error ≤ γ_{8(n+2)} at PREC bits (n exps, two sums, n divisions, one fsum)
    slack = 2 * 2 * gamma(8 * (n + 2), 2.0**-PREC)
    return [Check("b4", f"|δ_n − closed form| (n={n}, {'even: 2(e−1)/(e+1)' if n % 2 == 0 else 'odd'})",
                  float(abs(direct - closed)), 0.0, slack)]


# -- models -----------------------------------------------------------------------

def check_thm42(case: Case) -> list[Check]:
    from .collapse import collapse_bound, observed_distance, thm42_hypothesis

    rng = _rng(case, 42)
    n = case.length
    P = random_model(rng, edge=case.edge, max_len=n + 2)
    toks = _tokens(rng, n, P.config.vocab)
    bound = collapse_bound(P, toks) * (1 + gamma(_chain(n + 1, P), U64))
    obs, scale = observed_distance(P, toks, REF_PREC)
    slack = 2 * gamma(_chain(n + 1, P), 2.0**-REF_PREC) * scale
    worst = int(np.argmax(obs - bound))
    why = thm42_hypothesis(P.config)
    return [Check("thm42", f"‖y_n − y*_(n+1)‖₂ (n={i + 1}, {P.config.pe})", float(obs[i]), float(bound[i]), float(slack[i]), why)
            for i in sorted({worst, n - 1})]


def check_thm51(case: Case) -> list[Check]:
    from .oversquash import path_sum_bound, sensitivity
    from .trace import trace

    rng = _rng(case, 51)
    n = case.length
    P = random_model(rng, edge=case.edge, max_len=n + 1)
    toks = _tokens(rng, n, P.config.vocab)
    obs = sensitivity(P, toks, frozen=True)
    g = gamma(_chain(n, P), U64)
    bound = path_sum_bound(P, toks, trace(P, toks)) * (1 + g)
    worst = int(np.argmax(obs - bound))
    return [Check("thm51", f"‖∂y_n/∂v_i‖₂ (i={i + 1}, n={n}, L={P.config.n_layers})", float(obs[i]), float(bound[i]),
                  g * float(np.max(obs))) for i in sorted({worst, 0})]


def check_b9(case: Case) -> list[Check]:
    from .counting import b9_distance, same_ratio_partner

    rng = _rng(case, 9)
    n = case.length
    P = random_model(rng, edge=case.edge, n_layers=1, pe="none", window=False)
    s = rng.integers(0, 2, n)
    k = int(rng.integers(2, 4))
    s2 = same_ratio_partner(s, k, rng)
    dist, scale = b9_distance(P, s, s2, REF_PREC)
    return [Check("b9", f"‖y(s) − y(s')‖₂, |s|={n}, |s'|={s2.size}", dist, 0.0,
                  2 * gamma(_chain(s2.size, P), 2.0**-REF_PREC) * scale)]


# -- matrices ---------------------------------------------------------------------

def _stochastic(case: Case, salt: int, n: int, min_nonzeros: int):
    from .oversquash import random_stochastic_lower

    rng = _rng(case, salt)
    if case.edge == "equal":  # uniform causal attention
        return [[Fraction(1, i + 1) if j <= i else Fraction(0) for j in range(n)] for i in range(n)]
    A = random_stochastic_lower(n, rng, min_nonzeros=min_nonzeros, denom=(1000 if case.edge == "dominant" else 16))
    return A


def check_b6(case: Case) -> list[Check]:
    from .oversquash import char_poly, diagonal_poly, root_multiplicity

    n = min(case.length, 7)
    A = _stochastic(case, 6, n, 1)  # any rows: diagonal-only rows and single off-diagonal non-zeros included
    ones = sum(A[i][i] == 1 for i in range(n))
    cp = char_poly(A)
    return [Check("b6", f"char. polynomial ≠ Π(t − Λ_ii) (n={n})", float(cp != diagonal_poly(A)), 0.0),
            Check("b6", f"|mult. of eigenvalue 1 − #(Λ_ii = 1)| (n={n}, {ones} ones)",
                  float(abs(root_multiplicity(cp, Fraction(1)) - ones)), 0.0)]


def check_b7(case: Case) -> list[Check]:
    from .oversquash import is_stochastic_lower, matmul_exact

    n = min(case.length, 8)
    P = _stochastic(case, 7, n, 1)
    for j in range(int(_rng(case, 70).integers(1, 4))):
        P = matmul_exact(_stochastic(Case(case.seed + j + 1, case.n, case.edge), 7, n, 1), P)
    return [Check("b7", f"product not row-stochastic lower-triangular (n={n})", float(not is_stochastic_lower(P)), 0.0)]


def check_b8(case: Case) -> list[Check]:
    from .oversquash import b8_tail_bound, b8_tail_lower, b8_tails

    n = max(2, case.length)
    L = int(_rng(case, 8).integers(1, 301))
    tail = b8_tails(n, L)[L]  # exact rationals; float() rounds monotonically, so ≤ survives
    return [Check("b8", f"Σ_(i≥2) [M^L]_(n,i) ≤ (n−1)(3/4)^L (n={n}, L={L})", float(tail), float(b8_tail_bound(n, L))),
            Check("b8", f"(n−1)(3/4)^L − (n−1)(n−2)(2/3)^L/2 ≤ tail (n={n}, L={L})", float(b8_tail_lower(n, L)), float(tail))]


ALL = [
    Statement("b1", "Lemma B.1: the last softmax weight shrinks when a token is inserted", check_b1),
    Statement("b2", "Lemma B.2: softmaxes of entrywise-close logits are close in total variation", check_b2),
    Statement("b4", "Prop. B.4: alternating logits keep δ = 2(e−1)/(e+1)", check_b4),
    Statement("thm42", "Thm 4.2/B.3: representational collapse, explicit layer-wise bound", check_thm42, "model"),
    Statement("thm51", "Thm 5.1/B.5: sensitivity bounded by the path sum", check_thm51, "model"),
    Statement("b6", "Lemma B.6: row-stochastic lower-triangular matrices have a simple eigenvalue 1", check_b6),
    Statement("b7", "Lemma B.7: products stay row-stochastic and lower-triangular", check_b7),
    Statement("b8", "Prop. B.8: deep stacks see the first token, geometrically fast", check_b8),
    Statement("b9", "Prop. B.9: one layer without positions sees count ratios only", check_b9, "model"),
]
