"""Host calls through XLA's typed FFI (collapse_sim.backends._host): what crosses, what fails,
and the persistent compilation cache holding the programs that make them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from collapse_sim.backends import _host
from collapse_sim.backends._host import HostCallError, host_call, host_key

DTYPES = [np.bool_, np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64,
          np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.complex64, np.complex128]


def _flip(x):
    """Every bit of each element flipped (a bool negated): a function of the bits alone."""
    if x.dtype == np.bool_:
        return ~x
    u = np.dtype(f"u{x.dtype.itemsize}") if x.dtype.kind != "c" else np.dtype(f"u{x.dtype.itemsize // 2}")
    return (~x.view(u)).view(x.dtype)


def _flip_all(scale, xs):
    """Each array's bits flipped, and the first one's sum times ``scale`` (float64)."""
    return tuple(_flip(x) for x in xs), np.float64(scale) * np.sum(xs[0], dtype=np.float64)


def _bits(a):
    a = np.asarray(a)
    return a.view(np.uint8) if a.dtype != np.bool_ else a


def test_every_dtype_crosses_bit_for_bit():
    """Arguments of every dtype reach the function and its results come back with all their
    bits (NaN payloads, signed zeros, subnormals): each bit flipped on the host once."""
    rng = np.random.default_rng(4)
    xs = tuple(rng.integers(0, 256, (3, 5, np.dtype(d).itemsize), dtype=np.uint8).view(d).reshape(3, 5)
               if d is not np.bool_ else rng.integers(0, 2, (3, 5)).astype(bool) for d in DTYPES)
    result = (tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in xs), jax.ShapeDtypeStruct((), jnp.float64))
    f = jax.jit(lambda xs: host_call(_flip_all, (2.5,), result, xs, vmap_method="sequential"))
    (got, s) = f(xs)
    assert float(s) == 2.5 * float(np.sum(xs[0], dtype=np.float64))
    for x, g in zip(xs, got):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert np.array_equal(_bits(g), _bits(_flip(x))), x.dtype
    empty = jax.jit(lambda x: host_call(_flip_all, (1.0,), ((jax.ShapeDtypeStruct((0, 2), jnp.float32),),
                                                           jax.ShapeDtypeStruct((), jnp.float64)), (x,),
                                        vmap_method="sequential"))(jnp.zeros((0, 2), jnp.float32))
    assert empty[0][0].shape == (0, 2) and float(empty[1]) == 0.0


def _read_only(x):
    x[...] = 0  # the arguments are XLA's buffers: not to be written
    return x


def _raises(x):
    raise ValueError(f"no sum for {x.shape[0]} terms")


def _wrong_shape(x):
    return x[:1]


def test_errors_name_the_function():
    """An exception on the host, a result of the wrong shape and a write to an argument each
    become an error of the call that names the host function, not a crash."""
    x = jnp.arange(4.0)
    out = jax.ShapeDtypeStruct(x.shape, x.dtype)
    for fn, words in ((_raises, "ValueError: no sum for 4 terms"), (_wrong_shape, "returned result 0 as float64[1]"),
                      (_read_only, "read-only")):
        with pytest.raises(jax.errors.JaxRuntimeError, match=f"host function {__name__}.{fn.__name__}") as e:
            jax.jit(lambda x: host_call(fn, (), out, x, vmap_method="sequential"))(x).block_until_ready()
        assert words in str(e.value)
    after = jax.jit(lambda x: host_call(_flip_all, (1.0,), ((out,), jax.ShapeDtypeStruct((), x.dtype)), (x,),
                                        vmap_method="sequential"))(x)  # the process carries on after the errors
    assert np.array_equal(_bits(after[0][0]), _bits(_flip(np.arange(4.0)))) and float(after[1]) == 6.0


def test_keys_are_deterministic_and_refuse_what_is_not():
    from collapse_sim.backends.emulated import Emulator

    assert host_key((1, -0.5, None, "a", np.int64(3))) == "(1, -0.5, None, 'a', np.int64(3))"
    assert host_key(_flip) == f"{__name__}._flip"
    a, b = Emulator("compute=bf16,order=exact", shared=True), Emulator("compute=fp16,order=exact", shared=True)
    assert a == b and host_key(a) == host_key(b)  # one shared program: one key
    assert host_key(Emulator("compute=bf16,order=exact")) != host_key(Emulator("compute=fp16,order=exact"))
    for bad in (lambda x: x, object(), {1: 2}):
        with pytest.raises(TypeError, match="no host key"):
            host_key(bad)


def _first(x):
    return x[..., 0]


def test_one_key_one_function_and_vmap():
    """A second static argument under a key already taken by an unequal one is refused;
    under vmap the call runs per element (sequential) or on the batch (expand_dims)."""
    x = jnp.arange(12.0).reshape(4, 3)
    for method in ("sequential", "expand_dims"):
        f = jax.vmap(lambda r: host_call(_first, (), jax.ShapeDtypeStruct((), r.dtype), r, vmap_method=method))
        assert np.array_equal(jax.jit(f)(x), np.asarray(x)[:, 0])

    class Same:
        def __init__(self, v):
            self.v = v

        def host_key(self):
            return "Same"

        def __eq__(self, other):
            return self.v == other.v

        __hash__ = None

    _host._register(_first, (Same(1),), jax.tree.structure(()))
    _host._register(_first, (Same(1),), jax.tree.structure(()))  # equal: the same entry
    with pytest.raises(HostCallError, match="share the key"):
        _host._register(_first, (Same(2),), jax.tree.structure(()))


_FRESH = r"""
import json, sys
import numpy as np
import jax
jax.config.update("jax_enable_x64", True)
from collapse_sim import compilation
from collapse_sim.backends import _host, emulated
from collapse_sim.backends.emulated import EmulatedBackend
from collapse_sim.backends.inputs import AttentionInputs
from collapse_sim.model import ModelConfig, forward, init_params

compilation.use_cache(sys.argv[1])
before = compilation.snapshot()
outs = []
# attention rows the certificates leave open: the redo programs, run from the host call
emulated.attention.CERTIFIED_MIN_TERMS = 0
be = EmulatedBackend("compute=(p=3,emax=100),order=exact")
rng = np.random.default_rng(5)
q, k, v = (rng.standard_normal((40, 8)) for _ in range(3))
q[:3, :2], q[30, :2], k[:, 0], k[:, 1] = 2.0**40, 2.0**40, 2.0**40, -(2.0**40)
q, k, v = (be.store(x) for x in (q, k, v))
outs.append(jax.jit(lambda q, k, v: be.attention(AttentionInputs(q, k, v, np.arange(40), 0.5)))(q, k, v))
# a linear layer with rows that cancel (x's first two entries 2^40 and -2^40 against equal rows of w): its redo
x, w = rng.standard_normal((6, 8)), rng.standard_normal((8, 5))
x[:2, 0], x[:2, 1], w[1] = 2.0**40, -(2.0**40), w[0]
outs.append(jax.jit(be.linear)(be.store(x), be.store(w)))
# a whole forward, exact from its certificates and host exact sums
P = init_params(ModelConfig(d=8, n_layers=1, n_heads=2, d_ff=8, vocab=5, pe="rope", seed=3))
toks = np.array([1, 2, 3, 1, 4, 0, 2, 2])
y, yp = forward(P, toks, EmulatedBackend("compute=bf16,order=exact"), probe=np.roll(toks, -1))
outs += [y, yp]
counts = compilation.snapshot().since(before)
np.savez(sys.argv[2], *[np.asarray(o) for o in outs])
json.dump({"counts": counts.as_dict(), "keys": sorted(_host._REGISTRY)}, open(sys.argv[3], "w"))
"""


def test_second_process_loads_every_program_and_gives_the_same_bits(tmp_path):
    """An exact forward, and an attention call and a linear layer whose uncertified rows are redone
    (the superaccumulator and the redo both host calls), in two fresh processes sharing a new
    compilation cache: the second compiles nothing, loads what the first compiled, registers
    the same host keys (under another string hash seed) and gives the same bits."""
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    runs = []
    for i, seed in enumerate(("1", "2")):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        env.pop("COLLAPSE_SIM_COMPILE_CACHE", None)
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / "cache"), str(tmp_path / f"{i}.npz"),
                               str(tmp_path / f"{i}.json")], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append((json.loads((tmp_path / f"{i}.json").read_text()), np.load(tmp_path / f"{i}.npz")))
    (first, a), (second, b) = runs
    assert first["counts"]["compiled"] > 0, first
    assert second["counts"]["compiled"] == 0, second
    assert second["counts"]["cache_hits"] == first["counts"]["compiled"] + first["counts"]["cache_hits"]
    redo = [k for k in first["keys"] if k.startswith("collapse_sim.backends._rows._redo_rows")]
    assert any("attention._linear_redo" in k for k in redo) and any("attention._attention_redo" in k for k in redo)
    sums = [k for k in first["keys"] if k.startswith("collapse_sim.backends.emulated.exact._host_sticky_sum")]
    assert redo and sums and first["keys"] == second["keys"]
    assert len(a.files) == len(b.files) == 4
    for f in a.files:
        assert a[f].dtype == b[f].dtype and np.array_equal(a[f].view(np.uint8), b[f].view(np.uint8)), f
        assert not np.isnan(a[f]).all(), f


_STARTED_ASYNC = r"""
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_enable_x64", True)
jnp.ones(2).block_until_ready()  # JAX's CPU backend starts, dispatching asynchronously
from collapse_sim.backends import _host
from collapse_sim.backends.emulated import exact
out = jax.ShapeDtypeStruct((), jnp.float64)
x = jnp.asarray([1.0, 2.0**-60, -1.0])
call = lambda nested: jax.jit(lambda x: _host.host_call(exact._host_sticky_sum, (-1074, 1024, 8, 64), out, x,
                                                       vmap_method="sequential", nested=nested))
text = [str(call(n).lower(x).as_text()) for n in (False, True)]
print(*(int(_host.TARGET in t) for t in text), *(float(call(n)(x)).hex() for n in (False, True)))
"""


def test_nested_host_call_after_an_asynchronous_start(tmp_path):
    """A host function that runs compiled programs needs synchronous dispatch through the FFI
    target (set when backends/_host.py is imported first): where JAX's CPU backend started
    asynchronous before, such a call goes through ``jax.pure_callback`` (no FFI target in its
    program) and gives the same bits; a plain host call still takes the target."""
    env = dict(os.environ)
    env.pop("JAX_CPU_ENABLE_ASYNC_DISPATCH", None)
    proc = subprocess.run([sys.executable, "-c", _STARTED_ASYNC], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    plain_target, nested_target, plain, nested = proc.stdout.split()
    assert (plain_target, nested_target) == ("1", "0")
    assert plain == nested and float.fromhex(plain) != 0.0  # the sticky sum of 1 + 2^-60 - 1: not zero
    from jax._src import xla_bridge

    assert xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value is False  # this process: _host imported before JAX started
