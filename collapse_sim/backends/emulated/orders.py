"""The reduction orders: the specification of every emulated sum (docs/semantics.md §3.1).

``sequential`` (left to right), ``pairwise`` (a tree over a power-of-two padding),
``kahan`` (compensated) and the split of the ``blocked`` order into blocks, each add
one correctly rounded add in the accumulate format. The ``exact`` order and the blocks'
exact sums are :func:`exact.exact_sum`; :func:`ops.reduce_sum` puts them together.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ...formats import Format
from ...rounding import round_to
from .carrier import carrier_add


def _rounded_add(acc: Format, mode):
    """One correctly rounded add in the accumulate format."""

    def add(u, v):
        return round_to(carrier_add(u, v, mode), acc, mode)

    return add


def _sequential(x, add):
    xs = jnp.moveaxis(x, -1, 0)

    def step(s, v):
        return add(s, v), None

    s, _ = lax.scan(step, xs[0], xs[1:])
    return s


def _pairwise(x, add):
    n = x.shape[-1]
    size = 1 << max(0, (n - 1).bit_length())
    if size != n:
        x = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], size - n), x.dtype)], axis=-1)
    while x.shape[-1] > 1:
        x = add(x[..., 0::2], x[..., 1::2])
    return x[..., 0]


def _kahan(x, add, valid=None):
    """Compensated summation of the ``valid`` terms only (masked terms must be zeros): the
    first valid term starts the sum as it is (not rounded to the accumulator), as §3.1's
    ``s = x_0`` over the unmasked terms (§3.3); with none, the sum is 0."""
    xs = jnp.moveaxis(x, -1, 0)
    vs = jnp.ones(xs.shape, bool) if valid is None else jnp.moveaxis(valid, -1, 0)

    def step(carry, inp):
        s, c, started = carry
        v, ok = inp
        y = add(v, -c)
        t = add(s, y)
        c2 = add(add(t, -s), -y)
        return (jnp.where(ok, jnp.where(started, t, v), s), jnp.where(ok & started, c2, c), started | ok), None

    (s, _, _), _ = lax.scan(step, (xs[0], jnp.zeros_like(xs[0]), vs[0]), (xs[1:], vs[1:]))
    return s


def _blocked(a, b: int, axis: int):
    """``a`` zero-padded along ``axis`` (the contraction axis) to whole blocks of ``b`` and
    split: x (m, k) -> (m, nb, b) for axis 1, w (k, n) -> (nb, b, n) for axis 0."""
    k = a.shape[axis]
    nb = -(-k // b)
    pad = [(0, 0), (0, 0)]
    pad[axis] = (0, nb * b - k)
    a = jnp.pad(a, pad)
    return a.reshape(a.shape[0], nb, b) if axis == 1 else a.reshape(nb, b, a.shape[1])
