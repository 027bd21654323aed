"""One compiled forward per (backend, config, shapes): no recompiles across calls."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..progress import phase
from ._hooks import ArrayPlumbing
from ._stored import run_stored


@functools.lru_cache(maxsize=64)
def _compiled(backend, fn, config, names: tuple[str, ...], with_probe: bool):
    def f(arrays, tokens, probe, data):
        b = backend if data is None else backend.bind(data)
        return fn(config, dict(zip(names, arrays)), tokens, probe if with_probe else None, b)

    return jax.jit(f, compiler_options=backend.compiler_options() or None)


def run_jitted(backend, fn, config, arrays: dict, tokens, probe, data=None):
    """``fn`` under jit, compiled once per (``backend``, config, shapes). ``data``: a pytree
    the compiled program takes as an argument; inside it the model runs on
    ``backend.bind(data)`` (backends equal on their static part then share the program)."""
    config = config.computation()  # configs differing only in initialisation share compiled code
    names = tuple(sorted(arrays))
    dt = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    vals = tuple(jnp.asarray(np.asarray(arrays[k]), dt) for k in names)
    f = _compiled(backend, fn, config, names, probe is not None)
    # converted on the host and copied: an XLA conversion (or jnp.asarray's lax.stage) is a program of its
    # own, compiled by each thread of collapse_sim.lanes that reaches it first (counts then follow timing)
    t = jax.device_put(np.asarray(tokens, np.int32))
    pr = jax.device_put(np.asarray(probe, np.int32) if probe is not None else np.zeros(t.shape, np.int32))
    key = (id(f), t.shape, tuple(v.shape for v in vals))
    what = f"the {backend.kind} forward, N = {t.shape[0]:,}{' with probes' if probe is not None else ''}"
    out = run_stored(f, backend, fn, config, names, probe is not None, (vals, t, pr, data), what)
    if out is not None:
        return out
    with phase(("running " if key in _seen else "tracing, then compiling or loading ") + what):
        out = f(vals, t, pr, data)
    _seen.add(key)
    return out


_seen: set = set()  # (compiled function's id, shapes) called before: only a label for progress lines


class JaxBackendBase(ArrayPlumbing):
    """What the native and emulated backends share: jit-cached runs and array plumbing.

    Subclasses set ``kind`` and ``label`` (the label identifies the arithmetic, so
    two backends with equal labels share compiled code).
    """

    kind = ""
    label = ""
    xp = jnp
    # The model's layers compile as one loop body (model._scan_layers): the emulated backend's
    # bits are its ops' (the same either way); the native backend's are not (XLA keeps bf16 values
    # in float32 inside an unrolled program, not across a loop's carry), so it runs them unrolled.
    scans_layers = False

    def __hash__(self) -> int:
        return hash((self.kind, self.label))

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.label == self.label

    def compiler_options(self) -> dict:
        """XLA options this backend compiles with (none: XLA's defaults)."""
        return {}

    def program_key(self) -> str:
        """The compiled forward's identity as text, the same in every process (backends/_stored.py):
        backends with equal keys compile the same program."""
        return f"{type(self).__qualname__}:{self.label}"

    def run(self, fn, config, arrays, tokens, probe):
        """Run a traceable model function under jit (cached per config and shape)."""
        return run_jitted(self, fn, config, arrays, tokens, probe)
