"""Row blocking shared by the JAX backends: work on blocks of rows by ``lax.map`` (so
memory stays bounded), and redo selected rows in a program of their own. Shape plumbing
only: no arithmetic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._host import host_call


def _cond(pred, if_true, if_false):
    """``lax.cond`` under a trace; a Python branch on concrete values (eager calls then
    compile only the branch they take)."""
    if isinstance(pred, jax.core.Tracer):
        return lax.cond(pred, if_true, if_false)
    return if_true() if bool(pred) else if_false()


def _computed_once(x):
    """``x``, held in memory: XLA:CPU fuses a chain of cheap elementwise ops (a rounding, the
    scaling of :meth:`Emulator.exp2`, back to the scores) into each of its consumers, and one that
    broadcasts it (the weighted values' products, d_h of them per weight) then evaluates the chain
    once per product (flash2(64), one call at N = 1,024: 1.8 s against online(64)'s 0.45 s). A
    conditional on a predicate XLA cannot fold (the NaN count of ``x`` is not negative: always
    true) ends the fusion there; an optimization barrier does not survive XLA's passes. The bits
    are ``x``'s."""
    return lax.cond(jnp.sum(jnp.isnan(x), dtype=jnp.int32) >= 0, lambda: x, lambda: jnp.zeros_like(x))


def _pad_rows(a, nb, b):
    pad = nb * b - a.shape[0]
    return jnp.concatenate([a, jnp.zeros((pad, *a.shape[1:]), a.dtype)]).reshape(nb, b, *a.shape[1:])


def _map_rows(fn, args, b: int, scope=None):
    """``fn`` over blocks of ``b`` rows of each of ``args`` (arrays of n rows, zero-padded
    to whole blocks; ``fn`` takes the tuple of blocks), by ``lax.map``; every output
    rejoined to n rows. ``scope``: a context for block ``i`` (its index, traced) that each
    call of ``fn`` runs in (the emulator's draw scope, :meth:`Emulator.stream`)."""
    n = args[0].shape[0]
    nb = -(-n // b)
    blocks = tuple(_pad_rows(a, nb, b) for a in args)
    if scope is None:
        out = lax.map(fn, blocks)
    else:
        def scoped(ib):
            with scope(ib[0]):
                return fn(ib[1])

        out = lax.map(scoped, (jnp.arange(nb), blocks))
    return jax.tree.map(lambda o: o.reshape(nb * b, *o.shape[2:])[:n], out)


def _fill_rows(out, ok, args, redo, b: int, static=None, data=(), recheck=None):
    """``out`` (n, m) with the rows that ``ok`` (n,) leaves false replaced by
    ``redo(static, data, *blocks)``, which maps blocks of ``b`` rows of each of ``args``
    (arrays of n rows) to (b, m) rows, each row a function of its own rows of ``args``
    (and of ``data``) alone. ``redo`` must be a function of module level (its compiled
    programs are cached on it), ``static`` hashable, ``data`` a pytree of arrays: a
    traced value that ``redo`` captured would belong to the caller's trace.

    ``recheck``: a function like ``redo`` that returns ``(rows, ok)`` ((b, m) and (b,)), a
    second way to compute the rows that is right where its ``ok`` holds (a costlier
    certificate); the open rows go through it first, and only those it leaves open
    through ``redo``.

    The redo is not part of the caller's program: where some row is uncertified, a host
    call (:func:`collapse_sim.backends._host.host_call`, keyed by ``redo``, ``recheck``,
    ``static`` and ``b``, which therefore need host keys) gathers those rows into blocks of
    ``b`` (the last one padded with zero rows) and runs ``recheck``, then ``redo``, on each
    block as a program of its own (:func:`_redo_program`), compiled on first need once per
    (function, ``static``, shapes) and cached like any jitted program. The caller's program
    and the redo programs all go to the persistent compilation cache. Where every row is
    certified the host call is not taken (a conditional under a trace, a Python branch on
    concrete values)."""
    if not isinstance(ok, jax.core.Tracer):
        return jnp.asarray(_redo_rows(redo, recheck, static, b, out, ok, data, *args)) if not bool(np.all(ok)) else out

    def call():
        shape = jax.ShapeDtypeStruct(out.shape, out.dtype)
        new = host_call(_redo_rows, (redo, recheck, static, b), shape, out, ok, data, *args, vmap_method="sequential",
                        nested=True)
        return jnp.where(ok[:, None], out, new)  # the same values; of out's type also under shard_map

    return _cond(jnp.all(ok), lambda: out, call)


@functools.lru_cache(maxsize=None)
def _redo_program(redo):
    """``redo`` jitted, its first argument static: one compiled program per (``static``,
    shapes), compiled when first called."""
    return jax.jit(redo, static_argnums=0)


def _by_blocks(fn, static, b: int, rows, data, args):
    """``fn``'s program on the rows ``rows`` of ``args`` (numpy arrays), in blocks of ``b``
    (the last one padded with zero rows): each output's rows, in the order of ``rows``."""
    program = _redo_program(fn)
    outs = []
    for i in range(0, rows.size, b):
        r = rows[i:i + b]
        blocks = []
        for a in args:
            a = a[r]
            blocks.append(np.concatenate([a, np.zeros((b - r.size, *a.shape[1:]), a.dtype)]))
        outs.append(jax.tree.map(lambda o: np.asarray(o)[:r.size], program(static, data, *blocks)))
    return jax.tree.map(lambda *o: np.concatenate(o), *outs)


def _redo_rows(redo, recheck, static, b: int, out, ok, data, *args):
    """The host side of :func:`_fill_rows` (numpy arrays in and out)."""
    bad = np.flatnonzero(~np.asarray(ok, bool))
    out = np.array(out)  # a writable copy
    args = [np.asarray(a) for a in args]
    if bad.size and recheck is not None:
        rows, good = _by_blocks(recheck, static, b, bad, data, args)
        good = np.asarray(good, bool)
        out[bad[good]] = rows[good]
        bad = bad[~good]
    if bad.size:
        out[bad] = _by_blocks(redo, static, b, bad, data, args)
    return out
