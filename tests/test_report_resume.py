"""``collapse-sim reproduce`` at toy sizes (experiments.paper.TINY): the report's sections, and
a report that survives interruption. One test makes one uninterrupted run; the resumed
runs start from copies of its stored units (OUT/.runs), with some of them removed."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from collapse_sim.experiments.paper import TINY
from collapse_sim.report import reproduce
from collapse_sim.results import NotStored, UnitStore, environment

TIMING = ('  "compiled":', '  "compile_seconds":', '  "cache_hits":', '  "cache_seconds":', "Wall time (")


def _report(out: Path) -> list[str]:
    """report.md without the lines that time this invocation (wall time, compile counts)."""
    return [ln for ln in (out / "report.md").read_text().splitlines() if not ln.startswith(TIMING)]


def _outputs(out: Path) -> dict[str, bytes]:
    """Every file the report wrote (collapse.csv, the figures), byte for byte."""
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix in (".csv", ".png")}




def _copy_units(whole: Path, dst: Path, drop) -> list[str]:
    """``dst`` with a copy of the stored units of ``whole`` but those whose file name ``drop`` accepts
    (as if the run had been interrupted before them); returns the dropped names."""
    (dst / ".runs").mkdir(parents=True)
    dropped = []
    for p in (whole / ".runs").iterdir():
        if drop(p.name):
            dropped.append(p.name)
        else:
            shutil.copy2(p, dst / ".runs" / p.name)
    assert dropped
    return dropped


def _every_section_verdict_and_figure(whole):
    """The whole report at toy sizes (every section, figure and table)."""
    out = whole
    text = (out / "report.md").read_text()
    sections = ["## Verdict", "## Formats", "## Rounding", "## Reduction order", "## Fig. 8", "### The captions' reading",
                "### Decoder variants", "## Fig. 9", "## Fig. 10", "## Copying and counting",
                "## Kernels and remedies", "## Accumulators and block-scaled formats",
                "## Signal below rounding noise", "## Theorems", "### Thm 4.2", "## First-collapse lengths",
                "## Where we disagree", "## Provenance"]
    at = [text.find(s) for s in sections]
    assert all(i >= 0 for i in at) and at == sorted(at), dict(zip(sections, at))
    assert text.index("## Verdict") < text.index("## Formats") < text.index("## Fig. 8")  # the verdict opens the report
    verdict = text.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in verdict.splitlines() if ln.startswith("| [")]
    words = {"reproduced", "partly", "not reproduced", "not testable here"}
    assert len(rows) >= 10 and all(ln.rsplit("|", 2)[1].strip().strip("*") in words for ln in rows), rows
    for claim in ("Fig. 8", "Fig. 9", "Fig. 10", "Counting", "Copying", "Remedy", "Thm 4.2", "Thm 5.1", "B.4", "B.8", "B.9"):
        assert any(claim in ln for ln in rows), claim
    figs = [line.rsplit("](", 1)[1].rstrip(")") for line in text.splitlines() if line.startswith("![")]
    assert figs and all((out / f).exists() for f in figs)
    assert "fig8_captions.png" in figs and "fig10_captions.png" in figs
    assert "MISMATCH" not in text and "<!--" not in text and "Not run yet" not in text


def _interrupted_run_resumes_to_the_same_report(whole, tmp_path, monkeypatch, capsys):
    """A run that stops (an exception in the remedies) keeps every unit it measured; the rerun
    measures only the units still missing and writes collapse.csv, every figure and report.md
    (but its timing lines) byte for byte as the uninterrupted run did."""
    import collapse_sim.experiments.paper as paper
    import collapse_sim.report.figures as figures

    out = tmp_path / "rep"
    lost = _copy_units(whole, out, lambda name: name.startswith(("Fig._10_ALiBi", "remedy_fp32_throughout")))
    capsys.readouterr()

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(figures, "start_remedies", interrupted)
    with pytest.raises(KeyboardInterrupt):
        reproduce(str(out), sizes=TINY)
    assert not (out / "report.md").exists() and not (out / "collapse.csv").exists()
    said = capsys.readouterr().out
    assert "Fig. 10, ALiBi / bf16: n ≤ 48 in" in said and "Fig. 10, RoPE / bf16: reused" in said
    again = [n for n in lost if not n.startswith("remedy")]
    assert again and all((out / ".runs" / n).is_file() for n in again)  # measured before the interruption, kept

    monkeypatch.undo()
    sweeps = []
    real = paper.collapse_sweep
    monkeypatch.setattr(paper, "collapse_sweep", lambda *a, **k: sweeps.append(a[4]) or real(*a, **k))
    assert reproduce(str(out), sizes=TINY) == 0
    said = capsys.readouterr().out
    assert sorted(sweeps) == sorted(["fp32", "fp64"] * 4)  # the four families of the one remedy left, nothing else
    assert "remedy fp32 throughout, ones / fp32: n ≤ 24 in" in said and "Fig. 10, ALiBi / bf16: reused" in said
    assert _outputs(out) == _outputs(whole)
    assert _report(out) == _report(whole)


def _rerun_reuses_every_unit_without_measuring_or_compiling(whole, monkeypatch, capsys):
    """The same command again into the same folder: every unit reused, no sweep, no XLA program
    compiled, and the same files."""
    import collapse_sim.experiments.captions as captions
    import collapse_sim.experiments.paper as paper
    from collapse_sim.compilation import snapshot

    before = _outputs(whole), _report(whole)

    def never(*a, **k):
        raise AssertionError("a stored unit was measured again")

    for mod, name in [(paper, "collapse_sweep"), (captions, "collapse_sweep"), (captions, "caption_row"),
                      (paper, "measure_fig9")]:
        monkeypatch.setattr(mod, name, never)
    t0 = snapshot()
    assert reproduce(str(whole), sizes=TINY) == 0
    assert snapshot().since(t0).compiled == 0
    said = capsys.readouterr().out
    n_units = len(list((whole / ".runs").iterdir()))
    assert said.count(": reused\n") == n_units and f"{n_units} stored units reused, 0 measured" in said
    assert (_outputs(whole), _report(whole)) == before


def _only_some_sections_the_others_from_stored_units_or_not_run_yet(whole, tmp_path, capsys):
    """``only=["fig9"]`` into a folder that holds every unit but the Fig. 8 decoder's: Fig. 9 and
    every other stored section are in the report, Fig. 8 is marked "not run yet" (its captions'
    part, measured, is rolled back with it), and collapse.csv holds exactly the other runs' rows."""
    import csv

    out = tmp_path / "rep"
    _copy_units(whole, out, lambda name: name.startswith("Fig._8_"))
    assert reproduce(str(out), sizes=TINY, only=["fig9"]) == 0
    text = (out / "report.md").read_text()
    fig8 = text.split("## Fig. 8", 1)[1].split("\n## ", 1)[0]
    assert "*Not run yet.*" in fig8 and "--only fig8" in fig8 and "###" not in fig8
    assert text.count("*Not run yet.*") == 1 and "## Fig. 10: positional encodings" in text
    assert "| Fig. 8 |" not in text  # no comparison row of the section that did not run
    said = capsys.readouterr().out
    assert "Fig. 8: not run yet (Fig. 8, sinusoidal APE in the residual stream / bf16 is not stored)" in said
    assert "0 measured" in said

    def rows(path):
        with path.open() as fh:
            return list(csv.DictReader(fh))

    assert rows(out / "collapse.csv") == [r for r in rows(whole / "collapse.csv") if not r["experiment"].startswith("Fig. 8")]


def test_toy_report_sections_resume_rerun_and_only(tmp_path_factory, monkeypatch, capsys):
    """One uninterrupted report at TINY sizes (~90 s), then, from copies of its stored units, an
    interrupted run resumed, the same command again, and one section alone. One test rather than
    four sharing a module fixture: under pytest 9.2, pytest-xdist 3.8's ``--dist loadgroup`` does
    not keep grouped tests on one worker (pytest-xdist#1386), and split over the two workers the
    report was built twice."""
    whole = tmp_path_factory.mktemp("whole") / "rep"
    assert reproduce(str(whole), sizes=TINY) == 0
    _every_section_verdict_and_figure(whole)
    with monkeypatch.context() as m:
        _interrupted_run_resumes_to_the_same_report(whole, tmp_path_factory.mktemp("resumed"), m, capsys)
    with monkeypatch.context() as m:
        _rerun_reuses_every_unit_without_measuring_or_compiling(whole, m, capsys)
    _only_some_sections_the_others_from_stored_units_or_not_run_yet(whole, tmp_path_factory.mktemp("only"), capsys)


@dataclasses.dataclass(frozen=True)
class _Unit:
    name: str
    values: np.ndarray
    extra: dict


def test_unit_store_round_trip_damage_other_inputs_fresh_and_reuse_only(tmp_path):
    """Stored data come back equal in type and bits (numpy scalars, tuples as keys, nan and
    inf, dataclasses); a damaged file or one stored for other inputs is measured again with one
    line saying so; fresh measures again; reuse_only raises NotStored for what is missing."""
    said: list[str] = []
    calls: list[int] = []
    data = {("fig8", "residual"): (_Unit("u", np.arange(3.0), {"k": np.float64(0.1), "b": np.bool_(True)}), [1, None]),
            "x": float("nan"), "y": -math.inf, "z": np.int64(7), "s": "é"}

    def compute():
        calls.append(1)
        return data

    def store(**kw):
        return UnitStore(tmp_path / ".runs", types=(_Unit,), log=said.append, **kw)

    key = {"n": 48, "formats": ("bf16",)}
    assert store().will_measure("Fig. 8, a / bf16", key)
    assert store().get("Fig. 8, a / bf16", key, compute) is data and len(calls) == 1
    assert not store().will_measure("Fig. 8, a / bf16", key) and store(fresh=True).will_measure("Fig. 8, a / bf16", key)
    assert store().will_measure("Fig. 8, a / bf16", {**key, "n": 1536}) and store().will_measure("Fig. 8, b / bf16", key)
    got = store().get("Fig. 8, a / bf16", key, compute)
    assert len(calls) == 1 and said[-1] == "Fig. 8, a / bf16: reused"
    (unit, tail), = [got[("fig8", "residual")]]
    assert type(unit) is _Unit and unit.values.tobytes() == data[("fig8", "residual")][0].values.tobytes()
    assert type(unit.extra["k"]) is np.float64 and unit.extra["k"] == 0.1 and type(unit.extra["b"]) is np.bool_
    assert tail == [1, None] and math.isnan(got["x"]) and got["y"] == -math.inf and type(got["z"]) is np.int64
    assert list(got) == list(data) and got["s"] == "é"

    path = store().path("Fig. 8, a / bf16")
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # a file cut short
    assert store().will_measure("Fig. 8, a / bf16", key)
    store().get("Fig. 8, a / bf16", key, compute)
    assert len(calls) == 2 and said[-1] == f"Fig. 8, a / bf16: {path.name} is unreadable (BadZipFile); recomputing"
    store().get("Fig. 8, a / bf16", {**key, "n": 1536}, compute)  # other sizes
    assert len(calls) == 3 and said[-1] == f"Fig. 8, a / bf16: {path.name} is stored for other inputs; recomputing"
    store(fresh=True).get("Fig. 8, a / bf16", {**key, "n": 1536}, compute)
    assert len(calls) == 4
    env = environment()
    store(environment=env).get("Fig. 8, a / bf16", {**key, "n": 1536}, compute)  # measured in a known environment
    assert len(calls) == 5 and said[-1].endswith("is stored for other inputs; recomputing")
    store(environment=env).get("Fig. 8, a / bf16", {**key, "n": 1536}, compute)
    assert len(calls) == 5
    store(environment={**env, "jax": "0.0.0"}).get("Fig. 8, a / bf16", {**key, "n": 1536}, compute)  # another JAX
    assert len(calls) == 6 and said[-1].endswith("is stored for other inputs; recomputing")
    store(fresh=True).get("Fig. 8, a / bf16", {**key, "n": 1536}, compute)
    assert len(calls) == 7
    s = store()
    s.reuse_only = True
    assert not s.will_measure("Fig. 8, b / bf16", key)  # reuse_only measures nothing
    assert s.get("Fig. 8, a / bf16", {**key, "n": 1536}, compute) is not None and len(calls) == 7
    with pytest.raises(NotStored):
        s.get("Fig. 8, b / bf16", key, compute)
    s = store()
    s.reuse_only = True
    with pytest.raises(NotStored):
        s.get("Fig. 8, a / bf16", key, compute)  # stored for other inputs: not used
    assert said[-1].endswith("is stored for other inputs; not used") and len(calls) == 7
    with pytest.raises(TypeError, match="cannot store a set"):
        store().get("other", {}, lambda: {1, 2})
    with pytest.raises(RuntimeError, match="share the file"):
        s2 = store()
        s2.get("Fig. 8: a / bf16", key, compute)
        s2.get("Fig. 8, a / bf16", {**key, "n": 1}, compute)


def test_unit_folder_that_is_a_file_is_refused(tmp_path):
    """OUT/.runs being a file: one sentence (an OutputError), before anything is measured."""
    from collapse_sim.results import OutputError

    (tmp_path / ".runs").write_text("")
    with pytest.raises(OutputError, match="is an existing file"):
        UnitStore(tmp_path / ".runs")


def test_host_work_starts_ahead_only_where_it_will_be_measured(tmp_path):
    """Context.ahead starts a unit's compute on the host thread where ``stored`` would measure it,
    and hands back the compute itself, not started, where the unit is stored or already measured."""
    import threading

    from collapse_sim.experiments.paper import Context

    ran: list[str] = []
    started, gate = threading.Event(), threading.Event()

    def compute():
        started.set()
        gate.wait(timeout=10)  # started, not finished, until this thread says so
        ran.append(threading.current_thread().name)
        return {"x": np.arange(3.0)}

    ctx = Context(sizes=TINY, store=UnitStore(tmp_path / ".runs", log=lambda m: None))
    key = {"tag": "t", "n": 16}
    waiting = ctx.ahead("t / arb256", key, compute)
    assert started.wait(timeout=10) and waiting is not compute and not ran  # running before anyone waits for it
    gate.set()
    got = ctx.stored("t / arb256", key, lambda: ctx.once(dict(key, tag=None), waiting))
    assert ran == [ran[0]] and ran[0].startswith("collapse-sim-host") and got["x"].tolist() == [0.0, 1.0, 2.0]
    assert ctx.ahead("t / arb256", key, compute) is compute  # stored now
    assert ctx.ahead("u / arb256", {**key, "tag": "u"}, compute, once=dict(key, tag=None)) is compute  # once
    other = ctx.ahead("t / arb256", {**key, "n": 32}, compute)  # stored for other inputs: measured again
    assert other is not compute and other()["x"].tolist() == [0.0, 1.0, 2.0] and len(ran) == 2

    def fails():
        raise ValueError("the reference failed")

    failing = ctx.ahead("v / arb256", {**key, "tag": "v", "n": 64}, fails)
    with pytest.raises(ValueError, match="the reference failed"):  # raised where the result is asked for
        ctx.stored("v / arb256", {**key, "tag": "v", "n": 64}, failing)
    assert ctx.store.will_measure("v / arb256", {**key, "tag": "v", "n": 64})  # nothing stored
