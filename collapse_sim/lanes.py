"""Independent XLA work measured two at a time.

One emulated forward does not keep two cores busy: XLA:CPU runs its loops on both, with gaps
between them (at N = 1,536, d = 64: one forward 1.11 s, two side by side 1.52 s). A
:class:`Lane` is a queue of independent computations taken by two threads, the caller's and a
thread of its own, whichever is free first; :func:`in_order` runs a list of them so and returns
their values in order. A computation runs on the lane's thread only where that thread's JAX
settings (``jax.config``'s thread-local contexts: x64, matmul precision, dtype promotion, ...) are
those it was submitted under, so its value does not depend on the thread that computed it; only
the order of progress lines does. Compiles on the two threads keep JAX's persistent cache apart
from each other (:func:`collapse_sim.compilation.jax_cache_off` is per thread).
"""

from __future__ import annotations

import functools
import threading

from .compilation import STATS


def _settings():
    """JAX's settings on this thread, as its own trace cache keys on them (``trace_context``); where this
    JAX has no such function, the thread's id (then only the submitting thread runs its work)."""
    try:
        from jax._src.config import trace_context
    except ImportError:  # pragma: no cover - another JAX
        return threading.get_ident()
    return trace_context()


class _Job:
    """One queued computation: started by one thread, its value or its error handed to whoever waits."""

    def __init__(self, compute, settings):
        self.compute, self.settings, self.started, self.done = compute, settings, False, threading.Event()
        self.value, self.error = None, None

    def run(self) -> None:
        try:
            self.value = self.compute()
        except BaseException as e:  # handed to the waiting thread
            self.error = e
        finally:
            self.compute = None
            self.done.set()
            STATS.forget_open()  # a trace of this thread's that never reached a compile


class Lane:
    """A queue of computations taken by two threads: the lane's own thread takes the queued ones in
    order (those submitted under its JAX settings), and a thread waiting for a value that the other
    has not started runs it itself, or, while the other runs it, the next queued one. :meth:`submit`
    returns the function that waits for the value (and raises the computation's exception). After a
    computation fails neither thread takes more from the queue (:meth:`drop`), and an interrupt
    (``KeyboardInterrupt``, ``SystemExit``) in one the waiting thread runs reaches it at once. The
    lane's thread ends when the queue is empty; :meth:`join` waits for it."""

    def __init__(self, name: str = "collapse-sim-lane", *, jax_work: bool = True):
        """``jax_work=False``: computations that use no JAX (host arithmetic), taken by either thread
        whatever its JAX settings."""
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._thread: "threading.Thread | None" = None  # the lane's thread, while the queue holds work
        self._name = name
        self._settings = _settings if jax_work else (lambda: None)

    def submit(self, compute):
        job = _Job(compute, self._settings())
        with self._lock:
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
                self._thread.start()
        return functools.partial(self._wait, job)

    def _take(self, settings, job: "_Job | None" = None) -> "_Job | None":
        """``job`` if no thread started it, else the first queued job submitted under ``settings`` (None if
        none), marked started. Called with the lock held."""
        if job is None or job.started:
            job = next((j for j in self._queue if j.settings == settings), None)
            if job is None:
                return None
        if job in self._queue:
            self._queue.remove(job)
        job.started = True
        return job

    def _work(self) -> None:
        settings = self._settings()
        while True:
            with self._lock:
                job = self._take(settings)
                if job is None:  # nothing it may take: the thread ends (submit starts another)
                    self._thread = None
                    return
            job.run()
            if job.error is not None:
                self.drop()

    def _wait(self, job: _Job):
        settings = self._settings()
        while not job.done.is_set():
            with self._lock:  # its own job if no thread started it, else the next one queued
                mine = None if job.done.is_set() else self._take(settings, job)
            if mine is None:
                job.done.wait()
                continue
            mine.run()
            if mine.error is not None:
                self.drop()
                if not isinstance(mine.error, Exception):  # an interrupt: now, not when its value is asked for
                    raise mine.error
        if job.error is not None:
            raise job.error
        return job.value

    def drop(self) -> None:
        """Forget the queued computations no thread has started: whoever waits for one runs it then."""
        with self._lock:
            self._queue.clear()

    def join(self) -> None:
        """Wait for the lane's thread to finish the computation it runs (a process that exits while it
        runs an XLA program aborts)."""
        with self._lock:
            thread = self._thread
        if thread is not None:
            thread.join()


def in_order(computes, *, together: bool = True) -> list:
    """The values of ``computes`` (functions of no argument), in order; with ``together`` two at a
    time (a :class:`Lane`), else one after the other on this thread. The first exception raised,
    in order, is raised once the lane's thread has finished the computation it ran (it takes no
    more)."""
    computes = list(computes)
    if not together or len(computes) < 2:
        return [c() for c in computes]
    lane = Lane()
    waits = [lane.submit(c) for c in computes]
    try:
        return [w() for w in waits]
    finally:
        lane.drop()
        lane.join()
