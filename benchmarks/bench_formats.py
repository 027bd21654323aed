"""Formats as data: the shared emulated program against the specialised ones, and the
compile time of every reduction order, measured in one run.

    python benchmarks/bench_formats.py [--n 512,2048,4096] [--layers 1] [--formats fp16,e4m3fn,bf16] [--d 64]
                                       [--compile-n 4096] [--compile-layers 2] [--orders ...] [--specialised]
                                       [--skip PARTS]

1. ``run``: forward run time (compile excluded, best of --repeat) at each N, d = 64,
   pairwise order, for each format: the specialised program (formats static; float32
   carrier for fp16 and fp8, float64 for bf16) against the shared one (formats traced,
   float64 carrier), as the ratio shared / specialised. The emulated backend runs the
   shared program up to SHARED_MAX_N tokens (backends/emulated/backend.py), chosen where
   this ratio passes 1.5.
2. ``compile``: seconds to trace and lower, and to compile, the emulated forward of each
   order at --compile-n, d = 64, --compile-layers layers, for the shared program (the
   specialised bf16 program with --specialised). Compile only: nothing runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

ORDERS = "sequential;pairwise;blocked(3);blocked(32);kahan;exact"


def _model(layers: int, d: int = 64):
    from collapse_sim.model import ModelConfig, init_params

    return init_params(ModelConfig(d=d, n_layers=layers, vocab=16, pe="sinusoidal", seed=0))


def run_times(ns, layers, formats, repeat, d=64):
    import jax

    from collapse_sim.backends.emulated import EmulatedBackend
    from collapse_sim.model import forward

    params = _model(layers, d)
    out = []
    for n in ns:
        toks = np.random.default_rng(0).integers(0, 16, n)
        for f in formats:
            row = {"n": n, "format": f, "layers": layers}
            for kind, shared in (("specialised", False), ("shared", True)):
                be = EmulatedBackend(f"compute={f},order=pairwise", shared=shared)
                jax.block_until_ready(forward(params, toks, be))  # compile
                best = np.inf
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    jax.block_until_ready(forward(params, toks, be))
                    best = min(best, time.perf_counter() - t0)
                row[kind] = best
            row["ratio"] = row["shared"] / row["specialised"]
            print(f"run N={n:5d} L={layers} {f:8s}: specialised {row['specialised']:.3f} s, shared {row['shared']:.3f} s: "
                  f"ratio {row['ratio']:.2f}x (shared kept where <= 1.5x)", flush=True)
            out.append(row)
    return out


def compile_times(n, layers, orders, specialised: bool, fmt: str = "bf16", d=64, probes: bool = False):
    import jax.numpy as jnp

    from collapse_sim.backends import _jit
    from collapse_sim.backends.emulated import EmulatedBackend, backend
    from collapse_sim.model import _forward_scanned, forward_arrays

    params = _model(layers, d)
    arrays = forward_arrays(params, n + probes)  # a probe after the last token sits at position n
    names = tuple(sorted(arrays))
    vals = tuple(jnp.asarray(np.asarray(arrays[k]), jnp.float64) for k in names)
    toks = jnp.zeros(n, jnp.int32)
    out = []
    for order in orders:
        be = EmulatedBackend(f"compute={fmt},order={order}", shared=not specialised)
        prog, data = (be, None) if specialised else (backend._SharedProgram(be.shared), be.shared.data())
        f = _jit._compiled(prog, _forward_scanned, params.config.computation(), names, probes)  # what forward compiles
        t0 = time.perf_counter()
        lowered = f.lower(vals, toks, toks, data)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        row = {"order": order, "n": n, "layers": layers, "program": "specialised" if specialised else "shared",
               "probes": probes,
               "trace_lower": t1 - t0, "compile": t2 - t1, "total": t2 - t0}
        print(f"compile {row['program']} {order:11s} N={n}{' with probes' if probes else ''} L={layers}: trace+lower {row['trace_lower']:.1f} s, "
              f"compile {row['compile']:.1f} s, total {row['total']:.1f} s (target <= 10 s: "
              f"{'met' if row['total'] <= 10 else 'NOT met'})", flush=True)
        out.append(row)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", default="512,2048,4096")
    ap.add_argument("--layers", type=int, default=1)
    ap.add_argument("--formats", default="fp16,e4m3fn,bf16")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--d", type=int, default=64, help="model width (64 for readings; smaller for a smoke run)")
    ap.add_argument("--compile-n", type=int, default=4096)
    ap.add_argument("--compile-layers", type=int, default=2)
    ap.add_argument("--orders", default=ORDERS, help="';'-separated reduction orders")
    ap.add_argument("--specialised", action="store_true", help="time the specialised bf16 program's compiles instead")
    ap.add_argument("--probes", action="store_true", help="compile the forward with a probe after every prefix")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: run, compile")
    args = ap.parse_args(argv)
    import collapse_sim

    collapse_sim.enable_x64()
    skip = set(filter(None, args.skip.split(",")))
    res = {}
    if "run" not in skip:
        res["run"] = run_times([int(x) for x in args.n.split(",")], args.layers, args.formats.split(","), args.repeat,
                               args.d)
    if "compile" not in skip:
        res["compile"] = compile_times(args.compile_n, args.compile_layers, args.orders.split(";"), args.specialised,
                                       d=args.d, probes=args.probes)
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
