"""How long a collapse run will take, said before it starts.

A forward over a stream of T tokens (causal attention, L layers, width d, MLP width
d_ff) does about ``T²/2 · d`` multiply-adds in attention and ``T · d · (4 d + 2 d_ff)``
in the projections and the MLP per layer; a probe step per position doubles the
attention part. :func:`seconds` multiplies that count by a per-backend cost, measured
on 2 CPU cores with jax 0.10.2 (see :data:`COST`), and adds the compilation: one
program per format and stream shape, :data:`COMPILE` seconds when the persistent
compilation cache does not hold it (about a second when it does). These are estimates for the order of magnitude: another
machine scales them by its speed; they are printed before long work, and the
arithmetic part is checked against the user's ``--time-limit``.
"""

from __future__ import annotations

import dataclasses

from ..errors import CollapseSimError

# seconds per multiply-add (see the module docstring), by backend and reduction order; measured
# on 2 cores (jax 0.10.2, d = 64, first runs after the compile): native fp64 and emulated bf16
# pairwise at N = 2,000 and 20,000 with a probe, emulated exact at N = 4,096. sequential, kahan
# and blocked are scaled from pairwise and exact by their work per term.
COST = {
    ("native", None): 5.0e-10,
    ("emulated", "pairwise"): 1.5e-8,
    ("emulated", "sequential"): 3.0e-8,
    ("emulated", "kahan"): 6.0e-8,
    ("emulated", "exact"): 2.0e-9,
    ("emulated", "blocked"): 6.0e-9,
    ("emulated", "tcfma"): 5.5e-8,  # 3.7x pairwise (bench_sweep's recipes, N = 4,096)
    # 1.5x pairwise (1.4-1.7x over the runs of 2026-12-03, its condition bounded from the dot
    # products' factors): bench_sweep's recipes at N = 4,096, CPU seconds, since the bit-level short
    # accumulator (orders.PROMOTE_FAST_MIN_TERMS; 2.4-3.3x before it; 4.9x earlier)
    ("emulated", "promote"): 2.3e-8,
    # stochastic rounding (mode=sr(r,seed=s), pairwise, bf16): 1.09 s for one forward at N = 512,
    # d = 64, L = 1 against 0.27 s under rne (best of 3 after the compile; 2026-12-02, 2 cores shared,
    # load 3-5)
    ("emulated", "sr"): 6.5e-8,
    ("reference", None): 4.0e-6,
}
# the emulated forward's cost with an operands role (docs/semantics.md §13.1, §13.2) against the same
# policy without it, measured at N = 2,048, d = 64, L = 1 (2026-12-02, 2 cores shared): per-tensor
# scales 2.0-2.1x CPU since their keys and values are quantised once per group of rows that share
# their amaxes (3.0x while every row of a block whose amaxes differ had its own; 1.84-1.88x at
# N = 4,096, benchmarks/README.md); tiles of 128 1.8x; MX blocks of 32, e4m3fn and e2m1fn elements,
# within the run-to-run noise of 1x (0.94x, 0.70x)
ROLE_COST = {"tensor": 2.1, "tiles": 1.8, "mx": 1.0}
# the same for the compile: CPU seconds of a fresh process's first emulated forward (d = 64, N = 64,
# L = 1, specialised program, no cache: the compile is nearly all of it) with the role against
# without it, two runs each (2026-12-02, 2 cores shared, load ~10): without 5.2-5.6 s, tiles of 128
# 7.8-8.7 s, MX blocks of 32 (e4m3fn) 7.4-7.6 s; per-tensor scales, the group loop's body holding the
# block's whole attention, 8.7-9.1 s against 4.8-5.1 s without (load ~13; 7.3-8.8 s against 5.2-5.3 s
# in the same runs before the group loop)
ROLE_COMPILE = {"tensor": 1.8, "tiles": 1.55, "mx": 1.4}
# seconds to compile one forward program cold (no cache): native; emulated op-by-op orders; the
# certified ones (exact, blocked), which compile the certified path (the op-by-op redo of uncertified
# rows is a program of its own, compiled where a row needs it; the superaccumulator runs on the
# host); the stochastic forward, whose adds are made round-to-odd and whose every rounding
# hashes its own draws (measured 2026-12-02 on 2 cores shared: one program at d = 64, N = 64 in 11.2 s
# at load ~2.5 and 23.7 s at load ~6, against 2.3 s and 6.8 s under rne; ~23 s at N = 512; 58.5 s
# and 172 s while its draws were threefry's, benchmarks/README.md)
COMPILE = {"native": 2.0, "emulated": 6.0, "emulated-certified": 30.0, "emulated-sr": 30.0, "reference": 0.0}
TIME_LIMIT = 3600.0  # default --time-limit, seconds


class TooLongError(CollapseSimError):
    """A run estimated to take longer than the user's time limit."""


@dataclasses.dataclass(frozen=True)
class Estimate:
    arithmetic: float  # seconds of forwards
    compile: float  # seconds of compilation when nothing is cached
    programs: int  # distinct (format, stream shape) programs to compile

    @property
    def total(self) -> float:
        return self.arithmetic + self.compile

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.arithmetic + other.arithmetic, self.compile + other.compile, self.programs + other.programs)

    def describe(self) -> str:
        s = f"about {_secs(self.arithmetic)} of arithmetic"
        if self.compile:
            s += (f" plus {_secs(self.compile)} compiling {self.programs} program{'s' * (self.programs != 1)} "
                  f"(seconds when the compilation cache holds them)")
        return s


def _secs(t: float) -> str:
    return f"{t:.0f} s" if t < 120 else (f"{t / 60:.0f} min" if t < 7200 else f"{t / 3600:.1f} h")


def multiply_adds(config, tokens: int, probe: bool) -> float:
    """Multiply-adds of one forward over ``tokens`` positions (see the module docstring)."""
    c = config
    attn = tokens * tokens / 2 * c.d * (2 if probe else 1)
    dense = tokens * c.d * (4 * c.d + 2 * c.d_ff)
    return (attn + dense) * c.n_layers


def order_kind(order: "str | None") -> str:
    """``"blocked"`` for ``"blocked(32)"``, ``"tcfma"`` for the preset ``"tcfma-v100"``; ``"pairwise"``
    (the default order) for None."""
    from ..policy import Order

    return Order.parse(order or "pairwise").kind


def forward_cost(backend: str, order: "str | None") -> float:
    if backend != "emulated":
        return COST[(backend, None)]
    return COST.get(("emulated", order_kind(order)), COST[("emulated", "sequential")])


def role_cost(operands, table: "dict | None" = None) -> float:
    """The emulated forward's cost factor for an operands role (an :class:`~collapse_sim.mx.MXFormat`,
    a :class:`~collapse_sim.mx.ScaledFormat` or None) from ``table``: :data:`ROLE_COST` (its
    arithmetic, the default) or :data:`ROLE_COMPILE` (its compile)."""
    from ..mx import MXFormat, is_per_tensor

    if operands is None:
        return 1.0
    table = ROLE_COST if table is None else table
    return table["mx" if isinstance(operands, MXFormat) else "tensor" if is_per_tensor(operands) else "tiles"]


def seconds(config, pairs, backend: str, order: "str | None" = None, *, formats: int = 1,
            stochastic: bool = False, operands=None) -> Estimate:
    """The time of one collapse run per format: every run of ``pairs`` (a family's
    :class:`~collapse_sim.families.Pairs`) through the backend of kind ``backend``
    (``native``, ``emulated``, ``reference``: the kind that really runs the format, e.g.
    :func:`collapse_sim.backends.kind_for_format`), for ``formats`` formats; ``stochastic``: the
    emulated forward in stochastic rounding (``mode=sr(r,seed=s)``); ``operands``: the policy's
    operands role (:func:`role_cost`, which scales both the arithmetic and the compile)."""
    stochastic = stochastic and backend == "emulated"
    cost = COST[("emulated", "sr")] if stochastic else forward_cost(backend, order)
    per_program = 1.0
    if backend == "emulated":
        cost *= role_cost(operands)
        per_program = role_cost(operands, ROLE_COMPILE)
    shapes = set()
    work = 0.0
    for run in pairs.runs:
        t = run.tokens.size
        shapes.add((t, run.probe is not None))
        work += multiply_adds(config, t, run.probe is not None)
    programs = len(shapes) * formats
    kind = backend
    if backend == "emulated" and order_kind(order) in ("exact", "blocked"):  # the certified orders
        kind = "emulated-certified"
    if stochastic:
        kind = "emulated-sr"
    return Estimate(work * cost * formats, COMPILE[kind] * per_program * programs, programs)


def check(est: Estimate, limit: float, what: str, flag: str = "--time-limit") -> None:
    """Refuse, in one sentence, work whose arithmetic is estimated above ``limit`` seconds.
    Compilation is left out: it is bounded (seconds per program), and none when the
    compilation cache holds the programs."""
    if est.arithmetic > limit:
        raise TooLongError(f"{what} is estimated to take {_secs(est.arithmetic)} of arithmetic (plus compiling), "
                           f"over the {limit:g} s limit; lower the length or raise {flag} (seconds)")
