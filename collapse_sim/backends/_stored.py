"""Compiled forwards kept on disk whole, so that a rerun neither traces nor lowers them.

JAX's persistent compilation cache (:mod:`collapse_sim.compilation`) finds a program by
the hash of its lowered module: a process must trace and lower every forward before it can
load it, about a second for an emulated forward (its module is several hundred kB of
StableHLO), most of a warm command's wait. Where the CLI turns it on
(:func:`collapse_sim.compilation.use_executables`), :func:`run_stored` keeps each forward's
executable (``jax.experimental.serialize_executable``) in a folder beside JAX's cache, named
by a key of everything the program is built from:

* the text of every module of this package (any edit makes new keys),
* JAX's and jaxlib's versions, ``XLA_FLAGS``, x64, the platform and device kind,
* JAX's settings that its own trace cache keys on,
* the backend's class and program identity (``program_key``: its policy, or the shared
  program's static part), the model function, the model's computation config, the arrays'
  names, whether the run has probes, and the shapes, dtypes and tree of every argument.

Only a function and a backend class of module level in this package are stored (their code is
in the key); a closure, a lambda or code from elsewhere goes through JAX's cache. Values a
caller changes at run time in this package's modules (tests patch thresholds) are not in the
key: the CLI, the one user of the store, changes none. The files are pickles: keep the folder
your own, as for any cache that holds code.

A program that calls the host (``backends/_host.py``: the exact and blocked orders' redo)
is not kept: its host functions are registered when it is traced, which a stored program
skips; it goes through JAX's cache as before. Programs are compiled here with JAX's cache
off: an executable JAX loaded from its cache does not serialise whole on XLA:CPU (another
process loads it, then its first run fails with NOT_FOUND for its functions). Should JAX load
one from its cache all the same, it is not stored; a stored program whose first run fails
is discarded and compiled again, in one line on stdout.

Library use is unaffected unless it calls ``use_executables``; the test suite's in-process
CLI runs turn it off again when the command ends (``cli.main``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import tempfile
import threading
import time
from pathlib import Path

import jax

from .. import compilation
from ..progress import phase

_LOADED: dict = {}  # key -> this process's compiled executable (stored, loaded, or with a host call: neither)
_GETTING: dict = {}  # key -> the lock of the thread that loads or compiles it (collapse_sim.lanes: two threads
_GETTING_LOCK = threading.Lock()  # that need one program at once wait for one compile, not compile it twice)


def _getting(key: str) -> threading.Lock:
    with _GETTING_LOCK:
        return _GETTING.setdefault(key, threading.Lock())


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


_PACKAGE = __name__.split(".")[0] + "."


def _trace_settings() -> str:
    """JAX's settings that its own trace cache keys on (``trace_context``), less the objects among
    them that print their address; empty where this JAX has no such function."""
    try:
        from jax._src.config import trace_context
    except ImportError:  # pragma: no cover - another JAX: the versions in the key still tell
        return ""
    return repr([v for v in trace_context() if " at 0x" not in repr(v)])


def _key(backend, fn, config, names, with_probe, args) -> "str | None":
    """The stored program's name, or None where the program's identity is not known as text."""
    program = getattr(backend, "program_key", None)
    name = f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', '<none>')}"
    cls = f"{type(backend).__module__}.{type(backend).__qualname__}"
    cfg = repr(config)
    if (program is None or not (name.startswith(_PACKAGE) and cls.startswith(_PACKAGE)) or "<" in name + cls
            or "..." in cfg or "array(" in cfg):  # code outside the package's hash, a closure or lambda: not stored
        return None
    import jaxlib

    dev = jax.devices()[0]
    leaves, tree = jax.tree.flatten(args)
    text = "\n".join([
        _code_hash(), jax.__version__, jaxlib.__version__, os.environ.get("XLA_FLAGS", ""),
        str(jax.config.jax_enable_x64), str(jax.config.jax_default_matmul_precision),
        dev.platform, dev.device_kind, str(getattr(dev.client, "platform_version", "")), _trace_settings(),
        cls, program(), repr(backend.compiler_options()), name, cfg, repr(names),
        str(with_probe), str(tree), repr([(tuple(x.shape), str(x.dtype)) for x in leaves]),
    ])
    return hashlib.sha256(text.encode()).hexdigest()


def run_stored(f, backend, fn, config, names, with_probe, args, what: str):
    """``f(*args)`` (``f`` the jitted forward) from a stored executable where one is kept or can
    be; None where executables are not stored or the program has no key (the caller then calls
    ``f`` itself). A program loaded from disk is checked by its first run: some faults of a stored
    executable show only there, and it is then discarded and compiled again."""
    folder = compilation.executables_dir()
    key = None if folder is None else _key(backend, fn, config, names, with_probe, args)
    if key is None:
        return None
    path = folder / f"{key}.exe"
    with _getting(key):  # one thread loads it and runs it first (its check) or compiles it; another waits
        if key not in _LOADED and _load(key, path, what):
            with phase("running " + what):
                try:
                    return _LOADED[key](*args)
                except jax.errors.JaxRuntimeError as e:
                    del _LOADED[key]
                    _discard(path, f"could not be run ({str(e).splitlines()[0][:120]})")
        if key not in _LOADED:
            _LOADED[key] = _compile_and_store(f, args, path, what)
    with phase("running " + what):
        return _LOADED[key](*args)


def _load(key: str, path: Path, what: str) -> bool:
    """Load the program stored at ``path`` into this process (counted as loaded from the cache);
    whether it was (a file that cannot be loaded is discarded)."""
    if not path.exists():
        return False
    with phase("loading " + what + " (stored)"):
        t0 = time.perf_counter()
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            from jax.experimental.serialize_executable import deserialize_and_load

            _LOADED[key] = deserialize_and_load(payload, in_tree, out_tree)
        except Exception as e:  # a stored file from another build or a torn write: compile again
            _discard(path, f"could not be loaded ({type(e).__name__})")
            return False
    compilation.STATS.loaded(time.perf_counter() - t0)
    return True


def forget() -> None:
    """Drop this process's stored programs from memory (``cli.main`` at the end of a command)."""
    _LOADED.clear()


def _discard(path: Path, why: str) -> None:
    print(f"collapse-sim: the stored program {path.name} {why}; compiling it again", flush=True)
    path.unlink(missing_ok=True)


def _compile_and_store(f, args, path: Path, what: str):
    """Compile ``f`` for ``args`` with JAX's cache off, store it at ``path`` and return it. A
    program with a host call is compiled through JAX's cache and not stored; so is one that JAX loaded
    from its cache after all, on this thread (it would not load whole in another process). (JAX may
    also hand back an executable it holds in memory, with no compile and no load counted: one this
    process compiled for the store before, whose stored file was then damaged. A program that JAX had
    loaded from its cache in this process and that reaches this function afterwards would be stored
    too, and another process that loads it and cannot run it discards it and compiles it again.)"""
    with phase("tracing, then compiling " + what):
        lowered = f.lower(*args)
        text = lowered.as_text()
        if "collapse_sim_host_call" in text or "callback" in text:  # JAX's cache, as before; not stored
            return lowered.compile()
        here = threading.get_ident()
        before = compilation.snapshot(here)
        with compilation.jax_cache_off():
            exe = lowered.compile()
        if compilation.snapshot(here).since(before).cache_hits:  # this thread's compile was a load from JAX's cache
            return exe
    from jax.experimental.serialize_executable import serialize

    tmp = None
    try:
        blob = pickle.dumps(serialize(exe))
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem[:16], suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    except Exception as e:  # not serialisable, or the folder not writable: run it unstored
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        print(f"collapse-sim: could not store {what}, compiled ({type(e).__name__}: "
              f"{str(e).splitlines()[0][:120] if str(e) else ''}); it runs without being stored", flush=True)
    return exe
