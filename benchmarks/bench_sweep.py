"""Sweep costs, as ratios measured in one run.

    python benchmarks/bench_sweep.py [--n 4096] [--loop-lengths 16] [--mem-n 65536] [--ref-n 16]
                                     [--policies P1,P2] [--recipes P1,P2] [--mem B1:S1,B2:S2] [--skip PARTS]

1. Prefix trick: one forward over a length-N stream (all n <= N) against a loop
   that runs each prefix separately (timed on --loop-lengths evenly spaced
   lengths and extrapolated to all N, compile excluded), native float32.
2. Emulated forwards against native float32 at N (compile excluded), one per
   policy of --policies: bf16 pairwise (every product and add rounded), bf16 with
   exact dot products, and bf16 with fp32 accumulation in blocks of 32 (the last
   two run as certified float64 matrix products, see backends/emulated/certificates.py).
3. Peak resident memory of a forward at --mem-n, d = 64, L = 2, one subprocess per
   entry of --mem (``backend:spec``; getrusage's ru_maxrss): native f32 and emulated
   bf16 with exact dot products by default. Add ``emulated:bf16`` for the pairwise
   order: at N = 65,536 it runs ~40 min on 2 cores (every add rounded, one query
   row at a time over 65k keys, out of cache).
4. Recipes: an emulated forward under each of --recipes (a policy with an attention kernel
   or an accumulator order) against the same policy with the naive kernel and the pairwise
   order, at N (compile excluded): the cost of evaluating attention as a kernel does
   (target <= 1.5x) or of an accumulator model (target <= 2x).
5. Reference tokens/s at 53 and 256 bits against plain mpmath matrices doing the
   same forward (mpmath.matrix products and elementwise softmax): the arb-ball
   reference (interval backend on python-flint, rigorous enclosures, C matrix
   products) and the op-by-op mpmath reference (which reproduces a policy bit for bit).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np


def _timed(fn, repeat=3, first=False, clock=time.perf_counter):
    """Best seconds of ``repeat`` calls of ``fn`` after a first one (its compile); with
    ``first``, also the seconds of that first call: ``(first_s, best_s)``. ``clock``:
    ``time.process_time`` counts the CPU seconds of every thread of this process, which other
    work on a shared machine disturbs less than the wall clock."""
    t0 = clock()
    fn()
    first_s = clock() - t0
    best = float("inf")
    for _ in range(repeat):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return (first_s, best) if first else best


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def _block(y):
    import jax

    return jax.block_until_ready(y)


def prefix_vs_loop(n, k):
    from collapse_sim.backends import make_backend
    from collapse_sim.model import ModelConfig, forward, init_params

    P = init_params(ModelConfig(d=64, n_layers=1, vocab=16, pe="sinusoidal", seed=0))
    toks = np.random.default_rng(0).integers(0, 16, n)
    be = make_backend("native", "fp32")
    t_one = _timed(lambda: _block(forward(P, toks, be)))
    lengths = np.unique(np.linspace(1, n, k).astype(int))
    per = []
    for m in lengths:
        per.append(_timed(lambda m=m: _block(forward(P, toks[:m], be)), repeat=1))
    # cost of the loop over every length: integrate the measured per-length cost
    t_loop = float(np.trapezoid(per, lengths)) if len(lengths) > 1 else per[0] * n
    return t_one, t_loop


def emulated_vs_native(n, policies):
    """Seconds of one forward: native f32 (timed again after each policy, the ratio uses
    the mean of the two readings around it) and each emulated policy (compile excluded), wall
    and CPU (``time.process_time``), and each emulated policy's compile seconds (its first call
    less a timed one, CPU): ``(policy, native_s, emulated_s, native_cpu_s, emulated_cpu_s,
    compile_cpu_s)``."""
    from collapse_sim.backends import make_backend
    from collapse_sim.model import ModelConfig, forward, init_params

    P = init_params(ModelConfig(d=64, n_layers=1, vocab=16, pe="sinusoidal", seed=0))
    toks = np.random.default_rng(0).integers(0, 16, n)
    nat = make_backend("native", "fp32")
    native = lambda: _block(forward(P, toks, nat))  # noqa: E731
    t_nat, c_nat = [_timed(native)], [_timed(native, clock=time.process_time)]
    out = []
    for pol in policies:
        emu = make_backend("emulated", pol)
        first, c_emu = _timed(lambda: _block(forward(P, toks, emu)), repeat=1, first=True, clock=time.process_time)
        t_emu = _timed(lambda: _block(forward(P, toks, emu)), repeat=1)
        t_nat.append(_timed(native))
        c_nat.append(_timed(native, clock=time.process_time))
        out.append((pol, (t_nat[-2] + t_nat[-1]) / 2, t_emu, (c_nat[-2] + c_nat[-1]) / 2, c_emu, first - c_emu))
    return out


def _ratio_target(policy: str) -> int:
    """The emulated/native target: <= 4x for the orders that round a block's exact sum once (certified float64
    products), <= 20x for the op-by-op orders, where every product and add is rounded."""
    from collapse_sim.policy import Policy

    return 4 if Policy.parse(policy).order.kind in ("exact", "blocked") else 20


def _baseline(policy: str) -> str:
    """``policy`` with the naive kernel and the pairwise order: what a recipe is timed against."""
    import dataclasses

    from collapse_sim.policy import Kernel, Order, Policy

    return str(dataclasses.replace(Policy.parse(policy), kernel=Kernel.parse("naive"), order=Order.parse("pairwise")))


def recipes_vs_baseline(n, recipes):
    """Seconds of one emulated forward under each recipe policy and under its :func:`_baseline`
    (compile excluded), each baseline timed next to its recipe, and the compile seconds of
    each (its first call less a timed one), wall and CPU: ``(policy, base_s, recipe_s,
    base_compile_s, recipe_compile_s, base_cpu_s, recipe_cpu_s)``."""
    from collapse_sim.backends import make_backend
    from collapse_sim.model import ModelConfig, forward, init_params

    P = init_params(ModelConfig(d=64, n_layers=1, vocab=16, pe="sinusoidal", seed=0))
    toks = np.random.default_rng(0).integers(0, 16, n)
    out = []
    for pol in recipes:
        base, rec = make_backend("emulated", _baseline(pol)), make_backend("emulated", pol)
        f_base, t_base = _timed(lambda: _block(forward(P, toks, base)), repeat=1, first=True)
        f_rec, t_rec = _timed(lambda: _block(forward(P, toks, rec)), repeat=1, first=True)
        cpu_base = _timed(lambda: _block(forward(P, toks, base)), repeat=1, clock=time.process_time)
        cpu_rec = _timed(lambda: _block(forward(P, toks, rec)), repeat=1, clock=time.process_time)
        out.append((pol, t_base, t_rec, f_base - t_base, f_rec - t_rec, cpu_base, cpu_rec))
    return out


def peak_memory(n, backend="emulated", spec="bf16"):
    code = f"""
import collapse_sim as cs, numpy as np, resource, jax
cs.enable_x64()
from collapse_sim.backends import make_backend
from collapse_sim.model import ModelConfig, forward, init_params
P = init_params(ModelConfig(d=64, n_layers=2, vocab=16, pe="sinusoidal", seed=0, max_len={n + 8}))
y = forward(P, np.random.default_rng(0).integers(0, 16, {n}), make_backend({backend!r}, {spec!r}))
jax.block_until_ready(y)
assert np.isfinite(np.asarray(y)).all(), "non-finite output"
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if r.returncode:
        return None, time.perf_counter() - t0, r.stderr[-500:]
    return int(r.stdout.split()[-1]) * 1024, time.perf_counter() - t0, ""


def reference_speed(n, prec):
    """Seconds for one forward: the mpmath reference (op-by-op rounding), the arb ball
    reference (python-flint), and plain mpmath matrices doing the same computation."""
    import mpmath

    from collapse_sim.backends import make_backend
    from collapse_sim.model import ModelConfig, forward, init_params

    P = init_params(ModelConfig(d=16, n_layers=1, vocab=16, pe="none", norm="none", seed=0))
    toks = np.random.default_rng(0).integers(0, 16, n)
    be = make_backend("reference", str(prec))
    t_ref = _timed(lambda: forward(P, toks, be), repeat=3)
    arb = make_backend("interval", f"arb{prec}")
    t_arb = _timed(lambda: forward(P, toks, arb), repeat=20)  # ~1 ms: best of many

    def plain():
        ctx = mpmath.MPContext()
        ctx.prec = prec
        X = ctx.matrix([[ctx.mpf(float(v)) for v in P["embed"][t]] for t in toks])
        Wq, Wk, Wv = (ctx.matrix(P[f"l0.{w}"].tolist()) for w in ("wq", "wk", "wv"))
        Q, K, V = X * Wq, X * Wk, X * Wv
        S = Q * K.T
        out = ctx.matrix(n, X.cols)
        for i in range(n):
            e = [ctx.exp(S[i, j] / ctx.sqrt(X.cols)) for j in range(i + 1)]
            den = ctx.fsum(e)
            for c in range(X.cols):
                out[i, c] = ctx.fsum(e[j] / den * V[j, c] for j in range(i + 1)) + X[i, c]
        return out

    t_plain = _timed(plain, repeat=3)
    return t_ref, t_arb, t_plain


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--loop-lengths", type=int, default=16)
    ap.add_argument("--mem-n", type=int, default=65536)
    ap.add_argument("--ref-n", type=int, default=16)
    ap.add_argument("--mem", default="native:fp32,emulated:compute=bf16;order=exact",
                    help="backend:spec of each memory run (commas between runs, ';' inside one)")
    ap.add_argument("--policies", default="bf16,compute=bf16;order=exact,storage=bf16;compute=bf16;accumulate=fp32;order=blocked(32)",
                    help="emulated policies timed against native f32 (commas between policies, ';' inside one)")
    ap.add_argument("--recipes", default="storage=bf16;compute=fp32;accumulate=fp32;softmax=fp32;kernel=online(64),"
                    "storage=bf16;compute=fp32;accumulate=fp32;softmax=fp32;kernel=flash2(64),"
                    "storage=bf16;compute=fp32;accumulate=fp32;softmax=fp32;kernel=flash3fp8(64),"
                    "storage=bf16;compute=bf16;accumulate=fp32;order=tcfma(4;24;rz),"
                    "storage=e4m3fn;compute=fp32;accumulate=fp32;order=promote(14;128)",
                    help="emulated policies with a kernel or accumulator order, each timed against the same policy "
                         "with the naive kernel and the pairwise order (commas between policies, ';' inside one)")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: prefix,emulated,recipes,memory,reference")
    args = ap.parse_args(argv)
    import collapse_sim as cs

    cs.enable_x64()
    skip = set(args.skip.split(","))
    res = {}
    if "prefix" not in skip:
        one, loop = prefix_vs_loop(args.n, args.loop_lengths)
        res["prefix"] = {"one_pass_s": one, "per_length_loop_s": loop, "ratio": loop / one}
        print(f"prefix trick, N={args.n}: one pass {one:.3f}s, loop over every length ~{loop:.1f}s: ratio {loop / one:.0f}x (target >= 100x: {_met(loop / one >= 100)})")
    if "emulated" not in skip:
        res["emulated"] = []
        policies = [p.replace(";", ",") for p in args.policies.split(",")]
        for pol, nat, emu, u_nat, u_emu, comp in emulated_vs_native(args.n, policies):
            res["emulated"].append({"policy": pol, "native_f32_s": nat, "emulated_s": emu, "ratio": emu / nat,
                                    "native_f32_cpu_s": u_nat, "emulated_cpu_s": u_emu, "cpu_ratio": u_emu / u_nat,
                                    "compile_cpu_s": comp})
            target = _ratio_target(pol)
            print(f"forward N={args.n}: native f32 {nat:.3f}s, emulated {pol} {emu:.2f}s: ratio {emu / nat:.1f}x "
                  f"(target <= {target}x: {_met(emu / nat <= target)}); CPU {u_emu:.2f}s against {u_nat:.3f}s: "
                  f"{u_emu / u_nat:.1f}x; compile {comp:.1f} CPU s")
    if "recipes" not in skip:
        res["recipes"] = []
        recipes = [p.replace(";", ",") for p in args.recipes.split(",")]
        for pol, base, rec, c_base, c_rec, u_base, u_rec in recipes_vs_baseline(args.n, recipes):
            target = 2.0 if "order=" in pol else 1.5  # an accumulator model (issue target 2x) or a kernel recipe (1.5x)
            res["recipes"].append({"policy": pol, "baseline": _baseline(pol), "baseline_s": base, "recipe_s": rec,
                                   "ratio": rec / base, "baseline_compile_s": c_base, "recipe_compile_s": c_rec,
                                   "baseline_cpu_s": u_base, "recipe_cpu_s": u_rec, "cpu_ratio": u_rec / u_base})
            print(f"recipe N={args.n}: {pol} {rec:.2f}s against {_baseline(pol)} {base:.2f}s: ratio {rec / base:.2f}x "
                  f"(target <= {target:g}x: {_met(rec / base <= target)}); CPU {u_rec:.1f}s against {u_base:.1f}s: "
                  f"{u_rec / u_base:.2f}x; compile {c_rec:.1f}s against {c_base:.1f}s")
    if "memory" not in skip:
        res["memory"] = []
        for entry in args.mem.split(","):
            backend, _, spec = entry.replace(";", ",").partition(":")
            peak, secs, err = peak_memory(args.mem_n, backend, spec)
            res["memory"].append({"n": args.mem_n, "backend": backend, "spec": spec, "peak_bytes": peak,
                                  "seconds": secs, "error": err})
            if peak is None:
                print(f"memory N={args.mem_n}, {backend} {spec}: failed after {secs:.0f}s: {err}")
            else:
                print(f"memory N={args.mem_n}, d=64, L=2, {backend} {spec}: peak RSS {peak / 2**30:.2f} GiB "
                      f"({peak / 1e9:.2f} GB) in {secs:.0f}s (target < 2 GB: {_met(peak < 2e9)})")
    if "reference" not in skip:
        for prec in (53, 256):
            t_ref, t_arb, t_plain = reference_speed(args.ref_n, prec)
            res[f"reference_{prec}"] = {"mpmath_reference_s": t_ref, "arb_reference_s": t_arb, "plain_mpmath_s": t_plain,
                                        "arb_speedup": t_plain / t_arb, "mpmath_reference_speedup": t_plain / t_ref}
            print(f"reference prec={prec}, N={args.ref_n}, d=16: arb balls {args.ref_n / t_arb:.0f} tokens/s, "
                  f"op-by-op mpmath {args.ref_n / t_ref:.1f} tokens/s, plain mpmath matrices {args.ref_n / t_plain:.1f} "
                  f"tokens/s: arb speedup {t_plain / t_arb:.1f}x (target >= 20x: {_met(t_plain / t_arb >= 20)}), op-by-op {t_plain / t_ref:.2f}x")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
