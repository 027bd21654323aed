"""Independent work two at a time (collapse_sim.lanes): values in order whichever thread computed
them, the two threads really side by side, errors handed to the waiter, and the collapse command's
formats and the report's setups run so give the bits they give one after the other."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from collapse_sim.lanes import Lane, in_order


@pytest.fixture(autouse=True)
def _strict_promotion():
    """Replaces the suite's fixture of that name: its dtype-promotion context is a thread-local JAX
    setting, under which the lane's thread (the process's settings) would take no work."""
    yield


def test_two_at_a_time_side_by_side_values_in_order():
    """The first computation waits for the second to start: with two threads both finish (one
    thread alone would wait out the timeout), and the values come back in the order given."""
    second_started = threading.Event()
    ran: list[str] = []

    def first():
        ran.append(threading.current_thread().name)
        return "first", second_started.wait(timeout=30)

    def second():
        ran.append(threading.current_thread().name)
        second_started.set()
        return "second"

    got = in_order([first, second, lambda: 3, lambda: 4])
    assert got == [("first", True), "second", 3, 4]
    assert len(set(ran)) == 2 and threading.current_thread().name in ran


def test_one_after_the_other_on_this_thread():
    names = in_order([lambda: threading.current_thread().name] * 3, together=False)
    assert names == [threading.current_thread().name] * 3


def _on_the_lane(lane, compute):
    """Submit ``compute`` and wait until the lane's thread has started it (it first sets an event)."""
    started = threading.Event()

    def job():
        started.set()
        return compute()

    wait = lane.submit(job)
    assert started.wait(timeout=30)
    return wait


def test_an_error_on_the_lane_reaches_the_waiter_and_stops_the_queue():
    """A computation that fails on the lane's thread raises in the thread that waits for it, and the
    lane takes nothing more from the queue (a later computation runs only where it is waited for)."""
    lane, gate, ran = Lane(), threading.Event(), []

    def bad():
        gate.wait(timeout=30)
        raise ValueError("failed on the lane")

    wait = _on_the_lane(lane, bad)
    later = lane.submit(lambda: ran.append(threading.current_thread().name) or "later")
    gate.set()
    lane.join()  # no one waits meanwhile (a waiting thread would take `later` itself)
    assert ran == []  # dropped when the error came, not run by the lane
    with pytest.raises(ValueError, match="failed on the lane"):
        wait()
    assert later() == "later" and ran == [threading.current_thread().name]


def test_an_error_in_order_is_raised_after_the_lane_finishes_its_computation(monkeypatch):
    """in_order raises the first error in order only once the lane's thread has finished the computation
    it runs (a process that exits while that thread runs XLA aborts): it joins the lane, and a join waits
    for that computation."""
    joined = []
    real = Lane.join
    monkeypatch.setattr(Lane, "join", lambda self: joined.append(self) or real(self))

    def bad():
        raise ValueError("the second failed")

    with pytest.raises(ValueError, match="the second failed"):
        in_order([lambda: 1, bad, lambda: 3])
    assert len(joined) == 1
    lane, finished = Lane(), threading.Event()
    _on_the_lane(lane, lambda: threading.Event().wait(0.3) or finished.set())
    lane.join()
    assert finished.is_set()


def test_an_interrupt_in_a_computation_taken_while_waiting_is_raised_at_once():
    """The waiting thread runs the next queued computation while the lane runs the one it waits for;
    an interrupt there reaches it at once, and nothing more is taken from the queue."""
    lane, gate, ran = Lane(), threading.Event(), []
    first = _on_the_lane(lane, lambda: gate.wait(timeout=30))

    def interrupted():
        gate.set()
        raise KeyboardInterrupt

    lane.submit(interrupted)
    lane.submit(lambda: ran.append("third"))
    with pytest.raises(KeyboardInterrupt):
        first()
    lane.join()
    assert ran == []


def test_dropped_work_runs_where_it_is_waited_for_and_the_thread_ends():
    lane, gate = Lane(), threading.Event()
    first = _on_the_lane(lane, lambda: gate.wait(timeout=30))
    later = lane.submit(lambda: threading.current_thread().name)
    lane.drop()
    gate.set()
    assert first() is True and later() == threading.current_thread().name
    lane.join()
    assert lane._thread is None


def test_work_submitted_under_other_jax_settings_stays_on_its_thread():
    """The lane's thread runs only what was submitted under its own JAX settings: inside a thread-local
    jax.enable_x64(False) every computation runs on the caller's thread, and float64 stays off there."""
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(False):
        got = in_order([lambda: (threading.current_thread().name, str(jnp.ones(1).dtype))] * 3)
    assert got == [(threading.current_thread().name, "float32")] * 3


def test_collapse_formats_two_at_a_time_give_the_bits_of_one_after_the_other(tmp_path):
    """run_collapse runs its formats two at a time where twice one forward's memory fits the limit,
    each emulated one in the program specialised to its formats; with less memory one after the other:
    the same collapse.csv byte for byte. (That the shared program, which a second format takes one
    after the other, gives the specialised one's bits is tests/test_traced_formats.py's.)"""
    from collapse_sim.experiments.collapse import check_collapse, memory_estimate, run_collapse
    from collapse_sim.model import ModelConfig, init_params

    params = init_params(ModelConfig(d=8, n_layers=1, vocab=8, pe="rope"))
    fmts = check_collapse(20, 1.0, "bf16,fp64", "emulated")
    one = memory_estimate(params.config, 20, None) / 2**30
    runs, said = {}, {}
    for how, limit in (("together", 8.0), ("one after the other", 1.5 * one)):
        said[how] = []
        runs[how] = run_collapse(params, "repeat_last", 20, fmts, tmp_path / how.replace(" ", "_"), mem_limit_gib=limit,
                                 log=said[how].append)
    assert said["together"][0].endswith("; the formats run two at a time")
    assert not said["one after the other"][0].endswith("two at a time")
    a, b = runs["together"], runs["one after the other"]
    assert [r.fmt for r in a.results] == [r.fmt for r in b.results] == ["bf16", "fp64"]
    for x, y in zip(a.results, b.results):
        assert np.array_equal(x.l1.view(np.uint64), y.l1.view(np.uint64))
    assert a.files[0].read_bytes() == b.files[0].read_bytes()


def test_started_setups_equal_setups_run_one_after_the_other(monkeypatch):
    """A section's setups started together (``start_backends``, their runs two at a time on the
    context's lane) measure what they measure one after the other, bit for bit, record their CSV
    rows in the order of the calls, and run an equal sweep of two setups once (the float64 run
    with outputs that two setups with one model and family read)."""
    import dataclasses

    from collapse_sim.experiments import paper

    sizes = dataclasses.replace(paper.TINY, ref_n=0, backend="emulated")
    setups = [(dict(pe="none"), "repeat_last"), (dict(pe="rope"), "repeat_last"), (dict(pe="none"), "ones"),
              (dict(pe="none"), "repeat_last")]

    real = paper.collapse_sweep

    def run(together: bool):
        calls, threads = [], set()

        def spy(*a, **k):
            calls.append((a[0].config.pe, a[1], a[4])), threads.add(threading.get_ident())
            return real(*a, **k)

        monkeypatch.setattr(paper, "collapse_sweep", spy)
        ctx = paper.Context(sizes)
        args = [(ctx, paper.report_model(d=8, **over), fam, 10, ("bf16", "fp16")) for over, fam in setups]
        if together:
            started = [paper.start_backends(*a, tag=f"T{i}", ref=False) for i, a in enumerate(args)]
            res = [finish() for finish in started]
        else:
            res = [paper.run_backends(*a, tag=f"T{i}", ref=False) for i, a in enumerate(args)]
        ctx.settle()
        return res, ctx.csv_rows, calls, threads

    alone, rows_alone, calls_alone, _ = run(False)
    both, rows_both, calls_both, threads = run(True)
    assert len(threads) == 2  # the lane's thread took some of the runs
    assert sorted(calls_both) == sorted(set(calls_both))  # every sweep once: the fourth setup is the first's
    assert len(calls_both) == len(calls_alone) == 3 * 3  # three setups, three backends each
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows_both] == \
        [{k: v for k, v in r.items() if k != "seconds"} for r in rows_alone]
    for a, b in zip(alone, both):
        assert set(a) == set(b) == {"bf16", "fp16", "fp64"}
        for k in a:
            assert np.array_equal(a[k].l1, b[k].l1) and np.array_equal(a[k].identical, b[k].identical)
