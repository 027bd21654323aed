"""Throughput of round_to (jit) on 10^7 float32 values, as ratios against
baselines measured in the same run: a plain float32 copy and ml_dtypes' cast.

    python benchmarks/bench_rounding.py [--n 10000000] [--repeat 7]

Target: round_to(bf16, RNE) within 3x of the plain copy.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from collapse_sim import round_to


def best_of(fn, repeat):
    fn()  # warm-up / compile
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=7)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    x_np = (rng.standard_normal(args.n) * 2.0 ** rng.integers(-20, 20, args.n)).astype(np.float32)
    x = jnp.asarray(x_np)

    copy = jax.jit(lambda v: v * jnp.float32(-1))  # one pass that reads and writes every value
    t_copy = best_of(lambda: copy(x).block_until_ready(), args.repeat)
    t_npcopy = best_of(lambda: x_np.copy(), args.repeat)
    t_ml = best_of(lambda: x_np.astype(ml_dtypes.bfloat16), args.repeat)
    rows = [("plain f32 copy (jit, -x)", t_copy), ("numpy f32 copy", t_npcopy), ("ml_dtypes astype(bfloat16)", t_ml)]
    for fmt, mode in [("bf16", "rne"), ("fp16", "rne"), ("e4m3fn", "rne"), ("bf16", "rz"), ("bf16", "sr")]:
        key = jax.random.key(0)
        f = jax.jit(lambda v, k, fmt=fmt, mode=mode: round_to(v, fmt, mode, key=k))
        rows.append((f"round_to {fmt} {mode}", best_of(lambda: f(x, key).block_until_ready(), args.repeat)))
    print(f"n = {args.n:,} float32 values, best of {args.repeat}; jax {jax.__version__} on {jax.devices()[0].platform}")
    print(f"{'operation':32s} {'ms':>9s} {'Mval/s':>9s} {'/copy':>7s} {'/ml_dtypes':>10s}")
    for name, t in rows:
        print(f"{name:32s} {t * 1e3:9.2f} {args.n / t / 1e6:9.1f} {t / t_copy:7.2f} {t / t_ml:10.2f}")
    ratio = dict(rows)["round_to bf16 rne"] / t_copy
    print(f"\nround_to(bf16, rne) / plain copy = {ratio:.2f} (target <= 3)")


if __name__ == "__main__":
    main()
