"""The front door: ``collapse-sim COMMAND``.

Every command reports bad input in one sentence on stderr and exits with
status 2; nothing is written in that case.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__

EXIT_USAGE = 2


class UsageError(Exception):
    """Bad input from the command line: one sentence, exit status 2."""


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
    from .rounding import Mode, round_to

    enable_x64()
    import jax
    import jax.numpy as jnp

    fmt = parse(args.format)
    mode = Mode.parse(args.mode)
    key = jax.random.key(args.seed) if mode is Mode.SR else None
    for text in args.values:
        try:
            v = float(text)
        except ValueError:
            raise UsageError(f"not a number: {text!r}") from None
        r = float(round_to(jnp.float64(v), fmt, mode, key=key))
        print(f"{text} -> {r!r}")
    return 0


def _backend_for(kind: str, fmt_name: str, order: str):
    from .backends import make_backend
    from .formats import parse

    fmt = parse(fmt_name)
    if kind == "reference":
        return make_backend("reference", f"compute={fmt_name},order={order}")
    if kind == "native" or fmt.name == "fp64":
        return make_backend("native", fmt.name)  # fp64 runs natively: its ops are IEEE binary64 already
    from .policy import Policy

    return make_backend("emulated", str(Policy.uniform(fmt, order)))


def cmd_collapse(args) -> int:
    import csv
    import json
    from pathlib import Path

    from . import enable_x64
    from .families import FamilyError, make_pairs
    from .formats import parse
    from .model import ConfigError, ModelConfig, Params, init_params

    enable_x64()
    if args.max_len <= 0:
        raise UsageError(f"--max-len must be positive, got {args.max_len}")
    import re

    fmts = [f.strip().removeprefix("(").removesuffix(")") for f in re.split(r",(?![^()]*\))", args.format) if f.strip()]
    for f in fmts:
        parse(f)
    try:
        if args.weights:
            params = Params.load(args.weights)
        else:
            params = init_params(ModelConfig(d=args.d, n_layers=args.layers, n_heads=args.heads, d_ff=args.d_ff,
                                             vocab=args.vocab, pe=args.pe, norm=args.norm, window=args.window, ape=args.ape,
                                             seed=args.seed, max_len=max(16384, 2 * args.max_len + 8)))
        make_pairs(args.family, args.max_len, params.config.vocab, sep=args.sep)
    except (ConfigError, FamilyError) as e:
        raise UsageError(str(e)) from None
    c = params.config
    est = _memory_estimate(args.max_len * (2 if args.sep else 1) * 2 + 2, c.d, c.n_layers, c.d_ff)
    if est > args.mem_limit * 2**30:
        raise UsageError(f"estimated memory {est / 2**30:.1f} GiB exceeds --mem-limit {args.mem_limit} GiB; lower --max-len")
    if args.backend == "reference" and args.max_len > 128:
        raise UsageError("the reference backend is O(N^2 d) Python arithmetic; use --max-len <= 128 with it")
    backends = [(_backend_for(args.backend, f, args.order), parse(f).name) for f in fmts]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from .experiments.collapse import collapse_sweep
    from .plots import plot_collapse

    results = []
    for be, fname in backends:
        print(f"[collapse] {be.label}: family {args.family}, n = 1..{args.max_len} ...", flush=True)
        r = collapse_sweep(params, args.family, args.max_len, be, fname, seed=args.seed, sep=args.sep,
                           progress=lambda m: print(f"[collapse]   {m}", flush=True))
        results.append(r)
    rows = [row for r in results for row in r.rows()]
    tmp = out / "collapse.csv.tmp"
    with tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out / "collapse.csv")
    from .report import provenance

    meta = {"provenance": provenance(), "config": dataclasses_asdict(c), "family": args.family, "sep": args.sep,
            "max_len": args.max_len, "backends": [be.describe() for be, _ in backends], "seed": args.seed,
            "weights": args.weights}
    (out / "collapse.json").write_text(json.dumps(meta, indent=1, default=str))
    plot_collapse(results, out / "collapse.png", title=f"{args.family}, pe={c.pe}, d={c.d}, L={c.n_layers}")
    print(f"{'backend':60s} {'first identical n':>18s} {'identical from n':>17s} {'non-finite':>10s}")
    for r in results:
        fi, cf = r.first_identical(), r.collapsed_from()
        print(f"{r.backend:60s} {str(fi if fi is not None else '-'):>18s} {str(cf if cf is not None else '-'):>17s} "
              f"{int(r.nonfinite.sum()):>10d}")
        if r.nonfinite.any():
            print(f"  warning: {r.backend} overflowed to inf/NaN at {int(r.nonfinite.sum())} lengths (marked in the table)")
    print(f"wrote {out / 'collapse.csv'}, {out / 'collapse.json'}, {out / 'collapse.png'}")
    return 0


def _memory_estimate(n: int, d: int, layers: int, d_ff: int) -> int:
    per_row = 8 * (d * (12 * layers + 8) + d_ff * 3 * layers)
    return n * per_row + 8 * (1 << 21) * 12


def dataclasses_asdict(c):
    import dataclasses

    return dataclasses.asdict(c)


def cmd_reproduce(args) -> int:
    from .report import reproduce

    return reproduce(out=args.out, quick=args.quick)


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one sentence on stderr and exit status 2."""

    def error(self, message):  # noqa: D401
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="collapse-sim", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"collapse-sim {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("formats", help="table of floating-point formats and their properties")
    p.add_argument("format", nargs="*", help="formats to describe (names or p=..,emax=..); default: all built-ins")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_formats)

    p = sub.add_parser("round", help="round decimal values to a format (exactly, from their float64 value)")
    p.add_argument("values", nargs="+")
    p.add_argument("--format", "-f", required=True)
    p.add_argument("--mode", "-m", default="rne", help="rne, rz, ru, rd or sr")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for stochastic rounding")
    p.set_defaults(func=cmd_round)

    from .families import NAMES
    from .positional import KINDS

    p = sub.add_parser("collapse", help="distance between paired inputs for every n, per format; first collapse length")
    p.add_argument("--family", required=True, choices=NAMES)
    p.add_argument("--format", default="bf16,fp16,fp32", help="comma-separated formats (default bf16,fp16,fp32); custom ones in parentheses: '(p=5,emax=15)'")
    p.add_argument("--backend", default="emulated", choices=["emulated", "native", "reference"])
    p.add_argument("--order", default="pairwise", help="reduction order for emulated/reference (default pairwise)")
    p.add_argument("--max-len", type=int, required=True)
    p.add_argument("--pe", default="sinusoidal", choices=KINDS)
    p.add_argument("--ape", default="residual", choices=["residual", "scores"],
                   help="absolute PE into the residual stream (default) or only into queries/keys")
    p.add_argument("--norm", default="layernorm", choices=["layernorm", "rmsnorm", "none"])
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--d-ff", type=int, default=0)
    p.add_argument("--vocab", type=int, default=16)
    p.add_argument("--window", type=int, default=None, help="sliding-window attention width")
    p.add_argument("--sep", type=int, default=None, help="insert a separator after every k tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default=None, help="PATH of PATH.json + PATH.npz to use instead of a random init")
    p.add_argument("--mem-limit", type=float, default=8.0, help="refuse runs estimated above this many GiB")
    p.add_argument("--out", default="collapse-out")
    p.set_defaults(func=cmd_collapse)

    p = sub.add_parser("reproduce", help="run the checks and experiments and write a report")
    p.add_argument("--out", default="collapse-report", help="output directory (default: collapse-report)")
    p.add_argument("--quick", action="store_true", help="smaller sizes, a few minutes on 2 cores")
    p.set_defaults(func=cmd_reproduce)
    return ap


def main(argv: list[str] | None = None) -> int:
    from .backends.emulated import CarrierError
    from .formats import FormatError
    from .policy import PolicyError

    ap = build_parser()
    args = ap.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (UsageError, FormatError, PolicyError, CarrierError) as e:
        print(f"collapse-sim: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
