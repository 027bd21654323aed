"""What each rounding mode costs to compile: HLO instructions of one ``round_to`` per mode,
and XLA's backend-compile seconds of one emulated forward per mode, measured in one run.

    python benchmarks/bench_modes.py [--parts ops,forward] [--modes rne,rd,ru,rz,ro,rna,rnz,sr(8,seed=1)]
                                     [--policy compute=bf16,order=kahan] [--repeat 1] [--opt-level 0]

1. ``ops``: instructions of the HLO module of one jitted ``round_to`` of a (64,) array, before
   XLA's optimisation (``lower(...).as_text(dialect="hlo")``) and after it (the compiled
   module), for bf16 from float64, fp16 from float32, and the traced float64 class (one
   program for bf16, fp16, fp8, ...); stochastic rounding with given draws.
2. ``forward``: one fresh process per mode (the stochastic ones under ``--sr-policy``, which is
   run under rne too) runs the forward of the brief's model (d = 8,
   L = 2, 2 heads, RoPE, 12 tokens and their probes; ``EmulatedBackend(policy + mode,
   shared=False)``) and reports the seconds XLA's backend compile took (a
   ``jax._src.monitoring`` listener), the process's CPU seconds for the call and its wall
   seconds. ``--opt-level 0`` is the test suite's XLA flag (tests/conftest.py); pass
   ``--opt-level default`` for XLA's own. ``--hlo``: instead of timing, the HLO instructions
   of every module XLA compiled, before its optimisation passes (from an XLA dump).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the checkout this script belongs to, imported first
sys.path.insert(0, str(ROOT))
MODES = "rne,rd,ru,rz,ro,rna,rnz,sr(8,seed=1)"


def _count(text: str) -> int:
    """Instructions of an HLO module's text: the lines that define a value."""
    return sum(1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith(("HloModule", "//")))


def hlo_ops(modes):
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    from collapse_sim.rounding import FormatClass, Mode, parse_mode, round_to

    cases = [("bf16 from float64", "bf16", jnp.float64), ("fp16 from float32", "fp16", jnp.float32),
             ("traced float64 class", FormatClass().params("bf16"), jnp.float64)]
    rows = []
    for label, fmt, dt in cases:
        x = jnp.zeros(64, dt)
        for m in modes:
            mode = parse_mode(m)
            if isinstance(mode, Mode) and mode is Mode.SR:
                continue
            stochastic = mode.value.startswith("sr")
            kw = {"draws": np.zeros(64, np.uint64 if dt == jnp.float64 else np.uint32)} if stochastic else {}
            f = jax.jit(lambda v, kw=kw, mode=mode, fmt=fmt: round_to(v, fmt, mode, **kw))
            low = f.lower(x)
            before = _count(low.as_text(dialect="hlo"))
            after = _count(low.compile().as_text())
            rows.append({"case": label, "mode": mode.value, "hlo_before": before, "hlo_after": after})
            print(f"ops {label:22s} {mode.value:14s}: {before:4d} HLO instructions before optimisation, {after:4d} after",
                  flush=True)
    return rows


def _forward_child(policy: str) -> None:
    """One forward of the brief's model under ``policy``; prints one JSON line."""
    import collections

    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    from jax._src import monitoring

    acc = collections.defaultdict(float)
    monitoring.register_event_duration_secs_listener(lambda ev, d, **kw: acc.__setitem__(ev, acc[ev] + d))
    from collapse_sim.backends.emulated import EmulatedBackend
    from collapse_sim.model import ModelConfig, forward, init_params

    params = init_params(ModelConfig(d=8, n_layers=2, vocab=6, n_heads=2, pe="rope", seed=1))
    tokens = np.random.default_rng(2).integers(0, 6, 12)
    c0, t0 = time.process_time(), time.perf_counter()
    out = forward(params, tokens, EmulatedBackend(policy, shared=False), probe=(tokens + 1) % 6)
    jax.block_until_ready(out)
    backend = sum(v for k, v in acc.items() if "backend_compile" in k)
    print(json.dumps({"policy": policy, "backend_compile_s": backend, "cpu_s": time.process_time() - c0,
                      "wall_s": time.perf_counter() - t0}))


def _dumped_instructions(folder: str) -> int:
    """Instructions of every module XLA dumped before its optimisation passes."""
    return sum(_count(p.read_text()) for p in Path(folder).glob("*before_optimizations.txt"))


def forward_compiles(modes, policy: str, sr_policy: str, repeat: int, opt_level: str, hlo: bool = False):
    import tempfile

    env = dict(os.environ)
    if opt_level != "default":
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_backend_optimization_level={opt_level}".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["COLLAPSE_SIM_COMPILE_CACHE"] = "off"
    pols = [f"{sr_policy if m.startswith('sr') else policy},mode={m}" for m in modes]
    if any(m.startswith("sr") for m in modes):  # stochastic rounding's baseline: rne in its order
        pols.append(f"{sr_policy},mode=rne")
    rows = []
    for _ in range(repeat):
        for pol in pols:
            with tempfile.TemporaryDirectory() as dump:
                child_env = dict(env)
                if hlo:  # the dump costs time: counts and timings come from separate runs
                    child_env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_dump_to={dump}".strip()
                res = subprocess.run([sys.executable, __file__, "--child", pol], env=child_env, capture_output=True,
                                     text=True)
                if res.returncode != 0:
                    raise SystemExit(f"the forward under {pol} failed:\n{res.stderr[-2000:]}")
                row = json.loads(res.stdout.strip().splitlines()[-1])
                row["hlo_before"] = _dumped_instructions(dump) if hlo else None
            rows.append(row)
            if hlo:
                print(f"forward {pol:40s}: {row['hlo_before']:6d} HLO instructions before optimisation (all modules)",
                      flush=True)
            else:
                print(f"forward {pol:40s}: backend compile {row['backend_compile_s']:6.2f} s, CPU {row['cpu_s']:6.2f} s, "
                      f"wall {row['wall_s']:6.2f} s", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="ops,forward")
    ap.add_argument("--modes", default=MODES, help="comma-separated modes (sr(r,seed=s) kept whole)")
    ap.add_argument("--policy", default="compute=bf16,order=kahan")
    ap.add_argument("--sr-policy", default="compute=bf16,order=pairwise",
                    help="the policy of the stochastic modes (which sum in the sequential or pairwise order), "
                         "also run under rne")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--opt-level", default="0")
    ap.add_argument("--hlo", action="store_true",
                    help="forward: count the HLO instructions (an XLA dump) instead of timing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return _forward_child(args.child)
    import re

    modes = re.findall(r"[^,(]+(?:\([^)]*\))?", args.modes)
    parts = args.parts.split(",")
    if "ops" in parts:
        hlo_ops(modes)
    if "forward" in parts:
        forward_compiles(modes, args.policy, args.sr_policy, args.repeat, args.opt_level, args.hlo)


if __name__ == "__main__":
    main()
