"""Compiled forwards kept whole on disk (collapse_sim.backends._stored): a stored program gives
the bits of one compiled in the process, a rerun loads it without compiling, a program with a
host call is not stored, a damaged file is compiled again, and the key names the program."""

from __future__ import annotations

import numpy as np
import pytest

import collapse_sim as cs
from collapse_sim import compilation
from collapse_sim.backends import _stored, make_backend
from collapse_sim.model import ModelConfig, forward, init_params

cs.enable_x64()

CFG = ModelConfig(d=8, n_layers=1, vocab=4, seed=1, max_len=64)
TOKENS = np.array([1, 2, 3, 1, 0, 2, 1, 3, 2, 2, 0, 1], np.int64)


@pytest.fixture
def store(tmp_path):
    before = compilation.use_executables(tmp_path / "exe")
    saved = dict(_stored._LOADED)
    _stored._LOADED.clear()
    yield tmp_path / "exe"
    compilation.use_executables(before)
    _stored._LOADED.clear()
    _stored._LOADED.update(saved)


def _run(policy):
    return np.asarray(forward(init_params(CFG), TOKENS, make_backend("emulated", policy)))


def _bits(x):
    return np.asarray(x, np.float64).view(np.uint64)


def test_stored_program_loads_with_the_same_bits(store):
    """The first run stores the program; with this process's copy dropped, the second loads it
    (counted as loaded, nothing compiled) and gives the bits of a run without the store."""
    pol = "storage=bf16,compute=bf16,accumulate=fp32,order=pairwise"
    first = _run(pol)
    files = sorted(store.glob("*.exe"))
    assert len(files) == 1
    _stored._LOADED.clear()
    before = compilation.snapshot()
    second = _run(pol)
    counts = compilation.snapshot().since(before)
    assert counts.compiled == 0 and counts.cache_hits >= 1, counts
    compilation.use_executables(None)
    plain = _run(pol)
    assert np.array_equal(_bits(first), _bits(second)) and np.array_equal(_bits(first), _bits(plain))


def test_program_with_a_host_call_is_not_stored(store):
    """The exact order's superaccumulator calls the host: its program goes through JAX's cache
    (its host functions are registered when it is traced), and nothing is written."""
    got = _run("compute=bf16,order=exact")
    assert not list(store.glob("*.exe"))
    compilation.use_executables(None)
    assert np.array_equal(_bits(got), _bits(_run("compute=bf16,order=exact")))


def test_damaged_file_is_compiled_again(store, capsys):
    pol = "compute=fp16,order=sequential"
    want = _run(pol)
    (path,) = store.glob("*.exe")
    path.write_bytes(b"not a program")
    _stored._LOADED.clear()
    got = _run(pol)
    assert "could not be loaded" in capsys.readouterr().out
    assert np.array_equal(_bits(want), _bits(got)) and path.read_bytes() != b"not a program"


def test_key_names_the_program(monkeypatch):
    """Two policies, two shapes, two model configs, probes or not, and an edit of the package's
    code each give another key; the same program the same key."""
    import jax.numpy as jnp

    from collapse_sim.model import _forward_scanned as fn  # the function the backends run under jit

    def key(policy="bf16", n=12, cfg=CFG, probe=False):
        be = make_backend("emulated", policy)
        args = ((jnp.zeros((4, 8)),), jnp.zeros(n, jnp.int32), jnp.zeros(n, jnp.int32), None)
        return _stored._key(be, fn, cfg.computation(), ("embed",), probe, args)

    base = key()
    assert base == key() and base is not None
    others = [key("fp16"), key(n=16), key(cfg=ModelConfig(d=8, n_layers=2, vocab=4, max_len=64)), key(probe=True)]
    assert len({base, *others}) == 5
    monkeypatch.setattr(_stored, "_code_hash", lambda: "edited")
    assert key() != base
    be = make_backend("emulated", "bf16")
    args = ((jnp.zeros((4, 8)),), jnp.zeros(12, jnp.int32), jnp.zeros(12, jnp.int32), None)
    assert _stored._key(be, lambda *a: None, CFG, ("embed",), False, args) is None  # a lambda: not stored


def test_cache_off_on_several_threads_restores_the_setting():
    """JAX's cache setting is global: bodies of jax_cache_off on several threads, overlapping in
    every order, see it off, and it is back to what it was once the last one ends."""
    import threading

    import jax

    start = jax.config.jax_enable_compilation_cache
    inside, go = [], threading.Barrier(4)

    def body(i):
        go.wait()
        with compilation.jax_cache_off():
            inside.append(jax.config.jax_enable_compilation_cache)
            threading.Event().wait(0.01 * i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inside == [False] * 4 and jax.config.jax_enable_compilation_cache == start
