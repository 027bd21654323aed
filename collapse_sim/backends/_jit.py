"""One compiled forward per (backend, config, shapes): no recompiles across calls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=64)
def _compiled(backend, fn, config, names: tuple[str, ...], with_probe: bool):
    def f(arrays, tokens, probe):
        return fn(config, dict(zip(names, arrays)), tokens, probe if with_probe else None, backend)

    return jax.jit(f)


def run_jitted(backend, fn, config, arrays: dict, tokens, probe):
    names = tuple(sorted(arrays))
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    vals = tuple(jnp.asarray(np.asarray(arrays[k]), dt) for k in names)
    f = _compiled(backend, fn, config, names, probe is not None)
    t = jnp.asarray(tokens, jnp.int32)
    pr = jnp.asarray(probe, jnp.int32) if probe is not None else jnp.zeros_like(t)
    return f(vals, t, pr)
