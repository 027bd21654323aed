"""Compilation as a cost the user sees: a persistent cache, and counts of what was compiled.

A user of this package waits on XLA compilation far more than on arithmetic (an
emulated forward takes seconds to run and can take a minute to compile). Two tools:

* :func:`use_cache` points JAX's persistent compilation cache at a directory, so a
  program compiled once is loaded from disk by every later process with the same
  program, JAX version and flags. The CLI turns it on by default, in
  :func:`default_cache_dir` (``$XDG_CACHE_HOME/collapse_sim/xla``, else
  ``~/.cache/collapse_sim/xla``); ``--compile-cache DIR`` or the environment variable
  ``COLLAPSE_SIM_COMPILE_CACHE`` moves it, and the value ``off`` turns it off.
  Library use is unaffected unless it calls :func:`use_cache`.
* :data:`STATS` counts, for the whole process, the XLA programs compiled and the
  programs loaded from the cache, with the seconds each took (JAX's monitoring
  events: tracing, lowering and the backend compile). :func:`snapshot` and
  :meth:`CompileCounts.since` give the counts of one stage; the report's provenance
  and ``collapse.json`` record them.
* :func:`use_executables` keeps compiled forwards whole on disk (backends/_stored.py), so a
  rerun loads them without tracing and lowering them first, which JAX's cache needs; the
  CLI keeps them beside JAX's cache, in its folder's ``exe``.

Small programs count too: JAX compiles every eager operation once per shape and dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import threading
import time
from pathlib import Path

from .errors import CollapseSimError

ENV = "COLLAPSE_SIM_COMPILE_CACHE"
STATS_ENV = "COLLAPSE_SIM_COMPILE_STATS"  # a file path: the CLI writes its compile counts there as JSON at exit
STORE_ENV = "COLLAPSE_SIM_STORE_PROGRAMS"  # "off": the CLI does not store compiled forwards whole
OFF = ("off", "none", "0", "false", "no")

_TRACE = "/jax/core/compile/jaxpr_trace_duration"
_LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
_BACKEND = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"


class CompileCacheError(CollapseSimError):
    """A compilation cache directory that cannot be used."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "collapse_sim" / "xla"


def cache_dir_from(flag: "str | None" = None) -> "Path | None":
    """The cache directory a command uses: ``flag`` if given, else ``$COLLAPSE_SIM_COMPILE_CACHE``
    (unset or empty: :func:`default_cache_dir`); None where the value is ``off``. An empty
    ``flag`` is refused."""
    if flag is not None and flag.strip() == "":
        raise CompileCacheError("--compile-cache needs a folder, or 'off' to turn the cache off; got an empty value")
    value = flag if flag is not None else os.environ.get(ENV)
    if value is None or value.strip() == "":
        return default_cache_dir()
    if value.strip().lower() in OFF:
        return None
    return Path(value).expanduser()


def use_cache(path: "str | Path | None") -> "Path | None":
    """Turn JAX's persistent compilation cache on in ``path``, for every program however
    short its compile; None turns it off. Returns the directory in use. The directory is
    created and written to at once, so an unusable one is refused before any work."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if path is None:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()  # JAX opens its cache once per process: make it reread the setting
        return None
    if str(path).strip() == "":
        raise CompileCacheError("the compilation cache folder is empty text; give a folder, or 'off' to turn it off")
    path = Path(path).absolute()
    try:  # make it and write to it now: a folder that only looks writable (/proc) fails here, not later
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CompileCacheError(f"cannot use {str(path)!r} as the compilation cache ({e.strerror or e}); "
                                f"give another directory with --compile-cache DIR or {ENV}=DIR, or turn it off "
                                f"with --compile-cache off") from None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    compilation_cache.reset_cache()
    return path


_EXECUTABLES: "Path | None" = None


def use_executables(path: "str | Path | None") -> "Path | None":
    """Keep compiled forwards whole in ``path`` (backends/_stored.py: a rerun loads them without
    tracing or lowering them); None stops. The CLI keeps them in the compilation cache's folder,
    under ``exe``. Returns the previous folder."""
    global _EXECUTABLES
    before = _EXECUTABLES
    if path is not None:
        path = Path(path).absolute()
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CompileCacheError(f"cannot keep compiled programs in {str(path)!r} ({e.strerror or e}); give "
                                    f"another directory with --compile-cache DIR or {ENV}=DIR, or turn it off "
                                    f"with --compile-cache off") from None
    _EXECUTABLES = path
    return before


def stored_dir(cache: "Path | None") -> "Path | None":
    """Where the CLI stores compiled forwards: ``cache/exe``; None where the compilation cache is
    off or ``$COLLAPSE_SIM_STORE_PROGRAMS`` is ``off`` (the test suite's in-process CLI runs: they
    share one JAX cache with every other test, which stored programs, compiled with JAX's cache
    off, would not fill)."""
    if cache is None or os.environ.get(STORE_ENV, "on").strip().lower() in OFF:
        return None
    return Path(cache) / "exe"


def executables_dir() -> "Path | None":
    return _EXECUTABLES


_OFF_LOCK = threading.Lock()
_OFF_DEPTH = [0, None]  # bodies inside jax_cache_off now, and the setting before the first (fallback)
_OFF_HERE = threading.local()  # .depth: this thread's bodies inside jax_cache_off
_PER_THREAD: "list[bool | None]" = [None]  # whether JAX's cache decision is wrapped per thread (decided once)


def _per_thread() -> bool:
    """Wrap JAX's one decision whether a compile uses its persistent cache
    (``jax._src.compilation_cache.is_cache_used``, which ``compiler._get_cache_key`` consults on every
    compile) so that it answers no on a thread inside :func:`jax_cache_off`; once per process.
    False where this JAX has no such function (then the setting is changed for the process)."""
    with _OFF_LOCK:
        if _PER_THREAD[0] is None:
            try:
                from jax._src import compilation_cache as cc
                from jax._src import compiler
            except ImportError:
                _PER_THREAD[0] = False
                return False
            decide = getattr(cc, "is_cache_used", None)
            if not callable(decide) or not hasattr(compiler, "compilation_cache"):
                _PER_THREAD[0] = False
                return False

            def is_cache_used(backend):
                return False if getattr(_OFF_HERE, "depth", 0) else decide(backend)

            cc.is_cache_used = is_cache_used
            _PER_THREAD[0] = True
        return _PER_THREAD[0]


@contextlib.contextmanager
def jax_cache_off():
    """JAX's persistent cache off for the body's compiles on this thread (backends/_stored.py compiles
    the programs it stores this way: an executable JAX loaded from its cache does not serialise whole on
    XLA:CPU). Compiles on other threads meanwhile read and write the cache as before (``collapse`` runs its
    formats two at a time, :mod:`collapse_sim.lanes`): JAX's decision whether a compile
    uses its cache is wrapped to answer no on a thread inside this body (:func:`_per_thread`). A JAX
    without that decision: the setting is changed for the whole process and the decision reset on the
    first entry and the last exit (another thread's compile meanwhile skips the cache: slower, not wrong)."""
    if _per_thread():
        _OFF_HERE.depth = getattr(_OFF_HERE, "depth", 0) + 1
        try:
            yield
        finally:
            _OFF_HERE.depth -= 1
        return
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    with _OFF_LOCK:
        if _OFF_DEPTH[0] == 0:
            _OFF_DEPTH[1] = jax.config.jax_enable_compilation_cache
            jax.config.update("jax_enable_compilation_cache", False)
            compilation_cache.reset_cache()
        _OFF_DEPTH[0] += 1
    try:
        yield
    finally:
        with _OFF_LOCK:
            _OFF_DEPTH[0] -= 1
            if _OFF_DEPTH[0] == 0:
                jax.config.update("jax_enable_compilation_cache", _OFF_DEPTH[1])
                compilation_cache.reset_cache()


def cache_in_use() -> "str | None":
    import jax

    return jax.config.jax_compilation_cache_dir


@dataclasses.dataclass(frozen=True)
class CompileCounts:
    """XLA programs compiled (and their seconds: trace + lower + compile) and loaded from the cache."""

    compiled: int
    compile_seconds: float
    cache_hits: int
    cache_seconds: float

    def since(self, before: "CompileCounts") -> "CompileCounts":
        return CompileCounts(self.compiled - before.compiled, self.compile_seconds - before.compile_seconds,
                             self.cache_hits - before.cache_hits, self.cache_seconds - before.cache_seconds)

    def describe(self) -> str:
        s = f"{self.compiled} XLA program{'s' * (self.compiled != 1)} compiled in {self.compile_seconds:.1f} s"
        if self.cache_hits:
            s += f", {self.cache_hits} loaded from the compilation cache in {self.cache_seconds:.1f} s"
        return s

    def as_dict(self) -> dict:
        return {"compiled": self.compiled, "compile_seconds": round(self.compile_seconds, 3),
                "cache_hits": self.cache_hits, "cache_seconds": round(self.cache_seconds, 3)}


class _Stats:
    """Process-wide listener on JAX's compile events (registered once, on first use).

    JAX reports, on the thread that compiles: the trace and the lowering (durations, before
    the backend step), a cache hit (if the program was loaded), then the backend step's
    duration. Each thread's open program (its start time, its seconds so far, whether it was
    a hit) is kept apart, so that programs compiled on several threads are counted right."""

    def __init__(self):
        self._lock = threading.Lock()
        self._registered = False
        self._open: dict[int, list] = {}  # thread id -> [start (monotonic), seconds so far, was a hit]
        self._threads: dict[int, list] = {}  # thread id -> [compiled, seconds, hits, cache seconds] of that thread

    def ensure(self) -> None:
        if self._registered:
            return
        import jax.monitoring as mon

        with self._lock:
            if self._registered:
                return
            mon.register_event_listener(self._event)
            mon.register_event_duration_secs_listener(self._duration)
            self._registered = True

    def _mine(self, tid: int) -> list:
        return self._threads.setdefault(tid, [0, 0.0, 0, 0.0])

    def _event(self, event: str, **_) -> None:
        if event == _HIT:
            with self._lock:
                self._mine(threading.get_ident())[2] += 1
                self._open.setdefault(threading.get_ident(), [time.monotonic(), 0.0, False])[2] = True

    def _duration(self, event: str, seconds: float, **_) -> None:
        with self._lock:
            tid = threading.get_ident()
            if event in (_TRACE, _LOWER):
                self._open.setdefault(tid, [time.monotonic(), 0.0, False])[1] += seconds
            elif event == _BACKEND:
                _, pending, hit = self._open.pop(tid, [0.0, 0.0, False])
                mine = self._mine(tid)
                if hit:
                    mine[3] += seconds + pending
                else:
                    mine[0] += 1
                    mine[1] += seconds + pending

    def loaded(self, seconds: float) -> None:
        """A stored program loaded whole (backends/_stored.py): counted as loaded from the cache."""
        with self._lock:
            mine = self._mine(threading.get_ident())
            mine[2] += 1
            mine[3] += seconds

    def forget_open(self) -> None:
        """Drop this thread's trace if it never reached a backend step (``jax.eval_shape``, a trace
        that raised): called where no compile of this thread can be under way, e.g. when a stage starts
        or ends, or a computation of :mod:`collapse_sim.lanes` is done."""
        with self._lock:
            self._open.pop(threading.get_ident(), None)

    def counts(self, thread: "int | None" = None) -> CompileCounts:
        """The process's counts, or those of the thread of id ``thread`` (``threading.get_ident()``)."""
        self.ensure()
        with self._lock:
            if thread is not None:
                return CompileCounts(*self._threads.get(thread, [0, 0.0, 0, 0.0]))
            return CompileCounts(*(sum(t[i] for t in self._threads.values()) for i in range(4)))

    def compiling_for(self, thread: "int | None" = None) -> "float | None":
        """Seconds the longest-open trace or compile has run (None when none is open); of the thread of
        id ``thread`` only, where given."""
        longest = self.longest_open(thread)
        return None if longest is None else longest[0]

    def longest_open(self, thread: "int | None" = None) -> "tuple[float, int] | None":
        """(seconds, thread id) of the longest-open trace or compile (None when none is open); of the
        thread of id ``thread`` only, where given."""
        with self._lock:
            starts = [(v[0], t) for t, v in self._open.items() if thread is None or t == thread]
        if not starts:
            return None
        start, tid = min(starts)
        return time.monotonic() - start, tid


STATS = _Stats()


def snapshot(thread: "int | None" = None) -> CompileCounts:
    """The process's compile counts now, or those of the thread of id ``thread`` (listening starts on the
    first call): a stage or a stored program's compile counts its own thread's, whatever another thread
    compiles meanwhile (collapse_sim.lanes)."""
    return STATS.counts(thread)


def record_at_exit(command: str) -> None:
    """If ``$COLLAPSE_SIM_COMPILE_STATS`` names a file, write this process's compile counts
    there as JSON when it exits (``benchmarks/bench_time_to_result.py`` reads them)."""
    target = os.environ.get(STATS_ENV)
    if not target:
        return
    import atexit
    import json

    start = snapshot()

    def write():
        rec = {"command": command, "cache": cache_in_use(), **snapshot().since(start).as_dict()}
        try:
            Path(target).write_text(json.dumps(rec))
        except OSError as e:
            print(f"collapse-sim: could not write the compile counts to {STATS_ENV}={target!r} "
                  f"({e.strerror or e})", file=sys.stderr)

    atexit.register(write)
