"""Theorem 4.2 / B.3 (representational collapse) with explicit constants.

For a stream v = t_1..t_N, row i of the model's output is y(t_1..t_i) and the
"repeat the last token" partner is y(t_1..t_i t_i). Causality makes every
representation of the shared prefix identical in both, so only the last row
differs; ``collapse_bound`` bounds ‖y_n − y*_{n+1}‖₂ layer by layer from the
weights' spectral norms and the float64 trace of v alone (the partner is never
run). Per layer ℓ, with Δ = ‖v_n^(ℓ) − v*_{n+1}^(ℓ)‖₂:

* norm Lipschitz constant over the ball of radius Δ around v_n (LayerNorm:
  ‖g‖_∞ / √(max(0, std − Δ/√d)² + ε); RMSNorm alike with the RMS; none: 1);
* score band: for j in the common support, s*_j − s_j lies in an interval of width
  w = 2·ε_q·max‖k_j‖/√d_h (ε_q: how far the query can move, including the RoPE
  step ‖(R̃_{n+1} − R̃_n)u‖ with the model's float64 tables and, for ``ape="scores"``,
  ‖PE[n+1] − PE[n]‖); ALiBi only
  shifts the band, which softmax ignores;
* total variation of the two attention rows (mass on the new key n+1 and on the
  key a sliding window drops included):
  TV ≤ min(2, 2·tanh(w/4) + 2·max(p_out, q_out)), with
  q_out = α*_{n+1,n+1} ≤ e^{S⁺} / (e^{S⁺} + Σ_j e^{s_j − slope − ε_q‖k_j‖/√d_h});
* head output: ‖Σ_j (α_j − α*_j) w_j‖ ≤ TV · max_j ‖w_j − w_n‖ (the weights differ
  by a zero-sum vector), the new value within ‖W_v‖·Lip·Δ of w_n;
* z: Δ_z ≤ Δ + ‖W_o‖ · (Σ_h Δ_h²)^½; MLP: Δ' ≤ Δ_z + ‖W_1‖‖W_2‖ · (norm₂ step);
* every norm step is min(Lip · Δ, 2√d‖g‖_∞): the image of a norm has diameter 2√d‖g‖_∞.

With Δ^(0) = 0 (no absolute PE in the residual stream) every term is O(1/n)
(q_out ≤ e^{range}/(n+1)); with sinusoidal APE in the residual Δ^(0) =
‖PE[n+1] − PE[n]‖ does not decay and neither does the bound; with RoPE the query's
step does not decay either. ``thm42_hypothesis`` names such models (the bound holds there
but cannot become small) and ``thm42_table`` shows observed, bound and ratio per n.
proofs/thm42_collapse.md derives each step. For ``kind="gaussian"`` (one head on the drawn
q, k, v, no projections, no residual) the bound is the attention step alone (``attention_step``,
shared with the decoder) with the repeated id's q, k, v moved only by positions, then the
output norm (proofs/thm42_collapse.md, "Gaussian model").
"""

from __future__ import annotations

import mpmath
import numpy as np

from .. import positional
from ..model import ConfigError, Params, alibi_slopes
from .trace import Trace, gain_max, rope_shift, spectral_norm as _spec, trace


def norm_lipschitz(params: Params, name: str, X: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Upper bound on the Lipschitz constant of norm ``name`` over the ℓ2 ball of the
    given radius around each row of X (std and RMS are 1/√d-Lipschitz)."""
    c = params.config
    if c.norm == "none":
        return np.ones(X.shape[0])
    g = gain_max(params, name)
    if c.norm == "layernorm":
        s = np.std(X, axis=1)
    else:
        s = np.sqrt(np.mean(X * X, axis=1))
    lo = np.maximum(0.0, s - radius / np.sqrt(c.d))
    return g / np.sqrt(lo * lo + c.norm_eps)


def norm_step(params: Params, name: str, X: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Bound on ‖norm(x) − norm(x')‖₂ for ‖x − x'‖₂ ≤ delta around each row x of X:
    the Lipschitz bound, capped by the diameter 2√d‖g‖_∞ of the norm's image
    (‖(x − μ)/σ‖₂ ≤ √d; the bias cancels)."""
    c = params.config
    if c.norm == "none":
        return delta
    cap = 2 * np.sqrt(c.d) * gain_max(params, name)
    return np.minimum(norm_lipschitz(params, name, X, delta) * delta, cap)


def _pe_step(params: Params, N: int) -> np.ndarray:
    """‖PE[i+1] − PE[i]‖₂ for i = 0..N-1 (zero without an absolute encoding)."""
    c = params.config
    if c.pe == "sinusoidal":
        T = positional.sinusoidal(N + 1, c.d)
    elif c.pe == "learned":
        T = params["pos"][: N + 1]
    else:
        return np.zeros(N)
    return np.linalg.norm(T[1:] - T[:-1], axis=1)


def attention_step(q, k, v, A, eq, ek, dv, slope: float, window: int | None) -> np.ndarray:
    """Steps 3–4 of proofs/thm42_collapse.md, shared by both model kinds: for every n, a bound
    on ‖Σ_j α_nj w_j − Σ_j α*_(n+1),j w*_j‖₂ for one head, read from v's float64 trace
    (q, k after positions, values v, attention rows A) when the differing row's query may move
    by ``eq``, its key by ``ek`` and its value by ``dv`` (arrays of N), the shared rows
    being equal: total variation of the two rows (score band and the mass off the common
    support) times the spread of the values."""
    N, dh = q.shape
    idx = np.arange(N)
    scale = 1 / np.sqrt(dh)
    kn = np.linalg.norm(k, axis=1)
    S = (q @ k.T) * scale - slope * (idx[:, None] - idx[None, :])
    lo_j = idx[:, None] + 2 - (window or N + 2)  # common support: lo_j <= j <= i
    common = (idx[None, :] <= idx[:, None]) & (idx[None, :] >= lo_j)
    kmax = np.max(np.where(common, kn[None, :], 0.0), axis=1)
    width = 2 * eq * kmax * scale
    if window is not None:
        drop = idx + 1 - window
        p_out = np.where(drop >= 0, A[idx, np.maximum(drop, 0)], 0.0)
    else:
        p_out = np.zeros(N)
    s_top = (np.sum(q * k, axis=1) + eq * kn + np.linalg.norm(q, axis=1) * ek + eq * ek) * scale
    low = S - slope - eq[:, None] * kn[None, :] * scale - s_top[:, None]
    low = np.where(common, low, -np.inf)
    m = np.max(low, axis=1)
    lse = np.where(np.isfinite(m), m + np.log(np.sum(np.exp(low - np.where(np.isfinite(m), m, 0)[:, None]), axis=1)), -np.inf)
    q_out = 1.0 / (1.0 + np.exp(lse))  # e^{S+} / (e^{S+} + Σ e^{low})
    tv = np.minimum(2.0, 2 * np.tanh(width / 4) + 2 * np.maximum(p_out, q_out))
    valid = (idx[None, :] <= idx[:, None]) & (idx[None, :] >= idx[:, None] + 1 - (window or N + 1))
    dist = np.sqrt(np.maximum(0.0, np.sum(v * v, 1)[None, :] + np.sum(v * v, 1)[:, None] - 2 * v @ v.T))
    radius = np.maximum(np.max(np.where(valid, dist, 0.0), axis=1), dv)
    return tv * radius


def _gaussian_bound(params: Params, tr: Trace) -> np.ndarray:
    """Thm 4.2's bound for the Gaussian model (proofs/thm42_collapse.md, "Gaussian model"):
    the differing row is the same id one position later, so only positions move its q, k, v
    (RoPE: the rotation step; sinusoidal: ‖PE[n+1] − PE[n]‖ where ``sin_at`` adds the table;
    otherwise 0); no projections (norm 1) and no residual, so the output moves by the
    attention step alone, then through the output norm."""
    c = params.config
    q, k, v, A = tr.q[0, 0], tr.k[0, 0], tr.v[0, 0], tr.attn[0, 0]
    N = q.shape[0]
    pe = _pe_step(params, N)
    at = {"keys": "k", "qk": "qk", "values": "v"}[c.sin_at] if c.pe == "sinusoidal" else ""
    eq = (pe if "q" in at else 0.0) + (rope_shift(q, c.rope_fraction) if c.pe == "rope" else 0.0) + np.zeros(N)
    ek = (pe if "k" in at else 0.0) + (rope_shift(k, c.rope_fraction) if c.pe == "rope" else 0.0) + np.zeros(N)
    dv = pe if "v" in at else np.zeros(N)
    slopes = alibi_slopes(c)
    delta = attention_step(q, k, v, A, eq, ek, dv, slopes[0] if slopes else 0.0, c.window)
    return norm_step(params, "n3", tr.x[1], delta)


def collapse_bound(params: Params, tokens, tr: Trace | None = None) -> np.ndarray:
    """Upper bound on ‖y(t_1..t_n) − y(t_1..t_n t_n)‖₂ for every n = 1..N (array of N)."""
    c = params.config
    if c.ssmax is not None:
        raise ConfigError("Thm 4.2's bound here does not model Scalable-Softmax's query factor; use ssmax=None")
    tr = tr or trace(params, tokens)
    if c.kind == "gaussian":
        return _gaussian_bound(params, tr)
    N = tr.tokens.size
    pe_step = _pe_step(params, N)
    delta = pe_step.copy() if c.ape == "residual" else np.zeros(N)
    pe_scores = pe_step if c.ape == "scores" else np.zeros(N)
    slopes = alibi_slopes(c) or np.zeros(c.n_heads)  # the model's own slopes (alibi_slope, alibi_at)
    for l in range(c.n_layers):
        p = f"l{l}."
        dh_in = norm_step(params, p + "n1", tr.x[l], delta)  # how far norm1(v) can move
        dqk_in = dh_in + pe_scores
        da2 = np.zeros(N)
        for h in range(c.n_heads):
            sl = slice(h * c.dh, (h + 1) * c.dh)
            nq = _spec(params[p + "wq"][:, sl])
            nk = _spec(params[p + "wk"][:, sl])
            nv = _spec(params[p + "wv"][:, sl]) if c.value_proj else 1.0
            q, k = tr.q[l, h], tr.k[l, h]
            eq = nq * dqk_in + (rope_shift(q, c.rope_fraction) if c.pe == "rope" else 0.0)
            ek = nk * dqk_in + (rope_shift(k, c.rope_fraction) if c.pe == "rope" else 0.0)
            da2 += attention_step(q, k, tr.v[l, h], tr.attn[l, h], eq, ek, nv * dh_in, slopes[h], c.window) ** 2
        no = _spec(params[p + "wo"]) if c.out_proj else 1.0
        dz = delta + no * np.sqrt(da2)
        if c.d_ff:
            delta = dz + _spec(params[p + "w1"]) * _spec(params[p + "w2"]) * norm_step(params, p + "n2", tr.z[l], dz)
        else:
            delta = dz
    return norm_step(params, "n3", tr.x[c.n_layers], delta)


def reference_differences(a, b, prec: int) -> np.ndarray:
    """``a − b`` for two arrays of the reference backend (mpf tuples), as an object array of
    ``mpmath.mpf`` rounded once to ``prec`` bits: differences of nearly equal outputs are
    taken before anything is rounded to float64 (two outputs 2^-256 apart can round to
    float64 numbers an ulp apart)."""
    from mpmath import libmp as mlib

    out = np.empty(np.shape(a), dtype=object)
    with mpmath.workprec(prec):
        for idx in np.ndindex(*out.shape):
            out[idx] = mpmath.mpf(mlib.mpf_sub(a[idx], b[idx], prec))
    return out


def reference_row_distances(a, b, prec: int) -> np.ndarray:
    """‖a_i − b_i‖₂ per row of two (N, d) reference arrays: differences and norms at
    ``prec`` bits (``reference_differences``), then rounded to float64."""
    diff = reference_differences(a, b, prec)
    with mpmath.workprec(prec):
        return np.array([float(mpmath.sqrt(mpmath.fsum(v * v for v in row))) for row in diff])


def observed_distance(params: Params, tokens, prec: int = 256, engine: str = "mpmath") -> tuple[np.ndarray, np.ndarray]:
    """‖y(t_1..t_n) − y(t_1..t_n t_n)‖₂ for n = 1..N at ``prec`` bits (differences and norms
    at ``prec`` bits, then rounded to float64), and the scale max(|y|, |y*|) per n.
    ``engine="mpmath"``: the reference backend, op by op; ``"arb"``: the arb ball backend
    (~100x faster; the differences are ball midpoints, within the balls' radii of the exact
    ones, and the norm is taken in float64)."""
    from ..backends import make_backend
    from ..model import forward

    if engine == "mpmath":
        r = make_backend("reference", str(prec))
    elif engine == "arb":
        r = make_backend("interval", f"arb{prec}")
    else:
        raise ValueError(f"unknown engine {engine!r}; use mpmath or arb")
    y, yp = forward(params, np.asarray(tokens), r, probe=np.asarray(tokens))
    if engine == "mpmath":
        dist = reference_row_distances(y, yp, prec)
    else:
        from ..backends.interval import flint_precision

        with flint_precision(r.flint, prec):
            dist = np.linalg.norm(np.array([[float((u - v).mid()) for u, v in zip(ra, rb)] for ra, rb in zip(y, yp)]), axis=1)
    y, yp = r.to_numpy(y), r.to_numpy(yp)
    return dist, np.maximum(np.max(np.abs(y), axis=1), np.max(np.abs(yp), axis=1))


def thm42_hypothesis(config) -> str | None:
    """None when the model meets what Thm 4.2's proof needs (proofs/thm42_collapse.md: the
    differing row starts equal and the shared keys' scores move together, so every term of
    the bound is O(1/n)): no positions, full causal attention; for the Gaussian model also
    sinusoidal positions on the keys or the values only (``sin_at``). Not ALiBi, in either
    model: the repeated token's key sits at bias 0 while every shared key falls back by
    the slope, so its weight keeps a floor once n passes ~1/slope (proofs/thm42_collapse.md).
    Otherwise the reason; the bound is still valid there, but nothing makes it small."""
    c = config
    why = []
    if c.kind == "gaussian" and c.pe == "sinusoidal":  # only the table's place matters (no residual stream)
        if c.sin_at == "qk":
            why.append("sinusoidal positions on the queries move the query by PE[n+1] − PE[n], "
                       "which turns every shared key's score and does not decay")
    elif c.pe in ("sinusoidal", "learned"):
        why.append("absolute positions " + ("in the residual stream: v_n and v*_(n+1) differ by PE[n+1] − PE[n]"
                                            if c.ape == "residual" else "in the scores move the query by W_q(PE[n+1] − PE[n])"))
    if c.pe == "alibi":
        why.append("ALiBi's bias keeps the new key's weight at least ~(1 − e^(−slope))·e^(−score range), "
                   "so the bound stops decaying once n passes ~1/slope (the smallest head's slope)")
    if c.pe == "rope" and positional.rope_pairs(c.dh, c.rope_fraction):
        why.append("RoPE turns each shared key's score by a key-dependent amount that does not decay with n")
    if c.ssmax is not None:
        why.append("Scalable-Softmax multiplies the repeated token's query by s·ln(n + 2) instead of s·ln(n + 1), "
                   "a query shift this bound does not model")
    if c.window is not None:
        why.append(f"a sliding window of {c.window} keeps the dropped key's weight ~1/{c.window}")
    return "; ".join(why) or None


def thm42_table(params: Params, tokens, ns, *, prec: int = 256, engine: str = "arb") -> list[dict]:
    """For each n in ``ns`` (prefixes of the stream ``tokens``): the observed distance
    ‖y_n − y*_(n+1)‖₂ (``prec`` bits), Thm 4.2's explicit bound, observed/bound, and
    whether the model meets the theorem's hypothesis (``thm42_hypothesis``). One forward
    pass and one trace serve every n (the prefix trick)."""
    tokens = np.asarray(tokens)
    ns = sorted(int(n) for n in ns)
    if not ns or ns[0] < 1 or ns[-1] > tokens.size:
        raise ValueError(f"lengths {ns} must lie in 1..{tokens.size} (the stream's length)")
    toks = tokens[: ns[-1]]
    obs, _ = observed_distance(params, toks, prec, engine)
    bound = collapse_bound(params, toks)
    why = thm42_hypothesis(params.config)
    return [{"n": n, "observed": float(obs[n - 1]), "bound": float(bound[n - 1]),
             "ratio": float(obs[n - 1] / bound[n - 1]) if bound[n - 1] > 0 else float("nan"),
             "hypothesis_met": why is None, "hypothesis": why or ""} for n in ns]


def predicted_collapse_length(bound: np.ndarray, scale: np.ndarray, p: int) -> int | None:
    """The n from which on (up to N) the bound stays below the format's resolution at
    the representation's scale, 2^-p · ‖y_n‖₂; None if it is not below at n = N.
    (Short lengths can be below by accident: at n = 1 without positions v and v*
    are the same point.)"""
    below = bound < 2.0**-p * scale
    if not below[-1]:
        return None
    above = np.nonzero(~below)[0]
    return int(above[-1]) + 2 if above.size else 1
