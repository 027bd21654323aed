"""Compiled forwards kept whole on disk (collapse_sim.backends._stored): a stored program gives
the bits of one compiled in the process, a rerun loads it without compiling, a program with a
host call is not stored, a damaged file is compiled again, and the key names the program."""

from __future__ import annotations

from pathlib import Path

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


def _outside(config, arrays, tokens, probe, backend):
    return tokens


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
    assert _stored._key(be, _outside, CFG, ("embed",), False, args) is None  # code outside the package's hash


def test_cache_off_is_off_for_its_own_thread_only():
    """jax_cache_off turns JAX's persistent cache off for the compiles of its own thread: a program
    compiled inside it is not written to the cache, while one compiled meanwhile on another thread is
    (collapse_sim.lanes runs work on two threads), and JAX's decision is its own again after."""
    import threading
    import uuid

    import jax
    from jax._src import compilation_cache as cc
    from jax._src import xla_bridge

    if compilation.cache_in_use() is None:
        pytest.skip("the test session runs without a compilation cache")
    backend = xla_bridge.get_backend()
    tag = uuid.uuid4().hex[:12]  # names no earlier run has written: the cache's files begin jit_<name>-

    def inside(x):
        return x * 3.0 + 1.0

    def outside(x):
        return x * 3.0 + 2.0

    inside.__name__, outside.__name__ = f"lane_inside_{tag}", f"lane_outside_{tag}"
    compiled, done, seen = threading.Event(), threading.Event(), {}

    def body():
        with compilation.jax_cache_off():
            seen["inside"] = cc.is_cache_used(backend)
            jax.jit(inside)(1.0)
            compiled.set()
            done.wait(timeout=60)
        seen["after"] = cc.is_cache_used(backend)

    t = threading.Thread(target=body)
    t.start()
    assert compiled.wait(timeout=60)
    seen["outside"] = cc.is_cache_used(backend)
    jax.jit(outside)(1.0)
    done.set()
    t.join()
    assert seen == {"inside": False, "outside": True, "after": True}
    names = [p.name for p in Path(compilation.cache_in_use()).iterdir()]
    assert any(n.startswith(f"jit_lane_outside_{tag}-") for n in names)
    assert not any(n.startswith(f"jit_lane_inside_{tag}-") for n in names)


def test_cache_off_without_a_per_thread_switch_restores_the_setting(monkeypatch):
    """A JAX whose cache decision cannot be wrapped per thread: the setting is changed for the process;
    bodies of jax_cache_off on several threads, overlapping in every order, see it off, and it is back
    to what it was once the last one ends."""
    import threading

    import jax

    monkeypatch.setattr(compilation, "_PER_THREAD", [False])

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



def test_cache_off_is_off_after_jax_decided_to_use_it():
    """JAX decides once whether it uses its cache (is_cache_used); jax_cache_off resets that
    decision on entry and exit, so a compile inside it neither reads nor writes JAX's cache even
    after earlier compiles used it (else a stored program could be one JAX loaded from its cache,
    which does not load whole in another process: its run fails with NOT_FOUND)."""
    import jax
    from jax._src import compilation_cache as cc
    from jax._src import xla_bridge

    backend = xla_bridge.get_backend()
    jax.jit(lambda x: x * 3)(1.0)
    on = cc.is_cache_used(backend)
    with compilation.jax_cache_off():
        assert not cc.is_cache_used(backend)
    assert cc.is_cache_used(backend) == on


def test_program_jax_loaded_from_its_cache_is_not_stored(store, monkeypatch):
    """Should JAX load the program from its cache all the same (a JAX whose setting does not
    reach its decision), the program runs but is not stored."""
    import contextlib

    @contextlib.contextmanager
    def loads_from_jax_cache():
        yield
        compilation.STATS.loaded(0.0)  # what a load from JAX's cache records

    monkeypatch.setattr(compilation, "jax_cache_off", loads_from_jax_cache)
    got = _run("compute=fp16,order=kahan")
    assert not list(store.glob("*.exe"))
    compilation.use_executables(None)
    assert np.array_equal(_bits(got), _bits(_run("compute=fp16,order=kahan")))


def test_stored_program_that_fails_to_run_is_compiled_again(store, monkeypatch, capsys):
    """A stored executable can load and then fail on its first run (one that JAX had loaded from
    its cache: NOT_FOUND for its functions): said in one line, discarded, compiled again, and the
    run gives the bits of a compiled one."""
    import jax
    from jax.experimental import serialize_executable

    pol = "compute=bf16,order=sequential"
    want = _run(pol)
    (path,) = store.glob("*.exe")
    _stored._LOADED.clear()

    def broken(*args):
        def run(*a):
            raise jax.errors.JaxRuntimeError("NOT_FOUND: Function fusion_kernel not found (type id: 1)")
        return run

    monkeypatch.setattr(serialize_executable, "deserialize_and_load", broken)
    got = _run(pol)
    assert "could not be run (NOT_FOUND" in capsys.readouterr().out
    assert np.array_equal(_bits(want), _bits(got)) and path.exists()



def test_two_threads_needing_one_broken_stored_program_both_get_a_compiled_one(store, monkeypatch, capsys):
    """Two threads that need one stored program at once (collapse_sim.lanes): one loads it and runs
    it first while the other waits, so when that first run fails, it is discarded and compiled
    again once, and both threads get the bits of a compiled program (the waiting thread does not
    run the broken one)."""
    import threading
    import time

    import jax
    from jax.experimental import serialize_executable

    pol = "compute=bf16,order=sequential"
    want = _run(pol)
    _stored._LOADED.clear()

    def broken(*args):
        def run(*a):
            time.sleep(0.3)  # the other thread reaches the program meanwhile
            raise jax.errors.JaxRuntimeError("NOT_FOUND: Function fusion_kernel not found (type id: 1)")
        return run

    monkeypatch.setattr(serialize_executable, "deserialize_and_load", broken)
    got: dict = {}

    def one(i):
        try:
            with jax.numpy_dtype_promotion("strict"):  # the suite's settings (conftest), part of the program's key
                got[i] = _run(pol)
        except Exception as e:  # noqa: BLE001 - the assertion below names it
            got[i] = e

    threads = [threading.Thread(target=one, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert capsys.readouterr().out.count("could not be run (NOT_FOUND") == 1
    assert all(isinstance(g, np.ndarray) and np.array_equal(_bits(want), _bits(g)) for g in got.values()), got
