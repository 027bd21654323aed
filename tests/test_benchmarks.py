"""Every benchmark's ``main`` runs end to end at toy sizes and prints its ratios: the
benchmarks are not part of the package, so nothing else would notice them break."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_benchmark_is_smoke_tested():
    assert sorted(p.stem for p in BENCH.glob("bench_*.py")) == ["bench_formats", "bench_modes", "bench_rounding",
                                                                    "bench_sweep", "bench_time_to_result"]


def test_bench_modes_runs(capsys):
    # the forward part compiles one emulated forward per mode in a fresh process (~10 s each): left out
    _load("bench_modes").main(["--parts", "ops", "--modes", "rne,rd"])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ops ")]
    assert len(rows) == 3 * 2 and all("HLO instructions before optimisation" in r for r in rows)


def test_bench_rounding_runs(capsys):
    _load("bench_rounding").main(["--n", "1000", "--repeat", "1"])
    out = capsys.readouterr().out
    assert "round_to bf16 rne" in out and "round_to(bf16, rne) / plain copy = " in out


def test_bench_sweep_runs(capsys):
    # the emulated timings are left out: compiling a d = 64 forward alone takes ~20 s (the emulated forward
    # itself is covered by test_model and test_semantics); the recipes part runs one toy policy
    _load("bench_sweep").main(["--n", "8", "--loop-lengths", "2", "--skip", "emulated", "--mem-n", "8",
                               "--recipes", "compute=fp16;kernel=online(3)",
                               "--mem", "native:fp32", "--ref-n", "2"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res) == {"prefix", "recipes", "memory", "reference_53", "reference_256"}
    assert res["recipes"][0]["baseline"].startswith("storage=fp16,compute=fp16") and res["recipes"][0]["ratio"] > 0
    assert res["memory"][0]["peak_bytes"] and not res["memory"][0]["error"]
    assert res["prefix"]["ratio"] > 0 and res["reference_53"]["arb_speedup"] > 0


def test_bench_time_to_result_runs(capsys):
    _load("bench_time_to_result").main(["--only", "round 65519"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("baseline: a fresh process")
    rows = [ln for ln in out if ln.startswith("round 65519")]
    cold, warm = (r.split()[5:] for r in rows)  # run, wall s, cpu s, x base, compiled, compile s, cached, ...
    assert cold[0] == "cold" and warm[0] == "warm"
    assert int(cold[4]) > 0 and int(warm[4]) == 0 and int(warm[6]) == int(cold[4])  # warm: compiled 0, all cached


def test_bench_formats_runs(capsys):
    _load("bench_formats").main(["--n", "8", "--formats", "fp16", "--repeat", "1", "--d", "4", "--compile-n", "8",
                                 "--compile-layers", "1", "--orders", "pairwise"])
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["run"][0]["ratio"] > 0 and res["compile"][0]["compile"] > 0
