"""Every (bound, measurement) pair of collapse_sim.theory, walked by one property test;
the corrected statements against their variants; the collapse scaling law."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest
from hypothesis import example, given, settings

from collapse_sim import testing as cst
from collapse_sim.theory import STATEMENTS, Case, check, forward_ops
from collapse_sim.theory import oversquash as osq
from collapse_sim.theory import softmax as sm

PINS = [Case(0, 1), Case(1, 6, "equal"), Case(2, 6, "dominant"), Case(3, 6, "maxnorm"), Case(4, 1, "n=1"),
        # thm42 found by a random search: RoPE, window 2, tokens (2, 2): the exact distance is 0, the two
        # 256-bit outputs differ by 2^-250 and straddle a float64 rounding boundary (observed is now
        # differenced at 256 bits, before any conversion to float64)
        Case(272, 2, "maxnorm"),
        # b9 found by the thorough profile: |s| = 1, |s'| = 3, outputs equal to 2^-250 that rounded to
        # float64 numbers an ulp apart (5.6e-17 > slack 1.4e-74) before b9_distance differenced at 256 bits
        Case(354413, 1, "maxnorm")]


def _budget(statement) -> int:
    """Examples per statement: the profile's count; a sixth of it for statements that
    run models (each example is a reference forward pass or an autodiff Jacobian),
    except under the ``search`` profile, whose full count is the bar for every test."""
    import os

    n = settings.default.max_examples
    if statement.cost == "cheap" or os.environ.get("HYPOTHESIS_PROFILE") == "search":
        return n
    return max(4, n // 6)


@pytest.mark.hypothesis  # the @given is inner: mark it so `-m hypothesis` selects it
@pytest.mark.parametrize("name", list(STATEMENTS))
def test_bound_walk(name):
    """observed ≤ bound for every statement, on random instances and the pinned edge
    cases n = 1, equal logits, one dominant logit, max-norm weights."""
    stmt = STATEMENTS[name]

    @settings(max_examples=_budget(stmt))
    @given(case=cst.cases())
    @example(case=PINS[0])
    @example(case=PINS[1])
    @example(case=PINS[2])
    @example(case=PINS[3])
    @example(case=PINS[4])
    @example(case=PINS[5])
    @example(case=PINS[6])
    def walk(case):
        checks = check(name, case)
        assert checks
        cst.assert_bound_holds(checks)

    walk()


def _b4_slack(n: int, prec: int):
    """Rounding of δ_n (two n-term softmaxes and a sum, all ≤ 2) and of the closed form at
    ``prec`` bits: 2·2γ_{8(n+2)}(2^-prec), as in the b4 check."""
    from collapse_sim.theory import gamma

    return 2 * 2 * gamma(8 * (n + 2), 2.0**-prec)


def test_prop_b4_limit_and_odd_rate():
    """Prop. B.4 (proofs/softmax_lemmas.md): δ_n = L = 2(e−1)/(e+1) = 2 tanh(½) for every even
    n; for odd n, δ_n − L = C/(n² − τ²) with τ = tanh(½), C = −L sech²(½) ≈ −0.72687: the
    limit is approached from below at rate 1/n², and n²(δ_n − L) is within |C|τ²/(n² − τ²)
    of C. δ_n is computed from the two softmaxes (not the closed form) at 128 bits."""
    prec = 128
    L, C = sm.b4_limit(prec), sm.b4_odd_constant(prec)
    with mpmath.workdps(40):
        assert mpmath.almosteq(L, 2 * mpmath.tanh(mpmath.mpf(1) / 2), 2.0**-120)
        assert mpmath.almosteq(C, -L / mpmath.cosh(mpmath.mpf(1) / 2) ** 2, 2.0**-120)
    for n in (2, 10, 1000):
        assert abs(sm.b4_tv(n, prec) - L) <= _b4_slack(n, prec)
    for n in (11, 101, 1001, 4001):
        d = sm.b4_tv(n, prec)
        assert d < L
        # n²(δ_n − L) carries n² times δ_n's rounding error
        assert abs(n * n * (d - L) - C) <= sm.b4_rate_deviation_bound(n, prec) + n * n * _b4_slack(n, prec)


def test_prop_b8_sharp_geometric_bound():
    """Prop. B.8 (proofs/stochastic_matrices.md): with M = ½(Λ + I), Λ uniform causal attention,
    f(i) = i − 1 and h(i) = (i − 1)(i − 2) are eigenvectors (M f = ¾ f, M h = ⅔ h), hence
    (n−1)(¾)^L − ½(n−1)(n−2)(⅔)^L ≤ Σ_{i≥2}[M^L]_{n,i} ≤ (n−1)(¾)^L. Exact rationals for every
    n ≤ 24 and L ≤ 300; the ratio tail/bound → 1, so the bound is attained asymptotically
    (3/4 = M_22, the largest diagonal entry after the first: the diagonal prediction)."""
    for n in range(2, 25):
        M = osq.b8_matrix(n)
        assert osq.is_stochastic_lower([[2 * v - (i == j) for j, v in enumerate(row)] for i, row in enumerate(M)])
        f = [Fraction(i) for i in range(n)]
        h = [Fraction(i * (i - 1)) for i in range(n)]
        assert [sum(a * b for a, b in zip(row, f)) for row in M] == [Fraction(3, 4) * v for v in f]
        assert [sum(a * b for a, b in zip(row, h)) for row in M] == [Fraction(2, 3) * v for v in h]
        assert max(M[i][i] for i in range(1, n)) == Fraction(3, 4)
        tails = osq.b8_tails(n, 300)
        for L, t in enumerate(tails):
            assert osq.b8_tail_lower(n, L) <= t <= osq.b8_tail_bound(n, L), (n, L)
        # sharp: 1 − tail/bound ≤ (n − 2)/2 · (8/9)^L, below 10^-14 at L = 300 for every n ≤ 24
        assert 1 - tails[300] / osq.b8_tail_bound(n, 300) <= Fraction(n - 2, 2) * Fraction(8, 9) ** 300


def test_lemma_b6_simple_iff_diagonal_below_one():
    """B.6's eigenvalue 1 is simple iff Λ_ii < 1 for every i ≥ 2, i.e. iff every row after
    the first has a non-zero left of the diagonal; "≥ 2 non-zeros per row" is sufficient,
    not necessary. A diagonal-only row adds a second eigenvalue 1; a row (1, 0, 0) has one
    non-zero and Λ_33 = 0, and 1 stays simple."""
    h = Fraction(1, 2)
    for last, mult in (([0, 0, 1], 2), ([1, 0, 0], 1)):
        A = [[Fraction(1), Fraction(0), Fraction(0)], [h, h, Fraction(0)], [Fraction(v) for v in last]]
        assert osq.is_stochastic_lower(A)
        assert osq.char_poly(A) == osq.diagonal_poly(A)
        assert osq.root_multiplicity(osq.char_poly(A), Fraction(1)) == mult


def _thm51_instance(n=10, n_layers=2):
    """Two layers, LayerNorm, no projections (the paper's setting), embeddings of
    standard deviation 0.05 so that every norm scale β₁ is about 0.05 ≪ 1."""
    from collapse_sim.model import ModelConfig, init_params

    P = init_params(ModelConfig(d=4, n_layers=n_layers, vocab=12, pe="none", norm="layernorm", value_proj=False, seed=7))
    E = np.random.default_rng(1).standard_normal((12, 4))
    E -= E.mean(axis=1, keepdims=True)
    P.arrays["embed"] = E * 0.05 / E.std(axis=1, keepdims=True)
    return P, np.arange(n) % 12


def test_thm51_variants():
    """Which reading of Thm 5.1 holds (proofs/thm51_oversquashing.md). The consistent one
    (1/β₁ inside ᾱ, a product of L matrices = L − 1 intermediate indices) holds; L
    intermediate indices (one extra factor, all diagonal entries ≥ 1) holds but is looser;
    1/β₁ once in C, β₁ dropped, or a layer's factor dropped all fail on this model."""
    P, toks = _thm51_instance()
    from collapse_sim.theory import gamma
    from collapse_sim.theory.trace import trace

    tr = trace(P, toks)
    assert np.max(tr.sigma["l0.n1"]) < 0.06  # β₁ ≪ 1: the regime where the normalisation matters
    obs = osq.sensitivity(P, toks, frozen=True)
    slack = gamma(forward_ops(len(toks), 4, 2), 2.0**-53) * obs.max()
    b = {v: osq.path_sum_bound(P, toks, tr, v) for v in osq.VARIANTS}
    cst.assert_bound_holds(obs, b["consistent"], slack, what="consistent")
    assert np.all(b["extra-index"] >= b["consistent"])
    cst.assert_bound_holds(obs, b["extra-index"], slack, what="extra index")
    for v in ("beta1-in-C", "no-beta1", "missing-index"):
        assert np.any(obs > b[v] + slack), v


def test_thm51_unfrozen_jacobian_is_reported_not_bounded():
    """Without assumptions (i)–(ii) the attention weights and norm scales depend on the
    input; the path-sum bound is then not a theorem. Frozen and unfrozen Jacobians differ."""
    P, toks = _thm51_instance(n=6)
    assert not np.allclose(osq.sensitivity(P, toks, frozen=True), osq.sensitivity(P, toks, frozen=False))


def test_thm42_bound_decays_like_one_over_n_without_positions():
    """One layer, no positions: every term of the bound is O(1/n), so n·bound stays bounded
    (it is non-increasing once the new key's weight ~ e^{range}/(n+1) dominates)."""
    from collapse_sim.model import ModelConfig, init_params
    from collapse_sim.theory.collapse import collapse_bound

    P = init_params(ModelConfig(d=8, n_layers=1, vocab=6, pe="none", seed=3))
    toks = np.random.default_rng(0).integers(0, 6, 400)
    b = collapse_bound(P, toks)
    n = np.arange(1, 401)
    assert np.max((n * b)[200:]) <= np.max((n * b)[100:200])
    # with sinusoidal APE in the residual stream the bound cannot decay: Δ^(0) = ‖PE[n+1] − PE[n]‖
    Ps = init_params(ModelConfig(d=8, n_layers=1, vocab=6, pe="sinusoidal", seed=3))
    assert np.min(collapse_bound(Ps, toks)[200:]) > 0.1 * np.max(collapse_bound(Ps, toks))


def test_rope_step_uses_the_model_tables():
    """The RoPE term of Thm 4.2's bound, ‖(R̃_{p+1} − R̃_p)u‖, with R̃ the float64 tables the model
    multiplies by: the 256-bit value from those tables lies within a factor 1 + 2^-50 + γ_{dh+4}
    of ``rope_shift`` (float64, exact-rational step factors) at p = 0, 7 and 10^6. The shortcut
    R̃_{p+1} = R̃_1 R̃_p (exact for true rotations) is off by ten times that at p = 10^6."""
    from collapse_sim import positional
    from collapse_sim.theory.trace import rope_shift, rope_step_factors

    from collapse_sim.theory import gamma

    # factors rounded up by ≤ 2^-50; x rounded to float64, dh/2 squares summed and √ in float64
    dh = 8
    tol = 2.0**-50 + gamma(dh + 4, 2.0**-53)
    rng = np.random.default_rng(5)
    for p in (0, 7, 10**6):
        u = rng.standard_normal(dh)
        cos, sin = positional.rope_tables(np.array([p, p + 1, 1]), dh)
        with mpmath.workprec(256):
            def rot(k, v):
                c, s_ = [mpmath.mpf(float(t)) for t in cos[k]], [mpmath.mpf(float(t)) for t in sin[k]]
                return [w for i in range(dh // 2) for w in (v[2 * i] * c[i] - v[2 * i + 1] * s_[i], v[2 * i] * s_[i] + v[2 * i + 1] * c[i])]

            U = [mpmath.mpf(float(t)) for t in u]
            x, x1 = rot(0, U), rot(1, U)
            exact = mpmath.sqrt(mpmath.fsum((a - b) ** 2 for a, b in zip(x1, x)))
            shortcut = mpmath.sqrt(mpmath.fsum((a - b) ** 2 for a, b in zip(rot(2, x), x)))  # (R̃_1 − I) R̃_p u
            xf = np.array([float(t) for t in x])[None, :]
        step = float(np.sqrt(np.sum(rope_step_factors(1, dh, p) ** 2 * (xf[:, 0::2] ** 2 + xf[:, 1::2] ** 2))))
        assert exact <= step * (1 + tol) and step <= exact * (1 + tol), (p, exact, step)
        if p == 0:
            assert rope_shift(xf)[0] == step
        if p == 10**6:
            assert abs(shortcut / exact - 1) > 10 * tol


def test_thm42_table_per_positional_setup():
    """``thm42_table``: observed distance, explicit bound and their ratio per n. Without positions
    and with ALiBi the theorem's hypothesis holds and the bound decays with n; with sinusoidal
    APE in the residual and with RoPE it does not hold, the check says so, and the bound stays at
    the LayerNorm cap 2√d‖g‖_∞ (valid, but it cannot become small: the ratio shows it)."""
    from collapse_sim.model import ModelConfig, init_params
    from collapse_sim.theory import gamma
    from collapse_sim.theory.collapse import thm42_table

    toks = np.random.default_rng(0).integers(0, 6, 32)
    cap = 2 * np.sqrt(8)
    for pe in ("none", "alibi", "sinusoidal", "rope"):
        P = init_params(ModelConfig(d=8, n_layers=1, vocab=6, pe=pe, seed=0))
        rows = thm42_table(P, toks, [4, 32])
        assert [r["n"] for r in rows] == [4, 32]
        for r in rows:
            cst.assert_bound_holds(r["observed"], r["bound"] * (1 + gamma(forward_ops(r["n"] + 1, 8), 2.0**-53)), what=pe)
            assert r["hypothesis_met"] == (pe == "none") and bool(r["hypothesis"]) != r["hypothesis_met"]
            assert r["ratio"] == r["observed"] / r["bound"]
        if pe in ("none", "alibi"):
            assert rows[1]["bound"] < 0.1 * rows[0]["bound"]
        else:
            assert all(r["bound"] == cap for r in rows)  # the final norm's step is np.minimum(·, 2√d·max|gain|), gain 1: exact
            assert rows[1]["ratio"] < 0.2


def test_predicted_collapse_length_from_the_bound():
    """n*(fmt): the first n where Thm 4.2's bound drops below 2^-p·‖y_n‖. It exists for a
    one-layer model without positions and grows with p; it never exists when sinusoidal
    APE enters the residual stream (the bound does not decay)."""
    from collapse_sim.model import ModelConfig, init_params
    from collapse_sim.theory.collapse import collapse_bound, predicted_collapse_length
    from collapse_sim.theory.trace import trace

    toks = np.random.default_rng(0).integers(0, 6, 600)
    P = init_params(ModelConfig(d=8, n_layers=1, vocab=6, pe="none", seed=3))
    tr = trace(P, toks)
    b, scale = collapse_bound(P, toks, tr), np.linalg.norm(tr.y, axis=1)
    ns = [predicted_collapse_length(b, scale, p) for p in (3, 4, 5)]
    assert all(n is not None for n in ns) and ns == sorted(ns) and ns[0] < ns[-1]
    Ps = init_params(ModelConfig(d=8, n_layers=1, vocab=6, pe="sinusoidal", seed=3))
    trs = trace(Ps, toks)
    assert predicted_collapse_length(collapse_bound(Ps, toks, trs), np.linalg.norm(trs.y, axis=1), 3) is None


def test_collapse_scaling_law():
    """log2 of the first-collapse length against p = 4..16 (custom formats, emulated, one
    compile each) has slope 1/r, r the decay exponent of the exact distance (r = 2 for
    zero_ones: D(n) = K·c/((c+n)(c+n+1))). docs/theory.md: each log2 n*(p) lies within
    1.5 octaves of the prediction (the first identical pair is a first-passage event of
    rounding noise), which bounds the least-squares slope error by slope_tolerance."""
    from collapse_sim.theory import scaling as sc

    ps = list(range(4, 17))
    r = sc.scaling_sweep(sc.scaling_model(), "zero_ones", ps, 1024)
    assert abs(r.rate - 2) <= 0.05
    assert all(m is not None for m in r.measured)
    dev = np.log2(np.array(r.measured, float) / np.array(r.predicted, float))
    assert np.max(np.abs(dev)) <= 1.5
    assert abs(r.slope - r.predicted_slope) <= sc.slope_tolerance(ps, 1.5)


def test_cor_b10_fp8_confuses_counts_that_differ_exactly():
    """Cor. B.10: with ALiBi (decaying positions) the count pair s vs s·1 becomes bitwise
    identical in fp8 at lengths where intervals certify the exact outputs differ."""
    from collapse_sim.model import ModelConfig, init_params
    from collapse_sim.theory.counting import b10_confusions

    P = init_params(ModelConfig(d=8, n_layers=1, vocab=6, pe="alibi", seed=0))
    hits, exact_equal = b10_confusions(P, "count_bernoulli", 64, "compute=e4m3fn,order=pairwise")
    assert hits.size > 0
    assert not set(hits) & set(exact_equal)


@pytest.mark.hypothesis
def test_strategies_produce_valid_objects():
    from hypothesis import strategies as st

    from collapse_sim.backends.emulated import Emulator

    @given(cst.formats(), cst.policies(), cst.small_models(), st.data())
    def inner(fmt, pol, P, data):
        assert 2 <= fmt.p <= 25
        Emulator(pol)  # every drawn policy is emulable
        P.validate()
        toks = data.draw(cst.sequences(P.config.vocab, max_len=8))
        assert toks.min() >= 0 and toks.max() < P.config.vocab
        from collapse_sim.families import make_pairs

        make_pairs(data.draw(cst.families()), 4, 8)

    inner()


def test_check_verdict_names_an_unmet_hypothesis():
    """A bound that holds outside its statement's hypothesis is not reported as a pass."""
    from collapse_sim.model import ModelConfig
    from collapse_sim.theory import Check
    from collapse_sim.theory.collapse import thm42_hypothesis

    assert Check("s", "q", 1.0, 2.0).verdict == "yes"
    assert Check("s", "q", 1.0, 2.0, hypothesis="why").verdict == "hypothesis not met"
    assert Check("s", "q", 3.0, 2.0, hypothesis="why").verdict == "NO"
    assert thm42_hypothesis(ModelConfig(d=4, pe="none")) is None
    assert "ALiBi" in thm42_hypothesis(ModelConfig(d=4, pe="alibi"))  # the decoder's too: a floor past ~1/slope
    assert "window" in thm42_hypothesis(ModelConfig(d=4, pe="none", window=3))
    assert "RoPE" in thm42_hypothesis(ModelConfig(d=4, pe="rope"))


def test_assert_bound_holds_fails_loudly():
    with pytest.raises(AssertionError, match="exceeds bound"):
        cst.assert_bound_holds(np.array([0.5, 2.0]), np.array([1.0, 1.0]), what="demo")
    with pytest.raises(AssertionError, match="NaN"):
        cst.assert_bound_holds(float("nan"), 1.0)
    cst.assert_bound_holds(1.0, 1.0)


GAUSSIAN_SETUPS = [("none", {}), ("none", {"norm": "layernorm"}), ("rope", {}), ("sinusoidal", {"sin_at": "keys"}),
                   ("sinusoidal", {"sin_at": "qk"}), ("sinusoidal", {"sin_at": "values"}), ("alibi", {})]


@pytest.mark.parametrize("pe,kw", GAUSSIAN_SETUPS, ids=[pe + "-" + "-".join(kw.values()) for pe, kw in GAUSSIAN_SETUPS])
def test_thm42_gaussian_model_bound_holds(pe, kw):
    """Thm 4.2 for the Gaussian model (proofs/thm42_collapse.md, "Gaussian model"), ids 0..n−1
    vs the last id repeated at position n+1: observed ‖y_n − y*_(n+1)‖₂ (256 bits) ≤ bound at
    every n = 1..32, the bound widened by γ_K(2^-53) and the measurement by 2γ_K(2^-256)·max|y|,
    K = 64(n + 1 + d) as for the decoder's one-layer check. The hypothesis verdict: met with no
    positions and with sinusoidal positions on the keys or values only; not met with RoPE,
    sinusoidal positions on the queries, or ALiBi (the new key's weight stays ≥ ~(1 − e^-m)e^-R)."""
    from collapse_sim.model import gaussian_config, init_params
    from collapse_sim.theory import gamma
    from collapse_sim.theory.collapse import collapse_bound, observed_distance, thm42_table

    N, d = 32, 8
    P = init_params(gaussian_config(d, pe, seed=1, **kw))
    toks = np.arange(N)
    n = np.arange(1, N + 1)
    K = forward_ops(n + 1, d)
    obs, scale = observed_distance(P, toks, 256, "arb")
    bound = collapse_bound(P, toks)
    slack = float(np.max(2 * gamma(K, 2.0**-256) * scale))  # the largest n's, for every n
    cst.assert_bound_holds(obs, bound * (1 + gamma(K, 2.0**-53)), slack, what=f"gaussian {pe} {kw}")
    rows = thm42_table(P, toks, [4, 32])
    met = pe == "none" or kw.get("sin_at") in ("keys", "values")
    assert all(r["hypothesis_met"] == met and bool(r["hypothesis"]) != met for r in rows)
    assert [r["bound"] for r in rows] == [bound[3], bound[31]]


def test_thm42_gaussian_bound_is_order_one_over_n_without_positions():
    """Not vacuous: without positions the new row is the same q, k, v, so the bound is
    2·α*_(n+1,n+1)-bound · max_j ‖v_j − v_n‖ with α* ≤ 1/(1 + n·e^{−R}), R = 2 max‖q‖ max‖k‖/√d
    (every score lies within max‖q‖max‖k‖/√d of 0). Hence n·bound ≤ 2·(2 max‖v‖)·e^R at every n:
    an explicit O(1/n) envelope from the draws."""
    from collapse_sim.model import gaussian_config, gaussian_draws, init_params
    from collapse_sim.theory import gamma
    from collapse_sim.theory.collapse import collapse_bound

    N, d = 32, 8
    c = gaussian_config(d, "none", seed=1)
    P = init_params(c)
    q, k, v = gaussian_draws(c, N)
    bound = collapse_bound(P, np.arange(N))
    n = np.arange(1, N + 1)
    R = 2 * np.max(np.linalg.norm(q, axis=1)) * np.max(np.linalg.norm(k, axis=1)) / np.sqrt(d)
    envelope = 4 * np.max(np.linalg.norm(v, axis=1)) * np.exp(R)
    cst.assert_bound_holds(n * bound, envelope * (1 + gamma(forward_ops(N, d), 2.0**-53)), what="n·bound")


def test_thm42_gaussian_alibi_bound_does_not_decay():
    """Why ALiBi fails the hypothesis for the Gaussian model: the new key sits at bias 0 and
    shared key j at −m(n+1−j), so Σ_j e^{low_j} ≤ e^R Σ_{k≥1} e^{−mk} = e^R/(e^m − 1) and
    the bound's q_out term stays ≥ 1/(1 + e^R/(e^m − 1)): bound_n ≥ 2·max_j‖v_j − v_n‖/(1 + e^R/(e^m − 1))
    at every n (R = 2 max‖q‖max‖k‖/√d), here with slope m = 1."""
    from collapse_sim.model import gaussian_config, gaussian_draws, init_params
    from collapse_sim.theory import gamma
    from collapse_sim.theory.collapse import collapse_bound

    N, d, m = 32, 8, 1.0
    c = gaussian_config(d, "alibi", seed=1, alibi_slope=m)
    q, k, v = gaussian_draws(c, N)
    bound = collapse_bound(init_params(c), np.arange(N))
    R = 2 * np.max(np.linalg.norm(q, axis=1)) * np.max(np.linalg.norm(k, axis=1)) / np.sqrt(d)
    spread = np.array([np.max(np.linalg.norm(v[: i + 1] - v[i], axis=1)) for i in range(N)])
    floor = 2 * spread / (1 + np.exp(R) / np.expm1(m))
    cst.assert_bound_holds(floor * (1 - gamma(forward_ops(N, d), 2.0**-53)), bound, what="ALiBi floor")
    assert floor[-1] > 0


@pytest.mark.parametrize("frozen", [True, False])
def test_thm51_jacobian_equals_central_differences(frozen):
    """The Jacobian of theory.trace (∂y_n/∂v_i^(0), from reverse-mode autodiff through the
    tapped forward) against central differences of the plain float64 forward, which
    perturbs the embedding rows instead (distinct tokens: row t_i is v_i^(0)): an
    independent path through model.forward.

    The model has zero query weights, no norms and no MLP: every score is 0, the
    attention weights are 1/i whatever the input, so Thm 5.1's assumptions (frozen
    weights and norm scales) hold exactly, the frozen and unfrozen Jacobians agree, and y
    is affine in v^(0). Central differences of an affine map have no truncation error
    for any step, so h = 1 (a power of two: ±h and ÷2h add no rounding beyond one
    rounding of each perturbed entry).

    Rounding, with u = 2^-53: along any chain of the forward or the reverse pass a layer
    rounds K_l = d (value projection) + (n + 1) (the weight 1/i and the weighted sum over
    ≤ n keys) + d (output projection) + 1 (residual) times; with the perturbed entry,
    K = L·K_l + 1. Then |fl(y) − y| ≤ γ_K·y_abs and |fl(J) − J| ≤ γ_K·J_abs, where y_abs and
    J_abs are the same computations on |weights| and |inputs| (Higham 2002, §3.1; any
    summation order, FMA or not). y_abs ≤ S := the |weights| model at |embedding| + h
    (monotone), J_abs is the |weights| model's Jacobian, each computed in float64 and so
    at most a factor 1/(1 − γ_K) low. The difference quotient D = (fl(y+) − fl(y−))/2h
    adds one rounding of the subtraction. Hence

        |J_trace − D| ≤ (γ_K (J_abs + S/h) + u |D|) / (1 − γ_K).
    """
    from collapse_sim.backends import make_backend
    from collapse_sim.model import ModelConfig, Params, forward, init_params
    from collapse_sim.theory import gamma
    from collapse_sim.theory.trace import jacobian

    d, L = 4, 2
    params = init_params(ModelConfig(d=d, n_layers=L, d_ff=0, vocab=6, pe="none", norm="none", out_proj=True,
                                     qk_std=0.0, seed=5))
    assert all(not params[f"l{l}.{w}"].any() for l in range(L) for w in ("wq", "wk"))  # the premise: uniform attention
    tokens = np.array([1, 2, 3, 4, 5])
    n, h, u = tokens.size, 1.0, 2.0**-53
    K = L * (2 * d + n + 2) + 1
    g = gamma(K, u)
    native = make_backend("native", "fp64")

    def y_last(p: Params) -> np.ndarray:
        return native.to_numpy(forward(p, tokens, native))[-1]

    def with_embed(p: Params, embed) -> Params:
        return Params(p.config, {**p.arrays, "embed": embed})

    D = np.empty((n, d, d))  # D[i, :, j] = ∂y_n/∂v_i[j]
    for i, t in enumerate(tokens):
        for j in range(d):
            e = np.zeros_like(params["embed"])
            e[t, j] = h
            D[i, :, j] = (y_last(with_embed(params, params["embed"] + e)) - y_last(with_embed(params, params["embed"] - e))) / (2 * h)
    J = jacobian(params, tokens, frozen=frozen)
    absolute = Params(params.config, {k: np.abs(v) for k, v in params.arrays.items()})
    S = y_last(with_embed(absolute, absolute["embed"] + h))
    J_abs = jacobian(absolute, tokens, frozen=frozen)
    bound = (g * (J_abs + S[None, :, None] / h) + u * np.abs(D)) / (1 - g)
    err = np.abs(J - D)
    assert np.all(err <= bound), f"max |J - D| = {err.max():.3g}, bound there {bound.flat[np.argmax(err)]:.3g}"
    assert np.abs(J).max() > 1e3 * bound.max()  # the check is not vacuous: J is far from 0 relative to the bound


def test_scaling_ulp_equals_the_format_spacing():
    """``scaling.ulp`` (float64 exponent bits) equals :meth:`Format.ulp` (exact rationals) of a
    p-bit format with float64's exponent range, bit for bit: at zero, float64 subnormals, the
    smallest normal and its neighbours, powers of two and their neighbours, the largest float64
    and random magnitudes of both signs."""
    from collapse_sim.formats import Format
    from collapse_sim.theory import scaling as sc

    tiny = 2.0**-1022
    edges = [0.0, -0.0, 5e-324, -5e-324, tiny, np.nextafter(tiny, 0), np.nextafter(tiny, 1), 1.0,
             np.nextafter(1.0, 0), np.nextafter(1.0, 2), 2.0**-600, 3 * 2.0**700, np.finfo(np.float64).max]
    rng = np.random.default_rng(9)
    y = np.array(edges + list(rng.standard_normal(200) * 2.0 ** rng.integers(-1074, 1000, 200)), dtype=np.float64)
    for p in (2, 11, 25, 53):
        fmt = Format(f"p={p}", p, -1022, 1023)
        got = sc.ulp(y, p)
        want = np.array([float(fmt.ulp(float(v))) for v in y])
        assert np.array_equal(got.view(np.uint64), want.view(np.uint64)), p
    with pytest.raises(ValueError, match="finite"):
        sc.ulp(np.array([1.0, np.inf]), 8)
