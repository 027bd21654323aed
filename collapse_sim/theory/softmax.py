"""Softmax facts: Lemma B.1 (with its exact gap), Lemma B.2 (with rates), Prop. B.4,
and the dispersion bound of *softmax is not enough*.

Every function takes and returns mpmath numbers (or plain floats), evaluated in a
local context at ``prec`` bits; total variation is the paper's δ(μ, ν) = Σ|μ − ν|
(no ½).
"""

from __future__ import annotations

import mpmath


def _ctx(prec: int):
    ctx = mpmath.MPContext()
    ctx.prec = prec
    return ctx


def softmax(x, prec: int = 200):
    ctx = _ctx(prec)
    x = [ctx.mpf(v) for v in x]
    m = max(x)
    e = [ctx.exp(v - m) for v in x]
    s = ctx.fsum(e)
    return [v / s for v in e]


def tv(p, q, prec: int = 200) -> "mpmath.mpf":
    """δ(p, q) = Σ|p_i − q_i| over the longer support (missing entries are 0)."""
    n = max(len(p), len(q))
    p = list(p) + [0] * (n - len(p))
    q = list(q) + [0] * (n - len(q))
    return _ctx(prec).fsum(abs(a - b) for a, b in zip(p, q))


# -- Lemma B.1 --------------------------------------------------------------

def b1_last_weight(a, c, prec: int = 200):
    """softmax([a, c])_n: the weight of the last entry of x = [a, c] (length n)."""
    return softmax(list(a) + [c], prec)[-1]


def b1_weight_bound(x) -> float:
    """Every softmax weight of x ∈ [m, M]^n is ≤ e^{M−m}/n."""
    return mpmath.exp(max(x) - min(x)) / len(x)


def b1_gap(a, b, c, prec: int = 200):
    """softmax(x)_n − softmax(x*)_{n+1} for x = [a, c], x* = [a, b, c], computed from
    the two softmaxes, and the closed form e^{b+c}/((S+e^c)(S+e^b+e^c)), S = Σ e^{a_k}."""
    ctx = _ctx(prec)
    direct = softmax(list(a) + [c], prec)[-1] - softmax(list(a) + [b, c], prec)[-1]
    S = ctx.fsum(ctx.exp(v) for v in a)
    closed = ctx.exp(ctx.mpf(b) + c) / ((S + ctx.exp(c)) * (S + ctx.exp(b) + ctx.exp(c)))
    return direct, closed


def b1_gap_bound(a, b, c) -> float:
    """gap ≤ e^{2(M−m)} / (n (n+1)) with n = len(a) + 1 and all entries in [m, M]."""
    allx = list(a) + [b, c]
    n = len(a) + 1
    return mpmath.exp(2 * (max(allx) - min(allx))) / (n * (n + 1))


# -- Lemma B.2 --------------------------------------------------------------

def b2_tv(x, xs, prec: int = 200):
    return tv(softmax(x, prec), softmax(xs, prec), prec)


def b2_rate_bound(x, xs, k: int) -> float:
    """If x and x* (same length n) agree after their first k entries, all entries in
    [m, M]: δ ≤ 2k e^{M−m}/n (the paper's lemma with the rate it leaves implicit)."""
    allx = list(x) + list(xs)
    return 2 * k * mpmath.exp(max(allx) - min(allx)) / len(x)


def b2_band_bound(x, xs) -> float:
    """If x*_i − x_i lies in an interval of width w for every i: δ ≤ 2 tanh(w/4).
    (The ratio argument; tight for two-point distributions.)"""
    d = [b - a for a, b in zip(x, xs)]
    return 2 * mpmath.tanh((max(d) - min(d)) / 4)


# -- Prop. B.4 --------------------------------------------------------------

def b4_tv(n: int, prec: int = 200):
    """δ(softmax x, softmax x*) for x = (1,0,1,0,…), x* = (0,1,0,1,…) of length n."""
    x = [1 - (i % 2) for i in range(n)]
    xs = [i % 2 for i in range(n)]
    return b2_tv(x, xs, prec)


def b4_limit(prec: int = 200):
    """L = 2(e−1)/(e+1) = 2 tanh(½)."""
    ctx = _ctx(prec)
    e = ctx.e
    return 2 * (e - 1) / (e + 1)


def b4_odd_constant(prec: int = 200):
    """C = lim n²(δ_n − L) over odd n: −L·sech²(½) = −8e(e−1)/(e+1)³ ≈ −0.72687."""
    ctx = _ctx(prec)
    e = ctx.e
    return -8 * e * (e - 1) / (e + 1) ** 3


def b4_closed_form(n: int, prec: int = 200):
    """δ_n exactly (proofs/softmax_lemmas.md): L for even n, L + C/(n² − tanh²(½)) for
    odd n, with L = 2 tanh(½) and C = −L·sech²(½)."""
    if n % 2 == 0:
        return b4_limit(prec)
    ctx = _ctx(prec)
    t = ctx.tanh(ctx.mpf(1) / 2)
    return b4_limit(prec) + b4_odd_constant(prec) / (n * n - t * t)


def b4_rate_deviation_bound(n: int, prec: int = 200):
    """|n²(δ_n − L) − C| = |C|·τ²/(n² − τ²) for odd n ≥ 1, τ = tanh(½): how far n²(δ_n − L)
    is from its limit C (itself O(1/n²))."""
    ctx = _ctx(prec)
    t2 = ctx.tanh(ctx.mpf(1) / 2) ** 2
    return abs(b4_odd_constant(prec)) * t2 / (n * n - t2)
