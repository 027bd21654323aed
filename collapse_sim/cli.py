"""The front door: ``collapse-sim COMMAND``.

Every command reports bad input in one sentence on stderr and exits with
status 2, without a traceback; nothing is written in that case. Where a command
writes (``--out``), the location is checked before any work
(``collapse_sim.results.check_output_dir``).

(One module of ~540 lines on purpose: every command's flags, their checks and the few lines
that call its experiment, read side by side so that the commands speak alike.)
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import CollapseSimError, UsageError  # noqa: F401  (UsageError: imported from here too)

EXIT_USAGE = 2


def _check_out(args, *writes: str, resume_marker: "str | None" = None):
    """The command's ``--out`` folder, refused at once if it cannot take the results (nothing is created)."""
    from .results import check_output_dir

    return check_output_dir(args.out, writes=writes, resume_marker=resume_marker)


def _parse_value(text: str) -> float:
    """A float64 from a decimal (``1.5e-3``, ``inf``) or a hex float (``0x1.8p-3``)."""
    t = text.strip()
    try:
        return float(t)
    except ValueError:
        pass
    try:
        if not t.lstrip("+-").lower().startswith("0x"):  # float.fromhex also reads "abc" as 2748
            raise ValueError
        return float.fromhex(t)
    except OverflowError:
        raise UsageError(f"{text!r} lies beyond the float64 range (about 1.8e308); give a smaller value") from None
    except ValueError:
        raise UsageError(f"{text!r} is not a number; give a decimal such as 1.5e-3 or a hex float such as 0x1.8p-3") from None


def _fmt_num(x: float) -> str:
    return f"{x:.6g}" if x == x else "nan"


def cmd_formats(args) -> int:
    from .formats import parse, table_rows

    rows = table_rows([parse(f) for f in args.format] if args.format else None)
    cols = ["name", "p", "emin", "emax", "subnormals", "overflow", "u", "eps", "max", "min_normal", "min_subnormal"]
    if args.json:
        import json

        print(json.dumps(rows, indent=1))
        return 0
    cells = [[str(r[c]) if not isinstance(r[c], float) else _fmt_num(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)) + "  description")
    for r, row in zip(rows, cells):
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + str(r["description"]))
    return 0


def cmd_round(args) -> int:
    from . import enable_x64
    from .formats import parse
    from .rounding import Mode, Stochastic, parse_mode, round_to

    enable_x64()
    import jax
    import jax.numpy as jnp
    import numpy as np

    fmt = parse(args.format)
    mode = parse_mode(args.mode)
    stochastic = mode is Mode.SR or isinstance(mode, Stochastic)
    if args.seed is not None and not stochastic:
        raise UsageError(f"--seed seeds stochastic rounding's draws; mode {args.mode} draws none")
    if args.seed is not None and "seed=" in args.mode.replace(" ", ""):
        raise UsageError("the mode names its seed already (sr(r,seed=s)); drop --seed")
    seed = args.seed if args.seed is not None else getattr(mode, "seed", 0)
    key = jax.random.key(seed) if stochastic else None
    values = [_parse_value(text) for text in args.values]  # every value checked before any is printed
    # one array: stochastic rounding draws for each value on its own
    rounded = np.asarray(round_to(jnp.asarray(values, jnp.float64), fmt, mode, key=key), np.float64)
    for text, r in zip(args.values, rounded):
        print(f"{text} -> {float(r)!r}")
    return 0


def cmd_collapse(args) -> int:
    from . import enable_x64
    from .compilation import cache_in_use
    from .experiments.collapse import check_collapse, collapse_summary, run_collapse
    from .model import ModelConfig, Params, init_params

    out = _check_out(args, "collapse.csv", "collapse.json", "collapse.png")
    enable_x64()
    if args.policy is not None and (args.format is not None or args.order != "pairwise" or args.kernel != "naive"):
        raise UsageError("--policy names the formats, order and kernel itself; drop --format, --order and --kernel")
    fmts = check_collapse(args.max_len, args.mem_limit, "bf16,fp16,fp32" if args.format is None else args.format,
                          args.backend, args.policy)
    if args.weights:
        params = Params.load(args.weights)
    else:
        norm = args.norm or ("none" if args.model == "gaussian" else "layernorm")
        params = init_params(ModelConfig(d=args.d, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
                                         vocab=args.vocab, pe=args.pe, norm=norm, window=args.window, ape=args.ape,
                                         seed=args.seed, max_len=max(16384, 2 * args.max_len + 8),
                                         kind=args.model, qkv_var=args.qkv_var, sin_at=args.sin_at,
                                         alibi_slope=args.alibi_slope, alibi_at=args.alibi_at,
                                         rope_fraction=args.rope_fraction, ssmax=args.ssmax, sink=args.sink,
                                         adaptive_temperature=args.adaptive_temperature))
    run = run_collapse(params, args.family, args.max_len, fmts, out, backend=args.backend, order=args.order,
                       shard=args.shard, sep=args.sep, seed=args.seed, mem_limit_gib=args.mem_limit,
                       time_limit_s=args.time_limit, weights=args.weights, kernel=args.kernel, policy=args.policy)
    print(collapse_summary(run.results))
    for r in run.results:
        if r.nonfinite.any():
            print(f"  warning: {r.backend} overflowed to inf/NaN at {int(r.nonfinite.sum())} lengths (marked in the table)")
    print(f"{run.compiled.describe()}; compilation cache: {cache_in_use() or 'off'}")
    print(f"wrote {', '.join(str(f) for f in run.files)}")
    return 0


def cmd_theorem(args) -> int:
    from . import enable_x64
    from .theory import STATEMENTS

    enable_x64()
    if args.list or args.name is None:
        for s in STATEMENTS.values():
            print(f"{s.name:7s} {s.title}")
        print("b10     Cor. 6.2/B.10: identical low-precision outputs for counts that differ exactly")
        return 0
    if args.instances < 1:
        raise UsageError(f"--instances must be >= 1, got {args.instances}")
    if args.max_n < 1:
        raise UsageError(f"--max-n must be >= 1, got {args.max_n}")
    if args.name == "b10":
        return _theorem_b10(args)
    if args.name not in STATEMENTS:
        import difflib

        near = difflib.get_close_matches(args.name.lower().replace(".", ""), [*STATEMENTS, "b10"], n=1)
        raise UsageError(f"unknown statement {args.name!r}" + (f" (did you mean {near[0]}?)" if near else "")
                         + "; run 'collapse-sim theorem --list'")
    from .experiments.theorems import draw_cases

    stmt = STATEMENTS[args.name]
    print(f"{stmt.name}: {stmt.title}")
    print(f"{'case':26s} {'quantity':48s} {'observed':>12s} {'bound':>12s} {'obs/bound':>10s}  holds")
    failed = 0
    worst = {True: 0.0, False: 0.0}  # the largest observed/bound, inside and outside the hypothesis
    count = {True: 0, False: 0}
    outside: dict[str, int] = {}  # why an instance is outside the statement's hypothesis: how many checks
    from .progress import stage

    with stage("[theorem]", f"{stmt.name} on {args.instances} random instances, n <= {args.max_n}"):
        for case in draw_cases(args.seed, args.instances, args.max_n):
            for c in stmt.check(case):
                t, inside = c.tightness, c.hypothesis is None
                worst[inside] = max(worst[inside], t) if t == t else worst[inside]
                count[inside] += 1
                if not inside:
                    outside[c.hypothesis] = outside.get(c.hypothesis, 0) + 1
                failed += not c.holds
                print(f"seed={case.seed % 10**6:<6d} n={case.length:<3d} {str(case.edge or ''):9s} {c.quantity[:48]:48s} "
                      f"{_fmt_num(c.observed):>12s} {_fmt_num(c.bound):>12s} {_fmt_num(t):>10s}  {c.verdict}", flush=True)
    for why, k in outside.items():
        print(f"hypothesis not met ({k} check{'s' * (k != 1)}): {why}; the bound must still hold there, but need not be tight")
    print(f"{args.instances} instances: {count[True]} checks within the statement's hypothesis (largest observed/bound "
          f"{worst[True]:.4g}), {count[False]} outside it (largest {worst[False]:.4g}); "
          + ("every check holds" if not failed else f"{failed} checks FAIL: counterexamples above"))
    return 1 if failed else 0


def _theorem_b10(args) -> int:
    from .backends.emulated import carrier_for
    from .formats import format_token, parse
    from .model import ModelConfig, init_params
    from .theory.counting import b10_confusions

    n_max = args.max_n
    if n_max > 512:
        raise UsageError("b10 runs the reference and interval backends (O(n^2 d) Python arithmetic): use --max-n <= 512")
    fmt = parse(args.format)
    carrier_for(fmt)  # a format the emulated backend cannot carry is refused here, before any work
    params = init_params(ModelConfig(d=8, n_layers=1, vocab=6, pe="alibi", seed=args.seed))
    from .progress import stage

    with stage("[theorem]", f"b10: count_bernoulli, ALiBi, d=8, one layer, n = 1..{n_max}, "
                            f"emulated {args.format} vs exact (intervals)"):
        hits, same_exact = b10_confusions(params, "count_bernoulli", n_max, f"compute={format_token(fmt)},order=pairwise",
                                          seed=args.seed)
    print(f"lengths where the pair is bitwise identical in {args.format} but certified distinct exactly: "
          f"{', '.join(map(str, hits)) if hits.size else 'none up to n=' + str(n_max)}")
    if same_exact.size:
        print(f"lengths where even the exact outputs could not be separated at 128 bits: {', '.join(map(str, same_exact))}")
    if hits.size:
        print("at each such n one of the two counts is answered wrongly by any readout")
    return 0


def _small_model_args(p, *, pe: str, d_ff: int, out: str) -> None:
    """The flags of the commands that build a small random decoder (:func:`_model_from_args`)."""
    from .positional import KINDS

    p.add_argument("--pe", default=pe, choices=KINDS)
    p.add_argument("--norm", default="layernorm", choices=["layernorm", "rmsnorm", "none"])
    p.add_argument("--d", type=int, default=16)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--d-ff", type=int, default=d_ff)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model's random weights and of the family's draws (a stochastic rounding policy "
                        "names its own: mode=sr(r,seed=s))")
    p.add_argument("--weights", default=None, help="PATH of PATH.json + PATH.npz to use instead of a random init")
    p.add_argument("--out", default=out)


def _model_from_args(args, max_len: int):
    from .model import ModelConfig, Params, init_params

    if getattr(args, "weights", None):
        return Params.load(args.weights)
    return init_params(ModelConfig(d=args.d, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff, vocab=args.vocab,
                                   pe=args.pe, norm=args.norm, seed=args.seed, max_len=max(16384, max_len + 8)))


def cmd_oversquash(args) -> int:
    from . import enable_x64
    from .experiments.oversquash import check_oversquash, run_oversquash

    out = _check_out(args, "oversquash.csv", "oversquash.json", "oversquash.png")
    enable_x64()
    fmts = check_oversquash(args.n, args.format)
    run = run_oversquash(_model_from_args(args, args.n), args.n, fmts, out, seed=args.seed)
    print(run.summary())
    print(f"wrote {', '.join(str(f) for f in run.files)}")
    return 0


def cmd_explain_native(args) -> int:
    import dataclasses
    import json

    import numpy as np

    from . import enable_x64
    from .formats import parse_list
    from .results import provenance

    out = _check_out(args, "explain.json")
    enable_x64()
    if not 1 <= args.n <= 4096:
        raise UsageError(f"--n must lie in 1..4096 (every intermediate of the forward is kept), got {args.n}")
    fmts = list(dict.fromkeys(f.name for f in parse_list(args.format)))  # each once
    for f in fmts:
        if f not in ("bf16", "fp16"):
            raise UsageError(f"explain-native explains bf16 and fp16 (the narrow native dtypes XLA computes in float32), got {f}")
    params = _model_from_args(args, args.n)
    if params.config.sink:
        raise UsageError("explain-native compares the model's taps row by row and takes models without a sink token; "
                         "use weights saved with sink=False")
    toks = np.random.default_rng(args.seed).integers(0, params.config.vocab, args.n)
    from .experiments.explain import explain
    from .progress import stage

    results = []
    for f in fmts:
        with stage("[explain-native]", f"native {f} against emulated {f}, n={args.n}, d={params.config.d}, "
                                       f"L={params.config.n_layers}"):
            ex = explain(params, toks, f)
        print("\n".join(ex.lines()))
        results.append({"format": f, "agree": ex.agree, "applied": ex.applied, "environment": ex.environment,
                        "steps": [{"first_difference": s.tap, "entries": s.differing, "causes": s.causes,
                                   "then": s.moved_to} for s in ex.steps]})
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain.json").write_text(json.dumps({"provenance": provenance(), "n": args.n,
                                                  "config": dataclasses.asdict(params.config), "results": results},
                                                 indent=1, default=str))
    print(f"wrote {out / 'explain.json'}")
    return 0


def cmd_scaling(args) -> int:
    from . import enable_x64
    from .families import NAMES

    out = _check_out(args, "scaling.csv", "scaling.json", "scaling.png")
    enable_x64()
    try:
        lo, hi = (int(v) for v in args.p.split(".."))
    except ValueError:
        raise UsageError(f"--p must look like 4..16, got {args.p!r}") from None
    if not 2 <= lo < hi <= 25:
        raise UsageError(f"--p must satisfy 2 <= lo < hi <= 25 (the f64 carrier's limit), got {args.p}")
    if args.family not in NAMES:
        raise UsageError(f"unknown family {args.family!r}")
    if args.max_len < 4:
        raise UsageError(f"--max-len must be >= 4, got {args.max_len}")
    from .experiments.scaling import run_scaling
    from .theory.scaling import slope_tolerance

    ps = list(range(lo, hi + 1))
    r = run_scaling(args.family, ps, args.max_len, out, seed=args.seed)
    print(f"{'p':>3s} {'measured n*':>12s} {'predicted n*':>13s}")
    for row in r.rows():
        print(f"{row['p']:>3d} {str(row['measured_first_collapse']):>12s} {str(row['predicted_first_collapse']):>13s}")
    if r.slope is None:
        print(f"fewer than two formats collapsed within n ≤ {args.max_len}: no fit; raise --max-len")
    else:
        tol = slope_tolerance(ps, 1.5)
        print(f"exact distance decays like n^-{r.rate:.3f}, so log2 n* should grow by 1/r = {r.predicted_slope:.3f} "
              f"per bit of precision; the fitted slope is {r.slope:.3f}. If every measured log2 n* lies within 1.5 "
              f"(a factor 2.8 in n) of the law's line, a fit over p = {ps[0]}..{ps[-1]} is within ±{tol:.3f} of its "
              f"slope" + ("; a wider --p range narrows that" if tol > 0.5 * r.predicted_slope else ""))
    print(f"wrote {out / 'scaling.csv'}, {out / 'scaling.json'}, {out / 'scaling.png'}")
    return 0


def cmd_sweep(args) -> int:
    _check_out(args, "spec.json", resume_marker="spec.json")
    if args.executor == "dask" and not args.scheduler:
        raise UsageError("--executor dask needs --scheduler ADDRESS (e.g. tcp://host:8786)")
    from .experiments.sweep import SweepSpec, run_sweep, sweep_summary

    if not args.time_limit > 0:
        raise UsageError(f"--time-limit must be a positive number of seconds, got {args.time_limit}")
    spec = SweepSpec.from_json(args.spec, mem_limit_gib=args.mem_limit)
    from .progress import stage

    with stage("[sweep]", f"{args.spec} into {args.out} ({args.executor})"):
        r = run_sweep(spec, args.out, executor=args.executor, scheduler=args.scheduler, extend=args.extend,
                      time_limit=args.time_limit)
    from .results import load_table

    df = load_table(args.out)
    print(f"[sweep] ran {r['run']} cells, skipped {r['skipped']} already done; table: {len(df)} rows in {args.out}/cells/*.parquet")
    print(sweep_summary(df))
    return 0


def cmd_reproduce(args) -> int:
    from .report import parse_only, reproduce

    only = parse_only(args.only) if args.only is not None else None
    _check_out(args, "report.md")
    return reproduce(out=args.out, quick=args.quick, only=only, fresh=args.fresh)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a UsageError: one sentence on stderr and exit status 2 (from main)."""

    def error(self, message):  # noqa: D401
        sub = self.prog.removeprefix("collapse-sim").strip()
        raise UsageError(f"{message}; see 'collapse-sim {sub + ' ' if sub else ''}--help'")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="collapse-sim", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"collapse-sim {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="persistent XLA compilation cache (default: $COLLAPSE_SIM_COMPILE_CACHE, else "
                             "~/.cache/collapse_sim/xla); 'off' turns it off")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)  # every command that compiles takes --compile-cache

    p = sub.add_parser("formats", help="table of floating-point formats and their properties")
    p.add_argument("format", nargs="*", help="formats to describe (names or p=..,emax=..); default: all built-ins")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_formats)

    p = command("round", help="round decimal values to a format (exactly, from their float64 value)")
    p.add_argument("values", nargs="+")
    p.add_argument("--format", "-f", required=True)
    p.add_argument("--mode", "-m", default="rne", help="rne, rna, rnz, rz, ru, rd, ro, sr or sr(r) (r random bits; --seed seeds the draws)")
    p.add_argument("--seed", type=int, default=None,
                   help="PRNG seed for stochastic rounding (default 0, or the mode's own: sr(r,seed=s)); each value draws its own bits")
    p.set_defaults(func=cmd_round)

    from .families import NAMES
    from .positional import KINDS

    p = command("collapse", help="distance between paired inputs for every n, per format; first collapse length")
    p.add_argument("--family", required=True, choices=NAMES,
                   help="the paired inputs (docs/getting-started.md): e.g. repeat_last is v vs v* (v with its last "
                        "token repeated), ones is 1^n vs 1^(n+1)")
    p.add_argument("--format", default=None, help="comma-separated formats (default bf16,fp16,fp32); custom ones in parentheses: '(p=5,emax=15)'")
    p.add_argument("--policy", default=None,
                   help="one precision policy (docs/policies.md) instead of --format, --order and --kernel, for the "
                        "emulated or reference backend, e.g. 'storage=bf16,compute=fp32,accumulate=fp32,"
                        "operands=mx(e4m3fn,32)'")
    p.add_argument("--backend", default="emulated", choices=["emulated", "native", "reference"],
                   help="emulated (default: every op rounded as the format says), native (the JAX dtype: what XLA "
                        "does), or reference (mpmath at the format's precision; slow, short lengths)")
    p.add_argument("--order", default="pairwise", help="reduction order for emulated/reference (default pairwise)")
    p.add_argument("--kernel", default="naive",
                   help="attention kernel for emulated/reference: naive (default), online(b), key blocks of b "
                        "with a running max and sum (docs/semantics.md §8.8), flash2(b), FlashAttention-2's "
                        "recipe of it (§8.8.1), or flash3fp8(b), FlashAttention-3's FP8 recipe (§8.8.2)")
    p.add_argument("--shard", action="store_true",
                   help="split the emulated attention's queries over all JAX devices (same bits as unsharded)")
    p.add_argument("--max-len", type=int, required=True, help="measure every n = 1..MAX_LEN")
    p.add_argument("--pe", default="sinusoidal", choices=KINDS, help="positional encoding (default sinusoidal)")
    p.add_argument("--ape", default="residual", choices=["residual", "scores"],
                   help="absolute PE into the residual stream (default) or only into queries/keys")
    p.add_argument("--norm", default=None, choices=["layernorm", "rmsnorm", "none"],
                   help="default layernorm for the decoder, none (the output is the attention output) for gaussian")
    p.add_argument("--model", default="decoder", choices=["decoder", "gaussian"],
                   help="decoder (default), or gaussian: the Fig. 8/10 captions' q, k, v drawn per position, one layer")
    p.add_argument("--qkv-var", type=float, default=None, help="gaussian: variance of every q, k, v entry (default 1/d)")
    p.add_argument("--sin-at", default="keys", choices=["keys", "qk", "values"],
                   help="gaussian with --pe sinusoidal: add the table to the keys (default), queries and keys, or values")
    p.add_argument("--alibi-slope", type=float, default=None,
                   help="ALiBi slope m for every head (default Press et al.'s 2^(-8h/H); 2^-8 for one head)")
    p.add_argument("--alibi-at", default="after", choices=["after", "before"],
                   help="ALiBi bias added after the 1/sqrt(d_h) scale (default), or before it (effective slope m/sqrt(d_h))")
    p.add_argument("--rope-fraction", type=float, default=1.0,
                   help="p-RoPE: the share of RoPE's frequency pairs that rotate, the highest first (default 1: RoPE)")
    p.add_argument("--ssmax", type=float, default=None,
                   help="Scalable-Softmax: multiply each query by s·ln(keys it sees) (default off)")
    p.add_argument("--sink", action="store_true", help="start every sequence with a sink token")
    p.add_argument("--adaptive-temperature", action="store_true",
                   help="adaptive temperature: each attention row's scores times β(entropy of its softmax), then the "
                        "softmax again (Veličković et al.; docs/semantics.md §8.7; naive kernel only)")
    p.add_argument("--d", type=int, default=64, help="model width (default 64)")
    p.add_argument("--layers", type=int, default=1, help="decoder layers (default 1)")
    p.add_argument("--heads", type=int, default=1, help="attention heads; must divide --d (default 1)")
    p.add_argument("--d-ff", type=int, default=0, help="MLP width (default 0: no MLP)")
    p.add_argument("--vocab", type=int, default=16, help="vocabulary size (default 16)")
    p.add_argument("--window", type=int, default=None, help="sliding-window attention width")
    p.add_argument("--sep", type=int, default=None, help="insert a separator after every k tokens")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random weights and of the families' random tokens (default 0; recorded in "
                        "collapse.json)")
    p.add_argument("--weights", default=None, help="PATH of PATH.json + PATH.npz to use instead of a random init")
    p.add_argument("--mem-limit", type=float, default=8.0,
                   help="refuse runs estimated above this many GiB; formats run two at a time where twice the "
                        "estimate fits")
    p.add_argument("--time-limit", type=float, default=3600.0,
                   help="refuse runs whose arithmetic is estimated to take longer than this many seconds (default 3600); "
                        "compiling is not counted (seconds per program, none when the cache holds it)")
    p.add_argument("--out", default="collapse-out", help="output folder (default collapse-out): collapse.csv, "
                   "collapse.json (every setting), collapse.png")
    p.set_defaults(func=cmd_collapse)

    p = command("theorem", help="check one statement on random instances: observed vs bound")
    p.add_argument("name", nargs="?", help="statement name (see --list), or b10")
    p.add_argument("--list", action="store_true", help="list the statements")
    p.add_argument("--instances", type=int, default=10, help="random instances (models and inputs) to check (default 10)")
    p.add_argument("--max-n", type=int, default=24, help="largest length of a random instance (default 24)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random instances (default 0)")
    p.add_argument("--format", default="e4m3fn", help="format for b10 (default e4m3fn, fp8; bf16 needs n in the thousands at d=8)")
    p.set_defaults(func=cmd_theorem)

    p = command("oversquash", help="sensitivity profile dy_n/dv_i over i per format, with the path-sum bound")
    p.add_argument("--n", type=int, default=32, help="sequence length: the profile over i = 1..n of dy_n/dv_i (default 32)")
    p.add_argument("--format", default="fp64,fp32,bf16,fp16", help="native dtypes to differentiate in")
    _small_model_args(p, pe="none", d_ff=0, out="oversquash-out")
    p.set_defaults(func=cmd_oversquash)

    p = command("explain-native", help="why native bf16/fp16 differs from the format: first differing op and its cause")
    p.add_argument("--format", default="bf16,fp16", help="bf16, fp16 or both (default)")
    p.add_argument("--n", type=int, default=64)
    _small_model_args(p, pe="rope", d_ff=16, out="explain-out")
    p.set_defaults(func=cmd_explain_native)

    p = command("scaling", help="first-collapse length against significand bits p: the scaling law")
    p.add_argument("--family", default="zero_ones", choices=NAMES)
    p.add_argument("--p", default="4..16", help="range of significand bits, e.g. 4..16")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--seed", type=int, default=11, help="seed of the fixed one-layer model")
    p.add_argument("--out", default="scaling-out")
    p.set_defaults(func=cmd_scaling)

    p = command("sweep", help="run a grid of collapse cells from a JSON spec; resumable; in-process or on dask")
    p.add_argument("spec", help="sweep spec JSON (see collapse_sim.experiments.sweep)")
    p.add_argument("--out", default="sweep-out")
    p.add_argument("--executor", default="inprocess", choices=["inprocess", "dask"])
    p.add_argument("--scheduler", default=None, help="dask scheduler address, e.g. tcp://127.0.0.1:8786")
    p.add_argument("--extend", action="store_true",
                   help="let a changed spec extend the grid in --out when it only adds formats, families, pe or seeds")
    p.add_argument("--mem-limit", type=float, default=8.0, help="refuse cells estimated above this many GiB")
    p.add_argument("--time-limit", type=float, default=3600.0,
                   help="refuse sweeps whose cells' arithmetic is estimated to take longer than this many seconds (default "
                        "3600); compiling is not counted")
    p.set_defaults(func=cmd_sweep)

    p = command("reproduce", help="run the checks and experiments and write a report")
    p.add_argument("--out", default="collapse-report", help="output directory (default: collapse-report)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes on 2 cores")
    from .report import NAMES as SECTION_NAMES

    p.add_argument("--only", default=None, metavar="NAMES",
                   help=f"measure only these sections (comma-separated: {', '.join(SECTION_NAMES)}); the others come "
                        "from earlier runs into --out, or are marked 'not run yet'")
    p.add_argument("--fresh", action="store_true",
                   help="measure again what earlier runs stored in --out/.runs (default: reuse it)")
    p.set_defaults(func=cmd_reproduce)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run one command; bad input (any CollapseSimError, argparse's included) prints one line
    on stderr and returns 2."""
    try:
        args = build_parser().parse_args(argv)
        if (getattr(args, "seed", 0) or 0) < 0:  # every command seeds numpy or JAX generators, which take seeds >= 0
            raise UsageError(f"--seed must be >= 0, got {args.seed}")
        stored = False
        if args.command != "formats":  # the one command that compiles nothing
            from .compilation import cache_dir_from, record_at_exit, snapshot, stored_dir, use_cache, use_executables

            cache = use_cache(cache_dir_from(args.compile_cache))
            before, stored = use_executables(stored_dir(cache)), True
            snapshot()  # count compilations from here on (provenance, progress lines)
            record_at_exit(args.command)
        try:
            rc = int(args.func(args) or 0)
        finally:
            if stored:  # in-process callers (tests) get the library's default back, and the programs' memory
                use_executables(before)
                from .backends._stored import forget

                forget()
        sys.stdout.flush()
        return rc
    except CollapseSimError as e:
        print(f"collapse-sim: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader stopped early (collapse-sim theorem --list | head): end quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141  # 128 + SIGPIPE, as a shell reports it


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
