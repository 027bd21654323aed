"""The pairwise order over long sums and dot products (backends/emulated/orders.py, ops.py):
tests/test_policy_ops.py and tests/test_sr_draws.py check sums of at most 40 terms; here sums and
dot products of 100 terms (zero padding to 128, seven levels) on adversarial bf16 inputs against
exact rationals, and stochastic rounding's draws of a long sum and of a dot product (its products'
rounding, then the levels) against the text of docs/semantics.md §2."""

from __future__ import annotations

import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_sim import enable_x64
from collapse_sim.backends.emulated import Emulator
from collapse_sim.formats import parse
from collapse_sim.policy import Order, Policy
from collapse_sim.rounding import Mode, round_to
from oracles import fraction_round
from test_policy_ops import _eq, _py_sum
from test_sr import sr_parts
from test_sr_draws import Scopes

enable_x64()

BF16 = parse("bf16")


def _adversarial(rng, shape):
    """bf16 values that make pairwise adds tie, cancel, underflow and overflow: ordinary values,
    1 and 2^-8 (1 + 2^-8 is a bf16 midpoint), subnormal multiples of 2^-133, values near the
    largest finite bf16 (their sums overflow), a value and its negation, and zeros of both signs."""
    x = rng.standard_normal(shape) * 2.0 ** rng.integers(-20, 20, shape)
    kind = rng.integers(0, 8, shape)
    x = np.where(kind == 1, np.where(rng.random(shape) < 0.5, 1.0, 2.0**-8), x)
    x = np.where(kind == 2, rng.integers(-7, 8, shape) * 2.0**-133, x)
    x = np.where(kind == 3, rng.choice([1.0, -1.0], shape) * 2.0**127 * 1.99, x)
    x = np.where(kind == 4, np.roll(-x, 1, axis=-1), x)  # cancels its left neighbour's value
    x = np.where(kind == 5, rng.choice([0.0, -0.0], shape), x)
    return np.asarray(round_to(jnp.asarray(x), BF16))


def _product(a: float, b: float, acc, mode: str) -> float:
    """One product rounded to ``acc`` (bf16 products are exact in float64; a zero keeps its sign)."""
    p = a * b
    return p if p == 0 or not math.isfinite(p) else float(fraction_round(Fraction(p), acc, mode))


@pytest.mark.parametrize("mode", ["rne", "rd", "ro"])
def test_long_pairwise_sums_and_dots_match_rationals(mode, n=100):
    """bf16 sums and dot products of n = 100 terms in the pairwise order (padded to 128), every
    add and product rounded in ``mode``, against the order written again with exact rationals."""
    rng = np.random.default_rng(n)
    x, y = _adversarial(rng, (3, n)), _adversarial(rng, (3, n))
    emu = Emulator(Policy(BF16, BF16, BF16, BF16, Order("pairwise"), mode=Mode.parse(mode)))
    pw = Order("pairwise")
    got_sum, got_dot = (np.asarray(v) for v in jax.jit(lambda a, b: (emu.sum(a), emu.dot(a, b)))(
        jnp.asarray(x, emu.dtype), jnp.asarray(y, emu.dtype)))
    for b in range(3):
        want = _py_sum(list(x[b]), pw, BF16, BF16, mode)
        assert _eq(got_sum[b], want), (mode, n, b, got_sum[b], want)
        prods = [_product(float(u), float(v), BF16, mode) for u, v in zip(x[b], y[b])]
        want = _py_sum(prods, pw, BF16, BF16, mode)
        assert _eq(got_dot[b], want), (mode, n, b, got_dot[b], want)


def test_long_pairwise_draws_as_the_text_says(m=100):
    """A bf16 sum and a dot product of m = 100 terms over a batch of 3 rows under sr(8), pairwise,
    against the text's slots (docs/semantics.md §2) computed with plain integers: the dot
    product's products take one slot of (3, m) draws, each tree level one slot of (3, pairs)
    draws, pair i of a row its element i, and the output rounding the next slot."""
    fmt, r, seed = BF16, 8, 6
    rng = np.random.default_rng(m)
    x = np.asarray(rng.integers(1, 256, (3, m)) * 2.0 ** rng.integers(-12, 0, (3, m)))  # bf16 values
    y = np.asarray(rng.integers(-255, 256, (3, m)) * 2.0 ** rng.integers(-12, 0, (3, m)))

    def sr(v, u):  # §1: up iff t + u >= 2^r, for the exact value v
        down, up, F, D = sr_parts(float(v), fmt)  # every product and sum here is exact in float64
        t = F >> (D - r) if D >= r else F << (r - D)
        return up if t + u >= 2**r else down

    def tree(sc, rows):
        size = 1 << (m - 1).bit_length()
        level = [list(row) + [0.0] * (size - m) for row in rows]
        while len(level[0]) > 1:
            half = len(level[0]) // 2
            u = np.array(sc.draws(3 * half, r)).reshape(3, half)
            level = [[sr(Fraction(row[2 * i]) + Fraction(row[2 * i + 1]), u[b, i]) for i in range(half)]
                     for b, row in enumerate(level)]
        out = sc.draws(3, r)
        return [sr(Fraction(row[0]), ui) for row, ui in zip(level, out)]

    emu = Emulator(f"compute=bf16,order=pairwise,mode=sr({r},seed={seed})")
    got_sum = np.asarray(jax.jit(lambda v: emu.fresh().sum(v))(jnp.asarray(x)))
    got_dot = np.asarray(jax.jit(lambda v, w: emu.fresh().dot(v, w))(jnp.asarray(x), jnp.asarray(y)))
    assert got_sum.tolist() == tree(Scopes(seed), x.tolist())
    sc = Scopes(seed)
    u = np.array(sc.draws(3 * m, r)).reshape(3, m)
    prods = [[sr(Fraction(x[b, k]) * Fraction(y[b, k]), u[b, k]) for k in range(m)] for b in range(3)]
    assert got_dot.tolist() == tree(sc, prods)
