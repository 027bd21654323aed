"""Where do distinct inputs become identical? The ``collapse`` experiment, its summary and memory.

:func:`run_collapse` is the whole ``collapse-sim collapse`` run without argparse: memory
and time estimates, one sweep per format, ``collapse.csv``, ``collapse.json`` and
``collapse.png``. The sweep itself (:func:`collapse_sweep`, :class:`CollapseResult`,
:func:`pair_outputs`) lives in :mod:`collapse_sim.pairing`, below the theory checks that
use it too; its names are imported here as well.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..pairing import (CollapseResult, collapse_sweep, exactly_equal, first_collapse,  # noqa: F401  (imported from here too)
                       pad_stream, pair_outputs)


def describe_first_collapse(ns, identical, nonfinite, exact_equal) -> str:
    """The summary's words for one run: the first collapse n, or why there is none."""
    ns, exact = np.asarray(ns), np.asarray(exact_equal)
    n = first_collapse(ns, identical, nonfinite, exact)
    if n is not None:
        return str(n)
    if exact.all():
        return f"none: exactly equal at every n <= {int(ns.max())}"
    return f"never (n <= {int(ns.max())})"


def collapse_summary(results) -> str:
    """The table ``collapse`` prints: per run, the first collapse, the n from which every
    pair that differs exactly is identical, the n whose pairs are equal exactly, non-finite count."""
    head = ("format", "backend", "first collapse n", "identical from n", "exactly equal at n", "non-finite")
    rows = [head]
    for r in results:
        rows.append((r.fmt, r.backend.split(":")[0],
                     describe_first_collapse(r.ns, r.identical, r.nonfinite, r._exact()),
                     r.describe_collapsed_from() or "-",
                     _ranges(r.ns[r._exact()]) or "none",
                     str(int(r.nonfinite.sum()))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("first collapse: smallest n whose pair is bitwise identical although it differs in exact arithmetic "
                 "(pairs equal exactly are identical in any format and are not counted)")
    for r in results:
        if "mode=sr(" in r.backend or "mode=sr(" in r.fmt:
            lines.append(f"{r.fmt}: under stochastic rounding the two members of a pair take different random draws "
                         "(the stream's rows and its probes'), so pairs equal in exact arithmetic differ too and "
                         "bitwise identity does not measure collapse here; compare the distances with the rounding "
                         "noise instead (docs/semantics.md §2, §10)")
    return "\n".join(lines)


def _ranges(ns) -> str:
    """``1, 3-5, 9`` for n = 1, 3, 4, 5, 9."""
    ns = [int(n) for n in ns]
    parts, i = [], 0
    while i < len(ns):
        j = i
        while j + 1 < len(ns) and ns[j + 1] == ns[j] + 1:
            j += 1
        parts.append(str(ns[i]) if i == j else f"{ns[i]}-{ns[j]}")
        i = j + 1
    return ", ".join(parts)


def memory_estimate(config, max_len: int, sep: int | None = None) -> int:
    """Bytes a collapse run of ``config`` up to ``max_len`` needs, roughly: per stream row,
    the activations of every layer (a run holds both members and, with separators, twice
    the tokens), plus the weights (float64 and the backend's stored copy) and a fixed
    allowance for the compiled program. Used by ``collapse --mem-limit`` and by sweeps."""
    import math

    from ..model import weight_shapes

    c = config
    rows = max_len * (2 if sep else 1) * 2 + 2
    per_row = 8 * (c.d * (12 * c.n_layers + 8) + c.d_ff * 3 * c.n_layers)
    weights = 2 * 8 * sum(math.prod(s) for s in weight_shapes(c).values())
    return rows * per_row + weights + 8 * (1 << 21) * 12


#: Longest run the reference backend takes: it is O(N^2 d) Python arithmetic.
REFERENCE_MAX_LEN = 128


def check_collapse(max_len: int, mem_limit_gib: float, formats: str, backend: str, policy: str | None = None) -> list:
    """The run's lengths, memory limit and formats (``formats``: comma-separated names), checked
    before any model is built; returns the parsed formats (with ``policy``, a policy string that
    replaces them, its compute format)."""
    from ..formats import NUMPY_DTYPES, parse_list

    if max_len <= 0:
        raise UsageError(f"--max-len must be positive, got {max_len}")
    if not mem_limit_gib > 0:
        raise UsageError(f"--mem-limit must be a positive number of GiB, got {mem_limit_gib}")
    if policy is not None:
        from ..policy import Policy

        if backend not in ("emulated", "reference"):
            raise UsageError(f"--policy runs on the emulated or reference backend, not {backend}; use --format with it")
        return [Policy.parse(policy).compute]
    fmts = parse_list(formats)
    if backend == "native":
        for f in fmts:
            if f.name not in NUMPY_DTYPES:
                raise UsageError(f"format {f.name} has no native JAX dtype; run it with --backend emulated or reference")
    return fmts


@dataclasses.dataclass
class CollapseRun:
    """What :func:`run_collapse` measured and wrote."""

    results: list  # one CollapseResult per format, in the order given
    compiled: object  # the XLA compilations during the runs (collapse_sim.compilation)
    files: tuple[Path, ...]  # collapse.csv, collapse.json, collapse.png


def run_collapse(params, family: str, max_len: int, fmts, out: Path, *, backend: str = "emulated",
                 order: str = "pairwise", shard: bool = False, sep: int | None = None, seed: int = 0,
                 mem_limit_gib: float = 8.0, time_limit_s: float = 3600.0, weights: str | None = None,
                 kernel: str = "naive", policy: str | None = None, log=None) -> CollapseRun:
    """The ``collapse`` experiment: the pairs of ``family`` for n = 1..max_len through ``params``
    in every format of ``fmts`` (from :func:`check_collapse`) on ``backend``, refused in one
    sentence if its memory or time estimate exceeds the limits; writes collapse.csv,
    collapse.json and collapse.png into ``out`` (a folder already checked with
    :func:`collapse_sim.results.check_output_dir`; created only once every format has run, so
    a run stopped on the way leaves nothing behind). ``policy``: one policy string that replaces
    ``fmts``, ``order`` and ``kernel`` (the results' backend label records it, every role
    included). ``log`` prints the progress lines."""
    import json

    from ..backends import backend_for_format, is_stochastic
    from ..compilation import snapshot
    from ..families import make_pairs
    from ..formats import format_token
    from ..lanes import in_order
    from ..model import check_backend, token_bound
    from ..plots import plot_collapse
    from ..progress import stage
    from ..results import provenance, write_csv
    from . import estimate

    log = log or (lambda m: print(m, flush=True))
    c = params.config
    mem = memory_estimate(c, max_len, sep)  # before the pairs: an absurd --max-len must not allocate them
    if mem > mem_limit_gib * 2**30:
        raise UsageError(f"estimated memory {mem / 2**30:.1f} GiB exceeds --mem-limit {mem_limit_gib} GiB; lower --max-len")
    if backend == "reference" and max_len > REFERENCE_MAX_LEN:
        raise UsageError(f"the reference backend is O(N^2 d) Python arithmetic; use --max-len <= {REFERENCE_MAX_LEN} with it")
    pairs = make_pairs(family, max_len, token_bound(params.config), seed=seed, sep=sep)
    if shard:
        import jax

        if backend != "emulated":
            raise UsageError("--shard applies to the emulated backend only")
        if jax.device_count() < 2:
            raise UsageError("--shard needs more than one JAX device; on CPU set "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=K before starting")
    # two formats at a time (collapse_sim.lanes), where twice one forward's memory fits the limit; each in its own
    # program (formats static), since which of two policies run side by side would take the shared one is timing
    together = policy is None and not shard and len(fmts) > 1 and 2 * mem <= mem_limit_gib * 2**30
    if policy is not None:
        from ..backends import make_backend
        from ..backends.emulated import EmulatedBackend
        from ..policy import Policy

        pol = Policy.parse(policy)
        order, kernel = str(pol.order), str(pol.kernel)
        backends = [(EmulatedBackend(pol, shard=shard) if backend == "emulated" else make_backend(backend, pol), str(pol))]
    else:
        backends = [(backend_for_format(backend, format_token(f), order, shard=shard, kernel=kernel,
                                        shared=False if together else None), f.name) for f in fmts]
    for be, _ in backends:
        check_backend(c, be)
    if not time_limit_s > 0:
        raise UsageError(f"--time-limit must be a positive number of seconds, got {time_limit_s}")
    per_format = [estimate.seconds(c, pairs, be.kind, order, stochastic=is_stochastic(be),
                                   operands=None if policy is None else pol.operands) for be, _ in backends]
    est = sum(per_format, estimate.Estimate(0.0, 0.0, 0))
    estimate.check(est, time_limit_s, f"this collapse run ({len(fmts)} format{'s' * (len(fmts) != 1)}, n <= {max_len})")
    log(f"[collapse] estimated time: {est.describe()}" + ("; the formats run two at a time" if together else ""))
    before = snapshot()

    def sweep(be, fname, fest):
        how = be.kind + (f", {order} order" + (f", {kernel} kernel" if kernel != "naive" else "")
                         if be.kind in ("emulated", "reference") else "")
        with stage("[collapse]", f"{fname} ({how}): family {family}, n = 1..{max_len}", estimate=fest.total):
            return collapse_sweep(params, family, max_len, be, fname, seed=seed, sep=sep,
                                  progress=lambda m: log(f"[collapse]   {fname}: {m.split(': ', 1)[-1]}"))

    results = in_order([functools.partial(sweep, be, fname, fest) for (be, fname), fest in zip(backends, per_format)],
                       together=together)
    compiled = snapshot().since(before)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run stopped before its results leaves no folder behind
    files = (out / "collapse.csv", out / "collapse.json", out / "collapse.png")
    write_csv(files[0], [row for r in results for row in r.rows()])
    meta = {"provenance": provenance(), "config": dataclasses.asdict(c), "family": family, "sep": sep,
            "max_len": max_len, "backends": [be.describe() for be, _ in backends], "seed": seed,
            "weights": weights, "compilation": compiled.as_dict()}  # the cache in use: in provenance
    files[1].write_text(json.dumps(meta, indent=1, default=str))
    how = ""  # the order and kernel a rounded backend ran in, where not the defaults
    if backend in ("emulated", "reference"):
        from ..policy import Kernel, Order

        o, k = str(Order.parse(order)), str(Kernel.parse(kernel))
        how = (f", order={o}" if o != "pairwise" else "") + (f", kernel={k}" if k != "naive" else "")
    plot_collapse(results, files[2], title=f"{family}, pe={c.pe}, d={c.d}, L={c.n_layers}{how}")
    return CollapseRun(results, compiled, files)
