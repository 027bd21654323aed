"""Hypothesis strategies and assertions for property-testing your own bounds.

    from hypothesis import given
    from collapse_sim.testing import small_models, sequences, assert_bound_holds

    @given(small_models(), st.data())
    def test_my_bound(P, data):
        toks = data.draw(sequences(P.config.vocab, max_len=16))
        assert_bound_holds(measure(P, toks), my_bound(P, toks), what="my bound")

Every strategy is deterministic given hypothesis' draws (models come from a drawn
seed), so failures shrink and replay. Needs the ``test`` extra (hypothesis).
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from .families import NAMES as FAMILY_NAMES
from .formats import BUILTINS, Format
from .policy import ORDER_KINDS, Policy
from .theory import EDGES, Case, Check
from .theory.checks import random_model


def formats(*, max_p: int = 25, builtin: bool = True, custom: bool = True) -> st.SearchStrategy[Format]:
    """Built-in formats with p ≤ max_p (emulable ones by default) that a policy takes (not the
    unsigned e5m3fnu, e8m0fnu), and custom ones."""
    parts = []
    if builtin:
        usable = {f for f in BUILTINS.values() if f.p <= max_p and f.why_not_arithmetic() is None}
        parts.append(st.sampled_from(sorted(usable, key=lambda f: f.name)))
    if custom:
        parts.append(st.builds(lambda p, emax, sub: Format(f"p={p},emax={emax}", p, 1 - emax, emax, subnormals=sub),
                               st.integers(2, max_p), st.integers(3, 100), st.booleans()))
    return st.one_of(parts)


def policies(*, max_p: int = 25) -> st.SearchStrategy[Policy]:
    """Policies with a compute format, an accumulate format at least as precise, and an order."""

    def build(compute, extra_p, order, block):
        acc = Format(f"p={compute.p + extra_p},emax={compute.emax}", compute.p + extra_p, compute.emin, compute.emax)
        order_s = f"blocked({block})" if order == "blocked" else order
        return Policy.parse(f"compute=({compute.spec()}),accumulate=({acc.spec()}),order={order_s}")

    return st.builds(build, formats(max_p=max_p - 4, builtin=False), st.integers(0, 4), st.sampled_from(ORDER_KINDS),
                     st.integers(2, 8))


def small_models(*, n_layers: int | None = None, pe: str | None = None, edge: str | None = None):
    """Small decoders (d ≤ 8, L ≤ 2) with every weight entry bounded by MAX_WEIGHT/√d
    (collapse_sim.theory.checks.random_model)."""
    return st.builds(lambda seed: random_model(np.random.default_rng(seed), edge=edge, n_layers=n_layers, pe=pe),
                     st.integers(0, 2**32 - 1))


def sequences(vocab: int, *, min_len: int = 1, max_len: int = 32) -> st.SearchStrategy[np.ndarray]:
    return st.lists(st.integers(0, vocab - 1), min_size=min_len, max_size=max_len).map(np.asarray)


def families() -> st.SearchStrategy[str]:
    return st.sampled_from(FAMILY_NAMES)


def cases(*, max_n: int = 24) -> st.SearchStrategy[Case]:
    """Instances for ``collapse_sim.theory.check``: a seed, a length, sometimes an edge case."""
    return st.builds(Case, st.integers(0, 2**32 - 1), st.integers(1, max_n), st.one_of(st.none(), st.sampled_from(EDGES)))


def assert_bound_holds(observed, bound=None, slack: float = 0.0, *, what: str = "bound") -> None:
    """Assert observed ≤ bound + slack, elementwise, one-sided. Accepts a :class:`Check`
    (or a list of them) in place of ``observed``. NaN anywhere fails."""
    if isinstance(observed, Check):
        return assert_bound_holds(observed.observed, observed.bound, observed.slack,
                                  what=f"{observed.statement}: {observed.quantity}")
    if isinstance(observed, (list, tuple)) and observed and isinstance(observed[0], Check):
        for c in observed:
            assert_bound_holds(c)
        return
    o, b = np.asarray(observed, np.float64), np.asarray(bound, np.float64)
    if np.any(np.isnan(o)) or np.any(np.isnan(b)):
        raise AssertionError(f"{what}: NaN in observed or bound")
    bad = o > b + slack
    if np.any(bad):
        i = np.unravel_index(np.argmax(o - b), np.shape(bad)) if np.ndim(bad) else ()
        raise AssertionError(f"{what}: observed {float(o[i] if o.ndim else o):.6g} exceeds bound "
                             f"{float(np.broadcast_to(b, o.shape)[i] if o.ndim else b):.6g} + slack {slack:.3g}"
                             + (f" at index {tuple(int(v) for v in i)}" if i != () else ""))
