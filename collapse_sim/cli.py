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
    from .formats import builtin_formats, parse, table_rows

    rows = table_rows() if not args.format else [
        _row(parse(f)) for f in args.format
    ]
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
    del builtin_formats
    return 0


def _row(f):
    return {"name": f.name, "p": f.p, "emin": f.emin, "emax": f.emax, "subnormals": f.subnormals,
            "overflow": f.overflow, "u": f.unit_roundoff, "eps": f.eps, "max": f.max,
            "min_normal": f.min_normal, "min_subnormal": f.min_subnormal, "description": f.description}


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


def cmd_reproduce(args) -> int:
    from .report import reproduce

    return reproduce(out=args.out, quick=args.quick)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="collapse-sim", description=__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"collapse-sim {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

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
