"""Honest summaries: a pair that is equal in exact arithmetic is no collapse.

The rule (collapse.exactly_equal) is checked against an independent oracle: the arb
interval backend at 128 bits certifies, per n, that the exact outputs differ. Every
pair the rule calls distinct must be certified distinct; every pair it calls equal
must not be (its enclosures overlap).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

import collapse_sim
from collapse_sim.experiments.collapse import (CollapseResult, collapse_summary, collapse_sweep,
                                               describe_first_collapse, exactly_equal, first_collapse, pair_outputs)
from collapse_sim.experiments.sweep import sweep_summary
from collapse_sim.families import NAMES, make_pairs
from collapse_sim.model import ModelConfig, init_params

N = 8
SEED = 0  # repeat_last's base sequence starts 5 5 5 4 with vocab 6: n = 1, 2, 3 are a^k vs a^(k+1)


def _certified(params, family, n_max, seed=SEED):
    from collapse_sim.backends import make_backend
    from collapse_sim.backends.interval import certify_distinct

    pairs = make_pairs(family, n_max, params.config.vocab, seed=seed)
    return certify_distinct(*pair_outputs(params, pairs, make_backend("interval", "arb128"), raw=True)), pairs


@pytest.mark.parametrize("pe,ape,sink", [("none", "residual", False), ("alibi", "residual", False),
                                         ("rope", "residual", False), ("sinusoidal", "scores", False),
                                         ("sinusoidal", "residual", False), ("rope", "residual", True)])
def test_exact_equality_rule_agrees_with_certified_intervals(pe, ape, sink):
    collapse_sim.enable_x64()
    params = init_params(ModelConfig(d=4, n_layers=2, vocab=6, pe=pe, ape=ape, seed=SEED, sink=sink))
    seen_equal = 0
    for family in NAMES:
        distinct, pairs = _certified(params, family, N)
        rule = exactly_equal(params.config, pairs)
        seen_equal += int(rule.sum())
        np.testing.assert_array_equal(distinct, ~rule, err_msg=f"{family}, pe={pe}, ape={ape}")
    if sink or (pe == "sinusoidal" and ape == "residual"):
        assert seen_equal == 0  # positions in the values, or a sink whose share changes with n: no pair is equal
    else:
        # ones (every n), repeat_last (n = 1..3 for this seed), count_bernoulli's leading ones
        assert seen_equal >= N + 3


def test_first_collapse_is_certified_distinct_and_not_n1():
    """The README's case in small: repeat_last, no positions. Every format is identical at
    n = 1 (a vs a a); the first collapse is the first identical pair the oracle proves distinct."""
    collapse_sim.enable_x64()
    from collapse_sim.backends import backend_for_format

    params = init_params(ModelConfig(d=4, n_layers=1, vocab=6, pe="none", seed=SEED))
    r = collapse_sweep(params, "repeat_last", 16, backend_for_format("emulated", "p=4,emax=15"), "p=4,emax=15",
                       seed=SEED)
    assert r.first_identical() == 1 and r.exact_equal[:3].all()
    n = r.first_collapse()
    assert n is not None and n > 3
    distinct, _ = _certified(params, "repeat_last", n)
    assert distinct[n - 1] and r.identical[n - 1]
    # every identical pair before it is equal in exact arithmetic
    assert not (r.identical & ~r.exact_equal)[: n - 1].any()


def _result(identical, exact, nonfinite=None):
    ns = np.arange(1, len(identical) + 1)
    z = np.zeros(len(ns))
    nf = np.zeros(len(ns), bool) if nonfinite is None else np.asarray(nonfinite)
    return CollapseResult("emulated:compute=bf16", "bf16", ns, z, z, np.asarray(identical), nf, 1.0, 0.0,
                          np.asarray(exact))


def test_first_collapse_and_identical_from_skip_exact_pairs():
    T, F = True, False
    r = _result([T, T, F, T, F, T, T, T], [T, T, F, F, F, F, F, T])
    assert r.first_identical() == 1 and r.first_collapse() == 4
    assert first_collapse(r.ns, r.identical, r.nonfinite, r.exact_equal) == 4
    assert r.collapsed_from() == 6  # n = 8 is exact, 6 and 7 are identical collapses
    nf = _result([T, T, T], [F, F, F], nonfinite=[T, F, F])
    assert nf.first_collapse() == 2  # a non-finite pair is no collapse either
    never = _result([T, F, F], [T, F, F])
    assert never.first_collapse() is None and never.collapsed_from() is None
    allx = _result([T, T, T], [T, T, T])
    assert allx.first_collapse() is None and allx.collapsed_from() is None
    assert describe_first_collapse(never.ns, never.identical, never.nonfinite, never.exact_equal) == "never (n <= 3)"
    assert describe_first_collapse(allx.ns, allx.identical, allx.nonfinite, allx.exact_equal) == \
        "none: exactly equal at every n <= 3"
    # without an exact-equality column nothing is excluded: the old behaviour
    old = CollapseResult("x", "bf16", never.ns, never.l1, never.linf, never.identical, never.nonfinite, 1.0, 0.0)
    assert old.first_collapse() == 1


def test_collapse_summary_table():
    T, F = True, False
    text = collapse_summary([_result([T, T, F, T], [T, T, F, F]), _result([T, F, F, F], [T, F, F, F])])
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["format", "backend"] and "first collapse n" in lines[0]
    assert lines[1].split()[:9] == ["bf16", "emulated", "4", "4", "(the", "last", "n", "only)", "1-2"]
    assert lines[2].split()[:4] == ["bf16", "emulated", "never", "(n"]
    assert "exact arithmetic" in lines[-1]
    # under stochastic rounding the pair's members take different draws: the table says so
    sr = dataclasses.replace(_result([T, F, F, F], [T, F, F, F]), fmt="compute=bf16,mode=sr(8,seed=1)")
    said = collapse_summary([sr]).splitlines()[-1]
    assert said.startswith("compute=bf16,mode=sr(8,seed=1): under stochastic rounding") and "noise" in said
    assert "stochastic" not in text


def test_sweep_summary_lists_every_cell():
    rows = []
    for seed, ident, exact in [(0, [1, 1, 0, 1], [1, 0, 0, 0]), (1, [1, 0, 0, 0], [1, 0, 0, 0]),
                               (2, [1, 1, 1, 1], [1, 1, 1, 1])]:
        for n, (i, e) in enumerate(zip(ident, exact), 1):
            rows.append({"format": "bf16", "family": "repeat_last", "pe": "none", "seed": seed, "n": n,
                         "bitwise_identical": bool(i), "nonfinite": False, "exact_equal": bool(e)})
    text = sweep_summary(pd.DataFrame(rows))
    body = [ln for ln in text.splitlines() if ln.strip().startswith("bf16")]
    assert len(body) == 3, text
    assert body[0].rstrip().endswith(" 2")
    assert body[1].rstrip().endswith("never (n <= 4)")
    assert body[2].rstrip().endswith("none: exactly equal at every n <= 4")


def test_collapse_cli_prints_first_collapse_not_n1(tmp_path, capsys):
    """``collapse --pe none --family repeat_last`` no longer reports n = 1."""
    from collapse_sim.cli import main

    rc = main(["collapse", "--family", "repeat_last", "--format", "(p=4,emax=15),fp64", "--pe", "none", "--d", "4",
               "--vocab", "6", "--max-len", "16", "--seed", str(SEED), "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    row = next(ln for ln in out.splitlines() if ln.startswith("p=4"))
    first = row.split()[2]
    assert first.isdigit() and int(first) > 3, row
    assert "1-3" in row  # the exactly-equal pairs are named, not counted
    csv = pd.read_csv(tmp_path / "collapse.csv")
    assert csv.loc[csv["n"] <= 3, "exact_equal"].all() and not csv.loc[csv["n"] > 3, "exact_equal"].any()
