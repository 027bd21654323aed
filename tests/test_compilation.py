"""The persistent compilation cache and the compile counts (collapse_sim.compilation, progress)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from collapse_sim import compilation
from collapse_sim.compilation import CompileCacheError, cache_dir_from, snapshot, use_cache
from collapse_sim.progress import stage


def _cli(args, cache, stats, cwd):
    env = dict(os.environ, COLLAPSE_SIM_COMPILE_CACHE=str(cache), COLLAPSE_SIM_COMPILE_STATS=str(stats))
    env.pop("COLLAPSE_SIM_STORE_PROGRAMS", None)  # the CLI's default: forwards stored whole
    proc = subprocess.run([sys.executable, "-m", "collapse_sim.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(stats.read_text())


@pytest.mark.parametrize("args", [
    ["collapse", "--family", "repeat_last", "--format", "bf16,fp64", "--pe", "rope", "--max-len", "24", "--d", "8",
     "--vocab", "8", "--out", "out"],
    ["theorem", "thm51", "--instances", "1", "--max-n", "6"],
], ids=["collapse", "theorem"])
def test_rerun_compiles_nothing(tmp_path, args):
    """A second run of the same command, in a new process, loads every program from the cache
    (the forwards whole, from the cache's ``exe`` folder: backends/_stored.py) and writes the
    same results."""
    cache = tmp_path / "cache"
    first = _cli(args, cache, tmp_path / "a.json", tmp_path)
    if "--out" in args:
        (tmp_path / "out").rename(tmp_path / "out1")
    second = _cli(args, cache, tmp_path / "b.json", tmp_path)
    assert first["compiled"] > 0 and first["cache"] == str(cache)
    assert second["compiled"] == 0, second
    assert second["cache_hits"] == first["compiled"] + first["cache_hits"]
    if "--out" in args:
        assert len(list((cache / "exe").glob("*.exe"))) == 2  # the bf16 and fp64 forwards
        assert (tmp_path / "out" / "collapse.csv").read_bytes() == (tmp_path / "out1" / "collapse.csv").read_bytes()


def test_cache_location_rules(tmp_path, monkeypatch):
    monkeypatch.delenv(compilation.ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir_from(None) == tmp_path / "xdg" / "collapse_sim" / "xla"
    monkeypatch.setenv(compilation.ENV, str(tmp_path / "env"))
    assert cache_dir_from(None) == tmp_path / "env"
    assert cache_dir_from(str(tmp_path / "flag")) == tmp_path / "flag"  # the flag wins over the environment
    for off in ("off", "OFF", "none"):
        assert cache_dir_from(off) is None
    monkeypatch.setenv(compilation.ENV, "off")
    assert cache_dir_from(None) is None


def test_unusable_cache_dir_is_refused_and_nothing_created(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    before = jax.config.jax_compilation_cache_dir
    with pytest.raises(CompileCacheError, match="compilation cache"):
        use_cache(f / "sub")
    assert jax.config.jax_compilation_cache_dir == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_counts_follow_compiles():
    """A new program counts once, compiled or (if the session's persistent cache holds the
    same program from an earlier test) loaded; calling it again counts nothing."""
    f = jax.jit(lambda x: jnp.cumsum(x * 3.0) - x)  # a new function: jit's own cache misses
    x = jnp.arange(7.0, dtype=jnp.float64) + time.time() % 1
    a = snapshot()
    f(x).block_until_ready()
    b = snapshot()
    f(x).block_until_ready()
    c = snapshot()
    assert b.since(a).compiled + b.since(a).cache_hits == 1
    assert c.since(b).compiled == 0 and c.since(b).cache_hits == 0


@pytest.mark.parametrize("probe", [False, True], ids=["plain", "probed"])
def test_a_forward_is_one_program(probe):
    """A forward at a new length compiles (or loads) its one program and nothing besides: the tokens
    and probes reach it without a program of their own, which two threads side by side
    (collapse_sim.lanes) would each compile, making a rerun's counts differ from the first run's."""
    from collapse_sim.backends import make_backend
    from collapse_sim.model import ModelConfig, forward, init_params

    cfg = ModelConfig(d=6, n_layers=1, vocab=5, seed=3, max_len=64)
    n = 41 + probe  # lengths no other test runs: the process's own jit cache misses
    tokens = np.arange(n, dtype=np.int64) % 5
    a = snapshot()
    out = forward(init_params(cfg), tokens, make_backend("native", "fp64"), probe=tokens % 2 if probe else None)
    np.asarray(out)
    got = snapshot().since(a)
    assert got.compiled + got.cache_hits == 1, got


def test_stage_beats_while_silent_work_runs():
    out = io.StringIO()
    with stage("[t]", "waiting", every=0.2, stream=out):
        time.sleep(0.9)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[t] waiting ..."
    beats = [ln for ln in lines if "waiting:" in ln and "running" in ln]
    assert len(beats) >= 3  # one line every 0.2 s over 0.9 s
    assert "done in" in lines[-1]


def test_stages_side_by_side_each_report_their_own_thread():
    """Two stages on two threads at once (collapse_sim.lanes): each says its own phase while it beats
    and counts its own compiles at the end, not the other thread's."""
    import threading
    import uuid

    import jax

    from collapse_sim.progress import phase

    outs = {w: io.StringIO() for w in ("a", "b")}
    go = threading.Barrier(2)
    c = float(int(uuid.uuid4().hex[:6], 16))  # programs no earlier test compiled

    def work(w, programs):
        with stage("[t]", f"stage {w}", every=0.2, stream=outs[w]):
            with phase(f"phase of {w}"):
                go.wait(timeout=30)
                time.sleep(0.5)
            for k in range(programs):
                jax.jit(lambda x, k=k: x * c + float(k + 10 * (w == "a")))(1.0)

    t = threading.Thread(target=work, args=("b", 2))
    t.start()
    work("a", 1)
    t.join()
    for w, n in (("a", 1), ("b", 2)):
        lines = outs[w].getvalue().splitlines()
        other = "b" if w == "a" else "a"
        assert any(f"phase of {w}" in ln for ln in lines) and not any(f"phase of {other}" in ln for ln in lines)
        assert lines[-1].startswith(f"[t]   stage {w}: done in"), lines[-1]
        # this thread's programs only, each compiled here or loaded from the cache
        compiled = int(re.search(r"; (\d+) XLA program", lines[-1]).group(1))
        loaded = re.search(r", (\d+) loaded", lines[-1])
        assert compiled + (int(loaded.group(1)) if loaded else 0) == n, lines[-1]


def test_short_stage_prints_only_its_start():
    out = io.StringIO()
    with stage("[t]", "quick", every=5.0, stream=out):
        pass
    assert out.getvalue().splitlines() == ["[t] quick ..."]


def test_time_estimate_counts_the_work():
    """The estimate is a multiply-add count (T²/2·d attention, doubled by a probe, plus
    T·d·(4d + 2 d_ff) dense, per layer) times a per-backend cost, plus one compile per
    format and stream shape."""
    from collapse_sim.experiments import estimate
    from collapse_sim.families import make_pairs
    from collapse_sim.model import ModelConfig, token_bound

    c = ModelConfig(d=8, n_layers=2, d_ff=16, vocab=8, pe="none")
    assert estimate.multiply_adds(c, 10, probe=False) == (100 / 2 * 8 + 10 * 8 * (32 + 32)) * 2
    assert estimate.multiply_adds(c, 10, probe=True) == (100 * 8 + 10 * 8 * 64) * 2
    pairs = make_pairs("repeat_last", 100, token_bound(c))
    work = sum(estimate.multiply_adds(c, r.tokens.size, r.probe is not None) for r in pairs.runs)
    e = estimate.seconds(c, pairs, "emulated", "pairwise", formats=3)
    assert e.arithmetic == work * estimate.COST[("emulated", "pairwise")] * 3
    assert e.programs == 3 * len({(r.tokens.size, r.probe is not None) for r in pairs.runs})
    assert e.compile == e.programs * estimate.COMPILE["emulated"]
    exact = estimate.seconds(c, pairs, "emulated", "blocked(4)")
    assert exact.compile == exact.programs * estimate.COMPILE["emulated-certified"]
    one = estimate.seconds(c, pairs, "emulated", "pairwise")
    assert estimate.seconds(c, pairs, "native").compile < one.compile < exact.compile
    with pytest.raises(estimate.TooLongError, match="over the 1 s limit"):
        estimate.check(estimate.Estimate(2.0, 0.0, 1), 1.0, "this run")
    estimate.check(estimate.Estimate(0.5, 30.0, 1), 1.0, "this run")  # compiling is not limited: a cache may hold it


def test_provenance_records_compilations():
    from collapse_sim.results import provenance

    before = snapshot()
    jax.jit(lambda x: x * 5.0 + 1.0)(jnp.arange(3.0) + time.time() % 1).block_until_ready()
    prov = provenance()
    assert prov["compile_cache"] == jax.config.jax_compilation_cache_dir
    c = prov["compilation_process_total"]
    assert set(c) == {"compiled", "compile_seconds", "cache_hits", "cache_seconds"}
    assert c["compiled"] + c["cache_hits"] >= before.compiled + before.cache_hits + 1


def test_switching_the_cache_takes_effect(tmp_path):
    """JAX opens its persistent cache once per process; use_cache makes it reread the folder."""
    before = jax.config.jax_compilation_cache_dir
    try:
        for name in ("a", "b"):
            use_cache(tmp_path / name)
            jax.jit(lambda x: x * 7.0 - 2.0)(jnp.arange(5.0) + time.time() % 1).block_until_ready()
            assert any((tmp_path / name).iterdir()), name
        use_cache(None)
        n = len(list((tmp_path / "b").iterdir()))
        jax.jit(lambda x: x * 9.0 - 4.0)(jnp.arange(6.0)).block_until_ready()
        assert len(list((tmp_path / "b").iterdir())) == n and not (tmp_path / "c").exists()
    finally:
        use_cache(before)


def test_cache_off_writes_no_folder(tmp_path, monkeypatch, capsys):
    from collapse_sim.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    before = jax.config.jax_compilation_cache_dir
    try:
        for env in ("off", None):
            if env:
                monkeypatch.setenv(compilation.ENV, env)
                assert main(["round", "1.1", "-f", "bf16"]) == 0
            else:
                monkeypatch.delenv(compilation.ENV)
                assert main(["round", "1.1", "-f", "bf16", "--compile-cache", "off"]) == 0
            assert not (tmp_path / "xdg").exists()
    finally:
        use_cache(before)


def test_a_trace_that_never_compiles_is_not_compiling_forever():
    from collapse_sim.compilation import STATS

    jax.eval_shape(jax.jit(lambda x: x + 1.0), jnp.arange(3.0) + time.time() % 1)
    STATS.forget_open()
    assert STATS.compiling_for() is None


def test_segment_count_by_size():
    from collapse_sim.backends import make_backend
    from collapse_sim.backends.emulated.schedule import _SEGMENTS, _segment_count, _segments_of

    emu = lambda policy: make_backend("emulated", policy).emu  # noqa: E731
    sequential, exact = emu("compute=bf16,order=sequential"), emu("compute=bf16,order=exact")
    assert _segment_count(sequential, 2000, 64) == 1 and _segment_count(exact, 4096, 64) == 1
    sizes = range(1, 80_000, 997)
    counts = [_segment_count(sequential, n, 64) for n in sizes]
    assert counts == sorted(counts) and max(counts) == _SEGMENTS and min(counts) == 1
    assert all(_segment_count(exact, n, 64) <= _segment_count(sequential, n, 64) for n in sizes)
    # pairwise in a deterministic mode takes its keys in chunks instead; under stochastic rounding it keeps the rule
    assert all(_segment_count(emu(f"compute=bf16,mode={m}"), n, 64) == 1 for n in sizes for m in ("rne", "rd"))
    assert [_segment_count(emu("compute=bf16,mode=sr(4,seed=1)"), n, 64) for n in sizes] == counts
    # a stream's rows and its probes' in one call (model._rows: positions 0, 1, 1, 2, ...) run in as many
    # segments as the stream alone, so the program holds no more copies of the attention
    for n in (2000, 4096, 9000, 30_000):
        merged = np.stack([np.arange(n), np.arange(1, n + 1)], axis=1).ravel()
        assert _segments_of(sequential, merged, 64) == _segment_count(sequential, n + 1, 64) > 0
        assert _segments_of(sequential, np.arange(n), 64) == _segment_count(sequential, n, 64)


_LEVEL_SCRIPT = """
import sys
import numpy as np
import collapse_sim
collapse_sim.enable_x64()
from collapse_sim.backends import make_backend
from collapse_sim.model import ModelConfig, forward, init_params
P = init_params(ModelConfig(d=8, n_layers=1, d_ff=8, vocab=5, pe="rope", seed=3))
toks = np.array([1, 2, 3, 1, 4, 0, 2, 2])
ys = [np.asarray(make_backend("emulated", pol).to_numpy(forward(P, toks, make_backend("emulated", pol))))
      for pol in ("bf16", "storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32,kernel=flash2(3)")]
np.save(sys.argv[1], np.stack(ys))
"""


def test_optimisation_level_changes_no_bit(tmp_path):
    """The suite runs at XLA's backend optimisation level 0 (tests/conftest.py, to compile
    faster); forwards compiled at the default level in a fresh process give the same bits."""
    import numpy as np

    from conftest import OPT_FLAG

    assert OPT_FLAG in os.environ["XLA_FLAGS"]
    script = tmp_path / "levels.py"
    script.write_text(_LEVEL_SCRIPT)
    outs = {}
    for name, flags in (("test level", os.environ["XLA_FLAGS"]), ("default level", os.environ["XLA_FLAGS"].replace(OPT_FLAG, ""))):
        env = dict(os.environ, XLA_FLAGS=flags.strip())
        proc = subprocess.run([sys.executable, str(script), str(tmp_path / f"{len(outs)}.npy")], env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr
        outs[name] = np.load(tmp_path / f"{len(outs)}.npy")
    a, b = outs.values()
    assert np.isfinite(a).all() and np.array_equal(a.view(np.uint64), b.view(np.uint64))


def test_shared_groups_are_policies_of_one_shared_program():
    """Policies that differ only in their formats (within the shared class) form a group; a kernel,
    a softmax format apart from the compute format, a format outside the class each stand alone."""
    from collapse_sim.backends.emulated.backend import shared_groups

    pols = ["bf16", "fp16", "compute=bf16,kernel=online(64)", "storage=bf16,compute=bf16,accumulate=fp32,softmax=fp32",
            "fp32", "compute=e4m3fnuz", "storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32"]
    assert shared_groups(pols) == [{"bf16", "fp16", "fp32", "storage=bf16,compute=fp32,accumulate=fp32,softmax=fp32"}]
    assert shared_groups(["bf16"]) == []


def test_shared_first_compiles_one_program_for_a_group():
    """``shared="first"``: the first policy at a shape runs the shared program, so a second of its
    group compiles nothing (the automatic choice compiles a specialised program, then the
    shared one); a policy that ran its specialised program at a shape keeps it."""
    import numpy as np

    from collapse_sim.backends.emulated import EmulatedBackend
    from collapse_sim.model import ModelConfig, forward, init_params

    def compiles(params, policy, shared):
        before = snapshot()
        forward(params, np.arange(10) % 5, EmulatedBackend(f"compute={policy},order=sequential", shared=shared)
                ).block_until_ready()
        new = snapshot().since(before)
        return new.compiled + new.cache_hits

    # configs of their own (vocab): no program of this test was seen before in the process
    first = init_params(ModelConfig(d=4, n_layers=1, vocab=7, pe="none", seed=1))
    assert compiles(first, "bf16", "first") >= 1
    assert compiles(first, "fp16", "first") == 0
    kept = init_params(ModelConfig(d=4, n_layers=1, vocab=9, pe="none", seed=1))
    assert compiles(kept, "bf16", None) >= 1  # automatic: specialised
    assert compiles(kept, "bf16", "first") == 0  # keeps it
    with pytest.raises(ValueError, match="shared must be"):
        EmulatedBackend("bf16", shared="always")
