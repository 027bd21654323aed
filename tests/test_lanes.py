"""Independent work two at a time (collapse_sim.lanes): values in order whichever thread computed
them, the two threads really side by side, errors handed to the waiter, and the collapse command's
formats run so give the bits they give one after the other."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from collapse_sim.lanes import Lane, in_order


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


def test_errors_reach_the_waiter_in_order():
    def bad():
        raise ValueError("the second failed")

    with pytest.raises(ValueError, match="the second failed"):
        in_order([lambda: 1, bad, lambda: 3])


def test_dropped_work_runs_where_it_is_waited_for_and_the_thread_ends():
    lane = Lane()
    gate = threading.Event()
    first = lane.submit(lambda: gate.wait(timeout=30))
    later = lane.submit(lambda: threading.current_thread().name)
    lane.drop()  # `later` no longer queued, unless the lane's thread already took it
    gate.set()
    assert first() is True and later() in (threading.current_thread().name, "collapse-sim-lane")
    for _ in range(100):  # the daemon thread ends once nothing is queued
        if lane._thread is None:
            break
        threading.Event().wait(0.05)
    assert lane._thread is None


def test_collapse_formats_two_at_a_time_give_the_bits_of_one_after_the_other(tmp_path):
    """run_collapse runs its formats two at a time where twice one forward's memory fits the limit,
    each in the program specialised to its formats; with less memory one after the other (the
    second format in the shared program, automatic): the same collapse.csv byte for byte."""
    from collapse_sim.experiments.collapse import check_collapse, memory_estimate, run_collapse
    from collapse_sim.model import ModelConfig, init_params

    params = init_params(ModelConfig(d=8, n_layers=1, vocab=8, pe="rope"))
    fmts = check_collapse(20, 1.0, "bf16,fp16,fp64", "emulated")
    one = memory_estimate(params.config, 20, None) / 2**30
    runs, said = {}, {}
    for how, limit in (("together", 8.0), ("one after the other", 1.5 * one)):
        said[how] = []
        runs[how] = run_collapse(params, "repeat_last", 20, fmts, tmp_path / how.replace(" ", "_"), mem_limit_gib=limit,
                                 log=said[how].append)
    assert said["together"][0].endswith("; the formats run two at a time")
    assert not said["one after the other"][0].endswith("two at a time")
    a, b = runs["together"], runs["one after the other"]
    assert [r.fmt for r in a.results] == [r.fmt for r in b.results] == ["bf16", "fp16", "fp64"]
    for x, y in zip(a.results, b.results):
        assert np.array_equal(x.l1.view(np.uint64), y.l1.view(np.uint64))
    assert a.files[0].read_bytes() == b.files[0].read_bytes()
