"""Independent XLA work measured two at a time.

One emulated forward does not keep two cores busy: XLA:CPU runs its loops on both, with gaps
between them (at N = 1,536, d = 64: one forward 1.11 s, two side by side 1.52 s). A
:class:`Lane` is a queue of independent computations taken by two threads, the caller's and a
daemon thread of its own, whichever is free first; :func:`in_order` runs a list of them so and
returns their values in order. The values do not depend on which thread computed them (a compiled
program's bits do not depend on the thread that runs it); only the order of progress lines does.
Compiles on the two threads keep JAX's persistent cache apart from each other
(:func:`collapse_sim.compilation.jax_cache_off` is per thread).
"""

from __future__ import annotations

import functools
import threading


class _Job:
    """One queued computation: started by one thread, its value or its error handed to whoever waits."""

    def __init__(self, compute):
        self.compute, self.started, self.done = compute, False, threading.Event()
        self.value, self.error = None, None

    def run(self) -> None:
        from .compilation import STATS

        try:
            self.value = self.compute()
        except BaseException as e:  # handed to the waiting thread
            self.error = e
        finally:
            self.compute = None
            self.done.set()
            STATS.forget_open()  # a trace of this thread's that never reached a compile


class Lane:
    """A queue of computations taken by two threads: a daemon thread takes the queued ones in order,
    and a thread waiting for a value that the other has not started runs it itself, or, while the
    other runs it, the next queued one. :meth:`submit` returns the function that waits for the
    value (and raises the computation's exception). The daemon thread ends when the queue is empty;
    an interrupted command exits without waiting for it."""

    def __init__(self):
        self._lock = threading.Lock()
        self._queue: list[_Job] = []
        self._thread: "threading.Thread | None" = None  # the daemon thread, while the queue holds work

    def submit(self, compute):
        job = _Job(compute)
        with self._lock:
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="collapse-sim-lane", daemon=True)
                self._thread.start()
        return functools.partial(self._wait, job)

    def _take(self, job: "_Job | None" = None) -> "_Job | None":
        """``job`` if no thread started it, else the first queued job (None if none), marked
        started. Called with the lock held."""
        if job is not None and not job.started:
            if job in self._queue:
                self._queue.remove(job)
        elif self._queue:
            job = self._queue.pop(0)
        else:
            return None
        job.started = True
        return job

    def _work(self) -> None:
        while True:
            with self._lock:
                job = self._take()
                if job is None:  # nothing queued: the thread ends (submit starts another)
                    self._thread = None
                    return
            job.run()

    def _wait(self, job: _Job):
        while not job.done.is_set():
            with self._lock:
                mine = self._take(job) if not job.started else None if job.done.is_set() else self._take()
            if mine is None:
                job.done.wait()
            else:
                mine.run()
        if job.error is not None:
            raise job.error
        return job.value

    def drop(self) -> None:
        """Forget the queued computations no thread has started: whoever waits for one runs it then."""
        with self._lock:
            self._queue.clear()


def in_order(computes, *, together: bool = True) -> list:
    """The values of ``computes`` (functions of no argument), in order; with ``together`` two at a
    time (a :class:`Lane`), else one after the other on this thread. The first exception raised,
    in order, is raised; the lane's thread finishes the computation it runs and stops taking more."""
    computes = list(computes)
    if not together or len(computes) < 2:
        return [c() for c in computes]
    lane = Lane()
    waits = [lane.submit(c) for c in computes]
    try:
        return [w() for w in waits]
    finally:
        lane.drop()
