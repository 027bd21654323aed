"""Progress that never goes silent.

:func:`stage` wraps one piece of long work: it prints a line when the work starts and,
from a background thread, a line at least every ``every`` seconds until it ends,
saying how long it has run, whether XLA is compiling right now (and for how long),
and the estimate when one was given. A stage that ends within ``every`` seconds
prints only its start line (and nothing more); a longer one prints its wall time and
the compilations it caused when it ends ("stopped after" if it ended in an error). A stage
speaks of its own thread: two stages side by side (collapse_sim.lanes) each report their
own phase and compiles.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time

from .compilation import STATS, snapshot

EVERY = 5.0
_phases: "dict[int, str]" = {}  # thread id -> what it is doing inside a stage, when known (see phase())


@contextlib.contextmanager
def phase(text: str):
    """Name what the body does (e.g. "tracing and compiling the bf16 forward, N = 2,048"),
    so that a stage's heartbeat lines say it rather than "running". Each thread names its own."""
    tid = threading.get_ident()
    outer = _phases.get(tid)
    _phases[tid] = text
    try:
        yield
    finally:
        if outer is None:
            _phases.pop(tid, None)
        else:
            _phases[tid] = outer


_print_lock = threading.Lock()


def say(prefix: str, msg: str, stream=None) -> None:
    """Print the line ``prefix msg`` whole, never mixed with a line another thread prints (a stage's
    heartbeat, the report's reference thread)."""
    with _print_lock:
        print(f"{prefix} {msg}", file=stream or sys.stdout, flush=True)


@contextlib.contextmanager
def stage(prefix: str, what: str, *, estimate: "float | None" = None, every: float = EVERY, stream=None,
          every_thread: bool = False):
    """Run the body as one stage of a command whose lines start with ``prefix`` (e.g. ``[collapse]``).
    ``every_thread``: the stage owns the process's XLA work while it runs (a report's section, whose
    runs a lane shares out, :meth:`collapse_sim.experiments.paper.Context.queue`): its lines count the
    compiles of every thread, and name another thread's phase where its own has none."""
    stream = stream or sys.stdout
    start = time.monotonic()
    tid = threading.get_ident()  # the stage's own thread: its phase and compiles, not another thread's
    counted = None if every_thread else tid
    before = snapshot(counted)
    STATS.forget_open()
    est = f" (estimated {estimate:.0f} s)" if estimate else ""
    say(prefix, f"{what}{est} ...", stream)
    done = threading.Event()

    def beat():
        while not done.wait(every):
            t = time.monotonic() - start
            longest = STATS.longest_open(counted)
            c, busy_tid = (None, tid) if longest is None else longest
            now = snapshot(counted).since(before)
            parts = [f"{what}: {t:.0f} s"]
            # the compiling thread's phase; where none compiles, this thread's, or (every_thread) any thread's
            busy = _phases.get(busy_tid) if c is not None else _phases.get(tid) or (
                next(iter(list(_phases.values())), None) if every_thread else None)
            if c is not None:
                parts.append(f"compiling an XLA program for {c:.0f} s" + (f" ({busy})" if busy else ""))
            elif busy:
                parts.append(busy)
            elif now.compiled:
                parts.append(f"running; {now.compiled} program{'s' * (now.compiled != 1)} compiled so far "
                             f"({now.compile_seconds:.0f} s)")
            else:
                parts.append("running")
            if estimate:
                parts.append(f"estimate {estimate:.0f} s")
            say(prefix, "  " + ", ".join(parts), stream)

    th = threading.Thread(target=beat, daemon=True)
    th.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        th.join()
        STATS.forget_open()
        t = time.monotonic() - start
        if t >= every:
            say(prefix, f"  {what}: {'done in' if ok else 'stopped after'} {t:.0f} s; "
                         f"{snapshot(counted).since(before).describe()}", stream)
