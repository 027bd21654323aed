"""Row blocking shared by the JAX backends: work on blocks of rows by ``lax.map`` (so
memory stays bounded), and redo selected rows. Shape plumbing only: no arithmetic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def _cond(pred, if_true, if_false):
    """``lax.cond`` under a trace; a Python branch on concrete values (eager calls then
    compile only the branch they take)."""
    if isinstance(pred, jax.core.Tracer):
        return lax.cond(pred, if_true, if_false)
    return if_true() if bool(pred) else if_false()


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


def _fill_rows(out, ok, args, redo, b: int):
    """``out`` (n, m) with the rows that ``ok`` (n,) leaves false replaced by ``redo``,
    which maps blocks of ``b`` rows of each of ``args`` (arrays of n rows) to (b, m)
    rows. ``redo`` runs only for the blocks holding such a row: a Python loop on
    concrete values, a ``fori_loop`` over exactly those blocks under a trace (a loop
    with a cond per block would copy ``out`` each time)."""
    n, m = out.shape
    nb = -(-n // b)
    rows = tuple(_pad_rows(a, nb, b).reshape(nb * b, *a.shape[1:]) for a in args)
    okp = jnp.concatenate([ok, jnp.ones(nb * b - n, bool)])
    outp = _pad_rows(out, nb, b).reshape(nb * b, m)

    def one(i, out):
        new = redo(*(lax.dynamic_slice_in_dim(a, i * b, b) for a in rows))
        keep = lax.dynamic_slice_in_dim(okp, i * b, b)
        old = lax.dynamic_slice_in_dim(out, i * b, b)
        return lax.dynamic_update_slice_in_dim(out, jnp.where(keep[:, None], old, new), i * b, 0)

    if not isinstance(okp, jax.core.Tracer):
        for i in np.flatnonzero(~np.asarray(okp).reshape(nb, b).all(axis=1)):
            outp = one(int(i), outp)
        return outp[:n]

    def loop():
        need = ~jnp.all(okp.reshape(nb, b), axis=1)
        which = jnp.nonzero(need, size=nb, fill_value=0)[0]
        return lax.fori_loop(0, jnp.sum(need), lambda j, out: one(which[j], out), outp)

    return _cond(jnp.all(ok), lambda: outp, loop)[:n]
