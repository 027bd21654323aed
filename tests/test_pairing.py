"""The pairs are what the families promise (collapse_sim/families.py): for every family,
separator spacing and n, the two members of the pair, read back as token sequences
from the runs and indices of :func:`make_pairs`, are the documented sequences (``v`` vs
``v*`` = ``v`` with its last token repeated, ``1^n`` vs ``1^(n+1)``, ...), and
:func:`pair_outputs` returns the outputs of exactly those sequences."""

from __future__ import annotations

import numpy as np
import pytest

from collapse_sim.families import FIRST_FREE, NAMES, ONE, PLUS, SEP, ZERO, make_pairs

N_MAX = 7


def member(pairs, side, n: int) -> list[int]:
    """The token sequence whose last output is the pair's ``side`` ("a" or "b") at length n."""
    run_i, kind, idx = getattr(pairs, side)
    run = pairs.runs[run_i]
    i = int(idx[n - 1])
    seq = [int(t) for t in run.tokens[: i + 1]]
    return seq + [int(run.probe[i])] if kind == "p" else seq


def with_sep(content, k: int | None) -> list[int]:
    """``content`` with SEP after every k-th token (none after the last token: it ends the prefix)."""
    out = []
    for i, t in enumerate(content):
        if k and i and i % k == 0:
            out.append(SEP)
        out.append(int(t))
    return out


def expected(name: str, n: int, a: list[int], k: int | None) -> tuple[list[int], list[int]]:
    """The documented pair at length n. The random families' content (v, s) is read off
    member a and checked for its alphabet and length here; the pairing is then fixed."""
    if name == "repeat_last":
        v = [t for t in a if t != SEP]
        assert len(v) == n and all(t >= FIRST_FREE for t in v)
        return with_sep(v, k), with_sep(v, k) + [v[-1]]
    if name == "count_bernoulli":
        s = [t for t in a if t != SEP]
        assert len(s) == n and set(s) <= {ZERO, ONE}
        return with_sep(s, k), with_sep(s, k) + [ONE]
    ones = lambda m: [ONE] * m  # noqa: E731
    plus = lambda m: [ONE if i % 2 == 0 else PLUS for i in range(2 * m - 1)]  # noqa: E731  (1+1+...+1, m ones)
    return {
        "ones": (with_sep(ones(n), k), with_sep(ones(n + 1), k)),
        "first_copy": (with_sep([ZERO] + ones(n), k), with_sep([ONE] + ones(n), k)),
        "zero_ones": (with_sep([ZERO] + ones(n), k), with_sep([ZERO] + ones(n + 1), k)),
        "last_copy": (with_sep(ones(n), k) + [ZERO], with_sep(ones(n + 1), k)),
        "sum_ones": (with_sep(plus(n), k), with_sep(plus(n + 1), k)),
    }[name]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("sep", [None, 1, 3])
@pytest.mark.parametrize("vocab", [FIRST_FREE + 1, 12, None])
def test_members_are_the_documented_pair(name, sep, vocab):
    pairs = make_pairs(name, N_MAX, vocab, seed=3, sep=sep)
    assert pairs.ns.tolist() == list(range(1, N_MAX + 1))
    for n in pairs.ns:
        a, b = member(pairs, "a", n), member(pairs, "b", n)
        ea, eb = expected(name, int(n), a, sep)
        assert (a, b) == (ea, eb), f"{name} sep={sep} n={n}: got {a} vs {b}, documented {ea} vs {eb}"
        if vocab is not None:
            assert max(a + b) < vocab


def test_pair_outputs_are_the_members_outputs():
    """``pair_outputs`` (one forward per run, prefix trick, probes) returns, at each n, the
    last output of each member run on its own. The reference backend computes every
    prefix in the same order whatever follows (masked terms are exact zeros), so the
    comparison is bit for bit."""
    from collapse_sim.backends import make_backend
    from collapse_sim.model import ModelConfig, forward, init_params
    from collapse_sim.pairing import pair_outputs

    params = init_params(ModelConfig(d=4, n_layers=1, vocab=FIRST_FREE + 2, pe="learned", max_len=16, seed=1))
    backend = make_backend("reference", "compute=bf16,order=exact")
    for name in ("repeat_last", "last_copy", "first_copy"):
        pairs = make_pairs(name, 3, params.config.vocab, seed=2, sep=2)
        A, B = pair_outputs(params, pairs, backend)
        for n in pairs.ns:
            for side, got in (("a", A), ("b", B)):
                alone = backend.to_numpy(forward(params, np.array(member(pairs, side, n)), backend))[-1]
                assert np.array_equal(got[n - 1], alone), f"{name} {side} n={n}"


def test_runs_without_probes_share_the_program_with_probes():
    """A bucketed emulated sweep of a family without probes (``ones``) after one with probes
    (``repeat_last``) at the same bucket compiles nothing: it runs the program with probes
    and drops their rows (pairing.shares_probe_program), with the bits of the forward without
    probes, ±0 aside (docs/semantics.md §10: probes never feed the stream); and not under
    stochastic rounding or past PROBE_PROGRAM_MAX_N."""
    import collapse_sim.pairing as pairing
    from collapse_sim.backends import make_backend
    from collapse_sim.compilation import snapshot
    from collapse_sim.model import ModelConfig, init_params
    from collapse_sim.pairing import collapse_sweep, shares_probe_program

    P = init_params(ModelConfig(d=4, n_layers=1, vocab=6, pe="rope", seed=11))
    be = make_backend("emulated", "compute=bf16,order=pairwise,kernel=online(4)")
    collapse_sweep(P, "repeat_last", 10, be, "bf16", bucket=16)
    t0 = snapshot()
    shared = collapse_sweep(P, "ones", 10, be, "bf16", bucket=16, keep_outputs=True)
    assert snapshot().since(t0).compiled == 0
    pairing_max = pairing.PROBE_PROGRAM_MAX_N
    try:
        pairing.PROBE_PROGRAM_MAX_N = 0  # the program without probes
        alone = collapse_sweep(P, "ones", 10, be, "bf16", bucket=16, keep_outputs=True)
    finally:
        pairing.PROBE_PROGRAM_MAX_N = pairing_max
    for a, b in zip(shared.outputs, alone.outputs):
        assert np.array_equal(a.view(np.uint64), b.view(np.uint64))
    assert not shares_probe_program(make_backend("emulated", "compute=bf16,mode=sr(4,seed=1)"), 16, 16)
    assert not shares_probe_program(be, pairing_max + 1, 16) and not shares_probe_program(be, 16, None)
    assert not shares_probe_program(make_backend("native", "bf16"), 16, 16)
    assert shares_probe_program(make_backend("native", "fp64"), 16, 16)  # float64: last bits only (its docstring)


def test_native_float64_runs_without_probes_agree_with_the_program_with_probes(monkeypatch):
    """A native float64 run of a family without probes in the program with probes (pairing.shares_probe_program)
    gives the outputs of the program without them to within what two float64 evaluations of one forward may
    differ by: each is within γ_k of the exact outputs (k = theory.forward_ops), so they differ by at most
    2·γ_k times the largest output."""
    import collapse_sim.pairing as pairing
    from collapse_sim.backends import make_backend
    from collapse_sim.model import ModelConfig, init_params
    from collapse_sim.pairing import collapse_sweep
    from collapse_sim.theory import forward_ops, gamma

    c = ModelConfig(d=8, n_layers=2, vocab=6, pe="rope", d_ff=8, seed=12)
    P, be, n = init_params(c), make_backend("native", "fp64"), 13
    shared = collapse_sweep(P, "ones", n, be, "fp64", bucket=16, keep_outputs=True)
    monkeypatch.setattr(pairing, "PROBE_PROGRAM_MAX_N", 0)  # the program without probes
    alone = collapse_sweep(P, "ones", n, be, "fp64", bucket=16, keep_outputs=True)
    tol = 2 * gamma(forward_ops(16, c.d, c.n_layers), 2.0 ** -53)
    for a, b in zip(shared.outputs, alone.outputs):
        assert np.all(np.abs(a - b) <= tol * np.max(np.abs(b)))
