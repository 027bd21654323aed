"""The user's wall time: each README taste command, cold and warm, with its compilations.

Every command runs in a fresh process, as a user would start it, twice with one
compilation-cache directory: *cold* (the directory empty) and *warm* (the programs of
the cold run on disk). For each run it prints the wall time, the CPU seconds (user +
system), the number of XLA programs compiled and their seconds, and the programs loaded
from the cache (the CLI writes these to ``$COLLAPSE_SIM_COMPILE_STATS``). The baseline, measured in the same run and printed
as the ratio's denominator, is a fresh process that imports collapse_sim and runs one
native float32 forward of the same model size (d = 64, one layer, N = 2,000) including
its compile: the least any command that runs a model can cost.

    python benchmarks/bench_time_to_result.py                 # the taste commands
    python benchmarks/bench_time_to_result.py --reproduce     # and reproduce --quick (minutes)
    python benchmarks/bench_time_to_result.py --only collapse # commands whose text contains 'collapse'

Targets (2 cores): each taste command <= 20 s cold and <= 8 s warm; reproduce --quick
<= 2 min cold and <= 1 min warm. The script prints whether each is met.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASTE = [
    "round 65519 65520 --format fp16",
    "round 1.00390625000000001 --format bf16 --mode ru",
    "collapse --family repeat_last --format bf16,fp16,fp64 --pe none --max-len 2000 --out {tmp}/c",
    "collapse --model gaussian --family repeat_last --pe rope --format fp64 --max-len 2000 --out {tmp}/g",
    "theorem thm42 --instances 20",
    "oversquash --n 64 --out {tmp}/o",
    "scaling --p 4..16 --out {tmp}/s",
]
REPRODUCE = "reproduce --quick --out {tmp}/r"
TARGETS = {"taste": (20.0, 8.0), "reproduce": (120.0, 60.0)}

BASELINE = """
import time, numpy as np
t0 = time.perf_counter()
import collapse_sim as cs
cs.enable_x64()
from collapse_sim.backends import make_backend
from collapse_sim.model import ModelConfig, init_params, forward
p = init_params(ModelConfig(d=64, n_layers=1, vocab=16, pe="none", max_len=4096))
y = forward(p, np.ones(2000, np.int64), make_backend("native", "fp32"))
np.asarray(y)
print(time.perf_counter() - t0)
"""


def run_cli(cmd: str, cache: Path, tmp: Path) -> dict:
    """One run of ``cmd`` in a fresh process, its outputs under the empty folder ``tmp``: a
    warm run must not find the cold run's outputs (``reproduce`` would reuse its stored units)."""
    tmp.mkdir(parents=True)
    stats = tmp / "stats.json"
    env = dict(os.environ, COLLAPSE_SIM_COMPILE_CACHE=str(cache), COLLAPSE_SIM_COMPILE_STATS=str(stats))
    argv = [sys.executable, "-m", "collapse_sim.cli", *shlex.split(cmd.format(tmp=tmp))]
    t0, c0 = time.perf_counter(), _children_cpu()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, cwd=tmp)
    wall, cpu = time.perf_counter() - t0, _children_cpu() - c0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd!r} failed with exit {proc.returncode}:\n{proc.stderr[-2000:]}")
    rec = json.loads(stats.read_text()) if stats.exists() else {}
    return {"wall": wall, "cpu": cpu, **rec}


def _children_cpu() -> float:
    """CPU seconds (user + system, every thread) of the finished child processes so far: on a
    machine shared with other work the wall clock moves with the load, these much less."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def baseline(tmp: Path) -> float:
    env = dict(os.environ, COLLAPSE_SIM_COMPILE_CACHE="off")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", BASELINE], env=env, check=True, capture_output=True, cwd=tmp)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reproduce", action="store_true", help="also time reproduce --quick (several minutes cold)")
    ap.add_argument("--only", default=None, help="run only the commands containing this text")
    args = ap.parse_args(argv)
    cmds = [(c, "taste") for c in TASTE] + ([(REPRODUCE, "reproduce")] if args.reproduce else [])
    if args.only:
        cmds = [(c, k) for c, k in cmds if args.only in c]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        base = baseline(tmp)
        print(f"baseline: a fresh process, one native fp32 forward (d=64, L=1, N=2000) with its compile: {base:.1f} s")
        print(f"{'command':70s} {'run':5s} {'wall s':>7s} {'cpu s':>7s} {'x base':>7s} {'compiled':>8s} "
              f"{'compile s':>9s} {'cached':>6s}  target")
        for cmd, kind in cmds:
            cache = tmp / f"cache-{abs(hash(cmd))}"
            for run, limit in zip(("cold", "warm"), TARGETS[kind]):
                r = run_cli(cmd, cache, tmp / f"{abs(hash(cmd))}-{run}")
                met = "met" if r["wall"] <= limit else "NOT met"
                print(f"{cmd.format(tmp='T')[:70]:70s} {run:5s} {r['wall']:7.1f} {r['cpu']:7.1f} {r['wall'] / base:7.1f} "
                      f"{r.get('compiled', -1):8d} {r.get('compile_seconds', 0.0):9.1f} {r.get('cache_hits', 0):6d}  "
                      f"<= {limit:.0f} s: {met}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
