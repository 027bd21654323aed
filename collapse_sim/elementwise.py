"""An elementwise function traced once, replayed at every shape.

Inside a compiled program, rounding to a format is an elementwise function of ~100 primitive
ops, called at many shapes (one per pairwise tree level, per dot product site). Traced through
``jax.numpy`` at each shape, every call costs ~15-35 ms of Python (each ``jnp`` function is a
nested ``jit`` traced afresh for the new shape): in an emulated forward that was most of the
trace, ~1.4 s of 1.8 s at N = 4,096 (benchmarks/README.md). :func:`replay` traces the function
once at shape ``()`` per key and binds the recorded primitives again on the arguments' own
shapes, broadcasting the scalar operands of each op: the same primitives in the same order,
so the same program up to those broadcasts, and the same bits.

Only jaxprs whose every primitive is elementwise (:data:`ELEMENTWISE`, and nested ``jit``
calls of them) are replayed; for any other (a reduction, a conditional), for operands that vary
along a ``shard_map`` axis and for non-scalar extra operands, :func:`replay` calls the function
itself, at the arguments' shapes.
"""

from __future__ import annotations

import threading

import jax
import numpy as np
from jax import lax
from jax.extend import core as jcore

#: Primitives that act element by element (with every operand of one shape), whose parameters
#: name no shape: replayed at any shape after broadcasting their operands.
ELEMENTWISE = frozenset({
    "abs", "add", "and", "bitcast_convert_type", "ceil", "clamp", "clz", "convert_element_type", "div", "eq",
    "exp", "exp2", "floor", "ge", "gt", "integer_pow", "is_finite", "le", "log", "lt", "max", "min", "mul", "ne",
    "neg", "nextafter", "not", "or", "population_count", "pow", "reduce_precision", "rem", "round", "select_n",
    "shift_left", "shift_right_arithmetic", "shift_right_logical", "sign", "sqrt", "sub", "xor",
})
#: Identity-like primitives that take operands of any shapes as they are.
PASS_THROUGH = frozenset({"optimization_barrier", "copy", "copy_p"})
_NESTED = ("jit", "pjit", "closed_call", "core_call")

_CACHE: dict = {}
_LOCK = threading.Lock()


def _inner(e):
    """The jaxpr a nested call equation ``e`` runs (a ClosedJaxpr or a Jaxpr), or None."""
    return e.params.get("jaxpr") or e.params.get("call_jaxpr")


def _replayable(jaxpr) -> bool:
    for e in jaxpr.eqns:
        name = e.primitive.name
        if name in _NESTED:
            inner = _inner(e)
            if inner is None or not _replayable(getattr(inner, "jaxpr", inner)):
                return False
        elif name not in ELEMENTWISE and name not in PASS_THROUGH:
            return False
    return True


def _eval(jaxpr, consts, args):
    env = {}

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for e in jaxpr.eqns:
        ins = [read(v) for v in e.invars]
        name = e.primitive.name
        if name in _NESTED:
            inner = _inner(e)
            outs = _eval(getattr(inner, "jaxpr", inner), getattr(inner, "consts", ()), ins)
        else:
            if name in ELEMENTWISE and len(ins) > 1:
                shapes = [np.shape(i) for i in ins]
                shape = max(shapes, key=len)
                ins = [i if s == shape else lax.broadcast_in_dim(i, shape, ()) for i, s in zip(ins, shapes)]
            outs = e.primitive.bind(*ins, **e.params)
            if not e.primitive.multiple_results:
                outs = [outs]
        env.update(zip(e.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _varying(a) -> bool:
    """Whether ``a`` varies along a ``shard_map`` axis (its type's manual axes; ``vma`` in older JAX)."""
    t = jax.typeof(a)
    return bool(getattr(getattr(t, "manual_axis_type", None), "varying", None) or getattr(t, "vma", None))


def replay(fn, key, x, *scalars):
    """``fn(x, *scalars)`` for an elementwise ``fn`` of one array ``x`` and scalar (shape ``()``)
    operands ``scalars`` (arrays or tracers), returning one array of ``x``'s shape. ``key`` names
    ``fn`` with everything static it closes over (hashable); the trace at shape ``()`` is kept
    per ``key``, ``x``'s dtype, the scalars' dtypes and whether JAX's float64 is on. ``fn`` must
    close over static values only (a traced value it closed over would be kept in the cached trace)."""
    if any(np.shape(s) != () for s in scalars) or any(_varying(a) for a in (x, *scalars)):
        return fn(x, *scalars)  # non-scalar operands; inside shard_map (jnp inserts the casts its axes need)
    dtypes = tuple(jax.typeof(s).dtype for s in scalars)  # the operands' own dtypes (a weak type is not widened)
    full = (key, jax.config.jax_enable_x64, jax.typeof(x).dtype, dtypes)
    with _LOCK:
        entry = _CACHE.get(full)
    if entry is None:
        avals = [jax.ShapeDtypeStruct((), d) for d in (full[2], *full[3])]
        closed = jax.make_jaxpr(fn)(*avals)
        entry = closed if _replayable(closed.jaxpr) and len(closed.jaxpr.outvars) == 1 else False
        with _LOCK:
            _CACHE[full] = entry
    if entry is False:
        return fn(x, *scalars)
    out, = _eval(entry.jaxpr, entry.consts, [x, *scalars])
    if np.shape(out) != np.shape(x):  # an output that does not depend on x (a constant): x's shape
        out = lax.broadcast_in_dim(out, np.shape(x), ())
    return out
