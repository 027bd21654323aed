"""Where do distinct inputs become identical? The collapse sweep's summary and memory.

The sweep itself (:func:`collapse_sweep`, :class:`CollapseResult`, :func:`pair_outputs`)
lives in :mod:`collapse_sim.pairing`, below the theory checks that use it too; its
names are imported here as well.
"""

from __future__ import annotations

import numpy as np

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
        cf = r.collapsed_from()
        rows.append((r.fmt, r.backend.split(":")[0],
                     describe_first_collapse(r.ns, r.identical, r.nonfinite, r._exact()),
                     str(cf) if cf is not None else "-", _ranges(r.ns[r._exact()]) or "none",
                     str(int(r.nonfinite.sum()))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in rows]
    lines.append("first collapse: smallest n whose pair is bitwise identical although it differs in exact arithmetic "
                 "(pairs equal exactly are identical in any format and are not counted)")
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


